"""Forwards TCP connections on 127.0.0.1:PORT to a Unix socket, so tools that speak only
TCP/HTTP (schemathesis) reach the ember service's Unix socket.

usage: uds_proxy.py PORT SOCKET
"""

import asyncio
import sys


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def main(port: int, socket_path: str) -> None:
    async def handle(client_reader, client_writer):
        try:
            upstream_reader, upstream_writer = await asyncio.open_unix_connection(socket_path)
        except OSError as e:
            print(f"uds_proxy: cannot reach {socket_path}: {e}", file=sys.stderr)
            client_writer.close()
            return
        await asyncio.gather(
            pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer)
        )

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print(f"uds_proxy: 127.0.0.1:{port} -> {socket_path}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))

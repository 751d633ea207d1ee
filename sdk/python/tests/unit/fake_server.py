"""A tiny fake of the ember service for the unit tests: stdlib ``http.server`` on a temporary
Unix socket (or loopback TCP), in a thread. ``FakeEmber`` answers scripted routes;
``FakeService`` adds an in-memory model of sandboxes, commands, files and snapshots."""

from __future__ import annotations

import base64
import dataclasses
import http.server
import json
import os
import re
import socket
import socketserver
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar, Union, cast
from urllib.parse import parse_qs, urlsplit

# --- the server ------------------------------------------------------------------------------


class UnixHTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    address_family = socket.AF_UNIX
    daemon_threads = True
    request_queue_size = 128

    def server_bind(self) -> None:
        self.socket.bind(self.server_address)
        self.server_name = "fake-ember"
        self.server_port = 0


class TCPHTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    request_queue_size = 128


@dataclass
class Recorded:
    """A request the fake received."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    received_at: float

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


#: A streamed body: bytes are written as one chunk each, a float sleeps that long.
Piece = Union[bytes, float]


@dataclass
class Reply:
    status: int = 200
    json: Any = None
    body: Optional[bytes] = None
    headers: dict[str, str] = field(default_factory=dict)
    #: Streamed with chunked encoding instead of ``json``/``body``.
    stream: Optional[Iterable[Piece]] = None


def error(status: int, code: str, message: str, headers: Optional[dict[str, str]] = None) -> Reply:
    return Reply(status, {"error": {"code": code, "message": message}}, headers=headers or {})


Handler = Callable[[Recorded, "re.Match[str]"], Reply]

F = TypeVar("F", bound="FakeEmber")


class FakeEmber:
    """Routes ``(method, path regex) -> handler``; records every request."""

    def __init__(self) -> None:
        self.routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self.requests: list[Recorded] = []
        self.lock = threading.Lock()
        self._server: Optional[http.server.HTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._dir: Optional[tempfile.TemporaryDirectory[str]] = None
        self.socket_path = ""
        self.url = ""
        #: When set, requests without ``Authorization: Bearer <token>`` get 401.
        self.token: Optional[str] = None

    def route(self, method: str, pattern: str, handler: Handler, *, first: bool = True) -> None:
        entry = (method, re.compile(f"^{pattern}$"), handler)
        if first:
            self.routes.insert(0, entry)
        else:
            self.routes.append(entry)

    def reply(self, method: str, pattern: str, reply: Reply) -> None:
        self.route(method, pattern, lambda _req, _m: reply)

    def find(self, method: str, path: str) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.method == method and re.fullmatch(path, r.path)]

    # --- life --------------------------------------------------------------------------------

    def start(self: F, *, tcp: bool = False, tls: Optional[tuple[str, str]] = None) -> F:
        """Listens on a temporary Unix socket, or on loopback TCP (``tls``: HTTPS with that
        ``(certificate, key)``)."""
        handler = _make_handler(self)
        if tcp or tls:
            server: http.server.HTTPServer = TCPHTTPServer(("127.0.0.1", 0), handler)
            scheme = "http"
            if tls:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.load_cert_chain(*tls)
                server.socket = context.wrap_socket(server.socket, server_side=True)
                scheme = "https"
            self.url = f"{scheme}://127.0.0.1:{server.server_address[1]}"
        else:
            self._dir = tempfile.TemporaryDirectory(prefix="ember-fake-")
            self.socket_path = os.path.join(self._dir.name, "api.sock")
            server = UnixHTTPServer(cast(Any, self.socket_path), handler)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._dir is not None:
            self._dir.cleanup()

    def __enter__(self: F) -> F:
        if self._server is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _make_handler(fake: FakeEmber) -> type[http.server.BaseHTTPRequestHandler]:
    class RequestHandler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def address_string(self) -> str:
            return "fake-client"

        def _read_body(self) -> bytes:
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                data = bytearray()
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return bytes(data)
                    data.extend(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("content-length") or 0)
            return self.rfile.read(length) if length else b""

        def _handle(self) -> None:
            parts = urlsplit(self.path)
            recorded = Recorded(
                method=self.command,
                path=parts.path,
                query=parse_qs(parts.query),
                headers={k.lower(): v for k, v in self.headers.items()},
                body=self._read_body(),
                received_at=time.monotonic(),
            )
            with fake.lock:
                fake.requests.append(recorded)
            if fake.token is not None and recorded.headers.get("authorization") != (
                f"Bearer {fake.token}"
            ):
                self._send(error(401, "unauthorized", "the bearer token is not one this "
                                 "service accepts", {"www-authenticate": "Bearer"}))
                return
            reply = error(404, "not_found", "no such endpoint")
            for method, pattern, handler in list(fake.routes):
                match = pattern.match(parts.path)
                if method == self.command and match:
                    try:
                        reply = handler(recorded, match)
                    except Exception as e:  # a bug in a test's handler: say so
                        reply = error(500, "fake_error", f"{type(e).__name__}: {e}")
                    break
            self._send(reply)

        def _send(self, reply: Reply) -> None:
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            if reply.stream is not None:
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                try:
                    for piece in reply.stream:
                        if isinstance(piece, float):
                            time.sleep(piece)
                            continue
                        if piece:
                            self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                            self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                return
            if reply.body is not None:
                body = reply.body
            elif reply.json is not None:
                body = json.dumps(reply.json).encode()
                if "content-type" not in {k.lower() for k in reply.headers}:
                    self.send_header("content-type", "application/json")
            else:
                body = b""
            if reply.status != 204:
                self.send_header("content-length", str(len(body)))
            self.end_headers()
            if reply.status != 204:
                self.wfile.write(body)

        do_GET = _handle
        do_POST = _handle
        do_PUT = _handle
        do_PATCH = _handle
        do_DELETE = _handle

    return RequestHandler


# --- the model of a service ------------------------------------------------------------------


def ndjson(record: dict[str, Any]) -> bytes:
    return json.dumps(record).encode() + b"\n"


def out(stream: str, data: bytes) -> dict[str, Any]:
    """An output record as the service makes it: text when UTF-8, else base64."""
    try:
        return {"type": stream, "data": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"type": stream, "data_base64": base64.b64encode(data).decode()}


def exit_record(
    code: Optional[int] = 0, signal: Optional[int] = None, timed_out: bool = False
) -> dict[str, Any]:
    return {
        "type": "exit",
        "exit_code": code,
        "signal": signal,
        "timed_out": timed_out,
        "duration_ms": 1.5,
    }


class FakeCommand:
    def __init__(self, cmd_id: str, argv: list[str]) -> None:
        self.cmd_id = cmd_id
        self.argv = argv
        self.records: list[dict[str, Any]] = []
        self.killed = threading.Event()
        self.kill_signal: Optional[int] = None
        self.finished = threading.Event()
        self.changed = threading.Condition()

    def add(self, record: dict[str, Any]) -> None:
        with self.changed:
            self.records.append(record)
            if record["type"] == "exit":
                self.finished.set()
            self.changed.notify_all()


#: A program of the fake guest: yields records (dicts), sleeps (floats) or raw bytes of the
#: stream (to split lines anywhere). An exit record ends it (exit 0 when it yields none).
Program = Callable[[dict[str, Any], FakeCommand], Iterator[Union[dict[str, Any], float, bytes]]]


def _echo(body: dict[str, Any], cmd: FakeCommand) -> Iterator[Union[dict[str, Any], float, bytes]]:
    yield out("stdout", (" ".join(body.get("args", [])) + "\n").encode())


def _sleep(body: dict[str, Any], cmd: FakeCommand) -> Iterator[Union[dict[str, Any], float, bytes]]:
    seconds = float((body.get("args") or ["60"])[0])
    if cmd.killed.wait(seconds):
        yield exit_record(None, cmd.kill_signal)
    else:
        yield exit_record(0)


def _cat(body: dict[str, Any], cmd: FakeCommand) -> Iterator[Union[dict[str, Any], float, bytes]]:
    """Echoes stdin back (text or base64)."""
    if "stdin_base64" in body:
        yield out("stdout", base64.b64decode(body["stdin_base64"]))
    else:
        yield out("stdout", body.get("stdin", "").encode())


def _env(body: dict[str, Any], cmd: FakeCommand) -> Iterator[Union[dict[str, Any], float, bytes]]:
    """Prints what the command would run with."""
    yield out("stdout", json.dumps(body).encode())


class FakeService(FakeEmber):
    """An in-memory ember: sandboxes, commands (scripted programs), files, snapshots."""

    def __init__(self) -> None:
        super().__init__()
        self.sandboxes: dict[str, dict[str, Any]] = {}
        self.commands: dict[str, FakeCommand] = {}
        self.files: dict[tuple[str, str], bytes] = {}
        self.dirs: set[tuple[str, str]] = set()
        self.snapshots: dict[str, dict[str, Any]] = {}
        self.programs: dict[str, Program] = {
            "echo": _echo,
            "sleep": _sleep,
            "cat": _cat,
            "env": _env,
        }
        self.read_chunk = 1000
        self._ids = 0
        r = self.route
        u = self._used
        r("POST", "/sandboxes", self._create, first=False)
        r("GET", "/sandboxes/([^/]+)", self._get, first=False)
        r("DELETE", "/sandboxes/([^/]+)", self._delete, first=False)
        r("POST", "/sandboxes/([^/]+)/timeout", self._timeout, first=False)
        r("PATCH", "/sandboxes/([^/]+)/network", self._network, first=False)
        r("GET", "/sandboxes/([^/]+)/metrics", self._metrics, first=False)
        r("POST", "/sandboxes/([^/]+)/exec", u(self._exec), first=False)
        r("GET", "/sandboxes/([^/]+)/commands", u(self._list_commands), first=False)
        r("GET", "/sandboxes/([^/]+)/commands/([^/]+)", u(self._get_command), first=False)
        r("GET", "/sandboxes/([^/]+)/commands/([^/]+)/logs", u(self._logs), first=False)
        r("POST", "/sandboxes/([^/]+)/commands/([^/]+)/kill", u(self._kill), first=False)
        r("PUT", "/sandboxes/([^/]+)/files", u(self._put_file), first=False)
        r("GET", "/sandboxes/([^/]+)/files", u(self._get_file), first=False)
        r("POST", "/sandboxes/([^/]+)/files/mkdir", u(self._mkdir), first=False)
        r("POST", "/sandboxes/([^/]+)/snapshots", self._snapshot, first=False)
        r("GET", "/snapshots/([^/]+)", self._get_snapshot, first=False)
        r("DELETE", "/snapshots/([^/]+)", self._delete_snapshot, first=False)
        r("POST", "/snapshots/([^/]+)/fork", self._fork, first=False)

    def _next_id(self, prefix: str) -> str:
        with self.lock:
            self._ids += 1
            return f"{prefix}-{self._ids}"

    # --- sandboxes ---------------------------------------------------------------------------

    def new_sandbox(self, body: dict[str, Any]) -> dict[str, Any]:
        sandbox_id = self._next_id("sb")
        now = int(time.time() * 1000)
        network = body.get("network") or {"mode": "none"}
        info = {
            "id": sandbox_id,
            "state": "running",
            "created_unix_ms": now,
            "vcpus": body.get("vcpus") or 1,
            "memory_mib": body.get("memory_mib") or 256,
            "timeout_at_unix_ms": now + 1000 * (body.get("timeout_s") or 300),
            "timeline": [{"step": "ready", "ms": 1.0}],
            "env": body.get("env", {}),
            "disk_limits": {},
            "net_limits": {},
            "network": {"mode": network["mode"], "allow": network.get("allow")},
            "ports": [
                {"guest_port": p, "host": f"127.0.0.1:{40000 + p}"} for p in body.get("ports", [])
            ],
            "runtime": body.get("runtime") or "base",
            "snapshot": body.get("snapshot"),
            "on_timeout": body.get("on_timeout") or "stop",
            "auto_resume": body.get("auto_resume") is not False,
            "idle_timeout_s": body.get("idle_timeout_s"),
            "suspended": None,
        }
        self.sandboxes[sandbox_id] = info
        self.dirs.add((sandbox_id, "/"))
        self.dirs.add((sandbox_id, "/tmp"))
        if body.get("snapshot"):
            origin = self.snapshots.get(body["snapshot"], {}).get("_sandbox")
            for (sid, path), data in list(self.files.items()):
                if sid == origin:
                    self.files[(sandbox_id, path)] = data
        return info

    def _sandbox(self, sandbox_id: str) -> Optional[dict[str, Any]]:
        return self.sandboxes.get(sandbox_id)

    @staticmethod
    def _no_sandbox(sandbox_id: str) -> Reply:
        return error(404, "not_found", f'no sandbox "{sandbox_id}"')

    def _create(self, req: Recorded, m: "re.Match[str]") -> Reply:
        body = req.json() or {}
        if body.get("snapshot") and body["snapshot"] not in self.snapshots:
            return error(404, "not_found", f'no snapshot "{body["snapshot"]}"')
        return Reply(201, self.new_sandbox(body))

    def _get(self, req: Recorded, m: "re.Match[str]") -> Reply:
        info = self._sandbox(m.group(1))
        return Reply(200, info) if info else self._no_sandbox(m.group(1))

    def _delete(self, req: Recorded, m: "re.Match[str]") -> Reply:
        if self.sandboxes.pop(m.group(1), None) is None:
            return self._no_sandbox(m.group(1))
        return Reply(204)

    # --- lifecycle: suspension by on_timeout, resume on use ---------------------------------

    def suspend(self, sandbox_id: str, reason: str = "idle") -> None:
        """Does what the sandbox's ``on_timeout`` (``pause`` or ``snapshot``) does at its
        timeout or idleness."""
        info = self.sandboxes[sandbox_id]
        how = info["on_timeout"]
        assert how in ("pause", "snapshot"), f"on_timeout {how} does not suspend"
        info["state"] = "paused" if how == "pause" else "stopped"
        info["suspended"] = {
            "reason": reason,
            "how": how,
            "at_unix_ms": int(time.time() * 1000),
            "snapshot": f"{sandbox_id}-{reason}" if how == "snapshot" else None,
        }

    def _used(self, handler: Handler) -> Handler:
        """A request that uses its sandbox (exec, files, commands): as the service's
        middleware, it resumes a sandbox its ``on_timeout`` suspended (unless
        ``auto_resume`` is off) and says so in ``ember-resumed``."""

        def used(req: Recorded, m: "re.Match[str]") -> Reply:
            info = self._sandbox(m.group(1))
            resumed: Optional[str] = None
            if info and info.get("suspended") and info.get("auto_resume", True):
                resumed = info["suspended"]["how"]
                info["state"] = "running"
                info["suspended"] = None
            reply = handler(req, m)
            if resumed is None:
                return reply
            return dataclasses.replace(reply, headers={**reply.headers, "ember-resumed": resumed})

        return used

    def _metrics(self, req: Recorded, m: "re.Match[str]") -> Reply:
        info = self._sandbox(m.group(1))
        if not info:
            return self._no_sandbox(m.group(1))
        guest: Optional[dict[str, Any]] = None
        if info["state"] == "running":
            guest = {
                "cpus": info["vcpus"],
                "cpu_user_ms": 120,
                "cpu_system_ms": 30,
                "cpu_idle_ms": 5000,
                "cpu_iowait_ms": 1,
                "load_1m": 0.1,
                "load_5m": 0.05,
                "load_15m": 0.0,
                "memory_total_bytes": info["memory_mib"] << 20,
                "memory_available_bytes": (info["memory_mib"] - 40) << 20,
                "memory_used_bytes": 40 << 20,
                "processes": 5,
                "uptime_s": 3,
            }
        return Reply(200, {
            "id": info["id"],
            "state": info["state"],
            "sampled_unix_ms": int(time.time() * 1000),
            "guest": guest,
            "guest_error": None if guest else f"the sandbox is {info['state']}",
            "host": {"vmm_pid": 4242, "rss_bytes": 64 << 20, "cpu_usage_us": 150_000,
                     "cgroup_memory_bytes": None},
        })

    def _timeout(self, req: Recorded, m: "re.Match[str]") -> Reply:
        info = self._sandbox(m.group(1))
        if not info:
            return self._no_sandbox(m.group(1))
        info["timeout_at_unix_ms"] = int(time.time() * 1000) + 1000 * req.json()["timeout_s"]
        return Reply(200, info)

    def _network(self, req: Recorded, m: "re.Match[str]") -> Reply:
        info = self._sandbox(m.group(1))
        if not info:
            return self._no_sandbox(m.group(1))
        if info["network"]["mode"] != "egress":
            return Reply(409, {"error": {"code": "conflict", "message": "no egress network"}})
        info["network"] = {"mode": "egress", **req.json()}
        return Reply(200, info["network"])

    # --- commands ----------------------------------------------------------------------------

    def _run(self, program: Program, body: dict[str, Any], cmd: FakeCommand) -> Iterator[Piece]:
        """Runs a program, keeping its records; yields the stream's pieces."""
        cmd.add({"type": "started", "cmd_id": cmd.cmd_id, "pid": 42})
        yield ndjson(cmd.records[0])
        ended = False
        for item in program(body, cmd):
            if isinstance(item, float):
                yield item
            elif isinstance(item, bytes):
                yield item
            else:
                cmd.add(item)
                ended = item["type"] == "exit"
                yield ndjson(item)
        if not ended:
            record = exit_record(0)
            cmd.add(record)
            yield ndjson(record)

    def _exec(self, req: Recorded, m: "re.Match[str]") -> Reply:
        info = self._sandbox(m.group(1))
        if not info:
            return self._no_sandbox(m.group(1))
        if info["state"] != "running":
            return error(409, "conflict", f"sandbox {m.group(1)} is {info['state']}")
        body = req.json()
        program = self.programs.get(body["cmd"])
        if program is None:
            return error(404, "not_found", f"starting {body['cmd']!r}: no such file")
        cmd = FakeCommand(self._next_id("cmd"), [body["cmd"], *body.get("args", [])])
        self.commands[cmd.cmd_id] = cmd
        pieces = self._run(program, body, cmd)
        if body.get("detach"):
            first = next(pieces)  # the started record
            assert first

            def drain() -> None:
                for piece in pieces:
                    if isinstance(piece, float):
                        time.sleep(piece)

            threading.Thread(target=drain, daemon=True).start()
            return Reply(202, self._command_info(cmd))
        return Reply(200, headers={"content-type": "application/x-ndjson"}, stream=pieces)

    def _command_info(self, cmd: FakeCommand) -> dict[str, Any]:
        stdout = b"".join(
            _record_data(r) for r in cmd.records if r["type"] == "stdout"
        )
        stderr = b"".join(
            _record_data(r) for r in cmd.records if r["type"] == "stderr"
        )
        exit_ = next((r for r in cmd.records if r["type"] == "exit"), None)
        info: dict[str, Any] = {
            "cmd_id": cmd.cmd_id,
            "argv": cmd.argv,
            "pid": 42,
            "started_unix_ms": 1,
            "status": "finished" if exit_ else "running",
            "stdout_dropped_bytes": 0,
            "stderr_dropped_bytes": 0,
            "timed_out": bool(exit_ and exit_["timed_out"]),
            "exit_code": exit_ and exit_["exit_code"],
            "signal": exit_ and exit_["signal"],
        }
        for name, data in (("stdout", stdout), ("stderr", stderr)):
            try:
                info[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                info[name + "_base64"] = base64.b64encode(data).decode()
        return info

    def _command(self, m: "re.Match[str]") -> Optional[FakeCommand]:
        return self.commands.get(m.group(2))

    def _list_commands(self, req: Recorded, m: "re.Match[str]") -> Reply:
        return Reply(200, {"commands": [self._command_info(c) for c in self.commands.values()]})

    def _get_command(self, req: Recorded, m: "re.Match[str]") -> Reply:
        cmd = self._command(m)
        if cmd is None:
            return error(404, "not_found", f'no command "{m.group(2)}"')
        return Reply(200, self._command_info(cmd))

    def _logs(self, req: Recorded, m: "re.Match[str]") -> Reply:
        cmd = self._command(m)
        if cmd is None:
            return error(404, "not_found", f'no command "{m.group(2)}"')
        command = cmd

        def follow() -> Iterator[Piece]:
            sent = 0
            while True:
                with command.changed:
                    while sent >= len(command.records):
                        command.changed.wait(timeout=5)
                    batch = command.records[sent:]
                    sent = len(command.records)
                for record in batch:
                    yield ndjson(record)
                    if record["type"] == "exit":
                        return

        return Reply(200, headers={"content-type": "application/x-ndjson"}, stream=follow())

    def _kill(self, req: Recorded, m: "re.Match[str]") -> Reply:
        cmd = self._command(m)
        if cmd is None:
            return error(404, "not_found", f'no command "{m.group(2)}"')
        if cmd.finished.is_set():
            return error(409, "conflict", f"command {cmd.cmd_id} has already finished")
        signal = (req.json() or {}).get("signal") or 9
        cmd.kill_signal = signal
        cmd.killed.set()
        return Reply(200, {"cmd_id": cmd.cmd_id, "signal": signal})

    # --- files -------------------------------------------------------------------------------

    def _put_file(self, req: Recorded, m: "re.Match[str]") -> Reply:
        sandbox_id = m.group(1)
        if not self._sandbox(sandbox_id):
            return self._no_sandbox(sandbox_id)
        path = req.query["path"][0]
        parent = path.rsplit("/", 1)[0] or "/"
        if (sandbox_id, parent) not in self.dirs:
            return error(404, "not_found", f"writing {path}: no such file or directory")
        self.files[(sandbox_id, path)] = req.body
        mode = req.query.get("mode", ["644"])[0]
        return Reply(201, {"path": path, "bytes": len(req.body), "mode": mode})

    def _get_file(self, req: Recorded, m: "re.Match[str]") -> Reply:
        sandbox_id = m.group(1)
        if not self._sandbox(sandbox_id):
            return self._no_sandbox(sandbox_id)
        path = req.query["path"][0]
        data = self.files.get((sandbox_id, path))
        if data is None:
            return error(404, "not_found", f"reading {path}: no such file or directory")
        step = self.read_chunk
        pieces: list[Piece] = [data[i : i + step] for i in range(0, len(data), step)]
        return Reply(
            200,
            headers={"content-type": "application/octet-stream", "x-file-size": str(len(data))},
            stream=pieces,
        )

    def _mkdir(self, req: Recorded, m: "re.Match[str]") -> Reply:
        sandbox_id = m.group(1)
        if not self._sandbox(sandbox_id):
            return self._no_sandbox(sandbox_id)
        path = req.json()["path"]
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self.dirs.add((sandbox_id, "/" + "/".join(parts[:i])))
        return Reply(201, {"path": path})

    # --- snapshots ---------------------------------------------------------------------------

    def _snapshot(self, req: Recorded, m: "re.Match[str]") -> Reply:
        info = self._sandbox(m.group(1))
        if not info:
            return self._no_sandbox(m.group(1))
        body = req.json() or {}
        snap_id = body.get("name") or self._next_id("snap")
        snap = {
            "id": snap_id,
            "created": "2025-01-01T00:00:00Z",
            "created_unix_ms": 1,
            "memory_bytes": 256 << 20,
            "memory_mib": 256.0,
            "disks": 1,
            "network": info["network"]["mode"] == "egress",
            "_sandbox": info["id"],
        }
        self.snapshots[snap_id] = snap
        if body.get("stop"):
            info["state"] = "stopped"
        public = {k: v for k, v in snap.items() if not k.startswith("_")}
        return Reply(201, {**public, "sandbox": info, "took_ms": 12.5})

    def _get_snapshot(self, req: Recorded, m: "re.Match[str]") -> Reply:
        snap = self.snapshots.get(m.group(1))
        if not snap:
            return error(404, "not_found", f'no snapshot "{m.group(1)}"')
        return Reply(200, {k: v for k, v in snap.items() if not k.startswith("_")})

    def _delete_snapshot(self, req: Recorded, m: "re.Match[str]") -> Reply:
        if self.snapshots.pop(m.group(1), None) is None:
            return error(404, "not_found", f'no snapshot "{m.group(1)}"')
        return Reply(204)

    def _fork(self, req: Recorded, m: "re.Match[str]") -> Reply:
        if m.group(1) not in self.snapshots:
            return error(404, "not_found", f'no snapshot "{m.group(1)}"')
        body = req.json()
        clones = [
            self.new_sandbox({**body, "snapshot": m.group(1)}) for _ in range(body["count"])
        ]
        return Reply(201, {"sandboxes": clones})


def _record_data(record: dict[str, Any]) -> bytes:
    if record.get("data_base64") is not None:
        return base64.b64decode(record["data_base64"])
    return str(record.get("data") or "").encode()

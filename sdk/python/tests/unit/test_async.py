"""The asyncio API against the fake service (plain ``asyncio.run``, no plugin)."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Union

import pytest

from ember_sandbox import (
    AsyncCommand,
    AsyncCommandFinished,
    AsyncSandbox,
    AsyncSnapshot,
    ConflictError,
    LogLine,
    NotFoundError,
    SnapshotSource,
)

from .fake_server import FakeCommand, FakeService, exit_record, out

Item = Union[dict[str, Any], float, bytes]


def kills(service: FakeService) -> list[Any]:
    return [r.json() for r in service.find("POST", "/sandboxes/[^/]+/commands/[^/]+/kill")]


def test_create_run_and_stop(service: FakeService) -> None:
    def program(body: dict[str, Any], cmd: FakeCommand) -> Iterator[Item]:
        yield out("stdout", b"1936\n")
        yield out("stderr", b"\xff")
        yield exit_record(0)

    service.programs["python3"] = program

    async def main() -> None:
        async with AsyncSandbox.create(runtime="base", timeout_ms=5000) as sb:
            assert sb.info["state"] == "running"
            result = await sb.run_command("python3", ["-c", "print(44 * 44)"])
            assert isinstance(result, AsyncCommandFinished)
            assert await result.stdout() == "1936\n" and result.stdout_text == "1936\n"
            assert result.stderr_bytes == b"\xff" and result.exit_code == 0 and result.ok
            assert [line.stream async for line in result.logs()] == ["stdout", "stderr"]
            assert [line.stream for line in result.log_lines()] == ["stdout", "stderr"]
        assert sb.status == "stopped"

    asyncio.run(main())
    assert service.find("DELETE", "/sandboxes/[^/]+")
    assert service.find("POST", "/sandboxes")[0].json() == {"runtime": "base", "timeout_s": 5}


def test_create_can_be_awaited_and_get_finds_it(service: FakeService) -> None:
    async def main() -> None:
        sb = await AsyncSandbox.create()
        again = await AsyncSandbox.get(sb.sandbox_id)
        assert again.info == sb.info
        with pytest.raises(NotFoundError):
            await AsyncSandbox.get("no-such-id")
        await sb.stop()
        await sb.stop()
        await sb.aclose()
        await again.aclose()

    asyncio.run(main())


def test_streaming_sinks_may_be_coroutines(service: FakeService) -> None:
    def slow(body: dict[str, Any], cmd: FakeCommand) -> Iterator[Item]:
        for i in range(1, 6):
            yield out("stdout", f"{i}\n".encode())
            yield 0.1

    service.programs["slow"] = slow
    arrivals: list[tuple[float, bytes]] = []

    async def sink(data: bytes) -> None:
        await asyncio.sleep(0)
        arrivals.append((time.monotonic(), data))

    async def main() -> float:
        async with AsyncSandbox.create() as sb:
            result = await sb.run_command("slow", on_stdout=sink)
            assert result.stdout_bytes == b"1\n2\n3\n4\n5\n"
            return time.monotonic()

    end = asyncio.run(main())
    assert b"".join(d for _, d in arrivals) == b"1\n2\n3\n4\n5\n"
    assert end - arrivals[0][0] >= 0.3


def test_task_cancellation_kills_the_command(service: FakeService) -> None:
    async def main() -> None:
        async with AsyncSandbox.create() as sb:
            task = asyncio.ensure_future(sb.run_command("sleep", ["60"]))
            await asyncio.sleep(0.3)
            task.cancel()
            started = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert time.monotonic() - started < 10
            assert kills(service) == [{"signal": 9}]
            command = service.commands[next(iter(service.commands))]
            assert command.finished.wait(5)
            assert command.records[-1]["signal"] == 9

    asyncio.run(main())


def test_wait_for_timeout_kills_the_command(service: FakeService) -> None:
    async def main() -> None:
        async with AsyncSandbox.create() as sb:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(sb.run_command("sleep", ["60"], kill_signal=15), 0.3)
            assert kills(service) == [{"signal": 15}]

    asyncio.run(main())


def test_cancel_event(service: FakeService) -> None:
    async def main() -> None:
        async with AsyncSandbox.create() as sb:
            cancel = asyncio.Event()
            asyncio.get_running_loop().call_later(0.2, cancel.set)
            result = await sb.run_command("sleep", ["60"], cancel=cancel)
            assert result.signal == 9 and result.exit_code is None
            quiet = asyncio.Event()
            assert (await sb.run_command("echo", ["x"], cancel=quiet)).exit_code == 0
            assert len(kills(service)) == 1

    asyncio.run(main())


def test_detached_logs_wait_kill(service: FakeService) -> None:
    def worker(body: dict[str, Any], cmd: FakeCommand) -> Iterator[Item]:
        yield out("stdout", b"start\n")
        yield out("stderr", b"note\n")
        if cmd.killed.wait(10):
            yield exit_record(None, cmd.kill_signal)

    service.programs["worker"] = worker

    async def main() -> None:
        async with AsyncSandbox.create() as sb:
            cmd = await sb.run_command("worker", detached=True)
            assert isinstance(cmd, AsyncCommand) and not isinstance(cmd, AsyncCommandFinished)
            lines: list[LogLine] = []
            logs = cmd.logs()
            async for line in logs:
                lines.append(line)
                if len(lines) == 2:
                    break
            await logs.aclose()  # type: ignore[attr-defined]
            assert [(l.stream, l.data) for l in lines] == [
                ("stdout", b"start\n"), ("stderr", b"note\n")
            ]
            assert await cmd.stdout() == "start\n" and await cmd.stderr() == "note\n"
            waiting = asyncio.ensure_future(cmd.wait())
            await asyncio.sleep(0.1)
            await cmd.kill()
            finished = await waiting
            assert finished.signal == 9 and await finished.stdout() == "start\n"
            with pytest.raises(ConflictError):
                await cmd.kill()
            again = await sb.get_command(cmd.cmd_id)
            assert (await again.wait()).signal == 9
            assert len(await sb.list_commands()) == 1

    asyncio.run(main())


def test_concurrent_commands(service: FakeService) -> None:
    def numbered(body: dict[str, Any], cmd: FakeCommand) -> Iterator[Item]:
        n = body["args"][0]
        yield out("stdout", f"cmd-{n}\n".encode())
        yield 0.05
        yield out("stderr", f"done-{n}\n".encode())

    service.programs["numbered"] = numbered

    async def main() -> None:
        async with AsyncSandbox.create() as sb:
            results = await asyncio.gather(
                *(sb.run_command("numbered", [str(i)]) for i in range(32))
            )
            for i, result in enumerate(results):
                assert result.stdout_text == f"cmd-{i}\n" and result.stderr_text == f"done-{i}\n"

    asyncio.run(main())


def test_files(service: FakeService) -> None:
    big = bytes(range(256)) * 1000

    async def chunks() -> AsyncIterator[bytes]:
        yield b"async-"
        yield b"chunks"

    async def main() -> None:
        async with AsyncSandbox.create() as sb:
            await sb.write_files([
                {"path": "/tmp/big", "content": big},
                ("/tmp/text", "héllo"),
                ("/new/dir/file", b"x"),
                ("/tmp/stream", io.BytesIO(b"from a file")),
                ("/tmp/async", chunks()),
            ])
            stream = await sb.read_file("/tmp/big")
            assert stream is not None and stream.size == len(big)
            got = [chunk async for chunk in stream]
            assert len(got) > 1 and b"".join(got) == big
            assert await sb.read_file_bytes("/tmp/text") == "héllo".encode()
            assert await sb.read_file_bytes("/new/dir/file") == b"x"
            assert await sb.read_file_bytes("/tmp/stream") == b"from a file"
            assert await sb.read_file_bytes("/tmp/async") == b"async-chunks"
            assert await sb.read_file("/tmp/missing") is None
            await sb.mk_dir("/made", mode=0o700)

    asyncio.run(main())


def test_snapshots_forks_timeouts_domains(service: FakeService) -> None:
    async def main() -> None:
        async with AsyncSandbox.create(ports=[8080]) as sb:
            assert await sb.domain(8080) == "http://127.0.0.1:48080"
            await sb.write_files([("/tmp/marker", "kept")])
            snap = await sb.snapshot()
            assert isinstance(snap, AsyncSnapshot)
            async with AsyncSandbox.create(source=SnapshotSource(snap.snapshot_id)) as restored:
                assert await restored.read_file_bytes("/tmp/marker") == b"kept"
            clones = await sb.fork(2, timeout_ms=60_000)
            assert len(clones) == 2
            for clone in clones:
                assert await clone.read_file_bytes("/tmp/marker") == b"kept"
                await clone.stop()
                await clone.aclose()
            await sb.extend_timeout(10_000)
            assert (await AsyncSnapshot.get(snap.snapshot_id)).snapshot_id == snap.snapshot_id
            await snap.delete()

    asyncio.run(main())
    fork = service.find("POST", "/snapshots/[^/]+/fork")[0].json()
    assert fork == {"count": 2, "timeout_s": 60, "ports": [8080]}


def test_lifecycle_suspended_resumed_metrics_and_list_commands(service: FakeService) -> None:
    async def main() -> None:
        async with AsyncSandbox.create(
            on_timeout="pause", auto_resume=True, idle_timeout_ms=2500, vcpus=2
        ) as sb:
            assert service.find("POST", "/sandboxes")[0].json() == {
                "vcpus": 2, "on_timeout": "pause", "auto_resume": True, "idle_timeout_s": 3
            }
            assert sb.suspended is None and sb.info["on_timeout"] == "pause"
            metrics = await sb.metrics()
            guest = metrics.get("guest")
            assert metrics["id"] == sb.sandbox_id and guest is not None and guest["cpus"] == 2
            assert (metrics["host"].get("rss_bytes") or 0) > 0

            service.suspend(sb.sandbox_id, "idle")
            assert (await sb.metrics()).get("guest") is None  # no resume for metrics
            info = await sb.refresh()
            suspended = info.get("suspended")
            assert info["state"] == "paused" and suspended is not None
            assert suspended["reason"] == "idle" and suspended["how"] == "pause"
            result = await sb.run_command("echo", ["ok"])
            assert result.resumed == "pause" and result.stdout_text == "ok\n"
            assert (sb.info["state"], sb.info.get("suspended")) == ("running", None)
            assert (await sb.run_command("echo", ["again"])).resumed is None

            service.suspend(sb.sandbox_id, "timeout")
            cmd = await sb.run_command("sleep", ["60"], detached=True)
            assert cmd.resumed == "pause"
            commands = await sb.list_commands()
            assert [(c["argv"][0], c["status"]) for c in commands] == [
                ("echo", "finished"), ("echo", "finished"), ("sleep", "running")
            ]
            await cmd.kill()
            finished = await cmd.wait()
            assert finished.resumed == "pause" and finished.signal == 9
            service.suspend(sb.sandbox_id, "idle")
            assert (await sb.get_command(cmd.cmd_id)).resumed == "pause"

    asyncio.run(main())

"""The SDK against a real ``ember serve`` (run by the lead inside the lab).

    cd sdk/python && PYTHONPATH=src PYTHONDONTWRITEBYTECODE=1 \\
        python3 -m pytest -q -p no:cacheprovider tests/live

with ``EMBER_SOCKET`` (and ``EMBER_URL``, ``EMBER_TOKEN``, ``EMBER_CA_FILE`` for the remote
tests). The guest is the service's default runtime: only ``sh``, ``printf``, ``head``,
``sleep``, ``sha256sum``, ``cat``, ``stat`` and ``id`` are relied on. Most tests share one
sandbox; every sandbox made is stopped at the end.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from ember_sandbox import (
    AsyncCommand,
    AsyncSandbox,
    AuthenticationError,
    Command,
    CommandFinished,
    ConflictError,
    EmberError,
    LogLine,
    NotFoundError,
    Sandbox,
    SnapshotSource,
)

from .conftest import remote_env, socket_path


def test_the_service_is_configured() -> None:
    assert socket_path()


# --- commands ----------------------------------------------------------------------------------


def test_the_seed_example_and_exit_codes(shared: Sandbox) -> None:
    result = shared.run_command("sh", ["-c", "echo $((44 * 44))"])
    assert result.stdout() == "1936\n" and result.exit_code == 0 and result.ok
    failed = shared.run_command("sh", ["-c", "echo oops >&2; exit 7"])
    assert failed.exit_code == 7 and failed.signal is None and failed.stderr() == "oops\n"


def test_env_cwd_sudo_and_stdin(shared: Sandbox) -> None:
    result = shared.run_command("sh", ["-c", 'echo "$FOO"; pwd'], env={"FOO": "bar"}, cwd="/tmp")
    assert result.stdout() == "bar\n/tmp\n", result.stderr()
    assert shared.run_command("id", ["-u"], sudo=True).stdout() == "0\n"
    piped = shared.run_command("cat", stdin=b"\x00\xff binary stdin")
    assert piped.stdout_bytes == b"\x00\xff binary stdin"
    assert shared.run_command("cat", stdin="text stdin").stdout() == "text stdin"


def test_a_missing_program_is_not_found(shared: Sandbox) -> None:
    with pytest.raises(NotFoundError):
        shared.run_command("/no/such/program")


def test_output_streams_in_order_before_the_end(shared: Sandbox) -> None:
    arrivals: list[tuple[float, bytes]] = []
    result = shared.run_command(
        "sh",
        ["-c", "for i in 1 2 3 4 5; do echo $i; sleep 0.2; done"],
        on_stdout=lambda data: arrivals.append((time.monotonic(), data)),
    )
    ended = time.monotonic()
    assert result.stdout() == "1\n2\n3\n4\n5\n"
    assert b"".join(d for _, d in arrivals) == b"1\n2\n3\n4\n5\n"
    assert len(arrivals) >= 3, f"the output came in {len(arrivals)} pieces: not streamed"
    first = arrivals[0]
    assert first[1].startswith(b"1") and ended - first[0] >= 0.4, "'1' came only at the end"


def test_logs_keep_stdout_and_stderr_interleaved(shared: Sandbox) -> None:
    script = "echo out1; sleep 0.3; echo err1 >&2; sleep 0.3; echo out2"
    result = shared.run_command("sh", ["-c", script])
    order = [(line.stream, line.text) for line in result.logs()]
    assert order == [("stdout", "out1\n"), ("stderr", "err1\n"), ("stdout", "out2\n")]
    # The same order replayed by the service (GET .../logs) for a detached command.
    cmd = shared.run_command("sh", ["-c", script], detached=True)
    replayed = [(line.stream, line.text) for line in cmd.logs()]
    assert replayed == order


def test_non_utf8_output_survives_exactly(shared: Sandbox) -> None:
    result = shared.run_command("printf", ["\\377\\376abc"])
    assert result.stdout_bytes == b"\xff\xfeabc"
    errors = shared.run_command("sh", ["-c", "printf '\\377\\000x' >&2"])
    assert errors.stderr_bytes == b"\xff\x00x"


def test_a_command_timeout(shared: Sandbox) -> None:
    started = time.monotonic()
    result = shared.run_command("sleep", ["30"], timeout_ms=1000)
    assert result.timed_out and result.exit_code is None
    assert time.monotonic() - started < 20


def test_cancelling_kills_the_command(shared: Sandbox) -> None:
    cancel = threading.Event()
    threading.Timer(1.0, cancel.set).start()
    started = time.monotonic()
    result = shared.run_command("sleep", ["60"], cancel=cancel)
    assert result.signal == 9 and result.exit_code is None
    assert time.monotonic() - started < 20


def test_32_concurrent_commands_each_get_their_own_output(shared: Sandbox) -> None:
    script = 'echo "cmd-$1"; sleep 0.3; echo "done-$1" >&2'

    def run(i: int) -> CommandFinished:
        return shared.run_command("sh", ["-c", script, "sh", str(i)])

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(run, range(32)))
    for i, result in enumerate(results):
        assert (result.exit_code, result.stdout(), result.stderr()) == (
            0, f"cmd-{i}\n", f"done-{i}\n"
        )


def test_detached_command_logs_wait_and_kill(shared: Sandbox) -> None:
    cmd = shared.run_command(
        "sh", ["-c", "echo start; echo warn >&2; exec sleep 30"], detached=True
    )
    assert isinstance(cmd, Command) and not isinstance(cmd, CommandFinished)
    # Two pipes: the guest may read the stderr line before the stdout one.
    seen: list[LogLine] = []
    stdout = stderr = b""
    for line in cmd.logs():
        seen.append(line)
        stdout = b"".join(l.data for l in seen if l.stream == "stdout")
        stderr = b"".join(l.data for l in seen if l.stream == "stderr")
        if (stdout, stderr) == (b"start\n", b"warn\n"):
            break
    assert (stdout, stderr) == (b"start\n", b"warn\n")
    assert cmd.info()["status"] == "running"
    killed_at = time.monotonic()
    cmd.kill()
    finished = cmd.wait()
    assert finished.signal == 9 and finished.exit_code is None
    assert finished.stdout() == "start\n" and finished.stderr() == "warn\n"
    assert time.monotonic() - killed_at < 20
    with pytest.raises(ConflictError):
        cmd.kill()
    done = shared.run_command("sh", ["-c", "echo a; echo b >&2; exit 3"], detached=True)
    ended = done.wait()
    assert (ended.exit_code, ended.stdout(), ended.stderr()) == (3, "a\n", "b\n")
    assert shared.get_command(done.cmd_id).info()["status"] == "finished"
    assert any(c["cmd_id"] == done.cmd_id for c in shared.list_commands())


# --- files ---------------------------------------------------------------------------------


def test_a_50_mb_file_round_trips(shared: Sandbox) -> None:
    data = os.urandom(50 * 1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    path = f"/tmp/sdk-big-{uuid.uuid4().hex}.bin"
    try:
        shared.write_files([(path, data)])
        in_guest = shared.run_command("sha256sum", [path])
        assert in_guest.stdout().split()[0] == digest
        stream = shared.read_file(path)
        assert stream is not None and stream.size == len(data)
        hasher = hashlib.sha256()
        chunks = 0
        for chunk in stream:
            hasher.update(chunk)
            chunks += 1
        assert hasher.hexdigest() == digest and chunks > 1
    finally:
        shared.run_command("rm", ["-f", path])


def test_files_folders_modes_and_missing_files(shared: Sandbox) -> None:
    base = f"/tmp/sdk-files-{uuid.uuid4().hex}"
    shared.write_files([
        {"path": f"{base}/deep/er/hello.txt", "content": "héllo\n"},
        {"path": f"{base}/run.sh", "content": b"#!/bin/sh\necho ran\n", "mode": 0o755},
    ])
    assert shared.read_file_bytes(f"{base}/deep/er/hello.txt") == "héllo\n".encode()
    assert shared.run_command("stat", ["-c", "%a", f"{base}/run.sh"]).stdout() == "755\n"
    assert shared.run_command("sh", [f"{base}/run.sh"]).stdout() == "ran\n"
    shared.mk_dir(f"{base}/made/here")
    assert shared.run_command("sh", ["-c", f"test -d {base}/made/here"]).exit_code == 0
    assert shared.read_file(f"{base}/no-such-file") is None
    assert shared.read_file_bytes(f"{base}/no-such-file") is None


# --- sandboxes ------------------------------------------------------------------------------


def test_extend_timeout_and_refresh(shared: Sandbox) -> None:
    before = shared.refresh()["timeout_at_unix_ms"]
    shared.extend_timeout(60_000)
    after = shared.timeout_at_unix_ms
    assert 55_000 <= after - before <= 65_000, (before, after)
    assert shared.status == "running"


def test_a_missing_sandbox_is_not_found(sock: str) -> None:
    with pytest.raises(NotFoundError) as info:
        Sandbox.get("no-such-id", socket=sock)
    assert info.value.status == 404 and info.value.code == "not_found"


def test_a_sandbox_stops_at_its_timeout(sock: str, created: list[Sandbox]) -> None:
    began = time.monotonic()
    sandbox = Sandbox.create(socket=sock, timeout_ms=4000)
    created.append(sandbox)
    time.sleep(max(0.0, began + 8 - time.monotonic()))
    deadline = time.monotonic() + 90
    state = ""
    while time.monotonic() < deadline:
        try:
            state = sandbox.refresh()["state"]
        except NotFoundError:
            state = "gone"
        if state in ("stopped", "gone"):
            break
        time.sleep(0.5)
    assert state in ("stopped", "gone"), state
    if state == "stopped":
        assert sandbox.status == "stopped"
    with pytest.raises((ConflictError, NotFoundError)):
        sandbox.run_command("echo", ["too late"])


def test_an_idle_sandbox_is_paused_and_the_next_command_resumes_it(
    sock: str, created: list[Sandbox]
) -> None:
    sandbox = Sandbox.create(
        socket=sock, timeout_ms=300_000, idle_timeout_ms=3000, on_timeout="pause"
    )
    created.append(sandbox)
    assert sandbox.info["on_timeout"] == "pause" and sandbox.info["auto_resume"] is True
    assert sandbox.info.get("idle_timeout_s") == 3
    assert sandbox.info.get("suspended") is None
    # GET /sandboxes/{id} is not a use: polling does not keep it awake.
    deadline = time.monotonic() + 90
    info = sandbox.refresh()
    while time.monotonic() < deadline:
        suspended = info.get("suspended")
        if info["state"] == "paused" and suspended is not None and suspended["reason"] == "idle":
            break
        time.sleep(0.5)
        info = sandbox.refresh()
    assert info["state"] == "paused", f"not paused 30 s in: {info}"
    suspension = sandbox.suspended
    assert suspension is not None
    assert suspension["reason"] == "idle" and suspension["how"] == "pause"
    result = sandbox.run_command("echo", ["ok"])
    assert result.resumed == "pause"
    assert result.stdout() == "ok\n" and result.exit_code == 0
    # The same sandbox (same id) runs again.
    after = sandbox.refresh()
    assert after["id"] == info["id"] and after["state"] == "running"
    assert after.get("suspended") is None


def test_metrics_of_a_running_sandbox(shared: Sandbox) -> None:
    metrics = shared.metrics()
    assert metrics["id"] == shared.sandbox_id and metrics["state"] == "running"
    guest = metrics.get("guest")
    assert guest is not None, f"no guest metrics: {metrics.get('guest_error')}"
    assert guest["cpus"] >= 1, guest
    assert (metrics["host"].get("rss_bytes") or 0) > 0, metrics["host"]


def test_snapshot_then_restore_sees_a_file_written_before(
    shared: Sandbox, created: list[Sandbox]
) -> None:
    marker = f"/tmp/sdk-marker-{uuid.uuid4().hex}"
    shared.write_files([(marker, "before the snapshot")])
    snapshot = shared.snapshot()
    assert snapshot.snapshot_id and shared.status == "running"
    restored = Sandbox.create(
        socket=socket_path(), source=SnapshotSource(snapshot.snapshot_id), ports=[8000]
    )
    created.append(restored)
    try:
        assert restored.read_file_bytes(marker) == b"before the snapshot"
        assert restored.domain(8000).startswith("http://127.0.0.1:")
        with pytest.raises(NotFoundError):
            restored.domain(9)
        # The original goes on running after its snapshot.
        assert shared.run_command("cat", [marker]).stdout() == "before the snapshot"
    finally:
        restored.stop()
    snapshot.delete()


def test_fork(shared: Sandbox, created: list[Sandbox]) -> None:
    marker = f"/tmp/sdk-fork-{uuid.uuid4().hex}"
    shared.write_files([(marker, "forked")])
    clones = shared.fork(1)
    created.extend(clones)
    assert len(clones) == 1
    clone = clones[0]
    try:
        assert clone.sandbox_id != shared.sandbox_id and clone.status == "running"
        assert clone.run_command("cat", [marker]).stdout() == "forked"
    finally:
        clone.stop()


# --- remote access ----------------------------------------------------------------------------


def test_remote_with_the_right_token(shared: Sandbox) -> None:
    url, token, ca = remote_env()
    with_options = Sandbox.get(shared.sandbox_id, url=url, token=token, ca=ca)
    try:
        assert with_options.connection.url == url
        assert with_options.run_command("sh", ["-c", "echo $((44 * 44))"]).stdout() == "1936\n"
        path = f"/tmp/sdk-remote-{uuid.uuid4().hex}"
        with_options.write_files([(path, b"\xff over https")])
        assert with_options.read_file_bytes(path) == b"\xff over https"
    finally:
        with_options.close()
    # With no options the environment decides: EMBER_URL (set) comes before EMBER_SOCKET.
    from_env = Sandbox.get(shared.sandbox_id)
    try:
        assert from_env.connection.url == url
        assert from_env.run_command("printf", ["\\377"]).stdout_bytes == b"\xff"
    finally:
        from_env.close()


def test_remote_with_a_wrong_token_is_401(shared: Sandbox) -> None:
    url, _token, ca = remote_env()
    for wrong in ("not-the-token-0123456789", None):
        with pytest.raises(AuthenticationError) as info:
            Sandbox.get(shared.sandbox_id, url=url, token=wrong, ca=ca)
        assert info.value.status == 401 and info.value.code == "unauthorized"
        assert isinstance(info.value, EmberError)


# --- asyncio ----------------------------------------------------------------------------------


def test_async_commands_output_and_bytes(shared: Sandbox) -> None:
    async def main() -> None:
        sb = await AsyncSandbox.get(shared.sandbox_id, socket=socket_path())
        try:
            result = await sb.run_command("sh", ["-c", "echo $((44 * 44))"])
            assert await result.stdout() == "1936\n" and result.exit_code == 0
            raw = await sb.run_command("printf", ["\\377\\376abc"])
            assert raw.stdout_bytes == b"\xff\xfeabc"
            arrivals: list[float] = []
            streamed = await sb.run_command(
                "sh",
                ["-c", "for i in 1 2 3 4 5; do echo $i; sleep 0.2; done"],
                on_stdout=lambda data: arrivals.append(time.monotonic()),
            )
            assert streamed.stdout_text == "1\n2\n3\n4\n5\n"
            assert time.monotonic() - arrivals[0] >= 0.4
            with pytest.raises(NotFoundError):
                await AsyncSandbox.get("no-such-id", socket=socket_path())
        finally:
            await sb.aclose()

    asyncio.run(main())


def test_async_task_cancellation_kills_the_command(shared: Sandbox) -> None:
    async def main() -> None:
        sb = await AsyncSandbox.get(shared.sandbox_id, socket=socket_path())
        try:
            marker = str(50 + uuid.uuid4().int % 9)  # "sleep 5x": tells this one apart
            task = asyncio.ensure_future(sb.run_command("sleep", [marker]))
            await asyncio.sleep(1.0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            deadline = time.monotonic() + 20
            while True:
                ours = [c for c in await sb.list_commands() if c["argv"] == ["sleep", marker]]
                if ours and ours[-1]["status"] == "finished":
                    break
                assert time.monotonic() < deadline, f"the command was not killed: {ours}"
                await asyncio.sleep(0.2)
            assert ours[-1].get("signal") == 9
        finally:
            await sb.aclose()

    asyncio.run(main())


def test_async_32_concurrent_commands(shared: Sandbox) -> None:
    async def main() -> None:
        sb = await AsyncSandbox.get(shared.sandbox_id, socket=socket_path())
        try:
            script = 'echo "cmd-$1"; sleep 0.3; echo "done-$1" >&2'
            results = await asyncio.gather(
                *(sb.run_command("sh", ["-c", script, "sh", str(i)]) for i in range(32))
            )
            for i, result in enumerate(results):
                assert (result.stdout_text, result.stderr_text) == (f"cmd-{i}\n", f"done-{i}\n")
        finally:
            await sb.aclose()

    asyncio.run(main())


def test_async_detached_logs_wait_and_kill(shared: Sandbox) -> None:
    async def main() -> None:
        sb = await AsyncSandbox.get(shared.sandbox_id, socket=socket_path())
        try:
            cmd = await sb.run_command(
                "sh", ["-c", "echo start; exec sleep 30"], detached=True
            )
            assert isinstance(cmd, AsyncCommand)
            first = None
            logs = cmd.logs()
            async for line in logs:
                first = line
                break
            await logs.aclose()  # type: ignore[attr-defined]
            assert first is not None and first.data == b"start\n"
            waiting = asyncio.ensure_future(cmd.wait())
            await asyncio.sleep(0.3)
            await cmd.kill()
            finished = await asyncio.wait_for(waiting, 20)
            assert finished.signal == 9 and await finished.stdout() == "start\n"
        finally:
            await sb.aclose()

    asyncio.run(main())


def test_async_files(shared: Sandbox) -> None:
    data = os.urandom(5 * 1024 * 1024)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 1 << 20):
            yield data[i : i + (1 << 20)]

    async def main() -> None:
        sb = await AsyncSandbox.get(shared.sandbox_id, socket=socket_path())
        path = f"/tmp/sdk-async-{uuid.uuid4().hex}/data.bin"
        try:
            await sb.write_files([(path, chunks())])
            stream = await sb.read_file(path)
            assert stream is not None
            hasher = hashlib.sha256()
            async for chunk in stream:
                hasher.update(chunk)
            assert hasher.hexdigest() == hashlib.sha256(data).hexdigest()
            assert await sb.read_file(path + ".missing") is None
        finally:
            await sb.aclose()

    asyncio.run(main())

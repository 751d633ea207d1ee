"""The blocking API against the fake service."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Union

import pytest

from ember_sandbox import (
    AllowList,
    Command,
    CommandFinished,
    ConflictError,
    LogLine,
    NotFoundError,
    Sandbox,
    Snapshot,
    Suspension,
    SnapshotSource,
    TemplateSource,
)

from ember_sandbox._api_types import SandboxState

from .fake_server import FakeCommand, FakeService, exit_record, out

Item = Union[dict[str, Any], float, bytes]


def test_create_maps_the_options_to_the_api(service: FakeService) -> None:
    sb = Sandbox.create(
        runtime="python3.13",
        timeout_ms=30_500,
        vcpus=2,
        memory_mib=512,
        ports=[8000, 9000],
        env={"GREETING": "hi"},
        network_policy={"allow": ["10.0.0.0/8"]},
    )
    body = service.find("POST", "/sandboxes")[0].json()
    assert body == {
        "runtime": "python3.13",
        "timeout_s": 31,
        "vcpus": 2,
        "memory_mib": 512,
        "ports": [8000, 9000],
        "env": {"GREETING": "hi"},
        "network": {"mode": "egress", "allow": ["10.0.0.0/8"]},
    }
    assert sb.status == "running" and sb.sandbox_id.startswith("sb-")
    assert sb.runtime == "python3.13"
    sb.close()


@pytest.mark.parametrize(
    ("kwargs", "sent"),
    [
        ({}, {}),
        ({"network_policy": "deny-all"}, {}),
        ({"network_policy": "allow-all"}, {"network": {"mode": "egress"}}),
        ({"network_policy": AllowList(["192.0.2.0/24"])},
         {"network": {"mode": "egress", "allow": ["192.0.2.0/24"]}}),
        ({"network_policy": AllowList(["*.example.com"], deny=["a.example.com"])},
         {"network": {"mode": "egress", "allow": ["*.example.com"], "deny": ["a.example.com"]}}),
        ({"network_policy": {"deny": ["10.0.0.0/8"]}},
         {"network": {"mode": "egress", "deny": ["10.0.0.0/8"]}}),
        ({"source": SnapshotSource("snap-1")}, {"snapshot": "snap-1"}),
        ({"source": {"type": "snapshot", "snapshotId": "snap-1"}}, {"snapshot": "snap-1"}),
        ({"source": TemplateSource("tpl")}, {"template": "tpl"}),
        ({"source": {"type": "template", "name": "tpl"}}, {"template": "tpl"}),
        ({"timeout_ms": 1}, {"timeout_s": 1}),
        ({"on_timeout": "pause"}, {"on_timeout": "pause"}),
        ({"on_timeout": "snapshot", "auto_resume": False},
         {"on_timeout": "snapshot", "auto_resume": False}),
        ({"auto_resume": True}, {"auto_resume": True}),
        ({"idle_timeout_ms": 2001}, {"idle_timeout_s": 3}),
        ({"idle_timeout_ms": 3000, "on_timeout": "stop"},
         {"idle_timeout_s": 3, "on_timeout": "stop"}),
    ],
)
def test_create_bodies(service: FakeService, kwargs: dict[str, Any], sent: dict[str, Any]) -> None:
    service.snapshots["snap-1"] = {"id": "snap-1"}
    service.reply("POST", "/sandboxes", service_reply(service))
    Sandbox.create(**kwargs).close()
    assert service.find("POST", "/sandboxes")[0].json() == sent


def service_reply(service: FakeService) -> Any:
    from .fake_server import Reply

    return Reply(201, service.new_sandbox({}))


def test_bad_options_fail_before_any_request(service: FakeService) -> None:
    with pytest.raises(ValueError):
        Sandbox.create(network_policy="open")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Sandbox.create(timeout_ms=0)
    with pytest.raises(ValueError):
        Sandbox.create(source={"type": "image"})
    with pytest.raises(ValueError):
        Sandbox.create(on_timeout="hibernate")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Sandbox.create(idle_timeout_ms=0)
    with pytest.raises(ValueError):
        Sandbox.create(auto_resume="yes")  # type: ignore[arg-type]
    assert not service.requests


def test_get_and_refresh(service: FakeService, sandbox: Sandbox) -> None:
    again = Sandbox.get(sandbox.sandbox_id)
    assert again.info == sandbox.info
    service.sandboxes[sandbox.sandbox_id]["state"] = "paused"
    assert sandbox.info["state"] == "running"
    assert sandbox.refresh()["state"] == "paused"
    assert sandbox.status == "paused"
    again.close()


def test_run_command_returns_its_output_and_exit(service: FakeService, sandbox: Sandbox) -> None:
    def program(body: dict[str, Any], cmd: FakeCommand) -> Iterator[Item]:
        yield out("stdout", b"one\n")
        yield out("stderr", b"warn\n")
        yield out("stdout", b"two\n")
        yield exit_record(3)

    service.programs["prog"] = program
    result = sandbox.run_command("prog", ["a", "b"])
    assert isinstance(result, CommandFinished)
    assert result.exit_code == 3 and result.signal is None and not result.timed_out
    assert not result.ok
    assert result.stdout() == "one\ntwo\n" and result.stderr() == "warn\n"
    assert result.stdout_bytes == b"one\ntwo\n" and result.stderr_bytes == b"warn\n"
    assert result.output() == "one\nwarn\ntwo\n"
    assert [(line.stream, line.data) for line in result.logs()] == [
        ("stdout", b"one\n"), ("stderr", b"warn\n"), ("stdout", b"two\n")
    ]
    assert result.cmd_id.startswith("cmd-") and result.pid == 42
    assert result.wait() is result
    body = service.find("POST", "/sandboxes/[^/]+/exec")[0].json()
    assert body == {"cmd": "prog", "args": ["a", "b"]}


def test_the_seed_example(service: FakeService, sandbox: Sandbox) -> None:
    def python3(body: dict[str, Any], cmd: FakeCommand) -> Iterator[Item]:
        assert body["args"] == ["-c", "print(44 * 44)"]
        yield out("stdout", b"1936\n")

    service.programs["python3"] = python3
    result = sandbox.run_command("python3", ["-c", "print(44 * 44)"])
    assert result.stdout() == "1936\n"


def test_exec_options(service: FakeService, sandbox: Sandbox) -> None:
    sandbox.run_command("env", env={"A": "1"}, cwd="/tmp", sudo=True, timeout_ms=2500,
                        stdin="input")
    body = service.find("POST", "/sandboxes/[^/]+/exec")[0].json()
    assert body == {"cmd": "env", "env": {"A": "1"}, "cwd": "/tmp", "user": "root",
                    "timeout_s": 3, "stdin": "input"}
    result = sandbox.run_command("cat", stdin=b"\x00\xff")
    assert result.stdout_bytes == b"\x00\xff"
    with pytest.raises(ValueError):
        sandbox.run_command("sh", "-c ls")  # a string is a sequence: refused at run time
    with pytest.raises(ValueError):
        sandbox.run_command("sleep", ["1"], kill_signal="SIGNOPE")


def test_output_arrives_as_it_is_written(service: FakeService, sandbox: Sandbox) -> None:
    def slow(body: dict[str, Any], cmd: FakeCommand) -> Iterator[Item]:
        for i in range(1, 6):
            yield out("stdout", f"{i}\n".encode())
            yield 0.1

    service.programs["slow"] = slow
    arrivals: list[tuple[float, bytes]] = []
    result = sandbox.run_command("slow", on_stdout=lambda d: arrivals.append((time.monotonic(), d)))
    end = time.monotonic()
    assert b"".join(d for _, d in arrivals) == b"1\n2\n3\n4\n5\n" == result.stdout_bytes
    assert end - arrivals[0][0] >= 0.3, "the first line came only at the end"


def test_non_utf8_output_survives_exactly(service: FakeService, sandbox: Sandbox) -> None:
    def raw(body: dict[str, Any], cmd: FakeCommand) -> Iterator[Item]:
        yield out("stdout", b"\xff\xfe")  # base64 on the wire
        yield out("stdout", b"abc")

    service.programs["raw"] = raw
    result = sandbox.run_command("raw")
    assert result.stdout_bytes == b"\xff\xfeabc"
    assert result.stdout() == "\ufffd\ufffdabc"


def test_records_split_across_chunks(service: FakeService, sandbox: Sandbox) -> None:
    payload = json.dumps({"type": "stdout", "data_base64": base64.b64encode(b"\x80z").decode()})
    line = payload.encode() + b"\n"

    def split(body: dict[str, Any], cmd: FakeCommand) -> Iterator[Item]:
        for i in range(len(line)):
            yield line[i : i + 1]
        yield b'{"type": "stdout", "da'
        yield 0.05
        yield b'ta": "tail"}\n'

    service.programs["split"] = split
    assert sandbox.run_command("split").stdout_bytes == b"\x80ztail"


def test_sinks_callables_binary_and_text_writers(service: FakeService, sandbox: Sandbox) -> None:
    def euro(body: dict[str, Any], cmd: FakeCommand) -> Iterator[Item]:
        data = "€ ok\n".encode()
        yield out("stdout", data[:1])  # a character cut in two: base64 record
        yield out("stdout", data[1:])
        yield out("stderr", b"err\n")

    service.programs["euro"] = euro
    binary = io.BytesIO()
    text = io.StringIO()
    sandbox.run_command("euro", on_stdout=binary, on_stderr=text)
    assert binary.getvalue() == "€ ok\n".encode()
    assert text.getvalue() == "err\n"
    text_out = io.StringIO()
    sandbox.run_command("euro", on_stdout=text_out)
    assert text_out.getvalue() == "€ ok\n"


def test_cancel_event_kills_the_command(service: FakeService, sandbox: Sandbox) -> None:
    cancel = threading.Event()
    timer = threading.Timer(0.3, cancel.set)
    timer.start()
    started = time.monotonic()
    result = sandbox.run_command("sleep", ["60"], cancel=cancel)
    assert time.monotonic() - started < 10
    assert result.signal == 9 and result.exit_code is None
    kills = service.find("POST", "/sandboxes/[^/]+/commands/[^/]+/kill")
    assert [k.json() for k in kills] == [{"signal": 9}]


def test_cancel_with_another_signal_and_an_unused_cancel(service: FakeService,
                                                        sandbox: Sandbox) -> None:
    cancel = threading.Event()
    cancel.set()
    result = sandbox.run_command("sleep", ["60"], cancel=cancel, kill_signal="TERM")
    assert result.signal == 15
    quiet = threading.Event()
    assert sandbox.run_command("echo", ["x"], cancel=quiet).exit_code == 0
    assert len(service.find("POST", "/sandboxes/[^/]+/commands/[^/]+/kill")) == 1


def test_an_error_in_a_sink_kills_the_command(service: FakeService, sandbox: Sandbox) -> None:
    def chatty(body: dict[str, Any], cmd: FakeCommand) -> Iterator[Item]:
        yield out("stdout", b"x")
        if cmd.killed.wait(10):
            yield exit_record(None, cmd.kill_signal)

    def boom(data: bytes) -> None:
        raise KeyboardInterrupt

    service.programs["chatty"] = chatty
    with pytest.raises(KeyboardInterrupt):
        sandbox.run_command("chatty", on_stdout=boom)
    assert len(service.find("POST", "/sandboxes/[^/]+/commands/[^/]+/kill")) == 1


def test_detached_commands(service: FakeService, sandbox: Sandbox) -> None:
    def worker(body: dict[str, Any], cmd: FakeCommand) -> Iterator[Item]:
        yield out("stdout", b"start\n")
        yield out("stderr", b"note\n")
        if cmd.killed.wait(10):
            yield exit_record(None, cmd.kill_signal)

    service.programs["worker"] = worker
    cmd = sandbox.run_command("worker", detached=True)
    assert isinstance(cmd, Command) and not isinstance(cmd, CommandFinished)
    assert service.find("POST", "/sandboxes/[^/]+/exec")[0].json()["detach"] is True
    lines: list[LogLine] = []
    for line in cmd.logs():
        lines.append(line)
        if len(lines) == 2:
            break
    assert [(l.stream, l.text) for l in lines] == [("stdout", "start\n"), ("stderr", "note\n")]
    assert cmd.info()["status"] == "running"
    assert cmd.stdout() == "start\n" and cmd.stderr() == "note\n"
    threading.Timer(0.2, cmd.kill).start()
    finished = cmd.wait()
    assert finished.signal == 9 and finished.stdout() == "start\n"
    with pytest.raises(ConflictError):
        cmd.kill()
    again = sandbox.get_command(cmd.cmd_id)
    assert again.wait().signal == 9
    assert [c["cmd_id"] for c in sandbox.list_commands()] == [cmd.cmd_id]


def test_kill_from_another_thread_while_waiting(service: FakeService, sandbox: Sandbox) -> None:
    cmd = sandbox.run_command("sleep", ["60"], detached=True)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(cmd.wait)
        time.sleep(0.2)
        cmd.kill("SIGTERM")
        assert waiting.result(timeout=10).signal == 15


def test_concurrent_commands_each_get_their_own_output(service: FakeService,
                                                       sandbox: Sandbox) -> None:
    def numbered(body: dict[str, Any], cmd: FakeCommand) -> Iterator[Item]:
        n = body["args"][0]
        yield out("stdout", f"cmd-{n}\n".encode())
        yield 0.05
        yield out("stderr", f"done-{n}\n".encode())

    service.programs["numbered"] = numbered
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda i: sandbox.run_command("numbered", [str(i)]), range(32)))
    for i, result in enumerate(results):
        assert result.stdout() == f"cmd-{i}\n" and result.stderr() == f"done-{i}\n"


def test_files(service: FakeService, sandbox: Sandbox) -> None:
    big = bytes(range(256)) * 4000  # ~1 MB
    sandbox.write_files([
        {"path": "/tmp/a.txt", "content": "héllo"},
        {"path": "/tmp/b.bin", "content": big, "mode": 0o755},
        ("/tmp/c.bin", b"\x00\x01"),
        ("/tmp/d.bin", io.BytesIO(b"streamed")),
        ("/tmp/e.bin", iter([b"one", b"two"])),
    ])
    puts = service.find("PUT", "/sandboxes/[^/]+/files")
    assert [p.query["path"][0] for p in puts] == [
        "/tmp/a.txt", "/tmp/b.bin", "/tmp/c.bin", "/tmp/d.bin", "/tmp/e.bin"
    ]
    assert puts[1].query["mode"] == ["755"]
    assert sandbox.read_file_bytes("/tmp/a.txt") == "héllo".encode()
    assert sandbox.read_file_bytes("/tmp/d.bin") == b"streamed"
    assert sandbox.read_file_bytes("/tmp/e.bin") == b"onetwo"
    stream = sandbox.read_file("/tmp/b.bin")
    assert stream is not None and stream.size == len(big)
    chunks = list(stream)
    assert len(chunks) > 1 and b"".join(chunks) == big
    assert sandbox.read_file("/tmp/missing") is None
    assert sandbox.read_file_bytes("/tmp/missing") is None


def test_write_files_makes_missing_folders(service: FakeService, sandbox: Sandbox) -> None:
    sandbox.write_files([("/work/deep/x.txt", "x")])
    assert service.files[(sandbox.sandbox_id, "/work/deep/x.txt")] == b"x"
    assert [r.json() for r in service.find("POST", "/sandboxes/[^/]+/files/mkdir")] == [
        {"path": "/work/deep"}
    ]
    sandbox.write_files([("/other/y.bin", io.BytesIO(b"y"))])  # a stream: folder first
    assert service.files[(sandbox.sandbox_id, "/other/y.bin")] == b"y"
    with pytest.raises(ValueError):
        sandbox.write_files([("relative/path", "x")])


def test_mk_dir(service: FakeService, sandbox: Sandbox) -> None:
    sandbox.mk_dir("/a/b/c", mode=0o700)
    sandbox.mk_dir("/d", mode="750")
    sandbox.mk_dir("/e")
    bodies = [r.json() for r in service.find("POST", "/sandboxes/[^/]+/files/mkdir")]
    assert bodies == [{"path": "/a/b/c", "mode": 0o700}, {"path": "/d", "mode": 0o750},
                      {"path": "/e"}]


def test_extend_timeout(service: FakeService, sandbox: Sandbox) -> None:
    service.sandboxes[sandbox.sandbox_id]["timeout_at_unix_ms"] = int(time.time() * 1000) + 10_000
    sandbox.extend_timeout(60_000)
    body = service.find("POST", "/sandboxes/[^/]+/timeout")[0].json()
    assert body["timeout_s"] in (70, 71)
    assert sandbox.timeout_at_unix_ms >= int(time.time() * 1000) + 69_000
    with pytest.raises(ValueError):
        sandbox.extend_timeout(0)


def test_domain(service: FakeService) -> None:
    with Sandbox.create(ports=[3000]) as sb:
        assert sb.domain(3000) == "http://127.0.0.1:43000"
        with pytest.raises(NotFoundError) as info:
            sb.domain(4000)
        assert info.value.code == "port_not_exposed"


def test_snapshot_restore_and_fork(service: FakeService) -> None:
    with Sandbox.create(env={"E": "1"}, ports=[80], network_policy="allow-all") as sb:
        sb.write_files([("/tmp/marker", "kept")])
        snap = sb.snapshot()
        assert isinstance(snap, Snapshot) and snap.snapshot_id.startswith("snap-")
        assert snap.took_ms == 12.5
        with Sandbox.create(source=snap) as restored:
            assert restored.read_file_bytes("/tmp/marker") == b"kept"
        assert Snapshot.get(snap.snapshot_id).snapshot_id == snap.snapshot_id
        clones = sb.fork(2)
        assert len(clones) == 2 and all(c.read_file_bytes("/tmp/marker") == b"kept"
                                        for c in clones)
        fork_body = service.find("POST", "/snapshots/[^/]+/fork")[0].json()
        assert fork_body == {"count": 2, "env": {"E": "1"}, "ports": [80],
                             "network": {"mode": "egress"}}
        for clone in clones:
            clone.stop()
            clone.close()
        named = sb.snapshot("named", stop=True)
        assert named.snapshot_id == "named" and sb.status == "stopped"
        named.delete()
        assert "named" not in service.snapshots


def test_context_manager_stops_even_on_error(service: FakeService) -> None:
    with pytest.raises(RuntimeError):
        with Sandbox.create() as sb:
            raise RuntimeError("inside")
    assert service.find("DELETE", "/sandboxes/[^/]+")
    assert sb.status == "stopped" and not service.sandboxes
    sb2 = Sandbox.create()
    sb2.stop()
    sb2.stop()  # a second stop is fine
    sb2.close()


# --- lifecycle: on_timeout, suspension, resume on use; metrics; list_commands ----------------


def seen(sb: Sandbox) -> tuple[SandboxState, Optional[Suspension]]:
    """``(status, suspended)`` as the sandbox object last saw them (a call, so that the type
    checker does not carry a narrowing of the properties across requests)."""
    return sb.status, sb.suspended


def test_lifecycle_options_reach_the_service_and_info(service: FakeService) -> None:
    with Sandbox.create(on_timeout="pause", idle_timeout_ms=3000, timeout_ms=60_000) as sb:
        body = service.find("POST", "/sandboxes")[0].json()
        assert body == {"timeout_s": 60, "on_timeout": "pause", "idle_timeout_s": 3}
        assert sb.info["on_timeout"] == "pause" and sb.info["auto_resume"] is True
        assert sb.info.get("idle_timeout_s") == 3
        assert sb.suspended is None


def test_suspended_then_a_command_resumes_it(service: FakeService) -> None:
    with Sandbox.create(on_timeout="pause", idle_timeout_ms=2000) as sb:
        service.suspend(sb.sandbox_id, "idle")
        assert seen(sb) == ("running", None)  # as last seen
        sb.refresh()
        status, suspended = seen(sb)
        assert status == "paused" and suspended is not None
        assert suspended["reason"] == "idle" and suspended["how"] == "pause"
        assert suspended["at_unix_ms"] > 0
        result = sb.run_command("echo", ["ok"])
        assert result.resumed == "pause"
        assert result.stdout() == "ok\n" and result.exit_code == 0
        # The answer said it resumed the sandbox: it runs, no longer suspended.
        assert seen(sb) == ("running", None)
        assert service.sandboxes[sb.sandbox_id]["state"] == "running"
        again = sb.run_command("echo", ["again"])
        assert again.resumed is None


def test_a_snapshot_suspension_resumes_a_detached_command_and_get_command(
    service: FakeService,
) -> None:
    with Sandbox.create(on_timeout="snapshot") as sb:
        service.suspend(sb.sandbox_id, "timeout")
        info = sb.refresh()
        suspended = sb.suspended
        assert info["state"] == "stopped" and suspended is not None
        assert suspended["how"] == "snapshot" and suspended["reason"] == "timeout"
        assert suspended.get("snapshot") == f"{sb.sandbox_id}-timeout"
        cmd = sb.run_command("echo", ["x"], detached=True)
        assert cmd.resumed == "snapshot" and seen(sb) == ("running", None)
        finished = cmd.wait()
        assert finished.resumed == "snapshot" and finished.stdout() == "x\n"
        assert sb.get_command(cmd.cmd_id).resumed is None
        service.suspend(sb.sandbox_id, "idle")
        assert sb.get_command(cmd.cmd_id).resumed == "snapshot"  # a commands request uses it
        service.suspend(sb.sandbox_id, "idle")
        assert [c["cmd_id"] for c in sb.list_commands()] == [cmd.cmd_id]
        assert service.sandboxes[sb.sandbox_id]["suspended"] is None


def test_without_auto_resume_a_suspended_sandbox_refuses_commands(service: FakeService) -> None:
    with Sandbox.create(on_timeout="pause", auto_resume=False) as sb:
        assert sb.info["auto_resume"] is False
        service.suspend(sb.sandbox_id)
        with pytest.raises(ConflictError):
            sb.run_command("echo", ["x"])
        assert sb.refresh()["state"] == "paused" and seen(sb)[1] is not None


def test_metrics(service: FakeService) -> None:
    with Sandbox.create(vcpus=2, on_timeout="pause") as sb:
        metrics = sb.metrics()
        assert service.find("GET", "/sandboxes/[^/]+/metrics")[0].path == (
            f"/sandboxes/{sb.sandbox_id}/metrics"
        )
        assert metrics["id"] == sb.sandbox_id and metrics["state"] == "running"
        guest = metrics.get("guest")
        assert guest is not None and guest["cpus"] == 2 and guest["memory_used_bytes"] > 0
        assert (metrics["host"].get("rss_bytes") or 0) > 0
        # Asking for metrics does not resume a suspended sandbox; the guest is not there.
        service.suspend(sb.sandbox_id)
        paused = sb.metrics()
        assert paused["state"] == "paused" and paused.get("guest") is None
        assert paused.get("guest_error")
        assert service.sandboxes[sb.sandbox_id]["suspended"] is not None
        with pytest.raises(NotFoundError):
            Sandbox(sb._http, {**sb.info, "id": "gone"}).metrics()


def test_list_commands_running_and_finished(service: FakeService, sandbox: Sandbox) -> None:
    assert sandbox.list_commands() == []
    done = sandbox.run_command("echo", ["one"])
    running = sandbox.run_command("sleep", ["60"], detached=True)
    commands = sandbox.list_commands()
    assert [(c["cmd_id"], c["status"]) for c in commands] == [
        (done.cmd_id, "finished"), (running.cmd_id, "running")
    ]
    assert commands[0]["argv"] == ["echo", "one"] and commands[0].get("exit_code") == 0
    running.kill()
    running.wait()
    assert [c["status"] for c in sandbox.list_commands()] == ["finished", "finished"]

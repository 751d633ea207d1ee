"""The blocking API: ``Sandbox``, ``Command``, ``CommandFinished``, ``Snapshot``."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Literal, Optional, Protocol, Union, cast, overload

import httpx

from ._api_types import (
    CommandInfo,
    CommandList,
    OnTimeout,
    RestoreMode,
    SandboxInfo,
    SandboxList,
    SandboxMetrics,
    SandboxState,
    SnapshotInfo,
    SnapshotTaken,
    Suspension,
)
from ._config import Connection, resolve_connection
from ._core import (
    ExecState,
    FileContent,
    NdjsonDecoder,
    SignalLike,
    Sink,
    SinkWriter,
    create_body,
    domain_of,
    exec_body,
    extended_timeout_s,
    file_body,
    file_entries,
    fork_body,
    is_missing_sandbox,
    kill_body,
    mkdir_body,
    network_mode,
    network_of,
    network_policy_body,
    parent_dir,
    record_bytes,
    resumed_from,
    signal_number,
    snapshot_body,
    timeout_body,
)
from ._errors import ConflictError, EmberError, NotFoundError
from ._http import SyncHttp, iter_body
from ._models import (
    CapturedOutput,
    ExitStatus,
    LogLine,
    NetworkPolicy,
    ResumedHow,
    SourceLike,
    StreamName,
)


class CancelToken(Protocol):
    """What ``run_command(cancel=...)`` takes: a ``threading.Event`` or anything like it."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: Optional[float] = None) -> bool: ...


class Command:
    """A command started in a sandbox (``run_command(..., detached=True)`` or
    ``Sandbox.get_command``): follow its output, wait for it, kill it.

    ``resumed``: ``"pause"`` or ``"snapshot"`` when the request that started (or fetched) it
    first resumed its sandbox, suspended by its ``on_timeout`` (the ``ember-resumed`` header);
    ``None`` when the sandbox was running."""

    def __init__(
        self,
        sandbox: Sandbox,
        cmd_id: str,
        pid: Optional[int] = None,
        resumed: Optional[ResumedHow] = None,
    ) -> None:
        self._sandbox = sandbox
        self.cmd_id = cmd_id
        self.pid = pid
        self.resumed: Optional[ResumedHow] = resumed

    @property
    def sandbox(self) -> Sandbox:
        return self._sandbox

    def __repr__(self) -> str:
        return f"{type(self).__name__}(cmd_id={self.cmd_id!r}, sandbox={self._sandbox.sandbox_id!r})"

    def _path(self) -> dict[str, str]:
        return {"id": self._sandbox.sandbox_id, "cid": self.cmd_id}

    def info(self) -> CommandInfo:
        """``GET /sandboxes/{id}/commands/{cid}``: its status, exit and the output kept."""
        response = self._sandbox._http.request("get_command", path=self._path())
        return cast(CommandInfo, response.json())

    def _follow(self, state: ExecState) -> Iterator[LogLine]:
        response = self._sandbox._http.stream("command_logs", path=self._path())
        decoder = NdjsonDecoder()
        try:
            for chunk in iter_body(response):
                for record in decoder.feed(chunk):
                    line = state.feed(record)
                    if line is not None:
                        yield line
            for record in decoder.close():
                line = state.feed(record)
                if line is not None:
                    yield line
        finally:
            response.close()

    def logs(self) -> Iterator[LogLine]:
        """Its output in the order it came (both streams), from the start (of what the service
        keeps: the newest 8 MiB), following it until it exits."""
        yield from self._follow(ExecState())

    def wait(
        self,
        *,
        on_stdout: Optional[Sink] = None,
        on_stderr: Optional[Sink] = None,
    ) -> CommandFinished:
        """Waits for it to end; its whole output (as kept) and how it ended."""
        state = ExecState()
        sinks = _sinks(on_stdout, on_stderr)
        for line in self._follow(state):
            _deliver(sinks, line)
        _finish(sinks)
        return CommandFinished(self._sandbox, self.cmd_id, self.pid, state.output,
                               state.require_exit(), self.resumed)

    def kill(self, signal: SignalLike = "SIGKILL") -> None:
        """Sends ``signal`` (default SIGKILL). Raises ``ConflictError`` once it has finished."""
        self._sandbox._http.request("kill_command", path=self._path(), json=kill_body(signal))

    def _kept(self, stream: StreamName) -> bytes:
        info = self.info()
        if stream == "stdout":
            return record_bytes(info.get("stdout"), info.get("stdout_base64"))
        return record_bytes(info.get("stderr"), info.get("stderr_base64"))

    def stdout(self) -> str:
        """Its standard output so far (as kept), as text."""
        return self._kept("stdout").decode("utf-8", errors="replace")

    def stderr(self) -> str:
        """Its standard error so far (as kept), as text."""
        return self._kept("stderr").decode("utf-8", errors="replace")


class CommandFinished(Command):
    """A command that has ended: ``exit_code`` (``None`` if a signal ended it), ``signal``,
    ``timed_out``, and its output (``stdout()``, ``stdout_bytes``, ``logs()``, ...)."""

    def __init__(
        self,
        sandbox: Sandbox,
        cmd_id: str,
        pid: Optional[int],
        output: CapturedOutput,
        status: ExitStatus,
        resumed: Optional[ResumedHow] = None,
    ) -> None:
        super().__init__(sandbox, cmd_id, pid, resumed)
        self._output = output
        self.exit_code = status.exit_code
        self.signal = status.signal
        self.timed_out = status.timed_out
        self.error = status.error
        self.duration_ms = status.duration_ms

    def __repr__(self) -> str:
        return (
            f"CommandFinished(cmd_id={self.cmd_id!r}, exit_code={self.exit_code!r}, "
            f"signal={self.signal!r}, timed_out={self.timed_out!r})"
        )

    @property
    def ok(self) -> bool:
        """It exited with code 0."""
        return self.exit_code == 0

    @property
    def stdout_bytes(self) -> bytes:
        return self._output.bytes_of("stdout")

    @property
    def stderr_bytes(self) -> bytes:
        return self._output.bytes_of("stderr")

    def stdout(self) -> str:
        """Its whole standard output, decoded as UTF-8 (invalid bytes replaced)."""
        return self.stdout_bytes.decode("utf-8", errors="replace")

    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", errors="replace")

    def output(self) -> str:
        """Both streams in the order they came, as text."""
        return b"".join(line.data for line in self._output).decode("utf-8", errors="replace")

    def logs(self) -> Iterator[LogLine]:
        """Its output in the order it came (no request: it is all here)."""
        return iter(self._output)

    def wait(
        self,
        *,
        on_stdout: Optional[Sink] = None,
        on_stderr: Optional[Sink] = None,
    ) -> CommandFinished:
        return self


class Snapshot:
    """A snapshot in the service's store (``sandbox.snapshot()``, ``Snapshot.get``)."""

    def __init__(self, http: SyncHttp, info: SnapshotInfo, took_ms: Optional[float] = None) -> None:
        self._http = http
        self.info = info
        self.took_ms = took_ms

    @property
    def snapshot_id(self) -> str:
        return self.info["id"]

    def __repr__(self) -> str:
        return f"Snapshot(snapshot_id={self.snapshot_id!r})"

    @classmethod
    def get(
        cls,
        snapshot_id: str,
        *,
        socket: Optional[str] = None,
        url: Optional[str] = None,
        token: Optional[str] = None,
        ca: Optional[str] = None,
    ) -> Snapshot:
        connection = resolve_connection(socket=socket, url=url, token=token, ca=ca)
        http, info = SyncHttp.opening(connection, "get_snapshot", path={"id": snapshot_id})
        return cls(http, cast(SnapshotInfo, info))

    def delete(self) -> None:
        """Deletes it (``ConflictError`` while sandboxes restored from it run)."""
        self._http.request("delete_snapshot", path={"id": self.snapshot_id})


class ReadStream:
    """A guest file's content as an iterator of ``bytes`` chunks (closes itself at the end;
    ``close()`` or ``with`` to stop early)."""

    def __init__(self, response: httpx.Response, path: str) -> None:
        self._response = response
        self._chunks = iter_body(response)
        self.path = path
        size = response.headers.get("x-file-size")
        #: The file's size as the service reported it.
        self.size: Optional[int] = int(size) if size and size.isdigit() else None
        self._read = 0

    def __iter__(self) -> ReadStream:
        return self

    def __next__(self) -> bytes:
        try:
            chunk = next(self._chunks)
        except StopIteration:
            self.close()
            if self.size is not None and self._read != self.size:
                raise EmberError(
                    f"{self.path}: read {self._read} bytes of {self.size}", code="incomplete_read"
                ) from None
            raise
        except BaseException:
            self.close()
            raise
        self._read += len(chunk)
        return chunk

    def read(self) -> bytes:
        """All the (rest of the) content."""
        return b"".join(self)

    def close(self) -> None:
        self._response.close()

    def __enter__(self) -> ReadStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


FileSpec = Union[Mapping[str, object], tuple[str, FileContent]]


class Sandbox:
    """A sandbox (one microVM) of the ember service.

    ``Sandbox.create(...)`` starts one, ``Sandbox.get(id)`` finds one; ``with`` stops it at
    the end of the block. Connection: ``socket=``/``url=``+``token=``(+``ca=``), else
    ``EMBER_URL``+``EMBER_TOKEN`` (+``EMBER_CA_FILE``), else ``EMBER_SOCKET``.
    """

    def __init__(self, http: SyncHttp, info: SandboxInfo) -> None:
        self._http = http
        self._info = info

    # --- life ---------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        *,
        runtime: Optional[str] = None,
        timeout_ms: Optional[float] = None,
        vcpus: Optional[int] = None,
        memory_mib: Optional[int] = None,
        ports: Optional[Sequence[int]] = None,
        env: Optional[Mapping[str, str]] = None,
        source: Optional[SourceLike] = None,
        network_policy: Optional[NetworkPolicy] = None,
        restore_mode: Optional[RestoreMode] = None,
        on_timeout: Optional[OnTimeout] = None,
        auto_resume: Optional[bool] = None,
        idle_timeout_ms: Optional[float] = None,
        socket: Optional[str] = None,
        url: Optional[str] = None,
        token: Optional[str] = None,
        ca: Optional[str] = None,
    ) -> Sandbox:
        """Starts a sandbox (boots ``runtime``, or restores ``source``) and returns it running.

        ``on_timeout``: what its timeout (and ``idle_timeout_ms``) does: ``"stop"`` (the
        default), ``"pause"`` (the VMM stays, paused) or ``"snapshot"`` (saved to the store,
        its VMM freed). ``idle_timeout_ms``: apply ``on_timeout`` once nothing has used it
        (commands, files) for that long (rounded up to seconds; at least 2 s).
        ``auto_resume`` (default true): a suspended sandbox resumes, same id, on its next
        command or file request (``suspended``, ``CommandFinished.resumed``)."""
        body = create_body(
            runtime=runtime,
            timeout_ms=timeout_ms,
            vcpus=vcpus,
            memory_mib=memory_mib,
            ports=ports,
            env=env,
            source=source,
            network_policy=network_policy,
            restore_mode=restore_mode,
            on_timeout=on_timeout,
            auto_resume=auto_resume,
            idle_timeout_ms=idle_timeout_ms,
        )
        connection = resolve_connection(socket=socket, url=url, token=token, ca=ca)
        http, info = SyncHttp.opening(connection, "create_sandbox", json=body)
        return cls(http, cast(SandboxInfo, info))

    @classmethod
    def get(
        cls,
        sandbox_id: str,
        *,
        socket: Optional[str] = None,
        url: Optional[str] = None,
        token: Optional[str] = None,
        ca: Optional[str] = None,
    ) -> Sandbox:
        """The sandbox ``sandbox_id`` (``NotFoundError`` when the service has none)."""
        connection = resolve_connection(socket=socket, url=url, token=token, ca=ca)
        http, info = SyncHttp.opening(connection, "get_sandbox", path={"id": sandbox_id})
        return cls(http, cast(SandboxInfo, info))

    def stop(self) -> None:
        """Stops and deletes it (a sandbox already gone is fine)."""
        try:
            self._http.request("delete_sandbox", path={"id": self.sandbox_id})
        except NotFoundError:
            pass
        self._info = {**self._info, "state": "stopped"}

    def close(self) -> None:
        """Closes the HTTP connections (the sandbox keeps running)."""
        self._http.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        try:
            self.stop()
        finally:
            self.close()

    # --- what it is ---------------------------------------------------------------------------

    @property
    def sandbox_id(self) -> str:
        return self._info["id"]

    @property
    def info(self) -> SandboxInfo:
        """The service's last answer about it (``refresh()`` asks again)."""
        return self._info

    @property
    def status(self) -> SandboxState:
        """``starting``, ``running``, ``paused``, ``stopped`` or ``failed`` (as last seen)."""
        return self._info["state"]

    @property
    def runtime(self) -> str:
        return self._info["runtime"]

    @property
    def timeout_at_unix_ms(self) -> int:
        return self._info["timeout_at_unix_ms"]

    @property
    def suspended(self) -> Optional[Suspension]:
        """Why and how its ``on_timeout`` suspended it (``{"reason": "timeout" | "idle",
        "how": "pause" | "snapshot", "at_unix_ms": ..., "snapshot"?: ...}``), or ``None``, as
        last seen. A suspended sandbox's ``status`` is ``paused`` (``how: pause``) or
        ``stopped`` (``how: snapshot``); it resumes on its next command or file request."""
        return self._info.get("suspended")

    @property
    def connection(self) -> Connection:
        return self._http.connection

    def __repr__(self) -> str:
        return f"Sandbox(sandbox_id={self.sandbox_id!r}, status={self.status!r})"

    def _note_resumed(self, resumed: Optional[ResumedHow]) -> None:
        """An answer said its request resumed the sandbox: it runs now."""
        if resumed is not None:
            self._info = {**self._info, "state": "running", "suspended": None}

    def metrics(self) -> SandboxMetrics:
        """``GET /sandboxes/{id}/metrics``: one sample of its use: ``guest`` (its kernel's
        view: ``cpus``, CPU time, memory, load; ``None`` while paused, ``guest_error`` says
        why) and ``host`` (its VMM: CPU time, ``rss_bytes``, cgroup memory, disk and network
        traffic). Asking does not resume a suspended sandbox."""
        response = self._http.request("sandbox_metrics", path={"id": self.sandbox_id})
        return cast(SandboxMetrics, response.json())

    def refresh(self) -> SandboxInfo:
        """``GET /sandboxes/{id}``: updates ``status`` and ``info``."""
        response = self._http.request("get_sandbox", path={"id": self.sandbox_id})
        self._info = cast(SandboxInfo, response.json())
        return self._info

    def extend_timeout(self, duration_ms: float) -> None:
        """Moves its deadline ``duration_ms`` later."""
        info = self.refresh()
        timeout_s = extended_timeout_s(info["timeout_at_unix_ms"], time.time() * 1000, duration_ms)
        response = self._http.request(
            "set_timeout", path={"id": self.sandbox_id}, json=timeout_body(timeout_s)
        )
        self._info = cast(SandboxInfo, response.json())

    def update_network_policy(self, policy: NetworkPolicy) -> None:
        """Replaces the egress policy of a sandbox created with a network: ``"allow-all"``,
        ``AllowList([...], deny=[...])`` or ``{"allow": [...], "deny": [...]}`` (networks and
        domain names, ``*.example.com`` for every name under one). New connections and name
        lookups follow it at once; connections already made go on."""
        self._http.request(
            "update_policy", path={"id": self.sandbox_id}, json=network_policy_body(policy)
        )
        self.refresh()

    def domain(self, port: int) -> str:
        """``http://HOST:PORT`` where the service's host reaches guest ``port`` (exposed with
        ``ports=[...]`` at create)."""
        found = domain_of(self._info, port)
        if found is None:
            found = domain_of(self.refresh(), port)
        if found is None:
            raise NotFoundError(
                f"port {port} of sandbox {self.sandbox_id} is not exposed: create it with "
                f"ports=[{port}]",
                code="port_not_exposed",
            )
        return found

    # --- commands -----------------------------------------------------------------------------

    @overload
    def run_command(
        self,
        cmd: str,
        args: Optional[Sequence[str]] = None,
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        sudo: bool = False,
        user: Optional[str] = None,
        detached: Literal[False] = False,
        stdin: Union[str, bytes, None] = None,
        timeout_ms: Optional[float] = None,
        on_stdout: Optional[Sink] = None,
        on_stderr: Optional[Sink] = None,
        cancel: Optional[CancelToken] = None,
        kill_signal: SignalLike = "SIGKILL",
    ) -> CommandFinished: ...

    @overload
    def run_command(
        self,
        cmd: str,
        args: Optional[Sequence[str]] = None,
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        sudo: bool = False,
        user: Optional[str] = None,
        detached: Literal[True],
        stdin: Union[str, bytes, None] = None,
        timeout_ms: Optional[float] = None,
        on_stdout: Optional[Sink] = None,
        on_stderr: Optional[Sink] = None,
        cancel: Optional[CancelToken] = None,
        kill_signal: SignalLike = "SIGKILL",
    ) -> Command: ...

    def run_command(
        self,
        cmd: str,
        args: Optional[Sequence[str]] = None,
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        sudo: bool = False,
        user: Optional[str] = None,
        detached: bool = False,
        stdin: Union[str, bytes, None] = None,
        timeout_ms: Optional[float] = None,
        on_stdout: Optional[Sink] = None,
        on_stderr: Optional[Sink] = None,
        cancel: Optional[CancelToken] = None,
        kill_signal: SignalLike = "SIGKILL",
    ) -> Union[Command, CommandFinished]:
        """Runs ``cmd`` with ``args`` (no shell: use ``"sh", ["-c", "..."]`` for one).

        Waits for it and returns a ``CommandFinished``; output goes to ``on_stdout`` /
        ``on_stderr`` as it arrives. ``detached=True`` returns a ``Command`` as soon as it
        started. ``sudo=True`` runs it as root. ``timeout_ms``: the guest kills it then
        (``timed_out``). ``cancel`` (a ``threading.Event``): once set, the command is killed
        with ``kill_signal`` and finishes with ``signal`` set. An exception in this thread
        (``KeyboardInterrupt``) kills it too.
        """
        body = exec_body(
            cmd,
            args,
            env=env,
            cwd=cwd,
            sudo=sudo,
            user=user,
            detached=detached,
            stdin=stdin,
            timeout_ms=timeout_ms,
        )
        if detached:
            answer = self._http.request("exec", path={"id": self.sandbox_id}, json=body)
            info = cast(CommandInfo, answer.json())
            resumed = resumed_from(answer.headers)
            self._note_resumed(resumed)
            return Command(self, info["cmd_id"], info.get("pid"), resumed)
        kill_with = signal_number(kill_signal)  # checked before the command starts
        state = ExecState()
        sinks = _sinks(on_stdout, on_stderr)
        started = threading.Event()
        done = threading.Event()
        watcher: Optional[threading.Thread] = None
        if cancel is not None:
            watcher = threading.Thread(
                target=self._watch_cancel,
                args=(cancel, state, started, done, kill_with),
                name="ember-cancel",
                daemon=True,
            )
            watcher.start()
        response: Optional[httpx.Response] = None
        try:
            response = self._http.stream("exec", path={"id": self.sandbox_id}, json=body)
            state.resumed = resumed_from(response.headers)
            self._note_resumed(state.resumed)
            decoder = NdjsonDecoder()
            for chunk in iter_body(response):
                for record in decoder.feed(chunk):
                    line = state.feed(record)
                    if state.cmd_id is not None:
                        started.set()
                    if line is not None:
                        _deliver(sinks, line)
            for record in decoder.close():
                line = state.feed(record)
                if line is not None:
                    _deliver(sinks, line)
            _finish(sinks)
            status = state.require_exit()
        except BaseException:
            if state.cmd_id is not None and state.exit is None:
                self._kill_quietly(state.cmd_id, kill_with)
            raise
        finally:
            done.set()
            started.set()
            if response is not None:
                response.close()
            if watcher is not None:
                watcher.join(timeout=5)
        assert state.cmd_id is not None
        return CommandFinished(
            self, state.cmd_id, state.pid, state.output, status, state.resumed
        )

    def _watch_cancel(
        self,
        cancel: CancelToken,
        state: ExecState,
        started: threading.Event,
        done: threading.Event,
        signal: int,
    ) -> None:
        while not done.is_set():
            if cancel.wait(0.05):
                started.wait()
                if state.cmd_id is not None and not done.is_set():
                    self._kill_quietly(state.cmd_id, signal)
                return

    def _kill_quietly(self, cmd_id: str, signal: int) -> None:
        try:
            self._http.request(
                "kill_command",
                path={"id": self.sandbox_id, "cid": cmd_id},
                json=kill_body(signal),
            )
        except (ConflictError, NotFoundError):
            pass  # it has ended already
        except EmberError:
            pass  # best effort: the caller's own error matters more

    def get_command(self, cmd_id: str) -> Command:
        """A command of this sandbox by id (``wait()`` gives its end, ``logs()`` its output)."""
        response = self._http.request("get_command", path={"id": self.sandbox_id, "cid": cmd_id})
        info = cast(CommandInfo, response.json())
        resumed = resumed_from(response.headers)
        self._note_resumed(resumed)
        return Command(self, info["cmd_id"], info.get("pid"), resumed)

    def list_commands(self) -> list[CommandInfo]:
        """Its commands, oldest first, running and finished (``status``, ``argv``, exit;
        without their output: ``get_command(cmd_id)`` for that)."""
        response = self._http.request("list_commands", path={"id": self.sandbox_id})
        self._note_resumed(resumed_from(response.headers))
        return cast(CommandList, response.json())["commands"]

    # --- files --------------------------------------------------------------------------------

    def write_files(self, files: Iterable[FileSpec]) -> None:
        """Writes files: ``[{"path": "/abs", "content": str|bytes|binary file|chunks,
        "mode"?: 0o755}]`` or ``[("/abs", content)]``. Missing parent folders are created."""
        for path, content, mode in file_entries(files):
            query = {"path": path}
            if mode is not None:
                query["mode"] = mode
            data = file_body(content)
            if not isinstance(data, bytes):
                # A stream cannot be sent twice: make the folder first.
                parent = parent_dir(path)
                if parent is not None:
                    self.mk_dir(parent)
                self._http.request(
                    "put_file", path={"id": self.sandbox_id}, query=query, content=data
                )
                continue
            try:
                self._http.request(
                    "put_file", path={"id": self.sandbox_id}, query=query, content=data
                )
            except NotFoundError as e:
                parent = parent_dir(path)
                if is_missing_sandbox(e) or parent is None:
                    raise
                self.mk_dir(parent)
                self._http.request(
                    "put_file", path={"id": self.sandbox_id}, query=query, content=data
                )

    def read_file(self, path: str) -> Optional[ReadStream]:
        """A guest file's content as an iterator of ``bytes`` chunks, streamed; ``None`` when
        there is no such file."""
        try:
            response = self._http.stream(
                "get_file", path={"id": self.sandbox_id}, query={"path": path}
            )
        except NotFoundError as e:
            if is_missing_sandbox(e):
                raise
            return None
        return ReadStream(response, path)

    def read_file_bytes(self, path: str) -> Optional[bytes]:
        """A guest file's whole content; ``None`` when there is no such file."""
        stream = self.read_file(path)
        if stream is None:
            return None
        with stream:
            return stream.read()

    def mk_dir(self, path: str, *, mode: Union[int, str, None] = None) -> None:
        """Creates a folder and its parents (``mkdir -p``)."""
        self._http.request("mkdir", path={"id": self.sandbox_id}, json=mkdir_body(path, mode))

    # --- snapshots ----------------------------------------------------------------------------

    def snapshot(self, name: Optional[str] = None, *, stop: bool = False) -> Snapshot:
        """Saves it as a snapshot (it keeps running unless ``stop``)."""
        response = self._http.request(
            "create_snapshot", path={"id": self.sandbox_id}, json=snapshot_body(name, stop=stop)
        )
        taken = cast(SnapshotTaken, response.json())
        self._info = taken["sandbox"]
        return Snapshot(self._http, taken, taken.get("took_ms"))

    def fork(
        self,
        count: int = 1,
        *,
        timeout_ms: Optional[float] = None,
        env: Optional[Mapping[str, str]] = None,
        ports: Optional[Sequence[int]] = None,
        network_policy: Optional[NetworkPolicy] = None,
    ) -> list[Sandbox]:
        """Snapshots it and starts ``count`` sandboxes from the snapshot (running copies of it
        now). They get its env, ports and network unless told otherwise."""
        snap = self.snapshot()
        network = network_mode(network_policy) if network_policy is not None else network_of(
            self._info
        )
        body = fork_body(
            count,
            timeout_ms=timeout_ms,
            env=env if env is not None else self._info.get("env"),
            ports=ports
            if ports is not None
            else [p["guest_port"] for p in self._info.get("ports", [])],
            network=network,
        )
        response = self._http.request("fork", path={"id": snap.snapshot_id}, json=body)
        infos = cast(SandboxList, response.json())["sandboxes"]
        return [Sandbox(SyncHttp(self._http.connection), info) for info in infos]


# --- output sinks ----------------------------------------------------------------------------


def _sinks(
    on_stdout: Optional[Sink], on_stderr: Optional[Sink]
) -> dict[StreamName, SinkWriter]:
    sinks: dict[StreamName, SinkWriter] = {}
    if on_stdout is not None:
        sinks["stdout"] = SinkWriter(on_stdout)
    if on_stderr is not None:
        sinks["stderr"] = SinkWriter(on_stderr)
    return sinks


def _deliver(sinks: dict[StreamName, SinkWriter], line: LogLine) -> None:
    sink = sinks.get(line.stream)
    if sink is not None:
        sink.write(line.data)


def _finish(sinks: dict[StreamName, SinkWriter]) -> None:
    for sink in sinks.values():
        sink.finish()

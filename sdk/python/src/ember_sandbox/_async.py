"""The asyncio API: ``AsyncSandbox``, ``AsyncCommand``, ``AsyncCommandFinished``,
``AsyncSnapshot``. The same operations as the blocking API, as coroutines; output and file
content as async iterators. Cancelling the task of a running ``run_command`` kills the command
in the guest before the ``CancelledError`` goes on."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import Any, Literal, Optional, Protocol, Union, cast, overload

import httpx

from ._api_types import (
    CommandInfo,
    CommandList,
    CreateBody,
    ExecBody,
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
from ._http import AsyncHttp, aiter_body
from ._models import (
    CapturedOutput,
    ExitStatus,
    LogLine,
    NetworkPolicy,
    ResumedHow,
    SourceLike,
    StreamName,
)

#: What ``AsyncSandbox.write_files`` takes: as ``Sandbox.write_files``, and content may also
#: be an async iterable of ``bytes``.
AsyncFileSpec = Union[
    Mapping[str, object], tuple[str, Union[FileContent, AsyncIterable[bytes]]]
]

#: How long a cancelled ``run_command`` waits for the command's id and then for its end
#: after the kill, in seconds.
ABORT_WAIT_S = 10.0


class AsyncCancelToken(Protocol):
    """What ``run_command(cancel=...)`` takes: an ``asyncio.Event`` or anything like it."""

    def is_set(self) -> bool: ...

    def wait(self) -> Awaitable[object]: ...


class AsyncCommand:
    """A command started in a sandbox (``run_command(..., detached=True)`` or
    ``AsyncSandbox.get_command``). ``resumed``: as ``Command.resumed``."""

    def __init__(
        self,
        sandbox: AsyncSandbox,
        cmd_id: str,
        pid: Optional[int] = None,
        resumed: Optional[ResumedHow] = None,
    ) -> None:
        self._sandbox = sandbox
        self.cmd_id = cmd_id
        self.pid = pid
        self.resumed: Optional[ResumedHow] = resumed

    @property
    def sandbox(self) -> AsyncSandbox:
        return self._sandbox

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(cmd_id={self.cmd_id!r}, "
            f"sandbox={self._sandbox.sandbox_id!r})"
        )

    def _path(self) -> dict[str, str]:
        return {"id": self._sandbox.sandbox_id, "cid": self.cmd_id}

    async def info(self) -> CommandInfo:
        response = await self._sandbox._http.request("get_command", path=self._path())
        return cast(CommandInfo, response.json())

    async def _follow(self, state: ExecState) -> AsyncGenerator[LogLine, None]:
        response = await self._sandbox._http.stream("command_logs", path=self._path())
        decoder = NdjsonDecoder()
        body = aiter_body(response)
        try:
            async for chunk in body:
                for record in decoder.feed(chunk):
                    line = state.feed(record)
                    if line is not None:
                        yield line
            for record in decoder.close():
                line = state.feed(record)
                if line is not None:
                    yield line
        finally:
            await body.aclose()
            await response.aclose()

    async def logs(self) -> AsyncIterator[LogLine]:
        """Its output in the order it came (both streams), following it until it exits."""
        follow = self._follow(ExecState())
        try:
            async for line in follow:
                yield line
        finally:
            await follow.aclose()

    async def wait(
        self,
        *,
        on_stdout: Optional[Sink] = None,
        on_stderr: Optional[Sink] = None,
    ) -> AsyncCommandFinished:
        """Waits for it to end; its whole output (as kept) and how it ended."""
        state = ExecState()
        sinks = _sinks(on_stdout, on_stderr)
        follow = self._follow(state)
        try:
            async for line in follow:
                await _deliver(sinks, line)
        finally:
            await follow.aclose()
        _finish(sinks)
        return AsyncCommandFinished(
            self._sandbox, self.cmd_id, self.pid, state.output, state.require_exit(), self.resumed
        )

    async def kill(self, signal: SignalLike = "SIGKILL") -> None:
        """Sends ``signal`` (default SIGKILL). Raises ``ConflictError`` once it has finished."""
        await self._sandbox._http.request(
            "kill_command", path=self._path(), json=kill_body(signal)
        )

    async def _kept(self, stream: StreamName) -> bytes:
        info = await self.info()
        if stream == "stdout":
            return record_bytes(info.get("stdout"), info.get("stdout_base64"))
        return record_bytes(info.get("stderr"), info.get("stderr_base64"))

    async def stdout(self) -> str:
        """Its standard output so far (as kept), as text."""
        return (await self._kept("stdout")).decode("utf-8", errors="replace")

    async def stderr(self) -> str:
        return (await self._kept("stderr")).decode("utf-8", errors="replace")


class AsyncCommandFinished(AsyncCommand):
    """A command that has ended: ``exit_code``, ``signal``, ``timed_out``, its output
    (``await stdout()`` like the TypeScript SDK, or ``stdout_bytes`` / ``stdout_text``)."""

    def __init__(
        self,
        sandbox: AsyncSandbox,
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
            f"AsyncCommandFinished(cmd_id={self.cmd_id!r}, exit_code={self.exit_code!r}, "
            f"signal={self.signal!r}, timed_out={self.timed_out!r})"
        )

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def stdout_bytes(self) -> bytes:
        return self._output.bytes_of("stdout")

    @property
    def stderr_bytes(self) -> bytes:
        return self._output.bytes_of("stderr")

    @property
    def stdout_text(self) -> str:
        return self.stdout_bytes.decode("utf-8", errors="replace")

    @property
    def stderr_text(self) -> str:
        return self.stderr_bytes.decode("utf-8", errors="replace")

    async def stdout(self) -> str:
        return self.stdout_text

    async def stderr(self) -> str:
        return self.stderr_text

    def output(self) -> str:
        """Both streams in the order they came, as text."""
        return b"".join(line.data for line in self._output).decode("utf-8", errors="replace")

    async def logs(self) -> AsyncIterator[LogLine]:
        for line in self._output:
            yield line

    def log_lines(self) -> Iterator[LogLine]:
        """``logs()`` without ``async for``: it is all here."""
        return iter(self._output)

    async def wait(
        self,
        *,
        on_stdout: Optional[Sink] = None,
        on_stderr: Optional[Sink] = None,
    ) -> AsyncCommandFinished:
        return self


class AsyncSnapshot:
    """A snapshot in the service's store."""

    def __init__(
        self, http: AsyncHttp, info: SnapshotInfo, took_ms: Optional[float] = None
    ) -> None:
        self._http = http
        self.info = info
        self.took_ms = took_ms

    @property
    def snapshot_id(self) -> str:
        return self.info["id"]

    def __repr__(self) -> str:
        return f"AsyncSnapshot(snapshot_id={self.snapshot_id!r})"

    @classmethod
    async def get(
        cls,
        snapshot_id: str,
        *,
        socket: Optional[str] = None,
        url: Optional[str] = None,
        token: Optional[str] = None,
        ca: Optional[str] = None,
    ) -> AsyncSnapshot:
        connection = resolve_connection(socket=socket, url=url, token=token, ca=ca)
        http, info = await AsyncHttp.opening(connection, "get_snapshot", path={"id": snapshot_id})
        return cls(http, cast(SnapshotInfo, info))

    async def delete(self) -> None:
        await self._http.request("delete_snapshot", path={"id": self.snapshot_id})


class AsyncReadStream:
    """A guest file's content as an async iterator of ``bytes`` chunks."""

    def __init__(self, response: httpx.Response, path: str) -> None:
        self._response = response
        self._chunks = aiter_body(response)
        self.path = path
        size = response.headers.get("x-file-size")
        self.size: Optional[int] = int(size) if size and size.isdigit() else None
        self._read = 0

    def __aiter__(self) -> AsyncReadStream:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            await self.aclose()
            if self.size is not None and self._read != self.size:
                raise EmberError(
                    f"{self.path}: read {self._read} bytes of {self.size}",
                    code="incomplete_read",
                ) from None
            raise
        except BaseException:
            await self.aclose()
            raise
        self._read += len(chunk)
        return chunk

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self])

    async def aclose(self) -> None:
        await self._chunks.aclose()
        await self._response.aclose()

    async def __aenter__(self) -> AsyncReadStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _Starting:
    """``AsyncSandbox.create(...)``: await it, or ``async with`` it (stopped at the end)."""

    def __init__(self, start: Awaitable[AsyncSandbox]) -> None:
        self._start = start
        self._sandbox: Optional[AsyncSandbox] = None

    def __await__(self) -> Generator[Any, None, AsyncSandbox]:
        return self._start.__await__()

    async def __aenter__(self) -> AsyncSandbox:
        self._sandbox = await self._start
        return self._sandbox

    async def __aexit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if self._sandbox is not None:
            await self._sandbox.__aexit__(exc_type, exc, tb)


class AsyncSandbox:
    """A sandbox (one microVM) of the ember service, for asyncio.

    ``sb = await AsyncSandbox.create(...)`` or ``async with AsyncSandbox.create(...) as sb:``
    (stopped at the end of the block); ``await AsyncSandbox.get(id)``.
    """

    def __init__(self, http: AsyncHttp, info: SandboxInfo) -> None:
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
    ) -> _Starting:
        """Starts a sandbox (boots ``runtime``, or restores ``source``); the options are
        ``Sandbox.create``'s."""
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
        return _Starting(cls._create(connection, body))

    @classmethod
    async def _create(cls, connection: Connection, body: CreateBody) -> AsyncSandbox:
        http, info = await AsyncHttp.opening(connection, "create_sandbox", json=body)
        return cls(http, cast(SandboxInfo, info))

    @classmethod
    async def get(
        cls,
        sandbox_id: str,
        *,
        socket: Optional[str] = None,
        url: Optional[str] = None,
        token: Optional[str] = None,
        ca: Optional[str] = None,
    ) -> AsyncSandbox:
        """The sandbox ``sandbox_id`` (``NotFoundError`` when the service has none)."""
        connection = resolve_connection(socket=socket, url=url, token=token, ca=ca)
        http, info = await AsyncHttp.opening(connection, "get_sandbox", path={"id": sandbox_id})
        return cls(http, cast(SandboxInfo, info))

    async def stop(self) -> None:
        """Stops and deletes it (a sandbox already gone is fine)."""
        try:
            await self._http.request("delete_sandbox", path={"id": self.sandbox_id})
        except NotFoundError:
            pass
        self._info = {**self._info, "state": "stopped"}

    async def aclose(self) -> None:
        """Closes the HTTP connections (the sandbox keeps running)."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        try:
            await self.stop()
        finally:
            await self.aclose()

    # --- what it is ---------------------------------------------------------------------------

    @property
    def sandbox_id(self) -> str:
        return self._info["id"]

    @property
    def info(self) -> SandboxInfo:
        return self._info

    @property
    def status(self) -> SandboxState:
        return self._info["state"]

    @property
    def runtime(self) -> str:
        return self._info["runtime"]

    @property
    def timeout_at_unix_ms(self) -> int:
        return self._info["timeout_at_unix_ms"]

    @property
    def suspended(self) -> Optional[Suspension]:
        """Why and how its ``on_timeout`` suspended it, or ``None`` (see
        ``Sandbox.suspended``), as last seen."""
        return self._info.get("suspended")

    @property
    def connection(self) -> Connection:
        return self._http.connection

    def __repr__(self) -> str:
        return f"AsyncSandbox(sandbox_id={self.sandbox_id!r}, status={self.status!r})"

    def _note_resumed(self, resumed: Optional[ResumedHow]) -> None:
        """An answer said its request resumed the sandbox: it runs now."""
        if resumed is not None:
            self._info = {**self._info, "state": "running", "suspended": None}

    async def metrics(self) -> SandboxMetrics:
        """One sample of its use of CPU, memory, disk and network (see ``Sandbox.metrics``)."""
        response = await self._http.request("sandbox_metrics", path={"id": self.sandbox_id})
        return cast(SandboxMetrics, response.json())

    async def refresh(self) -> SandboxInfo:
        response = await self._http.request("get_sandbox", path={"id": self.sandbox_id})
        self._info = cast(SandboxInfo, response.json())
        return self._info

    async def extend_timeout(self, duration_ms: float) -> None:
        info = await self.refresh()
        timeout_s = extended_timeout_s(info["timeout_at_unix_ms"], time.time() * 1000, duration_ms)
        response = await self._http.request(
            "set_timeout", path={"id": self.sandbox_id}, json=timeout_body(timeout_s)
        )
        self._info = cast(SandboxInfo, response.json())

    async def update_network_policy(self, policy: NetworkPolicy) -> None:
        """Replaces its egress policy (see ``Sandbox.update_network_policy``)."""
        await self._http.request(
            "update_policy", path={"id": self.sandbox_id}, json=network_policy_body(policy)
        )
        await self.refresh()

    async def domain(self, port: int) -> str:
        found = domain_of(self._info, port)
        if found is None:
            found = domain_of(await self.refresh(), port)
        if found is None:
            raise NotFoundError(
                f"port {port} of sandbox {self.sandbox_id} is not exposed: create it with "
                f"ports=[{port}]",
                code="port_not_exposed",
            )
        return found

    # --- commands -----------------------------------------------------------------------------

    @overload
    async def run_command(
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
        cancel: Optional[AsyncCancelToken] = None,
        kill_signal: SignalLike = "SIGKILL",
    ) -> AsyncCommandFinished: ...

    @overload
    async def run_command(
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
        cancel: Optional[AsyncCancelToken] = None,
        kill_signal: SignalLike = "SIGKILL",
    ) -> AsyncCommand: ...

    async def run_command(
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
        cancel: Optional[AsyncCancelToken] = None,
        kill_signal: SignalLike = "SIGKILL",
    ) -> Union[AsyncCommand, AsyncCommandFinished]:
        """Runs ``cmd`` with ``args`` (see ``Sandbox.run_command``). Cancelling the awaiting
        task (``task.cancel()``, ``asyncio.wait_for``, ``asyncio.timeout``) kills the command
        with ``kill_signal`` before the ``CancelledError`` goes on; so does setting
        ``cancel`` (an ``asyncio.Event``), after which it returns with ``signal`` set.
        ``on_stdout``/``on_stderr`` may be coroutine functions."""
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
            response = await self._http.request("exec", path={"id": self.sandbox_id}, json=body)
            info = cast(CommandInfo, response.json())
            resumed = resumed_from(response.headers)
            self._note_resumed(resumed)
            return AsyncCommand(self, info["cmd_id"], info.get("pid"), resumed)
        signal = signal_number(kill_signal)
        state = ExecState()
        started = asyncio.Event()
        sinks = _sinks(on_stdout, on_stderr)
        inner = asyncio.ensure_future(self._stream_exec(body, state, started, sinks))
        inner.add_done_callback(_consume)
        watcher = (
            asyncio.ensure_future(self._watch_cancel(cancel, state, started, signal))
            if cancel is not None
            else None
        )
        try:
            await asyncio.shield(inner)
        except asyncio.CancelledError:
            await self._abort(inner, state, started, signal)
            raise
        except BaseException:
            if state.cmd_id is not None and state.exit is None:
                await self._kill_quietly(state.cmd_id, signal)
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
        status = state.require_exit()
        assert state.cmd_id is not None
        return AsyncCommandFinished(
            self, state.cmd_id, state.pid, state.output, status, state.resumed
        )

    async def _stream_exec(
        self,
        body: ExecBody,
        state: ExecState,
        started: asyncio.Event,
        sinks: dict[StreamName, SinkWriter],
    ) -> None:
        try:
            response = await self._http.stream("exec", path={"id": self.sandbox_id}, json=body)
            state.resumed = resumed_from(response.headers)
            self._note_resumed(state.resumed)
            chunks = aiter_body(response)
            try:
                decoder = NdjsonDecoder()
                async for chunk in chunks:
                    for record in decoder.feed(chunk):
                        line = state.feed(record)
                        if state.cmd_id is not None:
                            started.set()
                        if line is not None:
                            await _deliver(sinks, line)
                for record in decoder.close():
                    line = state.feed(record)
                    if line is not None:
                        await _deliver(sinks, line)
                _finish(sinks)
            finally:
                await chunks.aclose()
                await response.aclose()
        finally:
            started.set()

    async def _abort(
        self, inner: asyncio.Future[None], state: ExecState, started: asyncio.Event, signal: int
    ) -> None:
        """The caller was cancelled: kill the command (once its id is known), give its stream
        a moment to end, then drop it."""
        try:
            if state.cmd_id is None and not inner.done():
                waiter = asyncio.ensure_future(started.wait())
                either: set[asyncio.Future[Any]] = {inner, waiter}
                try:
                    await asyncio.wait(
                        either, timeout=ABORT_WAIT_S, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    waiter.cancel()
            if state.cmd_id is not None and state.exit is None:
                await self._kill_quietly(state.cmd_id, signal)
                if not inner.done():
                    await asyncio.wait({inner}, timeout=ABORT_WAIT_S)
        finally:
            if not inner.done():
                inner.cancel()

    async def _watch_cancel(
        self, cancel: AsyncCancelToken, state: ExecState, started: asyncio.Event, signal: int
    ) -> None:
        await cancel.wait()
        await started.wait()
        if state.cmd_id is not None and state.exit is None:
            await self._kill_quietly(state.cmd_id, signal)

    async def _kill_quietly(self, cmd_id: str, signal: int) -> None:
        try:
            await self._http.request(
                "kill_command",
                path={"id": self.sandbox_id, "cid": cmd_id},
                json=kill_body(signal),
            )
        except (ConflictError, NotFoundError):
            pass  # it has ended already
        except EmberError:
            pass  # best effort

    async def get_command(self, cmd_id: str) -> AsyncCommand:
        response = await self._http.request(
            "get_command", path={"id": self.sandbox_id, "cid": cmd_id}
        )
        info = cast(CommandInfo, response.json())
        resumed = resumed_from(response.headers)
        self._note_resumed(resumed)
        return AsyncCommand(self, info["cmd_id"], info.get("pid"), resumed)

    async def list_commands(self) -> list[CommandInfo]:
        """Its commands, oldest first, running and finished (without their output)."""
        response = await self._http.request("list_commands", path={"id": self.sandbox_id})
        self._note_resumed(resumed_from(response.headers))
        return cast(CommandList, response.json())["commands"]

    # --- files --------------------------------------------------------------------------------

    async def write_files(self, files: Iterable[AsyncFileSpec]) -> None:
        """Writes files (see ``Sandbox.write_files``); content may also be an async iterable
        of ``bytes``."""
        for path, content, mode in file_entries(files):
            query = {"path": path}
            if mode is not None:
                query["mode"] = mode
            if isinstance(content, AsyncIterable):
                data: Union[bytes, AsyncIterator[bytes]] = _checked_async_chunks(content)
            else:
                sync_data = file_body(content)
                data = sync_data if isinstance(sync_data, bytes) else _to_async(sync_data)
            if not isinstance(data, bytes):
                parent = parent_dir(path)
                if parent is not None:
                    await self.mk_dir(parent)
                await self._http.request(
                    "put_file", path={"id": self.sandbox_id}, query=query, content=data
                )
                continue
            try:
                await self._http.request(
                    "put_file", path={"id": self.sandbox_id}, query=query, content=data
                )
            except NotFoundError as e:
                parent = parent_dir(path)
                if is_missing_sandbox(e) or parent is None:
                    raise
                await self.mk_dir(parent)
                await self._http.request(
                    "put_file", path={"id": self.sandbox_id}, query=query, content=data
                )

    async def read_file(self, path: str) -> Optional[AsyncReadStream]:
        """A guest file's content as an async iterator of ``bytes`` chunks; ``None`` when there
        is no such file."""
        try:
            response = await self._http.stream(
                "get_file", path={"id": self.sandbox_id}, query={"path": path}
            )
        except NotFoundError as e:
            if is_missing_sandbox(e):
                raise
            return None
        return AsyncReadStream(response, path)

    async def read_file_bytes(self, path: str) -> Optional[bytes]:
        stream = await self.read_file(path)
        if stream is None:
            return None
        async with stream:
            return await stream.read()

    async def mk_dir(self, path: str, *, mode: Union[int, str, None] = None) -> None:
        await self._http.request(
            "mkdir", path={"id": self.sandbox_id}, json=mkdir_body(path, mode)
        )

    # --- snapshots ----------------------------------------------------------------------------

    async def snapshot(self, name: Optional[str] = None, *, stop: bool = False) -> AsyncSnapshot:
        response = await self._http.request(
            "create_snapshot", path={"id": self.sandbox_id}, json=snapshot_body(name, stop=stop)
        )
        taken = cast(SnapshotTaken, response.json())
        self._info = taken["sandbox"]
        return AsyncSnapshot(self._http, taken, taken.get("took_ms"))

    async def fork(
        self,
        count: int = 1,
        *,
        timeout_ms: Optional[float] = None,
        env: Optional[Mapping[str, str]] = None,
        ports: Optional[Sequence[int]] = None,
        network_policy: Optional[NetworkPolicy] = None,
    ) -> list[AsyncSandbox]:
        snap = await self.snapshot()
        network = (
            network_mode(network_policy) if network_policy is not None else network_of(self._info)
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
        response = await self._http.request("fork", path={"id": snap.snapshot_id}, json=body)
        infos = cast(SandboxList, response.json())["sandboxes"]
        return [AsyncSandbox(AsyncHttp(self._http.connection), info) for info in infos]


# --- helpers ---------------------------------------------------------------------------------

async def _checked_async_chunks(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise TypeError(f"file content chunks must be bytes, not {type(chunk).__name__}")
        yield bytes(chunk)


async def _to_async(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def _consume(future: asyncio.Future[None]) -> None:
    """Marks a background task's exception as seen (the caller gets it another way)."""
    if not future.cancelled():
        future.exception()


def _sinks(
    on_stdout: Optional[Sink], on_stderr: Optional[Sink]
) -> dict[StreamName, SinkWriter]:
    sinks: dict[StreamName, SinkWriter] = {}
    if on_stdout is not None:
        sinks["stdout"] = SinkWriter(on_stdout)
    if on_stderr is not None:
        sinks["stderr"] = SinkWriter(on_stderr)
    return sinks


async def _deliver(sinks: dict[StreamName, SinkWriter], line: LogLine) -> None:
    sink = sinks.get(line.stream)
    if sink is not None:
        result = sink.write(line.data)
        if inspect.isawaitable(result):
            await result


def _finish(sinks: dict[StreamName, SinkWriter]) -> None:
    for sink in sinks.values():
        sink.finish()

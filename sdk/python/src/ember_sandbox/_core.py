"""What the sync and async APIs share: request bodies (as the generated types), the NDJSON
output stream, signals and units."""

from __future__ import annotations

import base64
import binascii
import codecs
import io
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import IO, Callable, Optional, Protocol, Union, cast

from ._api_types import (
    CreateBody,
    ExecBody,
    ForkBody,
    KillBody,
    MkdirBody,
    NetworkMode,
    NetworkModeEgress,
    NetworkPolicy as ApiNetworkPolicy,
    OnTimeout,
    OutputRecord,
    RestoreMode,
    SandboxInfo,
    SnapshotBody,
    TimeoutBody,
)
from ._errors import EmberConnectionError, EmberError, NotFoundError
from ._models import (
    AllowList,
    CapturedOutput,
    ExitStatus,
    LogLine,
    NetworkPolicy,
    ResumedHow,
    SnapshotSource,
    SourceLike,
    StreamName,
    TemplateSource,
)

# --- units -----------------------------------------------------------------------------------


def ms_to_s(ms: float, what: str = "timeout_ms") -> int:
    """Milliseconds as whole seconds, rounded up (the API takes seconds)."""
    if isinstance(ms, bool) or not isinstance(ms, (int, float)) or math.isnan(ms) or ms <= 0:
        raise ValueError(f"{what} must be a positive number of milliseconds, not {ms!r}")
    return max(1, math.ceil(ms / 1000))


def extended_timeout_s(timeout_at_unix_ms: int, now_unix_ms: float, extra_ms: float) -> int:
    """The ``timeout_s`` that moves a deadline ``extra_ms`` later."""
    if extra_ms <= 0:
        raise ValueError(f"extend_timeout takes a positive duration in ms, not {extra_ms!r}")
    return max(1, math.ceil((timeout_at_unix_ms - now_unix_ms + extra_ms) / 1000))


# Linux's numbers (the guest's), whatever the host is.
LINUX_SIGNALS: dict[str, int] = {
    "SIGHUP": 1,
    "SIGINT": 2,
    "SIGQUIT": 3,
    "SIGILL": 4,
    "SIGTRAP": 5,
    "SIGABRT": 6,
    "SIGBUS": 7,
    "SIGFPE": 8,
    "SIGKILL": 9,
    "SIGUSR1": 10,
    "SIGSEGV": 11,
    "SIGUSR2": 12,
    "SIGPIPE": 13,
    "SIGALRM": 14,
    "SIGTERM": 15,
    "SIGCHLD": 17,
    "SIGCONT": 18,
    "SIGSTOP": 19,
    "SIGTSTP": 20,
    "SIGTTIN": 21,
    "SIGTTOU": 22,
    "SIGXCPU": 24,
    "SIGXFSZ": 25,
    "SIGWINCH": 28,
}

SignalLike = Union[int, str]


def signal_number(sig: SignalLike) -> int:
    """A signal as the guest's number: ``9``, ``"SIGKILL"``, ``"KILL"`` or ``"kill"``."""
    if isinstance(sig, bool):
        raise ValueError(f"not a signal: {sig!r}")
    if isinstance(sig, int):
        number = sig
    else:
        name = sig.strip().upper()
        if name.isdigit():
            number = int(name)
        else:
            if not name.startswith("SIG"):
                name = "SIG" + name
            if name not in LINUX_SIGNALS:
                raise ValueError(f"unknown signal {sig!r}")
            number = LINUX_SIGNALS[name]
    if not 1 <= number <= 64:
        raise ValueError(f"signal {number} is not between 1 and 64")
    return number


def file_mode(mode: Union[int, str, None]) -> Optional[str]:
    """Permission bits as the API's octal text: ``0o755`` or ``"755"`` -> ``"755"``."""
    if mode is None:
        return None
    if isinstance(mode, int) and not isinstance(mode, bool):
        if not 0 <= mode <= 0o7777:
            raise ValueError(f"mode {mode:o} is not permission bits")
        return format(mode, "o")
    text = str(mode).removeprefix("0o")
    if not text or len(text) > 4 or any(c not in "01234567" for c in text):
        raise ValueError(f"mode {mode!r} is not octal permission bits")
    return text


# --- request bodies --------------------------------------------------------------------------


def network_mode(policy: Optional[NetworkPolicy]) -> Optional[NetworkMode]:
    """The API's ``network`` for a Vercel-style network policy (``None``: no network)."""
    if policy is None or policy == "deny-all":
        return None
    if policy == "allow-all":
        return {"mode": "egress"}
    if isinstance(policy, AllowList):
        allow = None if policy.allow is None else _rule_list("allow", policy.allow)
        deny = _rule_list("deny", policy.deny)
    elif isinstance(policy, Mapping):
        if policy.get("mode") == "none":
            return None
        raw_allow, raw_deny = policy.get("allow"), policy.get("deny")
        if raw_allow is None and raw_deny is None and policy.get("mode") != "egress":
            raise ValueError(f"network_policy {policy!r}: give 'allow' and/or 'deny': [...]")
        allow = None if raw_allow is None else _rule_list("allow", raw_allow)
        deny = [] if raw_deny is None else _rule_list("deny", raw_deny)
    else:
        raise ValueError(
            f"network_policy must be 'allow-all', 'deny-all', AllowList([...]) or "
            f"{{'allow': [...], 'deny': [...]}}, not {policy!r}"
        )
    egress: NetworkModeEgress = {"mode": "egress"}
    if allow is not None:
        egress["allow"] = allow
    if deny:
        egress["deny"] = deny
    return egress


def _rule_list(name: str, raw: object) -> list[str]:
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise ValueError(f"network_policy {name!r} is a list of networks and names, not {raw!r}")
    return [str(rule) for rule in raw]


def network_policy_body(policy: NetworkPolicy) -> ApiNetworkPolicy:
    """The ``PATCH /sandboxes/{id}/network`` body for a policy with egress."""
    mode = network_mode(policy)
    if mode is None or mode["mode"] != "egress":
        raise ValueError(
            "update_network_policy takes 'allow-all' or allow/deny lists: a sandbox's network "
            "device is chosen when it is created"
        )
    body: ApiNetworkPolicy = {}
    if "allow" in mode:
        body["allow"] = mode["allow"]
    if "deny" in mode:
        body["deny"] = mode["deny"]
    return body


def source_fields(source: Optional[SourceLike]) -> tuple[Optional[str], Optional[str]]:
    """``(snapshot, template)`` for ``Sandbox.create(source=...)``."""
    if source is None:
        return None, None
    if isinstance(source, TemplateSource):
        return None, source.name
    if isinstance(source, SnapshotSource):
        return source.snapshot_id, None
    if isinstance(source, Mapping):
        kind = source.get("type")
        if kind == "template":
            name = source.get("name") or source.get("template")
            if not name:
                raise ValueError("a template source needs 'name'")
            return None, name
        if kind in ("snapshot", None):
            snap = source.get("snapshot_id") or source.get("snapshotId") or source.get("id")
            if not snap:
                raise ValueError("a snapshot source needs 'snapshot_id'")
            return snap, None
        raise ValueError(f"source type must be 'snapshot' or 'template', not {kind!r}")
    snapshot_id = getattr(source, "snapshot_id", None)
    if isinstance(snapshot_id, str):
        return snapshot_id, None
    raise ValueError(f"not a sandbox source: {source!r}")


ON_TIMEOUT: tuple[OnTimeout, ...] = ("stop", "pause", "snapshot")


def create_body(
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
) -> CreateBody:
    body: CreateBody = {}
    if runtime is not None:
        body["runtime"] = runtime
    if timeout_ms is not None:
        body["timeout_s"] = ms_to_s(timeout_ms)
    if vcpus is not None:
        body["vcpus"] = vcpus
    if memory_mib is not None:
        body["memory_mib"] = memory_mib
    if ports:
        body["ports"] = [int(p) for p in ports]
    if env:
        body["env"] = dict(env)
    snapshot, template = source_fields(source)
    if snapshot is not None:
        body["snapshot"] = snapshot
    if template is not None:
        body["template"] = template
    network = network_mode(network_policy)
    if network is not None:
        body["network"] = network
    if restore_mode is not None:
        body["restore_mode"] = restore_mode
    if on_timeout is not None:
        if on_timeout not in ON_TIMEOUT:
            raise ValueError(f"on_timeout must be 'stop', 'pause' or 'snapshot', not {on_timeout!r}")
        body["on_timeout"] = on_timeout
    if auto_resume is not None:
        if not isinstance(auto_resume, bool):
            raise ValueError(f"auto_resume must be True or False, not {auto_resume!r}")
        body["auto_resume"] = auto_resume
    if idle_timeout_ms is not None:
        body["idle_timeout_s"] = ms_to_s(idle_timeout_ms, "idle_timeout_ms")
    return body


def exec_body(
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
) -> ExecBody:
    if not isinstance(cmd, str) or not cmd:
        raise ValueError("cmd must be a non-empty string")
    if isinstance(args, str):
        raise ValueError("args is a list of strings, not one string")
    body: ExecBody = {"cmd": cmd}
    if args:
        body["args"] = [str(a) for a in args]
    if env:
        body["env"] = dict(env)
    if cwd is not None:
        body["cwd"] = cwd
    if sudo and user is not None and user != "root":
        raise ValueError("sudo=True runs as root: leave out user")
    if sudo:
        body["user"] = "root"
    elif user is not None:
        body["user"] = user
    if detached:
        body["detach"] = True
    if isinstance(stdin, str):
        body["stdin"] = stdin
    elif stdin is not None:
        body["stdin_base64"] = base64.b64encode(bytes(stdin)).decode("ascii")
    if timeout_ms is not None:
        body["timeout_s"] = ms_to_s(timeout_ms)
    return body


def kill_body(sig: SignalLike) -> KillBody:
    return {"signal": signal_number(sig)}


def mkdir_body(path: str, mode: Union[int, str, None] = None) -> MkdirBody:
    body: MkdirBody = {"path": path}
    text = file_mode(mode)
    if text is not None:
        body["mode"] = int(text, 8)
    return body


def snapshot_body(name: Optional[str] = None, *, stop: bool = False) -> SnapshotBody:
    body: SnapshotBody = {}
    if name is not None:
        body["name"] = name
    if stop:
        body["stop"] = True
    return body


def timeout_body(timeout_s: int) -> TimeoutBody:
    return {"timeout_s": timeout_s}


def fork_body(
    count: int,
    *,
    timeout_ms: Optional[float] = None,
    env: Optional[Mapping[str, str]] = None,
    ports: Optional[Sequence[int]] = None,
    network: Optional[NetworkMode] = None,
) -> ForkBody:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer, not {count!r}")
    body: ForkBody = {"count": count}
    if timeout_ms is not None:
        body["timeout_s"] = ms_to_s(timeout_ms)
    if env:
        body["env"] = dict(env)
    if ports:
        body["ports"] = [int(p) for p in ports]
    if network is not None:
        body["network"] = network
    return body


def network_of(info: SandboxInfo) -> Optional[NetworkMode]:
    """The ``network`` that gives a fork the network ``info`` has."""
    net = info.get("network")
    if not net or net.get("mode") != "egress":
        return None
    egress: NetworkModeEgress = {"mode": "egress"}
    allow = net.get("allow")
    if allow:
        egress["allow"] = list(allow)
    return egress


def domain_of(info: SandboxInfo, port: int) -> Optional[str]:
    """``http://HOST:PORT`` where the host reaches guest ``port`` (``None``: not exposed)."""
    for exposed in info.get("ports", []):
        if exposed.get("guest_port") == port:
            return f"http://{exposed['host']}"
    return None


# --- files -----------------------------------------------------------------------------------

FileContent = Union[str, bytes, bytearray, memoryview, IO[bytes], Iterable[bytes]]

CHUNK = 1 << 16


def file_body(content: object) -> Union[bytes, Iterator[bytes]]:
    """A PUT body: bytes as they are, text as UTF-8, a binary file or iterable streamed."""
    if isinstance(content, str):
        return content.encode("utf-8")
    if isinstance(content, (bytes, bytearray, memoryview)):
        return bytes(content)
    read = getattr(content, "read", None)
    if callable(read):
        return _read_chunks(cast(IO[bytes], content))
    if isinstance(content, Iterable):
        return _checked_chunks(cast(Iterable[bytes], content))
    raise TypeError(f"file content must be str, bytes, a binary file or bytes chunks: {content!r}")


def _read_chunks(f: IO[bytes]) -> Iterator[bytes]:
    while True:
        chunk: object = f.read(CHUNK)
        if not chunk:
            return
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise TypeError("file content must be opened in binary mode ('rb')")
        yield bytes(chunk)


def _checked_chunks(chunks: Iterable[bytes]) -> Iterator[bytes]:
    for chunk in chunks:
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise TypeError(f"file content chunks must be bytes, not {type(chunk).__name__}")
        yield bytes(chunk)


def file_entries(
    files: Iterable[Union[Mapping[str, object], tuple[str, object]]],
) -> list[tuple[str, object, Optional[str]]]:
    """``(path, content, mode)`` for ``write_files``' forms: dicts or ``(path, content)``
    (the content is checked when it is sent)."""
    out: list[tuple[str, object, Optional[str]]] = []
    for entry in files:
        path: object
        content: object
        mode: Optional[str]
        if isinstance(entry, tuple):
            if len(entry) != 2:
                raise ValueError("a file tuple is (path, content)")
            path, content = entry
            mode = None
        elif isinstance(entry, Mapping):
            path = entry.get("path")
            content = entry.get("content")
            raw_mode = entry.get("mode")
            if raw_mode is not None and not isinstance(raw_mode, (int, str)):
                raise ValueError(f"mode must be an int or octal text, not {raw_mode!r}")
            mode = file_mode(raw_mode)
        else:
            raise TypeError(f"a file is {{'path', 'content'}} or (path, content), not {entry!r}")
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"file paths are absolute guest paths, not {path!r}")
        if content is None:
            raise ValueError(f"no content for {path}")
        out.append((path, content, mode))
    return out


def parent_dir(path: str) -> Optional[str]:
    parent = path.rstrip("/").rsplit("/", 1)[0]
    return parent or None


#: The response header that says a request resumed its sandbox first (``pause`` or
#: ``snapshot``: how its ``on_timeout`` had suspended it).
RESUMED_HEADER = "ember-resumed"


def resumed_from(headers: Mapping[str, str]) -> Optional[ResumedHow]:
    """How an answer's request resumed its sandbox (``ember-resumed``); ``None``: it did not.
    ``headers`` is httpx's (case-insensitive) ``Headers``."""
    value = (headers.get(RESUMED_HEADER) or "").strip().lower()
    if value == "pause":
        return "pause"
    if value == "snapshot":
        return "snapshot"
    return None


def is_missing_sandbox(err: EmberError) -> bool:
    """A 404 about the sandbox itself (not a file in it)."""
    return isinstance(err, NotFoundError) and err.message.startswith("no sandbox")


# --- output stream ---------------------------------------------------------------------------


class NdjsonDecoder:
    """Splits a byte stream into JSON lines, whatever the chunks' boundaries."""

    def __init__(self) -> None:
        self._pending = bytearray()

    def feed(self, chunk: bytes) -> list[OutputRecord]:
        self._pending.extend(chunk)
        records: list[OutputRecord] = []
        while True:
            end = self._pending.find(b"\n")
            if end < 0:
                return records
            line = bytes(self._pending[:end])
            del self._pending[: end + 1]
            if line.strip():
                records.append(parse_record(line))

    def close(self) -> list[OutputRecord]:
        """The last line when the stream did not end with a newline."""
        line = bytes(self._pending)
        self._pending.clear()
        return [parse_record(line)] if line.strip() else []


def parse_record(line: bytes) -> OutputRecord:
    try:
        value = json.loads(line)
    except (UnicodeDecodeError, ValueError) as e:
        raise EmberError(f"a malformed output record: {line[:200]!r}", code="bad_stream") from e
    if not isinstance(value, dict) or value.get("type") not in (
        "started",
        "stdout",
        "stderr",
        "exit",
    ):
        raise EmberError(f"an unknown output record: {line[:200]!r}", code="bad_stream")
    return cast(OutputRecord, value)


def record_bytes(data: Optional[str], data_base64: Optional[str]) -> bytes:
    if data_base64 is not None:
        try:
            return base64.b64decode(data_base64, validate=True)
        except (binascii.Error, ValueError) as e:
            raise EmberError("an output record's base64 is invalid", code="bad_stream") from e
    return (data or "").encode("utf-8")


class ExecState:
    """A command's stream as far as it has come: its id, output and exit."""

    def __init__(self) -> None:
        self.cmd_id: Optional[str] = None
        self.pid: Optional[int] = None
        self.output = CapturedOutput()
        self.exit: Optional[ExitStatus] = None
        #: The answer's ``ember-resumed``: how the request resumed its sandbox, if it did.
        self.resumed: Optional[ResumedHow] = None

    def feed(self, record: OutputRecord) -> Optional[LogLine]:
        """Takes one record; the output it carries, if any."""
        if record["type"] == "started":
            self.cmd_id = record["cmd_id"]
            self.pid = record.get("pid")
            return None
        if record["type"] == "exit":
            self.exit = ExitStatus(
                exit_code=record.get("exit_code"),
                signal=record.get("signal"),
                timed_out=bool(record.get("timed_out", False)),
                error=record.get("error"),
                duration_ms=record.get("duration_ms"),
            )
            return None
        stream: StreamName = "stdout" if record["type"] == "stdout" else "stderr"
        data = record_bytes(record.get("data"), record.get("data_base64"))
        if not data:
            return None
        line = LogLine(stream, data)
        self.output.add(line)
        return line

    def require_exit(self) -> ExitStatus:
        if self.exit is None:
            raise EmberConnectionError(
                "the command's output stream ended before its exit record",
                code="stream_incomplete",
            )
        return self.exit


# --- output sinks ----------------------------------------------------------------------------


class SupportsWrite(Protocol):
    def write(self, data: bytes, /) -> object: ...


#: ``on_stdout``/``on_stderr``: a callable taking each piece's bytes, a binary writer
#: (``sys.stdout.buffer``) or a text writer (``sys.stdout``, decoded as UTF-8).
Sink = Union[Callable[[bytes], object], SupportsWrite, IO[str], io.TextIOBase]


class SinkWriter:
    """Delivers output to a sink, decoding for text writers across pieces."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink
        self._text = isinstance(sink, io.TextIOBase) or (
            hasattr(sink, "write") and hasattr(sink, "encoding") and not hasattr(sink, "raw")
        )
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, data: bytes) -> object:
        sink = self._sink
        write = getattr(sink, "write", None)
        if write is not None and callable(write):
            result = write(self._decoder.decode(data)) if self._text else write(data)
            flush = getattr(sink, "flush", None)
            if callable(flush):
                flush()
            return result
        if callable(sink):
            return sink(data)
        raise TypeError(f"an output sink is a callable or a writer, not {sink!r}")

    def finish(self) -> None:
        if self._text:
            rest = self._decoder.decode(b"", final=True)
            write = getattr(self._sink, "write", None)
            if rest and callable(write):
                write(rest)

"""Plain data types shared by the sync and async APIs."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Optional, Protocol, Union

StreamName = Literal["stdout", "stderr"]

#: How a sandbox had been suspended by its ``on_timeout`` when a request resumed it (the
#: ``ember-resumed`` response header).
ResumedHow = Literal["pause", "snapshot"]


@dataclass(frozen=True)
class LogLine:
    """A piece of a command's output as it arrived: ``stream`` and its bytes.

    ``data`` is exact (non-UTF-8 output survives); ``text`` decodes it as UTF-8 (invalid
    bytes replaced). Pieces are not split at newlines: a piece is what the guest wrote.
    """

    stream: StreamName
    data: bytes

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class SnapshotSource:
    """``Sandbox.create(source=SnapshotSource("snap-..."))``: restore a snapshot."""

    snapshot_id: str
    type: Literal["snapshot"] = field(default="snapshot", init=False)


@dataclass(frozen=True)
class TemplateSource:
    """``Sandbox.create(source=TemplateSource("my-template"))``: restore a template's snapshot."""

    name: str
    type: Literal["template"] = field(default="template", init=False)


@dataclass(frozen=True)
class AllowList:
    """``network_policy=AllowList(["10.0.0.0/8", "*.example.com"])``: egress to these networks
    and names only (a name: the addresses it resolves to, for their TTL), never to ``deny``'s.
    ``AllowList(None, deny=[...])``: any public address but ``deny``'s."""

    allow: Optional[Sequence[str]]
    deny: Sequence[str] = ()


@dataclass
class CapturedOutput:
    """A command's output in arrival order, both streams."""

    chunks: list[LogLine] = field(default_factory=list)

    def add(self, line: LogLine) -> None:
        self.chunks.append(line)

    def bytes_of(self, stream: StreamName) -> bytes:
        return b"".join(c.data for c in self.chunks if c.stream == stream)

    def __iter__(self) -> Iterator[LogLine]:
        return iter(list(self.chunks))


@dataclass(frozen=True)
class ExitStatus:
    """How a command ended."""

    #: Its exit code (``None`` when a signal ended it or the end is unknown).
    exit_code: Optional[int]
    #: The signal that ended it.
    signal: Optional[int]
    #: Its ``timeout_ms`` ran out (it was killed).
    timed_out: bool
    #: Why its end is unknown (the service lost the guest agent).
    error: Optional[str]
    duration_ms: Optional[float]


class HasSnapshotId(Protocol):
    """Anything with a ``snapshot_id`` (a ``Snapshot``) can be a source."""

    @property
    def snapshot_id(self) -> str: ...


#: What ``Sandbox.create(source=...)`` takes: a source object, a ``Snapshot``, or a dict
#: ``{"type": "snapshot", "snapshot_id": ...}`` / ``{"type": "template", "name": ...}``.
SourceLike = Union[SnapshotSource, TemplateSource, HasSnapshotId, Mapping[str, str]]

#: ``None`` or ``"deny-all"``: no network; ``"allow-all"``: egress to public addresses;
#: ``AllowList([...], deny=[...])`` or ``{"allow": [...], "deny": [...]}``: egress to those
#: networks and names only, never to the denied ones.
NetworkPolicy = Union[Literal["allow-all", "deny-all"], AllowList, Mapping[str, Sequence[str]]]

"""ember: microVM sandboxes. The Python SDK of the ember service.

    from ember_sandbox import Sandbox

    with Sandbox.create() as sandbox:
        result = sandbox.run_command("python3", ["-c", "print(44 * 44)"])
        print(result.stdout())  # 1936

``AsyncSandbox`` is the same API for asyncio. The connection comes from ``EMBER_SOCKET`` (a
Unix socket), or ``EMBER_URL`` + ``EMBER_TOKEN`` (+ ``EMBER_CA_FILE``), or the ``socket=`` /
``url=``, ``token=``, ``ca=`` options.
"""

from ._api_types import (
    CommandInfo,
    GuestMetrics,
    HostMetrics,
    OnTimeout,
    SandboxInfo,
    SandboxMetrics,
    Suspension,
)
from ._async import (
    AsyncCancelToken,
    AsyncCommand,
    AsyncCommandFinished,
    AsyncReadStream,
    AsyncSandbox,
    AsyncSnapshot,
)
from ._config import Connection, resolve_connection
from ._core import Sink
from ._errors import (
    AuthenticationError,
    BadRequestError,
    ConflictError,
    EmberConfigError,
    EmberConnectionError,
    EmberError,
    NotFoundError,
    RateLimitError,
    ServerError,
)
from ._models import (
    AllowList,
    ExitStatus,
    LogLine,
    NetworkPolicy,
    ResumedHow,
    SnapshotSource,
    SourceLike,
    TemplateSource,
)
from ._sync import CancelToken, Command, CommandFinished, ReadStream, Sandbox, Snapshot
from ._version import __version__

__all__ = [
    "AllowList",
    "AsyncCancelToken",
    "AsyncCommand",
    "AsyncCommandFinished",
    "AsyncReadStream",
    "AsyncSandbox",
    "AsyncSnapshot",
    "AuthenticationError",
    "BadRequestError",
    "CancelToken",
    "Command",
    "CommandFinished",
    "CommandInfo",
    "ConflictError",
    "Connection",
    "EmberConfigError",
    "EmberConnectionError",
    "EmberError",
    "ExitStatus",
    "GuestMetrics",
    "HostMetrics",
    "LogLine",
    "NetworkPolicy",
    "NotFoundError",
    "OnTimeout",
    "RateLimitError",
    "ReadStream",
    "ResumedHow",
    "Sandbox",
    "SandboxInfo",
    "SandboxMetrics",
    "ServerError",
    "Sink",
    "Snapshot",
    "SnapshotSource",
    "SourceLike",
    "Suspension",
    "TemplateSource",
    "__version__",
    "resolve_connection",
]

"""The one table of API operations the SDK calls: every request goes through it.

A unit test checks each entry against ``api/openapi.json``: the path exists with that method,
the query parameters are the spec's, ``body`` names the schema of its JSON request body and
``raw_body`` the content type of a raw one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional
from urllib.parse import quote

Method = Literal["GET", "POST", "PUT", "PATCH", "DELETE"]


@dataclass(frozen=True)
class Operation:
    method: Method
    #: Path template with ``{name}`` parameters, as in the spec.
    path: str
    #: The schema of the JSON request body (``None``: no JSON body).
    body: Optional[str] = None
    #: Query parameters the SDK may send.
    query: tuple[str, ...] = ()
    #: The content type of a raw (non-JSON) request body.
    raw_body: Optional[str] = None

    def url(self, **params: str) -> str:
        """The path with its parameters filled in (each percent-encoded)."""
        path = self.path
        for name, value in params.items():
            token = "{" + name + "}"
            if token not in path:
                raise KeyError(f"{self.path} has no parameter {name!r}")
            path = path.replace(token, quote(value, safe=""))
        if "{" in path:
            raise KeyError(f"{self.path}: parameters missing")
        return path


OperationName = Literal[
    "healthz",
    "list_sandboxes",
    "create_sandbox",
    "get_sandbox",
    "delete_sandbox",
    "set_timeout",
    "update_policy",
    "sandbox_metrics",
    "exec",
    "list_commands",
    "get_command",
    "command_logs",
    "kill_command",
    "put_file",
    "get_file",
    "mkdir",
    "create_snapshot",
    "get_snapshot",
    "delete_snapshot",
    "fork",
]

OPERATIONS: dict[OperationName, Operation] = {
    "healthz": Operation("GET", "/healthz"),
    "list_sandboxes": Operation("GET", "/sandboxes"),
    "create_sandbox": Operation("POST", "/sandboxes", body="CreateBody"),
    "get_sandbox": Operation("GET", "/sandboxes/{id}"),
    "delete_sandbox": Operation("DELETE", "/sandboxes/{id}"),
    "set_timeout": Operation("POST", "/sandboxes/{id}/timeout", body="TimeoutBody"),
    "update_policy": Operation("PATCH", "/sandboxes/{id}/network", body="NetworkPolicy"),
    "sandbox_metrics": Operation("GET", "/sandboxes/{id}/metrics"),
    "exec": Operation("POST", "/sandboxes/{id}/exec", body="ExecBody"),
    "list_commands": Operation("GET", "/sandboxes/{id}/commands"),
    "get_command": Operation("GET", "/sandboxes/{id}/commands/{cid}"),
    "command_logs": Operation("GET", "/sandboxes/{id}/commands/{cid}/logs"),
    "kill_command": Operation("POST", "/sandboxes/{id}/commands/{cid}/kill", body="KillBody"),
    "put_file": Operation(
        "PUT", "/sandboxes/{id}/files", query=("path", "mode"), raw_body="application/octet-stream"
    ),
    "get_file": Operation("GET", "/sandboxes/{id}/files", query=("path",)),
    "mkdir": Operation("POST", "/sandboxes/{id}/files/mkdir", body="MkdirBody"),
    "create_snapshot": Operation("POST", "/sandboxes/{id}/snapshots", body="SnapshotBody"),
    "get_snapshot": Operation("GET", "/snapshots/{id}"),
    "delete_snapshot": Operation("DELETE", "/snapshots/{id}"),
    "fork": Operation("POST", "/snapshots/{id}/fork", body="ForkBody"),
}

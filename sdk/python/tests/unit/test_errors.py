"""Error mapping: every non-2xx answer becomes a typed error with code, status and message."""

from __future__ import annotations

import asyncio
import os
import tempfile

import pytest

from ember_sandbox import (
    AsyncSandbox,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    EmberConfigError,
    EmberConnectionError,
    EmberError,
    NotFoundError,
    RateLimitError,
    Sandbox,
    ServerError,
)
from ember_sandbox._errors import error_from_response, parse_retry_after

from .fake_server import FakeEmber, FakeService, Reply, error


def doc(code: str, message: str) -> bytes:
    return f'{{"error": {{"code": "{code}", "message": "{message}"}}}}'.encode()


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (400, "invalid_json", BadRequestError),
        (400, "invalid_request", BadRequestError),
        (401, "unauthorized", AuthenticationError),
        (403, "permission_denied", EmberError),
        (404, "not_found", NotFoundError),
        (405, "method_not_allowed", EmberError),
        (409, "conflict", ConflictError),
        (413, "too_large", BadRequestError),
        (422, "template_failed", BadRequestError),
        (429, "too_many_sandboxes", RateLimitError),
        (500, "internal", ServerError),
        (502, "agent_unreachable", ServerError),
        (503, "remote_unavailable", ServerError),
    ],
)
def test_statuses_map_to_typed_errors(status: int, code: str, kind: type[EmberError]) -> None:
    err = error_from_response(status, doc(code, "why"), {})
    assert type(err) is kind
    assert (err.status, err.code, err.message) == (status, code, "why")
    assert str(err) == f"{status} {code}: why"


def test_rate_limits_carry_retry_after() -> None:
    err = error_from_response(429, doc("rate_limited", "slow down"), {"Retry-After": "7"})
    assert isinstance(err, RateLimitError) and err.retry_after == 7.0
    assert parse_retry_after("1.5") == 1.5
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert parse_retry_after(None) is None


def test_a_body_that_is_not_an_error_document() -> None:
    err = error_from_response(502, b"<html>bad gateway</html>", {})
    assert isinstance(err, ServerError)
    assert err.code == "http_502" and "bad gateway" in err.message
    empty = error_from_response(404, b"", {})
    assert isinstance(empty, NotFoundError) and empty.message


def test_errors_from_a_service(service: FakeService) -> None:
    service.reply("POST", "/sandboxes", Reply(
        429, {"error": {"code": "rate_limited", "message": "over"}}, headers={"Retry-After": "3"}
    ))
    with pytest.raises(RateLimitError) as limited:
        Sandbox.create()
    assert limited.value.retry_after == 3.0 and limited.value.status == 429
    with pytest.raises(NotFoundError) as missing:
        Sandbox.get("no-such-id")
    assert missing.value.code == "not_found" and missing.value.status == 404
    service.reply("GET", "/sandboxes/locked", error(401, "unauthorized", "no token"))
    with pytest.raises(AuthenticationError) as auth:
        Sandbox.get("locked")
    assert auth.value.status == 401


def test_a_missing_socket_is_a_connection_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMBER_URL", raising=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "nothing.sock")
        with pytest.raises(EmberConnectionError) as info:
            Sandbox.get("x", socket=path)
        assert info.value.code == "connection_failed" and info.value.status is None
        assert isinstance(info.value, ConnectionError)  # the built-in one too
        with pytest.raises(EmberConnectionError):
            asyncio.run(AsyncSandbox.get("x", socket=path))


def test_no_service_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("EMBER_URL", "EMBER_SOCKET", "EMBER_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(EmberConfigError) as info:
        Sandbox.create()
    assert "no ember service configured" in str(info.value)


def test_a_sandbox_that_is_gone_is_not_a_missing_file(service: FakeService) -> None:
    sb = Sandbox.create()
    assert sb.read_file("/no/such/file") is None
    service.sandboxes.clear()
    with pytest.raises(NotFoundError):
        sb.read_file("/etc/hostname")
    with pytest.raises(NotFoundError):
        sb.run_command("echo")
    sb.stop()  # already gone: fine
    sb.close()


def test_a_stopped_sandbox_refuses_commands(service: FakeService) -> None:
    sb = Sandbox.create()
    service.sandboxes[sb.sandbox_id]["state"] = "stopped"
    with pytest.raises(ConflictError):
        sb.run_command("echo")
    sb.close()


def test_a_broken_stream_is_a_connection_error() -> None:
    # No exit record: the stream just ends.
    bare = FakeEmber()
    bare.reply("POST", "/sandboxes/sb/exec", Reply(
        200, stream=[b'{"type":"started","cmd_id":"c1"}\n', b'{"type":"stdout","data":"x"}\n']
    ))
    bare.reply("GET", "/sandboxes/sb", Reply(200, {"id": "sb", "state": "running"}))
    with bare:
        sb = Sandbox.get("sb", socket=bare.socket_path)
        with pytest.raises(EmberConnectionError) as info:
            sb.run_command("anything")
        assert info.value.code == "stream_incomplete"
        sb.close()


def test_a_short_download_is_an_error() -> None:
    bare = FakeEmber()
    bare.reply("GET", "/sandboxes/sb", Reply(200, {"id": "sb", "state": "running"}))
    bare.reply("GET", "/sandboxes/sb/files", Reply(200, headers={"x-file-size": "10"},
                                                     stream=[b"12345"]))
    with bare:
        sb = Sandbox.get("sb", socket=bare.socket_path)
        with pytest.raises(EmberError) as info:
            sb.read_file_bytes("/file")
        assert info.value.code == "incomplete_read"

        async def main() -> None:
            asb = await AsyncSandbox.get("sb", socket=bare.socket_path)
            with pytest.raises(EmberError):
                await asb.read_file_bytes("/file")
            await asb.aclose()

        asyncio.run(main())
        sb.close()


def test_reading_a_folder_is_a_conflict(service: FakeService) -> None:
    service.route("GET", "/sandboxes/[^/]+/files",
                  lambda req, m: error(409, "conflict", "/tmp is not a regular file (Dir)"))
    with Sandbox.create() as sb:
        with pytest.raises(ConflictError):
            sb.read_file("/tmp")

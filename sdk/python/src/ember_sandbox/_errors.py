"""Typed errors: every non-2xx answer of the API is ``{"error": {"code", "message"}}``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Optional


class EmberError(Exception):
    """An error of the ember service (or of reaching it).

    ``code`` is the API's stable machine-readable code (``not_found``, ``conflict``,
    ``invalid_json``, ...), ``status`` the HTTP status (``None`` when there was no answer) and
    ``message`` the text for people.
    """

    def __init__(self, message: str, *, code: str = "error", status: Optional[int] = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status

    def __str__(self) -> str:
        where = f"{self.status} " if self.status is not None else ""
        return f"{where}{self.code}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, status={self.status!r}, "
            f"message={self.message!r})"
        )


class BadRequestError(EmberError):
    """400, 413 or 422: the request was refused as it is (malformed, too large, invalid)."""


class AuthenticationError(EmberError):
    """401: a missing or wrong token (remote access)."""


class NotFoundError(EmberError):
    """404: no such sandbox, command, snapshot, template, runtime or guest file."""


class ConflictError(EmberError):
    """409: the sandbox is not running, the command has finished, a name is taken, ..."""


class RateLimitError(EmberError):
    """429: too many requests or sandboxes; ``retry_after`` is in seconds when the service
    said (``Retry-After``)."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "rate_limited",
        status: Optional[int] = 429,
        retry_after: Optional[float] = None,
    ) -> None:
        super().__init__(message, code=code, status=status)
        self.retry_after = retry_after


class ServerError(EmberError):
    """5xx: the service, the sandbox's VMM or its guest agent failed."""


class EmberConnectionError(EmberError, ConnectionError):
    """The service could not be reached, or a streamed answer broke off
    (``code`` ``connection_failed``). Also a built-in ``ConnectionError``."""

    def __init__(
        self, message: str, *, code: str = "connection_failed", status: Optional[int] = None
    ) -> None:
        super().__init__(message, code=code, status=status)


class EmberConfigError(EmberError):
    """No ember service is configured (no ``EMBER_URL`` or ``EMBER_SOCKET``, no option)."""

    def __init__(self, message: str, *, code: str = "not_configured") -> None:
        super().__init__(message, code=code, status=None)


def parse_retry_after(value: Optional[str]) -> Optional[float]:
    """``Retry-After`` in seconds (the service sends delta-seconds; an HTTP date is ignored)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def error_from_response(
    status: int, body: bytes, headers: Optional[Mapping[str, str]] = None
) -> EmberError:
    """The typed error for a non-2xx answer."""
    code = f"http_{status}"
    message = ""
    try:
        document = json.loads(body.decode("utf-8")) if body else None
    except (UnicodeDecodeError, ValueError):
        document = None
    if isinstance(document, dict) and isinstance(document.get("error"), dict):
        error = document["error"]
        if isinstance(error.get("code"), str):
            code = error["code"]
        if isinstance(error.get("message"), str):
            message = error["message"]
    elif body:
        message = body.decode("utf-8", errors="replace").strip()[:2000]
    if not message:
        message = f"the service answered HTTP {status}"
    if status in (400, 413, 422):
        return BadRequestError(message, code=code, status=status)
    if status == 401:
        return AuthenticationError(message, code=code, status=status)
    if status == 404:
        return NotFoundError(message, code=code, status=status)
    if status == 409:
        return ConflictError(message, code=code, status=status)
    if status == 429:
        retry = None
        if headers is not None:
            retry = parse_retry_after(_header(headers, "retry-after"))
        return RateLimitError(message, code=code, status=status, retry_after=retry)
    if status >= 500:
        return ServerError(message, code=code, status=status)
    return EmberError(message, code=code, status=status)


def _header(headers: Mapping[str, str], name: str) -> Optional[str]:
    value = headers.get(name)
    if value is not None:
        return value
    for key, item in headers.items():
        if key.lower() == name:
            return item
    return None

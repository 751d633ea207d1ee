"""HTTP through the operations table: one sync and one async client over httpx, each mapping
non-2xx answers and transport failures to the typed errors."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator, Mapping
from typing import Any, Optional, Union

import httpx

from ._config import Connection
from ._errors import EmberConnectionError, EmberError, error_from_response
from ._operations import OPERATIONS, OperationName

JsonBody = Mapping[str, Any]
Content = Union[bytes, Iterator[bytes]]
AsyncContent = Union[bytes, Iterator[bytes], AsyncIterator[bytes]]


def _request(
    client: Union[httpx.Client, httpx.AsyncClient],
    op: OperationName,
    path: Mapping[str, str],
    query: Optional[Mapping[str, str]],
    json: Optional[JsonBody],
    content: Optional[AsyncContent],
) -> httpx.Request:
    operation = OPERATIONS[op]
    if json is not None and operation.body is None:
        raise ValueError(f"{op} takes no JSON body")
    if content is not None and operation.raw_body is None:
        raise ValueError(f"{op} takes no raw body")
    if query:
        unknown = set(query) - set(operation.query)
        if unknown:
            raise ValueError(f"{op} takes no query parameter {sorted(unknown)}")
    headers = {"content-type": operation.raw_body} if operation.raw_body is not None else None
    return client.build_request(
        operation.method,
        operation.url(**path),
        params=dict(query) if query else None,
        json=json,
        content=content,
        headers=headers,
    )


def _transport_error(e: Exception, where: str) -> EmberConnectionError:
    return EmberConnectionError(f"{where}: {type(e).__name__}: {e}")


def _send_failed(
    e: Exception, request: httpx.Request, connection: Connection
) -> EmberConnectionError:
    """A request that never got an answer, named with where it was going."""
    return _transport_error(e, f"{request.method} {request.url.path} via {connection.describe()}")


class SyncHttp:
    """The blocking client of one connection (thread-safe: httpx pools connections)."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._client = connection.sync_client()

    def close(self) -> None:
        self._client.close()

    @classmethod
    def opening(
        cls,
        connection: Connection,
        op: OperationName,
        *,
        path: Optional[Mapping[str, str]] = None,
        json: Optional[JsonBody] = None,
    ) -> tuple[SyncHttp, Any]:
        """A new client and its first request's JSON answer; the client is closed when that
        request fails, so a failed ``create`` or ``get`` leaves no connection open."""
        http = cls(connection)
        try:
            return http, http.request(op, path=path, json=json).json()
        except BaseException:
            http.close()
            raise

    def request(
        self,
        op: OperationName,
        *,
        path: Optional[Mapping[str, str]] = None,
        query: Optional[Mapping[str, str]] = None,
        json: Optional[JsonBody] = None,
        content: Optional[Content] = None,
    ) -> httpx.Response:
        """Sends and reads the whole answer; raises the typed error for a non-2xx one."""
        request = _request(self._client, op, path or {}, query, json, content)
        try:
            response = self._client.send(request)
        except httpx.TransportError as e:
            raise _send_failed(e, request, self.connection) from e
        if response.status_code >= 400:
            raise error_from_response(response.status_code, response.content, response.headers)
        return response

    def stream(
        self,
        op: OperationName,
        *,
        path: Optional[Mapping[str, str]] = None,
        query: Optional[Mapping[str, str]] = None,
        json: Optional[JsonBody] = None,
    ) -> httpx.Response:
        """Sends and returns the answer with its body unread (close it); a non-2xx answer is
        read, closed and raised."""
        request = _request(self._client, op, path or {}, query, json, None)
        try:
            response = self._client.send(request, stream=True)
        except httpx.TransportError as e:
            raise _send_failed(e, request, self.connection) from e
        if response.status_code >= 400:
            try:
                body = response.read()
            except httpx.TransportError:
                body = b""
            finally:
                response.close()
            raise error_from_response(response.status_code, body, response.headers)
        return response


def iter_body(response: httpx.Response) -> Generator[bytes, None, None]:
    """The body's chunks as they arrive; a broken-off body raises ``EmberConnectionError``."""
    try:
        yield from response.iter_bytes()
    except httpx.TransportError as e:
        raise _transport_error(e, "reading the answer") from e
    except httpx.StreamError as e:
        raise EmberError(f"reading the answer: {e}", code="stream_error") from e


class AsyncHttp:
    """The asyncio client of one connection (bound to the event loop that uses it)."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._client = connection.async_client()

    async def aclose(self) -> None:
        await self._client.aclose()

    @classmethod
    async def opening(
        cls,
        connection: Connection,
        op: OperationName,
        *,
        path: Optional[Mapping[str, str]] = None,
        json: Optional[JsonBody] = None,
    ) -> tuple[AsyncHttp, Any]:
        """As ``SyncHttp.opening``."""
        http = cls(connection)
        try:
            return http, (await http.request(op, path=path, json=json)).json()
        except BaseException:
            await http.aclose()
            raise

    async def request(
        self,
        op: OperationName,
        *,
        path: Optional[Mapping[str, str]] = None,
        query: Optional[Mapping[str, str]] = None,
        json: Optional[JsonBody] = None,
        content: Optional[AsyncContent] = None,
    ) -> httpx.Response:
        request = _request(self._client, op, path or {}, query, json, content)
        try:
            response = await self._client.send(request)
        except httpx.TransportError as e:
            raise _send_failed(e, request, self.connection) from e
        if response.status_code >= 400:
            raise error_from_response(response.status_code, response.content, response.headers)
        return response

    async def stream(
        self,
        op: OperationName,
        *,
        path: Optional[Mapping[str, str]] = None,
        query: Optional[Mapping[str, str]] = None,
        json: Optional[JsonBody] = None,
    ) -> httpx.Response:
        request = _request(self._client, op, path or {}, query, json, None)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TransportError as e:
            raise _send_failed(e, request, self.connection) from e
        if response.status_code >= 400:
            try:
                body = await response.aread()
            except httpx.TransportError:
                body = b""
            finally:
                await response.aclose()
            raise error_from_response(response.status_code, body, response.headers)
        return response


async def aiter_body(response: httpx.Response) -> AsyncGenerator[bytes, None]:
    try:
        async for chunk in response.aiter_bytes():
            yield chunk
    except httpx.TransportError as e:
        raise _transport_error(e, "reading the answer") from e
    except httpx.StreamError as e:
        raise EmberError(f"reading the answer: {e}", code="stream_error") from e

"""Where the service is: explicit options > ``EMBER_URL`` (+ ``EMBER_TOKEN``) > ``EMBER_SOCKET``."""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional, Union

import httpx

from ._version import __version__
from ._errors import EmberConfigError

#: The base URL used on a Unix socket (the service ignores the host).
SOCKET_BASE_URL = "http://ember"

USER_AGENT = f"ember-sandbox-python/{__version__}"

#: Connection attempts retried (a connection that failed carried no request: safe to retry).
CONNECT_RETRIES = 2


@dataclass(frozen=True)
class Connection:
    """A resolved connection: a Unix socket, or a URL with an optional token and CA."""

    socket: Optional[str] = None
    url: Optional[str] = None
    token: Optional[str] = None
    #: PEM text or a path to a PEM file to trust (remote only).
    ca: Optional[str] = None

    @property
    def base_url(self) -> str:
        return self.url.rstrip("/") if self.url else SOCKET_BASE_URL

    def headers(self) -> dict[str, str]:
        headers = {"user-agent": USER_AGENT}
        if self.url and self.token:
            headers["authorization"] = f"Bearer {self.token}"
        return headers

    def ssl_context(self) -> Optional[ssl.SSLContext]:
        """The context that trusts ``ca`` (``None``: the system's trust store)."""
        if not self.ca:
            return None
        if "-----BEGIN" in self.ca:
            return ssl.create_default_context(cadata=self.ca)
        return ssl.create_default_context(cafile=self.ca)

    def describe(self) -> str:
        return f"unix:{self.socket}" if self.socket and not self.url else self.base_url

    def timeout(self) -> httpx.Timeout:
        # Starting a sandbox, a snapshot and a command's output can take long: only the
        # connection has a limit.
        return httpx.Timeout(connect=30.0, read=None, write=None, pool=None)

    def verify(self) -> Union[ssl.SSLContext, bool]:
        context = self.ssl_context()
        return context if context is not None else True

    def sync_client(self) -> httpx.Client:
        if self.url:
            transport = httpx.HTTPTransport(verify=self.verify(), retries=CONNECT_RETRIES)
        else:
            transport = httpx.HTTPTransport(uds=self.socket, retries=CONNECT_RETRIES)
        return httpx.Client(
            base_url=self.base_url,
            headers=self.headers(),
            transport=transport,
            timeout=self.timeout(),
            trust_env=False,
        )

    def async_client(self) -> httpx.AsyncClient:
        if self.url:
            atransport = httpx.AsyncHTTPTransport(verify=self.verify(), retries=CONNECT_RETRIES)
        else:
            atransport = httpx.AsyncHTTPTransport(uds=self.socket, retries=CONNECT_RETRIES)
        return httpx.AsyncClient(
            base_url=self.base_url,
            headers=self.headers(),
            transport=atransport,
            timeout=self.timeout(),
            trust_env=False,
        )


def resolve_connection(
    *,
    socket: Optional[str] = None,
    url: Optional[str] = None,
    token: Optional[str] = None,
    ca: Optional[str] = None,
    environ: Optional[Mapping[str, str]] = None,
) -> Connection:
    """The connection the options and the environment say.

    Explicit options win (``url`` over ``socket``); then ``EMBER_URL`` with ``EMBER_TOKEN``
    and ``EMBER_CA_FILE``; then ``EMBER_SOCKET``. ``token`` and ``ca`` given as options also
    apply to an ``EMBER_URL`` from the environment. A ``url`` given as an option uses only the
    ``token`` and ``ca`` given with it (``EMBER_TOKEN`` is never sent to a URL the
    environment did not name).
    """
    env = os.environ if environ is None else environ

    def var(name: str) -> Optional[str]:
        value = env.get(name)
        return value if value else None

    if url:
        return Connection(url=url, token=token, ca=ca)
    if socket:
        return Connection(socket=socket)
    env_url = var("EMBER_URL")
    if env_url:
        return Connection(
            url=env_url, token=token or var("EMBER_TOKEN"), ca=ca or var("EMBER_CA_FILE")
        )
    env_socket = var("EMBER_SOCKET")
    if env_socket:
        return Connection(socket=env_socket)
    raise EmberConfigError(
        "no ember service configured: set EMBER_SOCKET (a Unix socket) or EMBER_URL and "
        "EMBER_TOKEN, or pass socket=... / url=..., token=..."
    )

"""Fixtures of the unit tests: a fake ember service on a temporary Unix socket."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ember_sandbox import Sandbox

from .fake_server import FakeService


@pytest.fixture
def service(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeService]:
    """A fresh fake service; ``EMBER_SOCKET`` points at it (and no other ember variable is set)."""
    for name in ("EMBER_URL", "EMBER_TOKEN", "EMBER_CA_FILE", "EMBER_SOCKET"):
        monkeypatch.delenv(name, raising=False)
    with FakeService() as fake:
        monkeypatch.setenv("EMBER_SOCKET", fake.socket_path)
        yield fake


@pytest.fixture
def sandbox(service: FakeService) -> Iterator[Sandbox]:
    sb = Sandbox.create()
    yield sb
    sb.close()

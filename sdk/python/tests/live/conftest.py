"""Fixtures of the live suite: a real ``ember serve`` named by ``EMBER_SOCKET`` (and, for the
remote tests, ``EMBER_URL``, ``EMBER_TOKEN``, ``EMBER_CA_FILE``). Without ``EMBER_SOCKET``
every test FAILS: a live suite that cannot reach a service must not pass by skipping."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from types import FrameType
from typing import Optional

import pytest

from ember_sandbox import Sandbox

#: Each test's limit, in seconds (sandboxes boot in seconds; a hang must not stall the run).
TEST_TIMEOUT_S = 400  # the lab runs guests 20-30x slower than hardware


def socket_path() -> str:
    path = os.environ.get("EMBER_SOCKET")
    if not path:
        pytest.fail(
            "EMBER_SOCKET is not set: the live suite runs against a real `ember serve` "
            "(EMBER_SOCKET=/path/to/api.sock; the remote tests also need EMBER_URL, "
            "EMBER_TOKEN and EMBER_CA_FILE)",
            pytrace=False,
        )
    return path


def remote_env() -> tuple[str, str, str]:
    """``(EMBER_URL, EMBER_TOKEN, EMBER_CA_FILE)``; fails the test when one is missing."""
    missing = [n for n in ("EMBER_URL", "EMBER_TOKEN", "EMBER_CA_FILE") if not os.environ.get(n)]
    if missing:
        pytest.fail(f"the remote tests need {', '.join(missing)}", pytrace=False)
    return os.environ["EMBER_URL"], os.environ["EMBER_TOKEN"], os.environ["EMBER_CA_FILE"]


class TimeLimitExceeded(Exception):
    pass


@pytest.fixture(autouse=True)
def _time_limit() -> Iterator[None]:
    """Fails a test that runs longer than ``TEST_TIMEOUT_S``."""

    def expire(signum: int, frame: Optional[FrameType]) -> None:
        raise TimeLimitExceeded(f"the test ran longer than {TEST_TIMEOUT_S} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_TIMEOUT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session")
def created() -> Iterator[list[Sandbox]]:
    """Every sandbox a test made, stopped at the end of the run whatever happened."""
    made: list[Sandbox] = []
    yield made
    for sandbox in made:
        try:
            sandbox.stop()
        except Exception as e:  # noqa: BLE001 - report and go on stopping the rest
            print(f"stopping {sandbox.sandbox_id}: {e}")
        finally:
            sandbox.close()


@pytest.fixture(scope="session")
def shared(created: list[Sandbox]) -> Sandbox:
    """One sandbox most tests share (booting is the slow part), over the Unix socket."""
    sandbox = Sandbox.create(socket=socket_path(), timeout_ms=30 * 60 * 1000, memory_mib=256)
    created.append(sandbox)
    return sandbox


@pytest.fixture
def sock() -> str:
    return socket_path()

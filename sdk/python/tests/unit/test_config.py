"""Where the SDK connects: explicit options > EMBER_URL (+ token) > EMBER_SOCKET."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import tempfile

import pytest

from ember_sandbox import (
    AuthenticationError,
    EmberConfigError,
    EmberConnectionError,
    Sandbox,
    resolve_connection,
)

from .fake_server import FakeService


def test_precedence() -> None:
    env = {
        "EMBER_URL": "https://env:7443",
        "EMBER_TOKEN": "env-token",
        "EMBER_CA_FILE": "/env/ca.pem",
        "EMBER_SOCKET": "/env/api.sock",
    }
    # Explicit options win: a URL over a socket, and a URL option uses only its own token.
    c = resolve_connection(url="https://opt:1", socket="/opt.sock", environ=env)
    assert (c.url, c.token, c.ca, c.socket) == ("https://opt:1", None, None, None)
    c = resolve_connection(url="https://opt:1", token="t", ca="/ca.pem", environ=env)
    assert (c.url, c.token, c.ca) == ("https://opt:1", "t", "/ca.pem")
    c = resolve_connection(socket="/opt.sock", environ=env)
    assert (c.socket, c.url) == ("/opt.sock", None)
    # Then EMBER_URL with its token and CA (a token or CA option applies to it).
    c = resolve_connection(environ=env)
    assert (c.url, c.token, c.ca, c.socket) == ("https://env:7443", "env-token", "/env/ca.pem",
                                                None)
    c = resolve_connection(token="other", environ=env)
    assert c.token == "other"
    # Then EMBER_SOCKET.
    c = resolve_connection(environ={"EMBER_SOCKET": "/env/api.sock", "EMBER_TOKEN": "x"})
    assert (c.socket, c.url, c.token) == ("/env/api.sock", None, None)
    # Empty variables count as unset.
    c = resolve_connection(environ={"EMBER_URL": "", "EMBER_SOCKET": "/s"})
    assert c.socket == "/s"
    with pytest.raises(EmberConfigError):
        resolve_connection(environ={})


def test_headers_and_base_urls() -> None:
    remote = resolve_connection(url="https://h:7443/", token="tok", environ={})
    assert remote.base_url == "https://h:7443"
    assert remote.headers()["authorization"] == "Bearer tok"
    local = resolve_connection(socket="/s", token="tok", environ={})
    assert local.base_url == "http://ember"
    assert "authorization" not in local.headers()
    assert local.headers()["user-agent"].startswith("ember-sandbox-python/")


def test_ca_is_pem_text_or_a_path() -> None:
    assert resolve_connection(url="https://h", environ={}).ssl_context() is None
    with pytest.raises(ssl.SSLError):
        resolve_connection(
            url="https://h", ca="-----BEGIN CERTIFICATE-----\nnot a cert\n-----END CERTIFICATE-----\n",
            environ={},
        ).ssl_context()
    with pytest.raises(FileNotFoundError):
        resolve_connection(url="https://h", ca="/no/such/ca.pem", environ={}).ssl_context()


def test_a_url_sends_the_bearer_token(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeService().start(tcp=True) as fake:
        monkeypatch.delenv("EMBER_SOCKET", raising=False)
        monkeypatch.setenv("EMBER_URL", fake.url)
        monkeypatch.setenv("EMBER_TOKEN", "secret-token")
        sb = Sandbox.create()
        sb.run_command("echo", ["hi"])
        sb.close()
        assert fake.requests
        for request in fake.requests:
            assert request.headers["authorization"] == "Bearer secret-token"


def test_the_socket_sends_no_token(service: FakeService, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_TOKEN", "secret-token")
    with Sandbox.create() as sb:
        sb.run_command("echo")
    assert all("authorization" not in r.headers for r in service.requests)


def test_explicit_socket_beats_the_environment(service: FakeService,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_SOCKET", "/no/such/socket")
    with Sandbox.create(socket=service.socket_path) as sb:
        assert sb.connection.socket == service.socket_path


def make_certificate(directory: str) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (as the lab's), made with the openssl CLI."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "2", "-subj", "/CN=ember-sdk-tests",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", key, "-out", cert],
        capture_output=True,
        check=False,
    )
    if made.returncode != 0:
        pytest.skip(f"openssl cannot make a certificate: {made.stderr.decode()[-300:]}")
    return cert, key


def test_https_with_a_ca_file_and_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl CLI to make a certificate")
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = make_certificate(tmp)
        fake = FakeService()
        fake.token = "right-token"
        with fake.start(tls=(cert, key)):
            for name in ("EMBER_SOCKET", "EMBER_URL", "EMBER_TOKEN", "EMBER_CA_FILE"):
                monkeypatch.delenv(name, raising=False)
            # Without the CA the certificate is not trusted.
            with pytest.raises(EmberConnectionError):
                Sandbox.create(url=fake.url, token="right-token")
            # The CA as a path, then as PEM text.
            with Sandbox.create(url=fake.url, token="right-token", ca=cert) as sb:
                assert sb.run_command("echo", ["over", "https"]).stdout() == "over https\n"
            with open(cert, encoding="ascii") as f:
                pem = f.read()
            with Sandbox.create(url=fake.url, token="right-token", ca=pem) as sb:
                assert sb.sandbox_id
            # From the environment.
            monkeypatch.setenv("EMBER_URL", fake.url)
            monkeypatch.setenv("EMBER_TOKEN", "right-token")
            monkeypatch.setenv("EMBER_CA_FILE", cert)
            with Sandbox.create() as sb:
                assert sb.connection.url == fake.url
            # A wrong token or none: 401.
            for token in ("wrong-token", None):
                with pytest.raises(AuthenticationError) as info:
                    Sandbox.get("anything", url=fake.url, token=token, ca=cert)
                assert info.value.status == 401 and info.value.code == "unauthorized"

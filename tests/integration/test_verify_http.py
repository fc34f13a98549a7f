"""ledger_verify's application checks against a small local HTTP server started by the test:
the health endpoint (200, a bad status, a timeout, nobody listening) and the JWKS endpoint
(kids equal to the active rows of s2s_jwks_public_keys, or the difference reported)."""

from __future__ import annotations

import base64
import http.server
import json
import socket
import threading
import time
from pathlib import Path

import psycopg2
import pytest
from ledgertest import via_main

ROOT = Path(__file__).resolve().parents[2]


def run_verify(url: str, **args) -> dict:
    return via_main("ledger_verify", dict(database_url=url, limit="testenv", **args))


def http_check(result: dict, name: str) -> dict:
    found = [c for c in result["checks"] if c["group"] == "http" and c["name"] == name]
    assert len(found) == 1, [c["id"] for c in result["checks"] if c["group"] == "http"]
    return found[0]


class App(http.server.ThreadingHTTPServer):
    daemon_threads = True
    jwks: object = None


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output clean
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path == "/health":
            self._send(200, b'{"status": "ok"}')
        elif self.path == "/unhealthy":
            self._send(503, b'{"status": "starting"}')
        elif self.path == "/slow":
            time.sleep(1.5)
            self._send(200, b'{"status": "ok"}')
        elif self.path == "/jwks":
            self._send(200, json.dumps(self.server.jwks).encode())
        elif self.path.startswith("/private"):
            expected = "Basic " + base64.b64encode(b"monitor:pa ss:w0rd").decode()
            self._send(200 if self.headers.get("Authorization") == expected else 401, b"{}")
        elif self.path == "/text":
            self._send(200, b"<html>hello</html>", "text/html")
        else:
            self._send(404, b"{}")


@pytest.fixture(scope="module")
def app():
    server = App(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, "http://127.0.0.1:%d" % server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


KEYS = """
INSERT INTO public.s2s_jwks_public_keys (kid, x, y, issuer, expires_at, revoked_at) VALUES
  ('k-freeside-1', 'x', 'y', 'freeside', now() + interval '1 day', NULL),
  ('k-finn-1',     'x', 'y', 'finn',     NULL,                      NULL),
  ('k-revoked',    'x', 'y', 'freeside', NULL,                      now() - interval '1 hour'),
  ('k-expired',    'x', 'y', 'finn',     now() - interval '1 hour', NULL);
"""


@pytest.fixture(scope="module")
def keys_db(pg_cluster, ledger_template):
    name = pg_cluster.create_db(template=ledger_template)
    url = pg_cluster.url(name)
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        cur.execute(KEYS)
    conn.close()
    try:
        yield url
    finally:
        pg_cluster.drop_db(name)


def jwk(kid: str) -> dict:
    return {"kty": "EC", "crv": "P-256", "kid": kid, "x": "x", "y": "y", "use": "sig", "alg": "ES256"}


def test_health_200_passes(app, keys_db):
    _, base = app
    result = run_verify(keys_db, health_url=base + "/health", http_timeout=2)
    assert not result.get("failed"), result["msg"]
    check = http_check(result, "health")
    assert check["status"] == "passed" and check["observed"].startswith("HTTP 200 in ")


def test_health_bad_status_fails(app, keys_db):
    _, base = app
    result = run_verify(keys_db, health_url=base + "/unhealthy", http_timeout=2)
    assert result["failed"]
    assert result["failed_checks"] == ["http.health:%s/unhealthy" % base.split("//", 1)[1]]
    assert "HTTP 503" in result["msg"] and "Next:" in result["msg"] and "curl" in result["msg"]


def test_health_timeout_fails(app, keys_db):
    _, base = app
    started = time.monotonic()
    result = run_verify(keys_db, health_url=base + "/slow", http_timeout=0.3)
    assert time.monotonic() - started < 1.4  # did not wait for the slow answer
    assert result["failed"]
    assert "no answer within 0.3s" in http_check(result, "health")["observed"]


def test_health_nobody_listening_fails(keys_db):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = run_verify(keys_db, health_url="http://127.0.0.1:%d/health" % port, http_timeout=1)
    assert result["failed"]
    assert "no answer" in http_check(result, "health")["observed"]


def test_jwks_exactly_the_active_keys_passes(app, keys_db):
    server, base = app
    server.jwks = {"keys": [jwk("k-freeside-1"), jwk("k-finn-1")]}
    result = run_verify(keys_db, jwks_url=base + "/jwks")
    assert not result.get("failed"), result["msg"]
    assert http_check(result, "jwks")["observed"] == "endpoint serves 2 key(s), the database has 2 active"


def test_jwks_missing_active_key_fails(app, keys_db):
    server, base = app
    server.jwks = {"keys": [jwk("k-freeside-1")]}
    result = run_verify(keys_db, jwks_url=base + "/jwks")
    assert result["failed"]
    assert "active but not served: k-finn-1" in http_check(result, "jwks")["observed"]


def test_jwks_revoked_or_unknown_key_served_fails(app, keys_db):
    server, base = app
    server.jwks = {"keys": [jwk("k-freeside-1"), jwk("k-finn-1"), jwk("k-revoked"), jwk("k-expired"), jwk("nope")]}
    result = run_verify(keys_db, jwks_url=base + "/jwks")
    assert result["failed"]
    observed = http_check(result, "jwks")["observed"]
    assert "served but not active (revoked, expired or unknown): k-expired, k-revoked, nope" in observed


def test_jwks_issuer_filter(app, keys_db):
    server, base = app
    server.jwks = {"keys": [jwk("k-freeside-1")]}
    result = run_verify(keys_db, jwks_url=base + "/jwks", jwks_issuer="freeside")
    assert not result.get("failed"), result["msg"]


@pytest.mark.parametrize("path,doc", [("/text", None), ("/jwks", {"keys": "k-finn-1"}), ("/jwks", {"nokeys": []}),
                                      ("/jwks", {"keys": [{"kty": "EC"}]})])
def test_jwks_not_a_jwks_document_fails(app, keys_db, path, doc):
    server, base = app
    server.jwks = doc
    result = run_verify(keys_db, jwks_url=base + path)
    assert result["failed"]
    assert "not a JWKS document" in http_check(result, "jwks")["observed"]


def test_jwks_bad_status_fails(app, keys_db):
    _, base = app
    result = run_verify(keys_db, jwks_url=base + "/missing")
    assert result["failed"]
    assert http_check(result, "jwks")["observed"].startswith("HTTP 404")


def test_endpoint_credentials_are_used_and_never_shown(app, keys_db):
    _, base = app
    host = base.split("//", 1)[1]
    health = "http://monitor:pa%%20ss%%3Aw0rd@%s/private?token=T0ken-s3cret" % host
    result = run_verify(keys_db, health_url=health, jwks_url=base + "/jwks?token=T0ken-s3cret")
    check = http_check(result, "health")
    assert check["status"] == "passed", check  # user:password@ went out as basic auth
    assert check["relation"] == "%s/private?<query hidden>" % host
    assert http_check(result, "jwks")["relation"] == "%s/jwks?<query hidden>" % host
    text = json.dumps(result)
    for secret in ("pa%20ss", "w0rd", "T0ken-s3cret", "monitor"):
        assert secret not in text
    # The module's invocation (shown at -v) hides both options.
    assert result["invocation"]["module_args"]["health_url"] == "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"
    assert result["invocation"]["module_args"]["jwks_url"] == "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"

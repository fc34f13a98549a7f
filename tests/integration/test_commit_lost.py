"""A connection lost during COMMIT: the engine finds the truth before it answers, and records one outcome.

A real TCP proxy sits between the engine and PostgreSQL. It parses the client's protocol messages
and, on the connection whose transaction ran the marked migration, forwards the COMMIT and then
drops the client side at once: the server goes on committing (a deferred constraint trigger makes
the commit take about a second), the engine sees the connection die without a reply.
"""

from __future__ import annotations

import socket
import struct
import threading

from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_engine as engine
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import LedgerError
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_next import PlaybookAdvice

import pytest
from ledgertest import load, write_set
from test_engine import events, history

MARKER = b"commit_lost_marker"


class CommitDroppingProxy:
    """127.0.0.1:<port> -> PostgreSQL; drops the client after forwarding the COMMIT of a marked transaction."""

    def __init__(self, pg_port):
        self.pg_port = pg_port
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.fired = threading.Event()
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        self.stopped = True
        self.listener.close()

    def _accept(self):
        while not self.stopped:
            try:
                client, _addr = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.pg_port))
            threading.Thread(target=self._server_to_client, args=(server, client), daemon=True).start()
            threading.Thread(target=self._client_to_server, args=(client, server), daemon=True).start()

    @staticmethod
    def _server_to_client(server, client):
        try:
            while True:
                data = server.recv(65536)
                if not data:
                    break
                client.sendall(data)
        except OSError:
            pass
        finally:
            for s in (client, server):
                try:
                    s.close()
                except OSError:
                    pass

    def _client_to_server(self, client, server):
        buf = b""
        started = False  # the startup packet has no type byte
        marked = False
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                buf += data
                while True:
                    if not started:
                        if len(buf) < 4:
                            break
                        n = struct.unpack("!I", buf[:4])[0]
                        if len(buf) < n:
                            break
                        msg, buf = buf[:n], buf[n:]
                        started = True
                        server.sendall(msg)
                        continue
                    if len(buf) < 5:
                        break
                    n = struct.unpack("!I", buf[1:5])[0]
                    if len(buf) < 1 + n:
                        break
                    msg, buf = buf[:1 + n], buf[1 + n:]
                    kind, body = msg[:1], msg[5:]
                    if kind == b"Q" and MARKER in body:
                        marked = True
                    server.sendall(msg)
                    if kind == b"Q" and marked and body.strip(b"\0 ;").upper() == b"COMMIT" \
                            and not self.fired.is_set():
                        self.fired.set()
                        # The COMMIT went to the server; the client never hears back.
                        client.shutdown(socket.SHUT_RDWR)
                        client.close()
                        return
        except OSError:
            pass


@pytest.fixture
def proxy(pg_cluster):
    p = CommitDroppingProxy(pg_cluster.port)
    yield p
    p.close()


def _slow_commit_set(tmp_path, fail):
    """0001 creates a deferred constraint trigger that sleeps 1 s at COMMIT (and then raises, when `fail`)."""
    body = "PERFORM pg_sleep(1);%s RETURN NULL;" % (
        " RAISE EXCEPTION 'deferred check failed at commit';" if fail else "")
    return write_set(tmp_path / "m", {
        "0001_slow_commit.sql": """
            CREATE TABLE marked (note text);
            CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN %s END $$;
            CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON marked DEFERRABLE INITIALLY DEFERRED
                FOR EACH ROW EXECUTE FUNCTION slow_commit();
            INSERT INTO marked VALUES ('commit_lost_marker');
        """ % body,
    })


def _via(url, port):
    """The same database reached through the proxy (no TLS or GSS negotiation: plain protocol)."""
    head, db = url.rsplit("/", 1)
    return "%s:%d/%s?sslmode=disable&gssencmode=disable" % (head.rsplit(":", 1)[0], port, db)


def test_a_commit_that_happened_after_the_connection_dropped_is_reported_applied(tmp_path, empty_db, proxy):
    d = _slow_commit_set(tmp_path, fail=False)
    res = engine.apply(_via(empty_db, proxy.port), load(d), advice=PlaybookAdvice("testenv"))
    assert proxy.fired.is_set()
    assert [a["version"] for a in res["applied"]] == ["0001"]
    assert "confirmed by the history" in res["applied"][0]["note"]
    assert history(empty_db) == ["0001"]
    # One outcome: the apply event of the commit, no 'failed' event beside it.
    outcomes = [e[2] for e in events(empty_db, "apply")]
    assert outcomes == ["ok"], outcomes


def test_a_commit_that_failed_after_the_connection_dropped_is_reported_not_applied(tmp_path, empty_db, proxy):
    d = _slow_commit_set(tmp_path, fail=True)
    with pytest.raises(LedgerError) as exc:
        engine.apply(_via(empty_db, proxy.port), load(d), advice=PlaybookAdvice("testenv"))
    assert proxy.fired.is_set()
    msg = exc.value.msg
    assert "connection was lost during COMMIT; the session that ran it has ended" in msg and "not applied" in msg
    assert msg.count("not applied") == 1 and "0001_slow_commit.sql" in msg
    assert history(empty_db) == []
    outcomes = [e[2] for e in events(empty_db, "apply")]
    assert outcomes == ["failed"], outcomes

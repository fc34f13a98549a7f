# -*- coding: utf-8 -*-
"""ledger_verify's probes outside the main transaction: PgBouncer's context leak, HTTP health and JWKS, leftovers."""

from __future__ import annotations

import json
import socket
import base64
import time
import urllib.error
import urllib.parse
import uuid

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
    LedgerError, connect,
)

try:
    import psycopg2
except ImportError:  # pragma: no cover - reported by connect()
    psycopg2 = None

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_verify_schema import (
    Expectations,
    err_text,
    jwks_kid,
    short,
    webhook_event_ids,
)


# --------------------------------------------------------------------------- PgBouncer

def leak_check(url, rep, attempts, connect_timeout, app_schema):
    """Client A sets a transaction-local context and commits; client B's next transaction on the
    same server connection must see no context (app.current_community_id() raises P0001)."""
    name, rel = "context_does_not_leak", "app.community_id"
    try:
        a = connect(url, autocommit=False, connect_timeout=connect_timeout)
        b = connect(url, autocommit=False, connect_timeout=connect_timeout)
    except LedgerError as exc:
        return rep.add("pgbouncer", name, rel, False, exc.msg)
    try:
        ca, cb = a.cursor(), b.cursor()
        pids = []
        for _unused in range(max(1, attempts)):
            tenant = str(uuid.uuid4())
            ca.execute("SELECT pg_backend_pid()")
            pid_a = ca.fetchone()[0]
            if app_schema:
                ca.execute("SELECT app.set_community_context(%s::uuid)", (tenant,))
            else:
                ca.execute("SELECT set_config('app.community_id', %s, true)", (tenant,))
            ca.execute("SELECT current_setting('app.community_id', true)")
            if ca.fetchone()[0] != tenant:
                a.rollback()
                return rep.add("pgbouncer", name, rel, False, "client A could not set a context in its transaction")
            a.commit()
            cb.execute("SELECT pg_backend_pid(), current_setting('app.community_id', true)")
            pid_b, seen = cb.fetchone()
            pids.append((pid_a, pid_b))
            if pid_b != pid_a:
                b.rollback()
                continue
            guard = "not called (0008 not applied)"
            leaked = seen not in (None, "")
            if app_schema:
                try:
                    cb.execute("SELECT app.current_community_id()")
                    value = cb.fetchone()[0]
                    leaked = True
                    guard = "returned %s" % value
                except psycopg2.Error as exc:
                    guard = "raised " + err_text(exc)
                    if exc.pgcode != "P0001":
                        leaked = True
            b.rollback()
            text = ("client A (server pid %d) set app.community_id with set_config(..., true) and committed;"
                    " client B's next transaction on the same server connection (pid %d) sees %r;"
                    " app.current_community_id() %s" % (pid_a, pid_b, seen, guard))
            return rep.add("pgbouncer", name, rel, not leaked, text,
                           "no context in client B's transaction (P0001)")
        return rep.add("pgbouncer", name, rel, False,
                       "client B never landed on client A's server connection in %d attempts (pids %s): PgBouncer is"
                       " not in transaction pooling mode, or the pool is busy; re-run, or use a pool of size 1"
                       % (len(pids), ", ".join("%s/%s" % p for p in pids[:5])),
                       "two clients sharing one server connection")
    except psycopg2.Error as exc:
        return rep.add("pgbouncer", name, rel, False, "unexpected error: " + err_text(exc))
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------------- HTTP

def _safe_url(url):
    """host:port/path of an endpoint: never its scheme-complete text, user, password or query.

    health_url and jwks_url are no_log (they may carry credentials), and Ansible masks any
    text that contains such a value; the label never contains it, so checks stay readable.
    """
    if not url:
        return ""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or "?"
        if ":" in host:
            host = "[%s]" % host
        port = parts.port
    except ValueError:
        return "<unparsable URL>"
    label = "%s%s%s" % (host, ":%d" % port if port else "", parts.path or "/")
    if parts.query:
        label += "?<query hidden>"
    return label


def http_get(url, timeout):
    """(status, body, seconds) of a GET; raises OSError/URLError on no answer.

    user:password@ in the URL is sent as HTTP basic auth (urllib would not).
    """
    # Imported here, not at the top: ansible.module_utils.urls pulls in http.client and
    # cryptography.x509 (~60 ms), and most runs have no health_url or jwks_url to probe.
    # (AnsiballZ still finds this import: it scans function bodies too.)
    from ansible.module_utils.urls import ConnectionError as UrlsConnectionError
    from ansible.module_utils.urls import open_url

    headers = {"Accept": "application/json", "User-Agent": "ledger-verify"}
    parts = urllib.parse.urlsplit(url)
    if parts.username is not None:
        creds = "%s:%s" % (urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
        headers["Authorization"] = "Basic " + base64.b64encode(creds.encode("utf-8")).decode("ascii")
        netloc = parts.netloc.rsplit("@", 1)[1]
        url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    start = time.monotonic()
    try:
        resp = open_url(url, headers=headers, timeout=timeout, method="GET")
        try:
            return resp.status, resp.read(2000000), time.monotonic() - start
        finally:
            resp.close()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(2000) if exc.fp else b"", time.monotonic() - start
    except UrlsConnectionError as exc:  # TLS validation and the like: "no answer", as urllib's own errors
        raise urllib.error.URLError(str(exc))


def check_health(rep, url, timeout):
    name = "health"
    try:
        status, _unused, took = http_get(url, timeout)
    except (urllib.error.URLError, socket.timeout, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return rep.add("http", name, _safe_url(url), False, "no answer within %gs: %s" % (timeout, reason),
                       "HTTP 200 within %gs" % timeout)
    ok = status == 200 and took <= timeout
    return rep.add("http", name, _safe_url(url), ok, "HTTP %s in %.2fs" % (status, took),
                   "HTTP 200 within %gs" % timeout)


def check_jwks(rep, cur, url, timeout, issuer, applied):
    name = "jwks"
    if "0011" not in applied:
        return rep.skip("http", name, _safe_url(url), "0011 (s2s_jwks_public_keys) is not applied")
    try:
        status, body, took = http_get(url, timeout)
    except (urllib.error.URLError, socket.timeout, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return rep.add("http", name, _safe_url(url), False, "no answer within %gs: %s" % (timeout, reason))
    if status != 200:
        return rep.add("http", name, _safe_url(url), False, "HTTP %s in %.2fs" % (status, took), "HTTP 200")
    try:
        doc = json.loads(body.decode("utf-8"))
        keys = doc["keys"]
        if not isinstance(keys, list):
            raise TypeError("keys is a %s" % type(keys).__name__)
        kids = [k["kid"] for k in keys]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        return rep.add("http", name, _safe_url(url), False,
                       "not a JWKS document (a JSON object whose keys array holds objects with a kid): %s" % exc)
    query = ("SELECT kid FROM public.s2s_jwks_public_keys WHERE revoked_at IS NULL"
             " AND (expires_at IS NULL OR expires_at > now())")
    params = ()
    if issuer:
        query += " AND issuer = %s"
        params = (issuer,)
    cur.execute(query + " ORDER BY kid", params)
    active = [r[0] for r in cur.fetchall()]
    served = set(kids)
    missing, extra = sorted(set(active) - served), sorted(served - set(active))
    dupes = sorted({k for k in kids if kids.count(k) > 1})
    text = "endpoint serves %d key(s), the database has %d active" % (len(kids), len(active))
    if missing:
        text += "; active but not served: " + ", ".join(missing)
    if extra:
        text += "; served but not active (revoked, expired or unknown): " + ", ".join(extra)
    if dupes:
        text += "; served twice: " + ", ".join(dupes)
    return rep.add("http", name, _safe_url(url), not (missing or extra or dupes), text,
                   "the kids of the active rows of s2s_jwks_public_keys%s" % (" (issuer %s)" % issuer if issuer else ""))


# --------------------------------------------------------------------------- traces

def applied_tables(applied, exp):
    """The tables (not views) the applied versions create, in version order."""
    return [rel for rel in exp.tables if exp.version_of(rel) in applied]


def object_snapshot(cur):
    cur.execute("""SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                            WHERE n.nspname IN ('public', 'app')),
                          (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                            WHERE n.nspname IN ('public', 'app')),
                          (SELECT count(*) FROM pg_trigger), (SELECT count(*) FROM pg_policy),
                          (SELECT count(*) FROM pg_namespace),
                          (SELECT count(*) FROM pg_db_role_setting),
                          (SELECT count(*) FROM pg_roles)""")
    return dict(zip(("relations", "functions", "triggers", "policies", "schemas", "role_settings", "roles"),
                    cur.fetchone()))


def leftover_rows(conn, tenants, markers, applied, statement_timeout_ms, exp=None):
    """Rows verify created that are still there after its rollback ({} when none), per table.

    Exact and cheap on a production-sized ledger: every row verify writes carries one of its
    two throwaway tenants' community_id (indexed in every tenant table) or one of its own keys
    (webhook_events (provider, event_id) and s2s_jwks_public_keys kid, both unique). No table
    is counted in full. Each tenant is read under its own context (forced row-level security).
    exp: the Expectations of the run (default: this collection's files/migrations).
    """
    exp = exp or Expectations.load()
    cur = conn.cursor()
    found = {}
    try:
        conn.autocommit = False
        cur.execute("SELECT set_config('statement_timeout', %s, true)", (str(statement_timeout_ms),))
        for rel in applied_tables(applied, exp):
            cur.execute("SELECT to_regclass(%s) IS NOT NULL", (rel,))
            if not cur.fetchone()[0]:
                continue
            n = 0
            if rel in exp.tenant_tables + exp.service_tables:
                for tenant in tenants:
                    if "0008" in applied:
                        cur.execute("SELECT set_config('app.community_id', %s, true)", (tenant,))
                    cur.execute("SELECT count(*) FROM %s WHERE community_id = %%s::uuid" % rel, (tenant,))
                    n += cur.fetchone()[0]
            elif rel == "public.webhook_events":
                cur.execute("SELECT count(*) FROM public.webhook_events WHERE provider = 'nowpayments'"
                            " AND event_id = ANY(%s)", ([e for m in markers for e in webhook_event_ids(m)],))
                n = cur.fetchone()[0]
            elif rel == "public.s2s_jwks_public_keys":
                cur.execute("SELECT count(*) FROM public.s2s_jwks_public_keys WHERE kid = ANY(%s)",
                            ([jwks_kid(m) for m in markers],))
                n = cur.fetchone()[0]
            if n:
                found[short(rel)] = n
    finally:
        conn.rollback()
        conn.autocommit = True
    return found

# -*- coding: utf-8 -*-
"""The one target contract: a database named by a libpq URL, parsed once, by libpq itself.

Every module, the report callback and the backups' manifests name, reach and
redact a target through Target:

* ``Target(url)`` refuses, before anything of the URL is shown, what libpq would
  misread: an empty value, a key=value string, more than one raw ``@`` before the
  query (a password holding a raw ``@`` would otherwise be split into a user, a
  password and a "host" that is the rest of the password, and printed as such), and
  anything libpq's own parser (``PQconninfoParse`` through psycopg2's
  ``parse_dsn``) rejects. The refusals never echo the URL or the parser's message
  (with a raw ``/``, ``?`` or ``#`` in the password, the parser's idea of a port or
  a database is a piece of the password); they advise percent-encoding.
* ``name``: ``user@host:port/dbname``, how a target appears in every message.
* ``params``: libpq's connection keywords (host, port, user, password, dbname,
  sslmode, ...), for psycopg2 and for pg_dump/pg_restore/psql.
* ``tls``: whether libpq will use TLS and check the server (the ``sslmode``); the TLS rule of an
  environment (``meets_sslmode``, ``sslmode_refusal``), which the playbooks apply through the
  filter ``arrakis.ledger.tls_refusal``.
* ``secrets()``: the password as it can appear in text (raw and percent-encoded),
  for the verbatim scrub of reports.
"""

from __future__ import annotations

import getpass
import re

try:
    from urllib.parse import quote, unquote, urlsplit, urlunsplit
except ImportError:  # pragma: no cover - Python 2 is not supported
    raise

try:
    import psycopg2.extensions
    HAS_PSYCOPG2 = True
except ImportError:  # pragma: no cover - reported when a Target is made
    HAS_PSYCOPG2 = False

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_errors import LedgerError

SCHEME = re.compile(r"^postgres(?:ql)?://", re.IGNORECASE)
ENCODE_ADVICE = ("percent-encode special characters in the user name and password ('@' as %40, ':' as %3A,"
                 " '/' as %2F, '?' as %3F, '#' as %23, '%' as %25)")
# sslmode values under which libpq encrypts; the verify-* ones also check the server's certificate.
TLS_MODES = ("require", "verify-ca", "verify-full")
DEFAULT_PORT = 5432


def check_url(url):
    """Refuse, without showing any of it, a database_url that is not one unambiguous libpq URI."""
    if not url or not isinstance(url, str):
        raise LedgerError("database_url is empty: set DATABASE_URL or database_url for this target")
    if not SCHEME.match(url):
        raise LedgerError("database_url must be a libpq URI starting with postgresql:// "
                          "(a key=value conninfo string is not accepted here)")
    authority = re.split(r"[?#]", SCHEME.sub("", url, count=1), maxsplit=1)[0]
    if authority.count("@") > 1:
        raise LedgerError("database_url is malformed: a raw '@' in its user name or password (libpq would read part of "
                          "the password as the host); the URL is not shown; %s" % ENCODE_ADVICE)


class Target(object):
    """One database target (see the module docstring)."""

    def __init__(self, url):
        check_url(url)
        if not HAS_PSYCOPG2:
            raise LedgerError("psycopg2 is not importable: run 'make setup' and use the virtualenv's interpreter")
        try:
            params = psycopg2.extensions.parse_dsn(url)
        except psycopg2.Error:
            # libpq's message may quote the misread piece: it is never shown.
            raise LedgerError("database_url is malformed (libpq cannot parse it); the URL is not shown; %s"
                              % ENCODE_ADVICE)
        self.url = url
        self.params = params
        self.host = params.get("host") or "localhost"
        try:
            self.port = int(str(params.get("port") or DEFAULT_PORT).split(",", maxsplit=1)[0])
        except ValueError:
            raise LedgerError("database_url is malformed: its port is not a number; the URL is not shown; %s"
                              % ENCODE_ADVICE)
        self.user = params.get("user") or getpass.getuser()
        self.dbname = params.get("dbname") or self.user
        self.sslmode = params.get("sslmode")
        self.password = params.get("password")

    @property
    def name(self):
        """``user@host:port/dbname``: the target in every message (never its password)."""
        return "%s@%s:%s/%s" % (self.user, self.host, self.port, self.dbname)

    def __str__(self):
        return self.name

    def __repr__(self):
        return "Target(%s)" % self.name

    @property
    def tls(self):
        """Whether libpq encrypts the connection (the URL's sslmode; PGSSLMODE does not count)."""
        return self.sslmode in TLS_MODES

    def meets_sslmode(self, required):
        """Whether the URL asks libpq for the sslmode an environment requires (None/'' requires nothing)."""
        return not required or self.sslmode == required

    def sslmode_refusal(self, required, who):
        """The refusal of a URL without the sslmode an environment requires, or None (who: host and environment)."""
        if self.meets_sslmode(required):
            return None
        return ("%s requires sslmode=%s, but its database_url has sslmode=%s. Add '?sslmode=%s&sslrootcert="
                "/path/to/ca.pem' to the URL (vault_database_url or DATABASE_URL); PGSSLMODE in the environment "
                "does not count: the URL must say it." % (who, required, self.sslmode or "unset", required))

    def with_database(self, dbname):
        """The same server and credentials, another database (scratch and restore databases)."""
        parts = urlsplit(self.url)
        return Target(urlunsplit((parts.scheme, parts.netloc, "/" + quote(dbname, safe=""), parts.query,
                                  parts.fragment)))

    def url_without_password(self):
        """The URL with its password removed (pg_dump and friends get it from a passfile)."""
        parts = urlsplit(self.url)
        if "@" not in parts.netloc:
            return self.url
        userinfo, hostport = parts.netloc.rsplit("@", 1)
        return urlunsplit((parts.scheme, userinfo.split(":", 1)[0] + "@" + hostport, parts.path, parts.query,
                           parts.fragment))

    def secrets(self):
        """The password as text may hold it: raw and percent-encoded (empty when there is none)."""
        if not self.password:
            return set()
        return {self.password, quote(self.password, safe="")}


def target_name(url):
    """``user@host:port/dbname`` of a URL, or a fixed placeholder for a URL Target refuses (never the URL)."""
    try:
        return Target(url).name
    except LedgerError:
        return "<unusable database_url>"


def secrets_of(url):
    """Every form the password of a database URL can take in text (for the reports' verbatim scrub).

    For a URL that Target refuses, the text between the user name and the last '@' (what redact()
    hides), raw and percent-decoded: nothing of it may reach a report either.
    """
    if not isinstance(url, str) or not SCHEME.match(url):
        return set()
    try:
        return Target(url).secrets()
    except LedgerError:
        userinfo = SCHEME.sub("", url, count=1).rsplit("@", 1)[0] if "@" in url else ""
        if ":" not in userinfo:
            return set()
        raw = userinfo.split(":", 1)[1]
        return {raw, unquote(raw), quote(unquote(raw), safe="")}

"""The collector's database: SQLite by default (a file path), PostgreSQL given a URL.

Why plain DB-API (``sqlite3`` + psycopg 3) and not SQLAlchemy Core: every statement the
collector needs is in the SQL subset SQLite (3.24+) and PostgreSQL share — ``INSERT ...
ON CONFLICT ... DO NOTHING / DO UPDATE``, ``SAVEPOINT``, quoted identifiers — so the only
dialect difference left is the parameter style (``?`` against psycopg's ``%s``) and how a
write transaction starts. A twenty-line shim covers that; SQLAlchemy would add a large
dependency and a second way of writing queries for readers of this code, and buys nothing
here. ``sqlite3`` ships with Python; psycopg is needed only for a ``postgresql://`` URL.

Schema (every time is ISO-8601 UTC text exactly as the agent sent it; JSON columns hold
JSON text):

- ``stations``: one row per station seen or registered: ``public_key_pem`` (NULL: no key
  registered), ``first_seen`` / ``last_seen`` (collector's receive time), ``status``
  (the retained ``online`` / ``offline``), ``journal_seq`` (latest a live message
  reported), ``malformed`` (messages from it that could not be stored).
- ``records``: every journaled record exactly once, ``(station, seq)`` unique: ``type``
  is ``session``, ``event``, ``aggregate`` or ``summary``; ``ts`` the record's own time
  (session ``ts``; event ``end``, else ``start``; aggregate/summary ``end``);
  ``received_at`` when the first copy arrived; ``payload`` the message as received.
- ``sessions``: one row per charging session, merged from its ``start``, ``begin`` and
  ``end`` records (the record with the highest seq gives the values; ``seq_start`` and
  ``seq_end`` name the start and end records, NULL until they arrive; ``seq_last`` the
  record the values come from). ``verified`` is 1 when every OCMF document verified with
  the station's key and the energy matches the signed registers, 0 with ``verify_error``
  saying why not, NULL while the session has no signed reading yet (``start``) or when
  it never had one (unplugged without charging: no energy billed).
- ``events``: one row per event record (raise and clear are two records).
- ``aggregates``: one row per aggregate or summary record (``kind``); ``covers_seq`` is a
  summary's JSON list of ``[first, last]`` seq runs it stands for. Summaries and the
  aggregates they fold may both be present when the aggregates were delivered before the
  fold.
- ``gaps``: the sequence numbers of a station not received (and not accounted for by a
  summary) below its highest received one, as ``[first_seq, last_seq]`` ranges, kept
  current: a range disappears or shrinks when late records arrive.
- ``counters``: fleet-wide message counts by ``name`` (``received``, ``stored``,
  ``duplicates``, ``malformed``, ``live``, ``ignored``).
- ``meta``: ``schema_version``.

Several collectors may write to one database: SQLite runs in WAL mode with a busy timeout
and takes the write lock when a batch starts; on PostgreSQL each batch inserts its records
(``ON CONFLICT DO NOTHING``, in key order) and only then locks the rows of the stations it
stored records of (in name order) for its sessions and gaps, until commit; counters and the
other stations' rows follow in a short transaction of their own.
"""

import contextlib
import os
import re
import sqlite3

SCHEMA_VERSION = 1
SQLITE_BUSY_TIMEOUT_MS = 30000
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
SQLITE_SCHEME = "sqlite:///"

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS stations (
        station TEXT PRIMARY KEY,
        public_key_pem TEXT,
        first_seen TEXT,
        last_seen TEXT,
        status TEXT,
        journal_seq BIGINT,
        malformed BIGINT NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE IF NOT EXISTS records (
        station TEXT NOT NULL,
        seq BIGINT NOT NULL,
        type TEXT NOT NULL,
        ts TEXT,
        received_at TEXT NOT NULL,
        payload TEXT NOT NULL,
        PRIMARY KEY (station, seq)
    )""",
    """CREATE TABLE IF NOT EXISTS sessions (
        station TEXT NOT NULL,
        session_id TEXT NOT NULL,
        seq_start BIGINT,
        seq_end BIGINT,
        seq_last BIGINT NOT NULL,
        plug_in TEXT,
        unplug TEXT,
        begin_wh BIGINT,
        end_wh BIGINT,
        energy_wh BIGINT,
        plugged_s DOUBLE PRECISION,
        charging_s DOUBLE PRECISION,
        idle_s DOUBLE PRECISION,
        max_power_w DOUBLE PRECISION,
        avg_power_w DOUBLE PRECISION,
        segments INTEGER,
        flags TEXT,
        ocmf_begin TEXT,
        ocmf_end TEXT,
        ocmf_documents TEXT,
        verified INTEGER,
        verify_error TEXT,
        PRIMARY KEY (station, session_id)
    )""",
    """CREATE TABLE IF NOT EXISTS events (
        station TEXT NOT NULL,
        seq BIGINT NOT NULL,
        event_number BIGINT,
        type TEXT NOT NULL,
        severity TEXT,
        state TEXT,
        start TEXT,
        "end" TEXT,
        session_id TEXT,
        values_json TEXT,
        PRIMARY KEY (station, seq)
    )""",
    """CREATE TABLE IF NOT EXISTS aggregates (
        station TEXT NOT NULL,
        seq BIGINT NOT NULL,
        kind TEXT NOT NULL,
        start TEXT,
        "end" TEXT,
        samples BIGINT,
        aggregates BIGINT,
        energy_wh_start BIGINT,
        energy_wh_end BIGINT,
        power_min_w DOUBLE PRECISION,
        power_avg_w DOUBLE PRECISION,
        power_max_w DOUBLE PRECISION,
        frequency_avg_hz DOUBLE PRECISION,
        covers_seq TEXT,
        PRIMARY KEY (station, seq)
    )""",
    """CREATE TABLE IF NOT EXISTS gaps (
        station TEXT NOT NULL,
        first_seq BIGINT NOT NULL,
        last_seq BIGINT NOT NULL,
        detected_at TEXT NOT NULL,
        PRIMARY KEY (station, first_seq)
    )""",
    """CREATE TABLE IF NOT EXISTS counters (
        name TEXT PRIMARY KEY,
        value BIGINT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS sessions_plug_in ON sessions (plug_in)",
    "CREATE INDEX IF NOT EXISTS events_start ON events (start)",
    "CREATE INDEX IF NOT EXISTS aggregates_start ON aggregates (start)",
]


def redacted(url):
    """``url`` with any password replaced by ``***``, for messages and logs."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def sqlite_path(url):
    """The file path a SQLite URL names: a plain path, or ``sqlite:///PATH``."""
    if url.startswith(SQLITE_SCHEME):
        return url[len(SQLITE_SCHEME):]
    return url


def format_params(sql):
    """``sql`` with ``?`` placeholders turned into psycopg's ``%s`` (and ``%`` escaped),
    leaving quoted strings and identifiers alone."""
    out = []
    quote = None
    for char in sql:
        if quote is not None:
            out.append("%%" if char == "%" else char)
            if char == quote:
                quote = None
        elif char in ("'", '"'):
            quote = char
            out.append(char)
        elif char == "?":
            out.append("%s")
        elif char == "%":
            out.append("%%")
        else:
            out.append(char)
    return "".join(out)


# Multi-row statements: rows and values per statement (SQLite allows 32,766 values since
# 3.32, PostgreSQL 65,535).
INSERT_ROWS = 1024
INSERT_PARAMS = 30000


def chunked(items, limit):
    """Slices of ``items`` of at most ``limit``, each a power of two long: a statement built
    for a slice has one of a few texts, so the driver parses and the server plans each text
    once instead of once for every remainder."""
    start = 0
    while start < len(items):
        size = min(limit, len(items) - start)
        size = 1 << (size.bit_length() - 1)
        yield items[start:start + size]
        start += size


class Store:
    """One database connection with the collector's schema.

    ``dialect`` is ``"sqlite"`` or ``"postgresql"``; ``query`` and ``execute`` take SQL with
    ``?`` placeholders on both. Not shared between threads: open one per thread.
    """

    def __init__(self, connection, dialect, url, data_errors, failures, connect):
        self.connection = connection
        self.dialect = dialect
        self.url = url
        # Errors that mean "the database refuses these values", not "the database failed".
        self.data_errors = data_errors + (OverflowError, UnicodeEncodeError)
        # Errors that mean "the database failed" (down, locked, disk): worth a retry.
        self.failures = failures
        self._connect = connect
        self._in_transaction = False
        self._formatted = {}  # SQL text -> its psycopg form

    def ensure_connected(self):
        """Open a new connection if the server closed this one (PostgreSQL restarted)."""
        if self.dialect == "postgresql" and self.connection.closed:
            self.connection = self._connect(self.url)

    def _sql(self, sql):
        if self.dialect == "sqlite":
            return sql
        text = self._formatted.get(sql)
        if text is None:
            if len(self._formatted) > 1000:
                self._formatted.clear()
            text = self._formatted[sql] = format_params(sql)
        return text

    def execute(self, sql, params=()):
        """Run one statement; returns the cursor (``rowcount``, ``fetchall``)."""
        cursor = self.connection.cursor()
        cursor.execute(self._sql(sql), tuple(params))
        return cursor

    def insert_rows(self, head, rows, tail=""):
        """``head VALUES (..), (..) tail`` for all of ``rows`` (tuples of one width), as
        multi-row statements of at most ``INSERT_ROWS`` rows and ``INSERT_PARAMS`` values
        each (``chunked``): one round trip a chunk instead of one a row. Returns the rows a ``RETURNING``
        in ``tail`` gives."""
        returned = []
        if not rows:
            return returned
        mark = "(%s)" % ", ".join("?" * len(rows[0]))
        for chunk in chunked(rows, max(1, min(INSERT_ROWS, INSERT_PARAMS // len(rows[0])))):
            params = [value for row in chunk for value in row]
            cursor = self.execute("%s VALUES %s %s" % (head, ", ".join([mark] * len(chunk)), tail), params)
            try:
                if "RETURNING" in tail:
                    returned.extend(cursor.fetchall())
            finally:
                cursor.close()
        return returned

    def query(self, sql, params=()):
        """Rows (tuples) of one query."""
        cursor = self.execute(sql, params)
        try:
            return cursor.fetchall()
        finally:
            cursor.close()

    def scalar(self, sql, params=()):
        """The first column of the first row, or None when there is no row."""
        rows = self.query(sql, params)
        return rows[0][0] if rows else None

    @contextlib.contextmanager
    def transaction(self):
        """A write transaction: committed when the block ends, rolled back on an exception.

        On SQLite it takes the database's write lock at once (``BEGIN IMMEDIATE``), waiting
        up to the busy timeout for another writer, so what it reads stays current until
        commit."""
        if self._in_transaction:
            raise RuntimeError("transactions do not nest; use savepoint()")
        self.execute("BEGIN IMMEDIATE" if self.dialect == "sqlite" else "BEGIN")
        self._in_transaction = True
        try:
            yield self
            self.execute("COMMIT")
        except BaseException:
            try:
                self.execute("ROLLBACK")
            except Exception:
                pass  # the connection itself failed: the original error says more
            raise
        finally:
            self._in_transaction = False

    @contextlib.contextmanager
    def savepoint(self, name="item"):
        """A part of the open transaction that is undone alone if it raises."""
        self.execute("SAVEPOINT " + name)
        try:
            yield self
        except BaseException:
            self.execute("ROLLBACK TO SAVEPOINT " + name)
            self.execute("RELEASE SAVEPOINT " + name)
            raise
        self.execute("RELEASE SAVEPOINT " + name)

    def create_schema(self):
        """Create the tables and indexes that are missing (safe with several collectors)."""
        if self.dialect == "postgresql" and self.scalar("SELECT to_regclass('meta')") is not None \
                and self.scalar("SELECT value FROM meta WHERE key = 'schema_version'") is not None:
            # Written with the schema: all of it exists. CREATE INDEX IF NOT EXISTS would still
            # lock its table against the writes of the collectors already running.
            self._check_version()
            return
        with self.transaction():
            if self.dialect == "postgresql":
                # Concurrent CREATE TABLE IF NOT EXISTS can collide in PostgreSQL's catalog.
                self.execute("SELECT pg_advisory_xact_lock(727274)")
            for statement in SCHEMA:
                self.execute(statement)
            self.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                         "ON CONFLICT (key) DO NOTHING", (str(SCHEMA_VERSION),))
        self._check_version()

    def _check_version(self):
        version = self.scalar("SELECT value FROM meta WHERE key = 'schema_version'")
        if int(version) != SCHEMA_VERSION:
            raise ValueError("database %s has schema version %s, this collector knows %d"
                             % (redacted(self.url), version, SCHEMA_VERSION))

    def add_counters(self, counts):
        """Add ``{name: n}`` to the ``counters`` table (inside the caller's transaction, if any)."""
        for name, value in sorted(counts.items()):
            if value:
                self.execute("INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name) "
                             "DO UPDATE SET value = counters.value + excluded.value", (name, value))

    def count(self, counts):
        """``add_counters`` in a transaction of its own."""
        with self.transaction():
            self.add_counters(counts)

    def close(self):
        self.connection.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _sqlite_connection(url):
    path = sqlite_path(url)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError("database %s: directory %s does not exist" % (url, directory))
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                 timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)
    # WAL lets readers (reports, status) run beside writers; FULL sync makes a commit
    # durable before the collector acknowledges the messages it holds.
    connection.execute("PRAGMA busy_timeout = %d" % SQLITE_BUSY_TIMEOUT_MS)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = FULL")
    return connection


def _connect_sqlite(url):
    return Store(_sqlite_connection(url), "sqlite", url, (sqlite3.DataError, sqlite3.IntegrityError),
                 (sqlite3.OperationalError,), _sqlite_connection)


def _postgresql_connection(url):
    import psycopg
    return psycopg.connect(url, autocommit=True)


def _connect_postgresql(url):
    try:
        import psycopg
    except ImportError:
        raise ValueError("database %s needs psycopg 3: pip install 'psycopg[binary]'"
                         % redacted(url)) from None
    try:
        connection = _postgresql_connection(url)
    except psycopg.Error as error:
        raise ValueError("cannot connect to %s: %s" % (redacted(url), error)) from None
    return Store(connection, "postgresql", url, (psycopg.DataError, psycopg.IntegrityError),
                 (psycopg.OperationalError, psycopg.InterfaceError), _postgresql_connection)


def add_db_argument(parser):
    """``--db URL`` (required) on an argparse parser; the value lands in ``args.db``."""
    parser.add_argument("--db", required=True, metavar="URL",
                        help="SQLite file (path or sqlite:///PATH) or postgresql://USER@HOST:PORT/DB")


def open_store(url, create=True):
    """A Store on ``url``: ``postgresql://user@host:port/db`` (or ``postgres://``), else a
    SQLite file (a path, or ``sqlite:///PATH``). ``create`` makes missing tables."""
    if not url:
        raise ValueError("no database given: a SQLite file path or a postgresql:// URL")
    if url.startswith(POSTGRES_SCHEMES):
        store = _connect_postgresql(url)
    elif "://" in url and not url.startswith(SQLITE_SCHEME):
        raise ValueError("database URL %s: unknown scheme (use a file path, sqlite:///PATH "
                         "or postgresql://...)" % redacted(url))
    else:
        store = _connect_sqlite(url)
    if create:
        try:
            store.create_schema()
        except BaseException:
            store.close()
            raise
    return store

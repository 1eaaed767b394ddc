"""The human eyeball queue: a store of annotated objects, a sink that fills it, and its CLI.

One SQLite file (stdlib :mod:`sqlite3`, WAL journal) is shared by writer and readers:
``vigil run``/``vigil replay`` write through :class:`QueueSink` while ``vigil queue
serve`` (:mod:`stream.web`) reads the same file and records vetting decisions. WAL
lets the web app read while the service writes; every connection waits on a busy
timeout instead of failing when the other side holds the write lock.

Tables
------
``objects``
    One row per survey object with its *latest* annotation (what the ranked list
    shows), a pre-computed sparkline and the latest vetting labels. The list query
    reads only this table, through expression indexes matching its ``ORDER BY``.
``annotations``
    Full history: one row per ``(alert_id, model_version)``. Writes are idempotent
    upserts, so a redelivered batch (at-least-once Kafka) never duplicates rows.
``lightcurves`` / ``cutouts``
    Per alert: the light curve (raw and, when the pipeline provides it, HSR-corrected
    flux) and the three FITS stamps as they came (ZTF gzipped, Rubin raw).
``decisions``
    One row per vetting action, with vetter, time and a snapshot of the scores and
    features of the alert the vetter was looking at (the training labels). A withdrawn
    action stays, marked (``withdrawn_ms``, ``withdrawn_by``), and counts no more.
``vetter_views``
    Per vetter and object: when it was last seen, its rank and priority then, so the
    list can flag what is new or has moved.

PostgreSQL, for a team sharing one queue: give a ``postgresql://`` URL instead of a file
path (``pip install 'vigil[postgres]'`` for the driver, psycopg 3). The SQL is written once;
:class:`_PgConnection` translates the few dialect points marked ``# dialect:`` (``?``
placeholders → ``%s``, ``INTEGER``/``REAL``/``BLOB`` → ``BIGINT``/``DOUBLE PRECISION``/``BYTEA``,
``AUTOINCREMENT`` → ``BIGSERIAL``, ``IS`` → ``IS NOT DISTINCT FROM``, no ``PRAGMA``). Text
sorts bytewise (``COLLATE "C"``) as in SQLite, so both list objects in the same order. A
write transaction first takes one advisory lock, the counterpart of SQLite's ``BEGIN
IMMEDIATE``: writers from many ``vigil run`` processes take turns per batch and never
deadlock, while readers (the web app) are never blocked.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import sqlite3
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# An alert within KNOWN_SSO_ARCSEC of a known solar-system object (ZTF ``ssdistnr``; Rubin's
# association to an ``ssObject``) is marked as a known asteroid in the list, which can hide them
# (one value for the scorer's source types and the queue).
from models.score import KNOWN_SSO_ARCSEC
from stream import MissingExtra

log = logging.getLogger(__name__)

SCHEMA_VERSION = 7
SCORES = ("p_real", "p_extragalactic", "p_fast")
STAGES = ("first", "updating", "longterm")
CUTOUT_KINDS = ("science", "template", "difference")
BUSY_TIMEOUT_MS = 10_000

#: Vetting actions → (label column, value). ``snooze`` hides the object until new data arrives.
ACTIONS = {
    "real": ("is_real", 1),
    "bogus": ("is_real", 0),
    "galactic": ("is_extragalactic", 0),
    "extragalactic": ("is_extragalactic", 1),
    "follow_up": ("follow_up", 1),
    "no_follow_up": ("follow_up", 0),
    "snooze": ("snooze", 1),
}

#: The object's column that holds each question's current answer.
_VET_COLUMNS = {"is_real": "vet_real", "is_extragalactic": "vet_extragalactic", "follow_up": "vet_follow_up"}

#: The most rows one page of the ranked list holds (web page, ``queue list --top``).
MAX_PAGE_ROWS = 500

#: Sort keys of the list → (SQL expression, direction). NULL scores sort last through COALESCE,
#: and each expression has an index of exactly the same text so ORDER BY ... LIMIT walks it.
SORTS = {
    "priority": ("COALESCE(priority, -1.0)", "DESC"),
    "p_real": ("COALESCE(p_real, -1.0)", "DESC"),
    "p_extragalactic": ("COALESCE(p_extragalactic, -1.0)", "DESC"),
    "p_fast": ("COALESCE(p_fast, -1.0)", "DESC"),
    "latest": ("latest_mjd", "DESC"),
    "first": ("COALESCE(first_mjd, -1.0)", "DESC"),  # (NULLs sort last in both SQLite and PostgreSQL)
    "mag": ("COALESCE(mag, 99.0)", "ASC"),
}

_LOGIN_FAILURES_DDL = """CREATE TABLE IF NOT EXISTS login_failures (
        attempt_id INTEGER PRIMARY KEY AUTOINCREMENT,
        address TEXT NOT NULL,
        failed_ms INTEGER NOT NULL
    )"""
_LOGIN_FAILURES_INDEX = "CREATE INDEX IF NOT EXISTS ix_login_failures ON login_failures (address, failed_ms)"
# Each survey's newest alert (its stream clock), read on every page: by index, not a scan.
_SURVEY_CLOCK_INDEX = "CREATE INDEX IF NOT EXISTS ix_obj_survey_latest ON objects (survey, latest_mjd)"
_DDL = [
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS objects (
        object_id TEXT PRIMARY KEY,
        survey TEXT NOT NULL,
        ra REAL NOT NULL,
        dec REAL NOT NULL,
        gal_b REAL,
        abs_gal_b REAL,
        latest_alert_id INTEGER NOT NULL,
        latest_mjd REAL NOT NULL,
        first_mjd REAL,
        band TEXT,
        mag REAL,
        status TEXT NOT NULL,
        p_real REAL,
        p_extragalactic REAL,
        p_fast REAL,
        priority REAL,
        stage TEXT NOT NULL,
        model_version TEXT NOT NULL,
        n_alerts INTEGER NOT NULL DEFAULT 1,
        n_det INTEGER,
        spark TEXT,
        updated_ms INTEGER NOT NULL,
        snoozed_mjd REAL,
        vet_real INTEGER,
        vet_extragalactic INTEGER,
        vet_follow_up INTEGER,
        vetted_ms INTEGER,
        vetted_by TEXT,
        ss_distance REAL,
        source_type TEXT,
        source_type_p REAL,
        extrapolated TEXT
    )""",
    """CREATE TABLE IF NOT EXISTS annotations (
        alert_id INTEGER NOT NULL,
        model_version TEXT NOT NULL,
        object_id TEXT NOT NULL,
        event_mjd REAL NOT NULL,
        processing_time_ms INTEGER NOT NULL,
        written_ms INTEGER NOT NULL,
        status TEXT NOT NULL,
        p_real REAL,
        p_extragalactic REAL,
        p_fast REAL,
        priority REAL,
        stage TEXT NOT NULL,
        record TEXT NOT NULL,
        PRIMARY KEY (alert_id, model_version)
    )""",
    # dialect: BLOB -> BYTEA
    """CREATE TABLE IF NOT EXISTS cutouts (
        alert_id INTEGER NOT NULL,
        kind TEXT NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (alert_id, kind)
    )""",
    """CREATE TABLE IF NOT EXISTS lightcurves (
        alert_id INTEGER PRIMARY KEY,
        object_id TEXT NOT NULL,
        data TEXT NOT NULL
    )""",
    # dialect: INTEGER PRIMARY KEY AUTOINCREMENT -> BIGSERIAL PRIMARY KEY
    """CREATE TABLE IF NOT EXISTS decisions (
        decision_id INTEGER PRIMARY KEY AUTOINCREMENT,
        object_id TEXT NOT NULL,
        alert_id INTEGER,
        vetter TEXT NOT NULL,
        decided_ms INTEGER NOT NULL,
        action TEXT NOT NULL,
        is_real INTEGER,
        is_extragalactic INTEGER,
        follow_up INTEGER,
        snooze INTEGER,
        note TEXT NOT NULL DEFAULT '',
        model_version TEXT,
        status TEXT,
        p_real REAL,
        p_extragalactic REAL,
        p_fast REAL,
        priority REAL,
        stage TEXT,
        features TEXT NOT NULL,
        withdrawn_ms INTEGER,
        withdrawn_by TEXT
    )""",
    """CREATE TABLE IF NOT EXISTS vetter_views (
        vetter TEXT NOT NULL,
        object_id TEXT NOT NULL,
        seen_ms INTEGER NOT NULL,
        seen_alert_id INTEGER,
        seen_priority REAL,
        seen_rank INTEGER,
        PRIMARY KEY (vetter, object_id)
    )""",
    # Failed logins to the web app, shared by all its worker processes (see stream.web).
    _LOGIN_FAILURES_DDL,
    _LOGIN_FAILURES_INDEX,
    "CREATE INDEX IF NOT EXISTS ix_ann_object ON annotations (object_id, event_mjd)",
    "CREATE INDEX IF NOT EXISTS ix_lc_object ON lightcurves (object_id)",
    "CREATE INDEX IF NOT EXISTS ix_dec_object ON decisions (object_id, decided_ms)",
    # Retention asks, per stored alert, "is it an object's latest?" and "was it vetted?".
    "CREATE INDEX IF NOT EXISTS ix_dec_alert ON decisions (alert_id)",
    "CREATE INDEX IF NOT EXISTS ix_obj_latest ON objects (latest_alert_id)",
    "CREATE INDEX IF NOT EXISTS ix_obj_updated ON objects (updated_ms)",
    "CREATE INDEX IF NOT EXISTS ix_obj_stage_prio ON objects (stage, COALESCE(priority, -1.0) DESC, object_id)",
    _SURVEY_CLOCK_INDEX,
    # Narrow covering index of every filtered column: the page's COUNT(*) reads it, not the wide rows.
    "CREATE INDEX IF NOT EXISTS ix_obj_filter ON objects (stage, p_real, p_extragalactic, p_fast, abs_gal_b, "
    "snoozed_mjd, latest_mjd, vetted_ms, ss_distance)",
] + [
    f"CREATE INDEX IF NOT EXISTS ix_obj_sort_{name} ON objects ({expr} {direction}, object_id)"
    for name, (expr, direction) in SORTS.items()
]


def _num(x):
    """float or None (NaN/inf → None, the store's 'missing')."""
    if x is None:
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _json_list(a) -> list:
    return [_num(v) for v in np.asarray(a, dtype=float)]


def is_url(target) -> bool:
    """True for a PostgreSQL connection URL (``postgresql://…`` or ``postgres://…``), not a file path.

    Raises
    ------
    ValueError
        For any other ``scheme://`` (a mistyped URL must not become a local SQLite file).
    """
    if not isinstance(target, str) or "://" not in target:
        return False
    scheme = target.split("://", 1)[0].lower()
    if scheme in ("postgresql", "postgres"):
        return True
    raise ValueError(f"queue store {redacted(target)!r}: unknown scheme {scheme!r} "
                     "(a SQLite file path, or a postgresql:// URL)")


def redacted(target) -> str:
    """The store for messages and logs: any URL password (``user:pw@``, ``password=pw``) replaced by ``***``."""
    text = re.sub(r"(://[^:/@]*:)[^/]*@", r"\1***@", str(target))
    return re.sub(r"(?i)(password=)[^&\s]*", r"\1***", text)


def _store_target(target):
    """A file path as :class:`~pathlib.Path`; a URL kept as text (Path would fold its ``//``)."""
    return target if is_url(target) else Path(target)


class _PgRow(tuple):
    """A result row readable by position and by column name, like :class:`sqlite3.Row`."""

    __slots__ = ()
    names: tuple = ()

    def __getitem__(self, key):
        if isinstance(key, str):
            return tuple.__getitem__(self, self.names.index(key))
        return tuple.__getitem__(self, key)

    def keys(self):
        return list(self.names)


def _pg_rows(cursor):
    names = tuple(d.name for d in cursor.description or ())
    cls = type("Row", (_PgRow,), {"__slots__": (), "names": names})
    return lambda values: cls(values)


# dialect: the SQLite text → PostgreSQL text rewrites (every statement here is ours, so a
# handful of exact rewrites suffice; there is no '?' or '%' inside any SQL string literal).
_PG_DDL_TYPES = [(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b", "BIGSERIAL PRIMARY KEY"), (r"\bINTEGER\b", "BIGINT"),
                 (r"\bREAL\b", "DOUBLE PRECISION"), (r"\bBLOB\b", "BYTEA"), (r"\bTEXT\b", 'TEXT COLLATE "C"')]
#: Any fixed number: all writers of one database take the same transaction-level lock.
_PG_WRITE_LOCK = 0x56494749


class _PgConnection:
    """The slice of the :class:`sqlite3.Connection` API this module uses, on psycopg 3."""

    def __init__(self, url: str):
        try:
            import psycopg
        except ImportError as exc:  # an optional extra: say how to get it
            raise MissingExtra("a postgresql:// queue store needs psycopg 3: pip install 'vigil[postgres]'") from exc
        self._pg = psycopg.connect(url, autocommit=True, row_factory=_pg_rows, connect_timeout=10)

    @staticmethod
    @functools.lru_cache(maxsize=512)  # the same few statements every batch: translate each once
    def _sql(sql: str) -> str:
        if re.match(r"\s*(CREATE TABLE|ALTER TABLE)", sql):
            for pat, new in _PG_DDL_TYPES:
                sql = re.sub(pat, new, sql)
        sql = sql.replace("excluded.priority IS objects.priority",
                          "excluded.priority IS NOT DISTINCT FROM objects.priority")
        sql = sql.replace(" IS ?", " IS NOT DISTINCT FROM ?")
        return sql.replace("?", "%s")

    def execute(self, sql: str, params=()):
        head = sql.lstrip()[:16].upper()
        if head.startswith("PRAGMA"):  # SQLite tuning; its busy timeout is PostgreSQL's lock timeout
            name, _, value = sql.strip()[len("PRAGMA"):].partition("=")
            if name.strip() == "busy_timeout":
                return self._pg.execute(f"SET lock_timeout = {int(value)}")
            return self._pg.cursor()
        if head.startswith("BEGIN"):  # BEGIN IMMEDIATE: a transaction that holds the write lock from the start
            self._pg.execute("BEGIN")
            try:
                return self._pg.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_WRITE_LOCK,))
            except BaseException:  # as in SQLite, a BEGIN that could not lock leaves no transaction open
                self._pg.execute("ROLLBACK")
                raise
        cur = self._pg.execute(self._sql(sql), tuple(params) if params else None)
        if head.startswith("COMMIT") and cur.statusmessage != "COMMIT":
            # PostgreSQL answers COMMIT of a failed transaction with ROLLBACK and no error.
            raise RuntimeError(f"the transaction was rolled back ({cur.statusmessage}), not committed")
        return cur

    def executemany(self, sql: str, rows):
        cur = self._pg.cursor()
        rows = list(rows)
        if rows:
            cur.executemany(self._sql(sql), rows)
        return cur

    def close(self) -> None:
        self._pg.close()


#: How long a batch waits, in all, for another writer to release the store's write lock
#: before the error stops the run: with one delivery timeout (305 s) before it, under the consumer's
#: max.poll.interval.ms (600 s, :data:`stream.kafka.MAX_POLL_INTERVAL_MS`), past which the consumer
#: would leave its group (nothing lost, but its partitions move).
LOCK_PATIENCE_S = 240.0


def _is_lock_wait(exc) -> bool:
    """A lock wait that timed out (SQLite "database is locked", PostgreSQL LockNotAvailable)."""
    return not isinstance(exc, sqlite3.OperationalError) or "locked" in str(exc) or "busy" in str(exc)


def _errors(pg_name: str) -> tuple:
    """``sqlite3.OperationalError`` and the named ``psycopg.errors`` class, where psycopg is installed.

    SQLite reports both a missing table and a lock wait that timed out as OperationalError;
    PostgreSQL has UndefinedTable and LockNotAvailable.
    """
    try:
        import psycopg
    except ImportError:
        return (sqlite3.OperationalError,)
    return sqlite3.OperationalError, getattr(psycopg.errors, pg_name)


class StoreOpenError(ValueError):
    """A SQLite path that is not a store (or cannot be opened): ``reason`` is SQLite's word for it."""

    def __init__(self, path, reason):
        self.reason = str(reason)
        super().__init__(f"queue store {path}: {self.reason}")


def connect(path, *, writer: bool = False):
    """Open the store, creating the schema if needed.

    Parameters
    ----------
    path : str or Path
        SQLite file (created if absent), or a ``postgresql://`` URL of an existing database.
    writer : bool
        The service's connection: ``synchronous=FULL`` so a commit survives power loss
        before the source acknowledges the batch (at-least-once). PostgreSQL commits are
        durable by default.

    Returns
    -------
    sqlite3.Connection or _PgConnection
        Rows readable by name and position; autocommit off (explicit transactions).
    """
    if is_url(path):
        conn = _PgConnection(path)
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        _ensure_schema(conn)
        return conn
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, so one batch is exactly one transaction.
    try:
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=False)
        conn.row_factory = sqlite3.Row
        # dialect: SQLite pragmas (Postgres: none needed)
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode=WAL")
    except (sqlite3.OperationalError, sqlite3.DatabaseError) as e:
        if "locked" in str(e) or "busy" in str(e):
            raise
        # "file is not a database", "unable to open database file": say which file
        raise StoreOpenError(path, e) from None
    conn.execute(f"PRAGMA synchronous={'FULL' if writer else 'NORMAL'}")
    conn.execute("PRAGMA foreign_keys=ON")
    _ensure_schema(conn)
    return conn


def analyze(conn) -> None:
    """Refresh the planner's statistics of ``objects`` so filtered and sorted lists pick good indexes.

    Without statistics (or with sampled ones) SQLite may sort a whole stage instead of
    walking the sort index, or count from the wide table instead of the covering index.
    A full pass costs ~0.1 s per 100,000 objects.
    """
    # dialect: Postgres autovacuum keeps its own statistics; this is a no-op there.
    conn.execute("PRAGMA analysis_limit=0")
    conn.execute("ANALYZE objects")


@contextmanager
def _write_transaction(conn):
    """One write transaction holding the write lock from its start: committed at the end,
    rolled back on any error (a COMMIT that fails included)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _ensure_schema(conn) -> None:
    row = None
    try:
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    except _errors("UndefinedTable"):  # fresh store: no meta table yet
        row = None
    if row is not None:
        version = int(row[0])
        if version > SCHEMA_VERSION or (version < SCHEMA_VERSION and version not in _MIGRATIONS):
            raise ValueError(f"queue store has schema version {version}, this Vigil expects {SCHEMA_VERSION}")
        if version < SCHEMA_VERSION:
            _migrate(conn)
        return
    with _write_transaction(conn):
        for stmt in _DDL:
            conn.execute(stmt)
        conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?) ON CONFLICT(key) DO NOTHING",
                     (str(SCHEMA_VERSION),))


def _migrate_4_to_5(conn) -> None:
    """Version 5 keeps each object's most likely source type (annotation schema 1.1), filled from
    its latest stored annotation where that has one."""
    conn.execute("ALTER TABLE objects ADD COLUMN source_type TEXT")
    conn.execute("ALTER TABLE objects ADD COLUMN source_type_p REAL")
    # dialect: JSON access
    pg = isinstance(conn, _PgConnection)
    for col, get in (("source_type", "a.record::json ->> 'source_type'" if pg else
                      "json_extract(a.record, '$.source_type')"),
                     ("source_type_p", "CAST(a.record::json ->> 'source_type_probability' AS DOUBLE PRECISION)"
                      if pg else "json_extract(a.record, '$.source_type_probability')")):
        conn.execute(f"UPDATE objects SET {col} = (SELECT {get} FROM annotations a WHERE "
                     "a.alert_id = objects.latest_alert_id AND a.model_version = objects.model_version)")


def _migrate_5_to_6(conn) -> None:
    """Version 6 keeps which of each object's scores are flagged as extrapolations (annotation schema
    1.2: few of their labels were alerts like it), filled from its latest stored annotation."""
    conn.execute("ALTER TABLE objects ADD COLUMN extrapolated TEXT")
    # dialect: JSON access (both give the array's JSON text; records before 1.2 give NULL)
    get = ("a.record::json ->> 'extrapolated'" if isinstance(conn, _PgConnection)
           else "json_extract(a.record, '$.extrapolated')")
    conn.execute(f"UPDATE objects SET extrapolated = (SELECT {get} FROM annotations a WHERE "
                 "a.alert_id = objects.latest_alert_id AND a.model_version = objects.model_version)")


def _migrate_6_to_7(conn) -> None:
    """Version 7 indexes each survey's newest alert: the surveys' own stream clocks, read on every page."""
    conn.execute(_SURVEY_CLOCK_INDEX)


def _migrate_3_to_4(conn) -> None:
    """Version 4 lets a vetter withdraw a decision: it stays in the log, marked, and counts no more."""
    conn.execute("ALTER TABLE decisions ADD COLUMN withdrawn_ms INTEGER")
    conn.execute("ALTER TABLE decisions ADD COLUMN withdrawn_by TEXT")


def _migrate_2_to_3(conn) -> None:
    """Version 3 keeps the web app's failed logins in the store, so all its workers share one limit."""
    conn.execute(_LOGIN_FAILURES_DDL)
    conn.execute(_LOGIN_FAILURES_INDEX)


def _migrate_1_to_2(conn) -> None:
    """Version 2 adds ``objects.ss_distance`` (filled in SQL from each object's latest stored
    annotation), puts it in the filter index, sorts "youngest" with NULLs last in both backends,
    and indexes what retention looks up."""
    conn.execute("ALTER TABLE objects ADD COLUMN ss_distance REAL")
    # dialect: JSON access (version-1 stores were SQLite only, but keep both honest)
    get = ("CAST(a.record::json -> 'features' ->> 'ss_distance' AS DOUBLE PRECISION)"
           if isinstance(conn, _PgConnection) else "json_extract(a.record, '$.features.ss_distance')")
    conn.execute(f"UPDATE objects SET ss_distance = (SELECT {get} FROM annotations a WHERE "
                 "a.alert_id = objects.latest_alert_id AND a.model_version = objects.model_version)")
    for name in ("ix_obj_filter", "ix_obj_sort_first"):  # same names, new definitions
        conn.execute(f"DROP INDEX IF EXISTS {name}")
    for stmt in _DDL:
        if stmt.startswith("CREATE INDEX") and stmt != _LOGIN_FAILURES_INDEX:  # (its table comes with version 3)
            conn.execute(stmt)


#: Upgrades of an older store, from the version they start at (each ends one version later).
_MIGRATIONS = {1: _migrate_1_to_2, 2: _migrate_2_to_3, 3: _migrate_3_to_4, 4: _migrate_4_to_5, 5: _migrate_5_to_6,
               6: _migrate_6_to_7}


def _migrate(conn) -> None:
    """Bring an older store up to :data:`SCHEMA_VERSION` in one transaction (writers wait on the lock)."""
    with _write_transaction(conn):
        # Another process may have migrated while we waited for the lock: read the version again.
        version = int(conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])
        while version < SCHEMA_VERSION:
            _MIGRATIONS[version](conn)
            version += 1
            log.info("queue store migrated to schema version %d", version)
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))


# --------------------------------------------------------------------------------------------- retention

# Alerts older than the horizon lose their stamps and light curves, unless they are the
# latest alert of their object (what the list and the object page show) or a vetter
# decided on them (the snapshot of what was seen). Stamps are ~90 % of a store's bytes.
# Written with EXISTS (index lookups per stored alert, an anti-join in PostgreSQL) over the
# pruned table itself, which retention keeps to the window: the cost does not grow with the
# annotation history.
_KEEP = """NOT EXISTS (SELECT 1 FROM objects o WHERE o.latest_alert_id = {table}.alert_id)
  AND NOT EXISTS (SELECT 1 FROM decisions d WHERE d.alert_id = {table}.alert_id)"""
_PRUNE_CANDIDATES = """
SELECT DISTINCT alert_id FROM {table} WHERE EXISTS (SELECT 1 FROM annotations a
    WHERE a.alert_id = {table}.alert_id AND a.event_mjd < ?)
  AND """ + _KEEP
# The same for one survey's alerts only (each survey is aged by its own clock).
_PRUNE_CANDIDATES_OF = """
SELECT DISTINCT alert_id FROM {table} WHERE EXISTS (SELECT 1 FROM annotations a
    WHERE a.alert_id = {table}.alert_id AND a.event_mjd < ?
      AND EXISTS (SELECT 1 FROM objects s WHERE s.object_id = a.object_id AND s.survey = ?))
  AND """ + _KEEP
_PRUNE_DELETE = "DELETE FROM {table} WHERE alert_id IN ({marks}) AND " + _KEEP
#: Alerts per delete transaction: each holds the write lock for a moment only, so the
#: service's writers never wait long behind retention.
PRUNE_CHUNK = 2000


def prune(conn, keep_days: float, now_mjd: float | None = None) -> dict:
    """Delete the cutouts and light curves of alerts more than ``keep_days`` old.

    Parameters
    ----------
    conn
        A store connection (:func:`connect`).
    keep_days : float
        Retention window in days (> 0).
    now_mjd : float, optional
        "Now"; default each survey's newest alert in the store (its stream clock, so a replayed
        archive keeps what it would have kept live, whatever other survey shares the store).

    Returns
    -------
    dict
        ``{"horizon_mjd": ..., "cutouts": n deleted, "lightcurves": n deleted}``; with the
        stream clock, ``horizon_mjd`` is the latest survey's horizon and ``horizons`` each one's.

    Notes
    -----
    Each object's latest alert and every alert a vetter decided on are kept whatever
    their age (checked again inside each delete, so a decision taken meanwhile still
    protects its alert); annotations (the score history) are never deleted. The
    candidates are read without the write lock and deleted in transactions of
    :data:`PRUNE_CHUNK` alerts. SQLite reuses the freed pages, so the file stops growing
    but does not shrink (``VACUUM`` does that).
    """
    if not keep_days > 0:
        raise ValueError(f"--keep-days must be > 0, not {keep_days!r}")
    out = {"horizon_mjd": None, "cutouts": 0, "lightcurves": 0}
    if now_mjd is not None:
        passes = [(_PRUNE_CANDIDATES, (float(now_mjd) - float(keep_days),))]
        out["horizon_mjd"] = float(now_mjd) - float(keep_days)
    else:
        clocks = survey_clocks(conn)
        if not clocks:  # empty store
            return out
        out["horizons"] = {sv: m - float(keep_days) for sv, m in clocks.items()}
        out["horizon_mjd"] = max(out["horizons"].values())
        passes = [(_PRUNE_CANDIDATES_OF, (h, sv)) for sv, h in out["horizons"].items()]
    for table in ("cutouts", "lightcurves"):
        ids = [r[0] for sql, params in passes
               for r in conn.execute(sql.format(table=table), params).fetchall()]
        for i in range(0, len(ids), PRUNE_CHUNK):
            chunk = ids[i:i + PRUNE_CHUNK]
            with _write_transaction(conn):
                sql = _PRUNE_DELETE.format(table=table, marks=",".join("?" * len(chunk)))
                out[table] += int(conn.execute(sql, chunk).rowcount)
    return out


#: Seconds of the writer's time between two :func:`age_priorities` passes (one more on close).
AGE_EVERY_S = 600.0
#: A stored priority is rewritten once it is off by more than this fraction (or its stage changed).
AGE_TOLERANCE = 0.005
# Every object not yet fully aged: its stage can still advance, or its priority is above the
# floor it tends to (long-term, freshness 0.5: a quarter of the scores' product).
_AGE_CANDIDATES = """
SELECT object_id, latest_alert_id, model_version, p_real, p_extragalactic, p_fast, priority, stage, first_mjd,
       latest_mjd, survey
FROM objects WHERE stage <> 'longterm'
   OR priority > ? * p_real * (0.35 + 0.65 * (1.0 - (1.0 - p_extragalactic) * (1.0 - p_fast)))"""
# Only if nothing changed since it was read (another writer's newer alert, or a rescore by another model).
_AGE_UPDATE = """UPDATE objects SET priority = ?, stage = ?
WHERE object_id = ? AND latest_alert_id = ? AND model_version = ? AND priority IS ? AND stage = ?"""


def _floats(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], float)


def survey_clocks(conn) -> dict:
    """``survey → MJD of its newest alert in the store``: each survey's stream clock.

    Surveys are separate streams with their own nights (a replay of ZTF 2018 beside Rubin 2025
    made every ZTF object seven years old, and the list's ranking by freshness meaningless).
    """
    return {r[0]: float(r[1]) for r in conn.execute(_SURVEY_CLOCKS) if r[0] is not None and r[1] is not None}


# The surveys by an index skip-scan (the next survey after the last), then each one's newest alert
# by the same index: 0.3 ms where GROUP BY read every row (50 ms for 600,000 objects in SQLite here).
_SURVEY_CLOCKS = """
WITH RECURSIVE s(survey) AS (
    SELECT MIN(survey) FROM objects
    UNION ALL
    SELECT (SELECT MIN(o.survey) FROM objects o WHERE o.survey > s.survey) FROM s WHERE s.survey IS NOT NULL)
SELECT survey, (SELECT MAX(o.latest_mjd) FROM objects o WHERE o.survey = s.survey) FROM s"""


def age_priorities(conn, now_mjd: float | None = None, stop=None) -> int:
    """Let the ranked list age: each object's priority and stage as of ``now_mjd``.

    An annotation's priority is that of its alert when it was annotated (freshness 1 for a
    live alert), so an object no new alert has updated would keep its rank for ever. Here
    the stage follows the time since the first detection (it only ever advances) and the
    freshness the time since the latest alert, with :func:`models.rank.priority`'s formula
    on the stored scores (an unscored object's stage only); the annotations themselves are
    not changed.

    Parameters
    ----------
    conn
        A store connection (:func:`connect`), for writing.
    now_mjd : float, optional
        "Now"; default each survey's newest alert in the store (:func:`survey_clocks`: the
        stream clock of a replay).
    stop : callable, optional
        Checked between transactions: True ends the pass (the next one goes on).

    Returns
    -------
    int
        Objects rewritten: those whose stage changed or whose priority moved by more than
        :data:`AGE_TOLERANCE` of itself. Read without the write lock (a full scan of the
        objects not yet fully aged: ~1.4 s per 300,000 young objects) and written in
        transactions of :data:`PRUNE_CHUNK` objects; an object that changed meanwhile (a
        newer alert, another model's scores) is left as it is. An object without a first
        detection time is aged from its latest alert, a lower bound on its age.
    """
    from models.rank import STAGES, URGENCY, priority, stage_of

    clocks = survey_clocks(conn) if now_mjd is None else {}
    if now_mjd is None and not clocks:  # empty store
        return 0
    floor = min(URGENCY.values()) * 0.5  # long-term urgency × the freshness of a long-past alert
    rows = conn.execute(_AGE_CANDIDATES, (floor * (1.0 + AGE_TOLERANCE),)).fetchall()
    if not rows:
        return 0
    oid, aid, model, p_r, p_x, p_f, old, stage, first, latest, survey = (list(c) for c in zip(*rows, strict=True))
    latest = np.asarray(latest, float)
    now = (np.full(len(rows), float(now_mjd)) if now_mjd is not None
           else np.array([clocks.get(sv, lt) for sv, lt in zip(survey, latest, strict=True)], float))
    first = np.array([lt if v is None else v for v, lt in zip(first, latest, strict=True)], float)
    rank = {s: i for i, s in enumerate(STAGES)}
    # A stage never goes back (a stored stage this Vigil does not know is left alone).
    new_stage = [s if rank.get(s, len(STAGES)) >= rank[str(n)] else str(n)
                 for s, n in zip(stage, stage_of(now - first), strict=True)]
    new = priority(_floats(p_r), _floats(p_x), _floats(p_f), new_stage, now - latest)
    was = _floats(old)
    moved = np.array(new_stage) != np.array(stage)
    moved |= np.isfinite(new) & np.isfinite(was) & (np.abs(new - was) > AGE_TOLERANCE * np.abs(was))
    # An unscored object (priority NULL) keeps its NULL; only its stage moves.
    todo = [(float(new[i]) if old[i] is not None and np.isfinite(new[i]) else old[i], new_stage[i], oid[i], aid[i],
             model[i], old[i], stage[i]) for i in np.flatnonzero(moved)]
    done = 0
    for i in range(0, len(todo), PRUNE_CHUNK):
        if stop is not None and stop():
            break
        with _write_transaction(conn):
            conn.executemany(_AGE_UPDATE, todo[i:i + PRUNE_CHUNK])
        done += len(todo[i:i + PRUNE_CHUNK])
    return done


# --------------------------------------------------------------------------------------------- writing


def sparkline_points(mjd, band, flux, kind, width: float = 80.0, height: float = 20.0,
                     window: float = 60.0) -> dict:
    """Detections of one light curve scaled into a ``width × height`` box, per band.

    Parameters
    ----------
    mjd, band, flux, kind : array-like
        Light-curve columns (see :class:`stream.alert.LightCurve`).
    width, height : float
        Box size in SVG user units.
    window : float
        Days before the latest detection to include.

    Returns
    -------
    dict
        ``band → "x,y x,y ..."`` (SVG ``polyline`` points; y grows downwards). Empty if
        there is no finite detection.
    """
    mjd, flux, kind = (np.asarray(a, dtype=float) for a in (mjd, flux, kind))
    band = np.asarray(band).astype(str)
    det = ((kind == 0) | (kind == 1)) & np.isfinite(flux) & np.isfinite(mjd)
    if not det.any():
        return {}
    # The last ``window`` days only: a years-long history would squash the recent evolution.
    det &= mjd >= mjd[det].max() - window
    t, f, b = mjd[det], flux[det], band[det]
    t0, t1 = t.min(), t.max()
    lo, hi = min(f.min(), 0.0), f.max()
    sx = (width - 4) / (t1 - t0) if t1 > t0 else 0.0
    sy = (height - 4) / (hi - lo) if hi > lo else 0.0
    out = {}
    for name in sorted(set(b)):
        sel = np.argsort(t[b == name])
        tb, fb = t[b == name][sel], f[b == name][sel]
        xs = 2 + (tb - t0) * sx if sx else np.full(len(tb), width / 2)
        ys = height - 2 - (fb - lo) * sy if sy else np.full(len(fb), height / 2)
        out[name] = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys, strict=True))
    return out


def lightcurve_blob(lc, corrected=None) -> str:
    """JSON text of a light curve's plotting columns (NaN → null).

    ``corrected`` is the per-point HSR-corrected flux, aligned with ``lc``, or None.
    """
    data = {
        "mjd": _json_list(lc.mjd),
        "band": [str(b) for b in lc.band],
        "flux": _json_list(lc.flux),
        "flux_err": _json_list(lc.flux_err),
        "kind": [int(k) for k in lc.kind],
        "flux_corrected": _json_list(corrected) if corrected is not None else None,
    }
    return json.dumps(data, separators=(",", ":"), allow_nan=False)


_UPSERT_ANNOTATION = """
INSERT INTO annotations (alert_id, model_version, object_id, event_mjd, processing_time_ms, written_ms, status,
                         p_real, p_extragalactic, p_fast, priority, stage, record)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (alert_id, model_version) DO UPDATE SET
    object_id = excluded.object_id, event_mjd = excluded.event_mjd,
    processing_time_ms = excluded.processing_time_ms, written_ms = excluded.written_ms,
    status = excluded.status, p_real = excluded.p_real, p_extragalactic = excluded.p_extragalactic,
    p_fast = excluded.p_fast, priority = excluded.priority, stage = excluded.stage, record = excluded.record
WHERE annotations.object_id = excluded.object_id
"""
# Rows are keyed by alert id. A redelivered alert updates its own rows; an alert id that comes
# back under another object (a colliding or crafted id) must not take over this object's
# annotation, light curve or stamps, so it changes nothing (stamps of an alert never change).
_UPSERT_LIGHTCURVE = """
INSERT INTO lightcurves (alert_id, object_id, data) VALUES (?, ?, ?)
ON CONFLICT (alert_id) DO UPDATE SET data = excluded.data WHERE lightcurves.object_id = excluded.object_id
"""

_UPSERT_CUTOUT = """
INSERT INTO cutouts (alert_id, kind, data) VALUES (?, ?, ?)
ON CONFLICT (alert_id, kind) DO NOTHING
"""

# The object row follows its newest alert (by event time, then alert id); an older alert
# redelivered late updates history but never rolls the object back.
_UPSERT_OBJECT = """
INSERT INTO objects (object_id, survey, ra, dec, gal_b, abs_gal_b, latest_alert_id, latest_mjd, first_mjd, band, mag,
                     status, p_real, p_extragalactic, p_fast, priority, stage, model_version, n_det, spark,
                     updated_ms, ss_distance, source_type, source_type_p, extrapolated)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (object_id) DO UPDATE SET
    survey = excluded.survey, ra = excluded.ra, dec = excluded.dec, gal_b = excluded.gal_b,
    abs_gal_b = excluded.abs_gal_b, latest_alert_id = excluded.latest_alert_id, latest_mjd = excluded.latest_mjd,
    first_mjd = excluded.first_mjd, band = excluded.band, mag = excluded.mag, status = excluded.status,
    p_real = excluded.p_real, p_extragalactic = excluded.p_extragalactic, p_fast = excluded.p_fast,
    -- the same alert scored by the same model again (a redelivery): its aged priority and stage stand
    priority = CASE WHEN excluded.latest_alert_id = objects.latest_alert_id
                         AND excluded.model_version = objects.model_version THEN objects.priority
                    ELSE excluded.priority END,
    stage = CASE WHEN excluded.latest_alert_id = objects.latest_alert_id
                      AND excluded.model_version = objects.model_version THEN objects.stage
                 ELSE excluded.stage END,
    model_version = excluded.model_version,
    n_det = excluded.n_det, spark = excluded.spark, ss_distance = excluded.ss_distance,
    source_type = excluded.source_type, source_type_p = excluded.source_type_p, extrapolated = excluded.extrapolated,
    -- dialect: "IS" (null-safe equality) -> IS NOT DISTINCT FROM
    updated_ms = CASE WHEN excluded.latest_alert_id = objects.latest_alert_id
                           AND (excluded.model_version = objects.model_version
                                OR excluded.priority IS objects.priority) THEN objects.updated_ms
                      ELSE excluded.updated_ms END
WHERE excluded.latest_mjd > objects.latest_mjd
   OR (excluded.latest_mjd = objects.latest_mjd AND excluded.latest_alert_id >= objects.latest_alert_id)
"""

_UPSERT_VIEW = """
INSERT INTO vetter_views (vetter, object_id, seen_ms, seen_alert_id, seen_priority, seen_rank)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (vetter, object_id) DO UPDATE SET seen_ms = excluded.seen_ms, seen_alert_id = excluded.seen_alert_id,
    seen_priority = excluded.seen_priority, seen_rank = COALESCE(excluded.seen_rank, vetter_views.seen_rank)
"""

_COUNT_ALERTS = """
UPDATE objects SET n_alerts = (SELECT COUNT(DISTINCT a.alert_id) FROM annotations a
                               WHERE a.object_id = objects.object_id)
WHERE object_id = ?
"""


def _galactic_b(record: dict) -> float | None:
    b = _num((record.get("features") or {}).get("galactic_latitude"))
    if b is None:
        from models.features import galactic_latitude

        b = _num(galactic_latitude([record["ra"]], [record["dec"]])[0])
    return b


def object_row(record: dict, spark: dict, now_ms: int) -> tuple:
    """Parameters of :data:`_UPSERT_OBJECT` for one annotation record."""
    b = _galactic_b(record)
    lcs = record.get("lightcurve") or {}
    return (
        record["object_id"], record["survey"], float(record["ra"]), float(record["dec"]), b,
        abs(b) if b is not None else None, int(record["alert_id"]), float(record["event_mjd"]),
        _num(lcs.get("first_mjd")), record.get("band"), _num(lcs.get("mag")), record["status"],
        _num(record.get("p_real")), _num(record.get("p_extragalactic")), _num(record.get("p_fast")),
        _num(record.get("priority")), record["stage"], record.get("model_version", "none"),
        int(lcs.get("n_detections") or 0), json.dumps(spark, separators=(",", ":")), now_ms,
        _num((record.get("features") or {}).get("ss_distance")),
        record.get("source_type"), _num(record.get("source_type_probability")),
        json.dumps(record.get("extrapolated") or [], separators=(",", ":")),
    )


def annotation_row(record: dict, now_ms: int) -> tuple:
    """Parameters of :data:`_UPSERT_ANNOTATION` for one annotation record."""
    return (
        int(record["alert_id"]), record.get("model_version", "none"), record["object_id"],
        float(record["event_mjd"]), int(record.get("processing_time_ms") or now_ms), now_ms, record["status"],
        _num(record.get("p_real")), _num(record.get("p_extragalactic")), _num(record.get("p_fast")),
        _num(record.get("priority")), record["stage"],
        json.dumps(record, separators=(",", ":"), allow_nan=False),
    )


class QueueSink:
    """Annotation sink for :func:`stream.service.drive` that fills the eyeball-queue store.

    Parameters
    ----------
    path : str or Path
        SQLite file, or ``postgresql://`` URL; the schema is created if absent.
    retention_days : float
        If > 0, every :attr:`PRUNE_EVERY` committed batches the stamps and light curves of
        alerts older than this are deleted (see :func:`prune`); 0 keeps everything.
    clock : {"stream", "wall"}
        The pipeline's clock, which the list ages by (:func:`age_priorities`, after the first
        batch, every :data:`AGE_EVERY_S` seconds and on closing): the wall clock live, the
        newest alert in the store for a replay.

    Notes
    -----
    ``write_result`` opens one transaction per batch and ``flush`` commits it, so a
    batch is all-or-nothing and durable (``synchronous=FULL``) before the source
    acknowledges it. Every write is an upsert keyed by alert id, so redelivered
    batches are harmless. If the batch result carries ``corrected_flux`` (per alert,
    the HSR-corrected flux aligned with ``alert.lightcurve``), it is stored beside
    the raw flux for the "after HSR" plot.
    """

    #: ``write_result`` takes the store's write lock until ``flush``: the service writes this
    #: sink after its Kafka outputs are flushed (:func:`stream.service.drive`).
    holds_write_lock = True

    #: Refresh planner statistics every this many committed batches.
    ANALYZE_EVERY = 50
    #: Apply the retention window every this many committed batches.
    PRUNE_EVERY = 50

    def __init__(self, path, retention_days: float = 0.0, clock: str = "stream"):
        if retention_days < 0:
            raise ValueError(f"retention_days must be ≥ 0, not {retention_days!r}")
        if clock not in ("stream", "wall"):
            raise ValueError(f"clock must be 'stream' or 'wall', not {clock!r}")
        self.clock = clock
        self._aged_at, self._unaged = -math.inf, False
        self.path = _store_target(path)
        self.retention_days = float(retention_days)
        self.conn = connect(self.path, writer=True)
        self._in_tx = False
        self._flushes = 0
        self.n_written = 0
        #: Set by the service to its stop flag: stop waiting for the write lock (the batch, its
        #: offsets not stored, is read again after a restart).
        self.give_up = lambda: False

    def write_result(self, result, records=None) -> None:
        """Stage one pipeline batch (``BatchResult``) in the current transaction.

        Parameters
        ----------
        result : stream.pipeline.BatchResult
            ``annotations`` and ``alerts`` aligned lists.
        records : list of dict, optional
            ``annotation.to_record()`` for each annotation (computed if omitted).
        """
        anns = list(result.annotations)
        alerts = list(getattr(result, "alerts", []) or [])
        if records is None:
            records = [a.to_record() for a in anns]
        if not records:
            return
        corrected = getattr(result, "corrected_flux", None)
        now_ms = int(time.time() * 1000)
        ann_rows, obj_rows, lc_rows, cut_rows = [], [], [], []
        for i, rec in enumerate(records):
            alert = alerts[i] if i < len(alerts) else None
            spark = {}
            if alert is not None:
                lc = alert.lightcurve
                corr = corrected[i] if corrected is not None and i < len(corrected) else None
                lc_rows.append((int(rec["alert_id"]), rec["object_id"], lightcurve_blob(lc, corr)))
                spark = sparkline_points(lc.mjd, lc.band, lc.flux if corr is None else corr, lc.kind)
                for kind in CUTOUT_KINDS:
                    data = (alert.cutouts or {}).get(kind)
                    if data:
                        cut_rows.append((int(rec["alert_id"]), kind, bytes(data), rec["object_id"]))
            ann_rows.append(annotation_row(rec, now_ms))
            obj_rows.append(object_row(rec, spark, now_ms))
        self._begin()
        c = self.conn
        try:
            ann_rows, lc_rows, cut_rows, obj_rows = self._own_ids(ann_rows, lc_rows, cut_rows, obj_rows)
            c.executemany(_UPSERT_ANNOTATION, ann_rows)
            c.executemany(_UPSERT_LIGHTCURVE, lc_rows)
            c.executemany(_UPSERT_CUTOUT, [r[:3] for r in cut_rows])
            c.executemany(_UPSERT_OBJECT, obj_rows)
            c.executemany(_COUNT_ALERTS, [(oid,) for oid in sorted({r[0] for r in obj_rows})])
        except BaseException:
            self._rollback()  # all or nothing: a later flush()/close() must not commit half a batch
            raise
        self.n_written += len(records)

    def _own_ids(self, ann_rows, lc_rows, cut_rows, obj_rows):
        """The rows less those of alerts whose id another object already holds (in the store, or
        earlier in the batch): a colliding or crafted id must not point an object at another's
        annotation, light curve and stamps, nor, under another model version, put its own
        annotation on that object's page. The first object to bring an id keeps it."""
        ids = sorted({int(r[0]) for r in ann_rows})
        owner: dict[int, str] = {}
        for lo in range(0, len(ids), 500):
            chunk = ids[lo:lo + 500]
            for r in self.conn.execute("SELECT DISTINCT alert_id, object_id FROM annotations WHERE alert_id IN "
                                       f"({','.join('?' * len(chunk))})", chunk):
                owner.setdefault(int(r[0]), r[1])
        keep = []
        for r in ann_rows:
            keep.append(owner.setdefault(int(r[0]), r[2]) == r[2])
        if all(keep):
            return ann_rows, lc_rows, cut_rows, obj_rows
        dropped = [(r[0], r[2]) for r, k in zip(ann_rows, keep, strict=True) if not k]
        log.warning("queue store: %d alert(s) not stored, their ids held by another object (first: alert %s of %r, "
                    "held by %r)", len(dropped), dropped[0][0], dropped[0][1], owner[int(dropped[0][0])])
        bad = set(dropped)
        return ([r for r, k in zip(ann_rows, keep, strict=True) if k],
                [r for r in lc_rows if (r[0], r[1]) not in bad],
                [r for r in cut_rows if (r[0], r[3]) not in bad],
                [r for r in obj_rows if (r[6], r[0]) not in bad])

    def write(self, records) -> None:
        """Plain-record path (no alerts: no light curve, cutouts or sparkline)."""
        from types import SimpleNamespace

        self.write_result(SimpleNamespace(annotations=[], alerts=[]), list(records))

    def _rollback(self) -> None:
        try:
            self.conn.execute("ROLLBACK")
        except Exception as exc:  # the database already rolled back itself (e.g. disk full)
            log.debug("ROLLBACK after a failed batch: %s", exc)
        finally:
            self._in_tx = False

    def _begin(self) -> None:
        if self._in_tx:
            return
        # Take the write lock now, not mid-batch. Another writer (a retention pass, a replay
        # into this store, a VACUUM) may hold it past the busy timeout: wait on, with a warning,
        # rather than stop the service (its batch is safe: offsets move only after this).
        waited_s, pause_s = 0.0, 1.0
        while True:
            t0 = time.monotonic()
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                break
            except _errors("LockNotAvailable") as exc:
                waited_s += time.monotonic() - t0
                if not _is_lock_wait(exc) or waited_s >= LOCK_PATIENCE_S or self.give_up():
                    raise
                log.warning("queue store %s: another writer has held the write lock for %.0f s; waiting on",
                            redacted(str(self.path)), waited_s)
                end = time.monotonic() + pause_s
                while time.monotonic() < end and not self.give_up():  # a stop signal ends the wait at once
                    time.sleep(0.2)
                waited_s += pause_s
                pause_s = min(2 * pause_s, 30.0)
        self._in_tx = True

    def flush(self) -> None:
        """Commit the open batch; durable on return."""
        if self._in_tx:
            self.conn.execute("COMMIT")
            self._in_tx = False
            self._flushes += 1
            if self._flushes % self.ANALYZE_EVERY == 1:  # first batch, then every ANALYZE_EVERY
                self._analyze()
            if self.retention_days and self._flushes % self.PRUNE_EVERY == 0:
                self._prune()
            self._unaged = True
            if time.monotonic() - self._aged_at >= AGE_EVERY_S:
                self._age()

    def idle(self) -> None:
        """Called while the stream is quiet: the list goes on ageing (a day without alerts included)."""
        if self.conn is not None and not self._in_tx and time.monotonic() - self._aged_at >= AGE_EVERY_S:
            self._age()

    def _age(self) -> None:
        """Age the ranked list (:func:`age_priorities`); like pruning, a failure is only logged."""
        self._aged_at, self._unaged = time.monotonic(), False
        if self.give_up():  # stopping: the next start ages the list (a pass would only scan, not write)
            return
        now = time.time() / 86400.0 + 40587.0 if self.clock == "wall" else None
        try:
            n = age_priorities(self.conn, now, stop=self.give_up)
        except Exception as exc:
            log.warning("queue ageing skipped this time: %s", exc)
            return
        log.debug("queue ageing: %d objects re-ranked", n)

    def _analyze(self) -> None:
        """Refresh the planner's statistics; like pruning, a failure (a lock held by a reader) is only logged."""
        try:
            analyze(self.conn)
        except Exception as exc:
            log.warning("queue ANALYZE skipped this time: %s", exc)

    def _prune(self) -> None:
        """Apply the retention window; a failure is logged and retried later, never raised (the batch is safe)."""
        try:
            done = prune(self.conn, self.retention_days)
        except Exception as exc:  # e.g. the lock wait timed out behind another writer
            log.warning("queue retention skipped this time: %s", exc)
            return
        log.info("queue retention (%.1f d): deleted %d stamps, %d light curves of alerts before %s",
                 self.retention_days, done["cutouts"], done["lightcurves"], horizons_text(done))

    def close(self) -> None:
        """Commit and close."""
        if self.conn is not None:
            self.flush()
            if self._unaged:
                self._age()
            if self._flushes:
                self._analyze()
            self.conn.close()
            self.conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is not None and self._in_tx:
            self._rollback()
        self.close()


# --------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ListQuery:
    """Filters, sort and page of the ranked list.

    Parameters
    ----------
    stage : str or None
        ``first``, ``updating`` or ``longterm``; None for all.
    min_p_real, min_p_extragalactic, min_p_fast : float or None
        Score thresholds (unscored objects never pass a threshold).
    sky : {"all", "galactic", "extragalactic"}
    sky_by : {"latitude", "score"}
        Split by ``|b|`` against ``b_cut`` degrees, or by ``p_extragalactic`` ≥ 0.5.
    sort : str
        A key of :data:`SORTS`.
    show_snoozed, hide_vetted : bool
    hide_known_sso : bool
        Leave out objects whose latest alert is within :data:`KNOWN_SSO_ARCSEC` of a known
        solar-system object.
    page, per_page : int
        1-based page number and page size.
    """

    stage: str | None = None
    min_p_real: float | None = None
    min_p_extragalactic: float | None = None
    min_p_fast: float | None = None
    sky: str = "all"
    sky_by: str = "latitude"
    b_cut: float = 15.0
    sort: str = "priority"
    show_snoozed: bool = False
    hide_vetted: bool = False
    hide_known_sso: bool = False
    page: int = 1
    per_page: int = 50

    def where(self) -> tuple[str, list]:
        """SQL ``WHERE`` clause (without the keyword) and its parameters."""
        sql, args = [], []
        if self.stage in STAGES:
            sql.append("stage = ?")
            args.append(self.stage)
        for name in SCORES:
            v = getattr(self, f"min_{name}")
            if v is not None:
                sql.append(f"{name} >= ?")
                args.append(float(v))
        if self.sky in ("galactic", "extragalactic"):
            if self.sky_by == "score":
                sql.append("p_extragalactic >= 0.5" if self.sky == "extragalactic" else "p_extragalactic < 0.5")
            else:
                sql.append("abs_gal_b >= ?" if self.sky == "extragalactic" else "abs_gal_b < ?")
                args.append(float(self.b_cut))
        if not self.show_snoozed:
            sql.append("(snoozed_mjd IS NULL OR latest_mjd > snoozed_mjd)")
        if self.hide_vetted:
            sql.append("vetted_ms IS NULL")
        if self.hide_known_sso:
            sql.append("(ss_distance IS NULL OR ss_distance > ?)")
            args.append(KNOWN_SSO_ARCSEC)
        return (" AND ".join(sql) or "1=1"), args

    @property
    def rows_per_page(self) -> int:
        """``per_page`` as served: 1 … :data:`MAX_PAGE_ROWS`."""
        return max(1, min(int(self.per_page), MAX_PAGE_ROWS))

    def order(self, reverse: bool = False) -> str:
        expr, direction = SORTS.get(self.sort, SORTS["priority"])
        if reverse:
            direction = "ASC" if direction == "DESC" else "DESC"
        return f"{expr} {direction}, object_id {'DESC' if reverse else 'ASC'}"


def _object_dict(row) -> dict:
    """An objects row as a dict, its ``extrapolated`` JSON text as a list (empty before schema 6)."""
    d = dict(row)
    if "extrapolated" in d:
        d["extrapolated"] = json.loads(d["extrapolated"]) if d["extrapolated"] else []
    return d


#: Columns the list page needs (objects table only: the list never touches history).
LIST_COLUMNS = ("object_id, survey, ra, dec, gal_b, latest_alert_id, latest_mjd, first_mjd, band, mag, status, "
                "p_real, p_extragalactic, p_fast, priority, stage, n_alerts, n_det, spark, updated_ms, "
                "snoozed_mjd, vet_real, vet_extragalactic, vet_follow_up, vetted_by, ss_distance, source_type, "
                "source_type_p, extrapolated")


@dataclass(frozen=True)
class ListPage:
    """One page of the ranked list."""

    rows: list
    total: int
    page: int
    per_page: int
    seen: dict = field(default_factory=dict)  # object_id -> vetter_views row (the vetter's last look)

    @property
    def n_pages(self) -> int:
        """Number of pages (at least 1)."""
        return max(1, -(-self.total // self.per_page))


@dataclass(frozen=True)
class Decision:
    """One recorded vetting action."""

    decision_id: int
    object_id: str
    alert_id: int | None
    vetter: str
    decided_ms: int
    action: str


class QueueStore:
    """Read side of the queue (and the vetters' writes), for the web app and the exporter.

    Parameters
    ----------
    path : str or Path
        The SQLite file (or ``postgresql://`` URL) the sink writes.
    """

    def __init__(self, path):
        self.path = _store_target(path)
        self.conn = connect(self.path)

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    # -- list
    def list_objects(self, q: ListQuery, vetter: str | None = None) -> ListPage:
        """One page of objects, ranked by ``q.sort``, with the vetter's previous look."""
        where, args = q.where()
        per = q.rows_per_page
        page = max(1, int(q.page))
        rows = self.conn.execute(
            f"SELECT {LIST_COLUMNS} FROM objects WHERE {where} ORDER BY {q.order()} LIMIT ? OFFSET ?",
            [*args, per, (page - 1) * per]).fetchall()
        total = self.conn.execute(f"SELECT COUNT(*) FROM objects WHERE {where}", args).fetchone()[0]
        seen = self.seen(vetter, [r["object_id"] for r in rows]) if vetter else {}
        return ListPage([_object_dict(r) for r in rows], int(total), page, per, seen)

    def seen(self, vetter: str, object_ids) -> dict:
        """``object_id → vetter_views`` row for the given objects."""
        ids = list(object_ids)
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.conn.execute(f"SELECT * FROM vetter_views WHERE vetter = ? AND object_id IN ({marks})",
                                 [vetter, *ids]).fetchall()
        return {r["object_id"]: dict(r) for r in rows}

    def record_views(self, vetter: str, rows, first_rank: int = 1, with_rank: bool = True) -> None:
        """Remember that ``vetter`` has now seen these list rows (time, alert, priority, rank)."""
        now = int(time.time() * 1000)
        params = [(vetter, r["object_id"], now, r["latest_alert_id"], r["priority"],
                   first_rank + i if with_rank else None) for i, r in enumerate(rows)]
        if not params:
            return
        # Best effort with a short wait: "seen" marks must never stall a page while the service writes.
        self.conn.execute("PRAGMA busy_timeout=250")
        try:
            self._write(lambda c: c.executemany(_UPSERT_VIEW, params))
        except _errors("LockNotAvailable") as exc:  # locked by the writer: skip this time
            log.info("vetter views not recorded (%s)", exc)
        finally:
            self.conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

    def page_of(self, object_id: str, q: ListQuery) -> int | None:
        """1-based page of the list ``q`` that holds ``object_id``; None if the list leaves it out."""
        expr, direction = SORTS.get(q.sort, SORTS["priority"])
        where, args = q.where()
        cur = self.conn.execute(f"SELECT {expr} AS k FROM objects WHERE object_id = ? AND {where}",
                                [object_id, *args]).fetchone()
        if cur is None:
            return None
        before = ">" if direction == "DESC" else "<"  # ties broken by object_id ascending, as the list
        ahead = int(self.conn.execute(
            f"SELECT COUNT(*) FROM objects WHERE {where} AND ({expr} {before} ? OR ({expr} = ? AND object_id < ?))",
            [*args, cur["k"], cur["k"], object_id]).fetchone()[0])
        return ahead // q.rows_per_page + 1

    def neighbour(self, object_id: str, q: ListQuery, step: int = 1) -> str | None:
        """The object after (``step=1``) or before (``-1``) ``object_id`` in the list order."""
        expr, direction = SORTS.get(q.sort, SORTS["priority"])
        cur = self.conn.execute(f"SELECT {expr} AS k FROM objects WHERE object_id = ?", (object_id,)).fetchone()
        if cur is None:
            return None
        forward = step > 0
        # "after" in a DESC order means a smaller key; ties broken by object_id ascending.
        smaller = (direction == "DESC") == forward
        cmp, idcmp = ("<" if smaller else ">"), (">" if forward else "<")
        where, args = q.where()
        row = self.conn.execute(
            f"SELECT object_id FROM objects WHERE {where} AND ({expr} {cmp} ? OR ({expr} = ? AND object_id {idcmp} ?))"
            f" ORDER BY {q.order(reverse=not forward)} LIMIT 1", [*args, cur["k"], cur["k"], object_id]).fetchone()
        return row["object_id"] if row else None

    def changes_since(self, since_ms: int) -> int:
        """Number of objects created or updated after ``since_ms`` (for the polling banner)."""
        return int(self.conn.execute("SELECT COUNT(*) FROM objects WHERE updated_ms > ?",
                                     (int(since_ms),)).fetchone()[0])

    def newest_mjd(self) -> float | None:
        """Latest event time in the store, of any survey."""
        row = self.conn.execute("SELECT MAX(latest_mjd) FROM objects").fetchone()
        return row[0]

    def survey_clocks(self) -> dict:
        """Each survey's newest event time (its stream clock, which its objects' ages are read against)."""
        return survey_clocks(self.conn)

    def n_objects(self) -> int:
        """Number of objects in the store."""
        return int(self.conn.execute("SELECT COUNT(*) FROM objects").fetchone()[0])

    # -- object page
    def get_object(self, object_id: str) -> dict | None:
        """The object row plus its latest annotation record, light curve and alert history."""
        row = self.conn.execute("SELECT * FROM objects WHERE object_id = ?", (object_id,)).fetchone()
        if row is None:
            return None
        obj = _object_dict(row)
        # Each by alert id *and* object (alert ids are the survey's; see _own_ids); the stamps have no
        # object of their own: they are the object's if its light curve of that alert is.
        aid = obj["latest_alert_id"]
        ann = self.conn.execute(
            "SELECT record FROM annotations WHERE alert_id = ? AND object_id = ? "
            "ORDER BY processing_time_ms DESC, written_ms DESC LIMIT 1", (aid, object_id)).fetchone()
        obj["record"] = json.loads(ann["record"]) if ann else {}
        lc = self.conn.execute("SELECT data FROM lightcurves WHERE alert_id = ? AND object_id = ?",
                               (aid, object_id)).fetchone()
        obj["lightcurve"] = json.loads(lc["data"]) if lc else None
        stored = {r["kind"] for r in self.conn.execute("SELECT kind FROM cutouts WHERE alert_id = ?", (aid,))} \
            if lc else set()
        obj["cutout_kinds"] = [k for k in CUTOUT_KINDS if k in stored]
        obj["history"] = [dict(r) for r in self.conn.execute(
            "SELECT alert_id, model_version, event_mjd, status, p_real, p_extragalactic, p_fast, priority, stage "
            "FROM annotations WHERE object_id = ? ORDER BY event_mjd DESC, alert_id DESC LIMIT 200", (object_id,))]
        obj["decisions"] = [dict(r) for r in self.conn.execute(
            "SELECT decision_id, vetter, decided_ms, action, alert_id, withdrawn_ms, withdrawn_by FROM decisions "
            "WHERE object_id = ? ORDER BY decision_id DESC LIMIT 50", (object_id,))]
        return obj

    def cutout(self, alert_id: int, kind: str) -> bytes | None:
        """The stored FITS stamp (as received) of one alert, or None."""
        row = self.conn.execute("SELECT data FROM cutouts WHERE alert_id = ? AND kind = ?",
                                (int(alert_id), kind)).fetchone()
        return bytes(row["data"]) if row else None

    # -- decisions
    def record_decision(self, object_id: str, action: str, vetter: str, alert_id: int | None = None,
                        note: str = "") -> Decision:
        """Store one vetting action with a snapshot of what the vetter saw.

        Parameters
        ----------
        object_id : str
        action : str
            A key of :data:`ACTIONS`.
        vetter : str
        alert_id : int, optional
            The alert shown to the vetter; its annotation is the snapshot. Defaults to
            the object's latest alert.
        note : str

        Returns
        -------
        Decision

        Raises
        ------
        KeyError
            Unknown object or action.
        """
        if action not in ACTIONS:
            raise KeyError(f"unknown action {action!r}")
        vetter = (vetter or "").strip()[:80] or "anonymous"

        def tx(c):
            # The time under the write lock: decisions that waited for it keep their commit order.
            now = int(time.time() * 1000)
            obj = c.execute("SELECT latest_alert_id, latest_mjd FROM objects WHERE object_id = ?",
                            (object_id,)).fetchone()
            if obj is None:
                raise KeyError(f"unknown object {object_id!r}")
            aid = int(alert_id) if alert_id is not None else int(obj["latest_alert_id"])
            ann = c.execute("SELECT * FROM annotations WHERE alert_id = ? AND object_id = ? "
                            "ORDER BY processing_time_ms DESC, written_ms DESC LIMIT 1", (aid, object_id)).fetchone()
            if ann is None:
                raise KeyError(f"alert {aid} is not an alert of {object_id!r}")
            rec = json.loads(ann["record"])
            column, value = ACTIONS[action]
            labels = {"is_real": None, "is_extragalactic": None, "follow_up": None, "snooze": None, column: value}
            cur = c.execute(
                """INSERT INTO decisions (object_id, alert_id, vetter, decided_ms, action, is_real, is_extragalactic,
                       follow_up, snooze, note, model_version, status, p_real, p_extragalactic, p_fast, priority,
                       stage, features)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING decision_id""",
                (object_id, aid, vetter, now, action, labels["is_real"], labels["is_extragalactic"],
                 labels["follow_up"], labels["snooze"], note[:2000], ann["model_version"], ann["status"],
                 ann["p_real"], ann["p_extragalactic"], ann["p_fast"], ann["priority"], ann["stage"],
                 json.dumps(rec.get("features") or {}, separators=(",", ":"))))
            decision_id = int(cur.fetchone()[0])
            if column == "snooze":
                # Up to the alert the vetter saw, not the object's latest: an alert that arrived after
                # the page was drawn has not been seen and must not be hidden.
                seen = float(rec.get("event_mjd", obj["latest_mjd"]))
                c.execute("UPDATE objects SET snoozed_mjd = CASE WHEN snoozed_mjd IS NULL OR snoozed_mjd < ? "
                          "THEN ? ELSE snoozed_mjd END WHERE object_id = ?", (seen, seen, object_id))
            else:
                c.execute(f"UPDATE objects SET {_VET_COLUMNS[column]} = ?, vetted_ms = ?, vetted_by = ? "
                          "WHERE object_id = ?", (value, now, vetter, object_id))
            return Decision(decision_id, object_id, aid, vetter, now, action)

        return self._write(tx)

    def withdraw_decision(self, decision_id: int, vetter: str) -> dict:
        """Withdraw one vetting decision (a mis-key, a change of mind): it stays in the log, marked.

        The object's vetting state is then what its other standing decisions say: each
        question's latest standing answer (or none), and a snooze up to the latest alert a
        standing snooze saw (or none). A withdrawn decision is no label for retraining.

        Parameters
        ----------
        decision_id : int
        vetter : str
            Who withdraws it (any vetter may: the log keeps both names).

        Returns
        -------
        dict
            The object's vetting state after it: ``object_id``, ``decision_id``, ``action``,
            ``withdrawn_ms``, ``vet_real``, ``vet_extragalactic``, ``vet_follow_up``,
            ``snoozed_mjd``.

        Raises
        ------
        KeyError
            Unknown decision.
        ValueError
            Already withdrawn.
        """
        vetter = (vetter or "").strip()[:80] or "anonymous"

        def tx(c):
            now = int(time.time() * 1000)
            d = c.execute("SELECT object_id, action, withdrawn_ms FROM decisions WHERE decision_id = ?",
                          (int(decision_id),)).fetchone()
            if d is None:
                raise KeyError(f"unknown decision {decision_id}")
            if d["withdrawn_ms"] is not None:
                raise ValueError(f"decision {decision_id} was already withdrawn")
            object_id, (column, _) = d["object_id"], ACTIONS[d["action"]]
            c.execute("UPDATE decisions SET withdrawn_ms = ?, withdrawn_by = ? WHERE decision_id = ?",
                      (now, vetter, int(decision_id)))
            standing = "object_id = ? AND withdrawn_ms IS NULL"
            if column == "snooze":
                seen = c.execute("SELECT MAX(a.event_mjd) FROM decisions d JOIN annotations a ON "
                                 "a.alert_id = d.alert_id AND a.object_id = d.object_id WHERE d.object_id = ? "
                                 "AND d.withdrawn_ms IS NULL AND d.snooze IS NOT NULL", (object_id,)).fetchone()[0]
                c.execute("UPDATE objects SET snoozed_mjd = ? WHERE object_id = ?", (seen, object_id))
            else:
                # "Latest" in commit order, as record_decision left it (ids are handed out under the
                # write lock; clocks of several web hosts need not agree).
                last = c.execute(f"SELECT {column} FROM decisions WHERE {standing} AND {column} IS NOT NULL "
                                 "ORDER BY decision_id DESC LIMIT 1", (object_id,)).fetchone()
                latest = c.execute(f"SELECT decided_ms, vetter FROM decisions WHERE {standing} AND snooze IS NULL "
                                   "ORDER BY decision_id DESC LIMIT 1", (object_id,)).fetchone()
                c.execute(f"UPDATE objects SET {_VET_COLUMNS[column]} = ?, vetted_ms = ?, vetted_by = ? "
                          "WHERE object_id = ?", (last[0] if last else None, latest[0] if latest else None,
                                                  latest[1] if latest else None, object_id))
            obj = c.execute("SELECT vet_real, vet_extragalactic, vet_follow_up, snoozed_mjd FROM objects "
                            "WHERE object_id = ?", (object_id,)).fetchone()
            return {"object_id": object_id, "decision_id": int(decision_id), "action": d["action"],
                    "withdrawn_ms": now, **(dict(obj) if obj is not None else {})}

        return self._write(tx)

    def _write(self, fn):
        """Run ``fn(conn)`` in one write transaction."""
        with _write_transaction(self.conn) as c:
            return fn(c)

    # -- failed logins (the web app's throttle)
    def login_failures(self, address: str, window_ms: int, now_ms: int | None = None) -> int:
        """Failed (or undecided) logins from ``address`` within the last ``window_ms``, by every process."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        return int(self.conn.execute("SELECT COUNT(*) FROM login_failures WHERE address = ? AND failed_ms > ?",
                                     (address, now - window_ms)).fetchone()[0])

    def begin_login(self, address: str, window_ms: int, limit: int, max_rows: int,
                    now_ms: int | None = None) -> int | None:
        """Count one login attempt from ``address`` as failed until :meth:`login_succeeded` says otherwise.

        In one write transaction: refused (None) if ``limit`` failures of the window are already
        there, else recorded; so concurrent guesses in any number of worker processes cannot all
        pass the check before any of them is counted. Failures out of the window are forgotten,
        and past ``max_rows`` (a flood from many addresses) the oldest.

        Returns
        -------
        int or None
            The attempt's id, or None when the address must wait.
        """
        now = int(time.time() * 1000) if now_ms is None else now_ms

        def tx(c):
            c.execute("DELETE FROM login_failures WHERE failed_ms <= ?", (now - window_ms,))
            n = c.execute("SELECT COUNT(*) FROM login_failures WHERE address = ?", (address,)).fetchone()[0]
            if int(n) >= limit:
                return None
            attempt = int(c.execute("INSERT INTO login_failures (address, failed_ms) VALUES (?, ?) "
                                    "RETURNING attempt_id", (address, now)).fetchone()[0])
            if int(c.execute("SELECT COUNT(*) FROM login_failures").fetchone()[0]) > max_rows:
                cut = c.execute("SELECT attempt_id FROM login_failures ORDER BY attempt_id DESC LIMIT 1 OFFSET ?",
                                (max_rows - 1,)).fetchone()[0]
                c.execute("DELETE FROM login_failures WHERE attempt_id < ?", (cut,))
            return attempt

        return self._write(tx)

    def login_succeeded(self, attempt: int) -> None:
        """The attempt begun by :meth:`begin_login` gave the right token: it is no failure."""
        self._write(lambda c: c.execute("DELETE FROM login_failures WHERE attempt_id = ?", (attempt,)))

    # -- labels
    def labels_frame(self):
        """All standing (not withdrawn) decisions as a labelled feature table (pandas DataFrame).

        Columns: ``decision_id, object_id, alert_id, vetter, decided_at`` (UTC),
        ``decided_ms, action, is_real, is_extragalactic, follow_up, snooze, note``, the
        score snapshot ``model_version, status, p_real, p_extragalactic, p_fast,
        priority, stage`` and then one column per feature, named as in
        :data:`models.features.FEATURES` (so training code can select them directly).
        """
        import pandas as pd

        rows = [dict(r) for r in self.conn.execute("SELECT * FROM decisions WHERE withdrawn_ms IS NULL "
                                                   "ORDER BY decision_id")]
        fixed = ["decision_id", "object_id", "alert_id", "vetter", "decided_at", "decided_ms", "action", "is_real",
                 "is_extragalactic", "follow_up", "snooze", "note", "model_version", "status", *SCORES, "priority",
                 "stage"]
        feats = [json.loads(r.pop("features") or "{}") for r in rows]
        names: list = []
        for f in feats:
            names.extend(k for k in f if k not in names)
        try:
            from models.features import FEATURES

            names = [n for n in FEATURES if n in names] + [n for n in names if n not in FEATURES]
        except ImportError:  # the store is usable without the models package
            pass
        cols = {c: [r.get(c) for r in rows] for c in fixed if c != "decided_at"}
        df = pd.DataFrame(cols, columns=[c for c in fixed if c != "decided_at"])
        df.insert(4, "decided_at", pd.to_datetime(df["decided_ms"], unit="ms", utc=True))
        for c in ("is_real", "is_extragalactic", "follow_up", "snooze"):
            df[c] = df[c].astype("Int8")
        df["alert_id"] = df["alert_id"].astype("Int64")
        for c in (*SCORES, "priority"):
            df[c] = df[c].astype(float)
        for n in names:
            key = n if n not in fixed else f"feature_{n}"  # never shadow a decision column
            df[key] = np.array([_num(f.get(n)) if f.get(n) is not None else np.nan for f in feats], dtype=float)
        return df


def export_labels(db, out) -> int:
    """Write all standing (not withdrawn) decisions to ``out`` (``.parquet`` or ``.csv``); return the row count."""
    out = Path(out)
    if out.suffix not in (".parquet", ".csv"):
        raise ValueError(f"--out must end in .parquet or .csv, not {out.name!r}")
    if not is_url(db) and not Path(db).exists():
        raise FileNotFoundError(f"no such queue store: {db}")
    store = QueueStore(db)
    try:
        df = store.labels_frame()
    finally:
        store.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        df.to_parquet(out, index=False)
    else:
        import pandas as pd

        # Text from vetters and alerts opened in a spreadsheet: a cell starting with = + - @ (or a
        # tab or carriage return) would run as a formula, so it is written with a leading quote.
        for c in [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]:
            df[c] = df[c].map(lambda v: "'" + v if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r")
                              else v)
        df.to_csv(out, index=False)
    return len(df)


# --------------------------------------------------------------------------------------------- CLI


def cmd_serve(args) -> int:
    import secrets

    from stream.web import create_app, gunicorn_base, queue_token

    if not is_url(args.db) and not Path(args.db).exists():
        # Not refused: the web page may start before the service that fills the store (compose).
        print(f"vigil queue: warning: {args.db} does not exist; serving an empty queue that `vigil run` or "
              "`vigil replay --queue` will fill (check the path if you meant an existing store)", flush=True)
    token = queue_token(args.token, args.token_file)
    if token and len(token) < 16:  # it guards every decision; a short one is guessed (logins are throttled, not barred)
        print(f"vigil queue: warning: the access token has {len(token)} characters; use 16 or more "
              "(e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(18))')", file=sys.stderr, flush=True)
    if not token:
        # Never serve unauthenticated: make a one-off token and tell the operator.
        token = secrets.token_urlsafe(18)
        print(f"vigil queue: no --token/VIGIL_QUEUE_TOKEN given; this run's token is: {token}", flush=True)
    if args.workers:  # said before "serving", not after it
        gunicorn_base()
    app = create_app(args.db, token=token, clock=args.clock, secure_cookie=args.secure_cookie,
                     proxy_hops=args.proxy_hops, model=args.model)
    how = f"{args.workers} gunicorn workers" if args.workers else "the built-in server (one machine; --workers N "\
        "for a team)"
    print(f"vigil queue: serving {redacted(args.db)} on http://{args.host}:{args.port}/ with {how}", flush=True)
    if args.workers:
        from stream.web import serve_workers

        serve_workers(app, args.host, args.port, args.workers)
    else:
        app.run(host=args.host, port=args.port, threaded=True, debug=False, use_reloader=False)
    return 0


def cmd_export(args) -> int:
    n = export_labels(args.db, args.out)
    print(f"wrote {n} decisions to {args.out}")
    return 0


def horizons_text(done: dict) -> str:
    """The horizon a :func:`prune` cut at, in words (one per survey where each had its own clock)."""
    if "horizons" in done:
        return ", ".join(f"{sv} MJD {h:.4f}" for sv, h in sorted(done["horizons"].items()))
    return f"MJD {done['horizon_mjd']}"


def cmd_prune(args) -> int:
    if not is_url(args.db) and not Path(args.db).exists():
        raise FileNotFoundError(f"no such queue store: {args.db}")
    conn = connect(_store_target(args.db), writer=True)
    try:
        done = prune(conn, args.keep_days, args.now_mjd)
        if args.vacuum and not is_url(args.db):
            conn.execute("VACUUM")
    finally:
        conn.close()
    print(f"deleted {done['cutouts']} stamps and {done['lightcurves']} light curves of alerts before "
          f"{horizons_text(done)} (each object's latest alert and vetted alerts kept)")
    return 0


def cmd_ingest(args) -> int:
    from stream.cli import _check_writable, _decoder, _scorer, _stopped, drive_stoppable, files_to_read
    from stream.pipeline import Pipeline
    from stream.service import Progress
    from stream.sources import FileSource, count_files

    files = files_to_read(args.paths)
    if not is_url(args.db):  # a missing folder is refused, as replay's outputs are
        _check_writable([("--db", args.db)], files)
    pipeline = Pipeline(_decoder(args), scorer=_scorer(args), clock="stream")
    progress = Progress(count_files(files), enabled=False if args.no_progress else None)
    counts, signame = drive_stoppable(FileSource(files, args.batch_size, expanded=True), pipeline,
                                      [QueueSink(args.db)], [], progress)
    if signame is not None:  # (the store commits per batch: a batch is in it whole or not at all)
        return _stopped(counts, signame)
    for note in counts.clock_notes():
        print(note, file=sys.stderr)
    print(counts.line())
    return 0


def type_words(source_type, ss_distance=None) -> str:
    """A source type in a vetter's words. "Asteroid" where no known solar-system object is near
    says so: the shipped model calls most lone, hostless detections asteroids (its simulated sky
    leaves more asteroids uncatalogued than the real one), so the words must not pass for a match."""
    from models.score import SOURCE_TYPES

    words = SOURCE_TYPES.get(source_type, source_type)
    if source_type == "asteroid" and not (ss_distance is not None and ss_distance <= KNOWN_SSO_ARCSEC):
        words = "asteroid (none known here)"
    return words


def type_text(source_type, p, ss_distance=None) -> str:
    """A source type as the list shows it: ``"CV outburst 0.71"``, or ``"--"`` without one."""
    if not source_type:
        return "--"
    words = type_words(source_type, ss_distance)
    return f"{words} {p:.2f}" if p is not None else words


#: How the list and the object page name a score that is extrapolated.
_SCORE_WORDS = {"p_real": "P(real)", "p_extragalactic": "P(extragalactic)", "p_fast": "P(fast)",
                "source_type": "the source type"}


def extrapolated_text(names) -> str:
    """``"P(extragalactic), P(fast) and the source type"`` for the scores an annotation flags as
    extrapolated (few of their labels were alerts like it); ``""`` for none."""
    words = [_SCORE_WORDS.get(n, n) for n in names]
    return " and ".join([", ".join(words[:-1]), words[-1]]) if len(words) > 1 else "".join(words)


def ranked_lines(rows) -> list:
    """The ranked list as terminal lines (``vigil queue list``, ``vigil demo``).

    Each row is a dict with ``object_id, survey, band, mag, stage, p_real, p_extragalactic,
    p_fast, priority, ss_distance`` (and ``source_type, source_type_p, extrapolated`` where known) and,
    optionally, ``age_days`` (a column then) and the vetting columns of the store
    (``vet_real, vet_extragalactic, vet_follow_up, vetted_by``).
    """
    ages = any("age_days" in r for r in rows)
    head = (f"{'#':>3} {'object':<20} {'survey':<6} {'band':<4} {'mag':>6} {'stage':<9} "
            + (f"{'age/d':>6} " if ages else "") + f"{'P(real)':>7} {'P(xgal)':>7} {'P(fast)':>7} {'priority':>8}"
            + f"  {'type if real':<32}").rstrip()
    out = [head, "-" * len(head)]

    def num(x, w, d=2):
        return f"{x:{w}.{d}f}" if x is not None else f"{'--':>{w}}"

    for i, r in enumerate(rows, 1):
        notes = []
        if r.get("ss_distance") is not None and r["ss_distance"] <= KNOWN_SSO_ARCSEC:
            notes.append("known asteroid")
        calls = [c for c, v in (("real", r.get("vet_real") == 1), ("bogus", r.get("vet_real") == 0),
                                ("xgal", r.get("vet_extragalactic") == 1),
                                ("galactic", r.get("vet_extragalactic") == 0),
                                ("follow-up", r.get("vet_follow_up") == 1)) if v]
        if r.get("extrapolated"):
            notes.append(f"extrapolated: {extrapolated_text(r['extrapolated'])}")
        if calls:
            notes.append(f"vetted {'/'.join(calls)} (last by {r.get('vetted_by')})")
        prio = num(r["priority"], 8, 3) if r["priority"] is not None else "unscored"
        mag = num(r["mag"], 6) if r["mag"] is not None else "  neg."  # flux ≤ 0 in the difference image, as on the page
        line = (f"{i:>3} {r['object_id']:<20} {r['survey']:<6} {r['band'] or '':<4} {mag} {r['stage'] or '':<9} "
                + (f"{num(r.get('age_days'), 6, 1)} " if ages else "")
                + f"{num(r['p_real'], 7)} {num(r['p_extragalactic'], 7)} {num(r['p_fast'], 7)} {prio}"
                + f"  {type_text(r.get('source_type'), r.get('source_type_p'), r.get('ss_distance')):<32}"
                + (f"  {'; '.join(notes)}" if notes else ""))
        out.append(line.rstrip())
    return out


def cmd_list(args) -> int:
    """The ranked list in a terminal (or as JSON), as the web page's first page shows it."""
    if args.b_cut is not None and args.sky == "all":  # (it was ignored: a filter that did nothing)
        raise ValueError("--b-cut is the latitude cut of --sky galactic|extragalactic; give --sky too")
    if not is_url(args.db) and not Path(args.db).exists():
        raise FileNotFoundError(f"no such queue store: {args.db}")
    q = ListQuery(stage=args.stage, min_p_real=args.min_p_real, min_p_extragalactic=args.min_p_extragalactic,
                  min_p_fast=args.min_p_fast, sort=args.sort, hide_vetted=args.hide_vetted,
                  hide_known_sso=args.hide_known_sso, per_page=args.top, sky=args.sky,
                  b_cut=15.0 if args.b_cut is None else args.b_cut)
    rows, total, clocks = listed(args.db, q)
    if args.json:
        from stream.sinks import print_json

        print_json({"total": total, "newest_mjd": max(clocks.values(), default=None),
                    "newest_mjd_by_survey": clocks, "rows": rows})
        return 0
    print("\n".join(ranked_lines(rows)))
    ages = ", ".join(f"{sv} MJD {m:.4f}" for sv, m in sorted(clocks.items()))
    print(f"{len(rows)} of {total} objects" + (f"; ages against each survey's newest alert ({ages})" if clocks else ""))
    return 0


def listed(db, q: ListQuery) -> tuple:
    """``(rows, total, {survey: newest MJD})`` of the ranked list ``q`` in store ``db``: what
    ``queue list`` prints; each row's ``age_days`` is read against its survey's newest alert."""
    store = QueueStore(db)
    try:
        page, clocks = store.list_objects(q), store.survey_clocks()
    finally:
        store.close()
    keep = ("object_id", "survey", "ra", "dec", "band", "mag", "stage", "status", *SCORES, "priority", "n_alerts",
            "latest_alert_id", "latest_mjd", "vet_real", "vet_extragalactic", "vet_follow_up", "vetted_by",
            "ss_distance", "source_type", "source_type_p", "extrapolated")
    rows = [{k: r[k] for k in keep} for r in page.rows]
    for r in rows:
        now = clocks.get(r["survey"])
        r["age_days"] = None if now is None or r["latest_mjd"] is None else now - float(r["latest_mjd"])
    return rows, page.total, clocks


def _count(text: str) -> int:
    """argparse type: a whole number ≥ 0."""
    import argparse

    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (0, 1, 2, ...)")
    return int(text)


def _finite(lo: float, hi: float, what: str = ""):
    """argparse type: a number in [lo, hi] (NaN and ±inf refused: a filter of them matched nothing);
    ``what`` names such a number in the message ("a probability")."""
    def parse(text: str) -> float:
        import argparse
        import math

        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(v) and lo <= v <= hi):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what or 'a number'} ({lo:g} to {hi:g})")
        return v

    return parse


#: argparse type: a probability in [0, 1].
_probability = _finite(0.0, 1.0, "a probability")


def _top(text: str) -> int:
    """argparse type: rows of ``queue list`` (1–500, the page size the store serves)."""
    n = _positive(text)
    if n > MAX_PAGE_ROWS:
        import argparse

        raise argparse.ArgumentTypeError(f"{text!r}: at most {MAX_PAGE_ROWS} rows (page through the web queue "
                                         "for more)")
    return n




def _positive(text: str) -> int:
    """argparse type: a whole number ≥ 1."""
    n = _count(text)
    if n < 1:
        import argparse

        raise argparse.ArgumentTypeError(f"{text!r} is not a count ≥ 1")
    return n


def port_number(text: str) -> int:
    """argparse type: a TCP port (1–65535)."""
    if not (text.isdigit() and 1 <= int(text) <= 65535):
        import argparse

        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1–65535)")
    return int(text)


def register(subparsers) -> None:
    """Add ``vigil queue serve|list|export-labels|prune|ingest``."""
    from stream.cli import _add_decoder_args

    p = subparsers.add_parser("queue", help="the human eyeball queue (web app, labels export)")
    sub = p.add_subparsers(dest="queue_command", required=True)

    s = sub.add_parser("serve", help="serve the ranked list and vetting pages")
    s.add_argument("--db", required=True,
                   help="queue store: SQLite file or postgresql:// URL (written by the service's queue sink)")
    s.add_argument("--port", type=port_number, default=8765, help="default %(default)s")
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--token", help="access token (default: the contents of --token-file, then "
                                   "$VIGIL_QUEUE_TOKEN, else random)")
    s.add_argument("--token-file", help="file holding the access token")
    s.add_argument("--workers", type=_count, default=0,
                   help="serve with gunicorn, this many worker processes (default 0: Flask's built-in server)")
    s.add_argument("--clock", choices=("stream", "wall"), default="stream",
                   help="ages relative to the newest alert in the store (stream) or to now (wall)")
    s.add_argument("--secure-cookie", action="store_true",
                   help="send the login cookie over HTTPS only (set it behind a TLS-terminating proxy)")
    s.add_argument("--proxy-hops", type=_count, default=0, metavar="N",
                   help="trust X-Forwarded-For/-Proto from N reverse proxies (default 0), so that failed-login "
                        "limits apply per client, not to the proxy")
    s.add_argument("--model", metavar="DIR", help="model directory for the object page's typical-conditions "
                                                  "scores (default: the shipped model; the service's [scoring] model)")
    s.set_defaults(func=cmd_serve)

    li = sub.add_parser("list", help="the top of the ranked list in the terminal (or --json)")
    li.add_argument("--db", required=True, help="queue store: SQLite file or postgresql:// URL")
    li.add_argument("--top", type=_top, default=20, help="rows to show (1–500; default 20)")
    li.add_argument("--stage", choices=STAGES)
    li.add_argument("--sort", choices=sorted(SORTS), default="priority",
                    help="priority or a score (highest first), latest (newest alert first), first (most "
                         "recently discovered first: by first detection), mag (brightest first)")
    for name in SCORES:
        li.add_argument(f"--min-{name.replace('_', '-')}", type=_probability, metavar="P", dest=f"min_{name}",
                        help=f"only objects with {name} ≥ P (0–1)")
    li.add_argument("--sky", choices=("all", "galactic", "extragalactic"), default="all",
                    help="by Galactic latitude: |b| below --b-cut (galactic) or not (as the web page's filter)")
    li.add_argument("--b-cut", type=_finite(0.0, 90.0), default=None, metavar="DEG",
                    help="latitude cut of --sky (default 15)")
    li.add_argument("--hide-vetted", action="store_true")
    li.add_argument("--hide-known-sso", action="store_true", help="leave out known asteroids")
    li.add_argument("--json", action="store_true")
    li.set_defaults(func=cmd_list)

    e = sub.add_parser("export-labels", help="vetting decisions as a labelled feature table")
    e.add_argument("--db", required=True)
    e.add_argument("--out", required=True, help="labels.parquet or labels.csv")
    e.set_defaults(func=cmd_export)

    r = sub.add_parser("prune", help="delete stamps and light curves of old alerts (retention)")
    r.add_argument("--db", required=True)
    r.add_argument("--keep-days", type=float, required=True, help="retention window in days")
    r.add_argument("--now-mjd", type=_finite(0.0, 1e6), help="'now' (default: the newest alert in the store)")
    r.add_argument("--vacuum", action="store_true",
                   help="SQLite: also shrink the file (rewrites it under the write lock: stop the service first)")
    r.set_defaults(func=cmd_prune)

    i = sub.add_parser("ingest", help="annotate archived alerts straight into the queue store")
    i.add_argument("paths", nargs="+")
    i.add_argument("--db", required=True)
    i.add_argument("--batch-size", type=_positive, default=500)
    i.add_argument("--no-progress", action="store_true")
    i.add_argument("--model", help="scorer model directory (default: the shipped models/default_model)")
    _add_decoder_args(i)
    i.set_defaults(func=cmd_ingest)

"""The eyeball queue: store, sink, decisions, labels export and the web app's auth and pages.

Real alerts from ``tests/data`` (or ``../shared/data``) go through the real pipeline and
the real sink into a real SQLite file in ``tmp_path``.
"""

from __future__ import annotations

import copy
import json
import re
import sqlite3
import struct
import zlib
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import DATA, SHARED

from stream.alert import Envelope
from stream.pipeline import Pipeline
from stream.queue import (
    LIST_COLUMNS,
    ListQuery,
    QueueSink,
    QueueStore,
    export_labels,
    sparkline_points,
)

TOKEN = "test-token-123"


def _alert_files() -> list:
    files = sorted(p for d in ("ztf_fink", "ztf_ampel", "rubin_fink") for p in (DATA / d).rglob("*.avro"))
    if not files:
        files = sorted((SHARED / "ztf_alerts_fink_broker").rglob("*.avro"))[:200]
    return files


@pytest.fixture(scope="module")
def batch():
    """(BatchResult, records) for every sample alert: one real pipeline batch."""
    files = _alert_files()
    if not files:
        pytest.skip(f"no real alerts in {DATA} or {SHARED / 'ztf_alerts_fink_broker'}")
    result = Pipeline().process([Envelope(p.read_bytes(), str(p)) for p in files])
    assert result.annotations, "the sample alerts should decode"
    return result, [a.to_record() for a in result.annotations]


@pytest.fixture
def db(tmp_path, batch):
    result, records = batch
    path = tmp_path / "queue.sqlite"
    with QueueSink(path) as sink:
        sink.write_result(result, records)
        sink.flush()
    return path


def _counts(path) -> dict:
    c = sqlite3.connect(path)
    try:
        return {t: c.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                for t in ("objects", "annotations", "lightcurves", "cutouts", "decisions")}
    finally:
        c.close()


def _unscored(record: dict, object_id: str, alert_id: int) -> dict:
    r = copy.deepcopy(record)
    r.update(object_id=object_id, alert_id=alert_id, status="unscored", p_real=None, p_extragalactic=None,
             p_fast=None, priority=None, explanation=[], explanation_text={})
    return r


# ------------------------------------------------------------------------------------------ store and sink


def test_a_store_that_is_not_one_is_named(tmp_path):
    from stream.queue import connect
    from stream.web import queue_token

    notdb = tmp_path / "annotations.jsonl"
    notdb.write_text("{}\n" * 100)
    for path, why in ((notdb, "file is not a database"), (tmp_path, "unable to open database file")):
        with pytest.raises(ValueError, match=f"^queue store {re.escape(str(path))}: {why}$"):
            connect(path)
    with pytest.raises(ValueError, match="^token file /nonexistent/tok: cannot be read"):
        queue_token(token_file="/nonexistent/tok")


def test_upsert_is_idempotent(tmp_path, batch, db):
    result, records = batch
    before = _counts(db)
    assert before["annotations"] == len(records)
    assert before["objects"] == len({r["object_id"] for r in records})
    assert before["lightcurves"] == len(records)
    assert before["cutouts"] == sum(len([k for k in a.cutouts if a.cutouts[k]]) for a in result.alerts)
    assert before["cutouts"] > 0
    n_alerts = dict(sqlite3.connect(db).execute("SELECT object_id, n_alerts FROM objects").fetchall())
    # Redelivery: the same batch again, in a new sink (a restarted service), and twice in one transaction.
    with QueueSink(db) as sink:
        sink.write_result(result, records)
        sink.write_result(result, records)
        sink.flush()
    assert _counts(db) == before
    assert dict(sqlite3.connect(db).execute("SELECT object_id, n_alerts FROM objects").fetchall()) == n_alerts


def test_an_alert_id_that_comes_back_under_another_object_takes_nothing_over(tmp_path, batch, db):
    result, records = batch
    i = next(k for k, a in enumerate(result.alerts) if a.cutouts)
    victim = records[i]
    c = sqlite3.connect(db)
    before = {t: c.execute(f"SELECT * FROM {t} WHERE alert_id = ?", (victim["alert_id"],)).fetchall()
              for t in ("annotations", "lightcurves", "cutouts")}
    c.close()
    # Another object's alert with the same id (and stamps of its own), written through the full path.
    other = result.alerts[(i + 1) % len(records)]
    intruder = dict(copy.deepcopy(records[(i + 1) % len(records)]), alert_id=victim["alert_id"])
    with QueueSink(db) as sink:
        sink.write_result(type(result)(annotations=[None], alerts=[other]), [intruder])
        sink.flush()
    c = sqlite3.connect(db)
    after = {t: c.execute(f"SELECT * FROM {t} WHERE alert_id = ?", (victim["alert_id"],)).fetchall()
             for t in ("annotations", "lightcurves", "cutouts")}
    c.close()
    assert after["lightcurves"] == before["lightcurves"] and after["cutouts"] == before["cutouts"]
    assert [r[2] for r in after["annotations"]] == [victim["object_id"]]  # (alert_id, model_version, object_id, ...)
    assert after["annotations"] == before["annotations"]
    # Nor under another model version, and the intruder's object is not pointed at the victim's rows (a
    # review: its page showed the victim's record, light curve and stamps; under another model, the
    # victim's page showed the intruder's explanations).
    again = dict(intruder, model_version="other-model-v2")
    with QueueSink(db) as sink:
        sink.write_result(type(result)(annotations=[None], alerts=[other]), [again])
        sink.flush()
    c = sqlite3.connect(db)
    assert c.execute("SELECT DISTINCT object_id FROM annotations WHERE alert_id = ?",
                     (victim["alert_id"],)).fetchall() == [(victim["object_id"],)]
    assert c.execute("SELECT COUNT(*) FROM objects WHERE latest_alert_id = ? AND object_id <> ?",
                     (victim["alert_id"], victim["object_id"])).fetchone()[0] == 0
    c.close()
    store = QueueStore(db)
    try:
        page = store.get_object(victim["object_id"])
        assert page["record"]["object_id"] == victim["object_id"]
        assert page["record"]["model_version"] != "other-model-v2"
        theirs = store.get_object(intruder["object_id"])
        if theirs is not None:  # the intruder's object from the batch: its own rows only
            assert theirs["latest_alert_id"] != victim["alert_id"]
            assert theirs["record"].get("object_id", intruder["object_id"]) == intruder["object_id"]
    finally:
        store.close()


def test_a_batch_that_fails_half_way_is_not_committed_by_close(tmp_path, batch, monkeypatch):
    import stream.queue as q

    result, records = batch
    path = tmp_path / "q.sqlite"
    QueueSink(path).close()  # the schema, empty
    sink = QueueSink(path)
    monkeypatch.setattr(q, "_UPSERT_OBJECT", "INSERT INTO no_such_table VALUES (?)")  # fails after the annotations
    with pytest.raises(sqlite3.Error):
        sink.write_result(result, records)
    sink.close()  # what drive() does on its way out
    assert _counts(path)["annotations"] == 0


def test_drive_closes_every_sink_and_keeps_the_first_error():
    from stream.service import drive

    closed = []

    class Source:
        def batches(self):
            raise ValueError("the broker went away")
            yield

        def close(self):
            closed.append("source")

    class Sink:
        def __init__(self, name, fail):
            self.name, self.fail = name, fail

        def write(self, records):
            pass

        def flush(self):
            pass

        def close(self):
            closed.append(self.name)
            if self.fail:
                raise RuntimeError("flush on close failed")

    with pytest.raises(ValueError, match="broker went away"):
        drive(Source(), Pipeline(hsr=False), [Sink("a", True), Sink("b", False)])
    assert closed == ["source", "a", "b"]


def test_sink_plugs_into_drive(tmp_path):
    from stream.service import drive
    from stream.sources import MemorySource

    files = _alert_files()[:20]
    if not files:
        pytest.skip("no real alerts")
    path = tmp_path / "q.sqlite"
    source = MemorySource([p.read_bytes() for p in files], batch_size=7)
    counts = drive(source, Pipeline(), [QueueSink(path)])
    assert counts.annotated == _counts(path)["annotations"] > 0
    assert len(source.acked) == len(files)


def test_list_is_ordered_by_priority_and_unscored_last(tmp_path, batch, db):
    _, records = batch
    with QueueSink(db) as sink:
        sink.write([_unscored(records[0], "UNSCORED-1", 1)])
        sink.flush()
    store = QueueStore(db)
    page = store.list_objects(ListQuery(per_page=500))
    prio = [r["priority"] for r in page.rows]
    scored = [p for p in prio if p is not None]
    assert scored == sorted(scored, reverse=True)
    assert prio[-1] is None and page.rows[-1]["object_id"] == "UNSCORED-1"
    # The object row carries its latest alert's priority.
    latest = _latest_records(records)
    top = page.rows[0]
    assert top["priority"] == pytest.approx(max(r["priority"] for r in latest.values()))
    assert top["latest_alert_id"] == latest[top["object_id"]]["alert_id"]
    # Unscored objects never pass a score threshold and never get a priority of 0.
    assert all(r["object_id"] != "UNSCORED-1" for r in store.list_objects(ListQuery(min_p_real=0.0)).rows)
    store.close()


def test_filters_and_paging(db, batch):
    store = QueueStore(db)
    everything = store.list_objects(ListQuery(per_page=500)).rows
    for stage in ("first", "longterm"):
        rows = store.list_objects(ListQuery(stage=stage, per_page=500)).rows
        assert rows and {r["stage"] for r in rows} == {stage}
    hi = store.list_objects(ListQuery(min_p_real=0.5, per_page=500)).rows
    assert all(r["p_real"] >= 0.5 for r in hi) and len(hi) < len(everything)
    xgal = store.list_objects(ListQuery(sky="extragalactic", b_cut=20, per_page=500)).rows
    gal = store.list_objects(ListQuery(sky="galactic", b_cut=20, per_page=500)).rows
    assert all(abs(r["gal_b"]) >= 20 for r in xgal) and all(abs(r["gal_b"]) < 20 for r in gal)
    assert len(xgal) + len(gal) == len(everything)
    by_score = store.list_objects(ListQuery(sky="extragalactic", sky_by="score", per_page=500)).rows
    assert all(r["p_extragalactic"] >= 0.5 for r in by_score)
    mags = [r["mag"] for r in store.list_objects(ListQuery(sort="mag", per_page=500)).rows if r["mag"] is not None]
    assert mags == sorted(mags)
    p1 = store.list_objects(ListQuery(per_page=10, page=1))
    p2 = store.list_objects(ListQuery(per_page=10, page=2))
    assert p1.total == len(everything) and p1.n_pages == -(-len(everything) // 10)
    assert not {r["object_id"] for r in p1.rows} & {r["object_id"] for r in p2.rows}
    # j/k navigation follows the same order.
    ids = [r["object_id"] for r in everything]
    assert store.neighbour(ids[0], ListQuery()) == ids[1]
    assert store.neighbour(ids[5], ListQuery(), -1) == ids[4]
    assert store.neighbour(ids[-1], ListQuery()) is None
    store.close()


def _latest_records(records) -> dict:
    latest = {}
    for r in records:
        cur = latest.get(r["object_id"])
        if cur is None or (r["event_mjd"], r["alert_id"]) > (cur["event_mjd"], cur["alert_id"]):
            latest[r["object_id"]] = r
    return latest


def _known_sso(records) -> set:
    """Objects whose latest alert sits within KNOWN_SSO_ARCSEC of a known solar-system object."""
    from stream.queue import KNOWN_SSO_ARCSEC

    return {o for o, r in _latest_records(records).items()
            if (r["features"].get("ss_distance") is not None and r["features"]["ss_distance"] <= KNOWN_SSO_ARCSEC)}


def test_known_asteroids_can_be_hidden(db, batch):
    _, records = batch
    sso = _known_sso(records)
    assert sso, "the real sample holds alerts of known asteroids"
    store = QueueStore(db)
    everything = {r["object_id"] for r in store.list_objects(ListQuery(per_page=500)).rows}
    hidden = {r["object_id"] for r in store.list_objects(ListQuery(hide_known_sso=True, per_page=500)).rows}
    assert sso <= everything and hidden == everything - sso
    store.close()


def test_version_1_store_is_migrated_in_place(tmp_path, db):
    from stream.queue import SCHEMA_VERSION

    want = dict(sqlite3.connect(db).execute("SELECT object_id, ss_distance FROM objects").fetchall())
    assert any(v is not None for v in want.values())
    get_types = "SELECT object_id, source_type, source_type_p, extrapolated FROM objects ORDER BY object_id"
    types = sqlite3.connect(db).execute(get_types).fetchall()
    assert any(t is not None for _, t, _, _ in types)
    assert 0 < sum(e != "[]" for *_, e in types) < len(types)  # (the faint Rubin alerts' scores)
    # A store as version 1 wrote it: no ss_distance column, its indexes as they were.
    c = sqlite3.connect(db)
    for name in ("ix_obj_filter", "ix_obj_sort_first", "ix_dec_alert", "ix_obj_latest"):
        c.execute(f"DROP INDEX {name}")
    c.execute("CREATE INDEX ix_obj_filter ON objects (stage, p_real, p_extragalactic, p_fast, abs_gal_b, "
              "snoozed_mjd, latest_mjd, vetted_ms)")
    c.execute("CREATE INDEX ix_obj_sort_first ON objects (first_mjd DESC, object_id)")
    c.execute("ALTER TABLE objects DROP COLUMN ss_distance")
    c.execute("DROP TABLE login_failures")  # (version 3)
    c.execute("ALTER TABLE decisions DROP COLUMN withdrawn_ms")  # (version 4)
    c.execute("ALTER TABLE decisions DROP COLUMN withdrawn_by")
    c.execute("ALTER TABLE objects DROP COLUMN source_type")  # (version 5)
    c.execute("ALTER TABLE objects DROP COLUMN source_type_p")
    c.execute("ALTER TABLE objects DROP COLUMN extrapolated")  # (version 6)
    c.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    c.commit()
    c.close()
    store = QueueStore(db)
    assert store.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == \
        str(SCHEMA_VERSION)
    assert dict(store.conn.execute("SELECT object_id, ss_distance FROM objects").fetchall()) == want
    assert [tuple(r) for r in store.conn.execute(get_types).fetchall()] == types
    index_sql = dict(store.conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'").fetchall())
    assert "ss_distance" in index_sql["ix_obj_filter"] and "COALESCE(first_mjd" in index_sql["ix_obj_sort_first"]
    assert {"ix_dec_alert", "ix_obj_latest", "ix_login_failures", "ix_obj_survey_latest"} <= set(index_sql)
    assert store.login_failures("192.0.2.1", 600_000) == 0  # the table version 3 added
    oid = next(iter(want))
    d = store.record_decision(oid, "real", "vera")  # the columns version 4 added
    assert store.withdraw_decision(d.decision_id, "vera")["vet_real"] is None
    assert store.list_objects(ListQuery(hide_known_sso=True)).total < len(want)
    store.close()
    # A version-6 store gets the survey-clock index (each page reads the clocks: without it, a scan).
    c = sqlite3.connect(db)
    c.execute("DROP INDEX ix_obj_survey_latest")
    c.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")
    c.commit()
    c.close()
    store = QueueStore(db)
    from stream.queue import _SURVEY_CLOCKS

    plan = " ".join(str(tuple(r)) for r in store.conn.execute("EXPLAIN QUERY PLAN " + _SURVEY_CLOCKS))
    assert "ix_obj_survey_latest" in plan and store.survey_clocks() == {
        sv: m for sv, m in store.conn.execute("SELECT survey, MAX(latest_mjd) FROM objects GROUP BY survey")}
    store.close()
    # A store from a newer Vigil is refused, naming its version.
    c = sqlite3.connect(db)
    c.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    c.commit()
    c.close()
    with pytest.raises(ValueError, match=f"schema version {SCHEMA_VERSION + 1}"):
        QueueStore(db)


def test_list_query_reads_objects_only_through_an_index(db):
    store = QueueStore(db)
    q = ListQuery(stage="first", min_p_real=0.2)
    where, args = q.where()
    plan = " ".join(r[-1] for r in store.conn.execute(
        f"EXPLAIN QUERY PLAN SELECT {LIST_COLUMNS} FROM objects WHERE {where} ORDER BY {q.order()} LIMIT 50",
        args))
    assert "annotations" not in plan and "USE TEMP B-TREE" not in plan, plan
    store.close()


def test_older_alert_redelivered_late_does_not_roll_the_object_back(tmp_path, batch):
    _, records = batch
    base = records[0]
    # (The stored priority is re-aged from the scores, so the scores tell the two alerts apart.)
    new = dict(copy.deepcopy(base), object_id="OBJ", alert_id=20, event_mjd=base["event_mjd"] + 1, p_real=0.9)
    old = dict(copy.deepcopy(base), object_id="OBJ", alert_id=10, event_mjd=base["event_mjd"], p_real=0.1)
    path = tmp_path / "q.sqlite"
    with QueueSink(path) as sink:
        sink.write([new])
        sink.flush()
        sink.write([old])
        sink.flush()
    row = sqlite3.connect(path).execute("SELECT latest_alert_id, p_real, n_alerts FROM objects").fetchone()
    assert row == (20, 0.9, 2)


def test_the_list_ages_as_time_passes(tmp_path, batch):
    """An object no alert has updated for ten days sinks below a younger, less certain one: its
    stage follows the time since its first detection and its freshness the time since its alert."""
    from models.rank import priority

    _, records = batch
    base = records[0]
    t = max(r["event_mjd"] for r in records)

    def rec(oid, aid, mjd, p):
        r = dict(copy.deepcopy(base), object_id=oid, alert_id=aid, event_mjd=mjd, stage="first", p_real=p,
                 p_extragalactic=p, p_fast=p, lightcurve=dict(base["lightcurve"], first_mjd=mjd))
        r["priority"] = float(priority(p, p, p, "first"))  # as the pipeline gave it: fresh when annotated
        return r

    path = tmp_path / "q.sqlite"
    with QueueSink(path) as sink:  # the stream clock: the newest alert in the store
        sink.write([rec("OLD", 1, t - 10.0, 0.95), _unscored(base, "NONE", 2)])
        sink.flush()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT stage FROM objects WHERE object_id = 'OLD'").fetchone() == ("first",)  # now then
    with QueueSink(path) as sink:
        sink.write([rec("NEW", 3, t, 0.6)])
        sink.flush()
    rows = {r[0]: r[1:] for r in conn.execute("SELECT object_id, stage, priority FROM objects")}
    assert rows["OLD"][0] == "updating" and rows["NEW"][0] == "first"
    assert rows["OLD"][1] == pytest.approx(float(priority(0.95, 0.95, 0.95, "updating", 10.0)))
    assert rows["NEW"][1] > rows["OLD"][1] and rows["NONE"] == ("longterm", None)  # unscored stays so; its stage ages
    ranked = [r["object_id"] for r in QueueStore(path).list_objects(ListQuery(per_page=10)).rows]
    assert ranked == ["NEW", "OLD", "NONE"]
    # The annotations keep what the pipeline said.
    assert conn.execute("SELECT stage FROM annotations WHERE alert_id = 1").fetchone() == ("first",)
    # Live (the wall clock), years-old sample alerts are all long-term and half-fresh.
    with QueueSink(path, clock="wall") as sink:
        sink.write([rec("NEW", 3, t, 0.6)])
        sink.flush()
    got = conn.execute("SELECT stage, priority FROM objects WHERE object_id = 'NEW'").fetchone()
    assert got[0] == "longterm" and got[1] == pytest.approx(float(priority(0.6, 0.6, 0.6, "longterm", 1e9)))
    conn.close()


def test_ageing_reaches_every_object_and_keeps_what_changed_meanwhile(tmp_path, batch):
    """Found by a review: long-term objects were skipped for good, a redelivered alert undid the
    ageing, an object without a first detection time kept 'first' for ever, and an object another
    writer rescored between the read and the write got a priority from the old scores."""
    from models.rank import priority
    from stream.queue import _AGE_UPDATE, age_priorities

    _, records = batch
    base = records[0]
    t = max(r["event_mjd"] for r in records)

    def rec(oid, aid, mjd, p, stage="first", first=None, model="m1"):
        r = dict(copy.deepcopy(base), object_id=oid, alert_id=aid, event_mjd=mjd, stage=stage, p_real=p,
                 p_extragalactic=p, p_fast=p, model_version=model,
                 lightcurve=dict(base["lightcurve"], first_mjd=mjd if first is None else first))
        r["priority"] = float(priority(p, p, p, stage))
        return r

    path = tmp_path / "q.sqlite"
    lt = rec("LT", 1, t - 400, 0.9, stage="longterm", first=t - 900)  # long-term when written, 400 d ago
    nofirst = rec("NOFIRST", 2, t - 10, 0.9)
    nofirst["lightcurve"]["first_mjd"] = None
    with QueueSink(path, clock="stream") as sink:
        sink.write([lt, nofirst, rec("NOW", 3, t, 0.5)])
        sink.flush()
    conn = sqlite3.connect(path)
    got = {r[0]: r[1:] for r in conn.execute("SELECT object_id, stage, priority FROM objects")}
    assert got["LT"] == ("longterm", pytest.approx(float(priority(0.9, 0.9, 0.9, "longterm", 400.0))))
    assert got["NOFIRST"][0] == "updating"  # 10 d since its latest alert at least
    # The same alert, redelivered: the aged priority and stage stand (it had gone back to 'first').
    with QueueSink(path) as sink:
        sink.write([lt, nofirst])
        sink.flush()
    assert {r[0]: r[1:] for r in conn.execute("SELECT object_id, stage, priority FROM objects")} == got
    # Another model rescored LT's alert after the pass read it: the pass leaves the row alone.
    s = QueueStore(path)
    row = (0.1, "updating", "LT", 1, "m1", got["LT"][1], "longterm")
    s.conn.execute("UPDATE objects SET model_version = 'm2', p_real = 0.05 WHERE object_id = 'LT'")
    assert s.conn.execute(_AGE_UPDATE, row).rowcount == 0
    s.conn.execute("UPDATE objects SET model_version = 'm1' WHERE object_id = 'LT'")
    assert s.conn.execute(_AGE_UPDATE, row).rowcount == 1  # (the guard, not a typo, kept it)
    assert age_priorities(s.conn, t) >= 1  # and the next pass puts it right
    assert s.conn.execute("SELECT priority FROM objects WHERE object_id = 'LT'").fetchone()[0] == pytest.approx(
        float(priority(0.05, 0.9, 0.9, "longterm", 400.0)))
    assert age_priorities(s.conn, t) == 0  # fully aged: nothing more to do
    s.close()
    conn.close()


def test_the_list_ages_while_the_stream_is_quiet(tmp_path, batch):
    from stream.queue import AGE_EVERY_S

    _, records = batch
    path = tmp_path / "q.sqlite"
    with QueueSink(path, clock="wall") as sink:
        sink.write(records[:3])
        sink.flush()
        aged = sink.conn.execute("SELECT object_id, priority FROM objects ORDER BY object_id").fetchall()
        sink.conn.execute("UPDATE objects SET priority = 0.99")  # as if annotated just now
        sink.idle()
        assert sink.conn.execute("SELECT MIN(priority) FROM objects").fetchone()[0] == 0.99  # not due yet
        sink._aged_at -= AGE_EVERY_S
        sink.idle()  # ten minutes on, no batch: aged all the same
        assert sink.conn.execute("SELECT object_id, priority FROM objects ORDER BY object_id").fetchall() == aged


def test_two_replays_into_one_store_rank_each_survey_by_its_own_clock(tmp_path, batch):
    """A store filled from ZTF's archive and then Rubin's alerts: a ZTF object 'first seen' years
    before the newest alert had kept its first-stage priority on top (ageing fixed that); then
    every ZTF object was aged by Rubin's newest alert, a stream that is not its own (a replay of
    ZTF 2018 beside Rubin 2025 made every ZTF object seven years old). Each survey keeps its own
    clock."""
    from models.rank import stage_of
    from stream.queue import listed

    result, records = batch
    path = tmp_path / "q.sqlite"
    for survey in ("ztf", "rubin"):
        keep = [i for i, r in enumerate(records) if r["survey"] == survey]
        assert keep
        with QueueSink(path) as sink:
            part = SimpleNamespace(annotations=[result.annotations[i] for i in keep],
                                   alerts=[result.alerts[i] for i in keep])
            sink.write_result(part, [records[i] for i in keep])
            sink.flush()
    store = QueueStore(path)
    rows, clocks = store.list_objects(ListQuery(per_page=500)).rows, store.survey_clocks()
    store.close()
    assert clocks == {sv: max(r["latest_mjd"] for r in rows if r["survey"] == sv) for sv in ("ztf", "rubin")}
    order = {"first": 0, "updating": 1, "longterm": 2}
    for r in rows:
        if r["first_mjd"] is not None and r["priority"] is not None:
            assert order[r["stage"]] >= order[str(stage_of(clocks[r["survey"]] - r["first_mjd"]))], r["object_id"]
    # The newest ZTF object is fresh by ZTF's clock, whatever Rubin's says.
    z = next(r for r in rows if r["survey"] == "ztf" and r["latest_mjd"] == clocks["ztf"] and r["priority"])
    ann = next(a for a in records if a["alert_id"] == z["latest_alert_id"])
    assert z["priority"] == pytest.approx(ann["priority"])
    # queue list reads each row's age against its own survey's clock
    got, _, by_survey = listed(path, ListQuery(per_page=500))
    assert by_survey == clocks
    assert all(g["age_days"] == pytest.approx(clocks[g["survey"]] - g["latest_mjd"]) for g in got)


def test_the_pipelines_stream_clock_is_each_surveys_own(batch):
    """Annotated after a newer survey's alerts, a ZTF alert's freshness is read against ZTF's
    newest alert, not Rubin's: it gets the priority it gets alone."""
    from stream.pipeline import Pipeline

    files = _alert_files()
    ztf = [f for f in files if "ztf_ampel" in str(f)]  # 2018-2021, years before the Rubin alerts
    rubin = [f for f in files if "rubin" in str(f)]
    if not (ztf and rubin):
        pytest.skip("needs the vendored ZTF (AMPEL) and Rubin samples")
    alone = Pipeline().process([Envelope(f.read_bytes(), str(f)) for f in ztf]).annotations
    both = Pipeline()
    both.process([Envelope(f.read_bytes(), str(f)) for f in rubin])
    after = both.process([Envelope(f.read_bytes(), str(f)) for f in ztf]).annotations
    assert set(both.stream_mjd) == {"ztf", "rubin"} and both.stream_mjd["rubin"] > both.stream_mjd["ztf"] + 365
    assert [a.priority for a in after] == [a.priority for a in alone]
    assert [a.stage for a in after] == [a.stage for a in alone]


def test_decision_stores_snapshot_and_snooze_waits_for_new_data(db, batch):
    _, records = batch
    store = QueueStore(db)
    top = store.list_objects(ListQuery(per_page=1)).rows[0]
    rec = next(r for r in records if r["alert_id"] == top["latest_alert_id"])
    d = store.record_decision(top["object_id"], "real", "alice")
    row = dict(store.conn.execute("SELECT * FROM decisions WHERE decision_id = ?", (d.decision_id,)).fetchone())
    assert (row["vetter"], row["action"], row["is_real"], row["alert_id"]) == ("alice", "real", 1, rec["alert_id"])
    assert row["is_extragalactic"] is None and row["follow_up"] is None
    assert row["p_real"] == pytest.approx(rec["p_real"]) and row["priority"] == pytest.approx(rec["priority"])
    assert row["model_version"] == rec["model_version"] and row["stage"] == rec["stage"]
    assert json.loads(row["features"]) == rec["features"]
    assert store.get_object(top["object_id"])["vet_real"] == 1
    with pytest.raises(KeyError):
        store.record_decision(top["object_id"], "maybe", "alice")
    with pytest.raises(KeyError):
        store.record_decision("no-such-object", "real", "alice")

    store.record_decision(top["object_id"], "snooze", "alice")
    visible = {r["object_id"] for r in store.list_objects(ListQuery(per_page=500)).rows}
    assert top["object_id"] not in visible
    assert top["object_id"] in {r["object_id"] for r in store.list_objects(ListQuery(show_snoozed=True,
                                                                                     per_page=500)).rows}
    newer = dict(copy.deepcopy(rec), alert_id=rec["alert_id"] + 1, event_mjd=rec["event_mjd"] + 0.5)
    with QueueSink(db) as sink:
        sink.write([newer])
        sink.flush()
    assert top["object_id"] in {r["object_id"] for r in store.list_objects(ListQuery(per_page=500)).rows}
    # A snooze sent from a page drawn before that newer alert arrived hides only what the vetter saw.
    store.record_decision(top["object_id"], "snooze", "bob", alert_id=rec["alert_id"])
    assert top["object_id"] in {r["object_id"] for r in store.list_objects(ListQuery(per_page=500)).rows}
    store.record_decision(top["object_id"], "snooze", "bob", alert_id=newer["alert_id"])
    assert top["object_id"] not in {r["object_id"] for r in store.list_objects(ListQuery(per_page=500)).rows}
    store.record_decision(top["object_id"], "snooze", "carol", alert_id=rec["alert_id"])  # never un-snoozes
    assert store.get_object(top["object_id"])["snoozed_mjd"] == pytest.approx(newer["event_mjd"])
    store.close()


def test_a_withdrawn_decision_stays_logged_and_counts_no_more(db, batch):
    """Undo: each question goes back to its latest standing answer (or none), a snooze to the latest
    alert a standing snooze saw (or none); the log keeps the call, marked; it is no label."""
    _, records = batch
    store = QueueStore(db)
    rows = store.list_objects(ListQuery(per_page=2)).rows
    oid, other = rows[0]["object_id"], rows[1]["object_id"]
    real = store.record_decision(oid, "real", "alice")
    xgal = store.record_decision(oid, "extragalactic", "alice")
    bogus = store.record_decision(oid, "bogus", "bob")
    assert store.get_object(oid)["vet_real"] == 0
    state = store.withdraw_decision(bogus.decision_id, "bob")
    assert (state["vet_real"], state["vet_extragalactic"], state["action"]) == (1, 1, "bogus")
    obj = store.get_object(oid)
    assert (obj["vet_real"], obj["vetted_by"], obj["vetted_ms"]) == (1, "alice", xgal.decided_ms)
    logged = {d["decision_id"]: d for d in obj["decisions"]}
    assert logged[bogus.decision_id]["withdrawn_by"] == "bob" and logged[real.decision_id]["withdrawn_ms"] is None
    store.withdraw_decision(real.decision_id, "alice")
    store.withdraw_decision(xgal.decision_id, "carol")  # any vetter may
    obj = store.get_object(oid)
    assert (obj["vet_real"], obj["vet_extragalactic"], obj["vetted_ms"], obj["vetted_by"]) == (None, None, None, None)
    with pytest.raises(ValueError, match="already withdrawn"):
        store.withdraw_decision(real.decision_id, "alice")
    with pytest.raises(KeyError):
        store.withdraw_decision(10**9, "alice")
    # Snoozes: a later alert, then two snoozes; withdrawing the later one re-snoozes to the earlier.
    rec = next(r for r in records if r["alert_id"] == rows[1]["latest_alert_id"])
    newer = dict(copy.deepcopy(rec), alert_id=rec["alert_id"] + 1, event_mjd=rec["event_mjd"] + 0.5)
    with QueueSink(db) as sink:
        sink.write([newer])
        sink.flush()
    early = store.record_decision(other, "snooze", "ivo", alert_id=rec["alert_id"])
    late = store.record_decision(other, "snooze", "ivo", alert_id=newer["alert_id"])
    assert store.get_object(other)["snoozed_mjd"] == pytest.approx(newer["event_mjd"])
    store.withdraw_decision(late.decision_id, "ivo")
    assert store.get_object(other)["snoozed_mjd"] == pytest.approx(rec["event_mjd"])
    assert other in {r["object_id"] for r in store.list_objects(ListQuery(per_page=500)).rows}  # new data since
    store.withdraw_decision(early.decision_id, "ivo")
    assert store.get_object(other)["snoozed_mjd"] is None
    # Labels: only the standing ones (none of these).
    store.record_decision(other, "galactic", "ivo")
    assert list(store.labels_frame()["action"]) == ["galactic"]
    store.close()


def test_withdrawal_follows_the_order_the_calls_were_committed_in(db, monkeypatch):
    """Two web hosts with skewed clocks (or a call that waited for the write lock): the later commit
    holds, and withdrawing an older, superseded call leaves it holding."""
    import stream.queue as queue_module

    store = QueueStore(db)
    oid = store.list_objects(ListQuery(per_page=1)).rows[0]["object_id"]
    clock = iter([3000.0, 2000.0, 1000.0])  # each call's host runs 1000 s behind the one before
    monkeypatch.setattr(queue_module.time, "time", lambda: next(clock))
    first = store.record_decision(oid, "real", "alice")
    store.record_decision(oid, "real", "carol")
    store.record_decision(oid, "bogus", "bob")
    monkeypatch.undo()
    assert store.get_object(oid)["vet_real"] == 0
    assert store.withdraw_decision(first.decision_id, "alice")["vet_real"] == 0
    assert store.get_object(oid)["vetted_by"] == "bob"
    store.close()


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_export_labels(tmp_path, db, batch, suffix):
    from models.features import FEATURES

    _, records = batch
    store = QueueStore(db)
    rows = store.list_objects(ListQuery(per_page=3)).rows
    store.record_decision(rows[0]["object_id"], "bogus", "bob")
    store.record_decision(rows[1]["object_id"], "extragalactic", "carol")
    store.record_decision(rows[1]["object_id"], "follow_up", "carol", note='=HYPERLINK("http://x","y")')
    store.close()
    out = tmp_path / f"labels{suffix}"
    from stream.cli import main

    assert main(["queue", "export-labels", "--db", str(db), "--out", str(out)]) == 0
    df = pd.read_parquet(out) if suffix == ".parquet" else pd.read_csv(out)
    assert len(df) == 3
    assert list(df["action"]) == ["bogus", "extragalactic", "follow_up"]
    assert list(df["vetter"]) == ["bob", "carol", "carol"]
    assert df.loc[0, "is_real"] == 0 and pd.isna(df.loc[0, "is_extragalactic"])
    assert df.loc[1, "is_extragalactic"] == 1 and df.loc[2, "follow_up"] == 1
    assert list(df["object_id"].astype(str)) == [rows[0]["object_id"], rows[1]["object_id"], rows[1]["object_id"]]
    assert set(FEATURES) <= set(df.columns)
    rec = next(r for r in records if r["alert_id"] == rows[0]["latest_alert_id"])
    for f in FEATURES:
        v = rec["features"][f]
        assert (np.isnan(df.loc[0, f]) if v is None else df.loc[0, f] == pytest.approx(v)), f
    assert df.loc[0, "p_real"] == pytest.approx(rec["p_real"])
    assert int(df.loc[0, "alert_id"]) == rec["alert_id"]
    # a note that a spreadsheet would run as a formula is quoted in CSV, kept as typed in Parquet
    assert df.loc[2, "note"] == ("'" if suffix == ".csv" else "") + '=HYPERLINK("http://x","y")'
    with pytest.raises(ValueError):
        export_labels(db, tmp_path / "labels.xlsx")


def test_sparkline_points_scale_into_the_box():
    pts = sparkline_points([1, 2, 3, 4], ["g", "g", "r", "g"], [np.nan, 10, 20, 5], [2, 0, 1, 1], 80, 20)
    assert set(pts) == {"g", "r"}
    xy = [tuple(map(float, p.split(","))) for s in pts.values() for p in s.split()]
    assert len(xy) == 3 and all(0 <= x <= 80 and 0 <= y <= 20 for x, y in xy)
    assert sparkline_points([1], ["g"], [np.nan], [2]) == {}


# ------------------------------------------------------------------------------------------ web app


@pytest.fixture
def client(db):
    from stream.web import create_app

    app = create_app(db, token=TOKEN)
    app.config["TESTING"] = True
    return app.test_client()


def _login(client, name="vera"):
    r = client.post("/login", data={"vetter": name, "token": TOKEN, "next": "/"})
    assert r.status_code == 302
    with client.session_transaction() as session:  # without loading a page: that would mark objects seen
        return session["csrf"]


def test_auth_required_except_health(client, db):
    assert client.get("/health").status_code == 200
    assert client.get("/health").get_json() == {"status": "ok"}
    # the icon, which browsers ask for on any page (Flask's error pages carry no inline one), is open too
    icon = client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.mimetype == "image/svg+xml" and b"<svg" in icon.data
    r = client.get("/")
    assert r.status_code == 302 and "/login" in r.headers["Location"]
    oid = sqlite3.connect(db).execute("SELECT object_id FROM objects LIMIT 1").fetchone()[0]
    assert client.get(f"/object/{oid}").status_code == 302
    assert client.get("/api/changes").status_code == 401
    assert client.get("/cutout/1/science.png").status_code == 401
    assert client.get("/static/queue.js").status_code == 302
    assert client.post("/api/decision", json={"object_id": oid, "action": "real"}).status_code == 401
    assert client.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401  # an API client: no redirect
    assert client.get("/api/changes", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    bad = client.post("/login", data={"vetter": "eve", "token": "nope"})
    assert bad.status_code == 401 and client.get("/").status_code == 302
    csrf = _login(client)
    assert client.get("/").status_code == 200
    # Cookie-authenticated writes need the CSRF token; bearer clients do not.
    assert client.post("/api/decision", json={"object_id": oid, "action": "real"}).status_code == 403
    # The page's script asks for JSON and shows its words; a form posted without script gets a page.
    stale = client.post("/api/decision", json={"object_id": oid, "action": "real"},
                        headers={"X-CSRF-Token": "stale", "Accept": "application/json"})
    assert stale.status_code == 403 and "reload the page" in stale.get_json()["error"]
    form = client.post("/api/decision", data={"object_id": oid, "action": "real", "csrf": "stale"})
    assert form.status_code == 403 and form.mimetype == "text/html"
    ok = client.post("/api/decision", json={"object_id": oid, "action": "real"}, headers={"X-CSRF-Token": csrf})
    assert ok.status_code == 200 and ok.get_json()["vetter"] == "vera"
    api = client.post("/api/decision", json={"object_id": oid, "action": "bogus"},
                      headers={"Authorization": f"Bearer {TOKEN}", "X-Vetter": "script"})
    assert api.status_code == 200 and api.get_json()["vetter"] == "script"
    assert client.get("/login?next=//evil.example").status_code == 200
    for evil in ("//evil.example", "/\t/evil.example", "/\\evil.example", "https://evil.example", "/\n/evil.example"):
        r = client.post("/login", data={"vetter": "v", "token": TOKEN, "next": evil})
        assert r.headers["Location"] == "/", evil
    r = client.post("/login", data={"vetter": "v", "token": TOKEN, "next": "/?stage=first"})
    assert r.headers["Location"] == "/?stage=first"
    # malformed requests are refused, not 500s
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert client.post("/api/decision", json=[oid], headers=bearer).status_code == 400
    assert client.post("/api/decision", json={"object_id": [oid], "action": "real"}, headers=bearer).status_code == 400
    r = client.post("/api/decision", json={"object_id": "NOPE", "action": "real"}, headers=bearer)
    assert r.status_code == 400 and r.get_json()["error"].count("'") % 2 == 0 and "NOPE" in r.get_json()["error"]
    r = client.get("/?page=99999999999999999999", headers=bearer)
    assert r.status_code == 302 and re.search(r"page=\d+$", r.headers["Location"])  # past the end: the last page
    last = client.get(r.headers["Location"], headers=bearer)
    assert last.status_code == 200 and b"next-page" not in last.data
    # alert ids that are no 64-bit integer (they were 500s), a note that is no text, an id far out of range
    for alert_id in (1e20, 1.7, [1], {"a": 1}, True, -3, 2**63):
        r = client.post("/api/decision", json={"object_id": oid, "action": "real", "alert_id": alert_id},
                        headers=bearer)
        assert r.status_code == 400 and "alert_id" in r.get_json()["error"], alert_id
    r = client.post("/api/decision", json={"object_id": oid, "action": "real", "note": {"x": 1}}, headers=bearer)
    assert r.status_code == 400
    assert client.get("/cutout/100000000000000000000/science.png", headers=bearer).status_code == 404
    r = client.post("/api/decision", json={"object_id": oid, "action": "real", "note": None}, headers=bearer)
    assert r.status_code == 200
    last_note = sqlite3.connect(db).execute("SELECT note FROM decisions ORDER BY decision_id DESC").fetchone()[0]
    assert last_note in ("", None)  # not "None"
    assert client.get("/api/changes?since=99999999999999999999", headers=bearer).status_code == 200


def test_withdrawing_a_decision_over_the_api_and_from_the_object_page(client, db):
    oid = sqlite3.connect(db).execute("SELECT object_id FROM objects LIMIT 1").fetchone()[0]
    bearer = {"Authorization": f"Bearer {TOKEN}", "X-Vetter": "bot"}
    d = client.post("/api/decision", json={"object_id": oid, "action": "bogus"}, headers=bearer).get_json()
    r = client.post(f"/api/decision/{d['decision_id']}/withdraw", json={}, headers=bearer)
    assert r.status_code == 200 and r.get_json()["vet_real"] is None and r.get_json()["object_id"] == oid
    assert client.post(f"/api/decision/{d['decision_id']}/withdraw", json={}, headers=bearer).status_code == 409
    assert client.post("/api/decision/999999/withdraw", json={}, headers=bearer).status_code == 404
    assert client.post(f"/api/decision/{2**70}/withdraw", json={}, headers=bearer).status_code == 404
    assert client.post(f"/api/decision/{d['decision_id']}/withdraw", json={}).status_code == 401
    # From the object page: a form with the page's CSRF token; without it, refused.
    csrf = _login(client)
    d = client.post("/api/decision", json={"object_id": oid, "action": "real"},
                    headers={"X-CSRF-Token": csrf}).get_json()
    page = client.get(f"/object/{oid}").get_data(as_text=True)
    assert f"/api/decision/{d['decision_id']}/withdraw" in page and "withdrawn by" in page  # the bot's
    assert client.post(f"/api/decision/{d['decision_id']}/withdraw", data={}).status_code == 403
    r = client.post(f"/api/decision/{d['decision_id']}/withdraw", data={"csrf": csrf, "back": f"/object/{oid}"})
    assert r.status_code == 302 and r.headers["Location"].endswith(f"/object/{oid}")
    withdrawn = dict(sqlite3.connect(db).execute("SELECT decision_id, withdrawn_by FROM decisions").fetchall())
    assert withdrawn[d["decision_id"]] == "vera"


def test_a_decision_the_store_is_too_busy_to_save_is_a_json_503(db, monkeypatch):
    """Another writer past the busy timeout: the page is told the call was not saved (it used to
    get an HTML 500 that the page's script could not read)."""
    import stream.queue as queue_module
    from stream.web import create_app

    monkeypatch.setattr(queue_module, "BUSY_TIMEOUT_MS", 200)
    app = create_app(db, token=TOKEN)
    app.config["TESTING"] = True
    client = app.test_client()
    oid = sqlite3.connect(db).execute("SELECT object_id FROM objects LIMIT 1").fetchone()[0]
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        r = client.post("/api/decision", json={"object_id": oid, "action": "real"},
                        headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 503 and "not saved" in r.get_json()["error"]
        assert client.get("/", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200  # reads go on
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM decisions").fetchone()[0] == 0


def test_bearer_guesses_are_counted_even_when_the_store_is_busy_and_a_proxys_token_is_no_guess(db, monkeypatch):
    import stream.queue as queue_module
    from stream.web import LOGIN_FAILURES, create_app

    monkeypatch.setattr(queue_module, "BUSY_TIMEOUT_MS", 100)
    app = create_app(db, token=TOKEN)
    app.config["TESTING"] = True
    client = app.test_client()
    # A logged-in browser behind a proxy that adds its own Bearer token goes by its session.
    _login(client)
    proxy = {"Authorization": "Bearer proxy-access-token"}
    assert [client.get("/api/changes", headers=proxy).status_code for _ in range(LOGIN_FAILURES + 2)] == \
        [200] * (LOGIN_FAILURES + 2)
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM login_failures").fetchone()[0] == 0
    # Guesses while another writer holds the store: not recorded there, but counted all the same.
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        guesser = app.test_client()
        codes = [guesser.get("/api/changes", headers={"Authorization": "Bearer guess"}).status_code
                 for _ in range(LOGIN_FAILURES)]
        assert codes == [401] * LOGIN_FAILURES
        assert guesser.get("/api/changes", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 429
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_login_is_throttled_sessions_expire_and_pages_carry_security_headers(db):
    from stream.web import LOGIN_FAILURES, SESSION_HOURS, create_app

    app = create_app(db, token=TOKEN, secure_cookie=True)
    app.config["TESTING"] = True
    c = app.test_client()
    r = c.get("/health")
    assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
    for _ in range(LOGIN_FAILURES):
        assert c.post("/login", data={"vetter": "eve", "token": "guess"}).status_code == 401
    assert c.post("/login", data={"vetter": "eve", "token": TOKEN}).status_code == 429  # even the right one, for now
    # The same limit holds for Bearer tokens (they could be guessed without limit before).
    assert c.get("/api/changes", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 429
    other = {"REMOTE_ADDR": "192.0.2.9"}
    for _ in range(LOGIN_FAILURES):
        assert c.get("/api/changes", headers={"Authorization": "Bearer guess"}, environ_base=other).status_code == 401
    r = c.get("/api/changes", headers={"Authorization": f"Bearer {TOKEN}"}, environ_base=other)
    assert r.status_code == 429 and "too many" in r.get_json()["error"]
    # Another app on the same store (another worker process) keeps the same limit; another address is let in.
    app2 = create_app(db, token=TOKEN, secure_cookie=True)
    c2 = app2.test_client()
    assert c2.post("/login", data={"vetter": "eve", "token": TOKEN}).status_code == 429
    r = c2.post("/login", data={"vetter": "vera", "token": TOKEN, "next": "/"},
                environ_base={"REMOTE_ADDR": "192.0.2.8"})
    cookie = r.headers["Set-Cookie"]
    assert r.status_code == 302 and "Secure" in cookie and "HttpOnly" in cookie
    assert app2.permanent_session_lifetime.total_seconds() == SESSION_HOURS * 3600
    # Behind a proxy every request comes from its address: trusting its X-Forwarded-For keeps one
    # client's failures from locking out the others; without it they share the limit.
    for hops, other_gets_in in ((1, True), (0, False)):
        app3 = create_app(db, token=TOKEN, proxy_hops=hops)
        c3 = app3.test_client()
        proxy = {"REMOTE_ADDR": "10.0.0.1"}
        for _ in range(LOGIN_FAILURES):
            c3.post("/login", data={"vetter": "eve", "token": "guess"}, environ_base=proxy,
                    headers={"X-Forwarded-For": "203.0.113.9"})
        r = c3.post("/login", data={"vetter": "vera", "token": TOKEN}, environ_base=proxy,
                    headers={"X-Forwarded-For": "198.51.100.7"})
        assert (r.status_code == 302) == other_gets_in, hops


def _login_failure_memory(store) -> None:
    """Attempts count as failures until they succeed; per address, within the window, and past the cap the oldest go."""
    window, t0 = 600_000, 1_800_000_000_000
    ids = [store.begin_login("192.0.2.1", window, limit=10, max_rows=12, now_ms=t0 + k) for k in range(10)]
    assert None not in ids and len(set(ids)) == 10
    assert store.begin_login("192.0.2.1", window, limit=10, max_rows=12, now_ms=t0 + 10) is None  # must wait
    assert store.login_failures("192.0.2.1", window, now_ms=t0 + 10) == 10
    store.login_succeeded(ids[-1])  # the last one gave the right token: not a failure
    assert store.login_failures("192.0.2.1", window, now_ms=t0 + 10) == 9
    assert store.login_failures("192.0.2.9", window, now_ms=t0 + 10) == 0
    assert store.login_failures("192.0.2.1", window, now_ms=t0 + window + 4) == 4  # the first five have expired
    for i in range(2, 6):  # four more addresses: past 12 rows the oldest are forgotten
        assert store.begin_login(f"192.0.2.{i}", window, limit=10, max_rows=12, now_ms=t0 + 20 + i) is not None
    assert store.login_failures("192.0.2.1", window, now_ms=t0 + 30) == 8
    assert store.conn.execute("SELECT COUNT(*) FROM login_failures").fetchone()[0] == 12
    store.begin_login("192.0.2.6", window, limit=10, max_rows=12, now_ms=t0 + 2 * window)  # the rest expire
    assert store.conn.execute("SELECT COUNT(*) FROM login_failures").fetchone()[0] == 1


def test_failed_login_memory_is_bounded(db):
    store = QueueStore(db)
    _login_failure_memory(store)
    store.close()


def test_concurrent_guesses_cannot_outrun_the_login_limit(db):
    """Check and count are one transaction: 40 guesses from 4 connections at once, and exactly 10 get through."""
    import threading

    accepted, start = [], threading.Barrier(4)

    def guesses():
        store = QueueStore(db)
        start.wait()
        for _ in range(10):
            accepted.append(store.begin_login("203.0.113.5", 600_000, limit=10, max_rows=1000) is not None)
        store.close()

    threads = [threading.Thread(target=guesses) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(accepted) == 40 and sum(accepted) == 10


def test_list_page_order_flags_and_polling(client, db, batch):
    _, records = batch
    _login(client)
    # Links from another site show pages but mark nothing as seen (GETs change no state).
    for site in ("cross-site", "same-site"):
        html = client.get("/?per_page=200", headers={"Sec-Fetch-Site": site}).get_data(as_text=True)
        first = re.findall(r'<tr data-object-id="([^"]+)"', html)[0]
        assert client.get(f"/object/{first}", headers={"Sec-Fetch-Site": site}).status_code == 200
    html = client.get("/?per_page=200", headers={"Sec-Fetch-Site": "same-origin"}).get_data(as_text=True)
    ids = re.findall(r'<tr data-object-id="([^"]+)"', html)
    expect = [r[0] for r in sqlite3.connect(db).execute(
        "SELECT object_id FROM objects ORDER BY COALESCE(priority, -1.0) DESC, object_id")]
    assert ids == expect[:200]
    assert html.count('class="badge new"') == len(ids)  # first look: everything is new
    # a detection with negative difference flux has no magnitude: said so, not a blank
    n_neg = sqlite3.connect(db).execute(
        "SELECT COUNT(*) FROM (SELECT mag FROM objects ORDER BY COALESCE(priority, -1.0) DESC, object_id "
        "LIMIT 200) WHERE mag IS NULL").fetchone()[0]
    assert n_neg > 0 and html.count(">neg.</span>") == n_neg
    assert "<svg class=\"spark\"" in html
    html2 = client.get("/?per_page=200").get_data(as_text=True)
    assert 'class="badge new"' not in html2  # seen now
    t0 = client.get("/api/changes?since=0").get_json()
    assert t0["changed"] == len(expect)
    since = t0["now_ms"]
    assert client.get(f"/api/changes?since={since}").get_json()["changed"] == 0
    # The service writes a newer alert of a listed object and an unscored new object; the app sees both.
    # (Newest in the store, sure of everything and young: the list re-ages priorities from the scores.)
    rec = next(r for r in records if r["object_id"] == ids[-1])
    t = max(r["event_mjd"] for r in records) + 1.0
    fresh_id = max(r["alert_id"] for r in records) + 7  # an id no other object holds (the store keeps ids apart)
    newer = dict(copy.deepcopy(rec), alert_id=fresh_id, event_mjd=t, priority=1.0, stage="first",
                 p_real=1.0, p_extragalactic=1.0, p_fast=1.0, lightcurve=dict(rec["lightcurve"], first_mjd=t))
    with QueueSink(db) as sink:
        sink.write([newer, _unscored(records[0], "NEWOBJ", 5)])
        sink.flush()
    assert client.get(f"/api/changes?since={since}").get_json()["changed"] == 2
    html3 = client.get("/?per_page=200").get_data(as_text=True)
    ids3 = re.findall(r'<tr data-object-id="([^"]+)"', html3)
    assert ids3[0] == ids[-1] and ids3[-1] == "NEWOBJ"
    assert "new data" in html3 and "▲" in html3
    assert "unscored" in html3
    # Known asteroids carry a badge, and the filter leaves them out.
    sso = _known_sso(records)
    badged = set(re.findall(r'<tr data-object-id="([^"]+)"[^>]*>(?:(?!</tr>).)*?class="badge sso"', html3, re.S))
    assert badged == sso & set(ids3)
    html4 = client.get("/?per_page=200&hide_known_sso=1").get_data(as_text=True)
    assert set(re.findall(r'<tr data-object-id="([^"]+)"', html4)) == set(ids3) - sso
    assert 'name="hide_known_sso" value="1" checked' in html4


def test_object_page_plots_cutouts_and_vetting_form(client, db, batch):
    from stream.web import fits_image

    result, _ = batch
    _login(client)
    with_cutouts = {a.object_id: a for a in result.alerts if a.cutouts.get("science") and a.survey == "ztf"}
    marks = ",".join("?" * len(with_cutouts))
    obj = sqlite3.connect(db).execute(
        f"SELECT object_id, latest_alert_id FROM objects WHERE object_id IN ({marks}) ORDER BY priority DESC LIMIT 1",
        list(with_cutouts)).fetchone()
    assert obj, "the sample should have ZTF alerts with cutouts"
    html = client.get(f"/object/{obj[0]}").get_data(as_text=True)
    assert html.count('<svg class="lc') == 2
    assert "<circle" in html
    assert "simbad" in html.lower() and "legacysurvey" in html and "wis-tns" in html
    assert "P(real)=" in html  # explanation sentence
    for kind in ("science", "template", "difference"):
        assert f"/cutout/{obj[1]}/{kind}.png" in html
        png = client.get(f"/cutout/{obj[1]}/{kind}.png")
        assert png.status_code == 200 and png.mimetype == "image/png"
        w, h = struct.unpack(">II", png.data[16:24])
        alert = next(a for a in result.alerts if a.alert_id == obj[1])
        assert (h, w) == fits_image(alert.cutouts[kind]).shape
    assert client.get("/object/does-not-exist").status_code == 404
    assert client.get(f"/cutout/{obj[1]}/bogus.png").status_code == 404


def test_object_page_shows_typical_conditions_scores_of_the_model_that_scored_it(client, db, tmp_path):
    import shutil

    from models.scorer import DEFAULT_MODEL_DIR, default_scorer
    from stream.web import create_app

    _login(client)
    oid, record = sqlite3.connect(db).execute(
        "SELECT a.object_id, a.record FROM objects o JOIN annotations a ON a.alert_id = o.latest_alert_id "
        "WHERE o.p_real IS NOT NULL ORDER BY o.priority DESC LIMIT 1").fetchone()
    rec = json.loads(record)
    html = client.get(f"/object/{oid}").get_data(as_text=True)
    want = default_scorer().standardised_scores(pd.DataFrame([rec["features"]], dtype=float))
    shown = re.search(r"Under typical conditions \((\d+) reference conditions\): P\(real\) ([\d.]+) · "
                      r"P\(extragalactic\) ([\d.]+) · P\(fast\) ([\d.]+)", html)
    assert shown and int(shown[1]) == 32
    for s, v in zip(("p_real", "p_extragalactic", "p_fast"), shown.groups()[1:], strict=True):
        assert float(v) == pytest.approx(want[s][0], abs=0.006)  # as printed
    # A page serving another model says so rather than mixing models.
    other = tmp_path / "other"
    shutil.copytree(DEFAULT_MODEL_DIR, other)
    meta = json.loads((other / "metadata.json").read_text())
    meta["version"] = "xgb-other"
    (other / "metadata.json").write_text(json.dumps(meta))
    c2 = create_app(db, token=TOKEN, model=other).test_client()
    _login(c2)
    html = c2.get(f"/object/{oid}").get_data(as_text=True)
    assert "Typical-conditions scores not shown: scored by " in html and "this page has xgb-other" in html
    with pytest.raises(FileNotFoundError):
        create_app(db, token=TOKEN, model=tmp_path / "nowhere")


def test_typical_conditions_line_never_fails_the_page(monkeypatch):
    import models.scorer
    from models.score import PlaceholderScorer
    from stream.web import _Scorer

    # Records of the placeholder rule (version "none"), or a shipped model that does not load.
    monkeypatch.setattr(models.scorer, "default_scorer", PlaceholderScorer)
    rec = {"status": "scored", "model_version": "none", "features": {}}
    assert _Scorer().typical(rec) == {"why": "no alert model to read them from"}
    assert _Scorer().typical({"status": "unscored"}) == {"why": "unscored"}

    def broken():
        raise ValueError("the shipped model does not load (gone)")

    monkeypatch.setattr(models.scorer, "default_scorer", broken)
    assert _Scorer().typical(rec) == {"why": "no alert model to read them from"}


def test_png_encoder_roundtrip():
    from stream.web import png_encode

    img = (np.arange(12 * 7) % 256).astype(np.uint8).reshape(7, 12)
    data = png_encode(img)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    assert (w, h) == (12, 7)
    n = struct.unpack(">I", data[33:37])[0]
    assert data[37:41] == b"IDAT"
    raw = np.frombuffer(zlib.decompress(data[41:41 + n]), np.uint8).reshape(7, 13)
    assert (raw[:, 0] == 0).all() and (raw[:, 1:] == img).all()


def test_lightcurve_svg_marks_limits_and_handles_missing_correction():
    from stream.web import lightcurve_svg

    lc = {"mjd": [1.0, 2.0, 3.0, 4.0], "band": ["g", "r", "g", "r"], "flux": [None, 10.0, 20.0, 5.0],
          "flux_err": [4.0, 1.0, 1.0, 2.0], "kind": [2, 1, 0, 3], "flux_corrected": None}
    raw = lightcurve_svg(lc, "raw", trigger_mjd=3.0)
    assert raw.startswith("<svg") and raw.endswith("</svg>")
    assert 'class="ul"' in raw and 'class="fp"' in raw and raw.count('class="det"') == 2
    assert "no per-point HSR correction" in lightcurve_svg(lc, "corrected")
    corr = lightcurve_svg(dict(lc, flux_corrected=[None, 9.0, 18.0, 4.0]), "corrected")
    assert corr.count('class="det"') == 2


def test_web_reads_while_the_service_holds_a_batch_open(client, db, batch):
    """WAL: the list serves the last committed state while a batch is being written."""
    _, records = batch
    with QueueSink(db) as sink:
        sink.write([_unscored(records[0], "IN-FLIGHT", 3)])  # transaction open, not committed
        r = client.get("/?per_page=500", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and "IN-FLIGHT" not in r.get_data(as_text=True)
        sink.flush()
    r = client.get("/?per_page=500", headers={"Authorization": f"Bearer {TOKEN}"})
    assert "IN-FLIGHT" in r.get_data(as_text=True)
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# ------------------------------------------------------------------------------------------ PostgreSQL


def test_store_targets_urls_and_redaction():
    from stream.queue import _store_target, is_url, redacted

    url = "postgresql://vera:pw@db.example:5432/vigil"
    assert is_url(url) and is_url("postgres://db/v") and not is_url("queue.sqlite")
    assert _store_target(url) == url  # a Path would fold the '//'
    assert redacted(url) == "postgresql://vera:***@db.example:5432/vigil" and "pw" not in redacted(url)
    assert redacted("postgresql://vera@db/vigil") == "postgresql://vera@db/vigil"
    assert redacted("postgresql://db/vigil?user=vera&password=pw&sslmode=require") == \
        "postgresql://db/vigil?user=vera&password=***&sslmode=require"
    assert is_url("POSTGRESQL://db/v")
    with pytest.raises(ValueError, match="unknown scheme 'postgresql\\+psycopg'") as e:
        is_url("postgresql+psycopg://vera:pw@db/vigil")  # a typo must not become a local SQLite file
    assert "pw" not in str(e.value)


def _comparable(row: dict) -> dict:
    """A stored row without the columns that record when it was written."""
    return {k: v for k, v in row.items() if k not in ("updated_ms", "written_ms", "decided_ms", "seen_ms")}


def test_postgres_store_behaves_like_sqlite(postgres_server, batch, db):
    """The same batch in SQLite and in a real PostgreSQL server: same lists, pages, objects and labels."""
    result, records = batch
    url = postgres_server()
    with QueueSink(url) as sink:
        sink.write_result(result, records)
        sink.flush()
        sink.write_result(result, records)  # a redelivered batch changes nothing
        sink.flush()
    sq, pg = QueueStore(db), QueueStore(url)
    for table in ("objects", "annotations", "lightcurves", "cutouts"):
        n = f"SELECT COUNT(*) FROM {table}"
        assert pg.conn.execute(n).fetchone()[0] == sq.conn.execute(n).fetchone()[0] > 0
    sso = _known_sso(records)
    for q in (ListQuery(per_page=500), ListQuery(stage="first", per_page=500), ListQuery(min_p_real=0.5),
              ListQuery(sky="extragalactic", b_cut=20), ListQuery(sky="galactic", sky_by="score"),
              ListQuery(sort="mag"), ListQuery(sort="latest"), ListQuery(sort="first", per_page=500),
              ListQuery(sort="p_fast", per_page=10, page=2),
              ListQuery(hide_known_sso=True, per_page=500)):
        a, b = sq.list_objects(q), pg.list_objects(q)
        assert b.total == a.total and [_comparable(r) for r in b.rows] == [_comparable(r) for r in a.rows], q
    assert pg.list_objects(ListQuery(hide_known_sso=True)).total == sq.n_objects() - len(sso)
    ids = [r["object_id"] for r in sq.list_objects(ListQuery(per_page=500)).rows]
    for oid in (ids[0], ids[len(ids) // 2], ids[-1]):
        for step in (1, -1):
            assert pg.neighbour(oid, ListQuery(), step) == sq.neighbour(oid, ListQuery(), step)
    a, b = sq.get_object(ids[0]), pg.get_object(ids[0])
    assert _comparable(b) == _comparable(a) and b["record"]["object_id"] == ids[0]
    # Stamps: the highest-ranked object that has them (some archives carry none).
    a = next(o for o in map(sq.get_object, ids) if o["cutout_kinds"])
    kind = a["cutout_kinds"][0]
    assert pg.cutout(a["latest_alert_id"], kind) == sq.cutout(a["latest_alert_id"], kind) is not None
    # Vetting: the same decisions give the same labelled feature table.
    for store in (sq, pg):
        store.record_decision(ids[0], "real", "vera")
        store.record_decision(ids[1], "galactic", "ivo", note="CV in outburst")
        store.record_decision(ids[1], "snooze", "ivo")
    la, lb = sq.labels_frame(), pg.labels_frame()
    drop = ["decided_ms", "decided_at"]
    pd.testing.assert_frame_equal(lb.drop(columns=drop), la.drop(columns=drop))
    assert pg.get_object(ids[1])["snoozed_mjd"] == sq.get_object(ids[1])["snoozed_mjd"] is not None
    with pytest.raises(KeyError):
        pg.record_decision("NO-SUCH-OBJECT", "real", "vera")
    # Withdrawals: the same state after them, and the same labels.
    for store in (sq, pg):
        later = store.record_decision(ids[0], "bogus", "ivo")
        snooze = max(d["decision_id"] for d in store.get_object(ids[1])["decisions"] if d["action"] == "snooze")
        store.withdraw_decision(later.decision_id, "ivo")
        store.withdraw_decision(snooze, "ivo")
    for oid in ids[:2]:
        a, b = sq.get_object(oid), pg.get_object(oid)
        for k in ("vet_real", "vet_extragalactic", "snoozed_mjd", "vetted_by"):
            assert a[k] == b[k], k
    assert pg.get_object(ids[0])["vet_real"] == 1 and pg.get_object(ids[1])["snoozed_mjd"] is None
    pd.testing.assert_frame_equal(pg.labels_frame().drop(columns=drop), sq.labels_frame().drop(columns=drop))
    _login_failure_memory(pg)
    sq.close()
    # A version-4 store (no source types, no extrapolation flags) is migrated in place, both filled
    # from the annotations.
    get_types = "SELECT object_id, source_type, source_type_p, extrapolated FROM objects ORDER BY object_id"
    before = [tuple(r) for r in pg.conn.execute(get_types).fetchall()]
    assert any(t is not None for _, t, _, _ in before) and any(e != "[]" for *_, e in before)
    pg.conn.execute("ALTER TABLE objects DROP COLUMN source_type")
    pg.conn.execute("ALTER TABLE objects DROP COLUMN source_type_p")
    pg.conn.execute("ALTER TABLE objects DROP COLUMN extrapolated")
    pg.conn.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    pg.close()
    pg = QueueStore(url)
    assert [tuple(r) for r in pg.conn.execute(get_types).fetchall()] == before
    pg.close()


def test_postgres_writers_share_one_store_and_the_page_never_waits(postgres_server, batch):
    """Two sinks (two service processes) write interleaved batches; the web app reads throughout."""
    import threading

    from stream.web import create_app

    _, records = batch
    url = postgres_server()
    halves = [records[0::2], records[1::2]]
    errors = []

    def service(part):
        try:
            with QueueSink(url) as sink:
                for i in range(0, len(part), 7):
                    sink.write(part[i:i + 7])
                    sink.flush()
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=service, args=(h,)) for h in halves]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    store = QueueStore(url)
    assert store.conn.execute("SELECT COUNT(*) FROM annotations").fetchone()[0] == len(records)
    want = {}
    for r in records:
        want.setdefault(r["object_id"], set()).add(r["alert_id"])
    got = dict(store.conn.execute("SELECT object_id, n_alerts FROM objects").fetchall())
    assert got == {o: len(a) for o, a in want.items()}
    latest = _latest_records(records)
    for o, r in latest.items():  # each object row follows its newest alert, whichever process wrote it
        assert store.conn.execute("SELECT latest_alert_id FROM objects WHERE object_id = ?",
                                  (o,)).fetchone()[0] == r["alert_id"]
    store.close()
    # The page is served from the committed state while a writer holds a batch open.
    app = create_app(url, token=TOKEN)
    app.config["TESTING"] = True
    client = app.test_client()
    _login(client)
    with QueueSink(url) as sink:
        sink.write([_unscored(records[0], "IN-FLIGHT", 3)])
        r = client.get("/?per_page=500")
        assert r.status_code == 200 and "IN-FLIGHT" not in r.get_data(as_text=True)
        assert len(re.findall(r'<tr data-object-id=', r.get_data(as_text=True))) == len(latest)
        sink.flush()
    html = client.get("/?per_page=500").get_data(as_text=True)
    assert "IN-FLIGHT" in html and 'class="badge sso"' in html


# ------------------------------------------------------------------------------------------ retention


#: Added to an alert id to make the id of a later alert of the same object (clear of every real id).
_NEW_ID = 4 * 10**18


def _check_retention(target, records):
    """Prune ``target`` (already filled with ``records``) and check what went and what stayed."""
    from stream.queue import prune

    store = QueueStore(target)
    c = store.conn

    def stored(table):
        return {r[0] for r in c.execute(f"SELECT DISTINCT alert_id FROM {table}").fetchall()}

    # Ten objects with stamps get a newer alert two days on (as a later night would bring),
    # so their stamped alerts are no longer the latest.
    with_cut = stored("cutouts")
    bumped = [r for r in _latest_records(records).values() if r["alert_id"] in with_cut][:10]
    newer = [dict(copy.deepcopy(r), alert_id=r["alert_id"] + _NEW_ID, event_mjd=r["event_mjd"] + 2.0) for r in bumped]
    with QueueSink(target) as sink:
        sink.write(newer)
        sink.flush()
    everything = records + newer
    latest = {r["alert_id"] for r in _latest_records(everything).values()}
    vetted = bumped[0]
    store.record_decision(vetted["object_id"], "real", "vera", alert_id=vetted["alert_id"])
    keep_days = 1.0
    # Each survey by its own clock: ZTF's alerts were pruned by Rubin's newest alert, years later.
    horizons = {sv: max(r["event_mjd"] for r in everything if r["survey"] == sv) - keep_days
                for sv in {r["survey"] for r in everything}}
    gone = ({r["alert_id"] for r in everything if r["event_mjd"] < horizons[r["survey"]]}
            - latest - {vetted["alert_id"]})
    assert with_cut & gone, "some pruned alert had stamps"
    n = {t: c.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("cutouts", "lightcurves", "annotations")}
    with_lc = stored("lightcurves")
    done = prune(c, keep_days)
    assert done["horizon_mjd"] == pytest.approx(max(horizons.values()))
    assert done["horizons"] == pytest.approx(horizons) and len(horizons) == 2
    assert stored("cutouts") == with_cut - gone and stored("lightcurves") == with_lc - gone
    assert done["cutouts"] == n["cutouts"] - c.execute("SELECT COUNT(*) FROM cutouts").fetchone()[0] > 0
    assert done["lightcurves"] == len(with_lc & gone) > 0
    assert c.execute("SELECT COUNT(*) FROM annotations").fetchone()[0] == n["annotations"]  # history kept
    assert vetted["alert_id"] in stored("cutouts")  # what a vetter decided on keeps its stamps
    for oid in {r["object_id"] for r in records}:  # every object page still opens
        assert store.get_object(oid) is not None
    assert prune(c, keep_days) == dict(done, cutouts=0, lightcurves=0)  # idempotent
    with pytest.raises(ValueError, match="keep-days"):
        prune(c, 0)
    store.close()


def test_retention_prunes_old_stamps_but_keeps_latest_and_vetted(db, batch, monkeypatch):
    import stream.queue

    monkeypatch.setattr(stream.queue, "PRUNE_CHUNK", 3)  # several delete transactions per table
    _check_retention(db, batch[1])


def test_retention_on_postgres(postgres_server, batch):
    result, records = batch
    url = postgres_server()
    with QueueSink(url) as sink:
        sink.write_result(result, records)
        sink.flush()
    _check_retention(url, records)


def test_sink_applies_its_retention_window(tmp_path, batch):
    result, records = batch
    path = tmp_path / "r.sqlite"
    sink = QueueSink(path, retention_days=1.0)
    sink.PRUNE_EVERY = 2
    sink.write_result(result, records)
    sink.flush()
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM cutouts").fetchone()[0] > 0
    # A later night: a newer alert of every object; the second commit applies the window.
    sink.write([dict(copy.deepcopy(r), alert_id=r["alert_id"] + _NEW_ID, event_mjd=r["event_mjd"] + 30.0)
                for r in _latest_records(records).values()])
    sink.flush()
    sink.close()
    c = sqlite3.connect(path)
    assert c.execute("SELECT COUNT(*) FROM cutouts").fetchone()[0] == 0  # the new alerts carry none
    assert c.execute("SELECT COUNT(*) FROM lightcurves").fetchone()[0] == 0
    assert c.execute("SELECT COUNT(*) FROM annotations").fetchone()[0] == len(records) + len(_latest_records(records))
    with pytest.raises(ValueError, match="retention_days"):
        QueueSink(tmp_path / "x.sqlite", retention_days=-1)


def test_a_failing_retention_run_never_fails_the_batch(tmp_path, batch, monkeypatch, caplog):
    import stream.queue

    def locked(*a, **k):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(stream.queue, "prune", locked)
    result, records = batch
    path = tmp_path / "f.sqlite"
    sink = QueueSink(path, retention_days=1.0)
    sink.PRUNE_EVERY = 1
    sink.write_result(result, records)
    with caplog.at_level("WARNING", logger="stream.queue"):
        sink.flush()  # committed; the retention run fails and is only logged
    sink.close()
    assert "retention skipped" in caplog.text
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM annotations").fetchone()[0] == len(records)


# ------------------------------------------------------------------------------------------ production server


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wsgi_factory_reads_the_environment(db, monkeypatch):
    from stream.web import wsgi_app

    monkeypatch.delenv("VIGIL_QUEUE_DB", raising=False)
    with pytest.raises(ValueError, match="VIGIL_QUEUE_DB"):
        wsgi_app()
    monkeypatch.setenv("VIGIL_QUEUE_DB", str(db))
    monkeypatch.delenv("VIGIL_QUEUE_TOKEN", raising=False)
    monkeypatch.delenv("VIGIL_QUEUE_TOKEN_FILE", raising=False)
    with pytest.raises(ValueError, match="VIGIL_QUEUE_TOKEN"):
        wsgi_app()
    monkeypatch.setenv("VIGIL_QUEUE_TOKEN", TOKEN)
    r = wsgi_app().test_client().get("/", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and "data-object-id" in r.get_data(as_text=True)


def test_queue_serve_with_gunicorn_workers(db):
    """`vigil queue serve --workers 2`: a real gunicorn with two worker processes behind one port."""
    import http.cookiejar
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.parse
    import urllib.request

    pytest.importorskip("gunicorn", reason="--workers needs gunicorn (pip install 'vigil[serve]')")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "queue", "serve", "--db", str(db), "--port",
                             str(port), "--token", TOKEN, "--workers", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    why = proc.stdout.read() if proc.poll() is not None else "no answer in 30 s"
                    raise AssertionError(why) from None
                time.sleep(0.2)
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        form = urllib.parse.urlencode({"vetter": "vera", "token": TOKEN, "next": "/"}).encode()
        with opener.open(f"{base}/login", data=form, timeout=10) as r:  # follows the redirect to the list
            assert r.status == 200 and "data-object-id" in r.read().decode()
        for _ in range(12):  # one connection each: the workers take turns; the session key is the same in all
            with opener.open(f"{base}/api/changes?since=0", timeout=10) as r:
                assert r.status == 200 and json.loads(r.read())["objects"] > 0
                assert "gunicorn" in r.headers.get("Server", "")
        # Failed logins count against one limit, whichever worker answered each of them.
        from stream.web import LOGIN_FAILURES

        def login(token):
            form = urllib.parse.urlencode({"vetter": "eve", "token": token}).encode()
            try:
                with urllib.request.urlopen(f"{base}/login", data=form, timeout=10) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        assert [login("guess") for _ in range(LOGIN_FAILURES)] == [401] * LOGIN_FAILURES
        assert login(TOKEN) == 429
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=30)[0]
    assert "Booting worker" in out and out.count("Booting worker") >= 2


def test_ingest_scores_with_the_given_model(tmp_path):
    import shutil

    from models.scorer import DEFAULT_MODEL_DIR
    from stream.cli import main

    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, model)
    meta = json.loads((model / "metadata.json").read_text())
    meta["version"] = "xgb-ingest-test"
    (model / "metadata.json").write_text(json.dumps(meta))
    db = tmp_path / "q.sqlite"
    files = [str(p) for p in sorted((DATA / "ztf_fink" / "2018-12-02_schema3.2").glob("*.avro"))]
    assert main(["queue", "ingest", *files, "--db", str(db), "--model", str(model), "--no-progress"]) == 0
    with sqlite3.connect(db) as conn:
        versions = {v for (v,) in conn.execute("SELECT DISTINCT model_version FROM annotations")}
    assert versions == {"xgb-ingest-test"}


def test_a_stamp_that_unpacks_too_large_is_refused_before_it_is_unpacked():
    import gzip
    import io

    from stream.web import MAX_STAMP_BYTES, fits_image

    bomb = gzip.compress(bytes(4 * MAX_STAMP_BYTES))  # ~32 kB that would unpack to 32 MB
    assert len(bomb) < 100_000
    with pytest.raises(ValueError, match="unpacks to more than"):
        fits_image(bomb)
    from astropy.io import fits

    buf = io.BytesIO()
    fits.PrimaryHDU(np.zeros((2048, 1024), np.uint8)).writeto(buf)  # 2 MB: unpacks, but too many pixels
    with pytest.raises(ValueError, match="pixels"):
        fits_image(gzip.compress(buf.getvalue()))


def test_queue_token_prefers_what_the_operator_names(tmp_path, monkeypatch):
    from stream.web import queue_token

    f = tmp_path / "token"
    f.write_text("from-file\n")
    monkeypatch.setenv("VIGIL_QUEUE_TOKEN", "stale-env")
    assert queue_token("flag", f) == "flag"
    assert queue_token(None, f) == "from-file"  # a named file wins over the environment
    assert queue_token(None, None) == "stale-env"
    monkeypatch.delenv("VIGIL_QUEUE_TOKEN")
    assert queue_token(None, None) is None
    f.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        queue_token(None, f)


def test_the_store_write_lock_is_not_held_while_streamed_outputs_flush(tmp_path):
    from stream.service import drive
    from stream.sources import MemorySource

    path = tmp_path / "q.sqlite"
    QueueSink(path).close()  # the store exists, as another worker and the page see it
    free_during_flush = []

    class SlowKafkaLike:
        """A streamed output whose flush stands for a Kafka flush that takes a while."""

        def write(self, records):
            pass

        def flush(self):
            # another writer (a second worker, the vetters' page) can take the lock meanwhile
            other = sqlite3.connect(path, timeout=0.1)
            try:
                other.execute("BEGIN IMMEDIATE")
                other.rollback()
                free_during_flush.append(True)
            except sqlite3.OperationalError:
                free_during_flush.append(False)
            finally:
                other.close()

        def close(self):
            pass

    files = _alert_files()[:30]
    source = MemorySource([f.read_bytes() for f in files], batch_size=10)
    store = QueueSink(path)  # listed after the topic sink, as the service does
    counts = drive(source, Pipeline(), [SlowKafkaLike(), store], [])
    assert counts.read == 30 and free_during_flush == [True, True, True]
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM annotations").fetchone()[0] == counts.annotated


def test_a_batch_waits_for_another_writer_past_the_busy_timeout(tmp_path, batch, caplog):
    """Another writer holding the store's write lock longer than the busy timeout (a VACUUM,
    a replay into the live store) is waited for with a warning, not an error that stops the
    service; a hard stop gives up."""
    import threading

    result, records = batch
    path = tmp_path / "q.sqlite"
    QueueSink(path).close()
    sink = QueueSink(path)
    sink.conn.execute("PRAGMA busy_timeout=200")  # (10 s in service; short here)
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    release = threading.Timer(1.5, other.execute, ("COMMIT",))
    release.start()
    try:
        with caplog.at_level("WARNING", logger="stream.queue"):
            sink.write_result(result, records)
            sink.flush()
    finally:
        release.join()
    assert "another writer has held the write lock" in caplog.text
    assert _counts(path)["annotations"] == len(records)
    other.execute("BEGIN IMMEDIATE")
    sink.give_up = lambda: True
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        sink.write_result(result, records)
    other.execute("ROLLBACK")
    other.close()
    sink.close()


def test_vetters_decisions_retrain_the_alert_model(tmp_path, db, batch, capsys, monkeypatch):
    """Queue → export-labels → `vigil train --labels` → a model the service loads, that learnt the decisions."""
    from models.features import FEATURES
    from models.scorer import DEFAULT_MODEL_DIR, AlertScorer
    from stream.cli import main

    _, records = batch
    latest = {}
    store = QueueStore(db)
    rows = store.list_objects(ListQuery(per_page=500)).rows
    by_alert = {r["alert_id"]: r for r in records}
    snr = np.median([by_alert[r["latest_alert_id"]]["features"]["snr"] for r in rows])
    # The vetters' calls follow a rule of their own (not the model's): real = bright in S/N,
    # extragalactic = northern Galactic hemisphere. One object is first called the other way.
    flip = rows[0]["object_id"]
    store.record_decision(flip, "bogus" if by_alert[rows[0]["latest_alert_id"]]["features"]["snr"] > snr else "real",
                          "dora")
    for r in rows:
        f = by_alert[r["latest_alert_id"]]["features"]
        latest[r["object_id"]] = (f["snr"] > snr, f["galactic_latitude"] > 0)
        store.record_decision(r["object_id"], "real" if latest[r["object_id"]][0] else "bogus", "dora")
        store.record_decision(r["object_id"], "extragalactic" if latest[r["object_id"]][1] else "galactic", "dora")
    store.close()
    labels = tmp_path / "labels.parquet"
    assert main(["queue", "export-labels", "--db", str(db), "--out", str(labels)]) == 0
    out_dir = tmp_path / "retrained"
    assert main(["train", "--labels", str(labels), "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    n_real = sum(v[0] for v in latest.values())
    assert f"p_real: {len(latest)} objects ({n_real} positive, {len(latest) - n_real} negative): retrained" in out
    assert "p_fast: kept" in out

    base, model = AlertScorer.load(DEFAULT_MODEL_DIR), AlertScorer.load(out_dir)
    assert model.model_version.startswith(base.model_version + "+v")
    raw = {m: bytes(m.scorers["p_fast"].booster_.save_raw("ubj")) for m in (base, model)}
    assert raw[base] == raw[model]
    assert model.metadata["decisions_fit"]["scores"]["p_real"]["retrained"] is True
    # The retrained scores no longer rest on the labels the base's support describes: no flag for
    # them; P(fast) and the source types keep theirs.
    assert set(base.support.scores) == {"p_real", "p_extragalactic", "p_fast", "source_type"}
    assert set(model.support.scores) == {"p_fast", "source_type"}
    # It learnt the vetters' rule: out of fold, it ranks their calls far better than the model it started from.
    import models.train as mt
    from models.features import SURVEY_OPTIONAL
    from models.train import read_decisions, retrain_on_decisions

    seen, make = [], mt._sim_estimator

    def recording(random_state=0):
        est = make(random_state)
        fit = est.fit
        est.fit = lambda D, *a, **k: (seen.append(D.copy()), fit(D, *a, **k))[1]
        return est

    monkeypatch.setattr(mt, "_sim_estimator", recording)
    _, report = retrain_on_decisions(base, read_decisions(labels))
    # The full scorers learnt only from decisions on alerts they score (every survey-optional
    # input present); the reduced ones from all, Rubin's included.
    optional = [c for g in SURVEY_OPTIONAL for c in g]
    full = [D for D in seen if not D[[c for c in optional if c in D]].isna().all(axis=None)]
    reduced = [D for D in seen if D[[c for c in optional if c in D]].isna().all(axis=None)]
    assert full and reduced and len(full) == len(reduced)
    assert all(D[[c for c in optional if c in D]].notna().all(axis=None) for D in full)
    assert sum(map(len, reduced)) > sum(map(len, full))
    # Too few of one class among the decisions with every input: the base's full scorer is kept
    # (one bogus among 40 had taught a constant P(real)), and the report says so.
    from models.train import MIN_CLASS_ROWS

    d = read_decisions(labels)
    d = d[d["is_real"].notna()].groupby("object_id", sort=False).tail(1).reset_index(drop=True)
    lacking = base.lacking_rows(d[list(FEATURES)].astype(float))
    m = max(1, MIN_CLASS_ROWS - int(lacking.sum()))
    assert 0 < lacking.sum() and m < MIN_CLASS_ROWS and (~lacking).sum() > m + MIN_CLASS_ROWS
    d["is_real"] = np.where(lacking, 0.0, 1.0)
    d.loc[np.flatnonzero(~lacking)[:m], "is_real"] = 0.0
    kept, rep = retrain_on_decisions(base, d)
    assert rep["p_real"]["retrained"] and rep["p_real"]["full_scorer"].startswith("kept from the base")
    # The base's full P(real) still scores the alerts with every input, and keeps its flag there;
    # the alerts its retrained reduced scorer scores get none.
    assert "p_real" in kept.support.scores and kept.support.full_only == ("p_real",)
    e = kept.score(d[list(FEATURES)].astype(float), contributions=False).label_propensity["p_real"]
    assert np.isnan(e[lacking]).all() and np.isfinite(e[~lacking]).all()
    def raw(m_, part):
        return bytes(getattr(m_, part)["p_real"].booster_.save_raw("ubj"))

    assert raw(base, "scorers") == raw(kept, "scorers") and raw(base, "reduced") != raw(kept, "reduced")
    for s in ("p_real", "p_extragalactic"):
        before, after = report[s]["base"]["auc"], report[s]["retrained_out_of_fold"]["auc"]
        assert after > 0.85 and after > before + 0.1, (s, before, after)
    # The reduced scorers (alerts lacking survey-optional inputs: Rubin's) were retrained too, and
    # the pipeline scores with the new model, Rubin alerts included.
    for s, kept in (("p_real", False), ("p_extragalactic", False), ("p_fast", True)):
        raw = [bytes(m.reduced[s].booster_.save_raw("ubj")) for m in (base, model)]
        assert (raw[0] == raw[1]) is kept, s
    files = [f for f in _alert_files() if "rubin" in str(f)][:3] + _alert_files()[:3]
    res = Pipeline(scorer=model).process([Envelope(p.read_bytes(), str(p)) for p in files])
    assert len(res.annotations) == 6
    assert {a.to_record()["model_version"] for a in res.annotations} == {model.model_version}
    # A later refit of ĝ(z) keeps the retraining in the name (it used to fall back to the base's).
    res_frame = pd.read_parquet(labels)[list(FEATURES)].astype(float)
    refit = model.with_conditions_fitted_on(res_frame)
    assert refit.model_version.startswith(model.model_version + "+g")
    # Both keep a bank of conditions for the typical-conditions scores: the retrained model its
    # base's (the same conditions model), the refitted one drawn from the alerts it was refitted on.
    assert model.metadata["condition_bank"] == base.metadata["condition_bank"]
    assert model.standardised_scores(res_frame) is not None
    bank = np.asarray(refit.metadata["condition_bank"]["rows"])
    own = res_frame[refit.metadata["condition_bank"]["columns"]].round(6).to_numpy()
    assert len(bank) == 32 and all((own == row).all(axis=1).any() for row in bank)

    # The export read as a plain table would hand its decision columns to the model as features.
    csv = tmp_path / "labels.csv"
    assert main(["queue", "export-labels", "--db", str(db), "--out", str(csv)]) == 0
    assert main(["train", "--table", str(csv), "--label-column", "action", "--positive", "real", "--negative", "bogus",
                 "--id-column", "object_id", "--out", str(tmp_path / "t")]) == 2
    assert "vigil train --labels" in capsys.readouterr().err


def test_too_few_decisions_keep_the_model_and_say_why(tmp_path, db, capsys):
    from stream.cli import main

    store = QueueStore(db)
    rows = store.list_objects(ListQuery(per_page=500)).rows
    for i, r in enumerate(rows[:40]):
        store.record_decision(r["object_id"], "real" if i % 2 else "bogus", "eve")
    for r in rows[:3]:
        store.record_decision(r["object_id"], "galactic", "eve")
    store.close()
    labels = tmp_path / "labels.csv"
    assert main(["queue", "export-labels", "--db", str(db), "--out", str(labels)]) == 0
    assert main(["train", "--labels", str(labels), "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "p_real: 40 objects (20 positive, 20 negative): retrained" in out
    assert "p_extragalactic: 3 objects (0 positive, 3 negative): kept" in out and "need 10 of each" in out
    few = tmp_path / "few.parquet"
    pd.read_csv(labels).head(5).to_parquet(few)  # 5 decisions: nothing can be retrained
    assert main(["train", "--labels", str(few), "--out", str(tmp_path / "m2")]) == 2
    assert "too few decisions" in capsys.readouterr().err
    assert not (tmp_path / "m2").exists()
    assert main(["train", "--labels", str(tmp_path / "nope.xlsx"), "--out", str(tmp_path / "m3")]) == 2
    assert ".parquet or .csv" in capsys.readouterr().err


def test_queue_list_in_the_terminal_follows_the_web_lists_order_and_filters(db, capsys):
    from stream.cli import main

    store = QueueStore(db)
    top = store.list_objects(ListQuery(per_page=5)).rows
    first = store.list_objects(ListQuery(stage="first", per_page=500))
    store.record_decision(top[1]["object_id"], "bogus", "fay")
    store.close()
    assert main(["queue", "list", "--db", str(db), "--top", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    body = lines[2:7]
    assert [ln.split()[1] for ln in body] == [r["object_id"] for r in top]
    assert "vetted bogus (last by fay)" in body[1] and lines[-1].startswith("5 of ")
    # Each row names its most likely source type if real, in words, with its probability.
    from stream.queue import type_text

    assert "type if real" in lines[0]
    for ln, r in zip(body, top, strict=True):
        assert r["source_type"] and type_text(r["source_type"], r["source_type_p"], r["ss_distance"]) in ln
    # "asteroid" only reads as one where a known solar-system object is near
    assert type_text("asteroid", 0.61, 0.0) == "asteroid 0.61"
    assert type_text("asteroid", 0.61, None) == type_text("asteroid", 0.61, 30.0) == "asteroid (none known here) 0.61"
    assert main(["queue", "list", "--db", str(db), "--top", "500", "--stage", "first", "--hide-vetted", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [r["stage"] for r in got["rows"]] == ["first"] * len(got["rows"])
    vetted_first = int(top[1]["stage"] == "first")
    assert got["total"] == first.total - vetted_first
    assert top[1]["object_id"] not in {r["object_id"] for r in got["rows"]}
    halves = []
    for sky in ("galactic", "extragalactic"):  # as the web page's latitude filter
        assert main(["queue", "list", "--db", str(db), "--top", "500", "--sky", sky, "--b-cut", "20", "--json"]) == 0
        got = json.loads(capsys.readouterr().out)
        store = QueueStore(db)
        want = store.list_objects(ListQuery(sky=sky, b_cut=20.0, per_page=500))
        store.close()
        assert [r["object_id"] for r in got["rows"]] == [r["object_id"] for r in want.rows] and got["rows"]
        assert got["total"] == want.total
        halves.append({r["object_id"] for r in got["rows"]})
    assert not halves[0] & halves[1]
    assert main(["queue", "list", "--db", str(db.parent / "none.sqlite")]) == 2
    assert "no such queue store" in capsys.readouterr().err
    # A latitude cut without --sky filtered nothing, silently.
    assert main(["queue", "list", "--db", str(db), "--b-cut", "30"]) == 2
    assert "give --sky too" in capsys.readouterr().err
    # Out of range is refused, not clipped to 500 rows or read as "nothing passes".
    for flag, value, says in (("--top", "501", "at most 500"), ("--min-p-real", "1.5", "not a probability")):
        with pytest.raises(SystemExit):
            main(["queue", "list", "--db", str(db), flag, value])
        assert says in capsys.readouterr().err


def test_retraining_leaves_out_unscorable_calls_and_says_when_the_base_saw_the_objects(tmp_path, db):
    from models.scorer import DEFAULT_MODEL_DIR, MIN_EVIDENCE, AlertScorer
    from models.train import read_decisions, retrain_on_decisions

    store = QueueStore(db)
    rows = store.list_objects(ListQuery(per_page=500)).rows
    for i, r in enumerate(rows[:60]):
        store.record_decision(r["object_id"], "real" if i % 2 else "bogus", "gus")
    store.close()
    labels = tmp_path / "labels.parquet"
    export_labels(db, labels)
    d = read_decisions(labels)
    d.loc[:4, list(MIN_EVIDENCE)] = np.nan  # five calls on alerts without evidence on the detection
    base = AlertScorer.load(DEFAULT_MODEL_DIR)
    first, report = retrain_on_decisions(base, d)
    assert report["p_real"]["objects"] == 55 and report["p_real"]["base_in_sample"] == 0
    assert len(first.metadata["decisions_fit"]["object_digests"]) == 55
    assert first.metadata["base"]["version"] == base.model_version and "conditions_fit" not in first.metadata
    # Retrained again on the same calls: the first retrained model has seen all of them.
    _, again = retrain_on_decisions(first, d)
    assert again["p_real"]["base_in_sample"] == 55
    with pytest.raises(ValueError, match="no decisions"):
        read_decisions(_empty_export(tmp_path))


def _empty_export(tmp_path):
    out = tmp_path / "empty.csv"
    empty = tmp_path / "empty.sqlite"
    QueueSink(empty).close()
    export_labels(empty, out)
    return out


def test_extrapolated_scores_are_marked_in_the_list_the_object_page_and_the_terminal(db, client, capsys):
    """Scores resting on labels that hardly reach an alert (annotation ``extrapolated``: the faint
    Rubin alerts of the sample, fainter than the simulated training labels) are marked wherever a
    vetter reads them; the others are not."""
    from stream.cli import main
    from stream.queue import extrapolated_text

    store = QueueStore(db)
    rows = store.list_objects(ListQuery(per_page=500)).rows
    store.close()
    flagged = [r for r in rows if r["extrapolated"]]
    plain = [r for r in rows if not r["extrapolated"] and r["priority"] is not None]
    assert flagged and plain and all(r["survey"] == "rubin" for r in flagged)
    three = [r for r in flagged if r["extrapolated"] == ["p_extragalactic", "p_fast", "source_type"]]
    assert three and extrapolated_text(three[0]["extrapolated"]) == "P(extragalactic), P(fast) and the source type"
    assert extrapolated_text(["p_fast"]) == "P(fast)" and extrapolated_text([]) == ""
    assert main(["queue", "list", "--db", str(db), "--top", "500"]) == 0
    out = {ln.split()[1]: ln for ln in capsys.readouterr().out.splitlines()[2:-1]}
    assert all(f"extrapolated: {extrapolated_text(r['extrapolated'])}" in out[r["object_id"]] for r in flagged)
    assert not any("extrapolated" in out[r["object_id"]] for r in plain)
    assert main(["queue", "list", "--db", str(db), "--top", "500", "--json"]) == 0
    got = {r["object_id"]: r["extrapolated"] for r in json.loads(capsys.readouterr().out)["rows"]}
    assert got == {r["object_id"]: r["extrapolated"] for r in rows}
    _login(client)
    page = client.get("/?per_page=500").get_data(as_text=True)
    for r in (*flagged, *plain):
        row = re.search(rf'<tr data-object-id="{re.escape(r["object_id"])}".*?</tr>', page, re.S).group(0)
        assert ('class="badge extrap"' in row) == bool(r["extrapolated"]), r["object_id"]
    obj = client.get(f"/object/{three[0]['object_id']}").get_data(as_text=True)
    para = re.search(r'<p class="typical" id="extrapolated">(.*?)</p>', obj, re.S).group(1)
    assert para.startswith("Extrapolated: P(extragalactic), P(fast) and the source type.")
    assert re.search(r"estimated share 0\.00\d, below 0\.01\)", para)
    assert obj.count('class="badge extrap"') == 3  # beside P(extragalactic), P(fast) and the types
    obj = client.get(f"/object/{plain[0]['object_id']}").get_data(as_text=True)
    assert 'id="extrapolated"' not in obj and "badge extrap" not in obj


def test_the_list_page_reads_ages_against_each_surveys_clock(db, client):
    """The sample holds ZTF 2018-2023 and Rubin 2025 alerts: each survey's newest is 0 days old."""
    store = QueueStore(db)
    rows, clocks = store.list_objects(ListQuery(per_page=500)).rows, store.survey_clocks()
    store.close()
    assert set(clocks) == {"ztf", "rubin"} and abs(clocks["ztf"] - clocks["rubin"]) > 365
    _login(client)
    page = client.get("/?per_page=500").get_data(as_text=True)
    assert all(f"{sv} MJD {m:.2f}" in page for sv, m in clocks.items())
    for sv, m in clocks.items():
        r = next(r for r in rows if r["survey"] == sv and r["latest_mjd"] == m)
        row = re.search(rf'<tr data-object-id="{re.escape(r["object_id"])}".*?</tr>', page, re.S).group(0)
        cells = re.findall(r'<td class="num">([^<]*)</td>', row)  # P(real), P(xgal), P(fast), age, last, ...
        assert cells[4].strip() == "0.0", (sv, cells)
        obj = client.get(f"/object/{r['object_id']}").get_data(as_text=True)
        first = re.search(r"<th>first detection</th><td>[^<]*· ([-\d.]+|—) d ago", obj).group(1)
        assert first == "—" or float(first) == pytest.approx(m - r["first_mjd"], abs=0.06)


def test_a_login_ends_its_hours_after_it_began_however_often_the_page_polls(db, monkeypatch):
    """The session cookie's expiry is renewed by every request and an open list polls every 10 s, so a
    tab left open had stayed logged in for ever; a login now lasts SESSION_HOURS from the login."""
    import stream.web as W

    app = W.create_app(db, token=TOKEN)
    app.config["TESTING"] = True
    c = app.test_client()
    _login(c)
    assert c.get("/api/changes?since=0").status_code == 200
    t = [W.time.time()]
    monkeypatch.setattr(W.time, "time", lambda: t[0])
    for hours in (3, 4, W.SESSION_HOURS - 7 - 0.01):  # polled all along: still in just before its end
        t[0] += hours * 3600
        assert c.get("/api/changes?since=0").status_code == 200, hours
    t[0] += 60
    assert c.get("/api/changes?since=0").status_code == 401
    assert c.get("/").status_code == 302  # the page: to the login form

"""How fast the eyeball-queue list page is with a big store.

Fills a fresh SQLite store with N synthetic objects (default 100,000; a quarter of them
with a second alert, so the annotation history is larger than the object table)
through the real :class:`stream.queue.QueueSink`, then times the real Flask app
rendering the list page (first page, deep page, filtered, sorted) through its test
client, plus the bare list query; last, a retention run with a 30-day window (which drops the
light curves of the earlier alert of each object seen again a month later) and a second,
immediate one (nothing left to delete).

Usage::

    .venv/bin/python bench/bench_queue.py [--n 100000] [--repeat 20] [--db PATH|postgresql://...] [--json]

With ``--db postgresql://...`` the same figures come from a PostgreSQL store (filled first if
it holds no objects); an empty database of an existing server is enough.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.features import FEATURES  # noqa: E402
from stream.queue import LIST_COLUMNS, ListQuery, QueueSink, QueueStore, is_url, prune, redacted  # noqa: E402
from stream.web import create_app, query_from_args  # noqa: E402

TOKEN = "bench"
CASES = [
    ("first page", ""),
    ("page 200", "page=200"),
    ("stage=first", "stage=first"),
    ("P(real)>=0.8, P(xgal)>=0.5", "min_p_real=0.8&min_p_extragalactic=0.5"),
    ("extragalactic |b|>=15", "sky=extragalactic"),
    ("galactic by score", "sky=galactic&sky_by=score"),
    ("sort P(fast)", "sort=p_fast"),
    ("sort brightest, stage=updating", "sort=mag&stage=updating"),
    ("hide vetted, P(fast)>=0.9", "hide_vetted=1&min_p_fast=0.9"),
]


def synthetic_batch(rng: np.random.Generator, start: int, n: int, n_objects: int, mjd0: float) -> tuple:
    """(result-like object, records) for synthetic alerts ``start .. start+n``.

    Alert ``i`` belongs to object ``i`` for ``i < n_objects`` and to object ``i - n_objects``
    after that (a second, later alert of an existing object).
    """
    records, alerts = [], []
    for i in range(start, start + n):
        oid = f"SYN{(i if i < n_objects else i - n_objects):08d}"
        mjd = mjd0 + rng.uniform(0, 30) + (30 if i >= n_objects else 0)
        # First detected 0.5, 8 or 40 days before this alert: the list ages stages against the
        # newest alert, so every stage holds objects (all were "longterm" once aged, and the
        # stage=first case timed an empty page).
        first = mjd - float(rng.choice([0.5, 8.0, 40.0]))
        scored = rng.random() > 0.02
        p = rng.random(3)
        stage = ("first", "updating", "longterm")[int(rng.integers(0, 3))]
        feats = {f: (None if rng.random() < 0.1 else float(rng.normal())) for f in FEATURES}
        feats["galactic_latitude"] = float(rng.uniform(-90, 90))
        mag = float(rng.uniform(15, 22))
        records.append({
            "annotation_schema_version": "1.0", "alert_id": 10_000_000 + i, "object_id": oid, "survey": "ztf",
            "survey_schema_version": "4.02", "ra": float(rng.uniform(0, 360)), "dec": float(rng.uniform(-30, 90)),
            "band": "gr"[i % 2], "exposure": i, "event_mjd": mjd, "event_time_scale": "utc", "event_time_ms": 0,
            "processing_time_ms": int(time.time() * 1000), "status": "scored" if scored else "unscored",
            "p_real": float(p[0]) if scored else None, "p_extragalactic": float(p[1]) if scored else None,
            "p_fast": float(p[2]) if scored else None,
            "priority": float(p[0] * (0.35 + 0.65 * p[1])) if scored else None, "stage": stage,
            "explanation": [], "explanation_text": {"p_real": "P(real) synthetic"} if scored else {},
            "hsr": {"mode": "off", "n_train": 0, "n_siblings": 0, "overfit_alarm": False, "rms_before": None,
                    "rms_after": None, "flux_raw": None, "flux_corrected": None},
            "lightcurve": {"n_detections": 12, "n_nondetections": 4, "n_forced": 0, "first_mjd": first,
                           "mag": mag, "peak_flux": 100.0},
            "features": feats, "model_version": "bench", "code_version": "bench",
            "source": {"topic": "bench", "partition": 0, "offset": i},
        })
        t = np.sort(mjd - rng.uniform(0, 20, 16))
        lc = SimpleNamespace(mjd=t, band=np.array(list("gr" * 8)), flux=np.where(np.arange(16) < 4, np.nan,
                             100 + 20 * rng.normal(size=16)), flux_err=np.full(16, 5.0),
                             kind=np.array([2] * 4 + [1] * 11 + [0]))
        alerts.append(SimpleNamespace(lightcurve=lc, cutouts={}))
    return SimpleNamespace(annotations=[None] * n, alerts=alerts), records


def fill(path: Path, n: int, batch: int = 2000, seed: int = 1) -> float:
    """Write ``n`` objects (+20% repeat alerts) through the sink; return alerts/s."""
    rng = np.random.default_rng(seed)
    total = int(n * 1.25)  # the last fifth reuse earlier object ids: a second alert for 25% of objects
    spent = 0.0  # the sink's own time: making the synthetic records (~23 % of it) is not counted
    with QueueSink(path) as sink:
        for start in range(0, total, batch):
            result, records = synthetic_batch(rng, start, min(batch, total - start), n, 60000.0)
            t0 = time.perf_counter()
            sink.write_result(result, records)
            sink.flush()
            spent += time.perf_counter() - t0
    return total / spent


def time_it(fn, repeat: int) -> tuple:
    fn()  # warm caches
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1000)
    ts.sort()
    return statistics.median(ts), ts[min(len(ts) - 1, int(0.95 * len(ts)))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="objects")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--db", help="store to (re)use: SQLite file or postgresql:// URL; default a temporary file")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)

    tmp = None
    if args.db:
        path = args.db if is_url(args.db) else Path(args.db)
    else:
        tmp = tempfile.TemporaryDirectory()
        path = Path(tmp.name) / "queue.sqlite"
    rate = None
    if is_url(path):
        probe = QueueStore(path)
        empty = probe.n_objects() == 0
        probe.close()
    else:
        empty = not path.exists()
    if empty:
        rate = fill(path, args.n)
    store = QueueStore(path)
    n_obj = store.n_objects()
    n_hist = store.conn.execute("SELECT COUNT(*) FROM annotations").fetchone()[0]
    # Some vetted objects so "hide vetted" has something to hide.
    for r in store.list_objects(ListQuery(per_page=200)).rows:
        store.record_decision(r["object_id"], "real", "bench")

    app = create_app(path, token=TOKEN)
    client = app.test_client()
    hdr = {"Authorization": f"Bearer {TOKEN}", "X-Vetter": "bench"}
    results = []
    for name, qs in CASES:
        def page(qs=qs):
            r = client.get(f"/?{qs}", headers=hdr)
            assert r.status_code == 200, r.status_code

        def query(qs=qs):
            from werkzeug.datastructures import MultiDict

            q = query_from_args(MultiDict([kv.split("=") for kv in qs.split("&") if kv]))
            where, a = q.where()
            store.conn.execute(f"SELECT {LIST_COLUMNS} FROM objects WHERE {where} ORDER BY {q.order()} "
                               "LIMIT 50 OFFSET ?", [*a, (q.page - 1) * 50]).fetchall()
            return store.conn.execute(f"SELECT COUNT(*) FROM objects WHERE {where}", a).fetchone()[0]

        p50, p95 = time_it(page, args.repeat)
        q50, _ = time_it(query, args.repeat)
        results.append({"case": name, "query": qs, "page_ms_median": round(p50, 2), "page_ms_p95": round(p95, 2),
                        "sql_ms_median": round(q50, 2), "rows": int(query())})
    if is_url(path):
        db_mb = round(store.conn.execute("SELECT pg_database_size(current_database())").fetchone()[0] / 2**20, 1)
    else:
        db_mb = round(path.stat().st_size / 2**20, 1)
    # Retention last (it changes the store): a 30-day window drops the light curves of the first
    # alerts of the objects seen again 30 days later.
    t0 = time.perf_counter()
    pruned = prune(store.conn, 30.0)
    prune_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    prune(store.conn, 30.0)
    prune_again_s = time.perf_counter() - t0
    store.close()
    meta = {"store": redacted(path), "objects": n_obj, "annotation_rows": n_hist,
            "fill_alerts_per_s": round(rate) if rate else None, "db_mb": db_mb, "repeat": args.repeat,
            "prune_30d": {"light_curves_deleted": pruned["lightcurves"], "seconds": round(prune_s, 2),
                          "again_seconds": round(prune_again_s, 2)}}
    if args.json:
        print(json.dumps({"meta": meta, "results": results}, indent=2))
    else:
        print(f"{meta['store']}: objects {n_obj:,}, annotation history {n_hist:,} rows, store {meta['db_mb']} MB"
              + (f", filled at {rate:,.0f} alerts/s" if rate else ""))
        print(f"{'case':34s} {'rows':>8s} {'page p50 ms':>12s} {'page p95 ms':>12s} {'SQL p50 ms':>11s}")
        for r in results:
            print(f"{r['case']:34s} {r['rows']:8,d} {r['page_ms_median']:12.1f} {r['page_ms_p95']:12.1f} "
                  f"{r['sql_ms_median']:11.1f}")
        p = meta["prune_30d"]
        print(f"retention, 30-day window: {p['light_curves_deleted']:,} light curves deleted in {p['seconds']:.2f} s; "
              f"an immediate second run {p['again_seconds']:.2f} s")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

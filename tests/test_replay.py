"""Offline replay: malformed input lands in rejections with the right reason, good alerts around it
are annotated, N = A + R, and every annotation validates against Vigil's output schema."""

from __future__ import annotations

import copy
import io
import json
import math
import re
import tarfile
import time

import fastavro
import pyarrow.parquet as pq
import pytest
from conftest import DATA, ROOT, SHARED, avro_files, needs_shared

from stream.alert import Envelope
from stream.annotation import decode_annotation, encode_annotation, validate_annotation
from stream.cli import main
from stream.decode import Decoder, SchemaRegistry, encode_schemaless, frame_confluent
from stream.pipeline import ErrorBudget, Pipeline
from stream.service import drive
from stream.sinks import JsonlSink
from stream.sources import MemorySource


def _container(schema, rec) -> bytes:
    buf = io.BytesIO()
    fastavro.writer(buf, schema, [rec])
    return buf.getvalue()


def _malformed_cases():
    """(payload, expected reason) for more than ten kinds of bad input."""
    f402 = avro_files("ztf_fink", "2023-10-19to21_schema4.02")[0]
    good = f402.read_bytes()
    with open(f402, "rb") as fh:
        r = fastavro.reader(fh)
        schema, rec = r.writer_schema, next(r)  # Spark-written: every field nullable

    def edited(**cand):
        x = copy.deepcopy(rec)
        x["candidate"].update(cand)
        return _container(schema, x)

    no_object = copy.deepcopy(rec)
    no_object["objectId"] = None
    no_candidate = copy.deepcopy(rec)
    no_candidate["candidate"] = None
    rubin_schema, (rubin_rec,) = (lambda r: (r.writer_schema, list(r)))(
        fastavro.reader(open(avro_files("rubin_fink")[0], "rb")))
    rubin_body = encode_schemaless(rubin_rec, fastavro.parse_schema(rubin_schema))
    # Break the first record's first union index (schemavsn: ["string", "null"]) → 0x7f.
    flipped = bytearray(good)
    at = good.index(good[-16:]) + 16  # the header ends with the sync marker
    for _ in range(2):  # skip the block's record count and byte size (zig-zag varints)
        while flipped[at] & 0x80:
            at += 1
        at += 1
    flipped[at] = 0x7F
    return [
        (b"", "empty_payload"),
        (b"\x07" + b"junk" * 10, "bad_magic_byte"),
        (b"not avro at all", "bad_magic_byte"),
        (frame_confluent(4242, rubin_body), "unknown_schema_id"),
        (frame_confluent(909, rubin_body[: len(rubin_body) // 3]), "truncated"),
        (frame_confluent(909, rubin_body + b"\x00\x01"), "trailing_bytes"),
        (good[:200], "truncated"),
        (good[: len(good) - 40], "truncated"),
        (bytes(flipped), "corrupt_avro"),
        (b"Obj\x01" + bytes(50), "corrupt_avro"),
        (edited(ra=float("nan")), "bad_coordinates"),
        (edited(dec=123.0), "bad_coordinates"),
        (edited(ra=None), "missing_field"),
        (edited(jd=float("inf")), "bad_time"),
        (edited(jd=time.time() / 86400.0 + 2440587.5 + 30.0), "bad_time"),  # a month in the future
        (edited(magpsf=None), "missing_field"),
        (_container(schema, no_object), "missing_field"),
        (_container(schema, no_candidate), "missing_field"),
        (_container({"type": "record", "name": "other", "fields": [{"name": "x", "type": "int"}]}, {"x": 1}),
         "unknown_survey"),
        (b"\x00" * (2 * 2**20 + 1), "oversize"),
    ], rubin_schema


def test_malformed_inputs_are_rejected_with_reasons_and_stream_goes_on(ztf_files, tmp_path):
    cases, rubin_schema = _malformed_cases()
    reg = SchemaRegistry()
    reg.add(909, rubin_schema)
    goods = [f.read_bytes() for f in ztf_files[:12]]
    items, expected = [], []
    for i, (payload, reason) in enumerate(cases):  # good, bad, good, bad, ...
        items.append(goods[i % len(goods)])
        items.append(payload)
        expected.append(reason)
    pipeline = Pipeline(Decoder(schemas=reg, max_message_bytes=2 * 2**20), error_budget=ErrorBudget(0))
    source = MemorySource(items, batch_size=7)
    ann, rej = JsonlSink(tmp_path / "a.jsonl"), JsonlSink(tmp_path / "r.jsonl")
    counts = drive(source, pipeline, [ann], [rej])
    rejected = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    annotated = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len({r for r in expected}) >= 10
    assert [r["reason"] for r in sorted(rejected, key=lambda r: r["offset"])] == expected
    assert all(r["offset"] % 2 == 1 for r in rejected)  # only the bad ones
    assert len(annotated) == len(cases) and counts.annotated == len(cases)
    assert counts.read == counts.annotated + counts.rejected == 2 * len(cases)
    assert sorted(source.acked) == list(range(len(items)))  # every message acknowledged, none lost
    for r in rejected:
        assert r["detail"] and r["stage"] in ("decode", "validate")


def test_replay_cli_on_vendored_sample_with_tarball(tmp_path, capsys):
    tar = tmp_path / "ztf_public_night.tar.gz"
    files = avro_files("ztf_fink", "2023-10-19to21_schema4.02")
    with tarfile.open(tar, "w:gz") as t:
        for f in files:
            t.add(f, arcname=f.name)
    out, pq_out, rej = tmp_path / "a.jsonl", tmp_path / "a.parquet", tmp_path / "r.jsonl"
    rc = main(["replay", str(DATA / "ztf_ampel"), str(DATA / "rubin_fink"), str(tar), "--out", str(out),
               "--out", str(pq_out), "--rejected", str(rej)])
    assert rc == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    n_files = len(avro_files("ztf_ampel")) + len(avro_files("rubin_fink")) + len(files)
    assert line == f"read {n_files}, annotated {n_files}, rejected 0 (by reason: none)"
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == n_files == pq.read_table(pq_out).num_rows
    # Parquet keeps the lists and maps typed (they were JSON text a reader had to parse), equal to JSON Lines,
    # and the file says which layout and schema version it holds.
    meta = pq.read_schema(pq_out).metadata
    assert meta[b"vigil.parquet_layout"] == b"2" and meta[b"vigil.schema_version"] == b"1.2"
    from importlib import resources  # the shipped schema file names the version the records carry (it said 1.1)

    avsc = json.loads(resources.files("stream").joinpath("schemas", "vigil.annotation.v1.avsc").read_text())
    assert avsc["version"] == records[0]["annotation_schema_version"] == "1.2"
    rows = pq.read_table(pq_out).to_pylist()
    for r, row in zip(records, rows, strict=True):
        assert row["alert_id"] == r["alert_id"] and row["hsr_mode"] == r["hsr"]["mode"]
        for k in ("event_time_ms", "processing_time_ms"):  # UTC timestamps, to the millisecond
            assert round(row[k].timestamp() * 1000) == r[k] and row[k].utcoffset().total_seconds() == 0
        assert row["explanation"] == r["explanation"] and row["extrapolated"] == r["extrapolated"]
        for k in ("explanation_text", "features", "source_type_probabilities", "label_propensity"):
            assert dict(row[k]) == r[k], k
    assert sum("!" in r["source"]["topic"] for r in records) == len(files)  # tar members named
    for r in records:
        validate_annotation(r)
        assert r["model_version"] != "none"  # the shipped default model, not the placeholder rule
        assert decode_annotation(encode_annotation(r)) == r
        assert set(r["label_propensity"]) == {"p_real", "p_extragalactic", "p_fast", "source_type"}
        assert r["extrapolated"] == [s for s, e in r["label_propensity"].items() if e < 0.01]
    # Schema evolution of the schemaless messages: a 1.0 or 1.1 consumer reads these messages (the
    # fields each minor version added come last), and a 1.0 message decodes, by its header's
    # version, with their defaults.
    from stream.annotation import ADDED_IN, annotation_schema

    r = records[0]
    old = fastavro.schemaless_reader(io.BytesIO(encode_annotation(r)), annotation_schema("1.0"), None)
    assert set(old) == set(r) - {f for fs in ADDED_IN.values() for f in fs}
    mid = fastavro.schemaless_reader(io.BytesIO(encode_annotation(r)), annotation_schema("1.1"), None)
    assert set(mid) == set(r) - set(ADDED_IN["1.2"]) and mid["source_type"] == r["source_type"]
    assert (old["alert_id"], old["features"], old["source"]) == (r["alert_id"], r["features"], r["source"])
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, annotation_schema("1.0"), {k: r[k] for k in old})
    back = decode_annotation(buf.getvalue(), "1.0")
    assert back["source_type"] is None and back["source_type_probabilities"] == {} and back["alert_id"] == r["alert_id"]
    assert back["extrapolated"] == [] and back["label_propensity"] == {}
    with pytest.raises(ValueError, match="schema version '2.0'"):
        decode_annotation(buf.getvalue(), "2.0")
    # A newer minor version (a field added at the end, with its default) is read with this version's
    # schema, its new field left unread (it had been refused, so a 1.3 producer stopped every 1.2 reader).
    raw = json.loads((ROOT / "stream" / "schemas" / "vigil.annotation.v1.avsc").read_text())
    raw["fields"].append({"name": "added_in_1_3", "type": "double", "default": 0.0})
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(raw), dict(r, added_in_1_3=2.5))
    assert decode_annotation(buf.getvalue(), "1.3") == r
    with pytest.raises(ValueError, match="schema version '0.9'"):
        decode_annotation(buf.getvalue(), "0.9")


def test_replay_reconciliation_counts_rejections(tmp_path, capsys):
    good = avro_files("ztf_fink", "2018-12-02_schema3.2")
    (tmp_path / "bad.avro").write_bytes(good[0].read_bytes()[:300])
    (tmp_path / "junk.avro").write_bytes(b"hello")
    for f in good:
        (tmp_path / f.name).write_bytes(f.read_bytes())
    rej = tmp_path / "r.jsonl"
    assert main(["replay", str(tmp_path), "--rejected", str(rej)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == (f"read {len(good) + 2}, annotated {len(good)}, rejected 2 "
                    "(by reason: bad_magic_byte=1, truncated=1)")
    assert len(rej.read_text().splitlines()) == 2


def test_unreadable_files_and_damaged_archives_are_rejected_and_the_replay_goes_on(tmp_path, capsys):
    good = avro_files("ztf_fink", "2018-12-02_schema3.2")
    for f in good:
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "broken.avro").symlink_to(tmp_path / "gone.avro")  # a dangling link
    (tmp_path / "fake.tar").write_bytes(b"not a tar archive " * 40)
    def tar_of_two(prefix, mode):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode=mode) as t:
            for f in good[:2]:
                data = f.read_bytes()
                info = tarfile.TarInfo(prefix + f.name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    raw = tar_of_two("in-", "w:gz")  # an archive cut short inside its second member
    (tmp_path / "cut.tar.gz").write_bytes(raw[: len(raw) * 3 // 4])
    first = 512 + -(-good[0].stat().st_size // 512) * 512  # header + padded data of member 1
    # a plain tar cut at its second header: a streamed read stops there quietly
    (tmp_path / "cut.tar").write_bytes(tar_of_two("p-", "w")[:first])
    (tmp_path / "notes.txt").write_text("not an alert")  # not read in a walked directory: said, not silent
    rej = tmp_path / "r.jsonl"
    assert main(["replay", str(tmp_path), "--rejected", str(rej), "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "1 file(s) not read" in out.err and "notes.txt" in out.err
    line = out.out.strip().splitlines()[-1]
    rejected = {r["source"].rsplit("/", 1)[-1]: r for r in map(json.loads, rej.read_text().splitlines())}
    assert set(rejected) == {"broken.avro", "fake.tar", f"cut.tar.gz!in-{good[1].name}", "cut.tar"}, set(rejected)
    assert {r["reason"] for r in rejected.values()} == {"unreadable"}
    assert "No such file" in rejected["broken.avro"]["detail"]
    assert "end-of-archive marker" in rejected["cut.tar"]["detail"]
    # the archives' first members were read and annotated before the damage
    assert line == (f"read {len(good) + 6}, annotated {len(good) + 2}, rejected 4 (by reason: unreadable=4)")


def test_link_members_of_an_archive_are_rejected_not_skipped(tmp_path):
    from stream.sources import iter_envelopes

    good = avro_files("ztf_fink", "2018-12-02_schema3.2")[0]
    data = good.read_bytes()
    with tarfile.open(tmp_path / "night.tar.gz", "w:gz") as t:
        d = tarfile.TarInfo("alerts")
        d.type = tarfile.DIRTYPE
        t.addfile(d)
        info = tarfile.TarInfo("alerts/a.avro")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
        for name, kind in (("alerts/b.avro", tarfile.SYMTYPE), ("alerts/c.avro", tarfile.LNKTYPE)):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = kind, "alerts/a.avro"
            t.addfile(link)
    envs = list(iter_envelopes([tmp_path / "night.tar.gz"]))
    assert [e.source.rsplit("!", 1)[-1] for e in envs] == ["alerts/a.avro", "alerts/b.avro", "alerts/c.avro"]
    assert envs[0].unreadable is None and envs[0].payload == data
    assert all("link" in e.unreadable and not e.payload for e in envs[1:])


def test_annotations_carry_scores_priority_and_explanation(ztf_files):
    res = Pipeline().process([Envelope(f.read_bytes(), str(f)) for f in ztf_files])
    assert len(res.annotations) == len(ztf_files)
    for a in res.annotations:
        r = a.to_record()
        if r["status"] == "scored":
            assert all(0 <= r[k] <= 1 for k in ("p_real", "p_extragalactic", "p_fast", "priority"))
            assert set(r["explanation_text"]) == {"p_real", "p_extragalactic", "p_fast"}
        else:
            assert r["priority"] is None and r["p_real"] is None
        assert r["stage"] in ("first", "updating", "longterm")
        assert all(v is None or math.isfinite(v) for v in r["features"].values())


@needs_shared
def test_replay_of_all_real_sample_alerts(tmp_path, capsys):
    out, rej = tmp_path / "a.jsonl", tmp_path / "r.jsonl"
    paths = [SHARED / "ztf_alerts_fink_broker", SHARED / "ztf_alerts_ampel", SHARED / "rubin_alerts_fink_broker"]
    assert main(["replay", *map(str, paths), "--out", str(out), "--rejected", str(rej)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    records = [json.loads(x) for x in out.read_text().splitlines()]
    n = len(records)
    assert n == 1166 + 138 + 288
    assert line == f"read {n}, annotated {n}, rejected 0 (by reason: none)"
    assert rej.read_text() == ""
    for r in records:
        validate_annotation(r)


def test_unknown_path_is_a_clear_error(tmp_path, capsys):
    assert main(["replay", "/no/such/dir", "--out", str(tmp_path / "a.jsonl")]) == 2
    assert "no such file or directory: /no/such/dir" in capsys.readouterr().err


def test_output_names_must_promise_the_format_written(tmp_path, capsys):
    data = str(DATA / "ztf_fink" / "2018-12-02_schema3.2")
    assert main(["replay", data, "--out", str(tmp_path / "a.csv")]) == 2  # would be JSON Lines
    assert "--out" in capsys.readouterr().err
    assert main(["replay", data, "--rejected", str(tmp_path / "r.parquet"), "--queue", str(tmp_path / "q.sqlite")]) == 2
    assert "--rejected" in capsys.readouterr().err
    assert not (tmp_path / "q.sqlite").exists() and not (tmp_path / "a.csv").exists()


def test_replay_refuses_outputs_that_would_overwrite_each_other(tmp_path, capsys, monkeypatch):
    # One file named twice: each sink would write over the other's records (seen: a rejection
    # written over an annotation, a Parquet file turned into SQLite). Nothing is created.
    data = str(DATA / "ztf_fink" / "2018-12-02_schema3.2")
    monkeypatch.chdir(tmp_path)
    for argv, flags in ((["--out", "x.jsonl", "--rejected", "./x.jsonl"], "--out and --rejected"),
                        (["--out", "y.parquet", "--queue", str(tmp_path / "y.parquet")], "--out and --queue"),
                        (["--out", "a.jsonl", "--out", "a.jsonl"], "--out and --out")):
        assert main(["replay", data, *argv]) == 2
        first, _, second = flags.split()
        assert re.search(f"{first} .* and {second} .* both name {re.escape(str(tmp_path))}", capsys.readouterr().err)
    assert main(["replay", data]) == 2
    assert "would write nothing" in capsys.readouterr().err
    assert main(["replay", data, "--out", "b.jsonl", "--batch-size", "0"]) == 2
    assert "--batch-size 0" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_replay_fills_the_queue_store(tmp_path, capsys):
    import sqlite3

    files = avro_files("ztf_fink")
    q = tmp_path / "queue.sqlite"
    assert main(["replay", str(DATA / "ztf_fink"), "--queue", str(q), "--no-progress"]) == 0
    assert main(["replay", str(DATA / "ztf_fink"), "--queue", str(q), "--no-progress"]) == 0  # idempotent
    with sqlite3.connect(q) as db:
        n_obj = db.execute("select count(*) from objects").fetchone()[0]
    objects = {fastavro.reader(open(f, "rb")).__next__()["objectId"] for f in files}
    assert n_obj == len(objects)


def test_a_subdirectory_that_cannot_be_listed_is_an_unreadable_input(tmp_path, monkeypatch):
    import os

    from stream.sources import iter_envelopes

    good = avro_files("ztf_fink", "2018-12-02_schema3.2")[0]
    (tmp_path / "a.avro").write_bytes(good.read_bytes())
    (tmp_path / "locked").mkdir()
    real_scandir = os.scandir

    def scandir(path="."):  # as for a directory without read permission (root ignores chmod)
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    envs = list(iter_envelopes([tmp_path]))
    assert [e.unreadable is None for e in envs] == [True, False]
    assert envs[1].source.endswith("locked") and "cannot be listed" in envs[1].unreadable


def test_linked_subdirectories_are_read_once_and_a_link_up_the_tree_does_not_loop(tmp_path):
    """A night linked into the tree (``night2 -> ../other``) had been left out without a word."""
    from stream.sources import iter_envelopes

    files = avro_files("ztf_fink", "2018-12-02_schema3.2")[:3]
    top, other = tmp_path / "top", tmp_path / "other"
    top.mkdir()
    other.mkdir()
    (top / "a.avro").write_bytes(files[0].read_bytes())
    for f in files[1:]:
        (other / f.name).write_bytes(f.read_bytes())
    (top / "night2").symlink_to(other, target_is_directory=True)
    (top / "again").symlink_to(other, target_is_directory=True)  # the same night twice: read once
    (top / "up").symlink_to(tmp_path, target_is_directory=True)  # holds top itself: no loop
    envs = list(iter_envelopes([top]))
    assert all(e.unreadable is None for e in envs)
    assert sorted(e.payload for e in envs) == sorted(f.read_bytes() for f in files)


def test_outputs_of_an_earlier_run_do_not_survive_and_a_bad_queue_costs_nothing(tmp_path, capsys):
    """A CLI review's cases: a rerun with no annotation left the old Parquet file in place; a
    --queue that is no database truncated the --out files, then failed without naming the flag."""
    good = avro_files("ztf_fink")[:3]
    out = [f"--out={tmp_path / 'a.jsonl'}", f"--out={tmp_path / 'a.parquet'}"]
    assert main(["replay", *map(str, good), *out, "--no-progress"]) == 0
    assert pq.read_table(tmp_path / "a.parquet").num_rows == 3
    junk = tmp_path / "junk.avro"
    junk.write_bytes(b"not avro")
    assert main(["replay", str(junk), *out, "--rejected", str(tmp_path / "r.jsonl"), "--no-progress"]) == 0
    assert pq.read_table(tmp_path / "a.parquet").num_rows == 0  # empty, with the schema
    assert main(["replay", *map(str, good), *out, "--no-progress"]) == 0
    notdb = tmp_path / "notdb.sqlite"
    notdb.write_text("this is no database\n" * 100)
    capsys.readouterr()
    assert main(["replay", *map(str, good), *out, "--queue", str(notdb), "--no-progress"]) == 2
    assert f"--queue {notdb}: cannot open it as a queue store" in capsys.readouterr().err
    assert pq.read_table(tmp_path / "a.parquet").num_rows == 3  # untouched
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 3
    # Nor does a --rejected that is a directory, an output naming an input, or nothing to read (a later
    # review's cases: each had emptied the --out files before failing, or "succeeded" reading nothing).
    (tmp_path / "d.jsonl").mkdir()
    (tmp_path / "empty").mkdir()
    kept = tmp_path / "in.jsonl"
    kept.write_text("precious\n")
    for argv, words in (([*map(str, good), *out, "--rejected", str(tmp_path / "d.jsonl")], "a directory"),
                        ([*map(str, good), str(kept), *out, "--rejected", str(kept)], "also one of the files"),
                        ([str(tmp_path / "empty"), *out], "nothing to read")):
        assert main(["replay", *argv, "--no-progress"]) == 2, argv
        assert words in capsys.readouterr().err
        assert pq.read_table(tmp_path / "a.parquet").num_rows == 3, argv
        assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 3
    assert kept.read_text() == "precious\n"


def test_sizes_of_zero_and_ports_out_of_range_are_refused(capsys):
    import pytest

    assert main(["evaluate", "--simulate", "--seed", "2", "--quadrants", "0"]) == 2  # was: the default size
    assert "quadrants" in capsys.readouterr().err
    for argv in (["queue", "serve", "--db", "x.sqlite", "--port", "70000"], ["broker", "--port", "-5"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and "--port" in capsys.readouterr().err


def test_evaluate_simulate_json_is_json(capsys):
    assert main(["evaluate", "--simulate", "--seed", "2", "--quadrants", "2", "--nights", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)  # it printed the text report before
    assert set(out["scores"]) == {"p_real", "p_extragalactic", "p_fast"} and len(out["interventions"]) == 8
    # the shipped model names source types: their accuracy, and how they move under the interventions
    assert 0 <= out["source_types"]["accuracy"] <= 1 and len(out["source_type_shifts"]) == 4
    # and flags the scores of alerts beyond its labels' reach, reporting how those scores fare
    sup = out["label_support"]
    assert set(sup["flagged"]) == {"p_real", "p_extragalactic", "p_fast", "source_type"}
    for s, part in sup["scores"].items():
        assert part["flagged"]["n"] == sup["flagged"][s]
        assert part["flagged"]["n"] + part["not_flagged"]["n"] == out["n_alerts"]
        low, high = part["not_flagged"]["ece_if_calibrated"]  # the reference a small subset is read against
        assert low >= 0 and high >= 0
    low, high = sup["scores"]["p_fast"]["not_flagged"]["ece_if_calibrated"]
    assert 0 < low < high  # (P(fast) is unsure often enough for a calibrated score to miss by chance)


def test_a_shipped_model_that_does_not_load_stops_the_replay(tmp_path, monkeypatch, capsys):
    """It fell back to the placeholder rule with a warning in the log, and wrote "scored"
    annotations of that rule (model_version "none"), exit status 0."""
    import models.scorer

    monkeypatch.setattr(models.scorer, "DEFAULT_MODEL_DIR", tmp_path / "gone")
    out = tmp_path / "a.jsonl"
    assert main(["replay", str(DATA / "ztf_ampel"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the shipped model does not load" in err and "--model DIR" in err
    assert not out.exists() or out.read_text() == ""


def test_a_replay_spanning_years_says_against_which_alert_it_ages_them(tmp_path, capsys):
    """The vendored ZTF sample spans 2018-2023 and the Rubin one 2016 (HSC reprocessed) to 2025:
    ranked by the stream clock, the older alerts are all aged against each survey's newest, which
    a vetter looking at a list of long-term objects could not tell."""
    assert main(["replay", str(DATA / "ztf_ampel"), str(DATA / "rubin_fink"), "--out", str(tmp_path / "a.jsonl"),
                 "--no-progress"]) == 0
    out, err = capsys.readouterr()
    notes = [ln for ln in err.splitlines() if ln.startswith("note: the ")]
    assert [n.split()[2] for n in notes] == ["rubin", "ztf"] and "aged against MJD" in notes[0]
    assert out.strip().splitlines()[-1].startswith("read ")  # the summary stays the last line
    assert main(["replay", str(DATA / "rubin_fink" / "lsstcam_2025-09-05"), "--out", str(tmp_path / "b.jsonl"),
                 "--no-progress"]) == 0
    assert "note: the" not in capsys.readouterr().err  # one night: nothing to say


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_sigterm_stops_a_replay_with_readable_outputs_and_a_summary(tmp_path, signame):
    """SIGTERM (what schedulers send) had killed ``vigil replay`` before its outputs were closed: the
    Parquet file had no footer (unreadable), and nothing was said. Then, stopped by an exception from the
    signal handler, a batch could be in the Parquet file but not in the JSON Lines (the handler ran between
    the two writes). Either signal now ends the replay after the batch in flight, in every output."""
    import os
    import signal
    import subprocess
    import sys

    files = avro_files("ztf_fink") + avro_files("ztf_ampel")
    assert files
    src = tmp_path / "alerts"
    src.mkdir()
    for copy_no in range(6):  # enough that the replay is still running when the signal comes
        for k, f in enumerate(files):
            (src / f"{copy_no}_{k}.avro").symlink_to(f)
    out_pq, out_js = tmp_path / "a.parquet", tmp_path / "a.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "replay", str(src), "--out", str(out_pq),
                             "--out", str(out_js), "--batch-size", "5", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(DATA.parent.parent), env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            # (as from a terminal, whatever ignores the test run itself: a script's
                            # background job ignores Ctrl-C, and so would the replay)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out_js.exists() and out_js.stat().st_size > 0:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the replay ended before it could be signalled"
    proc.send_signal(getattr(signal, signame))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == (143 if signame == "SIGTERM" else 130), (proc.returncode, err[-2000:])
    word = "terminated" if signame == "SIGTERM" else "interrupted"
    assert f"{word}: the outputs hold the batches finished before it\n" in err, err[-2000:]
    lines = out_js.read_text().splitlines()
    table = pq.read_table(out_pq)  # readable: the footer was written
    assert 0 < table.num_rows == len(lines) < 6 * len(files)


@pytest.fixture
def python_ctrl_c():
    """Ctrl-C as Python sets it up, for the test: a test run started as a script's background job ignores
    it, and so would the command under test."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _signal_in_second_jsonl_write(monkeypatch, *signals) -> list:
    """Make the JSON Lines sink deliver ``signals`` to this process inside its second write, before
    writing; returns the list of each write's record count."""
    import os

    from stream.sinks import JsonlSink

    write = JsonlSink.write
    calls = []

    def write_signalled(self, records):
        calls.append(len(records))
        if len(calls) == 2:
            for sig in signals:
                os.kill(os.getpid(), sig)
                time.sleep(0.05)  # the handler runs here, before this output has the batch
        write(self, records)

    monkeypatch.setattr(JsonlSink, "write", write_signalled)
    return calls


def test_a_signal_between_two_outputs_writes_leaves_the_batch_in_both(tmp_path, monkeypatch, capsys, python_ctrl_c):
    """The SIGTERM handler had raised an exception, which lands wherever the process is: here between the
    Parquet and the JSON Lines writes of a batch, which then was in one output and not the other. The
    signal is delivered (to this process, by itself) inside the second output's write of the second batch."""
    import signal

    calls = _signal_in_second_jsonl_write(monkeypatch, signal.SIGTERM)
    out_pq, out_js = tmp_path / "a.parquet", tmp_path / "a.jsonl"
    rc = main(["replay", str(DATA / "ztf_fink"), "--out", str(out_pq), "--out", str(out_js), "--batch-size", "3",
               "--no-progress"])
    assert rc == 143
    assert "terminated: the outputs hold the batches finished before it" in capsys.readouterr().err
    assert len(calls) == 2  # stopped after the batch in flight
    assert pq.read_table(out_pq).num_rows == len(out_js.read_text().splitlines()) == sum(calls)


def test_a_second_signal_stops_at_once_with_the_outputs_closed(tmp_path, monkeypatch, capfd, python_ctrl_c):
    """SIGTERM, then Ctrl-C before the batch is done: the run stops inside the batch, says that batch may be in
    some outputs only, keeps SIGTERM's exit code, and still closes every output (the Parquet file is readable)."""
    import signal

    calls = _signal_in_second_jsonl_write(monkeypatch, signal.SIGTERM, signal.SIGINT)  # the second one raises
    out_pq, out_js = tmp_path / "a.parquet", tmp_path / "a.jsonl"
    rc = main(["replay", str(DATA / "ztf_fink"), "--out", str(out_pq), "--out", str(out_js), "--batch-size", "3",
               "--no-progress"])
    err = capfd.readouterr().err  # (the handler writes to the file descriptor)
    assert rc == 143, err
    assert "SIGTERM: stopping after the batch in flight (again to stop at once)" in err
    assert "terminated: the outputs hold the batches finished before it; the batch in flight may be in some" in err
    assert pq.read_table(out_pq).num_rows == calls[0] + calls[1]  # closed: readable, with the batch in flight
    assert len(out_js.read_text().splitlines()) == calls[0]


def test_queue_ingest_stops_after_the_batch_in_flight_on_sigterm(tmp_path, monkeypatch, capsys):
    import os
    import signal
    import sqlite3

    from stream.pipeline import Pipeline

    process = Pipeline.process
    batches = []

    def process_signalled(self, batch):
        batches.append(len(batch))
        if len(batches) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        return process(self, batch)

    monkeypatch.setattr(Pipeline, "process", process_signalled)
    db = tmp_path / "q.sqlite"
    rc = main(["queue", "ingest", str(DATA / "ztf_fink"), "--db", str(db), "--batch-size", "3", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 143, err
    assert "terminated: the outputs hold the batches finished before it" in err
    assert batches == [3, 3] and out.startswith("read 6,")
    with sqlite3.connect(db) as con:
        assert con.execute("select count(*) from annotations").fetchone()[0] == 6


def test_avro_backend_cavro_without_cavro_names_the_flag(tmp_path, monkeypatch, capsys):
    import stream.decode as D

    monkeypatch.setattr(D, "cavro", None)
    rc = main(["replay", str(DATA / "ztf_fink"), "--out", str(tmp_path / "a.jsonl"), "--avro-backend", "cavro"])
    assert rc == 2
    assert "--avro-backend cavro: the cavro package is not installed" in capsys.readouterr().err
    assert not (tmp_path / "a.jsonl").exists()


def test_a_file_or_archive_member_name_that_is_not_utf8_does_not_stop_the_replay(tmp_path):
    """A Latin-1 name arrives with lone surrogates, which no UTF-8 writer takes: in an annotation's source it
    had stopped ``vigil replay`` with every output of the batch lost (N = A + R broken)."""
    import os
    import tarfile

    files = avro_files("ztf_fink", "2018-12-02_schema3.2")[:2]
    d = tmp_path / "night"
    d.mkdir()
    (d / "ok.avro").write_bytes(files[0].read_bytes())
    bad = os.fsdecode(bytes(d) + b"/caf\xe9.avro")  # a name that is not UTF-8
    with open(bad, "wb") as fh:
        fh.write(files[1].read_bytes())
    tar = tmp_path / "night.tar"
    with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as t:  # raw Latin-1 names
        t.add(files[0], arcname="ok.avro")
        t.add(files[1], arcname="caf\xe9.avro")
    for src in (d, tar):
        out, rej = tmp_path / f"{src.name}.jsonl", tmp_path / f"{src.name}.rej.jsonl"
        assert main(["replay", str(src), "--out", str(out), "--out", str(out.with_suffix(".parquet")),
                     "--rejected", str(rej), "--no-progress"]) == 0
        recs = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(recs) == 2, src
        assert any("caf\\xe9.avro" in r["source"]["topic"] for r in recs), [r["source"] for r in recs]
        assert pq.read_table(out.with_suffix(".parquet")).num_rows == 2


def test_the_code_version_tells_builds_apart(tmp_path, monkeypatch):
    """Every record had said code_version "0.1.0" through every change that moved scores."""
    import shutil
    from importlib import resources

    from stream import annotation as A

    v = A.code_version()
    assert re.fullmatch(r"(\d+\.\d+\.\d+|dev)\+c[0-9a-f]{8}", v), v
    # The same sources with one byte changed give another digest.
    copy_root = tmp_path / "pkgs"
    for pkg in ("stream", "models", "causal"):
        shutil.copytree(resources.files(pkg), copy_root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    files = {pkg: copy_root / pkg for pkg in ("stream", "models", "causal")}
    monkeypatch.setattr(A.resources, "files", lambda pkg: files[pkg])
    A.code_version.cache_clear()
    try:
        assert A.code_version() == v
        (copy_root / "models" / "rank.py").write_text((copy_root / "models" / "rank.py").read_text() + "\n")
        A.code_version.cache_clear()
        assert A.code_version() != v
    finally:
        A.code_version.cache_clear()


def test_ctrl_c_a_dying_broker_and_a_derived_model_over_its_base_are_said_plainly(tmp_path, capsys, monkeypatch):
    """A CLI review's cases: Ctrl-C in most commands printed a traceback; `vigil broker` exited 0 when its
    broker process died; `train --refit-conditions` could write over the model it derives from (the shipped
    default included)."""
    import os
    import signal
    import subprocess
    import sys

    import stream.queue as Q

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(Q, "cmd_list", interrupted)
    parser_db = tmp_path / "q.sqlite"
    assert main(["queue", "list", "--db", str(parser_db)]) == 130
    err = capsys.readouterr().err
    assert "vigil: interrupted" in err and "Traceback" not in err
    # the shipped model, and a --model, are never the --out of a model derived from them
    from models.scorer import DEFAULT_MODEL_DIR

    shipped = str(DEFAULT_MODEL_DIR)
    for argv in (["--out", shipped], ["--model", shipped, "--out", shipped]):
        assert main(["train", "--refit-conditions", str(DATA / "ztf_fink"), *argv]) == 2
        assert "the model it is derived from" in capsys.readouterr().err
    # a broker process that dies: exit 1 and said
    import socket

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "broker", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
    try:
        assert proc.stdout.readline().startswith("bootstrap.servers=")
        kids = [int(p) for p in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()]
        assert kids
        for k in kids:
            os.kill(k, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and "ended by itself" in err


def test_json_outputs_are_strict(capsys):
    """``--json`` of `validate hsr` and `queue list` had used plain json.dumps: a NaN figure would have been
    written as NaN, which JSON readers refuse."""
    import numpy as np

    from stream.sinks import print_json

    print_json({"a": float("nan"), "b": [np.float64("inf"), np.int64(3), 1.5], "c": np.bool_(True)})
    out = capsys.readouterr().out
    assert json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in strict JSON")) == \
        {"a": None, "b": [None, 3, 1.5], "c": True}


def test_evaluate_and_validate_refuse_flags_they_would_ignore(capsys):
    for argv, words in ((["evaluate", "--simulate", "--table", "x.csv"], "not --simulate and --table"),
                        (["evaluate", "--xmatch-labels", "x.parquet", "--table", "x.csv"], "--table and --xmatch"),
                        (["validate", "causal", "--alerts-only"], "--alerts-only is for --real"),
                        (["validate", "causal", "--refit-conditions"], "--refit-conditions is for --real")):
        assert main(argv) == 2, argv
        assert words in capsys.readouterr().err, argv


def test_score_writes_csv_only_under_a_csv_name_and_cv_needs_two_folds(tmp_path, capsys):
    out = str(tmp_path / "s.parquet")
    assert main(["score", "--table", str(tmp_path / "t.csv"), "--model", "m", "--out", out]) == 2
    assert "name it *.csv" in capsys.readouterr().err
    table = tmp_path / "t.csv"
    table.write_text("id,label,x\n" + "".join(f"{i},{'ab'[i % 2]},{i}\n" for i in range(40)))
    assert main(["evaluate", "--table", str(table), "--label-column", "label", "--positive", "a", "--negative", "b",
                 "--id-column", "id", "--cv", "1"]) == 2
    assert "--cv 1: grouped cross-validation needs at least 2 folds" in capsys.readouterr().err


def test_queue_flags_out_of_range_are_refused_by_name(tmp_path, capsys):
    for argv, flag in ((["queue", "list", "--db", "q.sqlite", "--sky", "galactic", "--b-cut", "nan"], "--b-cut"),
                       (["queue", "list", "--db", "q.sqlite", "--sky", "galactic", "--b-cut", "100"], "--b-cut"),
                       (["queue", "prune", "--db", "q.sqlite", "--now-mjd", "inf"], "--now-mjd"),
                       (["queue", "serve", "--db", "q.sqlite", "--workers", "-1"], "--workers")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and flag in capsys.readouterr().err, argv


def test_a_queue_store_in_a_missing_folder_is_refused_as_other_outputs_are(tmp_path, capsys):
    """``--out`` in a missing folder was refused; ``--queue`` (and ``queue ingest --db``) made the folder."""
    store = tmp_path / "nope" / "q.sqlite"
    assert main(["replay", str(DATA / "ztf_fink"), "--queue", str(store), "--no-progress"]) == 2
    assert f"--queue {store}: no folder {store.parent}" in capsys.readouterr().err
    assert main(["queue", "ingest", str(DATA / "ztf_fink"), "--db", str(store), "--no-progress"]) == 2
    assert f"--db {store}: no folder {store.parent}" in capsys.readouterr().err
    assert not store.parent.exists()
    assert main(["replay", str(DATA / "ztf_fink"), "--queue", str(tmp_path), "--no-progress"]) == 2
    assert "a directory, not a file" in capsys.readouterr().err


def test_an_interrupted_close_still_closes_the_other_outputs(tmp_path, monkeypatch, python_ctrl_c):
    """Ctrl-C inside one output's close had skipped the closes after it (``drive`` caught only Exception there):
    the Parquet file after it would have no footer but for the garbage collector."""
    from stream.sinks import JsonlSink, ParquetSink

    close_jsonl, close_parquet, closed = JsonlSink.close, ParquetSink.close, []

    def interrupted(self):
        close_jsonl(self)
        raise KeyboardInterrupt

    def spied(self):
        closed.append(self)
        close_parquet(self)

    monkeypatch.setattr(JsonlSink, "close", interrupted)
    monkeypatch.setattr(ParquetSink, "close", spied)
    out_js, out_pq = tmp_path / "a.jsonl", tmp_path / "a.parquet"
    rc = main(["replay", str(DATA / "ztf_fink"), "--out", str(out_js), "--out", str(out_pq), "--no-progress"])
    assert rc == 130 and len(closed) == 1
    assert pq.read_table(out_pq).num_rows == len(out_js.read_text().splitlines()) > 0


def test_sigterm_ends_a_wait_for_the_queue_stores_lock(tmp_path, monkeypatch, capsys):
    """Another writer holding the store's lock kept ``queue ingest`` waiting after SIGTERM (up to 4 minutes, past
    any scheduler's grace period): the store now stops waiting at the signal, as the live service's does."""
    import os
    import signal
    import sqlite3
    import threading

    import stream.queue as Q

    monkeypatch.setattr(Q, "BUSY_TIMEOUT_MS", 300)
    monkeypatch.setattr(Q, "LOCK_PATIENCE_S", 15.0)  # (bounded: a wait that ignored the signal ends in an error)
    db = tmp_path / "q.sqlite"
    Q.QueueStore(db).close()  # the store exists, then another writer takes its lock
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    t0 = time.monotonic()
    try:
        rc = main(["queue", "ingest", str(DATA / "ztf_fink"), "--db", str(db), "--no-progress"])
    finally:
        timer.cancel()
        other.rollback()
        other.close()
    assert rc == 143 and time.monotonic() - t0 < 30
    assert "terminated: the outputs hold the batches finished before it; the batch in flight may be in some" in \
        capsys.readouterr().err

"""The live service against a real Kafka-protocol broker (Tansu, started on a free port)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from conftest import DATA, ROOT, SHARED, avro_files

from stream.annotation import decode_annotation, validate_annotation
from stream.broker import FAST_GROUP_SETTINGS
from stream.config import parse_config
from stream.demo import read_topic
from stream.kafka import Metrics, produce_files, run_service

pytestmark = pytest.mark.kafka


def _config(broker, topics, **extra):
    alerts, ann, dlq = topics
    data = {
        "source": {"bootstrap_servers": broker.bootstrap, "topics": [alerts], "group_id": f"g-{alerts}",
                   "batch_size": 50, "batch_timeout_s": 0.2, "kafka": dict(FAST_GROUP_SETTINGS)},
        "output": {"annotations_topic": ann, "dead_letter_topic": dlq},
        "service": {"clock": "stream"},
    }
    for section, kv in extra.items():
        data.setdefault(section, {}).update(kv)
    return parse_config(data)


def _ids(files):
    import fastavro

    out = set()
    for f in files:
        with open(f, "rb") as fh:
            rec = next(fastavro.reader(fh))
        out.add(rec["candid"] if "candid" in rec else rec["diaSource"]["diaSourceId"])
    return out


def test_produce_to_an_unreachable_broker_fails_fast_naming_it(monkeypatch, capsys):
    import stream.kafka
    from stream.broker import free_port
    from stream.cli import main

    monkeypatch.setattr(stream.kafka, "REACH_TIMEOUT_S", 1.0)
    where = f"127.0.0.1:{free_port()}"  # nothing listens there
    assert main(["produce", str(DATA / "ztf_fink"), "--topic", "t", "--bootstrap", where]) == 2
    assert f"cannot reach Kafka at bootstrap.servers={where}" in capsys.readouterr().err
    for bad in ("bad topic!", ""):  # was librdkafka's "Unknown topic" with a traceback
        assert main(["produce", str(DATA / "ztf_fink"), "--topic", bad, "--bootstrap", where]) == 2
        assert capsys.readouterr().err == f"vigil: error: --topic: {bad!r} is not a topic name (letters, digits, " \
                                          "'.', '_', '-'; at most 249)\n"


def test_a_replay_against_an_unreachable_broker_names_the_broker_not_a_config_key(monkeypatch, capsys, tmp_path):
    import stream.kafka
    from stream.broker import free_port
    from stream.cli import main

    monkeypatch.setattr(stream.kafka, "REACH_TIMEOUT_S", 1.0)
    where = f"127.0.0.1:{free_port()}"  # nothing listens there
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[source]\nbootstrap_servers = "{where}"\ntopics = ["a"]\n'
                   '[output]\nannotations_topic = "b"\ndead_letter_topic = "c"\nqueue_db = ""\n')
    assert main(["run", "--config", str(cfg), "--from", "earliest", "--until", "end"]) == 2
    err = capsys.readouterr().err
    assert f"Kafka at bootstrap.servers={where}" in err and "source.kafka" not in err


def test_a_missing_schema_is_a_config_error_naming_the_key(broker, topics, tmp_path):
    from stream.config import ConfigError

    for key in ("ztf_schema", "schema_dir"):
        cfg = _config(broker, topics, source={key: str(tmp_path / "absent")}, output={"queue_db": ""})
        with pytest.raises(ConfigError, match=f"source.{key}: .*absent"):
            run_service(cfg, until=lambda counts: True)


def test_a_schema_directory_without_rubin_schemas_is_a_config_error(broker, topics, tmp_path):
    """It used to start, then dead-letter every Rubin message of the night."""
    from stream.config import ConfigError

    (tmp_path / "empty").mkdir()
    cfg = _config(broker, topics, source={"schema_dir": str(tmp_path / "empty")}, output={"queue_db": ""})
    with pytest.raises(ConfigError, match="source.schema_dir: .*holds no Rubin alert schema"):
        run_service(cfg, until=lambda counts: True)


@pytest.mark.shared
@pytest.mark.skipif(not (SHARED / "rubin_alert_schema_lsst" / "schema").is_dir(),
                    reason="official Rubin schemas (../shared) not available")
def test_official_rubin_samples_are_produced_framed_and_keyed_by_object(broker, topics):
    """Their version is in the writer schema's name ("lsst.v9_0.alert"), which produce used to miss
    (every one went as a container), and their key was b"None"."""
    from stream.decode import SchemaRegistry, rubin_object_id

    root = SHARED / "rubin_alert_schema_lsst" / "schema"
    reg = SchemaRegistry.from_dir(root)
    samples = sorted(root.glob("*/*/sample_data/fakeAlert.avro"))
    assert len(samples) >= 9
    assert produce_files(samples, topics[0], broker.bootstrap, rubin_schemas=reg) == {"rubin-confluent": len(samples)}
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": f"k-{topics[0]}",
                         "auto.offset.reset": "earliest"})
    consumer.subscribe([topics[0]])
    keys, deadline = [], time.monotonic() + 30
    while len(keys) < len(samples) and time.monotonic() < deadline:
        m = consumer.poll(0.5)
        if m is not None and not m.error():
            keys.append(m.key())
    consumer.close()
    import fastavro

    want = sorted(rubin_object_id(next(iter(fastavro.reader(open(f, "rb"))))).encode() for f in samples)
    assert sorted(keys) == want and b"None" not in keys


def test_metrics_port_in_use_is_a_config_error_naming_the_key(broker, topics):
    import socket

    from stream.config import ConfigError

    with socket.socket() as busy:  # another service process on this host holds the port
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cfg = _config(broker, topics, service={"metrics_port": busy.getsockname()[1]}, output={"queue_db": ""})
        with pytest.raises(ConfigError, match="service.metrics_port"):
            run_service(cfg, until=lambda counts: True)


def test_produce_names_the_alert_that_does_not_fit_the_schemaless_schema(broker, topics, capsys):
    from stream.cli import main

    old = DATA / "ztf_fink" / "2018-12-02_schema3.2"  # schema 3.2: no drbversion, which 3.3 requires
    assert main(["produce", str(old), "--topic", topics[0], "--bootstrap", broker.bootstrap, "--ztf-format",
                 "schemaless", "--ztf-schema", str(DATA / "ztf_ampel" / "schemas" / "schema_3.3.json")]) == 2
    err = capsys.readouterr().err
    assert "2018-12-02_schema3.2" in err and "does not fit --ztf-schema" in err and "drbversion" in err


def test_alerts_in_annotations_out_one_per_alert(broker, topics, tmp_path):
    files = avro_files("ztf_fink") + avro_files("rubin_fink")
    produced = produce_files(files, topics[0], broker.bootstrap)
    n = sum(produced.values())
    assert n == len(files)
    metrics = Metrics()
    scraped = []

    def until(counts):  # scrape the live metrics endpoint while the service runs
        if not scraped:
            scraped.append(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
        return counts.read >= n

    from stream.broker import free_port

    port = free_port()
    cfg = _config(broker, topics, service={"metrics_port": port}, output={"queue_db": ""})
    counts = run_service(cfg, until=until, metrics=metrics)
    assert counts.read == counts.annotated == n and counts.rejected == 0
    msgs = read_topic(broker.bootstrap, topics[1], n)
    assert len(msgs) == n
    records = [decode_annotation(m.value()) for m in msgs]
    assert {r["alert_id"] for r in records} == _ids(files)  # one annotation per alert
    for m, r in zip(msgs, records, strict=True):
        validate_annotation(r)
        assert m.key() == r["object_id"].encode()
        assert dict(m.headers())["vigil.schema_version"] == b"1.2"
        assert r["source"]["topic"] == topics[0] and r["source"]["offset"] >= 0
    assert "vigil_consumed_total" in scraped[0] and "vigil_consumer_lag" in scraped[0]
    assert "vigil_consumer_errors_total 0" in metrics.render()
    assert f"vigil_annotated_total {n}" in metrics.render()


def test_bad_messages_go_to_dead_letter_with_reason_and_original_bytes(broker, topics):
    good = [f.read_bytes() for f in avro_files("ztf_fink", "2018-12-02_schema3.2")]
    bad = [b"", b"garbage bytes", good[0][:500], b"\x00\x00\x00\x03\x84junk"]
    p = Producer({"bootstrap.servers": broker.bootstrap})
    for i, payload in enumerate(good + bad):
        p.produce(topics[0], value=payload, key=f"k{i}".encode(), partition=0, headers=[("orig", f"h{i}".encode())],
                  timestamp=1_700_000_000_000 + i)
    p.flush(10)
    n = len(good) + len(bad)
    counts = run_service(_config(broker, topics), until=lambda c: c.read >= n)
    assert (counts.annotated, counts.rejected) == (len(good), len(bad))
    dead = read_topic(broker.bootstrap, topics[2], len(bad))
    assert len(dead) == len(bad)
    by_offset = {int(dict(m.headers())["vigil.source.offset"]): m for m in dead}
    expected = {len(good): "empty_payload", len(good) + 1: "bad_magic_byte", len(good) + 2: "truncated",
                len(good) + 3: "unknown_schema_id"}
    for offset, reason in expected.items():
        m = by_offset[offset]
        h = dict(m.headers())
        assert h["vigil.reason"].decode() == reason
        assert h["vigil.stage"] == b"decode" and h["vigil.source.topic"].decode() == topics[0]
        assert h["vigil.source.partition"] == b"0" and h["vigil.detail"]
        assert (m.value() or b"") == bad[offset - len(good)]  # original bytes, unchanged
        assert m.key() == f"k{offset}".encode()
        # ... with the message's own headers and time (a review: they had been dropped)
        assert h["orig"] == f"h{offset}".encode() and m.headers()[0] == ("orig", f"h{offset}".encode())
        assert h["vigil.source.timestamp_ms"] == str(1_700_000_000_000 + offset).encode()


def test_oversized_and_unencodable_inputs_are_dead_lettered_and_the_stream_goes_on(broker, topics):
    """Two inputs that once stopped the service at every restart.

    A bad message larger than the producer's ``message.max.bytes`` (librdkafka's 1,000,000 by
    default) could not be dead-lettered whole; a Rubin alert whose visit·1000 + detector
    overflows 64 bits decoded and scored but broke the Avro encoding of its annotation.
    """
    import hashlib
    import io

    import fastavro

    good = [f.read_bytes() for f in avro_files("ztf_fink", "2018-12-02_schema3.2")]
    big = b"\x07" * 1_100_000
    reader = fastavro.reader(open(avro_files("rubin_fink", "lsstcam_2025-09-05")[0], "rb"))
    rec = next(iter(reader))
    rec["diaSource"]["visit"] = 2**60
    buf = io.BytesIO()
    fastavro.writer(buf, reader.writer_schema, [rec])
    p = Producer({"bootstrap.servers": broker.bootstrap, "message.max.bytes": 4_000_000})
    for payload in [big, buf.getvalue(), *good]:
        p.produce(topics[0], value=payload, partition=0)
    p.flush(10)
    n = len(good) + 2
    counts = run_service(_config(broker, topics), until=lambda c: c.read >= n)
    assert (counts.read, counts.annotated, counts.rejected) == (n, len(good), 2)
    dead = {int(dict(m.headers())["vigil.source.offset"]): m for m in read_topic(broker.bootstrap, topics[2], 2)}
    h = dict(dead[0].headers())
    assert h["vigil.reason"] == b"bad_magic_byte"
    assert h["vigil.payload_omitted"] == str(len(big)).encode() and not dead[0].value()
    assert h["vigil.payload_sha256"] == hashlib.sha256(big).hexdigest().encode()
    h1 = dict(dead[1].headers())
    assert h1["vigil.reason"] == b"bad_value" and b"exposure key" in h1["vigil.detail"]
    assert dead[1].value() == buf.getvalue()  # small enough: the original bytes, unchanged


def test_an_annotation_the_schema_refuses_becomes_a_dead_letter_before_any_write():
    from stream.kafka import AnnotationTopicSink
    from stream.pipeline import Pipeline
    from stream.service import _prepare
    from stream.sources import MemorySource

    envs = next(MemorySource([f.read_bytes() for f in avro_files("ztf_fink", "2018-12-02_schema3.2")],
                             batch_size=100).batches())
    result = Pipeline(hsr=False).process(envs)
    n = len(result.annotations)
    records = [a.to_record() for a in result.annotations]
    records[1]["exposure"] = 2**64  # no Avro long holds it
    sink = AnnotationTopicSink("127.0.0.1:1", "unused")  # prepare() only encodes; nothing is sent
    kept = _prepare(result, records, [sink])
    assert len(kept) == len(result.annotations) == len(result.alerts) == len(result.envelopes) == n - 1
    assert [r.reason for r in result.rejected] == ["unencodable"] and result.rejected[0].stage == "encode"
    assert result.rejected[0].alert_id == records[1]["alert_id"] and result.n_read == n
    assert all(id(r) in sink._encoded for r in kept)


def _write_config(path, broker, topics, group, batch_size, queue_db=""):
    alerts, ann, dlq = topics
    path.write_text(f"""
[source]
bootstrap_servers = "{broker.bootstrap}"
topics = ["{alerts}"]
group_id = "{group}"
batch_size = {batch_size}
batch_timeout_s = 0.2
[source.kafka]
"auto.commit.interval.ms" = 100
"session.timeout.ms" = {FAST_GROUP_SETTINGS["session.timeout.ms"]}
"heartbeat.interval.ms" = {FAST_GROUP_SETTINGS["heartbeat.interval.ms"]}
[output]
annotations_topic = "{ann}"
dead_letter_topic = "{dlq}"
queue_db = "{queue_db}"
[service]
log_interval_s = 0.5
""")


def _service(cfg_path):
    return subprocess.Popen([sys.executable, "-m", "stream.cli", "run", "--config", str(cfg_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def _annotated_ids(broker, topic):
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": f"reader-{time.time_ns()}",
                  "enable.auto.commit": False, "enable.partition.eof": True})
    md = c.list_topics(topic, timeout=10)
    parts = [TopicPartition(topic, p, 0) for p in md.topics[topic].partitions]
    c.assign(parts)
    ids, open_parts = [], {p.partition for p in parts}
    deadline = time.monotonic() + 20
    while open_parts and time.monotonic() < deadline:
        for m in c.consume(500, timeout=0.5):
            if m.error():
                open_parts.discard(m.partition())
            else:
                ids.append(decode_annotation(m.value())["alert_id"])
    c.close()
    return ids


def test_restart_mid_stream_loses_nothing(broker, topics, tmp_path):
    files = avro_files("ztf_ampel")  # 103 real alerts, no cutouts: small messages
    rounds = 8  # the same alerts 8 times: 824 messages, batches of 2 → ~400 batches
    for _ in range(rounds):
        produce_files(files, topics[0], broker.bootstrap)
    total = rounds * len(files)
    expected = _ids(files)
    cfg = tmp_path / "svc.toml"
    _write_config(cfg, broker, topics, f"g-restart-{time.time_ns()}", batch_size=2)

    watcher = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": f"w-{time.time_ns()}",
                        "fetch.wait.max.ms": 10})
    md = watcher.list_topics(topics[1], timeout=10)
    watcher.assign([TopicPartition(topics[1], p, 0) for p in md.topics[topics[1]].partitions])
    first = _service(cfg)
    deadline, seen = time.monotonic() + 60, 0
    while time.monotonic() < deadline and seen < 40:
        seen += sum(m.error() is None for m in watcher.consume(100, timeout=0.02))
    first.send_signal(signal.SIGKILL)  # crash: no flush, no commit of the in-flight batch
    watcher.close()
    first.wait(10)
    seen_before = len(_annotated_ids(broker, topics[1]))
    assert 40 <= seen_before < total, "the crash must happen mid-stream"

    second = _service(cfg)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        ids = _annotated_ids(broker, topics[1])
        if len(ids) - seen_before >= 1 and _count_each(ids, expected) >= rounds:
            break
        time.sleep(0.5)
    second.send_signal(signal.SIGTERM)
    out, _ = second.communicate(timeout=30)
    assert second.returncode == 0, out
    ids = _annotated_ids(broker, topics[1])
    # None lost: every alert annotated at least once per time it was produced.
    assert _count_each(ids, expected) >= rounds
    # Committed progress was kept: the restart re-did only the uncommitted tail, not everything.
    redone = len(ids) - total
    assert 0 <= redone < seen_before
    assert "stopped: read" in out


def _count_each(ids, expected):
    from collections import Counter

    c = Counter(ids)
    return min(c.get(i, 0) for i in expected)


def test_sigterm_finishes_batch_and_commits(broker, topics, tmp_path):
    files = avro_files("ztf_fink", "2018-12-02_schema3.2")
    produce_files(files, topics[0], broker.bootstrap)
    group = f"g-term-{time.time_ns()}"
    cfg = tmp_path / "svc.toml"
    _write_config(cfg, broker, topics, group, batch_size=50)
    svc = _service(cfg)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(_annotated_ids(broker, topics[1])) < len(files):
        time.sleep(0.2)
    time.sleep(2.0)  # idle: the status line goes on (log_interval_s = 0.5), saying how long since a message
    svc.send_signal(signal.SIGTERM)
    out, _ = svc.communicate(timeout=30)
    assert svc.returncode == 0, out
    assert "signal SIGTERM" in out and f"read {len(files)}" in out
    assert re.search(rf"consumed {len(files)}, .*, last message [1-9][0-9]* s ago", out), out
    # The group's committed offsets cover every message: a restart would re-deliver nothing.
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group})
    md = c.list_topics(topics[0], timeout=10)
    committed = c.committed([TopicPartition(topics[0], p) for p in md.topics[topics[0]].partitions], timeout=10)
    c.close()
    assert sum(max(tp.offset, 0) for tp in committed) == len(files)


def test_replay_through_kafka_between_times_never_commits(broker, topics, tmp_path):
    files = avro_files("ztf_fink", "2023-10-19to21_schema4.02")
    p = Producer({"bootstrap.servers": broker.bootstrap})
    t0 = 1_700_000_000_000
    for i, f in enumerate(files):  # message timestamps one minute apart
        p.produce(topics[0], value=f.read_bytes(), timestamp=t0 + 60_000 * i, partition=i % 2)
    # Producer stamps come out of order: a message from before the end, written after two from after it
    # (within the 5-minute grace), is read; one written after a message beyond the grace is not.
    p.produce(topics[0], value=files[1].read_bytes(), timestamp=t0 + 60_000 * 8 + 30_000, partition=1)
    p.produce(topics[0], value=files[2].read_bytes(), timestamp=t0 + 60_000 * 15, partition=0)
    p.produce(topics[0], value=files[3].read_bytes(), timestamp=t0 + 60_000 * 8 + 40_000, partition=0)
    p.flush(10)
    from stream.broker import create_topics

    create_topics(broker.bootstrap, [f"{topics[1]}.replay", f"{topics[2]}.replay"])
    live_queue = tmp_path / "live.sqlite"
    cfg = _config(broker, topics, replay={"start": str(t0 + 60_000 * 3), "end": str(t0 + 60_000 * 9),
                                          "group_id": "replay-x"},
                  output={"queue_db": str(live_queue)}, service={"clock": "wall"})
    counts = run_service(cfg, replay=True)  # ends by itself at the end time / end of partitions
    assert counts.read == 7
    replayed = read_topic(broker.bootstrap, f"{topics[1]}.replay", 7, timeout_s=10)
    assert len(replayed) == 7
    assert not live_queue.exists()  # a replay leaves the live eyeball queue alone unless told
    # Ranked by event time even though the live service uses the wall clock: the newest replayed
    # alert is fresh (freshness = 0.5 + 0.5 exp(-age / 3 d); by the wall clock it would be ~0.5).
    from models.rank import URGENCY

    fresh = []
    for r in map(decode_annotation, (m.value() for m in replayed)):
        interest = 1 - (1 - r["p_extragalactic"]) * (1 - r["p_fast"])
        fresh.append(r["priority"] / (r["p_real"] * (0.35 + 0.65 * interest) * URGENCY[r["stage"]]))
    assert max(fresh) > 0.99
    assert read_topic(broker.bootstrap, topics[1], 1, timeout_s=2) == []  # live namespace untouched
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "replay-x"})
    committed = c.committed([TopicPartition(topics[0], 0), TopicPartition(topics[0], 1)], timeout=10)
    c.close()
    assert all(tp.offset < 0 for tp in committed)  # no commits, ever


def test_replay_reads_every_topic_a_pattern_matches(broker, topics):
    """ZTF writes one topic a night: ``^ztf_.*`` in a replay stands for the nights on the broker."""
    from stream.broker import create_topics

    nights = [f"{topics[0]}.night{i}" for i in (1, 2)]
    create_topics(broker.bootstrap, nights + [f"{topics[1]}.replay", f"{topics[2]}.replay"])
    files = avro_files("ztf_fink", "2023-10-19to21_schema4.02")[:6]
    assert produce_files(files[:4], nights[0], broker.bootstrap) == {"ztf-container": 4}
    assert produce_files(files[4:], nights[1], broker.bootstrap) == {"ztf-container": 2}
    pattern = "^" + re.escape(topics[0]) + r"\.night\d$"  # not the test's own alerts topic
    cfg = _config(broker, topics, source={"topics": [pattern]}, replay={"group_id": "replay-pattern"})
    counts = run_service(cfg, replay=True)
    assert counts.read == 6 and counts.annotated + counts.rejected == 6
    got = {decode_annotation(m.value())["alert_id"] for m in read_topic(broker.bootstrap, f"{topics[1]}.replay", 6)}
    assert got == _ids(files)
    none = _config(broker, topics, source={"topics": ["^" + re.escape(topics[0]) + r"\.day\d$"]})
    with pytest.raises(ValueError, match="no topic matches the pattern"):
        run_service(none, replay=True)


def test_a_missing_source_topic_and_an_empty_time_window_are_said(broker, topics, caplog):
    """A misspelt topic had only waited, quietly; a replay window on alert times had read 0 without a word."""
    import logging

    caplog.set_level(logging.INFO, logger="stream.kafka")
    cfg = _config(broker, topics, source={"topics": [topics[0] + "-misspelt"]})
    run_service(cfg, until=lambda counts: True)
    assert f"source topic {topics[0]}-misspelt: it does not exist on {broker.bootstrap} yet" in caplog.text
    caplog.clear()
    run_service(_config(broker, topics), until=lambda counts: True)
    assert "source topic" not in caplog.text
    produce_files(avro_files("ztf_fink", "2023-10-19to21_schema4.02")[:2], topics[0], broker.bootstrap)
    when = {"start": "2023-10-19T00:00:00Z", "end": "2023-10-22T00:00:00Z", "end_grace_s": 0.0}
    counts = run_service(_config(broker, topics, replay=when), replay=True)  # the messages are stamped today
    assert counts.read == 0
    assert "nothing was stamped from 2023-10-19T00:00:00Z to 2023-10-22T00:00:00Z: a replay selects by Kafka " \
           "message time" in caplog.text


def test_outputs_can_go_to_another_cluster(broker, topics):
    """A survey's broker is read-only to its consumers: annotations and dead letters go to the
    operator's own cluster (output.bootstrap_servers), the alerts are read from the survey's."""
    from stream.broker import EmbeddedBroker, create_topics

    with EmbeddedBroker() as ours:
        create_topics(ours.bootstrap, topics[1:])
        files = avro_files("ztf_ampel")[:5]
        produce_files(files, topics[0], broker.bootstrap)
        bad = Producer({"bootstrap.servers": broker.bootstrap})
        bad.produce(topics[0], value=b"not an alert")
        bad.flush(10)
        cfg = _config(broker, topics, output={"bootstrap_servers": ours.bootstrap})
        counts = run_service(cfg, until=lambda c: c.read >= 6)
        assert (counts.annotated, counts.rejected) == (5, 1)
        got = {decode_annotation(m.value())["alert_id"] for m in read_topic(ours.bootstrap, topics[1], 5)}
        assert got == _ids(files)
        assert len(read_topic(ours.bootstrap, topics[2], 1)) == 1
    assert read_topic(broker.bootstrap, topics[1], 1, timeout_s=2) == []  # nothing written to the source's
    assert read_topic(broker.bootstrap, topics[2], 1, timeout_s=2) == []


def _two_services(broker, topics, tmp_path, files, group, queue_db="") -> None:
    """Run two service processes in one consumer group until every alert is annotated, then SIGTERM both."""
    produce_files(files, topics[0], broker.bootstrap)
    cfg = tmp_path / "svc.toml"
    _write_config(cfg, broker, topics, f"{group}-{time.time_ns()}", batch_size=5, queue_db=queue_db)
    procs = [_service(cfg), _service(cfg)]
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(set(_annotated_ids(broker, topics[1]))) < len(files):
            time.sleep(0.5)
        outs = []
        for pr in procs:
            pr.send_signal(signal.SIGTERM)
            outs.append(pr.communicate(timeout=30)[0])
        assert all(pr.returncode == 0 for pr in procs), outs
    finally:  # a failure above must not leave the services running after the test
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
                pr.wait(10)


def test_two_processes_share_a_consumer_group(broker, topics, tmp_path):
    files = avro_files("ztf_ampel")
    _two_services(broker, topics, tmp_path, files, "g-two")
    assert set(_annotated_ids(broker, topics[1])) == _ids(files)


def test_two_processes_fill_one_postgres_queue(broker, topics, tmp_path, postgres_server):
    """The team set-up: two service processes in one consumer group, one shared PostgreSQL queue."""
    import fastavro

    from stream.queue import QueueStore

    files = avro_files("ztf_ampel")
    url = postgres_server()
    _two_services(broker, topics, tmp_path, files, "g-pg", queue_db=url)
    objects = set()
    for f in files:
        with open(f, "rb") as fh:
            objects.add(next(fastavro.reader(fh))["objectId"])
    store = QueueStore(url)
    stored = {r[0] for r in store.conn.execute("SELECT alert_id FROM annotations").fetchall()}
    assert stored == _ids(files)  # every alert once, whichever process took it
    assert {r[0] for r in store.conn.execute("SELECT object_id FROM objects").fetchall()} == objects
    store.close()


def test_demo_runs_end_to_end(tmp_path):
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "stream.cli", "demo", "--queue", str(tmp_path / "q.sqlite")],
                       capture_output=True, text=True, timeout=180, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    n = len(avro_files())
    assert f"read {n}, annotated {n}, rejected 0" in r.stdout
    assert f"{n} annotations on topic" in r.stdout
    assert "Top 15 of the ranked list" in r.stdout and "broker stopped" in r.stdout
    # The list printed is the eyeball queue's, as `vigil queue list` shows it (aged, not as annotated).
    listed = subprocess.run([sys.executable, "-m", "stream.cli", "queue", "list", "--db", str(tmp_path / "q.sqlite"),
                             "--top", "15"], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    table = listed.stdout.splitlines()[:17]  # header, rule and 15 rows
    assert len(table) == 17 and "\n".join(table) in r.stdout


def test_service_scores_with_the_configured_model(broker, topics, tmp_path):
    import json
    import shutil

    from models.scorer import DEFAULT_MODEL_DIR

    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, model)
    meta = json.loads((model / "metadata.json").read_text())
    meta["version"] = "xgb-configured-test"
    (model / "metadata.json").write_text(json.dumps(meta))
    files = avro_files("ztf_fink", "2018-12-02_schema3.2")
    n = sum(produce_files(files, topics[0], broker.bootstrap).values())
    counts = run_service(_config(broker, topics, scoring={"model": str(model)}), until=lambda c: c.read >= n)
    assert counts.annotated == n
    records = [decode_annotation(m.value()) for m in read_topic(broker.bootstrap, topics[1], n)]
    assert len(records) == n and {r["model_version"] for r in records} == {"xgb-configured-test"}


def test_a_message_of_many_bad_records_puts_its_payload_on_the_dead_letter_topic_once(broker, topics):
    """Each rejected record gets a dead letter (with its reason), but only the first carries the bytes."""
    import io

    import fastavro

    schema = {"type": "record", "name": "notanalert", "fields": [{"name": "x", "type": "long"}]}
    buf = io.BytesIO()
    fastavro.writer(buf, schema, [{"x": i} for i in range(3)])
    p = Producer({"bootstrap.servers": broker.bootstrap})
    p.produce(topics[0], value=buf.getvalue(), partition=0)
    p.flush(10)
    counts = run_service(_config(broker, topics), until=lambda c: c.rejected >= 3)
    assert counts.rejected == 3
    dead = read_topic(broker.bootstrap, topics[2], 3)
    assert len(dead) == 3
    with_bytes = [m for m in dead if m.value()]
    assert len(with_bytes) == 1 and with_bytes[0].value() == buf.getvalue()
    for m in dead:
        h = dict(m.headers())
        assert h["vigil.source.offset"] == b"0" and h["vigil.reason"]
        if not m.value():
            assert h["vigil.payload_in"] == b"first" and h["vigil.payload_omitted"] == str(len(buf.getvalue())).encode()


def test_embedded_broker_refuses_a_port_in_use():
    import socket

    from stream.broker import EmbeddedBroker

    with socket.socket() as busy:  # another broker (or anything) already listens there
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port} is in use"):
            EmbeddedBroker(port=port).start()


def test_a_setting_librdkafka_refuses_names_its_section(broker, topics):
    from stream.config import ConfigError

    cfg = _config(broker, topics, source={"kafka": {"fetch.wait.max.msx": 5}}, output={"queue_db": ""})
    with pytest.raises(ConfigError, match="source.kafka: .*fetch.wait.max.msx"):
        run_service(cfg, until=lambda counts: True)


def test_a_second_stop_signal_stops_waiting_for_the_broker():
    import os
    import signal

    from stream.broker import free_port
    from stream.kafka import AnnotationTopicSink, DeliveryError, StopFlag

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    stop = StopFlag()
    try:
        stop.install()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop() and not stop.hard.is_set()  # the first: finish the batch
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.hard.is_set()  # the second: give up waiting
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    sink = AnnotationTopicSink(f"127.0.0.1:{free_port()}", "t")  # a broker that is down
    sink.give_up = stop.hard.is_set
    sink._produce(b"x", b"k", None)
    with pytest.raises(DeliveryError, match="abandoned on a second stop signal"):
        sink.flush()  # at once, not after the 305 s delivery timeout
    sink.close()  # and closing does not wait either


def test_consumer_lag_forgets_partitions_revoked_in_a_rebalance():
    from stream.kafka import Stats

    def report(**lags):
        parts = {p: {"consumer_lag": v} for p, v in lags.items()}
        return json.dumps({"topics": {"alerts": {"partitions": {**parts, "-1": {"consumer_lag": 0}}}}})

    s = Stats()
    s(report(**{"0": 5, "1": 7}))
    assert s.lag == {("alerts", 0): 5, ("alerts", 1): 7}
    s(report(**{"0": 2, "1": -1}))  # partition 1 went to another member
    assert s.lag == {("alerts", 0): 2}
    m = Metrics(s)
    s.at -= 4.2  # the status line says how old the lag is (a fast replay's read as a stuck consumer)
    assert m.log_line().endswith(", consumer lag 2 (4 s ago)")


def test_librdkafka_log_goes_through_logging_once_per_kind_of_failure(caplog):
    """With the broker down librdkafka logs every ~50 ms per client; the service log gets one line per kind."""
    import logging
    import socket

    from stream.kafka import KAFKA_LOG, KafkaSource, RepeatFilter

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    KAFKA_LOG.filters[0].seen.clear()
    caplog.set_level(logging.INFO, logger="stream.kafka.librdkafka")
    src = KafkaSource(f"127.0.0.1:{port}", ["alerts"], "g-down", batch_timeout_s=0.2)
    t0, polls = time.monotonic(), 0
    for _ in src.batches():
        polls += 1
        if time.monotonic() - t0 > 3:
            break
    src.close()
    refused = [r for r in caplog.records if r.name == "stream.kafka.librdkafka" and "Connection refused" in r.message]
    assert polls >= 5 and len(refused) == 1, [r.message for r in caplog.records]

    # After the window, the next one says how many were held back.
    f = RepeatFilter(window_s=0.05)
    rec = [logging.LogRecord("x", logging.ERROR, __file__, 1, f"connect failed after {i}ms", (), None)
           for i in range(4)]
    assert [f.filter(r) for r in rec[:3]] == [True, False, False]
    time.sleep(0.06)
    assert f.filter(rec[3]) and rec[3].getMessage().endswith("(2 like it in the last 0.05 s not shown)")


def test_each_record_of_a_many_alert_container_is_produced_with_its_own_key(broker, topics, tmp_path):
    """``vigil produce`` of one container holding three alerts had keyed all three by the last one's object."""
    import io

    import fastavro

    files = avro_files("ztf_ampel")[:3]
    recs, schema = [], None
    for f in files:
        r = fastavro.reader(open(f, "rb"))
        schema = schema or r.writer_schema
        recs += list(r)
    assert len({r["objectId"] for r in recs}) == 3
    buf = io.BytesIO()
    fastavro.writer(buf, schema, recs)
    path = tmp_path / "three.avro"
    path.write_bytes(buf.getvalue())
    assert produce_files([path], topics[0], broker.bootstrap) == {"ztf-container": 3}
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": f"k3-{topics[0]}",
                         "auto.offset.reset": "earliest"})
    consumer.subscribe([topics[0]])
    got, deadline = [], time.monotonic() + 30
    while len(got) < 3 and time.monotonic() < deadline:
        m = consumer.poll(0.5)
        if m is not None and not m.error():
            (rec,) = list(fastavro.reader(io.BytesIO(m.value())))
            got.append((m.key(), rec["objectId"].encode()))
    consumer.close()
    assert len(got) == 3 and all(k == o for k, o in got), got


def test_the_service_writes_to_the_source_cluster_with_the_sources_login(broker, topics, monkeypatch):
    """The producers of a service whose outputs share the source's cluster get the connection settings of
    ``[source.kafka]`` (here a harmless one the embedded broker accepts; SASL/SSL go the same way)."""
    import stream.kafka as K

    seen = []
    for name in ("AnnotationTopicSink", "DeadLetterSink"):
        real = getattr(K, name)

        def spy(bootstrap, topic, kafka, _real=real):
            seen.append(dict(kafka))
            return _real(bootstrap, topic, kafka)

        monkeypatch.setattr(K, name, spy)
    cfg = _config(broker, topics, source={"kafka": dict(FAST_GROUP_SETTINGS, **{"socket.keepalive.enable": True})},
                  output={"queue_db": ""})
    run_service(cfg, until=lambda counts: True)
    assert len(seen) == 2 and all(k.get("socket.keepalive.enable") is True for k in seen), seen


def test_a_dead_letter_names_the_object_and_cuts_a_long_detail_between_characters(broker, topics):
    from stream.alert import Envelope, Rejected
    from stream.kafka import DeadLetterSink

    sink = DeadLetterSink(broker.bootstrap, topics[2])
    env = Envelope(b"payload", "alerts", 0, 7, 1_700_000_000_000, b"k")
    long_detail = "x" + "é" * 1500
    sink.write_rejected([Rejected(env, "process", "bad_value", long_detail, alert_id=42, object_id="ZTF24aaaaaaa")])
    sink.flush()
    sink.close()
    (m,) = read_topic(broker.bootstrap, topics[2], 1)
    h = dict(m.headers())
    assert h["vigil.object_id"] == b"ZTF24aaaaaaa" and h["vigil.alert_id"] == b"42"
    assert h["vigil.detail"].decode("utf-8") == "x" + "é" * 999  # ≤ 2,000 bytes, not cut inside an é (it had been)

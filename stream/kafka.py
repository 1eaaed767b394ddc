"""Everything that talks to Kafka: consumer sources, producer sinks, ``vigil run`` and ``vigil produce``.

Delivery guarantee: at-least-once. The consumer runs with
``enable.auto.offset.store=false``; after a micro-batch is processed, the service
flushes the annotation topic, the dead-letter topic and the eyeball-queue store, and
only then stores the batch's offsets (which librdkafka's auto-commit, and the final
commit on shutdown, send to the broker). A crash re-delivers at most the uncommitted
batches; sinks are idempotent (the queue upserts by alert id + model version), so
redelivery is harmless. Replays through Kafka ``assign()`` partitions and never commit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import signal
import threading
import time

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    TIMESTAMP_CREATE_TIME,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from stream.alert import Envelope
from stream.annotation import ANNOTATION_SCHEMA_VERSION, encode_annotation, mjd_to_unix_ms
from stream.config import parse_time_ms

log = logging.getLogger(__name__)


class RepeatFilter(logging.Filter):
    """Let a message through once per ``window_s``; say how many like it were held back.

    Messages are alike when they differ only in their numbers (librdkafka's "after 0ms",
    timestamps, counters). With the broker down, librdkafka logs a failed connection per
    client every ~50 ms (measured: 785 lines in 25 s for one `vigil run`), which would bury
    the service's own log; through this filter, one line per kind of failure per window.
    """

    def __init__(self, window_s: float = 60.0, max_keys: int = 1000):
        super().__init__()
        self.window_s, self.max_keys = window_s, max_keys
        self.seen: dict = {}  # key → [time let through, suppressed since]
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        import re

        key = (record.levelno, re.sub(r"\d+", "#", record.getMessage()))
        now = time.monotonic()
        with self.lock:
            entry = self.seen.get(key)
            if entry is not None and now - entry[0] < self.window_s:
                entry[1] += 1
                return False
            held = entry[1] if entry is not None else 0
            if len(self.seen) >= self.max_keys:
                self.seen.clear()
            self.seen[key] = [now, 0]
        if held:
            record.msg = f"{record.getMessage()} ({held} like it in the last {self.window_s:g} s not shown)"
            record.args = ()
        return True


#: librdkafka's own log, through Python logging (given to every client as its ``logger``).
KAFKA_LOG = logging.getLogger("stream.kafka.librdkafka")
KAFKA_LOG.addFilter(RepeatFilter())
#: Seconds a command that writes to Kafka waits for the broker to answer before it gives up.
REACH_TIMEOUT_S = 10.0
#: The consumer's ``max.poll.interval.ms`` unless ``[source.kafka]`` sets it (librdkafka's
#: default is 300,000): above one delivery timeout plus the queue store's lock patience.
MAX_POLL_INTERVAL_MS = 600_000


def _envelope(msg) -> Envelope:
    ts_type, ts = msg.timestamp()
    h = msg.headers()
    return Envelope(msg.value() or b"", msg.topic(), msg.partition(), msg.offset(), ts if ts_type else -1, msg.key(),
                    headers=tuple(h) if h else None)


class Stats:
    """librdkafka statistics callback → consumer lag per partition."""

    def __init__(self):
        self.lag: dict[tuple[str, int], int] = {}
        self.at = None  # time.monotonic() of the last report (librdkafka reports every 5 s)

    def __call__(self, stats_json: str) -> None:
        stats = json.loads(stats_json)
        self.at = time.monotonic()
        # Rebuilt on every report: a partition revoked in a rebalance reports lag −1 and leaves,
        # rather than keeping its last lag in the totals forever.
        self.lag = {(topic, int(pid)): p["consumer_lag"]
                    for topic, t in stats.get("topics", {}).items()
                    for pid, p in t.get("partitions", {}).items()
                    if int(pid) >= 0 and p.get("consumer_lag", -1) >= 0}


class KafkaSource:
    """Consumer-group source for the live stream.

    Parameters
    ----------
    bootstrap, topics, group_id : connection and subscription.
    settings : dict
        librdkafka settings passed through (SASL/SSL...).
    batch_size, batch_timeout_s : micro-batch bounds for ``consume``.
    """

    def __init__(self, bootstrap: str, topics, group_id: str, settings=None, batch_size: int = 500,
                 batch_timeout_s: float = 1.0, auto_offset_reset: str = "earliest"):
        self.stats = Stats()
        conf = {
            "bootstrap.servers": bootstrap,
            "group.id": group_id,
            "auto.offset.reset": auto_offset_reset,
            "enable.auto.commit": True,
            "enable.auto.offset.store": False,  # offsets are stored only once every sink is durable
            "fetch.wait.max.ms": 50,
            "statistics.interval.ms": 5000,
            "stats_cb": self.stats,
            "logger": KAFKA_LOG,
            # A batch may wait out a broker outage (one delivery timeout, 305 s) and then a busy
            # queue store (up to 240 s): past librdkafka's default 300 s between polls the consumer
            # would be dropped from its group in mid-batch.
            "max.poll.interval.ms": MAX_POLL_INTERVAL_MS,
            **(settings or {}),
        }
        self.consumer = Consumer(conf)
        self.consumer.subscribe(list(topics))
        self.batch_size = batch_size
        self.batch_timeout_s = min(batch_timeout_s, 1.0)  # poll ≤ 1 s so signals are seen promptly
        self.errors = 0

    def batches(self):
        while True:
            msgs = self.consumer.consume(num_messages=self.batch_size, timeout=self.batch_timeout_s)
            batch = []
            for m in msgs:
                err = m.error()
                if err is None:
                    batch.append(_envelope(m))
                elif err.fatal():
                    raise KafkaException(err)
                elif err.code() != KafkaError._PARTITION_EOF:
                    self.errors += 1
                    log.warning("consumer error: %s", err)
            yield batch

    def done(self, batch) -> None:
        """Store the next offset of every partition in ``batch`` (committed by auto-commit)."""
        last: dict[tuple[str, int], int] = {}
        for e in batch:
            key = (e.source, e.partition)
            last[key] = max(last.get(key, -1), e.offset)
        if not last:
            return
        try:
            self.consumer.store_offsets(offsets=[TopicPartition(t, p, o + 1) for (t, p), o in last.items()])
        except KafkaException as e:
            # The partition was revoked by a rebalance while we processed: its new owner
            # re-reads from the last committed offset, so nothing is lost.
            log.warning("could not store offsets (rebalance?): %s", e)

    def close(self) -> None:
        try:
            self.consumer.commit(asynchronous=False)
        except KafkaException as e:
            if e.args[0].code() != KafkaError._NO_OFFSET:
                log.warning("final commit failed: %s", e)
        self.consumer.close()


class KafkaReplaySource:
    """Read topics from a start time (or earliest) to an end time (or end of partitions).

    Uses ``assign()`` with offsets from ``offsets_for_times``: no consumer-group
    membership, no commits, so the live group's offsets are never touched. Messages are
    selected by their timestamps, start ≤ t < end. A partition whose timestamps the broker
    sets (LogAppendTime) is finished at its first message at or after the end; one with
    producer stamps (CreateTime), which can be out of order, only at a message stamped
    ``end_grace_s`` after the end, so later-written alerts from before the end are still read.
    """

    def __init__(self, bootstrap: str, topics, start: str = "earliest", end: str = "end", settings=None,
                 batch_size: int = 500, batch_timeout_s: float = 1.0, group_id: str = "vigil-replay",
                 end_grace_s: float = 300.0):
        conf = {
            "bootstrap.servers": bootstrap,
            "group.id": group_id,  # required by librdkafka; unused without subscribe/commit
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,  # the embedded broker's watermarks are unreliable
            "fetch.wait.max.ms": 50,
            "logger": KAFKA_LOG,
            **(settings or {}),
        }
        self.consumer = Consumer(conf)
        self.end_ms = None if end in ("", "end") else parse_time_ms(end)
        self.start_ms = None if start in ("", "earliest") else parse_time_ms(start)
        self.end_grace_ms = int(round(end_grace_s * 1000))
        try:
            self.open = self._assign(topics, start)
        except BaseException:  # a source that cannot start leaves no consumer behind
            self.consumer.close()
            raise
        self.batch_size = batch_size
        self.batch_timeout_s = min(batch_timeout_s, 1.0)

    def _assign(self, topics, start: str) -> set:
        """Assign every partition of ``topics`` from ``start``; the (topic, partition) pairs.

        A ``^`` pattern stands for the topics it matches now (e.g. ZTF's one topic a night):
        a replay assigns partitions, so it cannot follow a subscription.
        """
        md = self.consumer.list_topics(timeout=REACH_TIMEOUT_S)
        names = []
        for t in topics:
            if t.startswith("^"):
                hit = sorted(n for n, tm in md.topics.items()
                             if tm.error is None and not n.startswith("__") and re.search(t, n))
                if not hit:
                    raise ValueError(f"replay: no topic matches the pattern {t!r}")
                log.info("replay: %s matches %s", t, ", ".join(hit))
                names += [n for n in hit if n not in names]
            elif t not in md.topics or md.topics[t].error is not None:
                raise ValueError(f"replay: topic {t!r} does not exist")
            elif t not in names:
                names.append(t)
        parts = [TopicPartition(t, p) for t in names for p in md.topics[t].partitions]
        if start in ("", "earliest"):
            for tp in parts:
                tp.offset = OFFSET_BEGINNING
        else:
            ms = parse_time_ms(start)
            found = self.consumer.offsets_for_times([TopicPartition(tp.topic, tp.partition, ms) for tp in parts],
                                                    timeout=REACH_TIMEOUT_S)
            for tp in found:
                if tp.error is not None:
                    raise KafkaException(tp.error)
            # -1: no message at or after the start time in that partition
            parts = [TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_END)
                     for tp in found]
        self.consumer.assign(parts)
        return {(tp.topic, tp.partition) for tp in parts}

    def batches(self):
        while self.open:
            msgs = self.consumer.consume(num_messages=self.batch_size, timeout=self.batch_timeout_s)
            batch = []
            for m in msgs:
                err = m.error()
                key = (m.topic(), m.partition())
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        self.open.discard(key)
                    elif err.fatal():
                        raise KafkaException(err)
                    else:
                        log.warning("consumer error: %s", err)
                    continue
                if key not in self.open:
                    continue
                ts_type, ts = m.timestamp()
                if self.start_ms is not None and ts_type and ts < self.start_ms:
                    continue  # brokers whose offsets_for_times is coarse (Tansu answers 0) seek too early
                if self.end_ms is not None and ts_type and ts >= self.end_ms:
                    grace = self.end_grace_ms if ts_type == TIMESTAMP_CREATE_TIME else 0
                    if ts >= self.end_ms + grace:  # this partition is finished
                        self.open.discard(key)
                        self.consumer.pause([TopicPartition(*key)])
                    continue
                batch.append(_envelope(m))
            yield batch

    def done(self, batch) -> None:  # replays never commit
        pass

    def close(self) -> None:
        self.consumer.close()


def _delivery_errors(errors: list):
    def cb(err, msg):
        if err is not None:
            errors.append(err)

    return cb


class DeliveryError(RuntimeError):
    """Outputs the broker did not acknowledge; the batch's offsets were not stored."""


class _ProducerSink:
    def __init__(self, bootstrap: str, topic: str, settings=None):
        self.topic = topic
        self.producer = Producer({
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "linger.ms": 5,
            "compression.type": "lz4",
            "logger": KAFKA_LOG,
            **(settings or {}),
        })
        self._errors: list = []
        self._cb = _delivery_errors(self._errors)
        # Wait as long as librdkafka itself keeps retrying a message (its delivery.timeout.ms,
        # 300 s by default) before giving up on a batch: a leader election or a short broker
        # outage then delays the stream instead of stopping the service.
        st = settings or {}
        timeout_ms = st.get("delivery.timeout.ms", st.get("message.timeout.ms", 300_000))  # librdkafka aliases
        self.flush_timeout_s = float(timeout_ms) / 1000.0 + 5.0
        #: Returns True once the operator insists on stopping (a second signal): a flush then
        #: gives up instead of waiting out the broker (the batch's offsets are not stored).
        self.give_up = lambda: False

    def _produce(self, value: bytes, key, headers) -> None:
        while True:
            try:
                self.producer.produce(self.topic, value=value, key=key, headers=headers, on_delivery=self._cb)
                return
            except BufferError:  # local queue full: let deliveries drain
                self.producer.poll(0.1)

    def flush(self) -> None:
        """Block until every message is acknowledged by the broker; raise if any failed."""
        deadline = time.monotonic() + self.flush_timeout_s
        while True:  # in steps, so that a second stop signal is heard
            left = self.producer.flush(min(1.0, max(deadline - time.monotonic(), 0.0)))
            if not left:
                break
            if self.give_up():
                raise DeliveryError(f"{left} messages to {self.topic} abandoned on a second stop signal; their "
                                    "alerts' offsets were not stored, so they will be read again")
            if time.monotonic() >= deadline:
                raise DeliveryError(f"{left} messages to {self.topic} not delivered within "
                                    f"{self.flush_timeout_s:.0f} s")
        if self._errors:
            errs, self._errors[:] = list(self._errors), []
            raise DeliveryError(f"delivery to {self.topic} failed: {errs[0]}")

    def close(self) -> None:
        if not self.give_up():  # after a second signal, nothing more is waited for
            self.flush()


class AnnotationTopicSink(_ProducerSink):
    """Annotations as schemaless Avro (schema version in a header), keyed by object id."""

    _encoded: dict

    def prepare(self, records) -> dict:
        """Encode ``records`` ahead of :meth:`write`; {index: error} for those the schema refuses."""
        self._encoded, bad = {}, {}
        for i, r in enumerate(records):
            try:
                self._encoded[id(r)] = encode_annotation(r)
            except (ValueError, TypeError, OverflowError, AttributeError) as exc:
                bad[i] = f"{type(exc).__name__}: {exc}"
        return bad

    def write(self, records) -> None:
        headers = [("vigil.schema", b"vigil.annotation"), ("vigil.schema_version", ANNOTATION_SCHEMA_VERSION.encode())]
        cache, self._encoded = getattr(self, "_encoded", {}), {}
        for r in records:
            payload = cache.get(id(r))
            self._produce(payload if payload is not None else encode_annotation(r), r["object_id"].encode(), headers)
        self.producer.poll(0)


#: Room left in a dead letter for its key, headers and the record framing (bytes).
DEAD_LETTER_OVERHEAD = 16_384


class DeadLetterSink(_ProducerSink):
    """Rejected input: the original bytes unchanged, the why in headers.

    A payload too large for the producer's ``message.max.bytes`` (librdkafka's default is
    1,000,000, below the consumer's limit; keep it at or below the dead-letter topic's
    ``max.message.bytes``, or the broker refuses what the producer lets through) is left
    out: the dead letter then carries ``vigil.payload_omitted`` (the payload's size) and its
    SHA-256, and the headers name the source topic, partition and offset where the original
    still lies. Without this, one oversized bad message would stop the service at every restart.

    A message whose container holds several rejected records carries its payload in the first
    of their dead letters only; the others say ``vigil.payload_omitted`` and ``vigil.payload_in``
    = ``first``, so one small message of 1,000 bad records cannot put 1,000 copies of itself
    on the topic.
    """

    def __init__(self, bootstrap: str, topic: str, settings=None):
        super().__init__(bootstrap, topic, settings)
        self.max_bytes = int((settings or {}).get("message.max.bytes", 1_000_000))

    def write_rejected(self, rejected) -> None:
        sent: set = set()  # messages whose payload a dead letter of this batch already carries
        for r in rejected:
            e = r.envelope
            # The message's own headers first, as they came; then the why. (A detail cut at 2,000 bytes
            # drops a character it would split, so the header stays UTF-8.)
            headers = [*(e.headers or ()),
                       ("vigil.reason", r.reason.encode()), ("vigil.stage", r.stage.encode()),
                       ("vigil.detail", r.detail.encode()[:2000].decode("utf-8", "ignore").encode()),
                       ("vigil.source.topic", e.source.encode()), ("vigil.source.partition", str(e.partition).encode()),
                       ("vigil.source.offset", str(e.offset).encode()),
                       ("vigil.source.timestamp_ms", str(e.timestamp_ms).encode())]
            if r.alert_id is not None:
                headers.append(("vigil.alert_id", str(r.alert_id).encode()))
            if r.object_id is not None:
                headers.append(("vigil.object_id", r.object_id.encode("utf-8", "backslashreplace")))
            payload = e.payload
            ident = (e.source, e.partition, e.offset) if e.offset is not None else id(e)
            again = ident in sent
            if again or len(payload) + len(e.key or b"") + DEAD_LETTER_OVERHEAD > self.max_bytes:
                headers += [("vigil.payload_omitted", str(len(payload)).encode()),
                            ("vigil.payload_sha256", hashlib.sha256(payload).hexdigest().encode())]
                if again:
                    headers.append(("vigil.payload_in", b"first"))
                payload = b""
            else:
                sent.add(ident)
            self._produce(payload, e.key, headers)
        self.producer.poll(0)


# --------------------------------------------------------------------------- metrics


class Metrics:
    """Counters and gauges, served in Prometheus text format."""

    def __init__(self, stats: Stats | None = None):
        self.lock = threading.Lock()
        self.consumed = self.annotated = self.batches = 0
        self.rejected: dict[str, int] = {}
        self.batch_seconds_sum = 0.0
        self.batch_seconds_last = 0.0
        self.e2e_seconds_last = float("nan")  # alert observation time → annotation published
        self.kafka_latency_seconds_last = float("nan")  # message timestamp → annotation published
        self.stats = stats
        self.source = None  # the consumer source, for its count of (non-fatal) consumer errors
        self.started = time.monotonic()
        self.last_message = None  # monotonic time of the last batch that brought messages

    def observe(self, result, seconds: float) -> None:
        now = time.time()
        with self.lock:
            if result.n_read:
                self.last_message = time.monotonic()
            self.batches += 1
            self.consumed += result.n_read
            self.annotated += len(result.annotations)
            for r in result.rejected:
                self.rejected[r.reason] = self.rejected.get(r.reason, 0) + 1
            self.batch_seconds_sum += seconds
            self.batch_seconds_last = seconds
            if result.annotations:
                self.e2e_seconds_last = now - max(mjd_to_unix_ms(a.event_mjd, a.event_time_scale)
                                                  for a in result.annotations) / 1000
                ts = [e.timestamp_ms for e in result.envelopes if e.timestamp_ms > 0]
                if ts:
                    self.kafka_latency_seconds_last = now - min(ts) / 1000

    def render(self) -> str:
        with self.lock:
            lines = [
                "# TYPE vigil_consumed_total counter", f"vigil_consumed_total {self.consumed}",
                "# TYPE vigil_annotated_total counter", f"vigil_annotated_total {self.annotated}",
                "# TYPE vigil_rejected_total counter",
            ]
            lines += [f'vigil_rejected_total{{reason="{k}"}} {v}' for k, v in sorted(self.rejected.items())]
            lines += [
                "# TYPE vigil_batches_total counter", f"vigil_batches_total {self.batches}",
                "# TYPE vigil_batch_seconds_sum counter", f"vigil_batch_seconds_sum {self.batch_seconds_sum:.6f}",
                "# TYPE vigil_batch_seconds gauge", f"vigil_batch_seconds {self.batch_seconds_last:.6f}",
                "# TYPE vigil_end_to_end_seconds gauge", f"vigil_end_to_end_seconds {self.e2e_seconds_last:.3f}",
                "# TYPE vigil_kafka_latency_seconds gauge",
                f"vigil_kafka_latency_seconds {self.kafka_latency_seconds_last:.3f}",
                "# TYPE vigil_consumer_lag gauge",
            ]
            if self.stats is not None:
                lines += [f'vigil_consumer_lag{{topic="{t}",partition="{p}"}} {lag}'
                          for (t, p), lag in sorted(self.stats.lag.items())]
            errors = getattr(self.source, "errors", None)
            if errors is not None:  # messages librdkafka reported as errors instead of delivering (logged)
                lines += ["# TYPE vigil_consumer_errors_total counter", f"vigil_consumer_errors_total {errors}"]
        return "\n".join(lines) + "\n"

    def log_line(self) -> str:
        """One status line for the service log (also written while the stream is idle)."""
        with self.lock:
            rej = sum(self.rejected.values())
            now = time.monotonic()
            quiet = (f"no message yet ({now - self.started:.0f} s)" if self.last_message is None
                     else f"last message {now - self.last_message:.0f} s ago")
            lag = sum(self.stats.lag.values()) if self.stats is not None and self.stats.lag else None
            # The lag is librdkafka's last report's: say how old, or a fast replay reads as stuck.
            when = f" ({now - self.stats.at:.0f} s ago)" if lag is not None and self.stats.at is not None else ""
            return (f"consumed {self.consumed}, annotated {self.annotated}, rejected {rej}, "
                    f"last batch {self.batch_seconds_last * 1000:.0f} ms, {quiet}"
                    + (f", consumer lag {lag}{when}" if lag is not None else ""))


def serve_metrics(metrics: Metrics, host: str, port: int):
    """Serve ``/metrics`` in a daemon thread; returns the server (``.server_address``)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server API)
            if self.path.rstrip("/") not in ("/metrics", ""):
                self.send_error(404)
                return
            body = metrics.render().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # keep the service log clean
            pass

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        import errno

        from stream.config import ConfigError

        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"service.metrics_port: {host}:{port} is in use; each service process on a host "
                              "needs its own port, or 0 for none") from None
        raise ConfigError(f"service.metrics_host/metrics_port: cannot listen on {host}:{port} "
                          f"({e.strerror or e})") from None
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
    return server


# --------------------------------------------------------------------------- the service


class StopFlag:
    """Set by SIGTERM/SIGINT (or by code); the loop finishes its batch, flushes, stores offsets, closes."""

    def __init__(self):
        self.event = threading.Event()
        self.hard = threading.Event()  # a second signal: stop waiting on the broker

    def __call__(self) -> bool:
        return self.event.is_set()

    def install(self) -> None:
        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.event.is_set():
                log.warning("signal %s again: not waiting for undelivered outputs (the batch will be read again)",
                            name)
                self.hard.set()
            else:
                log.info("signal %s: finishing the current batch, then stopping (again to stop at once)", name)
            self.event.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def run_service(cfg, stop: StopFlag | None = None, replay: bool = False, until=None, metrics: Metrics | None = None):
    """Run the consumer-group service (or a Kafka replay) until stopped.

    Parameters
    ----------
    cfg : stream.config.Config
    stop : StopFlag, optional
    replay : bool
        Use ``cfg.replay`` (time-bounded, own group, outputs to ``<topic>.<namespace>``).
    until : callable(Counts) -> bool, optional
        Extra stop condition checked after every batch (demo, tests).

    Returns
    -------
    stream.service.Counts
    """
    from stream.config import ConfigError, load_configured_model, output_kafka_settings, same_cluster_as_source
    from stream.decode import Decoder, SchemaRegistry, load_ztf_schema
    from stream.pipeline import ErrorBudget, Pipeline
    from stream.service import Counts, drive

    s, o = cfg.source, cfg.output
    out_bootstrap = o.bootstrap_servers or s.bootstrap_servers
    stop = stop or StopFlag()

    def loaded(key, load, value):
        try:
            return load(value) if value else None
        except (OSError, ValueError) as e:
            raise ConfigError(f"{key}: {e}") from None

    decoder = Decoder(schemas=loaded("source.schema_dir", SchemaRegistry.from_dir, s.schema_dir),
                      ztf_schema=loaded("source.ztf_schema", load_ztf_schema, s.ztf_schema),
                      max_message_bytes=s.max_message_bytes, avro_backend=s.avro_backend)
    # A replay ranks by event time: by the wall clock every past alert would look stale.
    pipeline = Pipeline(decoder, scorer=load_configured_model(cfg), clock="stream" if replay else cfg.service.clock,
                        error_budget=ErrorBudget(cfg.service.error_budget))
    ann_topic, dlq_topic, queue_db = o.annotations_topic, o.dead_letter_topic, o.queue_db
    if replay:
        from stream.config import ReplayConfig

        rc = cfg.replay or ReplayConfig()
        if cfg.replay is None:
            log.info("no [replay] section: the whole topic, earliest to end, under group %s", rc.group_id)
        queue_db = rc.queue_db
        ann_topic, dlq_topic = f"{ann_topic}.{rc.namespace}", f"{dlq_topic}.{rc.namespace}"
        if same_cluster_as_source(cfg):  # a pattern that took in the replay's outputs would loop
            for t in s.topics:
                hit = [n for n in (ann_topic, dlq_topic) if t.startswith("^") and re.search(t, n)]
                if hit:
                    raise ConfigError(f"source.topics: the pattern {t!r} matches the replay's output {hit[0]!r}")
        group = rc.group_id
        try:
            source = KafkaReplaySource(s.bootstrap_servers, s.topics, rc.start, rc.end, s.kafka, s.batch_size,
                                       s.batch_timeout_s, rc.group_id, end_grace_s=rc.end_grace_s)
        except KafkaException as e:
            raise _source_error(e, s.bootstrap_servers) from None
        stats = None
    else:
        group = s.group_id
        try:
            source = KafkaSource(s.bootstrap_servers, s.topics, s.group_id, s.kafka, s.batch_size,
                                 s.batch_timeout_s, s.auto_offset_reset)
        except KafkaException as e:
            raise _source_error(e, s.bootstrap_servers) from None
        stats = source.stats
    metrics = metrics or Metrics(stats)
    metrics.stats = stats
    metrics.source = source
    try:
        server = serve_metrics(metrics, cfg.service.metrics_host, cfg.service.metrics_port) \
            if cfg.service.metrics_port else None
    except ValueError:
        source.close()  # leave the group at once rather than at the session timeout
        raise
    try:
        out_kafka = output_kafka_settings(cfg)
        sinks = [AnnotationTopicSink(out_bootstrap, ann_topic, out_kafka)]
        dlq = DeadLetterSink(out_bootstrap, dlq_topic, out_kafka)
    except KafkaException as e:
        source.close()
        if server is not None:
            server.shutdown()
        raise ConfigError(f"output.kafka: {_kafka_text(e)}") from None
    for sink in (sinks[0], dlq):
        sink.give_up = stop.hard.is_set
    from stream.queue import QueueSink, redacted

    if queue_db:
        try:
            store = QueueSink(queue_db, retention_days=o.queue_retention_days,
                              clock="stream" if replay else cfg.service.clock)
        except Exception as e:  # an unopenable path or an unreachable database: name the key
            source.close()
            for sink in (sinks[0], dlq):
                sink.close()
            if server is not None:
                server.shutdown()
            key = "replay.queue_db" if replay else "output.queue_db"
            why = getattr(e, "reason", e)  # a StoreOpenError names the path itself
            raise ConfigError(f"{key}: cannot open the queue store {redacted(queue_db)}: {why}") from None
        store.give_up = stop  # unlike a Kafka flush, a store wait ends at the first signal
        sinks.append(store)
    counts_box = {"c": Counts()}
    last_log = [time.monotonic()]

    def on_batch(result, seconds):
        if result is not None:
            metrics.observe(result, seconds)
            counts_box["c"].add(result)
        else:  # idle: serve the producers' callbacks and log queue, which only polling empties
            for sink in (sinks[0], dlq):
                sink.producer.poll(0)
            if queue_db:  # and the eyeball queue's list goes on ageing through a quiet day
                sinks[-1].idle()
        # Also when idle: a quiet log would not tell a quiet night from a stuck consumer.
        if time.monotonic() - last_log[0] >= cfg.service.log_interval_s:
            last_log[0] = time.monotonic()
            log.info("%s", metrics.log_line())

    def should_stop():
        return stop() or (until is not None and until(counts_box["c"]))

    log.info("vigil %s: %s → %s (dead letters → %s); group %s, bootstrap %s%s, queue %s, metrics %s",
             "replay" if replay else "run", ",".join(s.topics), ann_topic, dlq_topic,
             group, s.bootstrap_servers,
             f", outputs to {out_bootstrap}" if out_bootstrap != s.bootstrap_servers else "",
             redacted(queue_db) if queue_db else "none",
             f"{cfg.service.metrics_host}:{cfg.service.metrics_port}" if server is not None else "off")
    if not replay:  # (a replay source has already reached its broker and found its topics)
        _warn_if_unreachable(source.consumer, s.bootstrap_servers, s.topics)
    if replay or out_bootstrap != s.bootstrap_servers:
        _warn_if_unreachable(sinks[0].producer, out_bootstrap)
    try:
        counts = drive(source, pipeline, sinks, [dlq], stop=should_stop, on_batch=on_batch)
    finally:
        if server is not None:
            server.shutdown()
    log.info("stopped: %s", counts.line())
    if replay and not counts.read and (rc.start not in ("", "earliest") or rc.end not in ("", "end")):
        log.warning("nothing was stamped from %s to %s: a replay selects by Kafka message time (when each message "
                    "was produced, or appended), not by alert time, and `vigil produce` stamps a message when it "
                    "sends it", rc.start, rc.end)
    return counts


def _source_error(e: KafkaException, bootstrap: str) -> Exception:
    """The error to raise for a source that could not start.

    A setting librdkafka refuses names its config section; anything else (a replay asks
    the broker for its offsets at start) is the broker's.
    """
    from stream.config import ConfigError

    err = e.args[0] if e.args else None
    code = err.code() if hasattr(err, "code") else None
    if code in (KafkaError._INVALID_ARG, KafkaError._UNKNOWN_PROTOCOL, KafkaError._NOT_IMPLEMENTED, None):
        return ConfigError(f"source.kafka: {_kafka_text(e)}")
    return ConnectionError(f"Kafka at bootstrap.servers={bootstrap}: {_kafka_text(e)}")


def _kafka_text(e: KafkaException) -> str:
    err = e.args[0] if e.args else None
    return err.str() if hasattr(err, "str") else str(e)


def _warn_if_unreachable(client, bootstrap: str, topics=()) -> None:
    """Say so, once and in Vigil's words, when the broker does not answer at start (the service keeps
    trying), or lacks a source topic (a misspelt name would otherwise only wait, quietly)."""
    try:
        md = client.list_topics(timeout=REACH_TIMEOUT_S)
    except KafkaException as e:
        log.error("cannot reach Kafka at bootstrap.servers=%s within %g s (%s); still trying", bootstrap,
                  REACH_TIMEOUT_S, _kafka_text(e))
        return
    names = [n for n, t in md.topics.items() if t.error is None]
    for t in topics:
        if not (any(re.search(t, n) for n in names) if t.startswith("^") else t in names):
            log.warning("source topic %s: %s on %s yet; waiting for it (check the name)", t,
                        "no topic matches it" if t.startswith("^") else "it does not exist", bootstrap)


# --------------------------------------------------------------------------- vigil produce


def _ztf_key(rec) -> bytes:
    return str(rec.get("objectId")).encode()


def produce_files(paths, topic: str, bootstrap: str, ztf_format: str = "container", ztf_schema=None,
                  rubin_schemas=None, settings=None) -> dict:
    """Push archived alerts into a topic so any archive can be replayed as a stream.

    ZTF alerts go as Avro containers (default) or schemaless with ``ztf_schema``; Rubin
    alerts go Confluent-framed when ``rubin_schemas`` has their version, else as
    containers. Files that are not alerts are sent as they are (the consumer will
    reject them), so a replay sees what the archive holds; only what cannot be read at
    all (an unreadable file, the damaged part of an archive) is logged and not sent.

    Returns
    -------
    dict: counts by how each message was framed.
    """
    import io
    import re

    import fastavro

    from stream.decode import DecodeError, container_version, encode_schemaless, frame_confluent, rubin_object_id
    from stream.sources import iter_envelopes

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True,
                         "logger": KAFKA_LOG, **(settings or {})})
    try:  # fail in seconds, naming the address, rather than after a minute of undelivered messages
        producer.list_topics(timeout=REACH_TIMEOUT_S)
    except KafkaException as e:
        raise ConnectionError(f"cannot reach Kafka at bootstrap.servers={bootstrap} within {REACH_TIMEOUT_S:g} s "
                              f"({_kafka_text(e)}); "
                              "`vigil broker` prints the address of the embedded one") from None
    errors: list = []
    cb = _delivery_errors(errors)
    counts: dict[str, int] = {}

    def send(value, key):
        while True:
            try:
                producer.produce(topic, value=value, key=key, on_delivery=cb)
                producer.poll(0)
                return
            except BufferError:
                producer.poll(0.1)

    for env in iter_envelopes(paths):
        if env.unreadable is not None:  # nothing to send (so not counted); the archive's readable part still goes
            log.warning("not produced: %s: %s", env.source, env.unreadable)
            continue
        payload, how = env.payload, "as-is"
        if payload[:4] == b"Obj\x01":
            try:
                reader = fastavro.reader(io.BytesIO(payload))
                recs = list(reader)
            except Exception:  # not readable: send the bytes unchanged, the consumer rejects them
                recs = None
            if recs:
                out = []
                for rec in recs:
                    if "candidate" in rec:
                        if ztf_format == "schemaless":
                            try:
                                out.append((encode_schemaless(rec, ztf_schema), "ztf-schemaless", _ztf_key(rec)))
                            except (ValueError, TypeError, KeyError) as e:
                                left = producer.flush(60)  # what went before is delivered, then stop
                                raise ValueError(f"{env.source}: this alert does not fit --ztf-schema ({e}); "
                                                 f"{sum(counts.values())} messages produced before it"
                                                 + (f", {left} undelivered" if left else "")) from None
                        else:
                            buf = io.BytesIO()
                            fastavro.writer(buf, reader.writer_schema, [rec])
                            out.append((buf.getvalue(), "ztf-container", _ztf_key(rec)))
                    else:
                        try:  # keyed by object, as the decoder names it (ssObjectId where no diaObjectId)
                            key = rubin_object_id(rec).encode()
                        except DecodeError:
                            key = None
                        # The version from the record, else from the writer schema's name or
                        # namespace (the official samples name it "lsst.v9_0.alert").
                        version = (container_version({"version": rec.get("lsst_schema_version")})
                                   or container_version(reader.writer_schema))
                        m = re.fullmatch(r"(\d+)\.(\d+)", version)
                        sid = int(m.group(1)) * 100 + int(m.group(2)) if m else None
                        if rubin_schemas is not None and sid is not None and rubin_schemas.get(sid) is not None:
                            out.append((frame_confluent(sid, encode_schemaless(rec, rubin_schemas.get(sid))),
                                        "rubin-confluent", key))
                        else:
                            buf = io.BytesIO()
                            fastavro.writer(buf, reader.writer_schema, [rec])
                            out.append((buf.getvalue(), "rubin-container", key))
                for value, how, key in out:  # each record with its own object's key
                    send(value, key)
                    counts[how] = counts.get(how, 0) + 1
                continue
        send(payload, None)
        counts[how] = counts.get(how, 0) + 1
    left = producer.flush(60)
    if left:
        raise ConnectionError(f"produce to {topic} at {bootstrap}: {left} messages undelivered after 60 s "
                              f"({len(errors)} refused)")
    if errors:  # the broker answered, and refused them (e.g. a message over its size limit)
        raise ValueError(f"produce to {topic}: {len(errors)} messages refused by the broker (first: {errors[0]})")
    return counts

"""The processing loop shared by offline replay and the Kafka service.

``drive`` pulls micro-batches from a source, runs the pipeline, writes every sink,
flushes them all, and only then acknowledges the batch to the source (for Kafka:
stores the offsets). That order is what makes the service at-least-once.
"""

from __future__ import annotations

import collections
import gc
import logging
import sys
import time
from dataclasses import dataclass, field

from stream.alert import Rejected

log = logging.getLogger(__name__)


@dataclass
class Counts:
    """Running totals; ``read == annotated + rejected`` always."""

    read: int = 0
    annotated: int = 0
    rejected: int = 0
    by_reason: collections.Counter = field(default_factory=collections.Counter)
    batches: int = 0
    spans: dict = field(default_factory=dict)  # survey → [first, last] event MJD annotated

    def add(self, result) -> None:
        self.read += result.n_read
        self.annotated += len(result.annotations)
        self.rejected += len(result.rejected)
        self.by_reason.update(r.reason for r in result.rejected)
        self.batches += 1
        for a in result.annotations:
            span = self.spans.setdefault(a.survey, [a.event_mjd, a.event_mjd])
            span[0], span[1] = min(span[0], a.event_mjd), max(span[1], a.event_mjd)

    def clock_notes(self, days: float = 30.0) -> list:
        """A line per survey whose replayed alerts span more than ``days``: the stream clock (each
        survey's newest alert) then ages the older ones, which a replay of mixed archives hides."""
        return [f"note: the {sv} alerts span MJD {lo:.1f}–{hi:.1f} ({hi - lo:,.0f} d); ranked by the stream "
                f"clock, the older ones are aged against MJD {hi:.1f}, {sv}'s newest"
                for sv, (lo, hi) in sorted(self.spans.items()) if hi - lo > days]

    def line(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.by_reason.items()))
        return (f"read {self.read}, annotated {self.annotated}, rejected {self.rejected}"
                f" (by reason: {reasons or 'none'})")


class Progress:
    """A one-line progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, total: int | None, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total = total
        self.t0 = time.monotonic()
        self._last = 0.0

    def update(self, counts: Counts, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        rate = counts.read / max(now - self.t0, 1e-9)
        if self.total:
            frac = min(counts.read / self.total, 1.0)
            bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
            msg = f"\r[{bar}] {counts.read}/{self.total} {rate:,.0f} alerts/s  rejected {counts.rejected}"
        else:
            msg = f"\r{counts.read} alerts  {rate:,.0f} alerts/s  rejected {counts.rejected}"
        self.stream.write(msg)
        self.stream.flush()

    def close(self, counts: Counts) -> None:
        if self.enabled:
            self.update(counts, force=True)
            self.stream.write("\n")


GC_GEN0_THRESHOLD = 100_000


def _prepare(result, records: list, sinks) -> list:
    """Let sinks that encode (``prepare(records)`` → {index: error}) refuse records before any write.

    A refused annotation becomes a ``Rejected`` (stage ``encode``) for the dead-letter path, so
    one alert that no output can carry never stops the stream or half-writes a batch.
    """
    bad: dict = {}
    for s in sinks:
        if hasattr(s, "prepare"):
            bad.update(s.prepare(records))
    if not bad:
        return records
    keep = [i for i in range(len(records)) if i not in bad]
    for i, err in sorted(bad.items()):
        a = result.annotations[i]
        result.rejected.append(Rejected(result.envelopes[i], "encode", "unencodable",
                                        f"annotation cannot be encoded: {err}", a.alert_id, a.object_id))
    for name in ("annotations", "alerts", "envelopes", "corrected_flux"):
        seq = getattr(result, name)
        if len(seq) == len(records):
            setattr(result, name, [seq[i] for i in keep])
    return [records[i] for i in keep]


def _write_annotations(sink, result, records) -> None:
    if hasattr(sink, "write_result"):
        sink.write_result(result, records)
    else:
        sink.write(records)


def drive(source, pipeline, annotation_sinks=(), rejected_sinks=(), progress: Progress | None = None,
          stop=None, on_batch=None) -> Counts:
    """Run ``source`` through ``pipeline`` into the sinks until the source ends or ``stop()``.

    Parameters
    ----------
    source : Source
        ``batches()``, ``done(batch)``, ``close()``.
    pipeline : stream.pipeline.Pipeline
    annotation_sinks : sinks taking ``(annotations, alerts, result)`` via ``write_result`` or
        plain record sinks taking annotation records via ``write``.
    rejected_sinks : sinks taking ``Rejected`` objects via ``write_rejected`` or records via ``write``.
    stop : callable returning True to stop after the current batch (signals).
    on_batch : callable(result, seconds), for metrics and logs: called after every poll of the
        source, with ``result`` None when the poll brought nothing (an idle stream still ticks).
    """
    counts = Counts()
    sinks = list(annotation_sinks) + list(rejected_sinks)
    # A store sink holds its database's write lock from write to flush (one transaction per
    # batch): it goes last, after the streamed outputs are durable, so a Kafka stall never
    # keeps the lock (other workers and the vetters' page share that store).
    stores = [s for s in annotation_sinks if getattr(s, "holds_write_lock", False)]
    streamed = [s for s in annotation_sinks if s not in stores]
    # Decoding allocates thousands of short-lived containers per alert: with Python's default
    # gen-0 threshold (700) the cyclic collector runs every few alerts and keeps walking the
    # long-lived heap (models, sibling store). A higher threshold while streaming cut
    # to_record + Avro encoding from 108 to 67 µs per alert in the bench; restored on return.
    thresholds = gc.get_threshold()
    gc.set_threshold(max(thresholds[0], GC_GEN0_THRESHOLD), *thresholds[1:])
    try:
        for batch in source.batches():
            t0 = time.monotonic()
            result = pipeline.process(batch) if batch else None
            if result is not None:
                records = _prepare(result, [a.to_record() for a in result.annotations], annotation_sinks)
                for s in streamed:
                    _write_annotations(s, result, records)
                for s in rejected_sinks:
                    if hasattr(s, "write_rejected"):
                        s.write_rejected(result.rejected)
                    else:
                        s.write([r.to_record() for r in result.rejected])
                for s in streamed + list(rejected_sinks):
                    s.flush()
                for s in stores:
                    _write_annotations(s, result, records)
                    s.flush()
                # every sink is durable before the source may forget the batch
                counts.add(result)
            source.done(batch)
            if on_batch is not None:
                on_batch(result, time.monotonic() - t0)
            if progress is not None:
                progress.update(counts)
            if stop is not None and stop():
                break
    except BaseException:
        failed = True
        raise
    else:
        failed = False
    finally:
        gc.set_threshold(*thresholds)
        # Close everything even if one close fails, and never let a close error hide the
        # error that stopped the run.
        close_error = None
        for closer in (source.close, *(s.close for s in sinks)):
            try:
                closer()
            except BaseException as exc:  # a second Ctrl-C too: the other outputs are still closed
                log.error("closing %s failed: %r", getattr(closer, "__self__", closer), exc)
                close_error = close_error or exc
        if progress is not None:
            progress.close(counts)
    if close_error is not None and not failed:
        raise close_error
    return counts

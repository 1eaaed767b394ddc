"""``vigil demo``: the whole product on a laptop in one command.

Starts the embedded broker, produces the bundled real alerts to a topic, runs the
service until every alert is annotated or rejected, fills the eyeball-queue store,
prints the top of the ranked list, and stops what it started.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _default_data() -> Path:
    for p in (REPO / "tests" / "data", Path.cwd() / "tests" / "data"):
        if p.is_dir():
            return p
    raise FileNotFoundError("no sample data: run from a Vigil checkout or pass --data DIR")


def read_topic(bootstrap: str, topic: str, expected: int, timeout_s: float = 60.0) -> list:
    """All messages of ``topic`` from the beginning (until ``expected`` seen or timeout)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"vigil-reader-{time.time_ns()}",
                  "enable.auto.commit": False, "fetch.wait.max.ms": 50})
    md = c.list_topics(topic, timeout=10)
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in md.topics[topic].partitions])
    out, deadline = [], time.monotonic() + timeout_s
    while len(out) < expected and time.monotonic() < deadline:
        for m in c.consume(500, timeout=0.5):
            if m.error() is None:
                out.append(m)
    c.close()
    return out


def main(args) -> int:
    from stream.annotation import decode_annotation
    from stream.broker import FAST_GROUP_SETTINGS, EmbeddedBroker, create_topics
    from stream.config import load_config
    from stream.kafka import StopFlag, produce_files, run_service

    data = Path(args.data) if args.data else _default_data()
    if not data.exists():  # before starting anything
        raise FileNotFoundError(f"--data {data}: no such file or directory")
    cfg = load_config(REPO / "deploy" / "demo.toml") if (REPO / "deploy" / "demo.toml").exists() else None
    if cfg is None:
        from stream.config import Config

        cfg = Config()
    t0 = time.monotonic()
    with EmbeddedBroker() as broker:
        print(f"1. embedded broker up at {broker.bootstrap}")
        s, o = cfg.source, cfg.output
        create_topics(broker.bootstrap, [*s.topics, o.annotations_topic, o.dead_letter_topic])
        produced = produce_files([data], s.topics[0], broker.bootstrap)
        n = sum(produced.values())
        if not n:
            raise ValueError(f"no alerts to replay in {data}")
        print(f"2. produced {n} real alerts from {data} to topic {s.topics[0]} "
              f"({', '.join(f'{k}={v}' for k, v in sorted(produced.items()))})")
        queue = _queue_available() and args.queue
        # Whatever the config (an installed Vigil has no deploy/demo.toml): the embedded broker's
        # group settings, and archived alerts ranked by their own time, not the wall clock's.
        cfg = replace(cfg, source=replace(s, bootstrap_servers=broker.bootstrap,
                                          kafka={**FAST_GROUP_SETTINGS, **s.kafka}),
                      output=replace(o, queue_db=str(queue) if queue else ""),
                      service=replace(cfg.service, clock="stream"))
        stop = StopFlag()
        stop.install()
        counts = run_service(cfg, stop, until=lambda c: c.read >= n)
        print(f"3. service: {counts.line()}")
        if stop():  # Ctrl-C or SIGTERM: say so, not a ranked list of what little was done
            print("demo interrupted; broker stopped", file=sys.stderr)
            return 130
        msgs = read_topic(broker.bootstrap, o.annotations_topic, counts.annotated)
        # each message in the schema version its header names (a topic may span an upgrade)
        anns = [decode_annotation(m.value(), dict(m.headers() or ())["vigil.schema_version"].decode()) for m in msgs]
        dead = read_topic(broker.bootstrap, o.dead_letter_topic, counts.rejected, timeout_s=5) \
            if counts.rejected else []
        print(f"4. {len(anns)} annotations on topic {o.annotations_topic}, {len(dead)} dead letters on "
              f"{o.dead_letter_topic}")
    print(f"\nTop {args.top} of the ranked list (priority = P(real) x interest x urgency x freshness):")
    if queue:  # the eyeball queue's list, as `vigil queue list` shows it (aged to each survey's newest alert)
        from stream.queue import ListQuery, listed, ranked_lines

        print("\n".join(ranked_lines(listed(queue, ListQuery(per_page=args.top))[0])))
    else:
        _print_ranked(anns, args.top)
    if queue:
        vigil = _command_name()
        print(f"\nEyeball queue filled: {queue}\nOpen it with:  {vigil} queue serve --db {queue}"
              "  (then http://127.0.0.1:8765; sign in with the token it prints, or set one with --token"
              f" or VIGIL_QUEUE_TOKEN)\nor list it here:  {vigil} queue list --db {queue}")
    else:
        print("\n(eyeball-queue store not available in this build)")
    print(f"demo finished in {time.monotonic() - t0:.1f} s; broker stopped")
    return 0 if counts.read >= n else 1


def _queue_available() -> bool:
    try:
        import stream.queue  # noqa: F401
    except ImportError:
        return False
    return True


def _print_ranked(anns, top: int) -> None:
    from stream.queue import ranked_lines

    def key(a):
        return -(a["priority"] if a["priority"] is not None else -1)

    rows = [{"object_id": a["object_id"], "survey": a["survey"], "band": a["band"], "mag": a["lightcurve"]["mag"],
             "stage": a["stage"], "p_real": a["p_real"], "p_extragalactic": a["p_extragalactic"],
             "p_fast": a["p_fast"], "priority": a["priority"],
             "ss_distance": (a.get("features") or {}).get("ss_distance")} for a in sorted(anns, key=key)[:top]]
    print("\n".join(ranked_lines(rows)))


def _command_name() -> str:
    """``vigil`` as it was typed (``.venv/bin/vigil`` after the README's install, which activates no
    environment, so a bare ``vigil`` would not be found); ``vigil`` when run as a module."""
    import shlex

    typed = sys.argv[0] if sys.argv else ""
    return shlex.quote(typed) if os.path.basename(typed) == "vigil" else "vigil"

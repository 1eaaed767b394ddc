"""The ``vigil`` command line."""

from __future__ import annotations

import argparse
import logging
import sqlite3
import sys
from pathlib import Path

from stream import MissingExtra

log = logging.getLogger("vigil")

#: Modules that add subcommands (see ``register`` in each).
PLUGIN_MODULES: tuple = ("stream.queue", "stream.simulate", "models.train", "causal.validate")


def _decoder(args):
    from stream.decode import Decoder, SchemaRegistry, load_ztf_schema

    try:  # the choice is checked first (argparse has checked the spelling)
        Decoder(avro_backend=args.avro_backend)
    except ValueError as e:
        raise ValueError(f"--avro-backend {args.avro_backend}: {str(e).split(': ', 1)[-1]}") from None
    schemas = SchemaRegistry.from_dir(args.schema_dir) if args.schema_dir else None
    ztf = load_ztf_schema(args.ztf_schema) if args.ztf_schema else None
    return Decoder(schemas=schemas, ztf_schema=ztf, avro_backend=args.avro_backend)


def _add_decoder_args(p, backend: bool = True):
    p.add_argument("--schema-dir", help="directory of .avsc schemas for Confluent-framed (Rubin) messages")
    p.add_argument("--ztf-schema", help="ZTF schema (.avsc/.json file or directory) for schemaless ZTF messages")
    if backend:  # (produce reads only the framing)
        p.add_argument("--avro-backend", choices=["auto", "fastavro", "cavro"], default="auto",
                       help="what reads Avro containers: cavro (optional, ~3x faster, the same records) where it "
                            "is installed, or the one named (default: auto)")


def _annotation_sinks(outs):
    from stream.sinks import JsonlSink, ParquetSink

    sinks = []
    for o in outs or ():  # (names checked by cmd_replay first)
        sinks.append(ParquetSink(o) if str(o).endswith(".parquet") else JsonlSink(o))
    return sinks


def files_to_read(paths) -> list:
    """The files a replay reads (directories walked once), warning about what it will not read.

    Said on stderr: files of a walked directory not named like alerts or archives; nothing to read
    at all is an error. The list goes to :class:`stream.sources.FileSource` as it is.
    """
    from stream.sources import AVRO_SUFFIXES, PARTIAL_DIR, TAR_SUFFIXES, expand_paths

    skipped: list = []
    files = expand_paths(paths, skipped)
    kinds = ", ".join("*" + x for x in AVRO_SUFFIXES + TAR_SUFFIXES)
    for d in [p for p in skipped if p.name == PARTIAL_DIR]:
        skipped.remove(d)
        print(f"vigil: warning: {d} not read: the alerts of a `vigil simulate` that was stopped before it "
              "finished (no truth tables; a rerun removes it)", file=sys.stderr)
    if skipped:
        names = ", ".join(str(p) for p in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        print(f"vigil: warning: {len(skipped)} file(s) not read, not named like alerts or archives ({kinds}): "
              f"{names}", file=sys.stderr)
    if not files:  # an error, before any output is opened (a sink empties its file)
        raise ValueError("nothing to read in " + " ".join(map(str, paths)))
    return files


def _check_suffix(flag: str, path, suffixes) -> None:
    """Refuse an output whose name promises a format that will not be written (``a.csv`` of JSON Lines)."""
    if not str(path).endswith(suffixes):
        raise ValueError(f"{flag} {path}: name it {' or '.join('*' + x for x in suffixes)} (the format written)")


def _check_writable(outputs, inputs) -> None:
    """Refuse, before any output is created (each sink empties its file), an output that cannot be
    written (a directory; a missing folder) or that is one of the inputs: a bad ``--rejected`` had
    emptied the ``--out`` files opened before it, and ``--out`` naming an input had emptied it."""
    read = {Path(p).resolve() for p in inputs}
    for flag, path in outputs:
        if not path:
            continue
        p = Path(path)
        if p.is_dir():
            raise ValueError(f"{flag} {path}: a directory, not a file")
        if not p.resolve().parent.is_dir():
            raise ValueError(f"{flag} {path}: no folder {p.resolve().parent}")
        if p.resolve() in read:
            raise ValueError(f"{flag} {path}: also one of the files to read")


def _check_distinct(outputs) -> None:
    """Refuse two outputs that are one file: each sink would write over the other's records."""
    seen = {}
    for flag, path in outputs:
        if not path or "://" in str(path):  # a database URL is no file here
            continue
        key = Path(path).resolve()  # as the sinks open it (no ~ expansion: a shell does that)
        if key in seen:
            first, where = seen[key]
            raise ValueError(f"{first} {where} and {flag} {path} both name {key}: give each output its own file")
        seen[key] = (flag, path)


def _scorer(args):
    """The alert model ``--model`` names, or None for the shipped default."""
    if not args.model:
        return None
    from models.scorer import AlertScorer

    return AlertScorer.load(args.model)


def cmd_replay(args) -> int:
    from stream.pipeline import Pipeline
    from stream.service import Progress
    from stream.sinks import JsonlSink
    from stream.sources import FileSource, count_files

    if not (args.out or args.queue or args.rejected):  # --rejected alone: a check of the input
        raise ValueError("replay would write nothing: give --out, --queue or --rejected")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be at least 1")
    for o in args.out or ():  # every output name before any output is created (a sink truncates its file)
        _check_suffix("--out", o, (".jsonl", ".ndjson", ".parquet"))
    if args.rejected:
        _check_suffix("--rejected", args.rejected, (".jsonl", ".ndjson"))
    outputs = [("--out", o) for o in args.out or ()] + [("--rejected", args.rejected)]
    _check_distinct([*outputs, ("--queue", args.queue)])
    files = files_to_read(args.paths)
    # (a SQLite store in a missing folder had been made, folder and all, where --out is refused)
    _check_writable(outputs + ([("--queue", args.queue)] if args.queue and "://" not in args.queue else []), files)
    pipeline = Pipeline(_decoder(args), scorer=_scorer(args), hsr=False if args.no_hsr else None, clock="stream")
    store = None
    if args.queue:  # opened first: a store that cannot be opened must not cost the --out files
        from stream.queue import QueueSink

        try:
            store = QueueSink(args.queue)
        except (OSError, sqlite3.DatabaseError, ValueError) as e:
            why = getattr(e, "reason", e)  # a StoreOpenError names the path itself
            raise ValueError(f"--queue {args.queue}: cannot open it as a queue store ({why})") from None
    sinks = _annotation_sinks(args.out) + ([store] if store is not None else [])
    rejected = [JsonlSink(args.rejected)] if args.rejected else []
    progress = Progress(count_files(files), enabled=False if args.no_progress else None)
    counts, signame = drive_stoppable(FileSource(files, args.batch_size, expanded=True), pipeline, sinks, rejected,
                                      progress)
    if signame is not None:
        return _stopped(counts, signame)
    for note in counts.clock_notes():
        print(note, file=sys.stderr)
    print(counts.line())
    return 0


def drive_stoppable(source, pipeline, sinks, rejected=(), progress=None):
    """:func:`stream.service.drive` that SIGTERM and Ctrl-C stop after the batch in flight.

    SIGTERM (what schedulers send) had killed a replay before its outputs were closed (a Parquet
    file without its footer); an exception raised from a signal handler lands wherever the process
    is, e.g. between two outputs' writes of one batch. So the first signal is only noted (the batch
    in flight is finished and written to every output, then the run ends) and a second stops at
    once. A queue store waiting for another writer's lock stops waiting at the first signal (the
    batch in flight is then not in the store). A signal the process was started ignoring (a
    background job of a script ignores Ctrl-C) is left ignored.

    Returns
    -------
    (Counts or None, str or None)
        The counts and None for a run to its end; the counts and the signal's name for a run
        stopped after a batch; None and the name for one stopped at once.
    """
    import os
    import signal
    import threading

    from stream.queue import _errors, _is_lock_wait
    from stream.service import drive

    stopped = []

    def on_signal(signum, frame):
        stopped.append(signum)
        if len(stopped) > 1:
            raise KeyboardInterrupt
        try:  # (os.write: print() may be the very call this handler interrupted)
            os.write(2, f"\n{signal.Signals(signum).name}: stopping after the batch in flight "
                        "(again to stop at once)\n".encode())
        except OSError:  # stderr gone (a closed pipe): the handler must not raise where it lands
            pass

    def stop():
        return bool(stopped)

    # A signal ignored when the process started (a background job of a script) stays ignored.
    sigs = [s for s in (signal.SIGTERM, signal.SIGINT) if signal.getsignal(s) is not signal.SIG_IGN]
    main_thread = threading.current_thread() is threading.main_thread()
    before = {sig: signal.signal(sig, on_signal) for sig in sigs} if main_thread else {}
    for s in sinks:  # a queue store waiting for another writer's lock stops waiting at the signal
        if hasattr(s, "give_up"):
            s.give_up = stop
    try:
        counts = drive(source, pipeline, sinks, rejected, progress, stop=stop)
    except KeyboardInterrupt:  # the second signal, or Ctrl-C where no handler could be set
        counts = None
    except Exception as exc:
        if not (stopped and isinstance(exc, _errors("LockNotAvailable")) and _is_lock_wait(exc)):
            raise
        log.warning("stopped while waiting for the queue store's write lock (%s): the batch in flight is not "
                    "in the store", exc)
        counts = None
    finally:
        for sig, handler in before.items():  # (None: a handler not set from Python; default then)
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    name = signal.Signals(stopped[0]).name if stopped else ("SIGINT" if counts is None else None)
    return counts, name


def _stopped(counts, signame: str) -> int:
    """Say how a run stopped by ``signame`` left its outputs (and its counts, if it has them): 143 or 130."""
    word = "terminated" if signame == "SIGTERM" else "interrupted"
    if counts is None:
        print(f"{word}: the outputs hold the batches finished before it; the batch in flight may be in some of "
              "them only", file=sys.stderr)
    else:
        print(f"{word}: the outputs hold the batches finished before it", file=sys.stderr)
        for note in counts.clock_notes():
            print(note, file=sys.stderr)
        print(counts.line())
    return 143 if signame == "SIGTERM" else 130


def cmd_run(args) -> int:
    from stream.config import load_config
    from stream.kafka import StopFlag, run_service

    cfg = load_config(args.config)
    logging.getLogger().setLevel(logging.DEBUG if args.verbose else cfg.service.log_level)  # -v wins
    if args.start or args.end:
        from dataclasses import replace

        from stream.config import ReplayConfig, validate

        rc = cfg.replay or ReplayConfig()
        cfg = replace(cfg, replay=replace(rc, start=args.start or rc.start, end=args.end or rc.end))
        try:
            validate(cfg)
        except ValueError as e:  # the config's names for what came from the command line
            import re

            msg = str(e)
            for flag, key, given in (("--from", "replay.start", args.start), ("--until", "replay.end", args.end)):
                if given:
                    msg = re.sub(rf"\b{re.escape(key)}\b", flag, msg)
            raise ValueError(msg) from None
    if args.check:
        return _check_config(args.config, cfg, replay=args.replay or bool(args.start or args.end))
    stop = StopFlag()
    stop.install()
    counts = run_service(cfg, stop, replay=args.replay or bool(args.start or args.end))
    print(counts.line())
    return 0


def _check_config(path, cfg, replay: bool = False) -> int:
    """``vigil run --check``: what the service would load, loaded, and said; nothing is started.

    The config is already parsed, validated and its secrets read; here the schemas and the model
    are opened too. No broker is contacted. Secrets are not printed (librdkafka settings by name only).
    """
    from stream.config import ConfigError, load_configured_model, output_kafka_settings, same_cluster_as_source
    from stream.decode import Decoder, SchemaRegistry, load_ztf_schema
    from stream.queue import redacted

    s, o = cfg.source, cfg.output
    for key, load, value in (("source.schema_dir", SchemaRegistry.from_dir, s.schema_dir),
                             ("source.ztf_schema", load_ztf_schema, s.ztf_schema)):
        if value:
            try:
                load(value)
            except (OSError, ValueError) as e:
                raise ConfigError(f"{key}: {e}") from None
    model = load_configured_model(cfg)
    version = model.model_version if model is not None else "the shipped default"
    out_cluster = "the source's" if same_cluster_as_source(cfg) else o.bootstrap_servers
    print(f"config OK: {path} (nothing started, no broker contacted)")
    print(f"  source: {s.bootstrap_servers} topics {', '.join(s.topics)} group {s.group_id}; "
          f"librdkafka: {', '.join(sorted(s.kafka)) or 'defaults'}; containers read by "
          f"{Decoder(avro_backend=s.avro_backend).avro_backend}")
    print(f"  outputs on {out_cluster} cluster: {o.annotations_topic}, dead letters {o.dead_letter_topic}; "
          f"librdkafka: {', '.join(sorted(output_kafka_settings(cfg))) or 'defaults'}")
    print(f"  queue store: {redacted(o.queue_db) if o.queue_db else 'none'}; model: {version}")
    if replay:  # what `vigil run --replay` (or --from/--until) would do instead of the live service
        from stream.config import ReplayConfig

        rc = cfg.replay or ReplayConfig()
        whole = "" if cfg.replay is not None else " (no [replay] section: the whole topic)"
        print(f"  replay{whole}: {rc.start} → {rc.end} under group {rc.group_id}, never committing; outputs "
              f"{o.annotations_topic}.{rc.namespace}, {o.dead_letter_topic}.{rc.namespace}; queue store: "
              f"{redacted(rc.queue_db) if rc.queue_db else 'none'}")
    elif cfg.replay is not None:
        print(f"  [replay] {cfg.replay.start} → {cfg.replay.end}, outputs suffixed .{cfg.replay.namespace}")
    return 0


def cmd_produce(args) -> int:
    from stream.config import check_topic_name
    from stream.decode import SchemaRegistry, load_ztf_schema
    from stream.kafka import produce_files

    if args.ztf_format == "schemaless" and not args.ztf_schema:
        raise ValueError("--ztf-format schemaless needs --ztf-schema")
    check_topic_name(args.topic, "--topic")  # a ConfigError: one line, not librdkafka's traceback
    counts = produce_files(
        args.paths, args.topic, args.bootstrap, ztf_format=args.ztf_format,
        ztf_schema=load_ztf_schema(args.ztf_schema) if args.ztf_schema else None,
        rubin_schemas=SchemaRegistry.from_dir(args.schema_dir) if args.schema_dir else None,
    )
    total = sum(counts.values())
    print(f"produced {total} messages to {args.topic} ({', '.join(f'{k}={v}' for k, v in sorted(counts.items()))})")
    return 0


def cmd_broker(args) -> int:
    import signal
    import time

    from stream.broker import EmbeddedBroker

    broker = EmbeddedBroker(port=args.port).start()
    print(f"bootstrap.servers={broker.bootstrap}", flush=True)
    print("embedded Tansu broker (memory only); Ctrl-C to stop. A consumer group on it joins in ~3 s "
          "with session.timeout.ms=6000 and heartbeat.interval.ms=1000 in [source.kafka] (deploy/local.toml "
          "has them), ~22 s without", file=sys.stderr, flush=True)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *a: stopping.append(1))
    try:
        while not stopping and broker.proc.poll() is None:
            time.sleep(0.2)
    except KeyboardInterrupt:
        stopping.append(1)
    finally:
        died = None if stopping else broker.proc.poll()
        broker.stop()
    if died is not None:  # it ended without being asked to: not a success
        print(f"vigil: error: the broker process ended by itself (exit status {died})", file=sys.stderr)
        return 1
    return 0


def _count_of_rows(text: str) -> int:
    """argparse type: 1 … 500 (as ``queue list --top``)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 500:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of rows from 1 to 500")
    return n


class _Version(argparse.Action):
    """``--version``: the version annotations carry as ``code_version`` (the release plus a digest of
    the code and models), worked out only when asked for (it reads every package file)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from stream.annotation import code_version

        print(f"vigil {code_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vigil", description="Real-time annotator for astronomical alert streams.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    ap.add_argument("--version", action=_Version, nargs=0, help="print the version and exit")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("replay", help="annotate archived alerts (Avro files, directories, tarballs)")
    p.add_argument("paths", nargs="+", help="files, directories or .tar/.tar.gz archives")
    p.add_argument("--out", action="append", help="annotations: .jsonl or .parquet (repeatable)")
    p.add_argument("--rejected", help="rejections as JSON Lines")
    p.add_argument("--queue", help="also fill this eyeball-queue store (SQLite file or postgresql:// URL)")
    p.add_argument("--no-hsr", action="store_true", help="switch half-sibling regression off")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    p.add_argument("--model", help="scorer model directory (default: the shipped models/default_model)")
    _add_decoder_args(p)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("run", help="consumer-group service: Kafka alerts in, annotations and dead letters out")
    p.add_argument("--config", required=True, help="TOML config (see deploy/)")
    p.add_argument("--replay", action="store_true", help="use the config's [replay] section (never commits)")
    p.add_argument("--from", dest="start", help="replay from this time (ISO-8601) or 'earliest' "
                   "(without --until, the end is the config's [replay] end, else 'end')")
    p.add_argument("--until", dest="end", help="replay until this time (ISO-8601) or 'end' "
                   "(without --from, the start is the config's [replay] start, else 'earliest')")
    p.add_argument("--check", action="store_true", help="load and check the config (secrets, schemas, model), "
                   "say what it would run, and exit; no broker is contacted")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("produce", help="push archived alerts into a Kafka topic")
    p.add_argument("paths", nargs="+")
    p.add_argument("--topic", required=True, help="the topic to write the alerts to")
    p.add_argument("--bootstrap", default="127.0.0.1:9092",
                   help="broker address (default: %(default)s; `vigil broker` prints the embedded one's)")
    p.add_argument("--ztf-format", choices=["container", "schemaless"], default="container",
                   help="ZTF messages as one-alert Avro containers, as ZTF sends them, or schemaless (needs "
                        "--ztf-schema) (default: %(default)s)")
    _add_decoder_args(p, backend=False)
    p.set_defaults(func=cmd_produce)

    from stream.queue import port_number

    p = sub.add_parser("broker", help="start the embedded Kafka-protocol broker and print its address")
    p.add_argument("--port", type=port_number, default=None, help="default: a free port")
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("demo", help="broker + sample alerts + service + ranked queue, in one command")
    p.add_argument("--data", help="alerts to replay (default: the bundled sample in tests/data)")
    p.add_argument("--queue", default="vigil-demo.sqlite", help="eyeball-queue store to fill")
    p.add_argument("--top", type=_count_of_rows, default=15, help="rows of the ranked list to print (1–500)")
    p.set_defaults(func=lambda a: __import__("stream.demo", fromlist=["main"]).main(a))

    # Other commands live beside their code; each module has ``register(subparsers)``
    # and imports its heavy dependencies lazily so `vigil --help` stays fast.
    import importlib

    for mod in PLUGIN_MODULES:
        importlib.import_module(mod).register(sub)

    def verbose_too(parser):  # `vigil run -v` and `vigil queue list -v` as well as `vigil -v run`
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for p in action.choices.values():
                    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                   help="debug logging and tracebacks")
                    verbose_too(p)

    verbose_too(ap)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:  # Ctrl-C in a command that does not handle it itself: no traceback
        print("vigil: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`... | head`): not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no complaint at exit's flush)
        return 0
    except (ValueError, OSError, sqlite3.DatabaseError, MissingExtra) as e:
        # (MissingExtra: an optional extra not installed, e.g. psycopg for a postgresql:// store; its
        # message says what to install. Any other ImportError is a bug, with its traceback.)
        if isinstance(e, (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)):
            raise  # Vigil's own SQL is wrong: a bug, with its traceback
        # Usage, configuration and environment errors (a path that is a directory, a file
        # that is not a database, a port in use): one clear line (-v, and a running service,
        # also log the traceback).
        _fail(e, args.verbose or (args.func is cmd_run and not isinstance(e, ValueError)))
        return 2
    except Exception as e:
        kafka = sys.modules.get("stream.kafka")
        if kafka is not None and isinstance(e, kafka.DeliveryError):
            _fail(e, True)  # the broker did not take the outputs: said in one line, traceback in the log
            return 1
        pg = sys.modules.get("psycopg")  # loaded only if a PostgreSQL queue store was named
        if pg is None or not isinstance(e, pg.OperationalError):
            raise
        _fail(e, args.verbose)  # an unreachable or refusing PostgreSQL queue store
        return 2


def _fail(e: BaseException, verbose: bool) -> None:
    if verbose:
        logging.getLogger("vigil").exception("failed")
    what = "" if isinstance(e, (ValueError, FileNotFoundError, MissingExtra)) else f"{type(e).__name__}: "
    print(f"vigil: error: {what}{e}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

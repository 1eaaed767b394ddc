"""The ``vigil`` command line."""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("vigil")

#: Modules that add subcommands (see ``register`` in each).
PLUGIN_MODULES: tuple = ()


def _decoder(args):
    from stream.decode import Decoder, SchemaRegistry, load_ztf_schema

    schemas = SchemaRegistry.from_dir(args.schema_dir) if args.schema_dir else None
    ztf = load_ztf_schema(args.ztf_schema) if args.ztf_schema else None
    return Decoder(schemas=schemas, ztf_schema=ztf)


def _add_decoder_args(p):
    p.add_argument("--schema-dir", help="directory of .avsc schemas for Confluent-framed (Rubin) messages")
    p.add_argument("--ztf-schema", help="ZTF schema (.avsc/.json file or directory) for schemaless ZTF messages")


def _annotation_sinks(outs):
    from stream.sinks import JsonlSink, ParquetSink

    sinks = []
    for o in outs or ():
        sinks.append(ParquetSink(o) if str(o).endswith(".parquet") else JsonlSink(o))
    return sinks


def cmd_replay(args) -> int:
    from stream.pipeline import Pipeline
    from stream.service import Progress, drive
    from stream.sinks import JsonlSink
    from stream.sources import FileSource, count_files

    pipeline = Pipeline(_decoder(args), clock="stream")
    sinks = _annotation_sinks(args.out)
    rejected = [JsonlSink(args.rejected)] if args.rejected else []
    progress = Progress(count_files(args.paths), enabled=False if args.no_progress else None)
    counts = drive(FileSource(args.paths, args.batch_size), pipeline, sinks, rejected, progress)
    print(counts.line())
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vigil", description="Real-time annotator for astronomical alert streams.")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("replay", help="annotate archived alerts (Avro files, directories, tarballs)")
    p.add_argument("paths", nargs="+", help="files, directories or .tar/.tar.gz archives")
    p.add_argument("--out", action="append", help="annotations: .jsonl or .parquet (repeatable)")
    p.add_argument("--rejected", help="rejections as JSON Lines")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    _add_decoder_args(p)
    p.set_defaults(func=cmd_replay)

    # Other commands live beside their code; each module has ``register(subparsers)``
    # and imports its heavy dependencies lazily so `vigil --help` stays fast.
    import importlib

    for mod in PLUGIN_MODULES:
        importlib.import_module(mod).register(sub)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except (FileNotFoundError, ValueError) as e:
        # Usage and configuration errors: one clear line, no traceback.
        print(f"vigil: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

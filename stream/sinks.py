"""File sinks: annotations as JSON Lines or Parquet, rejections as JSON Lines.

A sink has ``write(items)``, ``flush()`` (after which what was written is durable)
and ``close()``. Kafka and queue sinks live in :mod:`stream.kafka` and the queue store.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec

from stream.annotation import ANNOTATION_SCHEMA_VERSION


def print_json(obj, indent: int = 1) -> None:
    """``obj`` on stdout as strict JSON (what ``--json`` promises): NaN and ±inf become null, numpy
    scalars plain numbers, anything else not JSON its text."""
    import math

    def clean(o):
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if hasattr(o, "item") and not isinstance(o, (str, bytes)):  # numpy scalars
            try:
                o = o.item()
            except (TypeError, ValueError):
                return str(o)
        return None if isinstance(o, float) and not math.isfinite(o) else o

    print(json.dumps(clean(obj), indent=indent, allow_nan=False, default=str))


class JsonlSink:
    """One JSON object per line; ``records`` are already-built dicts."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "wb")
        # msgspec writes the same JSON as json.dumps (compact) about 6x faster; records carry no
        # NaN (Annotation.to_record maps them to null), which json.dumps(allow_nan=False) enforced.
        self._encode = msgspec.json.Encoder().encode

    def write(self, records) -> None:
        enc = self._encode
        self._fh.write(b"".join(enc(r) + b"\n" for r in records))

    def flush(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self.flush()
            self._fh.close()


# The annotation's lists and maps, kept nested in tables (Parquet list and map types).
PARQUET_LAYOUT = "2"  # files without this key (before 2026-11-27): lists and maps as JSON text, times as integers
_NESTED = {"explanation": list, "explanation_text": dict, "features": dict, "source_type_probabilities": dict,
           "extrapolated": list, "label_propensity": dict}


def flatten_annotation(r: dict) -> dict:
    """A row for tables: the nested records become prefixed columns; lists and maps stay as they are."""
    flat = {k: v for k, v in r.items() if not isinstance(v, (dict, list))}
    for prefix in ("hsr", "lightcurve", "source"):
        for k, v in r[prefix].items():
            flat[f"{prefix}_{k}"] = v
    for k, kind in _NESTED.items():
        flat[k] = r.get(k, kind())  # records of schema 1.0 lack the later fields
    return flat


def _arrow_schema():
    """Arrow schema derived from the annotation Avro schema (so all-null batches still type).

    The top-level records (``hsr``, ``lightcurve``, ``source``) are flattened into prefixed
    columns; arrays become Arrow lists (of structs for the explanation's records) and maps
    Arrow maps, so a reader gets them typed instead of as JSON text to parse; the two
    ``*_time_ms`` columns are UTC timestamps (milliseconds), not bare integers. The file's
    metadata names the annotation schema version and this layout (``vigil.parquet_layout``):
    files without it hold the same columns as text, and do not read as one dataset with these.
    """
    from importlib import resources

    import pyarrow as pa

    prim = {"string": pa.string(), "long": pa.int64(), "int": pa.int32(), "double": pa.float64(),
            "boolean": pa.bool_(), "float": pa.float32()}

    def arrow(t):
        if isinstance(t, list):
            return arrow([x for x in t if x != "null"][0])
        if isinstance(t, dict):
            kind = t["type"]
            if t.get("logicalType") == "timestamp-millis":
                return pa.timestamp("ms", tz="UTC")
            if kind == "enum":
                return pa.string()
            if kind == "array":
                return pa.list_(arrow(t["items"]))
            if kind == "map":
                return pa.map_(pa.string(), arrow(t["values"]))
            if kind == "record":
                return pa.struct([pa.field(g["name"], arrow(g["type"])) for g in t["fields"]])
            return arrow(kind)
        return prim[t]

    avsc = json.loads(resources.files("stream").joinpath("schemas", "vigil.annotation.v1.avsc").read_text())
    fields = []
    for f in avsc["fields"]:
        t = f["type"]
        if isinstance(t, dict) and t.get("type") == "record":
            fields += [pa.field(f"{f['name']}_{g['name']}", arrow(g["type"])) for g in t["fields"]]
        else:
            fields.append(pa.field(f["name"], arrow(t)))
    return pa.schema(fields, metadata={"vigil.schema": "vigil.annotation",
                                       "vigil.schema_version": ANNOTATION_SCHEMA_VERSION,
                                       "vigil.parquet_layout": PARQUET_LAYOUT})


class ParquetSink:
    """Annotations as a Parquet file, one row group per flush."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)  # as JsonlSink truncates: no earlier run's file survives this one
        self._rows: list[dict] = []
        self._writer = None

    def write(self, records) -> None:
        self._rows.extend(flatten_annotation(r) for r in records)

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._rows:
            return
        if self._writer is None:
            self._schema = _arrow_schema()
            self._writer = pq.ParquetWriter(self.path, self._schema)
        self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self._schema))
        self._rows = []

    def close(self) -> None:
        self.flush()
        if self._writer is None:  # no annotation at all: an empty file, not an earlier run's left in place
            import pyarrow.parquet as pq

            self._writer = pq.ParquetWriter(self.path, _arrow_schema())
        self._writer.close()
        self._writer = None

"""Bytes → :class:`~stream.alert.Alert` or :class:`~stream.alert.Rejected`.

Three wire formats are recognised:

* Avro object-container files (magic ``Obj\\x01``): the writer schema travels with the
  payload, so any ZTF schema version (3.0 … 4.02) and any record naming (e.g. files
  re-written by Spark as ``topLevelRecord``) decode. Rubin alerts in containers too.
* Confluent wire format: byte 0, a 4-byte big-endian schema id, then schemaless Avro.
  Rubin uses id = major·100 + minor; the schema comes from a user-given directory of
  ``.avsc`` files (:class:`SchemaRegistry`).
* Schemaless ZTF Avro, decoded with a schema the user provides.

All survey column names live in this module. Every failure becomes a ``Rejected``
with one of the stable reason codes in :data:`REASONS`.
"""

from __future__ import annotations

import io
import json
import logging
import math
import operator
import re
import struct
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import fastavro
import numpy as np
from fastavro.schema import load_schema, load_schema_ordered, parse_schema

try:  # optional: a Cython Avro decoder ~3x faster than fastavro on ZTF alerts (see Decoder)
    import cavro
except ImportError:  # not installed (no wheel for this Python or platform): fastavro alone
    cavro = None

from stream.alert import (
    DETECTION,
    FORCED,
    NONDETECTION,
    PIXEL_SCALE,
    PREVIOUS,
    Alert,
    Context,
    Envelope,
    LightCurve,
    Rejected,
    mag_to_ujy,
    median,
)

log = logging.getLogger(__name__)

#: Stable rejection reasons (part of the dead-letter contract).
REASONS = {
    "unreadable": "the input could not be read (file permission, broken link, damaged archive)",
    "empty_payload": "zero-length message",
    "oversize": "message larger than the configured limit",
    "bad_magic_byte": "neither an Avro container, nor Confluent-framed, nor decodable schemaless",
    "unknown_schema_id": "Confluent schema id not in the schema directory",
    "truncated": "payload ends before the Avro record does",
    "corrupt_avro": "bytes do not decode with the schema",
    "trailing_bytes": "a record or a container's last block decoded but bytes were left over",
    "unknown_survey": "record is neither a ZTF nor a Rubin alert",
    "missing_field": "a field Vigil requires is absent or null",
    "bad_coordinates": "ra/dec non-finite or out of range",
    "bad_time": "observation time non-finite or implausible",
    "bad_value": "a field has an unusable value",
    "internal_error": "Vigil failed on a decoded alert (a bug: counted against the error budget)",
    "unencodable": "the alert's annotation has a value the output schema cannot hold",
}

CONTAINER_MAGIC = b"Obj\x01"
# The Avro object-container header (Avro spec, "Object Container Files") and a bare long.
_HEADER_SCHEMA = parse_schema({"type": "record", "name": "org.apache.avro.file.Header", "fields": [
    {"name": "magic", "type": {"type": "fixed", "name": "Magic", "size": 4}},
    {"name": "meta", "type": {"type": "map", "values": "bytes"}},
    {"name": "sync", "type": {"type": "fixed", "name": "Sync", "size": 16}}]})
_LONG_SCHEMA = parse_schema("long")
ZTF_BANDS = {1: "g", 2: "r", 3: "i"}
JD_MJD = 2400000.5
# MJD 40000 (1968) .. 100000 (2132): anything outside is not a survey observation.
MJD_RANGE = (40000.0, 100000.0)
ZTF_FP_BAD = -99999.0
#: A ZTF ``pid`` is (night id · 10⁷ + fraction of the day · 10⁷) · 100 + rcid, night 0 being
#: JD 2457754.5: it carries the exposure time to 10⁻⁷ d. On 19,077 real history rows (ZTF
#: schemas 3.0–4.02) it agrees with ``jd`` to < 1 s, except in one export where every
#: ``prv_candidates`` row of an alert had been given one and the same ``jd``; there the pid
#: is right and the ``jd`` is not.
ZTF_NID0_JD = 2457754.5
ZTF_PID_JD_TOLERANCE_D = 60.0 / 86400.0
#: The cross-match search radii (arcsec) the ZTF candidate schema documents: PS1 and solar
#: system objects within 30″, Gaia within 90″. A distance beyond its radius cannot be a
#: match; it is a fill value. In the Fink 2023 export, 329 of 1,085 alerts (one run of
#: exposures) carry distpsnr1 = 120, neargaia = 300, ssdistnr = 60 and sgscore1 = 0.2
#: together, while the same objects' other alerts have real matches (sgscore1 0.96–1.00
#: at 0.1–0.4″ for known stars). Read as values they say "no star here".
ZTF_MATCH_RADIUS = {"distpsnr1": 30.0, "neargaia": 90.0, "ssdistnr": 30.0}


class DecodeError(Exception):
    """Raised inside the decoder; turned into a :class:`Rejected` at the boundary."""

    def __init__(self, reason: str, detail: str, alert_id=None, object_id=None):
        super().__init__(detail)
        assert reason in REASONS, reason
        self.reason = reason
        self.detail = detail
        self.alert_id = alert_id
        self.object_id = object_id


# --------------------------------------------------------------------------- schemas


class SchemaRegistry:
    """Schema id → parsed Avro schema, loaded from a directory of ``.avsc`` files.

    Rubin alert schemas are found by their namespace ``lsst.vMAJOR_MINOR`` and get
    id ``MAJOR*100 + MINOR``; named sub-schemas are resolved from sibling files as
    in ``lsst/alert_packet``. Other schemas can be added with :meth:`add`.
    """

    _LSST = re.compile(r"lsst\.v(\d+)_(\d+)")

    def __init__(self):
        self._schemas: dict[int, dict] = {}

    @classmethod
    def from_dir(cls, path) -> SchemaRegistry:
        """Load every ``*.alert.avsc`` under ``path`` (recursively)."""
        reg = cls()
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"schema directory not found: {root}")
        for f in sorted(root.rglob("*.avsc")):
            m = cls._LSST.search(f.name)
            if not m or not f.name.endswith(".alert.avsc"):
                continue
            try:
                schema = load_schema(str(f))
            except Exception as e:  # noqa: BLE001 - fastavro's parse errors share no base beyond Exception
                raise ValueError(f"schema {f}: not a readable Avro schema ({type(e).__name__}: {e})") from None
            reg.add(int(m.group(1)) * 100 + int(m.group(2)), schema)
        if not reg.ids():  # a service given it would dead-letter every Rubin message of the night
            raise ValueError(f"schema directory {root} holds no Rubin alert schema (lsst.vMAJOR_MINOR.alert.avsc)")
        return reg

    def add(self, schema_id: int, schema) -> None:
        """Register ``schema`` (a dict/JSON or parsed schema) under ``schema_id``."""
        if not isinstance(schema, dict) or "__fastavro_parsed" not in schema:
            schema = parse_schema(schema)
        self._schemas[int(schema_id)] = schema

    def get(self, schema_id: int):
        return self._schemas.get(schema_id)

    def ids(self) -> list[int]:
        return sorted(self._schemas)

    def __len__(self) -> int:
        return len(self._schemas)


def load_ztf_schema(path):
    """Load a ZTF alert schema for schemaless decoding.

    ``path`` may be a single ``.avsc``/``.json`` file with the whole schema, or a
    directory with the official split files (cutout, candidate, prv_candidate,
    fp_hist, alert), which are loaded in dependency order.
    """
    p = Path(path)
    if p.is_dir():
        order = ["cutout", "candidate", "prv_candidate", "fp_hist", "alert"]
        files = [str(p / f"{n}.avsc") for n in order if (p / f"{n}.avsc").exists()]
        if not files:
            raise FileNotFoundError(f"no ZTF .avsc files in {p}")
    elif not p.exists():
        raise FileNotFoundError(f"ZTF schema not found: {p}")
    try:
        schema = load_schema_ordered(files) if p.is_dir() else parse_schema(json.loads(p.read_text()))
    except (OSError, ValueError, KeyError, TypeError, fastavro.schema.SchemaParseException) as e:
        # fastavro names an unresolved type by itself ("ztf.alert.candidate"): say where it was looked for
        what = e if isinstance(e, (OSError, json.JSONDecodeError)) else f"{type(e).__name__}: {e}"
        raise ValueError(f"ZTF schema {p}: not a readable Avro schema ({what})") from None
    name = schema.get("name") if isinstance(schema, dict) and schema.get("type") == "record" else None
    if str(name).rsplit(".", 1)[-1] != "alert":
        got = repr(name) if name else f"a {type(schema).__name__}, not a record"
        raise ValueError(f"ZTF schema {p}: not the ZTF alert record (got {got}"
                         + ("; a split schema directory needs alert.avsc)" if p.is_dir() else ")"))
    return schema


def frame_confluent(schema_id: int, body: bytes) -> bytes:
    """Prefix schemaless Avro ``body`` with the Confluent wire header."""
    return b"\x00" + struct.pack(">I", schema_id) + body


def encode_schemaless(record: dict, schema) -> bytes:
    """Schemaless Avro encoding of ``record`` with ``schema``."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, record)
    return buf.getvalue()


# --------------------------------------------------------------------------- decoder


class Decoder:
    """Turn an :class:`Envelope` into alerts and rejections.

    Parameters
    ----------
    schemas : SchemaRegistry, optional
        Schemas for Confluent-framed messages (Rubin).
    ztf_schema : parsed schema, optional
        Schema for schemaless ZTF messages; without it only containers and
        Confluent frames are understood.
    max_message_bytes : int
        Larger payloads are rejected as ``oversize`` (the embedded broker has no
        limit of its own).
    keep_cutouts : bool
        Keep the FITS stamps on the ``Alert`` (the eyeball queue needs them).
    avro_backend : {"auto", "fastavro", "cavro"}
        What decodes the records of well-formed, uncompressed containers (ZTF's messages and
        archive files): ``cavro`` (an optional dependency, ~3x faster on ZTF alerts, the same
        records), ``fastavro``, or ``auto``: cavro where it is installed. Anything cavro cannot
        read, and every damaged message, goes to fastavro, which names the problem; Confluent-framed
        and schemaless messages are always read by fastavro.
    """

    AVRO_BACKENDS = ("auto", "fastavro", "cavro")

    def __init__(self, schemas: SchemaRegistry | None = None, ztf_schema=None,
                 max_message_bytes: int = 16 * 2**20, keep_cutouts: bool = True, avro_backend: str = "auto"):
        if avro_backend not in self.AVRO_BACKENDS:
            raise ValueError(f"avro_backend {avro_backend!r}: one of {', '.join(self.AVRO_BACKENDS)}")
        if avro_backend == "cavro" and cavro is None:
            raise ValueError("avro_backend 'cavro': the cavro package is not installed (pip install cavro; "
                             "wheels exist for CPython 3.11-3.12 on x86-64)")
        self.schemas = schemas if schemas is not None else SchemaRegistry()
        self.ztf_schema = ztf_schema
        self.max_message_bytes = max_message_bytes
        self.keep_cutouts = keep_cutouts
        if avro_backend == "auto":
            avro_backend = "fastavro" if cavro is None else "cavro"
        self.avro_backend = avro_backend
        # (length, first and last 256 bytes of the writer-schema JSON) → (JSON, parsed schema, version).
        # Hashing the whole ~22 kB text of a ZTF schema took ~11 µs a message; the full text is
        # still compared (a memcmp) before an entry is used.
        self._container_schemas: dict = {}

    def decode(self, env: Envelope) -> list:
        """Decode one envelope into a list of ``Alert`` and ``Rejected`` (never empty)."""
        return [item for item, _ in self.decode_batch([env])]

    def decode_batch(self, envelopes) -> list:
        """Decode a micro-batch: ``[(Alert or Rejected, Envelope)]``, in order.

        The same items as :meth:`decode` on each envelope, but the ZTF light curves are
        built :attr:`LIGHTCURVE_CHUNK` alerts at a time in one vectorised pass (instead of a
        few dozen small numpy calls per alert). Should that pass fail, each alert is
        redone on its own, so one malformed history (a value of the wrong type or shape)
        rejects only its own alert.
        """
        envelopes = list(envelopes)
        out = []
        # In chunks: a chunk's decoded records (dicts of every history row, ~0.3 MB per dense
        # simulated alert) stay alive until its light curves are built, and a whole micro-batch
        # of them raised the peak RSS of a long replay by ~250 MB.
        for i in range(0, len(envelopes), self.LIGHTCURVE_CHUNK):
            out += self._decode_chunk(envelopes[i:i + self.LIGHTCURVE_CHUNK])
        return out

    #: Alerts whose light curves are built in one vectorised pass (see :meth:`decode_batch`).
    LIGHTCURVE_CHUNK = 32

    def _decode_chunk(self, envelopes) -> list:
        out, pending = [], []
        for env in envelopes:
            if env.unreadable is not None:
                out.append((Rejected(env, "decode", "unreadable", env.unreadable), env))
                continue
            try:
                records, version = self._records(env.payload)
            except DecodeError as e:
                out.append((Rejected(env, "decode", e.reason, e.detail), env))
                continue
            for rec in records:
                if isinstance(rec, DecodeError):  # container broke after some good records
                    out.append((Rejected(env, "decode", rec.reason, rec.detail), env))
                elif isinstance(rec, dict) and "candidate" in rec:
                    prep = self._checked(rec, env, _ztf_prepare, rec)
                    if not isinstance(prep, Rejected):
                        pending.append((len(out), rec, prep))
                    out.append((prep, env))
                else:
                    out.append((self.to_alert(rec, env, version), env))
        if pending:
            try:
                lcs = _ztf_lightcurves([prep[-1] for _, _, prep in pending])
            except Exception as e:  # a malformed history somewhere: each alert on its own below
                log.debug("batch light-curve pass failed (%s: %s); decoding %d alerts one by one",
                          type(e).__name__, e, len(pending))
                lcs = [None] * len(pending)
            for (i, rec, prep), lc in zip(pending, lcs, strict=True):
                env = out[i][1]
                if lc is None:
                    lc = self._checked(rec, env, lambda p: _ztf_lightcurves([p[-1]])[0], prep)
                    if isinstance(lc, Rejected):
                        out[i] = (lc, env)
                        continue
                out[i] = (self._checked(rec, env, _ztf_finish, rec, prep, lc, self.keep_cutouts), env)
        return out

    def decode_history(self, env: Envelope) -> list:
        """Each alert of the envelope, and each ZTF alert also as it stood at its earlier detections.

        See :func:`ztf_history_records` (a re-creation for within-object studies; every
        epoch scores with the history's ``rb``).

        Parameters
        ----------
        env : Envelope

        Returns
        -------
        list of list
            One list per record, in time order with the alert itself last: ``Alert`` and
            ``Rejected`` items. Other surveys' alerts come alone, as :meth:`decode` gives
            them; a record that cannot be read is a list holding its ``Rejected``.
        """
        if env.unreadable is not None:
            return [[Rejected(env, "decode", "unreadable", env.unreadable)]]
        try:
            records, version = self._records(env.payload)
        except DecodeError as e:
            return [[Rejected(env, "decode", e.reason, e.detail)]]
        out = []
        for rec in records:
            if isinstance(rec, DecodeError):
                out.append([Rejected(env, "decode", rec.reason, rec.detail)])
                continue
            epochs = self._checked(rec, env, ztf_history_records, rec) if isinstance(rec, dict) else [rec]
            if isinstance(epochs, Rejected):
                out.append([epochs])
                continue
            out.append([self.to_alert(r, env, version) for r in epochs])
        return out

    def to_alert(self, rec: dict, env: Envelope, version: str = ""):
        """Map one decoded Avro record to an ``Alert`` (or ``Rejected``)."""
        return self._checked(rec, env, self._to_alert, rec, version)

    def _to_alert(self, rec, version: str):
        if not isinstance(rec, dict):
            raise DecodeError("unknown_survey", f"record is a {type(rec).__name__}, not a record")
        if "candidate" in rec:
            return _ztf_alert(rec, self.keep_cutouts)
        if "diaSource" in rec:
            return _rubin_alert(rec, version, self.keep_cutouts)
        raise DecodeError("unknown_survey", f"record fields {sorted(rec)[:8]} match no survey")

    @staticmethod
    def _checked(rec, env: Envelope, fn, *args):
        """``fn(*args)``, or the ``Rejected`` that names what is wrong with ``rec``."""
        try:
            return fn(*args)
        except DecodeError as e:
            return Rejected(env, "validate", e.reason, e.detail, e.alert_id, e.object_id)
        except Exception as e:  # noqa: BLE001 - whatever a hostile record provokes is that record's fault
            # A field of the wrong shape (e.g. a string where a number belongs).
            return Rejected(env, "validate", "bad_value", f"{type(e).__name__}: {e}", *_ids_of(rec))

    # -- framing -------------------------------------------------------------

    def _records(self, payload: bytes):
        try:
            return self._framed(payload)
        except DecodeError:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. MemoryError from a hostile count: that message's fault
            raise DecodeError("corrupt_avro", f"{type(e).__name__}: {e}") from None

    def _framed(self, payload: bytes):
        if not payload:
            raise DecodeError("empty_payload", "empty message")
        if len(payload) > self.max_message_bytes:
            raise DecodeError("oversize", f"{len(payload)} bytes > limit {self.max_message_bytes}")
        if payload[:4] == CONTAINER_MAGIC:
            return self._container(payload)
        if len(payload) < 4 and CONTAINER_MAGIC.startswith(payload):
            raise DecodeError("truncated", f"{len(payload)} bytes: cut inside an Avro container's magic")
        if payload[0] == 0 and len(payload) < 5 and self.ztf_schema is None:
            raise DecodeError("truncated", f"{len(payload)} bytes: a Confluent frame (magic 0x00) cut inside "
                                           "its 4-byte schema id")
        if payload[0] == 0 and len(payload) >= 5 and (len(self.schemas) or self.ztf_schema is None):
            (schema_id,) = struct.unpack(">I", payload[1:5])
            schema = self.schemas.get(schema_id)
            if schema is None:
                known = ",".join(map(str, self.schemas.ids())) or "none: no schema directory given"
                raise DecodeError("unknown_schema_id", f"schema id {schema_id} not known (known: {known})")
            rec = _schemaless(payload[5:], schema)
            return [rec], _version_of_id(schema_id)
        if self.ztf_schema is not None:
            try:
                return [_schemaless(payload, self.ztf_schema)], ""
            except DecodeError as e:
                # A ZTF record starts with its schema version string, never empty, so a leading
                # 0x00 that does not decode is far likelier a Confluent frame than a damaged alert.
                if payload[0] != 0 or len(payload) < 5:
                    raise
                (schema_id,) = struct.unpack(">I", payload[1:5])
                raise DecodeError("unknown_schema_id", f"schema id {schema_id}: the message looks Confluent-framed "
                                  "(magic 0x00) but only a ZTF schemaless schema is configured (give a schema "
                                  f"directory); read as ZTF schemaless: {e.reason}: {e.detail}") from None
        raise DecodeError(
            "bad_magic_byte",
            f"first bytes {payload[:5]!r}: not an Avro container, not Confluent-framed "
            "(magic 0x00), and no ZTF schemaless schema configured",
        )

    def _container(self, payload: bytes):
        head = self._vet_container(payload)
        fast = self._container_fast(payload, head)
        if fast is not None:
            return fast
        buf = io.BytesIO(payload)
        try:
            reader = fastavro.reader(buf)
        except EOFError as e:
            raise DecodeError("truncated", f"container header: {e}") from None
        except Exception as e:  # fastavro raises many types for a bad header
            if isinstance(e.__context__, EOFError):  # header cut short, e.g. a partial download
                raise DecodeError("truncated", f"container header: {e.__context__}") from None
            raise DecodeError("corrupt_avro", f"container header: {type(e).__name__}: {e}") from None
        version = container_version(reader.writer_schema)
        records = []
        try:
            for rec in reader:
                records.append(rec)
        except (EOFError, StopIteration) as e:
            # fastavro reads a block length gone negative (a flipped bit) as a short read.
            reason = "corrupt_avro" if str(e).startswith("Expected -") else "truncated"
            records.append(DecodeError(reason, f"after {len(records)} records: {e or 'EOF'}"))
        except Exception as e:  # corrupt block: keep what decoded, reject the rest
            records.append(DecodeError("corrupt_avro", f"after {len(records)} records: {type(e).__name__}: {e}"))
        if not records:
            raise DecodeError("truncated", "container holds no records")
        return records, version

    def _vet_container(self, payload: bytes) -> None:
        """Refuse a container whose own writer schema or codec could exhaust the process.

        A container carries its writer schema, and fastavro follows it: a schema that refers to
        itself nests records until the interpreter's stack overflows (a segfault, which no
        ``except`` catches); items of zero width let a 77-byte message claim a million records;
        a compressed block inflates without limit. Each is a ``DecodeError`` here, before any
        record is read. Verdicts on a schema are kept with the parsed schema (see
        :meth:`_container_fast`), so a stream pays for this once per schema. Returns what the
        fast path needs of an uncompressed container (first block's offset, sync marker, writer
        schema), or None for a damaged header or a compressed container.
        """
        try:
            buf = io.BytesIO(payload)
            header = fastavro.schemaless_reader(buf, _HEADER_SCHEMA, None)
            text = header["meta"]["avro.schema"]
        except Exception:  # a damaged header: the checked path names what is wrong
            return None
        writer = self._writer(text)
        codec = header["meta"].get("avro.codec", b"null")
        start = buf.tell()
        _vet_blocks(buf, codec.decode(errors="replace"), header["sync"], self.max_message_bytes)
        return (start, header["sync"], writer) if codec in (b"null", b"") else None

    def _writer(self, text: bytes):
        """(text, parsed schema, version, cavro schema or None) of a container's writer schema, vetted
        and cached."""
        key = (len(text), text[:256], text[-256:])
        cached = self._container_schemas.get(key)
        if cached is not None and cached[0] == text:
            return cached
        try:
            writer = json.loads(text)
        except ValueError as e:
            raise DecodeError("corrupt_avro", f"container schema is not JSON: {e}") from None
        _vet_writer_schema(writer)
        try:
            parsed = parse_schema(writer)
        except Exception as e:
            raise DecodeError("corrupt_avro", f"container schema: {type(e).__name__}: {e}") from None
        cached = (text, parsed, container_version(writer), self._cavro_schema(text))
        if len(text) <= MAX_CACHED_SCHEMA_BYTES:  # the real ZTF schema is ~22 kB
            if len(self._container_schemas) >= 64:  # a stream of ever-new schemas: stay bounded
                self._container_schemas.clear()
            self._container_schemas[key] = cached
        return cached

    def _cavro_schema(self, text: bytes):
        """The writer schema for cavro, or None: fastavro then reads this schema's containers.

        Vetted (:func:`_vet_writer_schema`) before it gets here. What cavro reads differently from
        fastavro is kept from it (see :func:`_cavro_layout`). cavro is stricter about schemas: ZTF's
        give ``null`` defaults to unions that list ``null`` second, which the options let pass
        (defaults play no part in reading a writer's own records).
        """
        if self.avro_backend != "cavro":
            return None
        try:
            layout = _cavro_layout(json.loads(text))
            return None if layout is None else cavro.Schema(json.dumps(layout), options=_CAVRO_OPTIONS)
        except Exception as e:  # noqa: BLE001 - a schema cavro will not take is fastavro's to read
            log.debug("cavro refuses a writer schema (%s: %s); fastavro reads it", type(e).__name__, e)
            return None

    def _container_fast(self, payload: bytes, head):
        """Records of a well-formed, uncompressed container, or None to take the checked path.

        ``fastavro.reader`` parses the writer schema of every container again; a stream
        sends the same few schemas millions of times, so they are parsed once and kept
        (keyed by a cheap digest of their JSON text, checked in full). Anything unusual — a
        codec, a bad sync marker, a block whose decoded length differs from its declared
        size, any exception — returns None and the message is decoded again by
        ``fastavro.reader``, which names the problem.
        ``head`` is what :meth:`_vet_container` read: (offset of the first block, sync
        marker, writer schema), or None (a compressed container or a damaged header).
        """
        if head is None:
            return None
        try:
            buf = io.BytesIO(payload)
            buf.seek(head[0])
            sync, (_, parsed, version, fast), end, records = head[1], head[2], len(payload), []
            view = memoryview(payload)
            while buf.tell() < end:
                count = fastavro.schemaless_reader(buf, _LONG_SCHEMA, None)
                size = fastavro.schemaless_reader(buf, _LONG_SCHEMA, None)
                start = buf.tell()
                if fast is not None:
                    # cavro reads from the block's bytes alone (a record cannot run past them);
                    # bytes the block's records leave over are ignored, as fastavro.reader does.
                    if count < 0 or size < 0 or start + size > end:
                        return None
                    reader = cavro.MemoryReader(view[start:start + size])
                    records.extend(fast.binary_read(reader) for _ in range(count))
                    buf.seek(start + size)
                else:
                    records.extend(fastavro.schemaless_reader(buf, parsed, None) for _ in range(count))
                    if buf.tell() - start != size:
                        return None
                if buf.read(16) != sync:
                    return None
            return (records, version) if records else None
        except Exception:  # the checked path decides what is wrong
            return None


#: Logical types cavro reads to the same values as fastavro (checked one by one); a schema with any
#: other (``local-timestamp-*`` come back as ints, ``uuid`` on ``fixed`` as a UUID) is fastavro's.
_CAVRO_LOGICAL = {"timestamp-millis", "timestamp-micros", "date", "time-millis", "time-micros", "decimal"}


def _cavro_layout(s):
    """``s`` (a schema as JSON values) for cavro, or None where fastavro must read it.

    Plain ``int`` becomes ``long``: the two share their encoding, and cavro cuts an int's varint
    to 32 bits where fastavro keeps the whole value (a writer that breaks the spec: a ZTF ``fid``
    of 2³² + 1 was band ``g`` to cavro, unknown to fastavro).
    """
    if isinstance(s, list):
        out = [_cavro_layout(b) for b in s]
        return None if any(b is None for b in out) else out
    if isinstance(s, str):
        return "long" if s == "int" else s
    if not isinstance(s, dict):
        return s
    logical = s.get("logicalType")
    t = s.get("type")
    if logical is not None and not (logical in _CAVRO_LOGICAL or (logical == "uuid" and t == "string")):
        return None
    out = dict(s)
    if t in ("record", "error"):
        fields = []
        for f in s.get("fields", ()):
            ft = _cavro_layout(f.get("type"))
            if ft is None:
                return None
            fields.append({**f, "type": ft})
        out["fields"] = fields
    elif t in ("array", "map"):
        key = "items" if t == "array" else "values"
        inner = _cavro_layout(s.get(key))
        if inner is None:
            return None
        out[key] = inner
    elif isinstance(t, (dict, list)):
        inner = _cavro_layout(t)
        if inner is None:
            return None
        out["type"] = inner
    elif t == "int" and logical is None:
        out["type"] = "long"
    return out


#: cavro's schema options: let the ZTF schemas' ``null`` defaults of ``[type, "null"]`` unions pass,
#: and give records as plain dicts, as fastavro does.
_CAVRO_OPTIONS = (cavro.Options(allow_invalid_default_values=True, allow_union_default_any_member=True,
                                record_decodes_to_dict=True) if cavro is not None else None)

#: Most records one message's container may hold (survey containers hold one alert), or one per
#: :data:`BYTES_PER_RECORD` of the message where that is more: a file of many real alerts decodes,
#: a few bytes claiming millions of tiny records do not.
MAX_RECORDS_PER_MESSAGE = 1000
BYTES_PER_RECORD = 1024
#: Writer schemas larger than this are vetted and parsed for each message, not kept.
MAX_CACHED_SCHEMA_BYTES = 256 * 1024
#: Deepest nesting of types a writer schema may have (ZTF's and Rubin's are < 10 deep).
MAX_SCHEMA_DEPTH = 32
_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


def _vet_writer_schema(schema) -> None:
    """Raise ``DecodeError`` for a writer schema that is not a plain, finite record layout.

    Refused: a top level that is not a record, a named type used inside itself (recursion),
    nesting deeper than :data:`MAX_SCHEMA_DEPTH`, top-level records that take no bytes, and
    arrays whose items take none (``null``, empty records, zero-size ``fixed``): a declared
    count would then stand for any number of values. (A map entry always takes its key.)
    """
    named: dict = {}  # full name -> definition (for references)

    def full(name, ns):
        return name if "." in name or not ns else f"{ns}.{name}"

    def width(s, ns, path, depth) -> bool:
        """True if values of ``s`` take at least one byte."""
        if depth > MAX_SCHEMA_DEPTH:
            raise DecodeError("corrupt_avro", f"container schema nests deeper than {MAX_SCHEMA_DEPTH}")
        if isinstance(s, list):  # a union: the branch index takes a byte
            for b in s:
                width(b, ns, path, depth + 1)
            return True
        if isinstance(s, str):
            if s in _PRIMITIVES:
                return s != "null"
            # As fastavro and the Avro spec resolve a name: in the enclosing namespace first.
            ref = next((r for r in (full(s, ns), s) if r in named), full(s, ns))
            if ref in path:
                raise DecodeError("corrupt_avro", f"container schema: type {ref!r} contains itself")
            if ref not in named:
                raise DecodeError("corrupt_avro", f"container schema: unknown type {s!r}")
            return named[ref][1]
        if not isinstance(s, dict):
            raise DecodeError("corrupt_avro", f"container schema: {type(s).__name__} is not a type")
        t = s.get("type")
        if t in ("record", "error", "enum", "fixed"):
            name = full(str(s.get("name", "")), s.get("namespace", ns))
            ns2 = name.rpartition(".")[0]
            if t == "enum":
                named[name] = (s, True)
                return True
            if t == "fixed":
                named[name] = (s, int(s.get("size", 0)) > 0)
                return named[name][1]
            named[name] = (s, True)  # provisional, for references to it from elsewhere
            fields = s.get("fields")
            if not isinstance(fields, list):
                raise DecodeError("corrupt_avro", f"container schema: record {name!r} has no field list")
            wide = False
            for f in fields:
                if not isinstance(f, dict):
                    raise DecodeError("corrupt_avro", f"container schema: a field of {name!r} is not an object")
                wide |= width(f.get("type"), ns2, path | {name}, depth + 1)
            named[name] = (s, wide)
            return wide
        if isinstance(t, (dict, list)):  # {"type": {...}}: the type itself
            return width(t, ns, path, depth + 1)
        if t in ("array", "map"):
            inner = s.get("items" if t == "array" else "values")
            # A map entry always takes its key's bytes; an array item may take none.
            if not width(inner, ns, path, depth + 1) and t == "array":
                raise DecodeError("corrupt_avro", "container schema: array of values that take no bytes")
            return True
        if t in _PRIMITIVES:
            return t != "null"
        if isinstance(t, str):
            return width(t, ns, path, depth + 1)
        raise DecodeError("corrupt_avro", f"container schema: unknown type {t!r}")

    top = schema.get("type") if isinstance(schema, dict) else None
    if top not in ("record", "error"):
        raise DecodeError("corrupt_avro", "container schema: the top level is not a record")
    if not width(schema, "", frozenset(), 0):
        raise DecodeError("corrupt_avro", "container schema: records that take no bytes")


def _vet_blocks(buf, codec: str, sync: bytes, limit: int) -> None:
    """Raise ``DecodeError`` for a container block that claims too many records or inflates too far.

    The blocks may hold at most :data:`MAX_RECORDS_PER_MESSAGE` records together, or one per
    :data:`BYTES_PER_RECORD` of the message if that is more (survey containers hold one; a 2 MB
    container of 2 million one-byte records cost 384 MB to read), and a
    compressed block must be one stream that inflates to at most ``limit`` bytes (fastavro
    inflates whole blocks, and decompresses streams written one after another). Bytes after
    a complete block that do not form a whole block of their own (a file with something
    appended, or cut inside a later block) are ``trailing_bytes``.
    """
    import bz2
    import lzma
    import zlib

    makers = {"null": None, "": None, "deflate": lambda: zlib.decompressobj(-15), "bzip2": bz2.BZ2Decompressor,
              "xz": lzma.LZMADecompressor}
    if codec not in makers:
        raise DecodeError("corrupt_avro", f"container codec {codec!r} not accepted (null, deflate, bzip2, xz)")
    n_bytes = len(buf.getbuffer())
    most = max(MAX_RECORDS_PER_MESSAGE, n_bytes // BYTES_PER_RECORD)
    total = records = 0
    end = None  # where the last block that ended in the sync marker ended

    def trailing():
        left = n_bytes - end
        return DecodeError("trailing_bytes", f"{left} byte{'s' * (left != 1)} after the container's last complete "
                                             f"block (at byte {end}) are not a whole Avro block")

    while buf.read(1):
        buf.seek(-1, 1)
        try:
            count = fastavro.schemaless_reader(buf, _LONG_SCHEMA, None)
            size = fastavro.schemaless_reader(buf, _LONG_SCHEMA, None)
        except Exception:  # damaged blocks: left to the checked path, which names them
            if end is not None:
                raise trailing() from None
            return
        if end is not None and (count < 0 or size < 0 or buf.tell() + size + 16 > n_bytes):
            raise trailing()
        records += count
        if count < 0:
            raise DecodeError("corrupt_avro", f"a block claims {count} records")
        if records > most:
            raise DecodeError("oversize", f"blocks claim {records} records (at most {most} in a message of "
                                          f"{n_bytes} bytes: {MAX_RECORDS_PER_MESSAGE}, or one per "
                                          f"{BYTES_PER_RECORD} bytes)")
        data = buf.read(max(size, 0))
        if makers[codec] is not None:
            d = makers[codec]()
            try:
                out = d.decompress(data, max(limit - total, 0) + 1)
            except Exception:  # a damaged stream: left to the checked path
                return
            total += len(out)
            if total > limit:
                raise DecodeError("oversize", f"{codec} blocks inflate to more than {limit} bytes")
            # fastavro reads every bzip2/xz stream written one after another (a deflate
            # block is one stream, and fastavro's own writer leaves a byte after it).
            if codec != "deflate" and d.eof and d.unused_data:
                raise DecodeError("corrupt_avro", f"a {codec} block holds more than one compressed stream")
        if buf.read(16) != sync:
            if end is not None:
                raise trailing()
            return  # the checked path names the damage
        end = buf.tell()


def _stamp(data) -> bytes | None:
    """A cutout's bytes; anything else (a writer schema may declare it a number) is dropped.

    ``bytes(n)`` of an integer would allocate n zero bytes: 8 GB from a 42 kB message.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if data is not None:
        log.debug("cutout of type %s dropped", type(data).__name__)
    return None


def _schemaless(body: bytes, schema) -> dict:
    buf = io.BytesIO(body)
    try:
        rec = fastavro.schemaless_reader(buf, schema, None)
    except (EOFError, StopIteration):  # fastavro's message names its buffer object, not the place
        raise DecodeError("truncated", f"schemaless record: needs more than the {len(body)} bytes "
                                       "given") from None
    except Exception as e:  # UnicodeDecodeError, IndexError, ValueError, MemoryError...
        raise DecodeError("corrupt_avro", f"schemaless record: {type(e).__name__}: {e}") from None
    left = len(body) - buf.tell()
    if left:
        raise DecodeError("trailing_bytes", f"{left} bytes left after the record")
    return rec


def _version_of_id(schema_id: int) -> str:
    return f"{schema_id // 100}.{schema_id % 100}"


def container_version(schema) -> str:
    """A container's schema version as MAJOR.MINOR (one spelling, however the writer put it)."""
    if isinstance(schema, dict):
        for text in (schema.get("version"), schema.get("namespace"), schema.get("name")):
            m = re.search(r"lsst\.v(\d+)_(\d+)", str(text or ""))
            if m:  # a Rubin schema written as "lsst.v9_0" (Fink's containers) is version 9.0
                return f"{m.group(1)}.{m.group(2)}"
        if schema.get("version"):
            return str(schema["version"])
    return ""


# --------------------------------------------------------------------------- helpers


def _ids_of(rec) -> tuple:
    if not isinstance(rec, dict):
        return None, None
    if "candid" in rec:
        return rec.get("candid"), rec.get("objectId")
    src = rec.get("diaSource") or {}
    if isinstance(src, dict):
        obj = src.get("diaObjectId")
        return src.get("diaSourceId"), None if obj is None else str(obj)
    return None, None


def _first(d: dict, *names, default=None):
    for n in names:
        v = d.get(n)
        if v is not None:
            return v
    return default


def _req(d: dict, where: str, *names, ids=(None, None)):
    v = _first(d, *names)
    if v is None:
        raise DecodeError("missing_field", f"{where}.{names[0]} is missing or null", *ids)
    return v


def _f(v) -> float:
    return float("nan") if v is None else float(v)


def _fs(v) -> float:
    """Like ``_f`` but maps ZTF's -999 / -99 "no value" sentinels to NaN."""
    x = _f(v)
    return float("nan") if x <= -99.0 else x


def _ztf_first_detection(cand: dict, jd: float) -> float:
    """``jdstarthist``, or NaN where it contradicts ``jdendhist`` or the alert's own time.

    The damaged run that carries cross-match fill values (see :data:`ZTF_MATCH_RADIUS`)
    also has jdstarthist set to a time after jdendhist, which makes objects with years of
    history look new. A time outside :data:`MJD_RANGE` (0, −1) is no date either: it would
    make any object look years old and halve its priority.
    """
    start, end = _fs(cand.get("jdstarthist")), _fs(cand.get("jdendhist"))
    if start > jd + ZTF_PID_JD_TOLERANCE_D or start > end:  # NaN end compares False
        return float("nan")
    return start if MJD_RANGE[0] < start - JD_MJD < MJD_RANGE[1] else float("nan")


def _real_bogus(v) -> float:
    """A survey real/bogus score: a probability, NaN where missing or outside [0, 1]."""
    x = _f(v)
    return x if 0.0 <= x <= 1.0 else float("nan")


def _fs_within(v, radius: float) -> float:
    """A cross-match distance: NaN for ZTF's sentinels and for fill values beyond the search radius."""
    x = _fs(v)
    return x if x <= radius else float("nan")


def _check_position(ra, dec, ids):
    ra, dec = float(ra), float(dec)
    if not (math.isfinite(ra) and math.isfinite(dec)) or not (0.0 <= ra < 360.0) or abs(dec) > 90.0:
        raise DecodeError("bad_coordinates", f"ra={ra!r} dec={dec!r}", *ids)
    return ra, dec


#: How far past the wall clock an observation time may lie (clock skew, TAI − UTC) before it is
#: refused: one alert dated in the future would become the queue's "now" and age every other alert.
FUTURE_TOLERANCE_D = 1.0


def _mjd_or_nan(v) -> float:
    """An MJD inside :data:`MJD_RANGE`, else NaN (a sentinel such as −999 is no date)."""
    x = _f(v)
    return x if MJD_RANGE[0] < x < MJD_RANGE[1] else float("nan")


def _check_mjd(mjd, ids):
    mjd = float(mjd)
    if not math.isfinite(mjd) or not MJD_RANGE[0] < mjd < MJD_RANGE[1]:
        raise DecodeError("bad_time", f"MJD {mjd!r} outside {MJD_RANGE}", *ids)
    now = time.time() / 86400.0 + 40587.0
    if mjd > now + FUTURE_TOLERANCE_D:
        raise DecodeError("bad_time", f"MJD {mjd!r} is {mjd - now:.1f} d in the future", *ids)
    return mjd


_INT_COLS = ("exposure", "field", "chip")


class _Rows:
    """Accumulates light-curve rows in column blocks, then builds one sorted LightCurve."""

    def __init__(self):
        self.blocks: list[tuple[int, dict]] = []

    def add(self, **kw):
        self.add_block(1, **{k: np.atleast_1d(v) for k, v in kw.items()})

    def add_block(self, n: int, **cols):
        if n:
            self.blocks.append((n, cols))

    def build(self) -> LightCurve:
        # One pre-filled array per column, blocks assigned into their slices: the same values
        # (and casts) as concatenating the blocks, without a temporary per block and column.
        total = sum(n for n, _ in self.blocks)
        arrays = {}
        for name in LightCurve.COLUMNS:
            if name == "band":
                arr = np.full(total, "", dtype="<U2")
            else:  # ints go through float like the survey values do (None → NaN → -1)
                arr = np.full(total, -1.0 if name in _INT_COLS else np.nan)
            lo = 0
            for n, cols in self.blocks:
                v = cols.get(name)
                if v is not None:
                    arr[lo:lo + n] = v
                lo += n
            if name == "kind":
                arr = arr.astype(np.int8)
            elif name in _INT_COLS:
                arr = np.nan_to_num(arr, nan=-1).astype(np.int64)
            arrays[name] = arr
        order = np.argsort(arrays["mjd"], kind="stable")
        return LightCurve(**{k: v[order] for k, v in arrays.items()})


_BAND_ARRAY = np.array(["?", "g", "r", "i"], dtype="<U2")


# ZTF light curves are assembled as one float matrix (a row per LightCurve column, band and
# kind as codes) for a chunk of alerts: one list-of-lists read of every history row and one
# sort, instead of a numpy array per field, block and alert — the histories are most of the
# decoding cost after fastavro itself.
_LC = {name: i for i, name in enumerate(LightCurve.COLUMNS)}
_ZTF_META = ("jd", "fid", "pid", "field", "rcid", "magzpsci", "magzpscirms", "clrcoeff", "diffmaglim", "magnr")
_ZTF_PRV = _ZTF_META + ("magpsf", "sigmapsf", "ra", "dec")
_ZTF_FP = _ZTF_META + ("forcediffimflux", "forcediffimfluxunc", "sciinpseeing", "scibckgnd")


def _ztf_values(rows, keys) -> list:
    """``keys`` of ZTF history records, a tuple per record (None where missing)."""
    try:  # every field present (the schema has them all): one C-level getter per record
        get = operator.itemgetter(*keys)
        return [get(r) for r in rows]
    except KeyError:  # an older schema without some of them
        return [tuple(r.get(k) for k in keys) for r in rows]


class _ZtfRows(NamedTuple):
    """What the batch light-curve pass needs of one ZTF alert, read by :func:`_ztf_prepare`.

    Read right after the record is decoded, while its dicts are still in the CPU's cache.
    """

    flux: float  # the detection's signed flux and error (µJy) and position
    err: float
    ra: float
    dec: float
    values: list  # _ZTF_PRV values of the candidate, then of its earlier rows that have a time
    signs: list  # their isdiffpos
    forced: list  # _ZTF_FP values of its forced photometry
    repair: bool  # an alert of the damaged run (see _history_position)


_INT_ROWS = [_LC[name] for name in _INT_COLS]
_META_ROWS = [_LC[n] for n in ("exposure", "field", "chip", "zp", "zp_rms", "colour_coeff", "limit_mag")]


def _ztf_time(jd: np.ndarray, pid: np.ndarray) -> np.ndarray:
    """``jd``, or the time the ``pid`` encodes where the two disagree by more than a minute."""
    code = np.floor(pid / 100.0)  # exact: pids are < 2⁵³
    nid = np.floor(code / 1e7)
    t = ZTF_NID0_JD + nid + (code - nid * 1e7) / 1e7
    with np.errstate(invalid="ignore"):
        wrong = np.abs(t - jd) > ZTF_PID_JD_TOLERANCE_D  # False where pid is missing (NaN)
    return np.where(wrong & (pid >= 1e11), t, jd)  # only pids with the survey's layout (night id ≥ 100)


def _ztf_block(v: np.ndarray, kind) -> np.ndarray:
    """LightCurve matrix of ZTF rows whose first fields are :data:`_ZTF_META`; flux columns NaN.

    ``kind``: one code for every row, or an array with one per row.
    """
    m = np.full((len(_LC), v.shape[1]), np.nan)
    jd, fid, magnr = v[0], v[1], v[9]
    m[_LC["mjd"]] = _ztf_time(jd, v[2]) - JD_MJD
    m[_LC["band"]] = np.where((fid >= 1) & (fid <= 3), fid, 0)  # code into _BAND_ARRAY
    m[_LC["kind"]] = kind
    m[_META_ROWS] = v[2:9]  # pid, field, rcid, magzpsci, magzpscirms, clrcoeff, diffmaglim
    # (NaN compares False, so no invalid-value warning; non-positive and missing magnr give NaN)
    m[_LC["ref_flux"]] = np.where(magnr > 0, mag_to_ujy(np.where(magnr > 0, magnr, 99.0)), np.nan)
    return m


_NEG = ("f", "0", "false")
_SIGNS = (*_NEG, "t", "1", "true")


def _ztf_history(prv, fps) -> tuple:
    """History rows with a time, and forced-photometry rows (wherever the archive put them)."""
    prv = [p for p in prv or () if p.get("jd") is not None]
    if any("forcediffimflux" in p for p in prv):
        # Some archives (AMPEL's schema 3.5 alerts) carry the forced photometry in
        # prv_candidates: those rows are forced measurements, not upper limits.
        fps = [*(fps or ()), *(p for p in prv if "forcediffimflux" in p)]
        prv = [p for p in prv if "forcediffimflux" not in p]
    return prv, list(fps or ())


def _ztf_lightcurves(items, check: bool = True) -> list:
    """Per ZTF alert of a batch: ``(light curve, detection time (MJD), checked, ra, dec)``.

    ``items``: per alert a :class:`_ZtfRows`. The position of an alert of the damaged run
    (``repair``) is taken from its history where that says it (:func:`_history_position`);
    ``ra``/``dec`` returned are the alert's position after that. Unless two history rows
    share a time and kind (``checked`` False, left to :func:`_sane_history`), the light curve
    has had :func:`_sane_history` at that position (the same element-wise operations, done
    for the whole batch at once).
    ``check=False`` gives the light curves as sent (never checked, positions as given).
    Per alert, rows are stacked detection, earlier detections, limits, forced photometry,
    and a stable sort by MJD keeps that order among equal times. The detection and the
    history share one matrix (the candidate has every history field), so the detection's
    time gets the same jd/pid check as the history's. The row selection, matrix building
    and sort run once over the whole batch (per alert there remain the reading of its
    rows and the copy of its slice); the result is the same as for each alert on its own.
    """
    if not items:
        return []
    vals, signs, fpvals, n_rows, n_fp = [], [], [], [], []
    for it in items:
        vals += it.values
        signs += it.signs
        fpvals += it.forced
        n_rows.append(len(it.values))
        n_fp.append(len(it.forced))
    n_alerts = len(items)
    n_rows = np.asarray(n_rows, dtype=np.int64)
    v = np.array(vals, dtype=float).reshape(len(vals), len(_ZTF_PRV)).T  # (None → NaN)
    first = np.concatenate([[0], np.cumsum(n_rows)[:-1]])
    is_first = np.zeros(len(vals), dtype=bool)
    is_first[first] = True
    pmag, sig, lim = v[10], v[11], v[8]
    # A row with a magnitude is a detection; one that lacks its error or a readable sign cannot be
    # used, and is dropped rather than read as an upper limit or given a guessed sign.
    measured = ~is_first & np.isfinite(pmag)
    sound = np.zeros(len(vals), dtype=bool)
    rows = np.flatnonzero(measured & np.isfinite(sig))
    sound[rows] = [str(signs[i]).strip().lower() in _SIGNS for i in rows.tolist()]
    det = measured & sound
    lim_ok = ~is_first & ~measured & (lim > 0)
    keep = is_first | det | lim_ok
    kind = np.where(is_first, DETECTION, np.where(det, PREVIOUS, NONDETECTION))
    m = _ztf_block(v[:, keep], kind[keep])
    k_first, k_det, k_lim = is_first[keep], det[keep], lim_ok[keep]
    f = mag_to_ujy(pmag[det])
    neg = np.array([str(signs[i]).strip().lower() in _NEG for i in np.flatnonzero(det).tolist()], dtype=bool)
    m[_LC["flux"], k_det], m[_LC["flux_err"], k_det] = np.where(neg, -f, f), f * sig[det] * math.log(10) / 2.5
    m[_LC["ra"], k_det], m[_LC["dec"], k_det] = v[12, det], v[13, det]
    m[_LC["flux_err"], k_lim] = mag_to_ujy(lim[lim_ok]) / 5.0
    det_mjd = m[_LC["mjd"], k_first].copy()
    for j, name in ((0, "flux"), (1, "flux_err"), (2, "ra"), (3, "dec")):
        m[_LC[name], k_first] = [it[j] for it in items]
    alert = np.repeat(np.arange(n_alerts), n_rows)[keep]
    group = np.where(k_first, 0, np.where(k_det, 1, 2))
    blocks, alerts, groups = [m], [alert], [group]
    if fpvals:
        v = np.array(fpvals, dtype=float).reshape(len(fpvals), len(_ZTF_FP)).T
        jd, zp, fl, fe = v[0], v[5], v[10], v[11]
        # The survey's own "no measurement" marker is forcediffimflux = -99999 (procstatus != 0).
        with np.errstate(invalid="ignore"):
            good = np.isfinite(fl) & np.isfinite(fe) & np.isfinite(zp) & np.isfinite(jd) & (fl > ZTF_FP_BAD) & (fe > 0)
        if good.any():
            b = _ztf_block(v[:, good], FORCED)
            with np.errstate(over="ignore"):  # an absurd zero point: dropped in _sane_history
                scale = np.power(10.0, -0.4 * (zp[good] - 23.9))  # DN → µJy
            b[_LC["flux"]], b[_LC["flux_err"]] = fl[good] * scale, fe[good] * scale
            b[_LC["seeing"]], b[_LC["background"]] = v[12, good], v[13, good]
            blocks.append(b)
            alerts.append(np.repeat(np.arange(n_alerts), n_fp)[good])
            groups.append(np.full(int(good.sum()), 3))
    m = np.concatenate(blocks, axis=1) if len(blocks) > 1 else m
    alert = np.concatenate(alerts)
    # Per alert, a stable sort by time of the stacked blocks (blocks, then position, break ties).
    order = np.lexsort((np.arange(len(alert)), np.concatenate(groups), m[_LC["mjd"]], alert))
    m, alert = m[:, order], alert[order]
    ra0 = np.array([it.ra for it in items], dtype=float)
    dec0 = np.array([it.dec for it in items], dtype=float)
    repair = [k for k, it in enumerate(items) if it.repair] if check else []
    if repair:  # the damaged run: the position from the history, the alert's own measurement unknown
        lo = np.searchsorted(alert, repair)
        hi = np.searchsorted(alert, repair, side="right")
        for k, a, b in zip(repair, lo.tolist(), hi.tolist(), strict=True):
            pos = _history_position(m[_LC["kind"], a:b], m[_LC["ra"], a:b], m[_LC["dec"], a:b], ra0[k], dec0[k])
            if pos is not None:
                ra0[k], dec0[k] = pos
                own = a + np.flatnonzero(m[_LC["kind"], a:b] == DETECTION)
                m[_LC["ra"], own] = m[_LC["dec"], own] = np.nan
    if check:
        m, alert, checked = _check_histories(m, alert, det_mjd, ra0, dec0)
    else:
        checked = np.zeros(n_alerts, dtype=bool)
    band = _BAND_ARRAY[m[_LC["band"]].astype(np.int64)]
    kinds = m[_LC["kind"]].astype(np.int8)
    ints = m[_INT_ROWS]
    ints = np.where(np.isnan(ints), -1.0, ints).astype(np.int64)
    bounds = np.concatenate([[0], np.cumsum(np.bincount(alert, minlength=n_alerts))]).tolist()
    out = []
    for k in range(n_alerts):
        lo, hi = bounds[k], bounds[k + 1]
        sub = m[:, lo:hi].copy()  # each light curve owns its memory, not a view of the batch
        cols = {name: sub[i] for name, i in _LC.items()}
        cols["band"], cols["kind"] = band[lo:hi].copy(), kinds[lo:hi].copy()
        sub_int = ints[:, lo:hi].copy()
        for name, col in zip(_INT_COLS, sub_int, strict=True):
            cols[name] = col
        out.append((LightCurve(**cols), float(det_mjd[k]), bool(checked[k]), float(ra0[k]), float(dec0[k])))
    return out


def _check_histories(m: np.ndarray, alert: np.ndarray, det_mjd: np.ndarray, ra0: np.ndarray,
                     dec0: np.ndarray) -> tuple:
    """:func:`_sane_history` on a batch matrix at once: ``(m, alert, checked)`` after it.

    ``m`` holds a LightCurve row per column (sorted by alert, then time) and ``alert`` each
    column's alert; ``det_mjd``, ``ra0``, ``dec0`` are per alert. The rows
    :func:`_sane_history` would drop are dropped and the positions it would blank are
    blanked, with the same element-wise operations (so bit for bit the same), for the alerts
    whose history holds no two rows of one time and kind; ``checked`` says which those were.
    The others (repeats, to resolve by distance) are left for :func:`_sane_history`.
    """
    checked = np.ones(len(det_mjd), dtype=bool)
    mjd, kind = m[_LC["mjd"]], m[_LC["kind"]]
    same = np.flatnonzero((mjd[1:] == mjd[:-1]) & (alert[1:] == alert[:-1]))
    if len(same):
        checked[alert[same[_same_kind(kind[same], kind[same + 1])]]] = False
    if not checked.any():
        return m, alert, checked
    on = checked[alert]
    ra, dec = m[_LC["ra"]], m[_LC["dec"]]
    ok = _sound_rows(kind, mjd, m[_LC["flux_err"]], m[_LC["flux"]],
                     np.minimum(MJD_RANGE[1], det_mjd + HISTORY_AFTER_ALERT_D)[alert])
    cos0 = np.array([math.cos(math.radians(d)) for d in dec0.tolist()])  # math.cos, as _sane_history
    blank = on & ok & (ra == ra) & _far_positions(ra, dec, ra0[alert], dec0[alert], cos0[alert])
    m[_LC["ra"], blank] = m[_LC["dec"], blank] = np.nan
    keep = ~on | ok
    if not keep.all():
        m, alert = m[:, keep], alert[keep]
    return m, alert, checked


def _mag_flux(mag, magerr, isdiffpos):
    """Signed µJy flux and 1σ error from a calibrated PSF magnitude."""
    sign = -1.0 if str(isdiffpos).strip().lower() in _NEG else 1.0
    flux = float(mag_to_ujy(mag))
    return sign * flux, flux * float(magerr) * math.log(10) / 2.5


# --------------------------------------------------------------------------- ZTF


def _ztf_alert(rec: dict, keep_cutouts: bool) -> Alert:
    prep = _ztf_prepare(rec)
    return _ztf_finish(rec, prep, _ztf_lightcurves([prep[-1]])[0], keep_cutouts)


def _ztf_row_times(rows) -> list:
    """ZTF rows' JDs, taken from their ``pid`` where the two disagree (as the light curve does)."""
    jd = np.array([_f(r.get("jd")) for r in rows], dtype=float)
    pid = np.array([_f(r.get("pid")) for r in rows], dtype=float)
    return _ztf_time(jd, pid).tolist()


#: Fields of a ZTF alert that belong to its image stamps (not carried by re-created epochs).
_ZTF_CUTOUTS = ("cutoutScience", "cutoutTemplate", "cutoutDifference")


def ztf_history_records(rec: dict) -> list:
    """A ZTF alert record as it stood at each earlier detection of its history, then itself.

    A re-creation for within-object studies across the exposures of an object's history
    (e.g. score against seeing), not what the survey sent:

    * the candidate takes every field the history row has (time, position, photometry, PSF
      width, ``rb``, image calibration, reference-source and solar-system matches) and
      keeps the rest from the alert (PS1 and Gaia cross-matches, which do not change);
    * ``ndethist`` (detections on the alert's field and readout channel) loses the later
      detections there, and is unknown for an epoch on another field or channel;
      ``ncovhist`` loses the later exposures; ``jdendhist`` becomes the epoch's time;
    * the light curve holds the rows before the epoch: earlier detections and limits, and
      forced photometry of earlier images (as a real alert has). It reaches back only as
      far as the alert's own history (30 days before the *alert*);
    * no image stamps, and no ``drb``: history rows carry none, so every record returned,
      the alert's own included, scores with ``rb``.

    One epoch per exposure (a second detection in the same exposure is dropped).

    Parameters
    ----------
    rec : dict
        A decoded ZTF alert record (``candidate``, ``prv_candidates``, ``fp_hists``).

    Returns
    -------
    list of dict
        Records in time order, the alert's own last. A record without a candidate comes
        back alone, as it is (the decoder then says what is wrong with it).
    """
    cand = rec.get("candidate")
    if not isinstance(cand, dict):
        return [rec]
    prv, fps = _ztf_history(rec.get("prv_candidates"), rec.get("fp_hists"))
    t_alert, *times = _ztf_row_times([cand, *prv])
    fp_times = _ztf_row_times(fps)
    home = (cand.get("field"), cand.get("rcid"))
    dets, pids = [], {cand.get("pid")}
    for t, i in sorted((t, i) for i, (q, t) in enumerate(zip(prv, times, strict=True))
                       if q.get("candid") is not None and q.get("magpsf") is not None and t < t_alert):
        if prv[i].get("pid") not in pids:
            pids.add(prv[i].get("pid"))
            dets.append((t, i))
    covered = {}  # exposure → time, for the coverage count
    for q, tq in zip(prv, times, strict=True):
        if q.get("pid") is not None and tq < t_alert:
            covered[q.get("pid")] = tq
    start, end = _fs(cand.get("jdstarthist")), _fs(cand.get("jdendhist"))
    bare = {**rec, **{k: None for k in _ZTF_CUTOUTS if k in rec}}
    out = []
    for t, i in dets:
        row = prv[i]
        c = {**cand, **row, "drb": None, "drbversion": None}
        if cand.get("ndethist") is not None and (row.get("field"), row.get("rcid")) == home:
            later_home = 1 + sum(tq > t and (prv[j].get("field"), prv[j].get("rcid")) == home for tq, j in dets)
            c["ndethist"] = max(1, int(cand["ndethist"]) - later_home)
        else:
            c["ndethist"] = None
        if cand.get("ncovhist") is not None:
            c["ncovhist"] = max(1, int(cand["ncovhist"]) - 1 - sum(tq > t for tq in covered.values()))
        if start <= end:  # a damaged pair (start after end) stays as it is: the decoder reads it as unknown
            c["jdendhist"] = t
        out.append({**bare, "candid": row["candid"], "candidate": c,
                    "prv_candidates": [q for q, tq in zip(prv, times, strict=True) if tq < t],
                    "fp_hists": [q for q, tq in zip(fps, fp_times, strict=True) if tq < t]})
    out.append({**rec, "candidate": {**cand, "drb": None, "drbversion": None}})
    return out


def _ztf_prepare(rec: dict) -> tuple:
    """Checks of a ZTF record before its light curve; returns what :func:`_ztf_finish` needs.

    The last element is the light-curve input of :func:`_ztf_lightcurves`.
    """
    ids = (rec.get("candid"), rec.get("objectId"))
    cand = rec.get("candidate")
    if not isinstance(cand, dict):
        raise DecodeError("missing_field", "candidate is missing or null", *ids)
    object_id = _object_id(_req(rec, "alert", "objectId", ids=ids), ids)
    alert_id = _alert_id(_req(rec, "alert", "candid", ids=ids), "candid", ids)
    ids = (alert_id, object_id)
    ra, dec = _check_position(_req(cand, "candidate", "ra", ids=ids), _req(cand, "candidate", "dec", ids=ids), ids)
    fid = int(_req(cand, "candidate", "fid", ids=ids))
    pid = int(_req(cand, "candidate", "pid", ids=ids))
    # A non-finite or absurd jd is malformed; only a plausible one is repaired (from the pid,
    # in _ztf_lightcurves).
    _check_mjd(float(_req(cand, "candidate", "jd", ids=ids)) - JD_MJD, ids)
    mag = float(_req(cand, "candidate", "magpsf", ids=ids))
    magerr = float(_req(cand, "candidate", "sigmapsf", ids=ids))
    isdiffpos = _req(cand, "candidate", "isdiffpos", ids=ids)
    if str(isdiffpos).strip().lower() not in _SIGNS:  # the flux's sign rests on it: no guessing
        raise DecodeError("bad_value", f"isdiffpos={isdiffpos!r} (t/f/1/0)", *ids)
    if not (MAG_RANGE[0] < mag < MAG_RANGE[1] and MIN_MAG_ERR <= magerr < 10):  # NaN fails too
        raise DecodeError("bad_value", f"magpsf={mag} sigmapsf={magerr}", *ids)

    flux, err = _mag_flux(mag, magerr, isdiffpos)
    _check_history_sizes(rec, ("prv_candidates", "fp_hists"), ids)
    damaged = any(_fs(cand.get(k)) > r for k, r in ZTF_MATCH_RADIUS.items())  # the damaged run's signature
    prv, fps = _ztf_history(rec.get("prv_candidates"), rec.get("fp_hists"))
    rows = [cand, *prv]
    return ids, cand, fid, pid, mag, magerr, flux, _ZtfRows(
        flux, err, ra, dec, _ztf_values(rows, _ZTF_PRV), [r.get("isdiffpos") for r in rows],
        _ztf_values(fps, _ZTF_FP), damaged)


#: Earlier detections of one object agree on its position to within this (arcsec) before they
#: may stand in for a damaged alert position.
HISTORY_POSITION_AGREEMENT_ARCSEC = 5.0


def _offsets_arcsec(ra, dec, ra0: float, dec0: float) -> np.ndarray:
    dra = (np.asarray(ra) - ra0 + 180.0) % 360.0 - 180.0
    return 3600.0 * np.hypot(dra * math.cos(math.radians(dec0)), np.asarray(dec) - dec0)


def _history_position(kind: np.ndarray, ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float):
    """The position of an alert of the damaged run from its earlier detections, or None.

    In the Fink 2023 export the 329 alerts of the run with cross-match fill values (see
    :data:`ZTF_MATCH_RADIUS`) also carry one of six made-up positions ((3.38, 52.69), (4.38,
    53.69), …, each shared by up to 95 objects of different fields), while their earlier
    detections sit where the object is, agreeing to ~0.1″. ``kind``, ``ra``, ``dec``: the
    light curve's rows, in time order; ``ra0``, ``dec0``: the alert's position. Where those
    detections agree (within :data:`HISTORY_POSITION_AGREEMENT_ARCSEC`) and lie beyond
    :data:`MAX_HISTORY_OFFSET_ARCSEC` of the alert's position, their median is the alert's
    position (and its own measured position is then unknown); otherwise None (97 alerts of
    that run have no earlier detection: their made-up position stays).
    """
    prev = (kind == PREVIOUS) & (ra >= 0) & (ra < 360) & (np.abs(dec) <= 90)
    if not prev.any():
        return None
    r0 = float(ra[prev][0])
    r = float((r0 + median((ra[prev] - r0 + 180.0) % 360.0 - 180.0)) % 360.0)
    d = median(dec[prev])
    if (_offsets_arcsec(ra[prev], dec[prev], r, d).max() > HISTORY_POSITION_AGREEMENT_ARCSEC
            or _offsets_arcsec(ra0, dec0, r, d) <= MAX_HISTORY_OFFSET_ARCSEC):
        return None
    return r, d


def _ztf_finish(rec: dict, prep: tuple, lc: tuple, keep_cutouts: bool) -> Alert:
    """The ``Alert`` of a prepared ZTF record, given what :func:`_ztf_lightcurves` made of it."""
    ids, cand, fid, pid, mag, magerr, flux, _ = prep
    alert_id, object_id = ids
    lightcurve, mjd, checked, ra, dec = lc
    mjd = _check_mjd(mjd, ids)
    jd = mjd + JD_MJD

    # drb where it is a probability, else rb (a NaN drb must not hide a valid rb).
    drb = cand.get("drb") if math.isfinite(_real_bogus(cand.get("drb"))) else None
    ps1_d, gaia_d, ss_d = (_fs_within(cand.get(k), r) for k, r in ZTF_MATCH_RADIUS.items())
    ctx = Context(
        real_bogus=_real_bogus(drb if drb is not None else cand.get("rb")),
        real_bogus_version=str((cand.get("drbversion") if drb is not None else cand.get("rbversion")) or ""),
        # The PS1 star/galaxy score belongs to the match at distpsnr1: unknown with it.
        star_galaxy=_fs(cand.get("sgscore1")) if math.isfinite(ps1_d) else np.nan,
        ps1_distance=ps1_d,
        ps1_mag_r=_fs(cand.get("srmag1")),
        gaia_distance=gaia_d,
        gaia_mag=_fs(cand.get("maggaia")),
        ref_mag=_fs(cand.get("magnr")),
        ref_distance=_fs(cand.get("distnr")),
        ss_distance=ss_d,
        ss_mag=_fs(cand.get("ssmagnr")),
        n_det_history=int(_first(cand, "ndethist", default=-1)),
        n_cover_history=int(_first(cand, "ncovhist", default=-1)),
        first_det_mjd=_ztf_first_detection(cand, jd) - JD_MJD,
        fwhm=_fs(cand.get("fwhm")),
        elongation=_fs(cand.get("elong")),
        n_bad_pixels=_fs(cand.get("nbad")),
        n_negative_pixels=_fs(cand.get("nneg")),
        snr=1.0857 / magerr if magerr > 0 else np.nan,
        zp=_fs(cand.get("magzpsci")),
        zp_rms=_fs(cand.get("magzpscirms")),
        colour_coeff=_fs(cand.get("clrcoeff")),
        limit_mag=_fs(cand.get("diffmaglim")),
        exptime=_fs(cand.get("exptime")),
        mag=mag if flux > 0 else np.nan,
        mag_err=magerr,
        program=int(_first(cand, "programid", default=-1)),
    )
    cutouts = {}
    if keep_cutouts:
        for key, name in (("cutoutScience", "science"), ("cutoutTemplate", "template"),
                          ("cutoutDifference", "difference")):
            c = rec.get(key)
            data = _stamp(c.get("stampData") if isinstance(c, dict) else c)
            if data:
                cutouts[name] = data
    return Alert(
        survey="ztf", schema_version=str(rec.get("schemavsn") or ""), alert_id=alert_id,
        object_id=str(object_id), ra=ra, dec=dec, mjd=mjd, time_scale="utc",
        band=ZTF_BANDS.get(fid, "?"), exposure=pid, field=int(_first(cand, "field", default=-1)),
        chip=int(_first(cand, "rcid", default=-1)),
        lightcurve=lightcurve if checked else _sane_history(lightcurve, mjd, ra, dec), context=ctx,
        cutouts=cutouts,
    )


# --------------------------------------------------------------------------- Rubin

NJY_TO_UJY = 1e-3


INT64_MAX = 2**63 - 1


#: History rows dated later than the alert by more than this (days) cannot be history.
HISTORY_AFTER_ALERT_D = 0.5
#: Fluxes beyond this (µJy, about magnitude −14.6) are not measurements.
MAX_ABS_FLUX_UJY = 1e9


#: A history detection measured farther than this from the alert (arcsec) is not of this
#: object (ZTF associates within 1.5″; the fastest proper motion, Barnard's star at 10″ a year,
#: stays inside over a ZTF 30-day or a Rubin one-year history).
MAX_HISTORY_OFFSET_ARCSEC = 60.0


def _sane_history(lc: LightCurve, alert_mjd: float, ra: float, dec: float) -> LightCurve:
    """The light curve without history rows that cannot be measurements.

    Dropped: a time that is unknown, outside :data:`MJD_RANGE` or after the alert (by more
    than :data:`HISTORY_AFTER_ALERT_D`); an uncertainty that is infinite, zero or negative; a
    flux beyond :data:`MAX_ABS_FLUX_UJY`; a repeat of a row of the same kind, time, band and
    exposure (a detection repeating the alert's own, a history listed twice), which would
    count as more detections. Other unknown values (NaN) stay unknown: such rows still count in the
    history. A position outside the sky or beyond :data:`MAX_HISTORY_OFFSET_ARCSEC` from the
    alert becomes unknown (NaN), the row kept. The alert's own detection is checked on its
    own and always kept. A damaged row of a long history should not cost the alert, nor
    reach HSR and the features as an infinite or negative-error point.
    """
    ok = _sound_rows(lc.kind, lc.mjd, lc.flux_err, lc.flux, min(MJD_RANGE[1], alert_mjd + HISTORY_AFTER_ALERT_D))
    # Sorted by time, and at one time by kind in input order: repeats are neighbours.
    same_time = np.flatnonzero(lc.mjd[1:] == lc.mjd[:-1])
    if len(same_time):
        repeats = same_time[_same_kind(lc.kind[same_time], lc.kind[same_time + 1])]
        if len(repeats):
            ok &= ~_repeated_rows(lc, np.union1d(repeats, repeats + 1), ok, ra, dec)
    lc = lc if ok.all() else LightCurve(**{c: getattr(lc, c)[ok] for c in LightCurve.COLUMNS})
    at = np.flatnonzero(lc.ra == lc.ra)  # (only detections have a position)
    if not len(at):
        return lc
    bad = _far_positions(lc.ra[at], lc.dec[at], ra, dec, math.cos(math.radians(dec)))
    if not bad.any():
        return lc
    ra_, dec_ = lc.ra.copy(), lc.dec.copy()
    ra_[at[bad]] = dec_[at[bad]] = np.nan
    return replace(lc, ra=ra_, dec=dec_)


def _sound_rows(kind, mjd, err, flux, latest) -> np.ndarray:
    """Rows :func:`_sane_history` keeps (``latest``: the last time history may have, per row or one).

    The alert's own detection always; others with a time in :data:`MJD_RANGE` up to
    ``latest``, an uncertainty neither ≤ 0 nor infinite, and a flux within
    :data:`MAX_ABS_FLUX_UJY` (comparisons with NaN are False: an unknown error or flux is kept).
    """
    with np.errstate(invalid="ignore"):
        return ((kind == DETECTION)
                | ((mjd > MJD_RANGE[0]) & (mjd < latest) & ~((err <= 0) | (err == np.inf))
                   & ~(np.abs(flux) > MAX_ABS_FLUX_UJY)))


def _same_kind(k0, k1) -> np.ndarray:
    """Whether rows of one time are of one kind (a detection counts as an earlier one: an earlier
    detection in the alert's exposure repeats it; a detection and its forced photometry do not)."""
    return np.where(k0 == DETECTION, PREVIOUS, k0) == np.where(k1 == DETECTION, PREVIOUS, k1)


def _far_positions(ra, dec, ra0, dec0, cos0) -> np.ndarray:
    """Positions to blank: off the sky, outside a box of ±:data:`MAX_HISTORY_OFFSET_ARCSEC` around
    the alert's (``ra0``, ``dec0``; ``cos0`` its cos(dec)), or half of one (a NaN dec). (A box, not
    a circle: a few cheap operations, as this runs for every alert; no modulo, which would warn on
    an infinite ra: inf fails the test.)"""
    lim = MAX_HISTORY_OFFSET_ARCSEC / 3600.0
    dra = np.abs(ra - ra0)
    near = (np.abs(dec - dec0) <= lim) & (np.abs(np.minimum(dra, 360.0 - dra)) * cos0 <= lim)
    return ~near | (ra < 0) | (ra > 360)


def _repeated_rows(lc: LightCurve, rows: np.ndarray, ok: np.ndarray, ra: float, dec: float) -> np.ndarray:
    """Mask of the rows (among ``rows``, which share a time with a neighbour) that repeat a row of
    the same kind, time, band and exposure. The alert's own detection is never one (an earlier
    detection in its exposure repeats it); of the others, the one measured nearest the alert is
    kept (ZTF lists two detections of one exposure for some objects, 0.04–0.9″ apart); rows
    already dropped (``ok`` False) neither count nor win."""
    out = np.zeros(len(lc), dtype=bool)
    seen = set()
    off = _offsets_arcsec(lc.ra[rows], lc.dec[rows], ra, dec)
    near = dict(zip(rows.tolist(), np.nan_to_num(off, nan=np.inf).tolist(), strict=True))
    for i in sorted(rows.tolist(), key=lambda i: (lc.kind[i] != DETECTION, near[i])):
        if not ok[i]:
            continue
        kind = PREVIOUS if lc.kind[i] == DETECTION else int(lc.kind[i])
        key = (kind, float(lc.mjd[i]), str(lc.band[i]), int(lc.exposure[i]))
        out[i] = key in seen
        seen.add(key)
    return out


#: Most rows one history list of an alert may hold. Real ones hold hundreds (ZTF: 30 days;
#: Rubin: a year); a 15 MB message of 200,000 empty rows cost ~460 MB to decode.
MAX_HISTORY_ROWS = 20_000


def _check_history_sizes(rec: dict, keys, ids) -> None:
    for k in keys:
        v = rec.get(k)
        if isinstance(v, (list, tuple)) and len(v) > MAX_HISTORY_ROWS:
            raise DecodeError("bad_value", f"{k} holds {len(v)} rows (> {MAX_HISTORY_ROWS})", *ids)


#: Plausible PSF magnitudes of a detection (AB); beyond them a flux overflows or means nothing.
MAG_RANGE = (-2.0, 40.0)
#: Smallest believable magnitude error (S/N 10^5); 1e-39 would make an S/N beyond float32.
MIN_MAG_ERR = 1e-5
#: Longest object id accepted (ZTF's are 12 characters, Rubin's 19 digits).
MAX_OBJECT_ID_CHARS = 64


def _alert_id(v, name: str, ids) -> int:
    """An alert id: an integer (not a bool or a float) that fits the annotation's 64-bit long, ≥ 1."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= int(v) <= INT64_MAX:
        raise DecodeError("bad_value", f"{name}={v!r}: not a positive 64-bit integer", *ids)
    return int(v)


def _object_id(v, ids) -> str:
    """An object id: text or an integer, never empty (alerts of one object group under it).

    Printable and at most :data:`MAX_OBJECT_ID_CHARS` long: ids are shown in terminals and
    pages, where a control character could rewrite the screen.
    """
    if isinstance(v, bool) or not isinstance(v, (str, int, np.integer)) or not str(v).strip():
        raise DecodeError("bad_value", f"object id {v!r}: empty or not text/an integer", *ids)
    s = str(v)
    # The rejection names the alert only: the id itself is what is unfit to show.
    if len(s) > MAX_OBJECT_ID_CHARS:
        raise DecodeError("bad_value", f"object id of {len(s)} characters (> {MAX_OBJECT_ID_CHARS})", ids[0])
    if not s.isprintable():
        raise DecodeError("bad_value", f"object id {s!r}: not printable", ids[0])
    # The queue page addresses an object by its id in the URL path, where a browser resolves "." and
    # ".." segments: such an object's page could never be opened (no survey's ids have them).
    if any(seg in (".", "..") for seg in s.replace("\\", "/").split("/")):
        raise DecodeError("bad_value", f"object id {s!r}: a '.' or '..' path segment", *ids)
    return s


def _rubin_exposure(s: dict, ids=(None, None), strict: bool = True):
    """(exposure key, visit, detector); −1s where unknown. A key out of range rejects the alert
    (``strict``: its own detection) or leaves a history row's exposure unknown (not the alert)."""
    visit, det = s.get("visit"), s.get("detector")
    if visit is not None and det is not None:
        key = int(visit) * 1000 + int(det)
        if not (0 <= int(det) < 1000 and abs(key) <= INT64_MAX):
            # the key must stay a 64-bit integer: it is a long in the annotation schema
            if not strict:
                return -1, -1, -1
            raise DecodeError("bad_value", f"visit={visit} detector={det}: exposure key out of range",
                              *ids)
        return key, int(visit), int(det)
    ccd = s.get("ccdVisitId")
    if ccd is not None:
        return int(ccd), -1, -1
    return -1, -1, -1


def _rubin_time(s: dict, ids=(None, None)) -> float:
    """MJD (TAI) of a Rubin source.

    Schemas up to v4 call it ``midPointTai`` without fixing the unit, and the
    sample alerts of v3–v6 carry Unix seconds even where the name says MJD; a value
    above 1e7 cannot be an MJD (year ~29000), so it is read as Unix seconds.
    """
    t = float(_req(s, "diaSource", "midpointMjdTai", "midPointTai", ids=ids))
    return t / 86400.0 + 40587.0 if t > 1e7 else t


#: Gaussian FWHM / σ.
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: Rubin pixel flags at the source's centre that mark a defect (the analogue of ZTF's nbad).
_RUBIN_CENTRE_FLAGS = ("pixelFlags_bad", "pixelFlags_crCenter", "pixelFlags_saturatedCenter",
                       "pixelFlags_suspectCenter", "pixelFlags_interpolatedCenter", "pixelFlags_nodataCenter")


def _psf_fwhm_px(s: dict) -> float:
    """FWHM (Rubin pixels) of the PSF model at a source, from its second moments (arcsec², as Rubin gives them).

    The PSF model only: the source's own adaptive moments on the difference image
    are no stand-in for ZTF's ``fwhm``/``elongation``: on the Fink sample's sources with
    reliability > 0.6 their elongation has a median of 1.9, and a model trained on ZTF reads
    that as an artefact; Rubin alerts therefore carry neither.
    """
    m = 0.5 * (_f(s.get("ixxPSF")) + _f(s.get("iyyPSF")))
    return FWHM_PER_SIGMA * math.sqrt(m) / PIXEL_SCALE["rubin"] if m > 0 else float("nan")


def rubin_object_id(rec: dict, alert_id=None) -> str:
    """The object a Rubin alert belongs to: its ``diaObjectId``, else ``ss<ssObjectId>``.

    Raises
    ------
    DecodeError
        When the alert names neither (or an id unfit to show).
    """
    src = rec.get("diaSource") if isinstance(rec.get("diaSource"), dict) else {}
    obj = src.get("diaObjectId")
    if obj in (None, 0) and isinstance(rec.get("diaObject"), dict):
        obj = rec["diaObject"].get("diaObjectId")  # early schemas fill only the object record
    if obj in (None, 0):
        ss = src.get("ssObjectId")
        if ss in (None, 0):
            raise DecodeError("missing_field", "diaSource.diaObjectId and ssObjectId are both null", alert_id)
        return f"ss{ss}"
    return _object_id(obj, (alert_id, None))


def _rubin_alert(rec: dict, version: str, keep_cutouts: bool) -> Alert:
    src = rec.get("diaSource")
    if not isinstance(src, dict):
        raise DecodeError("missing_field", "diaSource is missing or null")
    alert_id = _alert_id(_req(src, "diaSource", "diaSourceId"), "diaSourceId", (None, None))
    object_id = rubin_object_id(rec, alert_id)
    ids = (alert_id, object_id)
    ra, dec = _check_position(_req(src, "diaSource", "ra", ids=ids), _req(src, "diaSource", "dec", "decl", ids=ids),
                              ids)
    mjd = _check_mjd(_rubin_time(src, ids), ids)
    flux = float(_req(src, "diaSource", "psfFlux", "psFlux", ids=ids)) * NJY_TO_UJY
    ferr = _f(_first(src, "psfFluxErr", "psFluxErr")) * NJY_TO_UJY
    if not (math.isfinite(flux) and abs(flux) < 1e9) or ferr <= 0 or ferr == math.inf:  # a missing error is NaN
        raise DecodeError("bad_value", f"psfFlux={flux} psfFluxErr={ferr} µJy", *ids)
    band = str(_first(src, "band", "filterName", default="?"))
    exposure, visit, det = _rubin_exposure(src, ids)

    rows = _Rows()

    def add_source(s, kind):
        e, v, d = _rubin_exposure(s, ids, strict=kind == DETECTION)
        fl = _first(s, "psfFlux", "psFlux")
        # (A record Rubin has withdrawn, marked invalid from schema 9 on, is no measurement.)
        if fl is None or _first(s, "midpointMjdTai", "midPointTai") is None or \
                (kind != DETECTION and s.get("timeWithdrawnMjdTai") is not None):
            return
        t = _rubin_time(s)
        # The PSF model's width at the source is image-level seeing (fitted to the image's stars,
        # not to the target): the analogue of ZTF's forced-photometry seeing.
        rows.add(mjd=float(t), band=str(_first(s, "band", "filterName", default="?")), flux=float(fl) * NJY_TO_UJY,
                 flux_err=_f(_first(s, "psfFluxErr", "psFluxErr")) * NJY_TO_UJY, kind=kind, exposure=e, field=v,
                 chip=d, ra=_f(s.get("ra")) if kind != FORCED else np.nan,
                 dec=_f(_first(s, "dec", "decl")) if kind != FORCED else np.nan,
                 seeing=_psf_fwhm_px(s) if kind != FORCED else np.nan)

    add_source(src, DETECTION)
    _check_history_sizes(rec, ("prvDiaSources", "prvDiaForcedSources", "prvDiaNondetectionLimits"), ids)
    for s in rec.get("prvDiaSources") or ():
        add_source(s, PREVIOUS)
    for s in rec.get("prvDiaForcedSources") or ():
        add_source(s, FORCED)
    for s in rec.get("prvDiaNondetectionLimits") or ():
        noise = s.get("diaNoise")
        if _first(s, "midpointMjdTai", "midPointTai") is None or noise is None:
            continue
        t = _rubin_time(s)
        e, _, _ = _rubin_exposure(s, ids, strict=False)
        rows.add(mjd=float(t), band=str(_first(s, "band", "filterName", default="?")), flux=np.nan,
                 flux_err=float(noise) * NJY_TO_UJY, kind=NONDETECTION, exposure=e)

    dobj = rec.get("diaObject") or {}
    ctx = Context(
        real_bogus=_real_bogus(_first(src, "reliability")),
        real_bogus_version="reliability" if math.isfinite(_real_bogus(src.get("reliability"))) else "",
        # (Schemas up to v7 name the nearest Rubin data-release Object, ``nearbyObj1Dist``: a deeper
        # catalogue than PS1, whose distances the models learnt; Rubin alerts carry no PS1 match.)
        ps1_distance=np.nan,
        extendedness=_f(src.get("extendedness")),
        n_bad_pixels=float(sum(bool(src.get(k)) for k in _RUBIN_CENTRE_FLAGS))
        if any(k in src for k in _RUBIN_CENTRE_FLAGS) else np.nan,
        # The PSF flux's S/N, as ZTF's 1.0857/sigmapsf is: Rubin's own ``snr`` is the detection's
        # significance, which differs for dipoles (an HSC dipole: 5.4 against 0.0015).
        snr=abs(flux) / ferr if ferr > 0 else np.nan,
        n_det_history=int(_first(dobj, "nDiaSources", default=-1)),
        first_det_mjd=_mjd_or_nan(_first(dobj, "firstDiaSourceMjdTai")),
        mag=float(23.9 - 2.5 * math.log10(flux)) if flux > 0 else np.nan,
        mag_err=1.0857 * ferr / abs(flux) if flux else np.nan,
        # Rubin associates a source with a known solar-system object outright: distance 0.
        ss_distance=0.0 if src.get("ssObjectId") not in (None, 0) else np.nan,
    )
    cutouts = {}
    if keep_cutouts:
        for key, name in (("cutoutScience", "science"), ("cutoutTemplate", "template"),
                          ("cutoutDifference", "difference")):
            data = _stamp(rec.get(key))
            if data:
                cutouts[name] = data
    return Alert(
        survey="rubin", schema_version=version or container_version({"version": rec.get("lsst_schema_version")}),
        alert_id=alert_id,
        object_id=object_id, ra=ra, dec=dec, mjd=mjd, time_scale="tai", band=band, exposure=exposure, field=visit,
        chip=det, lightcurve=_sane_history(rows.build(), mjd, ra, dec), context=ctx, cutouts=cutouts,
    )

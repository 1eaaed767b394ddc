"""Vigil's own output record and its versioned Avro schema.

Every output path (JSONL/Parquet files, the Kafka annotation topic, the eyeball
queue) writes :meth:`Annotation.to_record`, which validates against
``schemas/vigil.annotation.v1.avsc``.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import fastavro

from stream.alert import tai_minus_utc_s

log = logging.getLogger(__name__)

ANNOTATION_SCHEMA_VERSION = "1.2"
_SCHEMA_FILE = "vigil.annotation.v1.avsc"
MJD_UNIX_EPOCH = 40587.0


@lru_cache(maxsize=1)
def code_version() -> str:
    """Installed Vigil version and a digest of its code: ``"0.1.0+c<8 hex>"`` (``"dev"`` uninstalled).

    The version number alone said "0.1.0" through every change that moved scores; the digest
    of the Python sources of ``stream``, ``models`` and ``causal`` (and the shipped model files)
    tells any two builds apart, from a git checkout or a wheel alike.
    """
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    try:
        number = version("vigil")
    except PackageNotFoundError:
        number = "dev"
    h = hashlib.sha256()
    for pkg in ("stream", "models", "causal"):
        root = resources.files(pkg)
        for path in sorted(_walk(root), key=lambda p: p[0]):
            h.update(path[0].encode() + b"\0" + path[1].read_bytes())
    return f"{number}+c{h.hexdigest()[:8]}"


def _walk(root, prefix: str = ""):
    """(relative name, resource) of the Python sources and model files under ``root``."""
    for item in root.iterdir():
        name = f"{prefix}{item.name}"
        if item.is_dir():
            if item.name != "__pycache__":
                yield from _walk(item, name + "/")
        elif item.name.endswith((".py", ".json", ".ubj", ".avsc")):
            yield name, item


#: Fields each minor version added, at the end of the record (so that a reader of an older
#: minor version decodes newer schemaless messages: it stops before the new fields).
ADDED_IN = {"1.1": ("source_type", "source_type_probability", "source_type_probabilities"),
            "1.2": ("extrapolated", "label_propensity")}


@lru_cache(maxsize=4)
def annotation_schema(version: str = ANNOTATION_SCHEMA_VERSION) -> dict:
    """The parsed annotation schema (fastavro) of ``version`` (this one or an earlier minor one).

    Raises
    ------
    ValueError
        For a version this code does not know (a newer one, or another major version).
    """
    known = ["1.0", *ADDED_IN]
    if version not in known:
        raise ValueError(f"annotation schema version {version!r} is not one this Vigil reads ({', '.join(known)})")
    raw = json.loads(resources.files("stream").joinpath("schemas", _SCHEMA_FILE).read_text())

    def key(v):
        return tuple(int(x) for x in v.split("."))

    later = {f for v, fs in ADDED_IN.items() if key(v) > key(version) for f in fs}
    raw["fields"] = [f for f in raw["fields"] if f["name"] not in later]
    raw["version"] = version
    return fastavro.parse_schema(raw)


def mjd_to_unix_ms(mjd: float, scale: str = "utc") -> int:
    """Unix milliseconds (UTC) of an MJD in ``scale`` ("utc", or "tai": Rubin's, 37 s ahead since 2017)."""
    if scale == "tai":
        mjd = mjd - tai_minus_utc_s(mjd) / 86400.0
    return int(round((mjd - MJD_UNIX_EPOCH) * 86400000.0))


def _num(x):
    """float or None (NaN/inf become None so JSON stays valid)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class HSRDiagnostics:
    """What half-sibling regression did to one alert's light curve."""

    mode: str = "off"
    n_train: int = 0
    n_siblings: int = 0
    overfit_alarm: bool = False
    rms_before: float | None = None
    rms_after: float | None = None
    flux_raw: float | None = None
    flux_corrected: float | None = None


@dataclass(frozen=True)
class Contribution:
    """One feature's signed contribution to one score (log-odds units)."""

    score: str
    feature: str
    value: float | None
    contribution: float


@dataclass(frozen=True)
class Annotation:
    """Vigil's verdict on one alert. See the Avro schema for field meanings."""

    alert_id: int
    object_id: str
    survey: str
    survey_schema_version: str
    ra: float
    dec: float
    band: str
    exposure: int
    event_mjd: float
    event_time_scale: str
    processing_time_ms: int
    status: str
    p_real: float | None
    p_extragalactic: float | None
    p_fast: float | None
    priority: float | None
    stage: str
    source_type: str | None = None
    source_type_p: float | None = None
    source_types: dict = field(default_factory=dict)
    extrapolated: tuple = ()
    label_propensity: dict = field(default_factory=dict)
    explanation: tuple = ()
    explanation_text: dict = field(default_factory=dict)
    hsr: HSRDiagnostics = HSRDiagnostics()
    n_detections: int = 0
    n_nondetections: int = 0
    n_forced: int = 0
    first_mjd: float | None = None
    mag: float | None = None
    peak_flux: float | None = None
    features: dict = field(default_factory=dict)
    model_version: str = "none"
    code_version: str = "dev"
    source_topic: str = ""
    source_partition: int = -1
    source_offset: int = -1

    def to_record(self) -> dict:
        """The Avro/JSON record (schema ``vigil.v1.annotation``)."""
        h = self.hsr
        return {
            "annotation_schema_version": ANNOTATION_SCHEMA_VERSION,
            "alert_id": int(self.alert_id),
            "object_id": self.object_id,
            "survey": self.survey,
            "survey_schema_version": self.survey_schema_version,
            "ra": float(self.ra),
            "dec": float(self.dec),
            "band": self.band,
            "exposure": int(self.exposure),
            "event_mjd": float(self.event_mjd),
            "event_time_scale": self.event_time_scale,
            "event_time_ms": mjd_to_unix_ms(self.event_mjd, self.event_time_scale),  # UTC, as timestamp-millis
            "processing_time_ms": int(self.processing_time_ms),
            "status": self.status,
            "p_real": _num(self.p_real),
            "p_extragalactic": _num(self.p_extragalactic),
            "p_fast": _num(self.p_fast),
            "priority": _num(self.priority),
            "stage": self.stage,
            "source_type": self.source_type,
            "source_type_probability": _num(self.source_type_p),
            "source_type_probabilities": {k: float(v) for k, v in self.source_types.items()},
            "extrapolated": list(self.extrapolated),
            "label_propensity": {k: float(v) for k, v in self.label_propensity.items()},
            "explanation": [
                {"score": c.score, "feature": c.feature, "value": _num(c.value),
                 "contribution": float(c.contribution)}
                for c in self.explanation
            ],
            "explanation_text": dict(self.explanation_text),
            "hsr": {
                "mode": h.mode, "n_train": int(h.n_train), "n_siblings": int(h.n_siblings),
                "overfit_alarm": bool(h.overfit_alarm), "rms_before": _num(h.rms_before),
                "rms_after": _num(h.rms_after), "flux_raw": _num(h.flux_raw),
                "flux_corrected": _num(h.flux_corrected),
            },
            "lightcurve": {
                "n_detections": int(self.n_detections), "n_nondetections": int(self.n_nondetections),
                "n_forced": int(self.n_forced), "first_mjd": _num(self.first_mjd), "mag": _num(self.mag),
                "peak_flux": _num(self.peak_flux),
            },
            "features": {k: _num(v) for k, v in self.features.items()},
            "model_version": self.model_version,
            "code_version": self.code_version,
            "source": {"topic": self.source_topic, "partition": int(self.source_partition),
                       "offset": int(self.source_offset)},
        }


def encode_annotation(record: dict) -> bytes:
    """Schemaless Avro bytes of an annotation record (the Kafka message value)."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, annotation_schema(), record)
    return buf.getvalue()


_NEWER_SEEN: set = set()


def decode_annotation(data: bytes, version: str = ANNOTATION_SCHEMA_VERSION) -> dict:
    """Inverse of :func:`encode_annotation` (timestamps come back as Unix milliseconds).

    ``version`` is the writer's (the message's ``vigil.schema_version`` header): a message an
    older Vigil wrote is decoded with its own schema, and the fields added since get their
    defaults, so every record comes back in this version's shape. A message of a newer minor
    version of the same major one is read with this version's schema: minor versions only add
    fields at the end, which it leaves unread (logged once per version). Another major version
    is refused.
    """
    writer = version
    if version not in ("1.0", *ADDED_IN):
        major, _, minor = str(version).partition(".")
        mine = ANNOTATION_SCHEMA_VERSION.split(".")
        if not (major == mine[0] and minor.isdigit() and int(minor) > int(mine[1])):
            annotation_schema(version)  # raises, naming the versions this Vigil reads
        if version not in _NEWER_SEEN:
            _NEWER_SEEN.add(version)
            log.warning("annotation schema version %s is newer than this Vigil's %s: its fields added since are "
                        "left unread", version, ANNOTATION_SCHEMA_VERSION)
        writer = ANNOTATION_SCHEMA_VERSION
    rec = fastavro.schemaless_reader(io.BytesIO(data), annotation_schema(writer), annotation_schema())
    for k in ("event_time_ms", "processing_time_ms"):
        if hasattr(rec[k], "timestamp"):
            rec[k] = round(rec[k].timestamp() * 1000)
    return rec


def validate_annotation(record: dict) -> bool:
    """Raise ``fastavro.validation.ValidationError`` unless ``record`` fits the schema."""
    from fastavro.validation import validate

    return validate(record, annotation_schema(), raise_errors=True)

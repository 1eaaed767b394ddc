"""Survey-neutral records that cross module boundaries.

Everything downstream of the decoder sees only these types: no ZTF or Rubin column
name appears outside :mod:`stream.decode`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# Light-curve row kinds. A row is one measurement of the target at one epoch.
# Rubin times are TAI; Unix times, ZTF's and the ephemerides' are UTC.
#: The leap seconds of this century: (UTC MJD from which, TAI − UTC in s). Earlier times get 32 s.
_LEAP_SECONDS = ((51179.0, 32.0), (53736.0, 33.0), (54832.0, 34.0), (56109.0, 35.0), (57204.0, 36.0),
                 (57754.0, 37.0))


def tai_minus_utc_s(mjd):
    """TAI − UTC in seconds at ``mjd`` (either scale: they differ by < 1 min), array or scalar.

    A constant 37 s put Rubin's reprocessed HSC alerts of 2016 (36 s then) one second out.
    Leap seconds after 2017 would need adding here (none has been announced).
    """
    out = _LEAP_VALUES[np.searchsorted(_LEAP_STARTS, np.asarray(mjd, dtype=float), side="right")]
    return float(out) if np.ndim(out) == 0 else out


_LEAP_STARTS = np.array([m for m, _ in _LEAP_SECONDS])  # (built once: it runs for every Rubin annotation)
_LEAP_VALUES = np.array([32.0] + [v for _, v in _LEAP_SECONDS])

DETECTION = 0  # the alert's own (triggering) detection
PREVIOUS = 1  # an earlier detection carried in the alert's history
NONDETECTION = 2  # an upper limit: flux is NaN, flux_err is limit/5
FORCED = 3  # forced photometry at the object's position (signed, any S/N)

KIND_NAMES = {DETECTION: "detection", PREVIOUS: "previous", NONDETECTION: "nondetection", FORCED: "forced"}

#: AB magnitude of 1 µJy: m = 23.9 - 2.5 log10(f / µJy).
AB_UJY_ZERO = 23.9


def mag_to_ujy(mag):
    """Convert AB magnitudes to µJy (vectorised, NaN-safe)."""
    return np.power(10.0, -0.4 * (np.asarray(mag, dtype=float) - AB_UJY_ZERO))


def median(values) -> float:
    """``np.median`` of a 1-D float64 array, bit for bit (NaN if any value is NaN or none is given),
    in a tenth of the time on the short arrays of one light curve (np.median's dispatch costs
    ~10 µs). (Float32 input is averaged in float64 here, and a median of −0 and +0 may keep
    either sign.)"""
    v = np.sort(np.asarray(values, dtype=float))
    n = len(v)
    if not n or np.isnan(v[-1]):  # (sorting puts NaN last)
        return math.nan
    return float(v[n // 2]) if n % 2 else float((v[n // 2 - 1] + v[n // 2]) / 2.0)


#: Pixel scale (arcsec per pixel) of each survey's images: PSF widths and image seeing come in pixels.
PIXEL_SCALE = {"ztf": 1.012, "rubin": 0.2}

@dataclass(frozen=True)
class Envelope:
    """Raw bytes as they came in, plus where they came from.

    Parameters
    ----------
    payload : bytes
        The message value or file content, untouched.
    source : str
        Kafka topic or file path (with ``!member`` for archive members).
    partition, offset : int
        Kafka coordinates; ``-1`` for files.
    timestamp_ms : int
        Broker or file timestamp in Unix milliseconds; ``-1`` if unknown.
    key : bytes or None
        Kafka message key, if any.
    unreadable : str or None
        Why the source could not read these bytes at all (a file's permission, a broken
        link, a damaged archive); the payload is then empty and the envelope is rejected
        as ``unreadable``, so the input is accounted for and the rest goes on.
    headers : tuple of (str, bytes) or None
        The Kafka message's own headers, if any (a dead letter carries them on).
    """

    payload: bytes
    source: str = ""
    partition: int = -1
    offset: int = -1
    timestamp_ms: int = -1
    key: bytes | None = None
    unreadable: str | None = None
    headers: tuple | None = None


@dataclass(frozen=True, eq=False)
class LightCurve:
    """Columnar light curve of one object, in signed µJy.

    All arrays have the same length and are sorted by ``mjd``. ``flux`` is the
    signed difference-image flux (NaN for non-detections); ``flux_err`` is the 1σ
    uncertainty (for non-detections, the 5σ limit divided by 5). ``exposure`` is the
    survey's exposure key (ZTF ``pid``; Rubin ``visit * 1000 + detector``) and
    ``field``/``chip`` the pointing and detector section. ``zp``, ``zp_rms``,
    ``colour_coeff``, ``limit_mag``, ``seeing`` and ``background`` are image-level
    metadata (NaN where the survey does not provide them); ``ref_flux`` is the flux
    of the reference-image source (µJy, NaN if none); ``ra``/``dec`` the measured
    position of detections (NaN for non-detections and forced photometry).
    """

    mjd: np.ndarray
    band: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray
    kind: np.ndarray
    exposure: np.ndarray
    field: np.ndarray
    chip: np.ndarray
    zp: np.ndarray
    zp_rms: np.ndarray
    colour_coeff: np.ndarray
    limit_mag: np.ndarray
    seeing: np.ndarray
    background: np.ndarray
    ref_flux: np.ndarray
    ra: np.ndarray
    dec: np.ndarray

    COLUMNS = (
        "mjd", "band", "flux", "flux_err", "kind", "exposure", "field", "chip", "zp",
        "zp_rms", "colour_coeff", "limit_mag", "seeing", "background", "ref_flux", "ra", "dec",
    )

    def __len__(self) -> int:
        return len(self.mjd)

    @property
    def n_detections(self) -> int:
        return int(np.count_nonzero((self.kind == DETECTION) | (self.kind == PREVIOUS)))

    @property
    def n_nondetections(self) -> int:
        return int(np.count_nonzero(self.kind == NONDETECTION))

    @property
    def n_forced(self) -> int:
        return int(np.count_nonzero(self.kind == FORCED))

    def to_frame(self):
        """Return the light curve as a pandas DataFrame (for plots and notebooks)."""
        import pandas as pd

        return pd.DataFrame({c: getattr(self, c) for c in self.COLUMNS})


@dataclass(frozen=True)
class Context:
    """Per-alert context that scoring uses, with survey-neutral names.

    Missing values are NaN (floats) or -1 (counts). Distances are in arcsec,
    magnitudes AB, times MJD.
    """

    real_bogus: float = np.nan  # survey's own real/bogus (ZTF drb, else rb; Rubin reliability)
    real_bogus_version: str = ""
    star_galaxy: float = np.nan  # nearest PS1 source star/galaxy score (1 = star)
    ps1_distance: float = np.nan
    ps1_mag_r: float = np.nan
    gaia_distance: float = np.nan
    gaia_mag: float = np.nan
    ref_mag: float = np.nan  # nearest reference-image source
    ref_distance: float = np.nan
    ss_distance: float = np.nan  # nearest known solar-system object
    ss_mag: float = np.nan
    n_det_history: int = -1  # survey's own count over all history (not just the 30 d packet)
    n_cover_history: int = -1
    first_det_mjd: float = np.nan  # survey's first detection of this position
    fwhm: float = np.nan  # target-measured: never a sibling variable (science.md R3)
    elongation: float = np.nan
    n_bad_pixels: float = np.nan
    n_negative_pixels: float = np.nan
    snr: float = np.nan
    extendedness: float = np.nan
    zp: float = np.nan
    zp_rms: float = np.nan
    colour_coeff: float = np.nan
    limit_mag: float = np.nan
    exptime: float = np.nan
    mag: float = np.nan  # the triggering detection's magnitude (NaN if flux ≤ 0)
    mag_err: float = np.nan
    program: int = -1


@dataclass(frozen=True, eq=False)
class Alert:
    """One survey alert in survey-neutral form.

    Parameters
    ----------
    survey : str
        ``"ztf"`` or ``"rubin"``.
    schema_version : str
        The survey schema version the alert was written with.
    alert_id : int
        Unique id of the triggering detection (ZTF ``candid``; Rubin ``diaSourceId``).
    object_id : str
        Survey object id (ZTF ``objectId``; Rubin ``diaObjectId`` as text).
    ra, dec : float
        ICRS degrees.
    mjd : float
        Time of the triggering detection, in ``time_scale``.
    time_scale : str
        ``"utc"`` (ZTF) or ``"tai"`` (Rubin).
    band : str
        ``g``, ``r``, ``i``, ... (ZTF ``fid`` mapped to letters).
    exposure : int
        Exposure key (see :class:`LightCurve`).
    field, chip : int
        Pointing and detector section (ZTF field/rcid; Rubin visit/detector).
    lightcurve : LightCurve
        Current + previous detections + non-detections + forced photometry.
    context : Context
        Scoring context.
    cutouts : dict
        ``science``/``template``/``difference`` → FITS bytes (possibly gzipped), or absent.
    """

    survey: str
    schema_version: str
    alert_id: int
    object_id: str
    ra: float
    dec: float
    mjd: float
    time_scale: str
    band: str
    exposure: int
    field: int
    chip: int
    lightcurve: LightCurve
    context: Context
    cutouts: dict = field(default_factory=dict)

    @property
    def flux(self) -> float:
        """Signed difference flux of the triggering detection (µJy)."""
        sel = self.lightcurve.kind == DETECTION
        return float(self.lightcurve.flux[sel][0]) if sel.any() else float("nan")


@dataclass(frozen=True)
class Rejected:
    """Input that could not become an annotation, with a stable reason.

    Parameters
    ----------
    envelope : Envelope
        The original bytes and their origin (kept whole for the dead-letter topic).
    stage : str
        Where it failed: ``"decode"``, ``"validate"``, ``"process"`` or ``"encode"`` (an
        annotation that an output cannot carry).
    reason : str
        A stable machine-readable code (see :data:`stream.decode.REASONS`).
    detail : str
        Human-readable explanation.
    alert_id, object_id : optional
        Filled when the failure happened after the ids were read.
    """

    envelope: Envelope
    stage: str
    reason: str
    detail: str
    alert_id: int | None = None
    object_id: str | None = None

    def to_record(self) -> dict:
        """JSON-serialisable summary (without the payload bytes)."""
        e = self.envelope
        return {
            "stage": self.stage,
            "reason": self.reason,
            "detail": self.detail,
            "alert_id": self.alert_id,
            "object_id": self.object_id,
            "source": e.source,
            "partition": e.partition,
            "offset": e.offset,
            "payload_bytes": len(e.payload),
        }

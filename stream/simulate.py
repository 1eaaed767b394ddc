"""Seeded ZTF alert-stream simulator with known truth (science.md §3).

``vigil simulate --seed S --out DIR`` writes alerts in the ZTF alert schema 4.02 (one Avro
container per alert, or nightly ``ztf_public_YYYYMMDD.tar.gz`` tarballs like the public
archive) and the truth behind them:

* ``DIR/alerts/…``: the alerts, each with 30 days of ``prv_candidates`` (detections and
  upper limits) and ``fp_hists`` (forced photometry in DN, every exposure of the quadrant);
* ``DIR/truth.parquet``: one row per alert, keyed by ``candid`` (columns in :data:`TRUTH_COLUMNS`);
* ``DIR/exposures.parquet``: one row per ``pid`` (exposure × quadrant): conditions and the
  injected systematic parameters;
* ``DIR/objects.parquet``: one row per simulated object (class and model parameters);
* ``DIR/photometry.parquet``: per (object, pid) truth of every epoch of every object that
  alerted (true flux, injected systematic, measured flux), to score history rows too.

The same seed gives byte-identical output. The Python entry point is :func:`simulate`.

Model
-----
A survey of ``fields`` ZTF fields (``quadrants`` of the 64 readout quadrants each) is
observed from Palomar for ``history_days`` nights plus ``nights`` alert nights; only
detections in the alert nights become alerts, the earlier nights fill their histories.
Each clear night a field gets g and r exposures in two visits ≥ 1.5 h apart (sometimes a
third), nights are lost to weather in runs (Markov chain), single exposures drop out, and
alert nights are never entirely lost. Per exposure: seeing (night median × jitter,
per-quadrant focal-plane term), airmass from the pointing and time (Kasten & Young), sun
and moon from low-precision ephemerides (moon illumination, separation, altitude), sky
background, cloud extinction, 5σ depth ``diffmaglim`` and the reported ``magzpsci``.

The measured difference flux of object *j* in exposure *e* (µJy, band *b*) is::

    f = Q(t) + [F_pos·(10^(-0.4·δ) − 1) + b_e] + ε_j·F_ref + noise,   δ = z_e + z_q,e + λ_j·κ_e + (g−r)_j·c_e

with Q the astrophysical difference flux (``true_flux_ujy``), the bracket the injected
systematic (``sys_flux_ujy``, ``sys_mag`` = δ), ε_j·F_ref a constant reference-image
mismatch (``nuisance_flux_ujy``; for bogus alerts, the artefact's flux) and noise drawn
from σ² = (10^(-0.4(diffmaglim−23.9))/5)² + g_e·F_pos + (0.003·F_pos)², so ``diffmaglim``
is the 5σ limit of an empty position. F_pos is the total flux at the position in the
image (star, host light, transient). Every ``|f| ≥ 5σ`` is a detection (``isdiffpos``
gives the sign); every detection in an alert night of *any* object is an alert. Constant
stars therefore alert when the systematics and their reference mismatch push them over
threshold (bright stars often, faint ones rarely); their forced photometry in the 30-day
histories makes the per-exposure sibling store dense.

Parameters (defaults; ``sys_scale`` multiplies every systematic amplitude)
-------------------------------------------------------------------------

=============================  ===================================================================
parameter                      value
=============================  ===================================================================
site                           Palomar, lat 33.3563°, lon −116.8650°, 1.012″/pixel, 30 s exposures
survey start                   JD 2460200.5 (2023-09-13), ``history_days`` = 30, ``nights`` = 2
cadence                        2 visits/night × (g, r), 25 % of nights a third visit; 8 % exposure loss;
                               ``cadence="public"``: one (g, r) visit every other night (the
                               last included; every other alert night then has no exposures)
weather                        P(bad | good) = 0.12, P(bad | bad) = 0.5; cloudy nights 0.05–0.8 mag
seeing                         night median lognormal(2.0″, 0.18) × exposure lognormal(0.08), g ×1.05
depth (5σ, dark, 2″, X=1)      g 20.8, r 20.6; −1.25 log(sky/dark) −2.5 log(seeing/2″) −0.1(X−1) −cloud
zero point (reported)          g 26.35, r 26.25 − k(X−1) − cloud (k: g 0.20, r 0.12)
z_e exposure ZP offset         N(0, 12 mmag) + 0.05 × cloud extinction
z_q,e quadrant ZP offset       N(0, 8 mmag) + 0.03 × cloud × N(0, 1)
κ_e seeing term                40 mmag × (seeing / 2″ − 1), loading λ_j per object
λ_j loading                    stars clip(1 + 0.2(16.5 − r) + 0.25((g−r) − 0.7) + N(0, 0.15), 0.2, 2.5);
                               galaxies 1.6 + N(0, 0.3)
c_e colour term                N(0, 15 mmag) + 20 mmag × (X − 1), per mag of (g−r − 0.6)
b_e additive offset            N(0, 0.3 σ_bg) µJy
ε_j reference mismatch         stars N(0, 2.5 %), host light N(0, 1 %)
photometric noise              σ_bg from diffmaglim, g_e = 0.02 µJy, floor 0.3 %
forced photometry              every exposure of the 30 days before an alert; 1 % flagged
                               (forcediffimflux = −99999, procstatus '56')
objects / quadrant (dense)     constant 450 (r 13.5–18), periodic 12, cv 2, flare 6, pm_star 3, fast 2,
                               sn 6, slow_sn 2, agn 3
objects / quadrant (sparse)    constant 6, periodic 1, cv 0.3, flare 0.5, pm_star 0.3, fast 0.3, sn 0.7,
                               slow_sn 0.3, agn 0.3 (counts < 20 are Poisson means)
objects / quadrant (transient) constant 6, periodic 0.5, cv 0.8, flare 50, pm_star 0.3, fast 1.5, sn 1.5,
                               slow_sn 0.3, agn 0.3: a transient search's alerts, mostly new sources and
                               the galactic mimics of fast transients
bogus / pid (alert nights)     Poisson(B × (seeing/2″)² × (1 + 0.5 moon)), B = 3 dense, 0.5 sparse and
                               transient; |S/N| 5 + Exp(2.5),
                               35 % negative; low rb/drb, odd fwhm, more negative pixels;
                               80 % round (elong 1 + |N(0, 0.12)|), 20 % streaks (1.3 + Exp(0.8));
                               bad pixels as rare as on real sources (ZTF's alert cuts);
                               2 % of real detections get drb U(0, 0.5) (the deep score's misses)
sso / pid (alert nights)       Poisson(A × (0.2 + 0.8 exp(−|β|/15°))), β the ecliptic latitude,
                               A = 3 dense, 2 sparse, 5 transient; asteroids of r 17–21.5
                               (N(< r) ∝ 10^(0.3 r)), g−r 0.45–0.75, each at one epoch (detected if
                               ≥ 5σ), 8 % slow (also at the next exposure if within 1 h, 0.3–1.2″ on);
                               catalogued with P = clip(0.95 − 0.17 (r − 19.5), 0.6, 0.95):
                               ssdistnr round(|N(0, 0.21″)|), ssmagnr r + 0.2 ± 0.3; no counterpart of its own
periodic                       r 14–18.5, P log-uniform 0.05–30 d, amplitude 0.05–0.6 mag (g ×1.3)
cv                             quiescent r 18.5–22.5, outbursts 3–5 mag, rise 0.5–1.5 d, one starting
                               in the alert nights (or ≤ 10 d before), recurrence log-uniform 15–1500 d
flare                          M dwarf r 16.5–22, g−r 1.3–1.6, 0.05 flares/d, 0.5–3 mag in g, τ 0.02–0.15 d;
                               the flare's own light is hot: difference flux g−r = −0.25 (r = g × 0.79)
pm_star                        r 14–18, μ 0.05–0.3″/yr since the reference (JD 2458250): dipole
                               flux F·(1 − exp(−d²/4s²)), position drifts
fast                           peak r 17.5–20 from 3 d before to 3 d after the alert nights, rise
                               τ 0.3–1 d, decline τ 1.5–4 d, 50 % hosted
sn / slow_sn                   peak r 17–19.8 / 17.5–19.5, τ_rise 2.5–5 / 10–25 d, τ_fall 15–35 /
                               60–150 d (Bazin), 80 % hosted (host r 17.5–23); sn peaks from 25 d
                               before to 10 d after the alert nights
catalogue depths               a star or host fainter than r ≈ 21 (± 0.2) has no reference-image
                               counterpart, fainter than 22 none in PS1, and a star fainter than
                               G = r + 0.3 = 20.7 none in Gaia: the nearest catalogued source is an
                               unrelated one; PS1 sgscore fades to U(0.25, 0.75) from r 20.5 to 22
cross-match outages            40 % of nights, a 1–3 h run of exposures whose alerts carry the fill
                               values distpsnr1 = 120, sgscore1 = 0.2, neargaia = 300, ssdistnr = 60
                               and jdstarthist after jdendhist (as one real run did; the decoder
                               reads them as missing)
history before the survey      ndethist, jdstarthist: years of coverage, detected as often as in the
                               simulated history nights (none for transients)
agn                            nucleus r 16.5–19.5, damped random walk τ 100–400 d, SF∞ 0.15–0.35 mag
truth flags                    is_real = not bogus (asteroids are real); is_extragalactic =
                               fast/sn/slow_sn/agn; is_fast (rise < 3 d) = fast/flare/cv
label selection                logit e = −1.5 + 0.9(18.5 − magpsf) − 1.2(seeing − 2″) + 0.6 min(n_later, 4)
                               − 2.5·[PS1 star (sgscore > 0.8, r < 18.5) within 0.5″, as alerted];
                               n_later = detections of the object in the next 3 d
                               (later data); e clipped to [0.002, 0.98]; vetted ~ Bernoulli(e):
                               the follow-up that reveals the class
eyeballing                     eyeballed = vetted, or screened ~ Bernoulli(s), logit s = −1 +
                               0.5(19.5 − magpsf), s clipped to [0.02, 0.9]: a vetter's real/bogus
                               call (P(real)'s labels; follow-up almost never picks artefacts)
=============================  ===================================================================

Truth table columns (``truth.parquet``, one row per alert)
-----------------------------------------------------------

``candid`` (key), ``objectId``, ``object_index`` (row in objects.parquet), ``class`` (one of
:data:`CLASSES`), ``is_real``, ``is_extragalactic``, ``is_fast``, ``pid``, ``exposure_id``, ``field``,
``rcid``, ``fid``, ``band``, ``jd``, ``mjd``, ``night``, ``ra``, ``dec`` (as measured);
``true_flux_ujy`` (Q, astrophysical difference flux), ``sys_flux_ujy`` and ``sys_mag`` (the injected
systematic, µJy and δ in mag), ``nuisance_flux_ujy`` (reference mismatch, or the artefact flux of a
bogus), ``noise_flux_ujy``, ``meas_flux_ujy`` (= the sum of the four; what the alert carries),
``flux_err_ujy``, ``snr``, ``ref_flux_ujy`` (flux at the position in the reference image), ``magpsf``,
``isdiffpos``, ``seeing_arcsec``; history sizes ``n_prv_det``, ``n_prv_nondet``, ``n_fp``;
``n_later_det`` (detections of the object in the next 3 days: the "later data" of selection);
``propensity`` (true P(vetted)) and ``vetted`` (the class is known); ``eyeball_propensity`` and
``eyeballed`` (real/bogus is known; every vetted alert is eyeballed).

Interventions: ``seeing=s`` is do(seeing = s) for every exposure (or, with
``seeing_nights=k``, for those of the last *k* alert nights); ``moon=v`` sets the Moon's
illuminated fraction to v on the same exposures (0: a dark sky wherever the Moon is up), which
changes the sky, hence the depth, the noise, the detections and the artefacts (alerts carry no
Moon value; a reader computing the Moon from the ephemeris sees the natural one). Every random draw of a real
object stays that of the run without it: per-object draws come from streams split between
long-lived objects and single-epoch sources (asteroids, whose number does not depend on
seeing, then artefacts), per-detection draws from (object × exposure) matrices, and the
single-epoch sources' own draws run in exposure order, so only the artefacts of intervened
exposures are drawn afresh. :meth:`SimResult.alert_keys` matches the same (object, exposure) across
runs; object names keep their letters (the year is that of the first detection).

(The PS1 term stands for "a catalogued star, nobody follows it up": like every other term it
depends on observables only, not on the class label, so inverse-propensity weighting on the
observed covariates can undo the selection.)
"""

from __future__ import annotations

import datetime as _dt
import gzip
import hashlib
import io
import math
import shutil
import struct
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stream.decode import ZTF_NID0_JD
from stream.simulate_schema import (
    CANDIDATE_FIELDS,
    FP_HIST_FIELDS,
    PRV_CANDIDATE_FIELDS,
    SCHEMA_VERSION,
    record_schema,
    ztf_alert_schema,
)
from stream.sources import PARTIAL_DIR

# --------------------------------------------------------------------------- constants

PALOMAR_LAT = 33.3563
PALOMAR_LON = -116.8650  # degrees east
PIXSCALE = 1.012  # arcsec / pixel
QUAD_NX, QUAD_NY = 3072, 3080  # pixels per readout quadrant
QUAD_DEG = QUAD_NX * PIXSCALE / 3600.0
NID0_JD = ZTF_NID0_JD  # ZTF night id 0 (2017-01-01 0h UT); pids encode time from it
JD_UNIX0 = 2440587.5
REF_JD = 2458250.0  # epoch of the reference images (PM-star displacement grows from here)
PS1_JD = 2456000.0
HISTORY_DAYS = 30.0
SEEING_MEDIAN = 2.0
#: g − r of an M-dwarf flare's own light (~10,000 K; its difference flux in g and r).
FLARE_GR = -0.25
BANDS = {1: "g", 2: "r"}
LIM0 = {1: 20.8, 2: 20.6}
ZP0 = {1: 26.35, 2: 26.25}
KEXT = {1: 0.20, 2: 0.12}
SKY_DARK = {1: 21.8, 2: 21.0}  # mag / arcsec²
CLR0 = {1: -0.05, 2: 0.10}
PHOTON_GAIN_UJY = 0.02  # µJy per photo-electron-equivalent: source shot noise σ² = g·F
NOISE_FLOOR = 0.003
FP_BAD = -99999.0

CLASSES = ("constant", "periodic", "cv", "flare", "pm_star", "fast", "sn", "slow_sn", "agn", "sso", "bogus")
EXTRAGALACTIC = {"fast", "sn", "slow_sn", "agn"}
FAST = {"fast", "flare", "cv"}
STARS = {"constant", "periodic", "cv", "flare", "pm_star"}

MODES = ("dense", "sparse", "transient")
#: "nightly": every clear night, 2 visits (25 % of nights 3) in g and r — a high-cadence
#: programme; "public": every other night, one g + r visit — ZTF's public survey. In the 30
#: days before an alert the real 2023 Fink alerts have a median of 21 exposures; the public
#: cadence gives ~20–27 and the nightly one ~80–115 (transient mode, seeds 1 and 3).
CADENCES = ("nightly", "public")
#: Mean number of objects per quadrant, one entry per mode in :data:`MODES`. The transient
#: mode is a sparse sky seen by a transient search: most alerts come from new sources and
#: from the galactic contaminants that mimic them (flares of faint M dwarfs, CV outbursts).
POPULATION = {
    "constant": (450, 6, 6), "periodic": (12, 1, 0.5), "cv": (2, 0.3, 0.8), "flare": (6, 0.5, 50),
    "pm_star": (3, 0.3, 0.3), "fast": (2, 0.3, 1.5), "sn": (6, 0.7, 1.5), "slow_sn": (2, 0.3, 0.3),
    "agn": (3, 0.3, 0.3),
}
#: Mean bogus detections per pid in good conditions; artefacts scale with star density.
BOGUS_PER_PID = {"dense": 3.0, "sparse": 0.5, "transient": 0.5}
#: Solar-system objects (asteroids) per pid of the alert nights on the ecliptic, r 17–21.5
#: (a fifth of that far from it, see :func:`_sso_rate`); about 40 % are bright enough to be
#: detected. They are then 5–14 % of the transient mode's alerts, by the field's ecliptic
#: latitude (seeds 1–4, 8–48 quadrants); in the real Fink 2023 sample 17 % of the ZTF alerts
#: sit within 1″ of a known one.
SSO_PER_PID = {"dense": 3.0, "sparse": 2.0, "transient": 5.0}
#: Rough alerts per (quadrant, alert night), used to size a run for ``n_alerts``.
ALERTS_PER_QUAD_NIGHT = {"dense": 650, "sparse": 20, "transient": 25}
#: Fraction of nights with a 1–3 h cross-match outage, and the fill values then written
#: (those of the real run, all beyond ZTF's search radii; the decoder reads them as missing).
XMATCH_OUTAGE_NIGHTS = 0.4
XMATCH_FILL = {"distpsnr1": 120.0, "sgscore1": 0.2, "neargaia": 300.0, "ssdistnr": 60.0}
#: Catalogue depths (r, AB): sources fainter than these have no counterpart of their own in
#: the survey's reference image, in PS1 and in Gaia (G ≈ r + 0.3); the nearest catalogued
#: source is then an unrelated neighbour. PS1's star/galaxy score loses its power between
#: r = 20.5 and 22 (it drifts towards an uninformative 0.25–0.75).
REF_DEPTH_R, PS1_DEPTH_R, GAIA_DEPTH_G, SG_RELIABLE_R = 21.0, 22.0, 20.7, 20.5
#: Flares per day of a flare star (0.5–3 mag in g).
FLARE_RATE = 0.05
#: Object ids number long-lived objects from 0 and single-epoch sources (asteroids, then
#: artefacts) from ARTEFACT_ID0, in blocks per quadrant.
ARTEFACT_ID0, ARTEFACTS_PER_QUAD = 10**8, 10**6

TRUTH_COLUMNS = (
    "candid", "objectId", "object_index", "class", "is_real", "is_extragalactic", "is_fast", "pid",
    "exposure_id", "field", "rcid", "fid", "band", "jd", "mjd", "night", "ra", "dec", "true_flux_ujy",
    "sys_flux_ujy", "sys_mag", "nuisance_flux_ujy", "noise_flux_ujy", "meas_flux_ujy", "flux_err_ujy", "snr",
    "ref_flux_ujy", "magpsf", "isdiffpos", "seeing_arcsec", "n_prv_det", "n_prv_nondet", "n_fp", "n_later_det",
    "propensity", "vetted", "eyeball_propensity", "eyeballed",
)


# --------------------------------------------------------------------------- config / result


@dataclass(frozen=True)
class SimConfig:
    """All knobs of a simulation run (see the module docstring for the physics)."""

    seed: int = 0
    nights: int = 2
    fields: int = 1
    quadrants: int = 4
    mode: str = "dense"
    n_alerts: int | None = None
    history_days: int = 30
    start_jd: float = 2460200.5
    sys_scale: float = 1.0
    bogus_per_pid: float | None = None  # None: the mode's default (BOGUS_PER_PID)
    fp_bad_fraction: float = 0.01
    seeing: float | None = None  # do(seeing): exposures taken at this seeing (arcsec) ...
    seeing_nights: int | None = None  # ... on the last this many alert nights (None: every night)
    moon: float | None = None  # do(moon): the Moon's illuminated fraction on those nights
    cadence: str = "nightly"  # see CADENCES

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.cadence not in CADENCES:
            raise ValueError(f"cadence must be one of {', '.join(CADENCES)}, not {self.cadence!r}")
        for name, ok, want in (("nights", self.nights >= 1, "≥ 1"), ("fields", self.fields >= 1, "≥ 1"),
                               ("quadrants", 1 <= self.quadrants <= 64, "1 … 64"),
                               ("n_alerts", self.n_alerts is None or self.n_alerts >= 1, "≥ 1"),
                               ("history_days", 0 <= self.history_days < math.inf, "≥ 0"),
                               ("sys_scale", 0 <= self.sys_scale < math.inf, "≥ 0")):
            if not ok:  # (as --nights, --n-alerts, ... on the command line)
                raise ValueError(f"{name} (--{name.replace('_', '-')}) = {getattr(self, name)}: must be {want}")
        if self.seeing is not None and not 0.3 <= self.seeing <= 10:
            raise ValueError(f"seeing={self.seeing}: the intervention wants 0.3–10 arcsec")
        if self.seeing_nights is not None and not 1 <= self.seeing_nights <= self.nights:
            raise ValueError(f"seeing_nights={self.seeing_nights}: must be 1 … nights ({self.nights})")
        if self.moon is not None and not 0.0 <= self.moon <= 1.0:
            raise ValueError(f"moon={self.moon}: an illuminated fraction, 0–1")
        if self.seeing_nights is not None and self.seeing is None and self.moon is None:
            raise ValueError("seeing_nights needs seeing or moon (the value the intervention sets)")
        if (self.seeing is not None or self.moon is not None) and self.n_alerts is not None:
            # Sizing the run and cutting it both depend on the alert count, which the conditions change.
            raise ValueError("seeing or moon (an intervention) cannot be combined with n_alerts")


@dataclass(eq=False)
class SimResult:
    """A finished simulation, held in memory.

    Attributes
    ----------
    config : SimConfig
    truth : pandas.DataFrame
        One row per alert, keyed by ``candid``, in stream order.
    exposures : pandas.DataFrame
        One row per ``pid`` with conditions and injected systematics.
    objects : pandas.DataFrame
        One row per object with class and model parameters.
    photometry : pandas.DataFrame
        Per (object, pid) truth for every object that alerted.
    """

    config: SimConfig
    truth: object
    exposures: object
    objects: object
    photometry: object
    _quads: list = field(default_factory=list, repr=False)
    _order: np.ndarray = field(default=None, repr=False)
    _parsed: dict = field(default=None, repr=False)

    @property
    def schema(self):
        """The parsed Avro schema the alerts are written with."""
        if self._parsed is None:
            import fastavro

            self._parsed = fastavro.parse_schema(ztf_alert_schema())
        return self._parsed

    def alerts(self):
        """Yield the alert records (dicts in the ZTF 4.02 layout) in stream order."""
        for qi, row in self._order:
            yield self._quads[qi].record(int(row))

    def payloads(self):
        """Yield ``(candid, bytes)``: one Avro object-container file per alert."""
        writer = _ContainerWriter(self.config.seed)
        codec = _Codec()
        for qi, row in self._order:
            q = self._quads[qi]
            yield int(q.candid[row]), writer.frame(q.encode(int(row), codec))

    def envelopes(self):
        """Yield :class:`~stream.alert.Envelope` objects, ready for :class:`~stream.decode.Decoder`."""
        from stream.alert import Envelope

        for k, (candid, payload) in enumerate(self.payloads()):
            yield Envelope(payload, f"sim:{candid}", offset=k)

    def write(self, out_dir, fmt: str = "files") -> dict:
        """Write alerts and truth tables under ``out_dir``; return counts and timings."""
        return _write(self, Path(out_dir), fmt)

    def sibling_counts(self):
        """Distinct sources with a flux measurement per ``pid`` in the alerts (pandas Series).

        Counted as a consumer would recover them: the current detection of each alert,
        earlier detections in ``prv_candidates`` and unflagged ``fp_hists`` rows.
        """
        import pandas as pd

        parts = [q.recoverable() for q in self._quads]
        return pd.concat(parts).sort_index() if parts else pd.Series(dtype=int)

    def alert_keys(self) -> list:
        """Per alert (truth order), ``"quadrant:object:exposure"``: the same across do(seeing) runs.

        Artefacts are drawn afresh under another seeing; their keys carry a ``b``.
        """
        out = []
        for qi, row in self._order:
            q = self._quads[qi]
            j, e = int(q.dj[row]), int(q.de[row])
            out.append(f"{qi}:{'b' if q.o['bogus_epoch'][j] >= 0 else ''}{j}:{e}")
        return out

    def summary(self) -> str:
        """Human-readable summary: systematic RMS and the class mix."""
        return _summary(self)


def simulate(seed: int = 0, out_dir=None, *, nights: int = 2, fields: int = 1, quadrants: int = 4,
             mode: str = "dense", fmt: str = "files", n_alerts: int | None = None, history_days: int = 30,
             start_jd: float = 2460200.5, sys_scale: float = 1.0, seeing: float | None = None,
             seeing_nights: int | None = None, moon: float | None = None, cadence: str = "nightly") -> SimResult:
    """Simulate a ZTF alert stream with known truth.

    Parameters
    ----------
    seed : int
        Random seed; the same seed gives identical alerts and byte-identical tables.
    out_dir : path, optional
        If given, write alerts and truth tables there (see :meth:`SimResult.write`).
    nights : int
        Alert nights (the stream); ``history_days`` of survey precede them.
    fields, quadrants : int
        ZTF fields, and readout quadrants (``rcid``) simulated per field.
    mode : {"dense", "sparse", "transient"}
        ≥ 100 or ~10 sibling sources per exposure; "transient" is sparse with a class mix
        of new sources and their galactic mimics (see :data:`POPULATION`).
    fmt : {"files", "tarballs"}
        One ``.avro`` per alert, or nightly ``.tar.gz`` archives.
    n_alerts : int, optional
        Size the run for about this many alerts (more quadrants, then fields) and cut the
        stream after exactly this many, in stream order.
    history_days : int
        Survey nights before the first alert night.
    start_jd : float
        JD of 0h UT on the first survey night.
    sys_scale : float
        Multiplies every injected systematic amplitude (0 = no systematics).
    seeing : float, optional
        The intervention do(seeing): exposures are taken at this seeing (arcsec). The real
        objects keep every random draw of the same seed without it (only the artefacts of
        intervened exposures are drawn afresh), so the same objects with the same noise
        realisations are observed under other conditions; what follows from
        seeing (depth, noise, systematics, artefacts, detections, PSF and survey scores)
        changes. :meth:`SimResult.alert_keys` matches alerts across such runs.
    seeing_nights : int, optional
        Apply ``seeing`` (and ``moon``) only to the last this many alert nights (default:
        every night of the survey, histories included).
    moon : float, optional
        The intervention do(moon): the Moon's illuminated fraction (0–1) on those nights, where
        it is up (its position stays the ephemeris'), with the same draws as for ``seeing``;
        the sky, depth, noise, detections and artefacts follow.
    cadence : {"nightly", "public"}
        See :data:`CADENCES`.

    Returns
    -------
    SimResult
    """
    if abs((start_jd - 0.5) - round(start_jd - 0.5)) > 1e-9:
        # The night windows are laid out from 0h UT; another start would put them in daylight.
        raise ValueError(f"start_jd={start_jd}: must be 0h UT of a day (a JD ending in .5)")
    cfg = SimConfig(seed=int(seed), nights=nights, fields=fields, quadrants=quadrants, mode=mode,
                    n_alerts=n_alerts, history_days=history_days, start_jd=start_jd, sys_scale=sys_scale,
                    seeing=seeing, seeing_nights=seeing_nights, moon=moon, cadence=cadence)
    result = _run(cfg)
    if out_dir is not None:
        result.write(out_dir, fmt)
    return result


# --------------------------------------------------------------------------- small helpers


def _rng(seed: int, *key: int) -> np.random.Generator:
    # Independent, order-proof streams: one per component and quadrant.
    return np.random.default_rng(np.random.SeedSequence([seed, *key]))


class _Split:
    """Per-object draws of a quadrant: long-lived objects ``[0, k)`` and single-epoch ones apart.

    Each call draws ``size`` values (``size`` must be the object count) from two fresh
    streams: the long-lived objects' values then do not depend on how many artefacts there
    are, which do(seeing) changes, and a single-epoch source's (asteroids, then artefacts,
    each in exposure order) only on those before it.
    """

    def __init__(self, seed: int, qi: int, key: int, k: int, n: int):
        self.seed, self.qi, self.key, self.k, self.n, self.calls = seed, qi, key, k, n, 0

    def _draw(self, name, *args, size):
        if size != self.n:
            raise ValueError(f"_Split draws one value per object ({self.n}), not {size}")
        k = self.k
        self.calls += 1
        a, b = _rng(self.seed, self.key, self.qi, self.calls), _rng(self.seed, self.key + 1000, self.qi, self.calls)
        head = [x[:k] if np.ndim(x) else x for x in args]
        tail = [x[k:] if np.ndim(x) else x for x in args]
        return np.concatenate([getattr(a, name)(*head, size=k), getattr(b, name)(*tail, size=size - k)])

    def uniform(self, low, high, size):
        return self._draw("uniform", low, high, size=size)

    def normal(self, loc, scale, size):
        return self._draw("normal", loc, scale, size=size)

    def integers(self, low, high, size):
        return self._draw("integers", low, high, size=size)

    def binomial(self, n, p):
        return self._draw("binomial", n, p, size=len(n))


class _PerEpoch:
    """Per-detection draws of a quadrant that belong to (object, exposure), not to list positions.

    Each call takes, for the detections of long-lived objects, their cells of a fresh
    (objects × exposures) matrix of uniforms, and for single-epoch sources (asteroids, then
    artefacts) values from their own stream; the uniforms go through the wanted inverse CDF.
    A real detection then gets the same values whichever other sources are detected — which
    do(seeing) changes.
    """

    def __init__(self, seed: int, qi: int, jj: np.ndarray, ee: np.ndarray, n_real: int, n_e: int,
                 second: np.ndarray | None = None):
        self.seed, self.qi, self.shape, self.calls = seed, qi, (n_real, n_e), 0
        self.real = jj < n_real
        self.cells = (jj[self.real], ee[self.real])
        self.nd = len(jj)
        # Two slots per single-epoch source (a slow asteroid's second detection has its own).
        sec = np.zeros(len(jj), bool) if second is None else second
        self.artefact = 2 * (jj[~self.real] - n_real) + sec[~self.real]

    def _u(self, size):
        if size != self.nd:
            raise ValueError(f"_PerEpoch draws one value per detection ({self.nd}), not {size}")
        self.calls += 1
        u = np.empty(self.nd)
        u[self.real] = _rng(self.seed, 12, self.qi, self.calls).random(self.shape)[self.cells]
        a = self.artefact
        u[~self.real] = _rng(self.seed, 11, self.qi, self.calls).random(int(a.max()) + 1 if len(a) else 0)[a]
        return np.clip(u, 1e-12, 1 - 1e-12)

    def uniform(self, low, high, size):
        return low + (high - low) * self._u(size)

    def normal(self, loc, scale, size):
        from scipy.special import ndtri

        return loc + scale * ndtri(self._u(size))

    def exponential(self, scale, size):
        return -scale * np.log1p(-self._u(size))

    def beta(self, a, b, size):
        from scipy.special import betaincinv

        return betaincinv(a, b, self._u(size))

    def poisson(self, lam, size):
        from scipy.stats import poisson

        return poisson.ppf(self._u(size), lam).astype(np.int64)


def ujy(mag):
    """AB magnitude → µJy."""
    return np.power(10.0, -0.4 * (np.asarray(mag, dtype=float) - 23.9))


def _mag(flux):
    with np.errstate(divide="ignore", invalid="ignore"):
        return 23.9 - 2.5 * np.log10(np.abs(flux))


def jd_to_datetime(jd: float) -> _dt.datetime:
    """JD (UTC) → timezone-aware :class:`datetime.datetime`."""
    return _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC) + _dt.timedelta(days=float(jd) - JD_UNIX0)


def object_id(index: int, year: int, seed: int) -> str:
    """``ZTF23abcdefg``-style id; a bijection of ``index`` so ids look scattered but never collide."""
    n = 26**7
    v = (index * 1_000_003 + (seed * 7919) % n) % n  # 1_000_003 is prime, coprime to 26
    letters = []
    for _ in range(7):
        v, r = divmod(v, 26)
        letters.append(chr(97 + r))
    return f"ZTF{year % 100:02d}{''.join(reversed(letters))}"


# --------------------------------------------------------------------------- astronomy (numpy)


def _gmst_deg(jd):
    return np.mod(280.46061837 + 360.98564736629 * (np.asarray(jd) - 2451545.0), 360.0)


def _ecl_to_eq(lam, beta, jd):
    eps = np.radians(23.439 - 4e-7 * (np.asarray(jd) - 2451545.0))
    lam, beta = np.radians(lam), np.radians(beta)
    ra = np.arctan2(np.sin(lam) * np.cos(eps) - np.tan(beta) * np.sin(eps), np.cos(lam))
    dec = np.arcsin(np.sin(beta) * np.cos(eps) + np.cos(beta) * np.sin(eps) * np.sin(lam))
    return np.mod(np.degrees(ra), 360.0), np.degrees(dec)


def sun_position(jd):
    """Low-precision (0.01°) apparent sun: RA, Dec and ecliptic longitude in degrees."""
    n = np.asarray(jd, dtype=float) - 2451545.0
    g = np.radians(357.528 + 0.9856003 * n)
    lam = 280.460 + 0.9856474 * n + 1.915 * np.sin(g) + 0.020 * np.sin(2 * g)
    ra, dec = _ecl_to_eq(lam, 0.0 * n, jd)
    return ra, dec, np.mod(lam, 360.0)


def moon_position(jd):
    """Low-precision (~0.3°) geocentric moon (Astronomical Almanac series): RA, Dec, λ, β in degrees."""
    t = (np.asarray(jd, dtype=float) - 2451545.0) / 36525.0

    def s(a, b):
        return np.sin(np.radians(a + b * t))

    lam = (218.32 + 481267.881 * t + 6.29 * s(135.0, 477198.87) - 1.27 * s(259.3, -413335.36)
           + 0.66 * s(235.7, 890534.22) + 0.21 * s(269.9, 954397.74) - 0.19 * s(357.5, 35999.05)
           - 0.11 * s(186.5, 966404.03))
    beta = (5.13 * s(93.3, 483202.02) + 0.28 * s(228.2, 960400.89) - 0.28 * s(318.3, 6003.15)
            - 0.17 * s(217.6, -407332.21))
    ra, dec = _ecl_to_eq(lam, beta, jd)
    return ra, dec, np.mod(lam, 360.0), beta


def altitude(ra, dec, jd, lat=PALOMAR_LAT, lon=PALOMAR_LON):
    """Altitude (degrees) of (ra, dec) seen from the site at ``jd``."""
    ha = np.radians(_gmst_deg(jd) + lon - np.asarray(ra))
    d, phi = np.radians(dec), np.radians(lat)
    return np.degrees(np.arcsin(np.sin(phi) * np.sin(d) + np.cos(phi) * np.cos(d) * np.cos(ha)))


def airmass(alt_deg):
    """Kasten & Young (1989) airmass; large but finite near the horizon."""
    alt = np.maximum(np.asarray(alt_deg, dtype=float), 0.5)
    return 1.0 / (np.sin(np.radians(alt)) + 0.50572 * (alt + 6.07995) ** -1.6364)


def separation(ra1, dec1, ra2, dec2):
    """Angular separation in degrees."""
    r1, d1, r2, d2 = map(np.radians, (ra1, dec1, ra2, dec2))
    c = np.sin(d1) * np.sin(d2) + np.cos(d1) * np.cos(d2) * np.cos(r1 - r2)
    return np.degrees(np.arccos(np.clip(c, -1.0, 1.0)))


def ecliptic_latitude(ra, dec):
    """Ecliptic latitude (deg) of ICRS ra/dec (deg), obliquity 23.44°."""
    ra, dec, eps = np.radians(ra), np.radians(dec), np.radians(23.44)
    return np.degrees(np.arcsin(np.sin(dec) * np.cos(eps) - np.cos(dec) * np.sin(eps) * np.sin(ra)))


def _sso_rate(cfg: SimConfig, ra: float, dec: float) -> float:
    """Mean asteroids per pid: the mode's rate on the ecliptic, a fifth of it far from it."""
    return SSO_PER_PID[cfg.mode] * (0.2 + 0.8 * np.exp(-abs(float(ecliptic_latitude(ra, dec))) / 15.0))


def moon_illumination(jd):
    """Illuminated fraction of the moon (0 new … 1 full)."""
    _, _, lsun = sun_position(jd)
    _, _, lmoon, beta = moon_position(jd)
    cos_elong = np.cos(np.radians(beta)) * np.cos(np.radians(lmoon - lsun))
    return (1.0 - cos_elong) / 2.0


# --------------------------------------------------------------------------- survey


def _quadrant_offset(rcid):
    """(dx, dy) of a readout quadrant's centre from the field centre, degrees (8×8 grid)."""
    rcid = np.asarray(rcid)
    ccd, q = rcid // 4, rcid % 4
    col = (ccd % 4) * 2 + q % 2
    row = (ccd // 4) * 2 + q // 2
    return (col - 3.5) * QUAD_DEG, (row - 3.5) * QUAD_DEG


def _plan(cfg: SimConfig, boost: float = 1.0):
    """Grow quadrants, then fields, until the expected alert count reaches ``n_alerts``."""
    fields, quads = cfg.fields, cfg.quadrants
    if cfg.n_alerts:
        per = ALERTS_PER_QUAD_NIGHT[cfg.mode] * cfg.nights
        need = math.ceil(boost * 1.15 * cfg.n_alerts / per)  # 15 % margin: the cut is exact, shortfalls are not
        while fields * quads < need:
            if quads < 64:
                quads += 1
            else:
                fields += 1
    return fields, quads


def _survey(cfg: SimConfig, boost: float = 1.0):
    """Fields, exposures and per-pid conditions. Returns (fields list, pid DataFrame)."""
    import pandas as pd

    rng = _rng(cfg.seed, 0)
    n_fields, n_quads = _plan(cfg, boost)
    n_days = cfg.history_days + cfg.nights
    days = cfg.start_jd + np.arange(n_days)
    # Night windows: sun below −12° on a 5-minute grid from 02:30 to 13:00 UT.
    grid = days[:, None] + np.linspace(2.5 / 24, 13.0 / 24, 127)[None, :]
    sra, sdec, _ = sun_position(grid)
    dark = altitude(sra, sdec, grid) < -12.0

    mid = cfg.start_jd + n_days // 2 + 8.0 / 24  # ~local midnight in the middle of the run
    lst_mid = (_gmst_deg(mid) + PALOMAR_LON) % 360.0
    field_ids = np.sort(rng.choice(np.arange(245, 881), size=n_fields, replace=False))
    f_ra = (lst_mid + rng.uniform(-35, 35, n_fields)) % 360.0
    f_dec = rng.uniform(-5, 60, n_fields)
    rcids = [np.sort(rng.choice(64, size=n_quads, replace=False)) for _ in range(n_fields)]

    # Weather: a two-state Markov chain of bad nights; cloud extinction on the rest.
    bad = np.zeros(n_days, bool)
    for d in range(1, n_days):
        bad[d] = rng.random() < (0.5 if bad[d - 1] else 0.12)
    # Alert nights are observed (partially cloudy at worst); with the public cadence only every
    # other one (the last included), so half of them have no exposures at all.
    bad[cfg.history_days:] = False
    cloudy = rng.random(n_days) < 0.35
    night_cloud = np.where(cloudy, rng.uniform(0.05, 0.8, n_days), rng.uniform(0.0, 0.03, n_days))
    night_seeing = SEEING_MEDIAN * np.exp(rng.normal(0, 0.18, n_days))

    exps = []  # (field index, jd, fid, night)
    for d in range(n_days):
        if bad[d] or not dark[d].any():
            continue
        t_dark = grid[d, dark[d]]
        for fi in range(n_fields):
            alt = altitude(f_ra[fi], f_dec[fi], t_dark)
            up = t_dark[alt > 30.0]
            if len(up) < 4:
                continue
            t0, t1 = up[0], up[-1]
            span = t1 - t0
            ta = t0 + rng.uniform(0, 0.3) * span
            tb = min(ta + max(1.5 / 24, rng.uniform(0.3, 0.6) * span), t1)
            visits = [ta, tb] + ([rng.uniform(ta, t1)] if rng.random() < 0.25 else [])
            if cfg.cadence == "public":  # every other night (the last alert night included), one g+r visit
                if (n_days - 1 - d) % 2:
                    continue
                visits = visits[:1]
            for tv in visits:
                order = (1, 2) if rng.random() < 0.5 else (2, 1)
                for k, fid in enumerate(order):
                    if rng.random() < 0.08:
                        continue  # single exposure lost (clouds, focus, fault)
                    exps.append((fi, tv + k * (rng.uniform(25, 45) / 1440.0), fid, d))
    exps.sort(key=lambda x: x[1])
    # Exposures are sequential on one telescope: keep ≥ 40 s between any two.
    jds = [e[1] for e in exps]
    for k in range(1, len(jds)):
        jds[k] = max(jds[k], jds[k - 1] + 40.0 / 86400.0)
    n_exp = len(exps)
    e_field = np.array([e[0] for e in exps], int)
    e_fid = np.array([e[2] for e in exps], int)
    e_night = np.array([e[3] for e in exps], int)
    e_jd = np.round(np.array(jds), 7)
    e_cloud = np.clip(night_cloud[e_night] * np.exp(rng.normal(0, 0.3, n_exp)), 0, 1.5)
    e_seeing = night_seeing[e_night] * np.exp(rng.normal(0, 0.08, n_exp)) * np.where(e_fid == 1, 1.05, 1.0)
    nid = np.floor(e_jd - NID0_JD).astype(np.int64)
    frac = np.round((e_jd - NID0_JD - nid) * 1e7).astype(np.int64)
    exp_code = nid * 10**7 + frac
    mra, mdec, _, _ = moon_position(e_jd)
    m_alt = altitude(mra, mdec, e_jd)
    m_ill = moon_illumination(e_jd)
    first = 0 if cfg.seeing_nights is None else n_days - cfg.seeing_nights  # the intervened nights
    if cfg.moon is not None:  # do(moon); the ephemeris draws nothing, so no draw moves
        m_ill = np.where(e_night >= first, float(cfg.moon), m_ill)
    z_exp = cfg.sys_scale * (rng.normal(0, 0.012, n_exp) + 0.05 * e_cloud)

    rows = []
    for ei in range(n_exp):
        fi = e_field[ei]
        for rc in rcids[fi]:
            rows.append((ei, fi, int(rc)))
    ei = np.array([r[0] for r in rows], int)
    fi = np.array([r[1] for r in rows], int)
    rc = np.array([r[2] for r in rows], int)
    n = len(rows)
    dx, dy = _quadrant_offset(rc)
    q_dec = f_dec[fi] + dy
    q_ra = (f_ra[fi] + dx / np.cos(np.radians(q_dec))) % 360.0
    jd = e_jd[ei]
    fid = e_fid[ei]
    alt = altitude(q_ra, q_dec, jd)
    xm = airmass(alt)
    radius = np.hypot(dx, dy) / (4 * QUAD_DEG)
    seeing = e_seeing[ei] * (1 + 0.04 * radius + rng.normal(0, 0.02, n))
    if cfg.seeing is not None:  # after the draws, so that the rest stays the same
        seeing = np.where(e_night[ei] >= first, float(cfg.seeing), seeing)
    cloud = np.clip(e_cloud[ei] * np.exp(rng.normal(0, 0.1, n)), 0, 1.5)
    msep = separation(q_ra, q_dec, mra[ei], mdec[ei])
    moon_up = m_alt[ei] > 0
    moon_factor = moon_up * m_ill[ei] ** 1.5 * np.where(fid == 1, 4.0, 2.5) * (0.3 + 2.0 * np.exp(-msep / 25.0))
    sky = np.array([SKY_DARK[f] for f in fid]) - 2.5 * np.log10(1 + moon_factor) - 0.1 * (xm - 1)
    zp_nom = np.array([ZP0[f] for f in fid]) - np.array([KEXT[f] for f in fid]) * (xm - 1)
    magzp = zp_nom - cloud + rng.normal(0, 0.005, n)
    bkg = 10 ** (-0.4 * (sky - magzp)) * PIXSCALE**2  # DN / pixel
    lim0 = np.array([LIM0[f] for f in fid])
    lim = (lim0 - 1.25 * np.log10(10 ** (-0.4 * (sky - np.array([SKY_DARK[f] for f in fid]))))
           - 2.5 * np.log10(seeing / SEEING_MEDIAN) - 0.1 * (xm - 1) - cloud + rng.normal(0, 0.05, n))
    sig_bg = ujy(lim) / 5.0
    s = cfg.sys_scale
    z_q = s * (rng.normal(0, 0.008, n) + 0.03 * cloud * rng.normal(0, 1, n))
    kappa = s * 0.04 * (seeing / SEEING_MEDIAN - 1)
    colour = s * (rng.normal(0, 0.015, n) + 0.02 * (xm - 1))
    add = s * rng.normal(0, 0.3, n) * sig_bg
    pid = exp_code[ei] * 100 + rc
    # Cross-match outages: some nights a run of exposures goes out with fill values in place of
    # the PS1/Gaia/solar-system match (as in one real run, see stream.decode.ZTF_MATCH_RADIUS).
    # Own stream, after every other draw: the rest of the survey does not change with it.
    # The run starts at one of the night's exposures, so an outage night always has one.
    orng = _rng(cfg.seed, 13)
    hit, pick = orng.random(n_days) < XMATCH_OUTAGE_NIGHTS, orng.random(n_days)
    out_len = orng.uniform(1.0, 3.0, n_days) / 24
    out_start = np.full(n_days, np.inf)
    for d in np.flatnonzero(hit):
        t_night = e_jd[e_night == d]
        if len(t_night):
            out_start[d] = t_night[int(pick[d] * len(t_night))]
    outage = (jd >= out_start[e_night[ei]]) & (jd < out_start[e_night[ei]] + out_len[e_night[ei]])
    night_dates = [jd_to_datetime(cfg.start_jd + d).strftime("%Y%m%d") for d in range(n_days)]

    pids = pd.DataFrame({
        "pid": pid, "exposure_id": exp_code[ei], "field": field_ids[fi], "rcid": rc, "ccd": rc // 4 + 1,
        "qid": rc % 4 + 1, "fid": fid, "band": [BANDS[f] for f in fid], "jd": jd, "mjd": jd - 2400000.5,
        "nid": nid[ei], "night": e_night[ei], "night_date": [night_dates[d] for d in e_night[ei]],
        "alert_window": e_night[ei] >= cfg.history_days, "ra_center": q_ra, "dec_center": q_dec,
        "altitude_deg": alt, "airmass": xm, "seeing_arcsec": seeing, "sciinpseeing": seeing / PIXSCALE,
        "cloud_mag": cloud, "sky_mag": sky, "scibckgnd": bkg, "scisigpix": np.sqrt(bkg / 6.2 + 64.0),
        "moon_illum": m_ill[ei], "moon_sep_deg": msep, "moon_alt_deg": m_alt[ei], "diffmaglim": lim,
        "sigma_bg_ujy": sig_bg, "zp_nominal": zp_nom, "magzpsci": magzp,
        "magzpscirms": 0.03 + 0.05 * cloud + 0.005 * np.abs(seeing - SEEING_MEDIAN) + rng.uniform(0, 0.01, n),
        "clrcoeff": np.array([CLR0[f] for f in fid]) + 0.03 * (xm - 1) + rng.normal(0, 0.01, n),
        "nmatches": np.maximum(50, (1500 * 10 ** (-0.4 * cloud) * rng.uniform(0.7, 1.3, n))).astype(int),
        "sys_zp_exposure_mag": z_exp[ei], "sys_zp_quadrant_mag": z_q, "sys_zp_mag": z_exp[ei] + z_q,
        "sys_seeing_mag": kappa, "sys_colour_mag": colour, "sys_additive_ujy": add, "xmatch_outage": outage,
    })
    fields = [{"field": int(field_ids[k]), "ra": float(f_ra[k]), "dec": float(f_dec[k]), "rcids": rcids[k]}
              for k in range(n_fields)]
    return fields, pids


# --------------------------------------------------------------------------- objects and light curves


def _draw_objects(cfg: SimConfig, rng, q_ra, q_dec, t_lo, t_hi, alert_lo, alert_hi):
    """Objects of one quadrant (without bogus): a dict of equal-length arrays."""
    k = MODES.index(cfg.mode)
    cls = []
    for c, counts in POPULATION.items():
        cls += [c] * int(rng.poisson(counts[k]) if counts[k] < 20 else counts[k])
    cls = np.array(cls, dtype=object)
    n = len(cls)
    o = {"class": cls}
    u = rng.uniform
    half = QUAD_DEG / 2 * 0.98
    o["dec"] = q_dec + u(-half, half, n)
    o["ra"] = (q_ra + u(-half, half, n) / np.cos(np.radians(o["dec"]))) % 360.0
    nan = np.full(n, np.nan)
    mag_r, gr = nan.copy(), nan.copy()
    for c, lo, hi, c_lo, c_hi in (("constant", 13.5, 18.0, -0.2, 1.6), ("periodic", 14.0, 18.5, 0.2, 1.2),
                                  ("cv", 18.5, 22.5, 0.3, 0.8), ("flare", 16.5, 22.0, 1.3, 1.6),
                                  ("pm_star", 14.0, 18.0, 0.4, 1.5)):
        m = cls == c
        mag_r[m] = u(lo, hi, m.sum())
        gr[m] = u(c_lo, c_hi, m.sum()) if c != "constant" else np.clip(rng.normal(0.75, 0.3, m.sum()), c_lo, c_hi)
    is_star = np.isin(cls, list(STARS))
    is_agn = cls == "agn"
    is_tr = np.isin(cls, ["fast", "sn", "slow_sn"])
    host = is_agn | (is_tr & (u(0, 1, n) < np.where(cls == "fast", 0.5, 0.8)))
    host_mag = np.where(host, u(17.5, 23.0, n), np.nan)
    host_sep = np.where(is_agn, u(0.0, 0.15, n), np.where(host, u(0.2, 2.5, n), np.nan))
    host_gr = np.where(host, u(0.6, 1.0, n), np.nan)
    # Flux at the position in the reference image: the star, or the host light within the PSF.
    ref_r = np.where(is_star, ujy(mag_r), 0.0)
    ref_r = np.where(host, ujy(host_mag) * 0.3 * np.exp(-np.nan_to_num(host_sep) / 2.0), ref_r)
    colour_ref = np.where(is_star, gr, np.where(host, host_gr, 0.5))
    o.update(mag_r=mag_r, gr=gr, has_host=host, host_mag=host_mag, host_sep=host_sep, host_gr=host_gr,
             ref_flux_r=ref_r, ref_flux_g=ref_r * 10 ** (-0.4 * colour_ref), colour=colour_ref)
    lam = np.clip(1 + 0.2 * (16.5 - np.nan_to_num(mag_r, nan=16.5)) + 0.25 * (np.nan_to_num(gr, nan=0.7) - 0.7)
                  + rng.normal(0, 0.15, n), 0.2, 2.5)
    lam = np.where(host, 1.6 + rng.normal(0, 0.3, n), np.where(is_star, lam, 1.0))
    o["loading"] = lam
    o["ref_mismatch"] = np.where(is_star, rng.normal(0, 0.025, n), np.where(host, rng.normal(0, 0.01, n), 0.0))

    # Class parameters (NaN where not used).
    p = {name: nan.copy() for name in ("period", "amp", "t0", "t_peak", "tau_rise", "tau_fall", "peak_mag",
                                       "recur", "pm_arcsec_yr", "pm_pa", "tau_drw", "sf_drw", "rate")}
    m = cls == "periodic"
    p["period"][m] = 10 ** u(np.log10(0.05), np.log10(30), m.sum())
    p["amp"][m] = u(0.05, 0.6, m.sum())
    p["t0"][m] = u(0, 30, m.sum())
    m = cls == "cv"
    p["amp"][m] = u(3, 5, m.sum())
    # Dwarf novae recur every few weeks (SS Cyg types) to years (WZ Sge types); the simulated
    # ones outburst around the alert nights, and the long-recurrence ones are new sources then.
    p["recur"][m] = 10 ** u(np.log10(15), np.log10(1500), m.sum())
    p["t0"][m] = u(alert_lo - 10, alert_hi - 0.5, m.sum())
    p["tau_rise"][m] = u(0.5, 1.5, m.sum())
    p["tau_fall"][m] = u(3, 8, m.sum())  # plateau length
    m = cls == "flare"
    p["rate"][m] = FLARE_RATE
    m = cls == "pm_star"
    p["pm_arcsec_yr"][m] = u(0.05, 0.3, m.sum())
    p["pm_pa"][m] = u(0, 2 * np.pi, m.sum())
    for c, pk, tr, tf, win in (("fast", (17.5, 20.0), (0.3, 1.0), (1.5, 4.0), (-3.0, 3.0)),
                               ("sn", (17.0, 19.8), (2.5, 5.0), (15.0, 35.0), (-25.0, 10.0)),
                               ("slow_sn", (17.5, 19.5), (10.0, 25.0), (60.0, 150.0), (-60.0, 10.0))):
        m = cls == c
        p["peak_mag"][m] = u(*pk, m.sum())
        p["tau_rise"][m] = u(*tr, m.sum())
        p["tau_fall"][m] = u(*tf, m.sum())
        p["t_peak"][m] = u(alert_lo + win[0], alert_hi + win[1], m.sum())
    m = is_agn
    p["peak_mag"][m] = u(16.5, 19.5, m.sum())  # nucleus mean magnitude
    p["tau_drw"][m] = u(100, 400, m.sum())
    p["sf_drw"][m] = u(0.15, 0.35, m.sum())
    o.update(p)
    o["ref_flux_r"] = np.where(m, o["ref_flux_r"] + ujy(p["peak_mag"]), o["ref_flux_r"])
    o["ref_flux_g"] = np.where(m, o["ref_flux_g"] + ujy(p["peak_mag"]) * 10 ** (-0.4 * 0.4), o["ref_flux_g"])
    # Flares: event lists per object (few per star).
    o["flares"] = [None] * n
    for j in np.flatnonzero(cls == "flare"):
        nf = rng.poisson(FLARE_RATE * (t_hi - t_lo))
        o["flares"][j] = (u(t_lo, t_hi, nf), u(0.5, 3.0, nf), u(0.02, 0.15, nf))
    o["n_flares"] = np.array([0 if f is None else len(f[0]) for f in o["flares"]])
    return o


def _bazin(t, t_peak, tr, tf):
    """Bazin rise/decline normalised to 1 at ``t_peak`` (requires tf > 2 tr)."""
    dt0 = tr * np.log(np.maximum(tf / tr - 1.0, 1.0 + 1e-6))
    t0 = t_peak - dt0

    def f(x):
        z = np.clip(-(x - t0) / tr, -60, 60)
        return np.exp(-np.clip((x - t0) / tf, -60, 60)) / (1 + np.exp(z))

    return f(t) / f(t_peak)


def _signals(o, t, fid, seeing, rng):
    """Astrophysical difference flux Q (µJy) of every object at every exposure: (n_obj, n_exp)."""
    cls = o["class"]
    n, m_ = len(cls), len(t)
    T = t[None, :]
    g = (fid == 1)[None, :]
    Q = np.zeros((n, m_))
    f_r, f_g = o["ref_flux_r"][:, None], o["ref_flux_g"][:, None]
    fband = np.where(g, f_g, f_r)

    m = cls == "periodic"
    if m.any():
        amp = o["amp"][m, None] * np.where(g, 1.3, 1.0)
        phase = np.sin(2 * np.pi * (T - o["t0"][m, None]) / o["period"][m, None])
        Q[m] = fband[m] * (10 ** (-0.4 * amp * phase) - 1)
    m = cls == "cv"
    if m.any():
        rec, tr, pl, A = (o[k][m, None] for k in ("recur", "tau_rise", "tau_fall", "amp"))
        tau = np.mod(T - o["t0"][m, None], rec)
        dm = np.where(tau < tr, A * tau / tr, np.where(tau < tr + pl, A - 0.1 * (tau - tr),
                                                       A - 0.1 * pl - 1.2 * (tau - tr - pl)))
        # Outbursts are blue: their difference flux has g − r ≈ 0, the same signal in both bands.
        sig_r = f_r[m] * (10 ** (0.4 * np.clip(dm, 0, None)) - 1)
        Q[m] = np.where(g, sig_r, sig_r)
    m = cls == "flare"
    for j in np.flatnonzero(m):
        tf_, amp, tau = o["flares"][j]
        for k in range(len(tf_)):
            dt = t - tf_[k]
            prof = np.where(dt >= 0, np.exp(-np.clip(dt, 0, None) / tau[k]), 0.0)
            boost = 10 ** (0.4 * amp[k]) - 1
            # The flare is hot (~10,000 K): its difference flux is blue whatever the red star's colour.
            Q[j] += prof * f_g[j, 0] * boost * np.where(fid == 1, 1.0, 10 ** (0.4 * FLARE_GR))
    m = cls == "pm_star"
    if m.any():
        d = o["pm_arcsec_yr"][m, None] * (T - REF_JD) / 365.25
        s = seeing[None, :] / 2.355
        Q[m] = fband[m] * (1 - np.exp(-(d**2) / (4 * s**2)))
    for c, gr0, slope in (("fast", -0.2, 0.05), ("sn", -0.1, 0.035), ("slow_sn", 0.0, 0.01)):
        m = cls == c
        if m.any():
            shape = _bazin(T, o["t_peak"][m, None], o["tau_rise"][m, None], o["tau_fall"][m, None])
            peak = ujy(o["peak_mag"][m, None])
            colour = np.clip(gr0 + slope * np.clip(T - o["t_peak"][m, None], 0, None), -0.3, 1.2)
            Q[m] = peak * shape * np.where(g, 10 ** (-0.4 * colour), 1.0)
    m = cls == "agn"
    if m.any():
        # Damped random walk in magnitudes, exact OU recursion on the exposure times.
        tau, sf = o["tau_drw"][m], o["sf_drw"][m]
        sig = sf / np.sqrt(2)
        dm = np.zeros((m.sum(), m_))
        dm[:, 0] = rng.normal(0, sig)
        for k in range(1, m_):
            a = np.exp(-(t[k] - t[k - 1]) / tau)
            dm[:, k] = a * dm[:, k - 1] + rng.normal(0, 1, m.sum()) * sig * np.sqrt(1 - a**2)
        nuc = ujy(o["peak_mag"][m, None]) * np.where(g, 10 ** (-0.4 * 0.4), 1.0)
        Q[m] = nuc * (10 ** (-0.4 * dm * np.where(g, 1.25, 1.0)) - 1)
    return Q


# --------------------------------------------------------------------------- Avro pieces

PUBLISHER = "Vigil simulator (ZTF 4.02 layout)"
_F32 = struct.Struct("<f")
_FP_GOOD_TAIL = b"\x02\x020"  # procstatus: union branch 1, string "0"
_FP_BAD_TAIL = b"\x02\x0456"  # procstatus "56" (no measurement)


def _avro_long(n: int) -> bytes:
    """Avro zig-zag varint."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z & ~0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _avro_str(s: str) -> bytes:
    b = s.encode()
    return _avro_long(len(b)) + b


class _Codec:
    """Parsed sub-schemas for assembling alert bytes from cached pieces.

    An Avro record is the concatenation of its fields' encodings, so repeated pieces
    (a pid's upper-limit row, a detection in later alerts' histories, the exposure part of
    a forced-photometry row) are encoded once and joined; tests check the result is
    byte-identical to fastavro encoding the whole record.
    """

    def __init__(self):
        import fastavro

        names = [f[0] for f in FP_HIST_FIELDS]
        i_flux, i_dist = names.index("forcediffimflux"), names.index("distnr")
        assert names[i_flux:i_dist] == ["forcediffimflux", "forcediffimfluxunc", "procstatus"]
        self._w = fastavro.schemaless_writer
        self.cand = fastavro.parse_schema(record_schema("candidate", CANDIDATE_FIELDS))
        self.prv = fastavro.parse_schema(record_schema("prv_candidate", PRV_CANDIDATE_FIELDS))
        self.fp_pre = fastavro.parse_schema(record_schema("fp_pre", FP_HIST_FIELDS[:i_flux]))
        self.fp_suf = fastavro.parse_schema(record_schema("fp_suf", FP_HIST_FIELDS[i_dist:]))

    def enc(self, schema, rec: dict) -> bytes:
        buf = io.BytesIO()
        self._w(buf, schema, rec)
        return buf.getvalue()


# --------------------------------------------------------------------------- one quadrant


def _append(o: dict, cls: str, ra, dec, n: int, **values) -> None:
    """Append ``n`` single-epoch sources of class ``cls`` to ``o``.

    They have no reference flux, host or class parameters; ``values`` gives the columns they do have.
    """
    for key in list(o):
        if key == "class":
            o[key] = np.concatenate([o[key], np.array([cls] * n, dtype=object)])
        elif key in ("ra", "dec"):
            o[key] = np.concatenate([o[key], ra if key == "ra" else dec])
        elif key == "flares":
            o[key] = o[key] + [None] * n
        elif key == "has_host":
            o[key] = np.concatenate([o[key], np.zeros(n, bool)])
        elif key in ("ref_flux_r", "ref_flux_g", "ref_mismatch", "n_flares"):
            o[key] = np.concatenate([o[key], np.zeros(n, o[key].dtype)])
        elif key == "loading":
            o[key] = np.concatenate([o[key], np.ones(n)])
        elif key in values:
            o[key] = np.concatenate([o[key], values[key]])
        else:
            o[key] = np.concatenate([o[key], np.full(n, np.nan)])


class _Quad:
    """All objects and exposures of one (field, rcid): matrices, detections, record builder."""

    def __init__(self, cfg: SimConfig, qi: int, fld: dict, rcid: int, ex, obj_offset: int, alert_jd0: float,
                 id_offset: int = 0):
        import pandas as pd

        rng = _rng(cfg.seed, 1, qi)
        self.cfg, self.qi, self.field, self.rcid = cfg, qi, fld["field"], rcid
        ex = ex.sort_values("jd", kind="stable").reset_index(drop=True)
        self.ex = ex
        self.outage = ex["xmatch_outage"].to_numpy(bool)
        t, fid = ex["jd"].to_numpy(), ex["fid"].to_numpy()
        seeing = ex["seeing_arcsec"].to_numpy()
        win = ex["alert_window"].to_numpy()
        n_e = len(ex)
        q_ra, q_dec = float(ex["ra_center"].iloc[0]), float(ex["dec_center"].iloc[0])
        t_lo, t_hi = cfg.start_jd, cfg.start_jd + cfg.history_days + cfg.nights
        alert_lo, alert_hi = alert_jd0, t_hi
        o = _draw_objects(cfg, rng, q_ra, q_dec, t_lo, t_hi, alert_lo, alert_hi)
        Q = _signals(o, t, fid, seeing, rng)
        n_real = len(o["class"])

        # Single-epoch sources follow the long-lived ones, asteroids first, then artefacts: the
        # per-object streams (_Split, _PerEpoch) give everything from n_real on its own stream,
        # and the asteroids, whose number does not depend on seeing, come before the artefacts,
        # whose number does.
        half = QUAD_DEG / 2 * 0.98

        # Asteroids: one epoch each (in 30 s one moves far less than the PSF, and by the next
        # visit it is elsewhere), bar the slow ones below; no history at the position and no
        # catalogued counterpart. Own streams: the other draws of the quadrant do not move.
        def srng(k):
            return _rng(cfg.seed, 14, qi, k)

        ns = np.where(win, srng(0).poisson(_sso_rate(cfg, q_ra, q_dec), n_e), 0)
        s_epoch = np.repeat(np.arange(n_e), ns)
        nsso = len(s_epoch)
        s_dec = q_dec + srng(1).uniform(-half, half, nsso)
        s_ra = (q_ra + srng(2).uniform(-half, half, nsso) / np.cos(np.radians(s_dec))) % 360.0
        # r 17–21.5 with N(< r) ∝ 10^(0.3 r); solar colours; the fainter, the less often catalogued.
        s_mag = 17.0 + np.log10(1 + srng(3).random(nsso) * (10 ** (0.3 * 4.5) - 1)) / 0.3
        s_gr = srng(4).uniform(0.45, 0.75, nsso)
        s_known = srng(5).random(nsso) < np.clip(0.95 - 0.17 * (s_mag - 19.5), 0.6, 0.95)
        # ZTF reports ssdistnr in whole arcsec: 0 for 98 % of the real matches here, else 1.
        self.sso_dist = np.where(s_known, np.round(np.abs(srng(6).normal(0, 0.21, nsso))), np.nan)
        self.sso_vmag = s_mag + 0.2 + srng(7).normal(0, 0.3, nsso)
        # A slow mover (8 %, e.g. near its stationary point) is still within the 1.5″ association
        # radius at the next exposure if that comes within the hour (the other band of the visit):
        # a second detection of the same object, offset by its motion (as for 7 % of the real
        # known-asteroid alerts here, which have two or three).
        nxt = np.append(np.arange(1, n_e), -1)
        nxt = np.where((nxt >= 0) & (t[np.maximum(nxt, 0)] - t < 1 / 24), nxt, -1)
        slow = srng(10).random(nsso) < 0.08
        self.sso_epoch2 = np.where(slow, nxt[s_epoch], -1) if nsso else np.zeros(0, np.int64)
        pa = srng(11).uniform(0, 2 * np.pi, nsso)
        self.sso_drift = srng(12).uniform(0.3, 1.2, nsso)[:, None] * np.column_stack([np.sin(pa), np.cos(pa)])
        _append(o, "sso", s_ra, s_dec, nsso, mag_r=s_mag, gr=s_gr, colour=s_gr)
        Qs = np.zeros((nsso, n_e))
        for ep in (s_epoch, self.sso_epoch2):
            k = np.flatnonzero(ep >= 0)
            Qs[k, ep[k]] = ujy(s_mag[k]) * np.where(fid[ep[k]] == 1, 10 ** (-0.4 * s_gr[k]), 1.0)
        Q = np.vstack([Q, Qs])

        # Bogus: single-epoch artefacts in alert-night exposures, more in bad seeing and moonlight.
        # Each of their quantities has its own stream, drawn in exposure order, and the real
        # objects' draws never pass through theirs: do(seeing) changes the artefact count, and
        # runs can be compared only if everything else keeps its draws.
        def brng(k):
            return _rng(cfg.seed, 4, qi, k)

        moon = (ex["moon_alt_deg"].to_numpy() > 0) * ex["moon_illum"].to_numpy()
        base = BOGUS_PER_PID[cfg.mode] if cfg.bogus_per_pid is None else cfg.bogus_per_pid
        rate = base * (seeing / SEEING_MEDIAN) ** 2 * (1 + 0.5 * moon)
        nb = np.where(win, brng(0).poisson(rate), 0)
        b_epoch = np.repeat(np.arange(n_e), nb)
        nbog = len(b_epoch)
        b_dec = q_dec + brng(1).uniform(-half, half, nbog)
        b_ra = (q_ra + brng(2).uniform(-half, half, nbog) / np.cos(np.radians(b_dec))) % 360.0
        _append(o, "bogus", b_ra, b_dec, nbog)
        o["sso_epoch"] = np.concatenate([np.full(n_real, -1), s_epoch, np.full(nbog, -1)])
        o["sso_epoch2"] = np.concatenate([np.full(n_real, -1), self.sso_epoch2, np.full(nbog, -1)])
        o["ssdistnr"] = np.concatenate([np.full(n_real, np.nan), self.sso_dist, np.full(nbog, np.nan)])
        o["bogus_epoch"] = np.concatenate([np.full(n_real + nsso, -1), b_epoch])
        n = len(o["class"])
        Q = np.vstack([Q, np.zeros((nbog, n_e))])

        # Systematics, noise, measurement.
        g = (fid == 1)[None, :]
        fref = np.where(g, o["ref_flux_g"][:, None], o["ref_flux_r"][:, None])
        fpos = np.clip(fref + Q, 0, None)
        delta = (ex["sys_zp_mag"].to_numpy()[None, :] + o["loading"][:, None] * ex["sys_seeing_mag"].to_numpy()[None, :]
                 + (np.nan_to_num(o["colour"], nan=0.5)[:, None] - 0.6) * ex["sys_colour_mag"].to_numpy()[None, :])
        sys = fpos * (10 ** (-0.4 * delta) - 1) + ex["sys_additive_ujy"].to_numpy()[None, :]
        nuis = np.repeat((o["ref_mismatch"])[:, None], n_e, axis=1) * fref
        sig_bg = ex["sigma_bg_ujy"].to_numpy()[None, :]
        err = np.sqrt(sig_bg**2 + PHOTON_GAIN_UJY * fpos + (NOISE_FLOOR * fpos) ** 2)
        # Artefact flux of bogus objects, at their one epoch only.
        bi = np.flatnonzero(o["bogus_epoch"] >= 0)
        be = o["bogus_epoch"][bi]
        sign = np.where(brng(3).random(len(bi)) < 0.35, -1.0, 1.0)
        nuis[bi, be] = sign * (5.0 + brng(4).exponential(2.5, len(bi))) * err[bi, be]
        noise = np.vstack([rng.normal(0, 1, (n_real, n_e)), srng(8).normal(0, 1, (nsso, n_e)),
                           brng(5).normal(0, 1, (nbog, n_e))]) * err
        meas = Q + sys + nuis + noise
        det = np.abs(meas) >= 5.0 * err
        # A bogus "object" exists only at its epoch: elsewhere it is empty sky, never detected;
        # an asteroid is detected at its epoch if bright enough, and is gone from there after.
        for j, e in zip(bi, be, strict=True):
            det[j, :] = False
            det[j, e] = True
        si = n_real + np.arange(nsso)
        seen = det[si].copy()
        det[si, :] = False
        for ep in (s_epoch, self.sso_epoch2):
            k = np.flatnonzero(ep >= 0)
            det[si[k], ep[k]] = seen[k, ep[k]]
        fp_bad = np.vstack([rng.random((n_real, n_e)), srng(9).random((nsso, n_e)),
                            brng(6).random((nbog, n_e))]) < cfg.fp_bad_fraction

        self.o, self.n_obj = o, n
        self.t, self.fid, self.win = t, fid, win
        self.Q, self.sys, self.nuis, self.noise, self.meas, self.err, self.det = Q, sys, nuis, noise, meas, err, det
        self.delta, self.fref, self.fp_bad = delta, fref, fp_bad
        self.obj_index = obj_offset + np.arange(n)
        self.n_real = n_real
        self._ids(_Split(cfg.seed, qi, 5, n_real, n), id_offset)
        self._static(_Split(cfg.seed, qi, 7, n_real, n))
        self._detections()
        self._exposure_parts()
        self.win_start = np.searchsorted(t, t - HISTORY_DAYS, side="left")
        self._pd = pd
        self._nondet_bytes = self._fp_prefix = None
        self.kept = self.alert_rows()  # narrowed by an n_alerts cut in _run
        self._det_cache: dict[int, bytes] = {}

    # -- identities --------------------------------------------------------------

    def _ids(self, rng, id_offset: int):
        o, cfg, t = self.o, self.cfg, self.t
        n, n_e = self.n_obj, len(t)
        cls = o["class"]
        old = np.isin(cls, list(STARS) + ["agn"])  # persistent sources have years of history
        # Years of earlier survey history, detected as often as in the simulated history nights.
        hist = ~self.win if (~self.win).any() else np.ones_like(self.win)
        det_frac = self.det[:, hist].mean(axis=1)
        ncov_pre = np.where(cls == "bogus", rng.integers(300, 1200, n), rng.integers(600, 1300, n))
        jdstart = 2458200.0 + rng.uniform(0, 300, n)
        ndet_pre = np.where(old, rng.binomial(ncov_pre, np.clip(det_frac, 0, 1)), 0)
        self.ncov_pre, self.ndet_pre = ncov_pre, ndet_pre
        self.jdstart_pre = np.where(ndet_pre > 0, jdstart, np.nan)
        first = np.where(self.det.any(axis=1), t[np.argmax(self.det, axis=1)], np.nan)
        first_jd = np.where(np.isfinite(self.jdstart_pre), self.jdstart_pre, first)
        year = np.array([jd_to_datetime(x).year if np.isfinite(x) else 2023 for x in first_jd])
        # Ids number long-lived objects and single-epoch sources apart (the latter by quadrant,
        # asteroids before artefacts), so that no id depends on an artefact count that
        # do(seeing) changes elsewhere.
        k = np.arange(n)
        if n - self.n_real >= ARTEFACTS_PER_QUAD:
            raise ValueError(f"more than {ARTEFACTS_PER_QUAD} single-epoch sources in one quadrant")
        number = np.where(k < self.n_real, id_offset + k,
                          ARTEFACT_ID0 + self.qi * ARTEFACTS_PER_QUAD + k - self.n_real)
        self.object_ids = [object_id(int(i), int(y), cfg.seed) for i, y in zip(number, year, strict=True)]
        self.n_e = n_e

    def _static(self, rng):
        """Object-level context: reference-image neighbour, PS1 and Gaia neighbours."""
        o, n = self.o, self.n_obj
        cls = o["class"]
        u = rng.uniform
        is_star = np.isin(cls, list(STARS))
        host = o["has_host"]
        bog = cls == "bogus"
        cos = np.cos(np.radians(o["dec"]))
        # Nearest reference-image source: the star itself, the host, or an unrelated neighbour.
        distnr = np.where(is_star, u(0.05, 0.3, n), np.where(host, np.nan_to_num(o["host_sep"]), u(2.5, 14.0, n)))
        magnr_r = np.where(is_star, o["mag_r"], np.where(host, o["host_mag"], u(17.0, 21.0, n)))
        gr_nr = np.where(is_star, o["gr"], np.where(host, o["host_gr"], u(0.3, 1.2, n)))
        # Bogus: 30 % sit on the wings of bright stars.
        near_bright = bog & (u(0, 1, n) < 0.3)
        distnr = np.where(near_bright, u(1.0, 6.0, n), distnr)
        magnr_r = np.where(near_bright, u(11.0, 14.0, n), magnr_r)
        pa = u(0, 2 * np.pi, n)
        self.ranr = (o["ra"] + distnr * np.sin(pa) / 3600 / cos) % 360.0
        self.decnr = o["dec"] + distnr * np.cos(pa) / 3600
        self.distnr, self.magnr_r, self.gr_nr = distnr, magnr_r, gr_nr
        # PS1 neighbour 1 (star-galaxy score), 2 and 3 further out.
        d1 = np.where(is_star, u(0.05, 0.4, n), np.where(host, np.nan_to_num(o["host_sep"]) + u(0, 0.3, n),
                                                          u(1.5, 12.0, n)))
        pm = cls == "pm_star"
        d1 = np.where(pm, np.nan_to_num(o["pm_arcsec_yr"]) * (2460200 - PS1_JD) / 365.25 + u(0, 0.2, n), d1)
        d1 = np.where(near_bright, distnr + u(0, 0.3, n), d1)
        sg1 = np.where(is_star | near_bright, u(0.85, 1.0, n), np.where(host, u(0.0, 0.25, n), u(0.0, 1.0, n)))
        r1 = np.where(is_star | host | near_bright, magnr_r + rng.normal(0, 0.05, n), u(18.0, 22.0, n))
        gr1 = np.where(is_star | host, gr_nr, u(0.2, 1.2, n))
        self.ps1 = {"d1": d1, "sg1": sg1, "r1": r1, "gr1": gr1, "d2": d1 + u(2, 15, n), "d3": d1 + u(15, 30, n),
                    "sg2": u(0, 1, n), "sg3": u(0, 1, n), "r2": u(17, 22, n), "r3": u(16, 22, n),
                    "id1": rng.integers(10**17, 2 * 10**17, n), "id2": rng.integers(10**17, 2 * 10**17, n),
                    "id3": rng.integers(10**17, 2 * 10**17, n), "nmtch": rng.integers(5, 40, n)}
        gaia_d = np.where(is_star, u(0.05, 0.3, n), u(2.0, 60.0, n))
        self.gaia = {"d": gaia_d, "mag": np.where(is_star, magnr_r + 0.3, u(15.0, 20.5, n)),
                     "dbright": u(10, 90, n), "magbright": u(10.0, 14.0, n)}
        self._catalogue_depths(is_star, host)

    def _catalogue_depths(self, is_star, host):
        """Faint stars and hosts lose their own reference-image, PS1 and Gaia counterparts.

        Their nearest catalogued source becomes an unrelated neighbour, and PS1's
        star/galaxy score fades to uninformative towards its depth. A first alert of a
        faint M dwarf's flare then looks like a hostless transient, as it does in real
        streams. Own random stream, so the other draws of the quadrant do not move.
        """
        o, n = self.o, self.n_obj
        rng = _Split(self.cfg.seed, self.qi, 3, self.n_real, n)
        u = rng.uniform
        mag = np.where(is_star, o["mag_r"], np.where(host, o["host_mag"], np.nan))
        has = is_star | host
        ref_lost = has & (mag + rng.normal(0, 0.2, n) > REF_DEPTH_R)
        ps1_lost = has & (mag + rng.normal(0, 0.2, n) > PS1_DEPTH_R)
        gaia_lost = is_star & (mag + 0.3 > GAIA_DEPTH_G)
        d_nr, m_nr, gr_nr = u(2.5, 14.0, n), u(17.0, 21.0, n), u(0.3, 1.2, n)
        self.distnr = np.where(ref_lost, d_nr, self.distnr)
        self.magnr_r = np.where(ref_lost, m_nr, self.magnr_r)
        self.gr_nr = np.where(ref_lost, gr_nr, self.gr_nr)
        pa, cos = u(0, 2 * np.pi, n), np.cos(np.radians(o["dec"]))
        self.ranr = np.where(ref_lost, (o["ra"] + d_nr * np.sin(pa) / 3600 / cos) % 360.0, self.ranr)
        self.decnr = np.where(ref_lost, o["dec"] + d_nr * np.cos(pa) / 3600, self.decnr)
        p = self.ps1
        w = np.clip((np.nan_to_num(mag, nan=0.0) - SG_RELIABLE_R) / (PS1_DEPTH_R - SG_RELIABLE_R), 0, 1)
        p["sg1"] = (1 - w) * p["sg1"] + w * u(0.25, 0.75, n)
        p["d1"] = np.where(ps1_lost, u(1.5, 12.0, n), p["d1"])
        p["sg1"] = np.where(ps1_lost, u(0.0, 1.0, n), p["sg1"])
        p["r1"] = np.where(ps1_lost, u(18.0, 22.0, n), p["r1"])
        p["gr1"] = np.where(ps1_lost, u(0.2, 1.2, n), p["gr1"])
        p["d2"] = np.where(ps1_lost, p["d1"] + u(2, 15, n), p["d2"])
        p["d3"] = np.where(ps1_lost, p["d1"] + u(15, 30, n), p["d3"])
        g = self.gaia
        g["d"] = np.where(gaia_lost, u(2.0, 60.0, n), g["d"])
        g["mag"] = np.where(gaia_lost, u(15.0, 20.5, n), g["mag"])

    # -- detections ---------------------------------------------------------------

    def _detections(self):
        """Candidate-level features of every detection (history and alert nights)."""
        o, ex = self.o, self.ex
        jj, ee = np.nonzero(self.det.T)  # time-major so candids follow exposures
        jj, ee = ee, jj
        order = np.lexsort((jj, ee))
        jj, ee = jj[order], ee[order]
        nd = len(jj)
        k = jj - self.n_real
        second = (k >= 0) & (k < len(self.sso_epoch2))
        second[second] = ee[second] == self.sso_epoch2[k[second]]  # a slow asteroid's second detection
        self.det_second = second
        rng = _PerEpoch(self.cfg.seed, self.qi, jj, ee, self.n_real, self.n_e, second)
        self.dj, self.de = jj, ee
        self.det_row = np.full(self.det.shape, -1, np.int64)
        self.det_row[jj, ee] = np.arange(nd)
        # candid = pid · 10⁶ + serial within the pid (ZTF candids also embed the pid).
        pid = ex["pid"].to_numpy()
        serial = np.zeros(nd, np.int64)
        if nd:
            starts = np.r_[0, np.flatnonzero(np.diff(ee)) + 1]
            counts = np.diff(np.r_[starts, nd])
            serial = np.arange(nd) - np.repeat(starts, counts)
        self.candid = pid[ee] * 10**6 + 10000 + serial
        self.tblid = serial
        meas, err = self.meas[jj, ee], self.err[jj, ee]
        snr = meas / err
        cls = o["class"][jj]
        bog = cls == "bogus"
        host = o["has_host"][jj]
        see = ex["seeing_arcsec"].to_numpy()[ee]
        see_px = see / PIXSCALE
        u = rng.uniform
        nrm = rng.normal
        a = np.abs(snr)
        mag = _mag(meas)
        sigmag = 1.0857 / a
        # Position: astrometric scatter ~ seeing / S/N; PM stars drift from the reference position.
        pos_sig = 0.6 * see / np.maximum(a, 1) / 3600
        dec = o["dec"][jj] + nrm(0, 1, nd) * pos_sig
        ra = o["ra"][jj] + nrm(0, 1, nd) * pos_sig / np.cos(np.radians(dec))
        pm = cls == "pm_star"
        if pm.any():
            d = o["pm_arcsec_yr"][jj] * (self.t[ee] - REF_JD) / 365.25 / 3600
            pa = o["pm_pa"][jj]
            dec = np.where(pm, dec + d * np.cos(pa), dec)
            ra = np.where(pm, ra + d * np.sin(pa) / np.cos(np.radians(dec)), ra)
        if second.any():  # it has moved on by then
            d = self.sso_drift[k[second]] / 3600
            dec[second] += d[:, 1]
            ra[second] += d[:, 0] / np.cos(np.radians(dec[second]))
        ra = ra % 360.0
        distnr = self.distnr[jj]
        if pm.any():
            distnr = np.where(pm, np.hypot(distnr, o["pm_arcsec_yr"][jj] * (self.t[ee] - REF_JD) / 365.25), distnr)
        fwhm = see_px * (1 + nrm(0, 0.06, nd)) * np.where(host, 1.15, 1.0)
        odd = np.where(u(0, 1, nd) < 0.5, u(0.3, 0.6, nd), u(1.8, 3.0, nd))
        fwhm = np.where(bog, see_px * odd, fwhm)
        elong = np.where(bog, 1.3 + rng.exponential(0.8, nd), 1 + np.abs(nrm(0, 0.08, nd)) + 0.4 * pm)
        aimage = 0.42 * fwhm * np.sqrt(elong)
        bimage = aimage / elong
        rb_real = np.clip(0.55 + 0.35 * np.tanh((a - 5) / 6) - 0.12 * (see - SEEING_MEDIAN) + nrm(0, 0.12, nd),
                          0.02, 0.999)
        drb_real = np.clip(1 - rng.beta(0.35, 6, nd) * (1 + 0.5 * np.clip(see - SEEING_MEDIAN, 0, None)), 0, 1)
        magap = mag + nrm(0, 1, nd) * (0.03 + sigmag)
        dra = (o["ra"][jj] - self.ex["ra_center"].iloc[0] + 180.0) % 360.0 - 180.0  # a quadrant across RA 0
        x = np.clip(dra * np.cos(np.radians(o["dec"][jj])) * 3600 / PIXSCALE + QUAD_NX / 2, 1, QUAD_NX)
        y = np.clip((o["dec"][jj] - self.ex["dec_center"].iloc[0]) * 3600 / PIXSCALE + QUAD_NY / 2, 1, QUAD_NY)
        lim = ex["diffmaglim"].to_numpy()[ee]
        det_count = np.cumsum(self.det, axis=1)[jj, ee]
        first_sim = self.t[np.argmax(self.det, axis=1)][jj]
        self.F = {
            "candid": self.candid, "isdiffpos": np.where(meas > 0, "t", "f"), "tblid": self.tblid,
            "xpos": x, "ypos": y, "ra": ra, "dec": dec, "magpsf": mag, "sigmapsf": sigmag,
            "chipsf": np.where(bog, 2 + rng.exponential(3, nd), u(0.6, 2.0, nd)),
            "magap": magap, "sigmagap": sigmag * 1.3 + 0.01, "distnr": distnr,
            "sky": nrm(0, 0.4, nd), "magdiff": magap - mag, "fwhm": fwhm,
            "classtar": np.where(bog, u(0, 1, nd), np.where(host, u(0.4, 0.9, nd), u(0.93, 0.99, nd))),
            "mindtoedge": np.minimum.reduce([x, QUAD_NX - x, y, QUAD_NY - y]), "magfromlim": lim - magap,
            "seeratio": fwhm / (1.8 / PIXSCALE), "aimage": aimage, "bimage": bimage,
            "aimagerat": aimage / fwhm, "bimagerat": bimage / fwhm, "elong": elong,
            "nneg": np.where(bog, rng.poisson(8, nd), rng.poisson(2 + 3 * (meas < 0) + 4 * pm, nd)),
            "nbad": np.where(bog, rng.poisson(1.5, nd), (u(0, 1, nd) < 0.03) * rng.poisson(1, nd)),
            "rb": np.where(bog, rng.beta(1.3, 4.5, nd), rb_real),
            "drb": np.where(bog, rng.beta(0.5, 2.5, nd), drb_real),
            "sumrat": np.where(bog, u(0.3, 0.9, nd), u(0.85, 1.0, nd)),
            "magapbig": magap - np.where(host, 0.1, 0.02), "sigmagapbig": sigmag * 1.5 + 0.01,
            "scorr": np.maximum(a * u(0.9, 1.3, nd), 5.0),  # (ZTF alerts only at scorr ≥ 5)
            "dsnrms": u(3, 8, nd), "ssnrms": u(8, 20, nd),
            "ndethist": self.ndet_pre[jj] + det_count, "ncovhist": self.ncov_pre[jj] + ee + 1,
            "jdstarthist": np.where(np.isfinite(self.jdstart_pre[jj]), self.jdstart_pre[jj], first_sim),
            "jdendhist": self.t[ee],
        }
        self.F["dsdiff"] = self.F["dsnrms"] - self.F["ssnrms"]
        # Artefacts shaped as ZTF's are: of the real alerts the survey scores below 0.3, 77–91 %
        # are rounder than elongation 1.3 and none has a bad pixel (the alert stream's cuts), so
        # shape alone cannot tell most of them from a star. Four in five are round (a poor
        # subtraction, a cosmic ray), the rest streaks. Drawn last: every other draw stays as it was.
        round_ = bog & (u(0, 1, nd) < 0.8)
        elong = np.where(round_, 1 + np.abs(nrm(0, 0.12, nd)), elong)
        aimage = 0.42 * fwhm * np.sqrt(elong)
        self.F.update(elong=elong, aimage=aimage, bimage=aimage / elong, aimagerat=aimage / fwhm,
                      bimagerat=aimage / elong / fwhm)
        self.F["nbad"] = np.where(bog, (u(0, 1, nd) < 0.03) * rng.poisson(1, nd), self.F["nbad"])
        # The survey's deep score misses a few real sources (of the order of its quoted error
        # rates): 2 % of real detections score U(0, 0.5), so a low score is strong evidence, not proof.
        missed = ~bog & (u(0, 1, nd) < 0.02)
        self.F["drb"] = np.where(missed, u(0, 0.5, nd), self.F["drb"])
        self.snr = snr

    # -- record building ----------------------------------------------------------

    def _exposure_parts(self):
        """Exposure-level pieces of candidate / prv_candidate / fp_hist dicts, one per exposure."""
        ex = self.ex
        cols = {c: ex[c].tolist() for c in ("pid", "jd", "fid", "nid", "diffmaglim", "magzpsci", "magzpscirms",
                                              "clrcoeff", "sciinpseeing", "scibckgnd", "scisigpix", "nmatches",
                                              "zp_nominal")}
        self.cand_exp, self.nondet, self.fp_exp = [], [], []
        ccd, q = self.rcid // 4 + 1, self.rcid % 4 + 1
        for k in range(len(ex)):
            fid = int(cols["fid"][k])
            dt = jd_to_datetime(cols["jd"][k])
            # The UT day's fraction (JD days start at noon).
            frac = int(round(((cols["jd"][k] - 0.5) % 1) * 1e6))
            fname = (f"ztf_{dt:%Y%m%d}{frac:06d}_{self.field:06d}_z{BANDS[fid]}"
                     f"_c{ccd:02d}_o_q{q}_scimrefdiffimg.fits")
            rfid = self.field * 10**6 + ccd * 10**4 + fid * 100 + self.rcid
            base = {"jd": cols["jd"][k], "fid": fid, "pid": int(cols["pid"][k]), "diffmaglim": cols["diffmaglim"][k],
                    "programid": 1, "rcid": self.rcid, "field": self.field, "magzpsci": cols["magzpsci"][k],
                    "magzpsciunc": 2.5e-5, "magzpscirms": cols["magzpscirms"][k], "clrcoeff": cols["clrcoeff"][k],
                    "clrcounc": 3e-5}
            cand = dict(base, pdiffimfilename=fname, programpi="Kulkarni", nid=int(cols["nid"][k]), rfid=rfid,
                        jdstartref=2458210.0 + (self.field % 50), jdendref=2458300.0 + (self.field % 50),
                        nframesref=15 + self.field % 20, rbversion="t17_f5_c3", drbversion="d6_m7",
                        nmatches=int(cols["nmatches"][k]), zpclrcov=-1.4e-5, zpmed=cols["zp_nominal"][k],
                        clrmed=0.9, clrrms=0.26, exptime=30.0, tooflag=0, ssdistnr=-999.0, ssmagnr=-999.0,
                        ssnamenr="null")
            self.cand_exp.append(cand)
            nd = {name: None for name, _, _ in PRV_CANDIDATE_FIELDS}
            nd.update(base, pdiffimfilename=fname, programpi="Kulkarni", nid=int(cols["nid"][k]), rbversion="t17_f5_c3")
            self.nondet.append(nd)
            fp = dict(base, rfid=rfid, sciinpseeing=cols["sciinpseeing"][k], scibckgnd=cols["scibckgnd"][k],
                      scisigpix=cols["scisigpix"][k], exptime=30.0, adpctdif1=0.1, adpctdif2=0.15)
            self.fp_exp.append(fp)
        self.dn_scale = 10 ** (-0.4 * (ex["magzpsci"].to_numpy() - 23.9))  # µJy per DN

    def _ref_fields(self, j: int, fid: int) -> dict:
        magnr = float(self.magnr_r[j] + (self.gr_nr[j] if fid == 1 else 0.0))
        return {"distnr": float(self.distnr[j]), "magnr": magnr, "sigmagnr": 0.02 + 0.01 * max(magnr - 17, 0),
                "chinr": 1.0, "sharpnr": 0.0, "ranr": float(self.ranr[j]), "decnr": float(self.decnr[j])}

    def _candidate(self, row: int) -> dict:
        j, e = int(self.dj[row]), int(self.de[row])
        F = self.F
        c = dict(self.cand_exp[e])
        c.update(self._ref_fields(j, c["fid"]))
        for name in ("candid", "tblid", "nneg", "nbad", "ndethist", "ncovhist"):
            c[name] = int(F[name][row])
        c["isdiffpos"] = str(F["isdiffpos"][row])
        for name in ("xpos", "ypos", "ra", "dec", "magpsf", "sigmapsf", "chipsf", "magap", "sigmagap", "distnr",
                     "sky", "magdiff", "fwhm", "classtar", "mindtoedge", "magfromlim", "seeratio", "aimage", "bimage",
                     "aimagerat", "bimagerat", "elong", "rb", "drb", "sumrat", "magapbig", "sigmagapbig", "scorr",
                     "dsnrms", "ssnrms", "dsdiff", "jdstarthist", "jdendhist"):
            c[name] = float(F[name][row])
        p = self.ps1
        r1, gr1 = float(p["r1"][j]), float(p["gr1"][j])
        c.update(sgmag1=r1 + gr1, srmag1=r1, simag1=r1 - 0.3 * gr1, szmag1=r1 - 0.45 * gr1,
                 sgscore1=float(p["sg1"][j]), distpsnr1=float(p["d1"][j]), objectidps1=int(p["id1"][j]),
                 objectidps2=int(p["id2"][j]), sgmag2=-999.0, srmag2=float(p["r2"][j]), simag2=-999.0, szmag2=-999.0,
                 sgscore2=float(p["sg2"][j]), distpsnr2=float(p["d2"][j]), objectidps3=int(p["id3"][j]),
                 sgmag3=-999.0, srmag3=float(p["r3"][j]), simag3=-999.0, szmag3=-999.0, sgscore3=float(p["sg3"][j]),
                 distpsnr3=float(p["d3"][j]), nmtchps=int(p["nmtch"][j]), neargaia=float(self.gaia["d"][j]),
                 maggaia=float(self.gaia["mag"][j]), neargaiabright=float(self.gaia["dbright"][j]),
                 maggaiabright=float(self.gaia["magbright"][j]))
        k = j - self.n_real
        if 0 <= k < len(self.sso_dist) and np.isfinite(self.sso_dist[k]):  # a catalogued asteroid
            c.update(ssdistnr=float(self.sso_dist[k]), ssmagnr=float(self.sso_vmag[k]),
                     ssnamenr=str(self.qi * ARTEFACTS_PER_QUAD + k + 1))
        if self.outage[e]:
            # The real run also had jdstarthist after jdendhist; the decoder reads it as unknown.
            c.update(XMATCH_FILL, jdstarthist=c["jdendhist"] + 1 / 24)
        return c

    def _prv_detection(self, row: int) -> dict:
        c = self._candidate(row)
        return {name: c.get(name) for name, _, _ in PRV_CANDIDATE_FIELDS}

    def _fp(self, j: int, e: int, ref: dict) -> dict:
        d = dict(self.fp_exp[e])
        d.update(ref)
        if self.fp_bad[j, e]:
            d.update(forcediffimflux=FP_BAD, forcediffimfluxunc=FP_BAD, procstatus="56")
        else:
            s = self.dn_scale[e]
            d.update(forcediffimflux=float(self.meas[j, e] / s), forcediffimfluxunc=float(self.err[j, e] / s),
                     procstatus="0")
        return d

    def record(self, row: int) -> dict:
        """The full alert packet of detection ``row``."""
        j, e = int(self.dj[row]), int(self.de[row])
        cand = self._candidate(row)
        prv, fps = [], []
        refs = {f: {k: v for k, v in self._ref_fields(j, f).items()} for f in (1, 2)}
        for k in range(int(self.win_start[e]), e):
            r = self.det_row[j, k]
            prv.append(self._prv_detection(int(r)) if r >= 0 else self.nondet[k])
            fps.append(self._fp(j, k, refs[int(self.fid[k])]))
        return {"schemavsn": SCHEMA_VERSION, "publisher": PUBLISHER,
                "objectId": self.object_ids[j], "candid": cand["candid"], "candidate": cand,
                "prv_candidates": prv, "fp_hists": fps, "cutoutScience": None, "cutoutTemplate": None,
                "cutoutDifference": None}

    def encode(self, row: int, codec: _Codec) -> bytes:
        """Schemaless Avro bytes of :meth:`record` (``row``), built from cached pieces."""
        j, e = int(self.dj[row]), int(self.de[row])
        ws = int(self.win_start[e])
        cand = self._candidate(row)
        parts = [_avro_str(SCHEMA_VERSION), _avro_str(PUBLISHER), _avro_str(self.object_ids[j]),
                 _avro_long(cand["candid"]), codec.enc(codec.cand, cand)]
        n = e - ws
        if self._nondet_bytes is None:
            self._nondet_bytes = [codec.enc(codec.prv, d) for d in self.nondet]
            self._fp_prefix = [codec.enc(codec.fp_pre, d) for d in self.fp_exp]
        parts.append(b"\x02" + (_avro_long(n) if n else b""))
        for k in range(ws, e):
            r = int(self.det_row[j, k])
            if r < 0:
                parts.append(self._nondet_bytes[k])
            else:
                b = self._det_cache.get(r)
                if b is None:
                    b = self._det_cache[r] = codec.enc(codec.prv, self._prv_detection(r))
                parts.append(b)
        parts.append(b"\x00" if n else b"")
        parts.append(b"\x02" + (_avro_long(n) if n else b""))
        if n:
            suf = {f: codec.enc(codec.fp_suf, self._ref_fields(j, f)) for f in (1, 2)}
            flux = (self.meas[j, ws:e] / self.dn_scale[ws:e]).astype("<f4").tobytes()
            unc = (self.err[j, ws:e] / self.dn_scale[ws:e]).astype("<f4").tobytes()
            bad_val = _F32.pack(FP_BAD)
            for i, k in enumerate(range(ws, e)):
                parts.append(self._fp_prefix[k])
                if self.fp_bad[j, k]:
                    parts += [b"\x02", bad_val, b"\x02", bad_val, _FP_BAD_TAIL]
                else:
                    parts += [b"\x02", flux[4 * i:4 * i + 4], b"\x02", unc[4 * i:4 * i + 4], _FP_GOOD_TAIL]
                parts.append(suf[int(self.fid[k])])
            parts.append(b"\x00")
        parts.append(b"\x00\x00\x00")  # three null cutouts
        return b"".join(parts)

    # -- truth ----------------------------------------------------------------------

    def alert_rows(self) -> np.ndarray:
        return np.flatnonzero(self.win[self.de])

    def truth(self, rows: np.ndarray):
        """Truth table rows for the alerts ``rows`` (before label selection)."""
        o, ex = self.o, self.ex
        j, e = self.dj[rows], self.de[rows]
        cls = o["class"][j]
        ws = self.win_start[e]
        n_prv = e - ws
        det_cum = np.concatenate([np.zeros((self.n_obj, 1), int), np.cumsum(self.det, axis=1)], axis=1)
        n_prv_det = det_cum[j, e] - det_cum[j, ws]
        later_end = np.searchsorted(self.t, self.t[e] + 3.0, side="right")
        n_later = det_cum[j, later_end] - det_cum[j, e + 1]
        return self._pd.DataFrame({
            "candid": self.candid[rows], "objectId": [self.object_ids[k] for k in j],
            "object_index": self.obj_index[j], "class": cls.astype(str), "is_real": cls != "bogus",
            "is_extragalactic": np.isin(cls, list(EXTRAGALACTIC)), "is_fast": np.isin(cls, list(FAST)),
            "pid": ex["pid"].to_numpy()[e], "exposure_id": ex["exposure_id"].to_numpy()[e],
            "field": self.field, "rcid": self.rcid, "fid": self.fid[e], "band": ex["band"].to_numpy()[e],
            "jd": self.t[e], "mjd": self.t[e] - 2400000.5, "night": ex["night"].to_numpy()[e],
            "ra": self.F["ra"][rows], "dec": self.F["dec"][rows],
            "true_flux_ujy": self.Q[j, e], "sys_flux_ujy": self.sys[j, e], "sys_mag": self.delta[j, e],
            "nuisance_flux_ujy": self.nuis[j, e], "noise_flux_ujy": self.noise[j, e],
            "meas_flux_ujy": self.meas[j, e], "flux_err_ujy": self.err[j, e], "snr": self.snr[rows],
            "ref_flux_ujy": self.fref[j, e], "magpsf": self.F["magpsf"][rows], "isdiffpos": self.F["isdiffpos"][rows],
            "seeing_arcsec": ex["seeing_arcsec"].to_numpy()[e], "n_prv_det": n_prv_det,
            "n_prv_nondet": n_prv - n_prv_det, "n_fp": n_prv, "n_later_det": n_later,
            # What the vetter sees: no star match while the cross-match is out.
            "_ps1_star_close": ((self.ps1["sg1"][j] > 0.8) & (self.ps1["d1"][j] < 0.5) & (self.ps1["r1"][j] < 18.5)
                                & ~self.outage[e]),
            "_qi": self.qi, "_row": rows,
        })

    def selection_draws(self, rows: np.ndarray, key: int = 9) -> np.ndarray:
        """A label-selection uniform of each alert ``rows``, tied to its (object, exposure).

        ``key`` 9: follow-up (``vetted``); 15: eyeballing (``eyeballed``).
        """
        j, e = self.dj[rows], self.de[rows]
        real = j < self.n_real
        out = np.empty(len(rows))
        out[real] = _rng(self.cfg.seed, key, self.qi).random((self.n_real, self.n_e))[j[real], e[real]]
        slot = 2 * (j[~real] - self.n_real) + self.det_second[rows][~real]  # as in _PerEpoch
        out[~real] = _rng(self.cfg.seed, key, self.qi, 1).random(2 * (self.n_obj - self.n_real))[slot]
        return out

    def objects_frame(self):
        o = self.o
        keys = [k for k in o if k not in ("flares",)]
        df = self._pd.DataFrame({k: o[k] for k in keys})
        df.insert(0, "objectId", self.object_ids)
        df.insert(1, "object_index", self.obj_index)
        df["field"], df["rcid"] = self.field, self.rcid
        df["class"] = df["class"].astype(str)
        df["n_alerts"] = np.bincount(self.dj[self.kept], minlength=self.n_obj)
        return df

    def photometry_frame(self, objects: np.ndarray):
        """Per (object, pid) truth for the given local object indices."""
        objects = np.asarray(objects, int)
        jj = np.repeat(objects, self.n_e)
        ee = np.tile(np.arange(self.n_e), len(objects))
        return self._pd.DataFrame({
            "objectId": [self.object_ids[k] for k in jj], "object_index": self.obj_index[jj],
            "pid": self.ex["pid"].to_numpy()[ee], "jd": self.t[ee], "fid": self.fid[ee],
            "true_flux_ujy": self.Q[jj, ee], "sys_flux_ujy": self.sys[jj, ee], "sys_mag": self.delta[jj, ee],
            "nuisance_flux_ujy": self.nuis[jj, ee], "meas_flux_ujy": self.meas[jj, ee],
            "flux_err_ujy": self.err[jj, ee], "ref_flux_ujy": self.fref[jj, ee], "detected": self.det[jj, ee],
            "fp_flagged": self.fp_bad[jj, ee],
        })

    def recoverable(self, rows: np.ndarray | None = None):
        """Distinct objects with a flux row per pid in the alerts ``rows`` (default: kept alerts)."""
        rows = self.kept if rows is None else rows
        A = np.zeros((self.n_obj, self.n_e))
        np.add.at(A, (self.dj[rows], self.de[rows]), 1.0)
        # W[e, k] = 1 when exposure k is in the 30-day history of an alert at exposure e.
        W = ((self.t[None, :] >= self.t[:, None] - HISTORY_DAYS) & (self.t[None, :] < self.t[:, None])).astype(float)
        covered = ((A @ W) > 0) & (~self.fp_bad | self.det)
        covered |= A > 0
        return self._pd.Series(covered.sum(axis=0), index=self.ex["pid"].to_numpy(), name="n_sources")


# --------------------------------------------------------------------------- run


def _run(cfg: SimConfig) -> SimResult:
    import pandas as pd

    alert_jd0 = cfg.start_jd + cfg.history_days
    boost = 1.0
    for _ in range(5):
        fields, pids = _survey(cfg, boost)
        quads, obj_offset, id_offset = [], 0, 0
        for fld in fields:
            for rc in fld["rcids"]:
                ex = pids[(pids["field"] == fld["field"]) & (pids["rcid"] == rc)]
                if ex.empty:
                    continue
                q = _Quad(cfg, len(quads), fld, int(rc), ex, obj_offset, alert_jd0, id_offset)
                obj_offset += q.n_obj
                id_offset += q.n_real
                quads.append(q)
        total = sum(len(q.alert_rows()) for q in quads)
        if not cfg.n_alerts or total >= cfg.n_alerts:
            break
        if total == 0:  # growing the survey cannot help (and would not stay bounded)
            raise ValueError(f"the survey produced no alerts to reach n_alerts={cfg.n_alerts}")
        # The rate table is only a guess (weather, seeds): grow the survey and redo, deterministically.
        boost *= 1.2 * cfg.n_alerts / max(total, 1)
    truth = pd.concat([q.truth(q.alert_rows()) for q in quads], ignore_index=True)
    truth = truth.sort_values(["jd", "pid", "candid"], kind="stable").reset_index(drop=True)
    if cfg.n_alerts is not None:
        truth = truth.iloc[: cfg.n_alerts].reset_index(drop=True)

    # Label selection: depends on brightness, conditions and later data (observables only).
    mag = np.nan_to_num(truth["magpsf"].to_numpy(), nan=21.0)
    logit = (-1.5 + 0.9 * (18.5 - mag) - 1.2 * (truth["seeing_arcsec"].to_numpy() - SEEING_MEDIAN)
             + 0.6 * np.minimum(truth["n_later_det"].to_numpy(), 4) - 2.5 * truth["_ps1_star_close"].to_numpy())
    prop = np.clip(1 / (1 + np.exp(-logit)), 0.002, 0.98)
    truth["propensity"] = prop
    u, u_eye = np.empty(len(truth)), np.empty(len(truth))
    for qi, g in truth.groupby("_qi"):
        u[g.index.to_numpy()] = quads[qi].selection_draws(g["_row"].to_numpy())
        u_eye[g.index.to_numpy()] = quads[qi].selection_draws(g["_row"].to_numpy(), key=15)
    truth["vetted"] = u < prop
    # Eyeballing: a real/bogus call is cheap, a class needs follow-up. Vetters look at every
    # alert followed up and screen a share of the rest (more of the bright ones), so bogus
    # alerts, which follow-up almost never picks, get real/bogus labels too.
    eye = np.clip(1 / (1 + np.exp(-(-1.0 + 0.5 * (19.5 - mag)))), 0.02, 0.9)
    truth["eyeball_propensity"] = prop + (1 - prop) * eye
    truth["eyeballed"] = truth["vetted"] | (u_eye < eye)

    for q in quads:
        q.kept = np.sort(truth.loc[truth["_qi"] == q.qi, "_row"].to_numpy())
    order = truth[["_qi", "_row"]].to_numpy()
    counts = truth.groupby("pid").size()
    pids["n_alerts"] = pids["pid"].map(counts).fillna(0).astype(int)
    pids = pids.sort_values(["jd", "rcid"], kind="stable").reset_index(drop=True)
    objects = pd.concat([q.objects_frame() for q in quads], ignore_index=True)
    phot = [q.photometry_frame(np.unique(q.dj[q.kept])) for q in quads]
    photometry = pd.concat(phot, ignore_index=True) if phot else pd.DataFrame()
    truth = truth[list(TRUTH_COLUMNS)]
    return SimResult(config=cfg, truth=truth, exposures=pids, objects=objects, photometry=photometry,
                     _quads=quads, _order=order)


# --------------------------------------------------------------------------- writing


class _ContainerWriter:
    """One-record Avro object-container files with a fixed header and sync marker.

    The header (schema JSON, codec) is encoded once; each alert is then header + one
    block. A sync marker derived from the seed keeps the bytes reproducible.
    """

    def __init__(self, seed: int):
        import json

        import fastavro

        self.sync = hashlib.md5(f"vigil-simulate-{seed}".encode()).digest()
        meta = {"avro.schema": json.dumps(ztf_alert_schema(), separators=(",", ":")).encode(),
                "avro.codec": b"null"}
        buf = io.BytesIO()
        buf.write(b"Obj\x01")
        fastavro.schemaless_writer(buf, {"type": "map", "values": "bytes"}, meta)
        buf.write(self.sync)
        self.header = buf.getvalue()

    def frame(self, body: bytes) -> bytes:
        """A container file holding the one schemaless-encoded record ``body``."""
        return b"".join((self.header, _avro_long(1), _avro_long(len(body)), body, self.sync))


def _write(res: SimResult, out: Path, fmt: str) -> dict:
    if fmt not in ("files", "tarballs"):
        raise ValueError(f"format must be 'files' or 'tarballs', not {fmt!r}")
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    alerts_dir = out / "alerts"
    if alerts_dir.is_dir() and any(alerts_dir.iterdir()):
        # New alerts beside old ones would not match the truth tables written next to them.
        raise FileExistsError(f"{alerts_dir} already holds alerts: give an empty or new output directory")
    if alerts_dir.exists() and not alerts_dir.is_dir():
        raise FileExistsError(f"{alerts_dir} is a file: give an empty or new output directory")
    # Written beside, then renamed: a run cut short (Ctrl-C, a kill) leaves no half-filled alerts
    # directory, which a rerun would refuse and a replay would read without its truth tables. What a
    # killed run left there is removed by the next one.
    final_dir, alerts_dir = alerts_dir, out / PARTIAL_DIR
    if alerts_dir.exists():
        shutil.rmtree(alerts_dir)
    alerts_dir.mkdir()
    try:
        n = _write_alerts(res, alerts_dir, fmt)
        for name, df in (("truth", res.truth), ("exposures", res.exposures), ("objects", res.objects),
                         ("photometry", res.photometry)):
            df.to_parquet(out / f"{name}.parquet", index=False)
        if final_dir.is_dir():
            final_dir.rmdir()  # empty (checked above)
        alerts_dir.rename(final_dir)
    except BaseException:
        shutil.rmtree(alerts_dir, ignore_errors=True)
        raise
    return {"alerts": n, "seconds": time.perf_counter() - t0}


def _write_alerts(res: SimResult, alerts_dir: Path, fmt: str) -> int:
    """The alert files (or nightly tarballs) of ``res`` in ``alerts_dir``; returns how many alerts."""
    nights = dict(zip(res.exposures["pid"], res.exposures["night_date"], strict=True))
    n = 0
    tar = raw = gz = None
    current = None
    try:
        for candid, payload in res.payloads():
            night = nights[candid // 10**6]
            if fmt == "files":
                d = alerts_dir / night
                d.mkdir(exist_ok=True)
                (d / f"{candid}.avro").write_bytes(payload)
            else:
                if night != current:
                    if tar is not None:
                        tar.close()
                        gz.close()
                        raw.close()
                    current = night
                    raw = open(alerts_dir / f"ztf_public_{night}.tar.gz", "wb")
                    # mtime 0 and no file name in the gzip header: the bytes depend on the seed only.
                    gz = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6)
                    tar = tarfile.open(fileobj=gz, mode="w|")
                info = tarfile.TarInfo(f"{candid}.avro")
                info.size = len(payload)
                info.mtime = int(res.config.start_jd - JD_UNIX0) * 86400
                tar.addfile(info, io.BytesIO(payload))
            n += 1
    finally:
        if tar is not None:
            tar.close()
            gz.close()
            raw.close()
    return n


# --------------------------------------------------------------------------- summary


def _summary(res: SimResult) -> str:
    import pandas as pd

    lines = []
    ph = res.photometry
    objs = res.objects.set_index("object_index")
    if len(ph):
        cls = objs.loc[ph["object_index"], "class"].to_numpy()
        const = ph[cls == "constant"]
        if len(const):
            lines.append(f"injected systematic RMS on constant sources ({len(const)} epochs): "
                         f"{1000 * np.sqrt(np.mean(const['sys_mag'] ** 2)):.1f} mmag, "
                         f"{np.sqrt(np.mean(const['sys_flux_ujy'] ** 2)):.1f} µJy "
                         f"(median |noise| {np.median(const['flux_err_ujy']):.1f} µJy)")
    t = res.truth
    mix = pd.DataFrame({
        "objects": res.objects.groupby("class").size(),
        "alerting": res.objects[res.objects["n_alerts"] > 0].groupby("class").size(),
        "alerts": t.groupby("class").size(),
        "vetted": t.groupby("class")["vetted"].sum(),
        "eyeballed": t.groupby("class")["eyeballed"].sum(),
    }).reindex(list(CLASSES)).fillna(0).astype(int)
    mix["alert_%"] = (100 * mix["alerts"] / max(len(t), 1)).round(1)
    lines.append("class mix:\n" + mix.to_string())
    lines.append(f"vetted: {int(t['vetted'].sum())} of {len(t)} alerts ({100 * t['vetted'].mean():.1f} %); "
                 f"eyeballed: {int(t['eyeballed'].sum())} ({100 * t['eyeballed'].mean():.1f} %)")
    sib = res.sibling_counts()
    ex = res.exposures.set_index("pid")
    # Exposures the stream can fill: from 29 days before the first alert to the last alert
    # (an n_alerts cut ends the stream mid-night; later exposures have no alerts by construction).
    jd = ex.loc[sib.index, "jd"].to_numpy()
    lo = res.truth["jd"].min() - (HISTORY_DAYS - 1) if len(res.truth) else np.inf
    hi = res.truth["jd"].max() if len(res.truth) else -np.inf
    upto = jd < hi if res.config.n_alerts else jd <= hi  # the cut exposure may be only partly streamed
    sel = sib[(jd >= max(lo, res.config.start_jd)) & upto]
    if len(sel):
        lines.append(f"sibling sources per exposure (from {int(HISTORY_DAYS) - 1} days before the first alert to the "
                     f"last, {len(sel)} pids): min {sel.min()}, median {int(sel.median())}, max {sel.max()}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


class _Terminated(Exception):
    """SIGTERM while ``vigil simulate`` writes."""


def cmd_simulate(args) -> int:
    """``vigil simulate``: run, write, print counts, timings, systematic RMS and the class mix."""
    t0 = time.perf_counter()
    alerts_dir = Path(args.out) / "alerts"
    # Said before the minutes of simulating, not after.
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out}: a file, not a directory")
    if alerts_dir.is_dir() and any(alerts_dir.iterdir()):
        raise ValueError(f"{alerts_dir} already holds alerts: give an empty or new output directory")
    res = simulate(args.seed, nights=args.nights, fields=args.fields, quadrants=args.quadrants, mode=args.mode,
                   n_alerts=args.n_alerts, history_days=args.history_days, sys_scale=args.sys_scale,
                   cadence=args.cadence)
    t1 = time.perf_counter()
    # SIGTERM too removes the alerts written so far (as Ctrl-C does), not only what a rerun would.
    import signal

    def terminate(signum, frame):
        raise _Terminated

    before = signal.signal(signal.SIGTERM, terminate) if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN \
        else None
    try:
        info = res.write(args.out, args.format)
    except _Terminated:
        print("terminated: the alerts written so far were removed", file=sys.stderr)
        return 143
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)
    t2 = time.perf_counter()
    ex = res.exposures
    print(f"wrote {info['alerts']} alerts ({res.truth['objectId'].nunique()} objects, {len(ex)} pids, "
          f"{ex['exposure_id'].nunique()} exposures, {ex['field'].nunique()} fields) to {args.out} "
          f"as {args.format} in {t2 - t0:.1f} s (simulate {t1 - t0:.1f} s, encode+write {t2 - t1:.1f} s)")
    print(res.summary())
    return 0


def register(subparsers) -> None:
    """Add the ``simulate`` subcommand."""
    p = subparsers.add_parser("simulate", help="write a seeded ZTF-schema alert stream with truth tables")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--nights", type=int, default=2, help="alert nights (default 2)")
    p.add_argument("--fields", type=int, default=1, help="ZTF fields (default 1)")
    p.add_argument("--quadrants", type=int, default=4, help="readout quadrants per field (default 4)")
    p.add_argument("--mode", choices=MODES, default="dense",
                   help="≥100 (dense) or ~10 (sparse) sibling sources per exposure; transient: sparse, "
                        "mostly new sources and their galactic mimics")
    p.add_argument("--cadence", choices=CADENCES, default="nightly",
                   help="nightly: 2-3 g+r visits every clear night; public: one g+r visit every other night "
                        "(so every other alert night has no alerts)")
    p.add_argument("--format", choices=("files", "tarballs"), default="files")
    p.add_argument("--n-alerts", type=int, default=None, help="size the run for this many alerts (exact cut)")
    p.add_argument("--history-days", type=int, default=30, help="survey nights before the first alert night")
    p.add_argument("--sys-scale", type=float, default=1.0, help="multiply all injected systematics")
    p.set_defaults(func=cmd_simulate)

"""Per-alert features for the scorers, computed for a whole micro-batch at once.

Inputs are survey-neutral :class:`stream.alert.Alert` objects (optionally with an
HSR-corrected flux column per alert); the output is one row per alert in a
DataFrame whose column order is :data:`FEATURES`. Missing values are NaN, which
XGBoost handles natively.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pandas as pd

from stream.alert import PIXEL_SCALE, median, tai_minus_utc_s

# Column order is part of every saved model's metadata; append, never reorder.
FEATURES = (
    # survey context
    "real_bogus", "star_galaxy", "ps1_distance", "gaia_distance", "gaia_mag", "ref_mag", "ref_distance",
    "ss_distance", "elongation", "fwhm", "n_bad_pixels", "n_negative_pixels", "snr", "extendedness",
    "galactic_latitude",
    # detection and history
    "mag", "limit_mag", "n_det", "n_nondet", "n_forced", "n_det_history", "days_since_first",
    "days_since_last_nondet",
    # light-curve shape on (corrected) fluxes
    "peak_flux", "flux_now_over_peak", "amplitude_mag", "rise_rate", "decline_rate", "colour_gr",
    "frac_negative",
    # positional scatter of the detections (arcsec)
    "pos_scatter", "pos_offset_now",
    # observing conditions of the alert's exposure (see :func:`conditions`); limit_mag above is the depth
    "seeing", "airmass", "moon_illumination", "moon_separation",
    # ... and of the exposures its detections were made in
    "det_seeing",
)

#: How an explanation names each feature to a vetter: (words, unit after the value).
FEATURE_WORDS = {
    "real_bogus": ("survey real/bogus score", ""), "star_galaxy": ("PS1 star/galaxy score", ""),
    "ps1_distance": ("nearest PS1 source at", "″"), "gaia_distance": ("nearest Gaia star at", "″"),
    "gaia_mag": ("nearest Gaia star's G", " mag"), "ref_mag": ("reference-image source", " mag"),
    "ref_distance": ("reference-image source at", "″"), "ss_distance": ("known asteroid at", "″"),
    "elongation": ("elongation", ""), "fwhm": ("PSF width", "″"), "n_bad_pixels": ("bad pixels", ""),
    "n_negative_pixels": ("negative pixels", ""), "snr": ("S/N", ""), "extendedness": ("extendedness", ""),
    "galactic_latitude": ("Galactic latitude", "°"), "mag": ("magnitude", ""), "limit_mag": ("depth", " mag"),
    "n_det": ("detections", ""), "n_nondet": ("non-detections", ""), "n_forced": ("forced-photometry points", ""),
    "n_det_history": ("detections in the survey's history", ""),
    "days_since_first": ("days since the first detection", ""),
    "days_since_last_nondet": ("days since the last non-detection", ""), "peak_flux": ("peak flux", " µJy"),
    # The shape is measured on the size of the difference flux: for a source fainter than its reference a
    # "rise" is a fading, so the words say what was measured (README, known limits).
    "flux_now_over_peak": ("flux now / peak", ""), "amplitude_mag": ("amplitude of |difference flux|", " mag"),
    "rise_rate": ("rise rate of |difference flux|", " mag/d"),
    "decline_rate": ("decline rate of |difference flux|", " mag/d"),
    "colour_gr": ("g − r colour of |difference flux|", " mag"), "frac_negative": ("share of negative detections", ""),
    "pos_scatter": ("positional scatter", "″"), "pos_offset_now": ("offset from the mean position", "″"),
    "seeing": ("seeing", "″"), "airmass": ("airmass", ""), "moon_illumination": ("Moon illumination", ""),
    "moon_separation": ("Moon at", "°"), "det_seeing": ("seeing of the detections", "″"),
}
#: Counts, which an explanation writes number first ("1 detection", "3 bad pixels"): the
#: singular of their :data:`FEATURE_WORDS` (which hold the plural).
COUNT_SINGULAR = {
    "n_det": "detection", "n_nondet": "non-detection", "n_forced": "forced-photometry point",
    "n_det_history": "detection in the survey's history", "n_bad_pixels": "bad pixel",
    "n_negative_pixels": "negative pixel", "days_since_first": "day since the first detection",
    "days_since_last_nondet": "day since the last non-detection",
}
#: What a missing value means, where "no <words>" would not say it.
MISSING_WORDS = {"days_since_last_nondet": "no earlier non-detection",
                 # measured from two or more detections: "no positional scatter" read as none at all
                 "pos_scatter": "positional scatter unmeasured", "pos_offset_now": "offset from the mean position "
                 "unmeasured", "rise_rate": "no rise measured", "decline_rate": "no decline measured",
                 "colour_gr": "g − r colour unmeasured"}

#: Conditions of the observation (not of the source): what causal adjustment acts on.
#: ``seeing`` in arcsec, ``limit_mag`` the 5σ depth (AB), ``moon_illumination`` the lit
#: fraction (0 when the Moon is below the horizon), ``moon_separation`` in degrees;
#: ``det_seeing`` the median seeing of the exposures of the alert's detections (history
#: features such as the positional scatter are measured at *their* seeing, not tonight's).
CONDITIONS = ("seeing", "airmass", "limit_mag", "moon_illumination", "moon_separation", "det_seeing")

#: Inputs that some supported survey does not send (Rubin: no reference-image neighbour,
#: negative-pixel count or limiting magnitude in the alert, and no source FWHM or elongation
#: comparable with ZTF's, see :func:`stream.decode._psf_fwhm_px`), in groups that go
#: missing together. The simulator writes ZTF alerts, which always have them: the full scorers
#: never saw them missing and would send a missing value down whatever branch XGBoost
#: defaulted to (for Rubin alerts, "bogus": P(real) < 0.05 for all 288 of the Fink sample).
#: An alert lacking any of them is scored by *reduced* scorers trained without any of them
#: (:class:`models.scorer.AlertScorer`).
SURVEY_OPTIONAL = (("ref_mag", "ref_distance", "n_negative_pixels", "limit_mag"), ("fwhm", "elongation"))
#: Largest float32; the boosters read features as float32.
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: Observatory sites (geodetic lat, lon in degrees east, height in m).
SITES = {"ztf": (33.3563, -116.8650, 1712.0), "rubin": (-30.2446, -70.7494, 2663.0)}


def galactic_latitude(ra, dec) -> np.ndarray:
    """Galactic latitude (deg) for arrays of ICRS ra/dec (deg), via the fixed rotation.

    Uses the IAU 1958 pole (J2000: ra 192.85948°, dec 27.12825°); accurate to far
    better than a degree, which is all a feature needs, and ~100× cheaper than
    building SkyCoord objects per batch.
    """
    ra = np.radians(np.asarray(ra, dtype=float))
    dec = np.radians(np.asarray(dec, dtype=float))
    ra_p, dec_p = np.radians(192.85948), np.radians(27.12825)
    sinb = np.sin(dec) * np.sin(dec_p) + np.cos(dec) * np.cos(dec_p) * np.cos(ra - ra_p)
    return np.degrees(np.arcsin(np.clip(sinb, -1, 1)))


def _mag(flux):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(flux > 0, 23.9 - 2.5 * np.log10(np.where(flux > 0, flux, 1.0)), np.nan)


def _segments(key: np.ndarray):
    """Start and end (exclusive) of each run of equal values in a sorted ``key``."""
    if not len(key):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    starts = np.r_[0, np.flatnonzero(key[1:] != key[:-1]) + 1]
    return starts, np.r_[starts[1:], len(key)]


def _first_where(values: np.ndarray, target: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per segment (given by ``starts``), the first index whose value equals the segment's ``target``."""
    seg = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(values)]))
    idx = np.where(values == target[seg], np.arange(len(values)), len(values))
    return np.minimum.reduceat(idx, starts)


def lightcurve_features(alerts, corrected_flux=None) -> dict:
    """Light-curve shape and positional-scatter features of a batch, one array per feature.

    All light curves are concatenated and every feature is a grouped reduction over the
    flat arrays (no per-alert numpy calls). ``corrected_flux[i]`` (HSR) replaces alert
    *i*'s ``lightcurve.flux`` when given. Per alert:

    * counts of detections (finite flux), limits and forced points (detections and limits
      counted from the forced points before the alert, at 5σ, where those show more); days
      since the first detection (the survey's own first-detection time if earlier) and
      since the last limit (or forced point below 5σ);
    * on detections (or, where the history lists none before the alert, on the forced
      points at ≥ 5σ and the alert's own): the fraction with negative flux, the peak |flux| (first one on ties),
      the latest flux over the peak, the magnitude range, and rise / decline rates in mag/day
      (per band from its first point to its brightest and from the brightest to its last,
      averaged over bands; positive = brightening for rise, fading for decline), g − r from
      the latest g and r detections if within 1 day;
    * ``pos_scatter``: RMS distance (arcsec) of the detections from their mean position
      (≥ 2); ``pos_offset_now``: distance of the triggering detection from the mean of the
      earlier ones. Moving or dipole-subtracted stars and artefacts scatter more than a
      static point source of the same S/N.
    """
    from stream.alert import DETECTION, FORCED, NONDETECTION, PREVIOUS

    n = len(alerts)
    lcs = [a.lightcurve for a in alerts]
    sizes = np.array([len(lc) for lc in lcs], dtype=np.int64)
    g = np.repeat(np.arange(n), sizes)

    def cat(name):
        return np.concatenate([getattr(lc, name) for lc in lcs]) if n else np.zeros(0)

    mjd, kind, band, ra, dec = cat("mjd"), cat("kind"), cat("band"), cat("ra"), cat("dec")
    fluxes = [lc.flux if corrected_flux is None or corrected_flux[i] is None else corrected_flux[i]
              for i, lc in enumerate(lcs)]
    f = np.concatenate(fluxes).astype(float) if n else np.zeros(0)
    now = np.array([a.mjd for a in alerts], dtype=float)
    first_known = np.array([a.context.first_det_mjd for a in alerts], dtype=float)
    is_det = (kind == DETECTION) | (kind == PREVIOUS)
    det = is_det & np.isfinite(f)
    nondet = kind == NONDETECTION
    n_det = np.bincount(g[det], minlength=n)
    n_nondet = np.bincount(g[nondet], minlength=n)
    # Forced photometry before the alert, split at the survey's 5σ: where the history lists
    # fewer detections or limits than the forced points show (an archive that carries forced
    # photometry but no limits, or redacted detections), the counts come from the forced points.
    # Where both exist they cover the same exposures and the history's counts stand.
    raw, err = (f if corrected_flux is None else cat("flux")), cat("flux_err")
    forced = kind == FORCED
    with np.errstate(invalid="ignore", divide="ignore"):
        hist = forced & (mjd < now[g]) & np.isfinite(raw) & (err > 0)
        f_det = hist & (np.abs(raw) >= 5.0 * err)
    f_non = hist & ~f_det
    n_now = np.bincount(g[det & (kind == DETECTION)], minlength=n)
    # With no earlier detection listed but forced points at ≥ 5σ before the alert (detections
    # left out of the packet), the light-curve shape comes from those points and the alert's
    # own; elsewhere they repeat listed detections and are not used.
    n_prev = np.bincount(g[det & (kind == PREVIOUS)], minlength=n)
    shape = det | (f_det & (n_prev == 0)[g] & np.isfinite(f))
    out = {"n_det": np.maximum(n_det, n_now + np.bincount(g[f_det], minlength=n)).astype(float),
           "n_nondet": np.maximum(n_nondet, np.bincount(g[f_non], minlength=n)).astype(float),
           "n_forced": np.bincount(g[forced], minlength=n).astype(float)}
    with np.errstate(invalid="ignore", divide="ignore"):
        # The first detection: listed ones, and forced points at ≥ 5σ before the alert (they count as
        # detections and may shape the light curve; left out here, a Rubin alert with precovery
        # photometry and no survey first-detection time was "first" stage with days of shape).
        tmin = np.full(n, np.inf)
        np.minimum.at(tmin, g[det | f_det], mjd[det | f_det])
        first = np.fmin(first_known, np.where(np.isfinite(tmin), tmin, np.nan))
        out["days_since_first"] = np.where(np.isfinite(first), now - first, 0.0)
        sel = (nondet | f_non) & (mjd < now[g])
        tmax = np.full(n, -np.inf)
        np.maximum.at(tmax, g[sel], mjd[sel])
        out["days_since_last_nondet"] = np.where(np.isfinite(tmax), now - tmax, np.nan)
        n_shape = np.bincount(g[shape], minlength=n)
        out["frac_negative"] = np.where(n_shape > 0, np.bincount(g[shape], weights=f[shape] < 0, minlength=n)
                                        / n_shape, np.nan)
    # Detections (see ``shape``) only, still grouped by alert and in time order.
    gd, td, fd, bd = g[shape], mjd[shape], f[shape], band[shape]
    has = n_shape > 0
    starts = np.searchsorted(gd, np.flatnonzero(has))
    ends = np.r_[starts[1:], len(gd)]
    for k in ("peak_flux", "flux_now_over_peak", "amplitude_mag", "rise_rate", "decline_rate", "colour_gr"):
        out[k] = np.full(n, np.nan)
    if len(starts):
        absf = np.abs(fd)
        ipk = _first_where(absf, np.maximum.reduceat(absf, starts), starts)
        peak = fd[ipk]
        out["peak_flux"][has] = peak
        with np.errstate(invalid="ignore", divide="ignore"):
            out["flux_now_over_peak"][has] = np.where(peak != 0, fd[ends - 1] / np.where(peak != 0, peak, 1.0),
                                                      np.nan)
        m = _mag(absf)
        fin = np.isfinite(m)
        mx = np.maximum.reduceat(np.where(fin, m, -np.inf), starts)
        mn = np.minimum.reduceat(np.where(fin, m, np.inf), starts)
        out["amplitude_mag"][has] = np.where(np.isfinite(mx), mx - mn, np.nan)
        _rates(out, n, gd[fin], td[fin], m[fin], bd[fin])
        _colour(out, n, gd, td, m, bd)
    out.update(_positions(n, g, kind, ra, dec, is_det))
    return out


def _rates(out: dict, n: int, gd, td, m, bd) -> None:
    """Rise and decline rates (mag/day) per (alert, band) with ≥ 2 points, averaged over bands."""
    _, bcode = np.unique(bd, return_inverse=True)  # alphabetical: the order the bands are averaged in
    key = gd * 64 + bcode
    order = np.argsort(key, kind="stable")
    gd, td, m = gd[order], td[order], m[order]
    s, e = _segments(key[order])
    if not len(s):
        return
    k = _first_where(m, np.minimum.reduceat(m, s), s)  # brightest point (first on ties)
    two = (e - s) >= 2
    s, e, k = s[two], e[two], k[two]
    grp = gd[s]
    with np.errstate(invalid="ignore", divide="ignore"):
        rise_ok = (k > s) & (td[k] > td[s])
        rise = (m[s] - m[k]) / (td[k] - td[s])
        dec_ok = (k < e - 1) & (td[e - 1] > td[k])
        decl = (m[e - 1] - m[k]) / (td[e - 1] - td[k])
    for name, ok, v in (("rise_rate", rise_ok, rise), ("decline_rate", dec_ok, decl)):
        cnt = np.bincount(grp[ok], minlength=n)
        tot = np.bincount(grp[ok], weights=v[ok], minlength=n)
        out[name] = np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)


def _last_of(n: int, grp: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per alert, the index of its last row where ``mask`` holds (−1 if none); rows grouped in order."""
    last = np.full(n, -1)
    idx = np.flatnonzero(mask)
    np.maximum.at(last, grp[idx], idx)  # (a repeated-index assignment has no guaranteed order)
    return last


def _colour(out: dict, n: int, gd, td, m, bd) -> None:
    """g − r from the latest g and r detections, if within 1 day of each other."""
    ig, ir = _last_of(n, gd, bd == "g"), _last_of(n, gd, bd == "r")
    both = (ig >= 0) & (ir >= 0)
    ig, ir = ig[both], ir[both]
    out["colour_gr"][both] = np.where(np.abs(td[ig] - td[ir]) < 1.0, m[ig] - m[ir], np.nan)


def _positions(n: int, g, kind, ra, dec, is_det) -> dict:
    """``pos_scatter`` and ``pos_offset_now`` (arcsec) of the detections with a position."""
    from stream.alert import DETECTION

    out = {"pos_scatter": np.full(n, np.nan), "pos_offset_now": np.full(n, np.nan)}
    ok = is_det & np.isfinite(ra) & np.isfinite(dec)
    cnt = np.bincount(g[ok], minlength=n)
    ok &= (cnt >= 2)[g]
    if not ok.any():
        return out
    gp, rp, dp, now = g[ok], ra[ok], dec[ok], kind[ok] == DETECTION
    cnt = np.bincount(gp, minlength=n)
    multi = cnt > 0
    c = np.maximum(cnt, 1)
    dec0 = np.bincount(gp, weights=dp, minlength=n) / c
    first = np.full(n, len(gp))
    np.minimum.at(first, gp, np.arange(len(gp)))  # each alert's earliest row
    first_ra = np.full(n, np.nan)
    has = first < len(gp)
    first_ra[has] = rp[first[has]]
    dra = (rp - first_ra[gp] + 180.0) % 360.0 - 180.0  # wrap-safe offsets from the first detection
    x, y = dra * np.cos(np.radians(dec0[gp])) * 3600.0, (dp - dec0[gp]) * 3600.0
    xm, ym = np.bincount(gp, weights=x, minlength=n) / c, np.bincount(gp, weights=y, minlength=n) / c
    ss = np.bincount(gp, weights=(x - xm[gp]) ** 2 + (y - ym[gp]) ** 2, minlength=n)
    out["pos_scatter"][multi] = np.sqrt(ss / c)[multi]
    inow = _last_of(n, gp, now)
    n_old = np.bincount(gp[~now], minlength=n)
    use = (inow >= 0) & (n_old > 0)
    xo = np.bincount(gp[~now], weights=x[~now], minlength=n) / np.maximum(n_old, 1)
    yo = np.bincount(gp[~now], weights=y[~now], minlength=n) / np.maximum(n_old, 1)
    out["pos_offset_now"][use] = np.hypot(x[inow[use]] - xo[use], y[inow[use]] - yo[use])
    return out


def _image_seeing(alerts) -> tuple:
    """Per alert, image seeing (arcsec) from its light curve's forced photometry, in one pass.

    Returns the seeing of the alert's own exposure and the median over the exposures of its
    detections (NaN where the light curve has none).
    """
    from stream.alert import DETECTION, PREVIOUS

    own_fp, det_fp = np.full(len(alerts), np.nan), np.full(len(alerts), np.nan)
    for i, a in enumerate(alerts):
        lc = a.lightcurve
        has = np.isfinite(lc.seeing)  # only forced photometry carries an image seeing
        if not has.any():
            continue
        scale = PIXEL_SCALE.get(a.survey, 1.0)
        exp, see = lc.exposure[has], lc.seeing[has]
        own = exp == a.exposure
        if own.any():
            own_fp[i] = median(see[own]) * scale
        at_det = np.isin(exp, lc.exposure[(lc.kind == DETECTION) | (lc.kind == PREVIOUS)])
        if at_det.any():
            det_fp[i] = median(see[at_det]) * scale
    return own_fp, det_fp


def _own_psf_width(alerts) -> np.ndarray:
    return np.array([a.context.fwhm * PIXEL_SCALE.get(a.survey, 1.0) for a in alerts], dtype=float)


class ExposureCompanions:
    """PSF widths of the alerts seen so far, per exposure, across micro-batches.

    The exposure's seeing is the median PSF width of the *other* alerts of that exposure;
    from one micro-batch alone it would depend on where the batch boundaries fall (an alert
    scored alone has no companions at all). A stream :class:`stream.pipeline.Pipeline` keeps one
    of these, so each alert sees every companion that arrived up to and with its batch (the
    first alerts of an exposure still see fewer than the last; training sees them all).
    Bounded: the oldest exposures are forgotten first, once either limit is passed.

    Parameters
    ----------
    max_exposures : int or float
        Exposure keys (whole exposures and detector sections together) kept (``math.inf``: all).
    max_alerts : int or float
        PSF widths kept over all keys (each alert is kept under two keys): the last ~50,000
        alerts, five Rubin visits, ~15 MB.
    """

    def __init__(self, max_exposures: float = 20_000, max_alerts: float = 100_000):
        self.max_exposures, self.max_alerts = max_exposures, max_alerts
        self._widths: OrderedDict = OrderedDict()  # key -> {alert key: PSF width}
        self._n = 0

    def add(self, keys: np.ndarray, ids: list, widths: np.ndarray) -> None:
        for k, i, w in zip(keys.tolist(), ids, widths.tolist(), strict=True):
            if k is None:  # no exposure to pool by
                continue
            d = self._widths.get(k)
            if d is None:
                d = self._widths[k] = {}
            self._n += i not in d
            d[i] = w
        while len(self._widths) > 1 and (len(self._widths) > self.max_exposures or self._n > self.max_alerts):
            self._n -= len(self._widths.popitem(last=False)[1])

    def loo_median(self, keys: np.ndarray, ids: list, min_others: int) -> np.ndarray:
        """Per alert, the median of the finite widths of the other alerts remembered for its key."""
        out = np.full(len(keys), np.nan)
        rows: dict = {}
        for j, k in enumerate(keys.tolist()):
            rows.setdefault(k, []).append(j)
        for k, js in rows.items():
            d = self._widths.get(k, {})
            v = np.sort(np.array([w for w in d.values() if math.isfinite(w)], dtype=float))
            for j in js:
                own = d.get(ids[j], np.nan)
                if math.isfinite(own):  # leave its own width out: one occurrence of that value
                    i = int(np.searchsorted(v, own))
                    m = len(v) - 1
                    if m < min_others:
                        continue
                    h = m // 2  # the others are v without position i
                    hi = v[h] if h < i else v[h + 1]
                    if m % 2:
                        out[j] = hi
                    else:
                        out[j] = 0.5 * ((v[h - 1] if h - 1 < i else v[h]) + hi)
                elif len(v) >= min_others:
                    out[j] = median(v)
        return out


def image_level_seeing(alerts, fp: np.ndarray | None = None, companions: ExposureCompanions | None = None
                       ) -> np.ndarray:
    """Seeing (arcsec) of each alert's exposure from image-level data only; NaN where there is none.

    In order: the forced-photometry image seeing of the alert's own exposure (``fp``, see
    :func:`_image_seeing`; computed when not given); the median PSF width of the *other*
    alerts of the same whole exposure (same field and time, all detector sections; ≥ 3 of
    them) among ``alerts`` (with ``companions``, also those of earlier micro-batches), else of
    the same detector section (≥ 2) — an exposure-level
    quantity (science.md §1); pooling the whole exposure keeps its noise small, which
    matters because noise in z dilutes the adjustment (regression towards zero).

    Parameters
    ----------
    alerts : list of stream.alert.Alert
        The alerts, which are also each other's exposure companions.
    fp : numpy.ndarray, optional
        Per alert, the forced-photometry seeing of its own exposure (NaN where none).
    companions : ExposureCompanions, optional
        Remembers earlier batches' alerts (a stream); ``alerts`` are added to it first.

    Returns
    -------
    numpy.ndarray
        Seeing in arcsec, NaN where only the alert's own PSF width would be left.
    """
    if fp is None:
        fp = _image_seeing(alerts)[0]
    own = _own_psf_width(alerts)
    # An unknown exposure (key -1) pools nothing: None keys are skipped and group only with each other.
    section = np.array([f"{a.survey}:{a.exposure}" if a.exposure >= 0 else None for a in alerts], dtype=object)
    whole = np.array([f"{a.survey}:{a.field}:{a.mjd:.5f}" if a.field >= 0 else None for a in alerts], dtype=object)
    # One batch alone is a stream with no past: the same leave-one-out medians, nothing forgotten.
    companions = companions if companions is not None else ExposureCompanions(max_exposures=math.inf,
                                                                              max_alerts=math.inf)
    ids = [(a.survey, a.object_id, a.alert_id) for a in alerts]
    companions.add(whole, ids, own)
    companions.add(section, ids, own)
    est = companions.loo_median(whole, ids, 3)
    est = np.where(np.isfinite(est), est, companions.loo_median(section, ids, 2))
    return np.where(np.isfinite(fp), fp, est)


def _exposure_seeing(alerts, fp: np.ndarray, companions=None) -> np.ndarray:
    """:func:`image_level_seeing`, with the alert's own PSF width as the last resort."""
    est = image_level_seeing(alerts, fp, companions)
    return np.where(np.isfinite(est), est, _own_psf_width(alerts))


def conditions(alerts, companions: ExposureCompanions | None = None) -> pd.DataFrame:
    """Observing conditions of each alert's exposure, columns :data:`CONDITIONS`.

    Airmass and Moon geometry come from (ra, dec, mjd) at the survey's site
    (:func:`sky_geometry`, vectorised over the batch, no network). ``companions``: see
    :func:`image_level_seeing`.
    """
    return pd.DataFrame(_conditions(alerts, companions), columns=list(CONDITIONS))


def _conditions(alerts, companions) -> dict:
    """:func:`conditions` as a dict of arrays."""
    n = len(alerts)
    out = {c: np.full(n, np.nan) for c in CONDITIONS}
    if n == 0:
        return out
    own_fp, det_fp = _image_seeing(alerts)
    out["seeing"] = seeing = _exposure_seeing(alerts, own_fp, companions)
    # det_seeing: the median seeing of the exposures of the alert's detections (a young
    # transient's share tonight's; a long-lived source's span many nights, and their median is
    # what its history features saw); tonight's where none of them has a forced measurement.
    out["det_seeing"] = np.where(np.isfinite(det_fp), det_fp, seeing)
    out["limit_mag"] = np.array([a.context.limit_mag for a in alerts], dtype=float)
    surveys = np.array([a.survey for a in alerts])
    for survey in np.unique(surveys):
        if survey not in SITES:
            continue
        idx = np.flatnonzero(surveys == survey)
        sub = [alerts[i] for i in idx]
        geo = sky_geometry(np.array([a.ra for a in sub]), np.array([a.dec for a in sub]),
                           np.array([a.mjd for a in sub]), SITES[survey], scale=sub[0].time_scale)
        for c in ("airmass", "moon_illumination", "moon_separation"):
            out[c][idx] = geo[c]
    return out


def sky_geometry(ra, dec, mjd, site, scale: str = "utc") -> dict:
    """Airmass of the target, Moon illumination (0 below the horizon) and Moon separation (deg).

    Sidereal time, Sun and Moon come from the low-precision numpy series the simulator
    uses (:mod:`stream.simulate`: Moon to ~0.3°, Sun to 0.01°), vectorised over the batch;
    altitudes follow from the hour angle with the catalogue (J2000) coordinates. Ignoring
    precession and the Moon's parallax (≤ 1°) changes an airmass by well under a per cent —
    plenty for a feature. (astropy's ``get_body`` costs ~30 ms per call, more than the
    rest of a 500-alert micro-batch's features when every alert has its own exposure time.)
    """
    from stream.simulate import _gmst_deg, moon_position, sun_position

    lat, lon, _ = site
    ra, dec, mjd = (np.asarray(v, dtype=float) for v in (ra, dec, mjd))
    jd = mjd + 2400000.5 - (tai_minus_utc_s(mjd) / 86400.0 if scale == "tai" else 0.0)
    lst = _gmst_deg(jd) + lon
    m_ra, m_dec, m_lam, m_beta = moon_position(jd)
    _, _, s_lam = sun_position(jd)

    def alt(r, d):
        ha, d, phi = np.radians(lst - r), np.radians(d), np.radians(lat)
        return np.degrees(np.arcsin(np.clip(np.sin(phi) * np.sin(d) + np.cos(phi) * np.cos(d) * np.cos(ha), -1, 1)))

    a, moon_alt = alt(ra, dec), alt(m_ra, m_dec)
    r1, d1, r2, d2 = (np.radians(v) for v in (ra, dec, m_ra, m_dec))
    sep = np.degrees(np.arccos(np.clip(np.sin(d1) * np.sin(d2) + np.cos(d1) * np.cos(d2) * np.cos(r1 - r2), -1, 1)))
    # Kasten & Young (1989) airmass: finite down to the horizon.
    am = 1.0 / (np.sin(np.radians(a)) + 0.50572 * np.power(np.clip(a + 6.07995, 1e-3, None), -1.6364))
    # Lit fraction from the Sun–Moon elongation (phase angle ≈ π − elongation).
    illum = (1.0 - np.cos(np.radians(m_beta)) * np.cos(np.radians(m_lam - s_lam))) / 2.0
    return {"airmass": np.where(a > 0, am, np.nan), "moon_illumination": np.where(moon_alt > 0, illum, 0.0),
            "moon_separation": sep}


_CONTEXT_FEATURES = ["real_bogus", "star_galaxy", "ps1_distance", "gaia_distance", "gaia_mag", "ref_mag",
                     "ref_distance", "ss_distance", "elongation", "fwhm", "n_bad_pixels", "n_negative_pixels", "snr",
                     "extendedness", "mag", "limit_mag", "n_det_history"]


def alert_features(alerts, corrected_flux=None, companions: ExposureCompanions | None = None) -> pd.DataFrame:
    """Feature table for a batch of alerts.

    Parameters
    ----------
    alerts : sequence of Alert
    corrected_flux : sequence of ndarray or None, optional
        Per alert, the HSR-corrected flux aligned with ``alert.lightcurve``.
    companions : ExposureCompanions, optional
        Exposure companions remembered from earlier batches of a stream (seeing).

    Returns
    -------
    pandas.DataFrame
        One row per alert, columns :data:`FEATURES`, index = position in ``alerts``.
    """
    cols = dict(zip(_CONTEXT_FEATURES, np.array([
        (c.real_bogus, c.star_galaxy, c.ps1_distance, c.gaia_distance, c.gaia_mag, c.ref_mag, c.ref_distance,
         c.ss_distance, c.elongation,
         c.fwhm * PIXEL_SCALE.get(a.survey, 1.0),  # arcsec, like every other distance
         c.n_bad_pixels, c.n_negative_pixels, c.snr, c.extendedness, c.mag, c.limit_mag,
         c.n_det_history if c.n_det_history >= 0 else np.nan)
        for a in alerts for c in (a.context,)], dtype=float).reshape(len(alerts), len(_CONTEXT_FEATURES)).T,
        strict=True))
    cols.update(lightcurve_features(alerts, corrected_flux))
    cols["galactic_latitude"] = galactic_latitude([a.ra for a in alerts], [a.dec for a in alerts]) \
        if len(alerts) else np.zeros(0)
    cond = _conditions(alerts, companions)
    cols.update((c, cond[c]) for c in CONDITIONS if c != "limit_mag")
    X = np.column_stack([np.asarray(cols[f], dtype=float) for f in FEATURES]) if len(alerts) \
        else np.zeros((0, len(FEATURES)))
    # A non-finite value in an alert (a survey's overflowed float) is no measurement: NaN, as
    # XGBoost refuses ±inf and one such alert would otherwise fail its whole batch. So is one
    # beyond float32, which the boosters read: it would become inf there.
    with np.errstate(invalid="ignore"):
        X[~(np.abs(X) <= FLOAT32_MAX)] = np.nan
    return pd.DataFrame(X, columns=list(FEATURES))

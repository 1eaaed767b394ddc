"""Per-alert features for the scorers, computed for a whole micro-batch at once.

Inputs are survey-neutral :class:`stream.alert.Alert` objects (optionally with an
HSR-corrected flux column per alert); the output is one row per alert in a
DataFrame whose column order is :data:`FEATURES`. Missing values are NaN, which
XGBoost handles natively.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

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
)

#: Conditions of the observation (not of the source): what causal adjustment acts on.
#: ``seeing`` in arcsec, ``limit_mag`` the 5σ depth (AB), ``moon_illumination`` the lit
#: fraction (0 when the Moon is below the horizon), ``moon_separation`` in degrees.
CONDITIONS = ("seeing", "airmass", "limit_mag", "moon_illumination", "moon_separation")

#: Observatory sites (geodetic lat, lon in degrees east, height in m) and pixel scales (arcsec).
SITES = {"ztf": (33.3563, -116.8650, 1712.0), "rubin": (-30.2446, -70.7494, 2663.0)}
PIXEL_SCALE = {"ztf": 1.012, "rubin": 0.2}


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


def lightcurve_features(lc, now_mjd: float, first_det_mjd: float, flux=None) -> dict:
    """Shape features from one light curve. ``flux`` overrides ``lc.flux`` (HSR-corrected)."""
    from stream.alert import DETECTION, NONDETECTION, PREVIOUS

    f = lc.flux if flux is None else flux
    det = ((lc.kind == DETECTION) | (lc.kind == PREVIOUS)) & np.isfinite(f)
    out = {"n_det": int(det.sum()), "n_nondet": int((lc.kind == NONDETECTION).sum()),
           "n_forced": int(len(lc) - det.sum() - (lc.kind == NONDETECTION).sum())}
    t, fd, bands = lc.mjd[det], f[det], lc.band[det]
    first = np.nanmin([first_det_mjd, t.min() if len(t) else np.nan]) if len(t) or np.isfinite(first_det_mjd) \
        else np.nan
    out["days_since_first"] = now_mjd - first if np.isfinite(first) else 0.0
    nd = lc.mjd[(lc.kind == NONDETECTION) & (lc.mjd < now_mjd)]
    out["days_since_last_nondet"] = now_mjd - nd.max() if len(nd) else np.nan
    out["frac_negative"] = float((fd < 0).mean()) if len(fd) else np.nan
    if len(fd) == 0:
        out.update(peak_flux=np.nan, flux_now_over_peak=np.nan, amplitude_mag=np.nan, rise_rate=np.nan,
                   decline_rate=np.nan, colour_gr=np.nan)
        return out
    ipk = int(np.argmax(np.abs(fd)))
    peak = fd[ipk]
    out["peak_flux"] = float(peak)
    out["flux_now_over_peak"] = float(fd[-1] / peak) if peak else np.nan
    m = _mag(np.abs(fd))
    out["amplitude_mag"] = float(np.nanmax(m) - np.nanmin(m)) if np.isfinite(m).any() else np.nan
    # Rates in mag/day (positive = brightening for rise, fading for decline), per band, averaged.
    rise, dec = [], []
    for b in np.unique(bands):
        sel = bands == b
        tb, mb = t[sel], m[sel]
        ok = np.isfinite(mb)
        tb, mb = tb[ok], mb[ok]
        if len(tb) < 2:
            continue
        k = int(np.argmin(mb))
        if k > 0 and tb[k] > tb[0]:
            rise.append((mb[0] - mb[k]) / (tb[k] - tb[0]))
        if k < len(tb) - 1 and tb[-1] > tb[k]:
            dec.append((mb[-1] - mb[k]) / (tb[-1] - tb[k]))
    out["rise_rate"] = float(np.mean(rise)) if rise else np.nan
    out["decline_rate"] = float(np.mean(dec)) if dec else np.nan
    # Colour g - r from the latest g and r detections within 1 day of each other.
    g, r = bands == "g", bands == "r"
    if g.any() and r.any():
        tg, tr = t[g][-1], t[r][-1]
        out["colour_gr"] = float(m[g][-1] - m[r][-1]) if abs(tg - tr) < 1.0 else np.nan
    else:
        out["colour_gr"] = np.nan
    return out


def position_features(lc) -> dict:
    """Positional scatter of the detections (arcsec).

    ``pos_scatter``: RMS distance of the detections from their mean position (≥ 2
    detections); ``pos_offset_now``: distance of the triggering detection from the mean
    of the earlier ones (≥ 1 earlier). Moving or dipole-subtracted stars and artefacts
    scatter more than a static point source of the same S/N.
    """
    from stream.alert import DETECTION, PREVIOUS

    det = ((lc.kind == DETECTION) | (lc.kind == PREVIOUS)) & np.isfinite(lc.ra) & np.isfinite(lc.dec)
    out = {"pos_scatter": np.nan, "pos_offset_now": np.nan}
    if det.sum() < 2:
        return out
    ra, dec, now = lc.ra[det], lc.dec[det], lc.kind[det] == DETECTION
    dec0 = float(np.mean(dec))
    dra = (ra - ra[0] + 180.0) % 360.0 - 180.0  # wrap-safe offsets from the first detection
    x, y = dra * np.cos(np.radians(dec0)) * 3600.0, (dec - dec0) * 3600.0
    out["pos_scatter"] = float(np.sqrt(np.mean((x - x.mean()) ** 2 + (y - y.mean()) ** 2)))
    if now.any() and (~now).any():
        xi, yi = x[now][-1], y[now][-1]
        out["pos_offset_now"] = float(np.hypot(xi - x[~now].mean(), yi - y[~now].mean()))
    return out


def _loo_median(values: np.ndarray, keys: np.ndarray, min_others: int) -> np.ndarray:
    """Per row, the median of the finite ``values`` of the *other* rows with the same key (R1)."""
    out = np.full(len(values), np.nan)
    order = np.argsort(keys, kind="stable")
    ks = keys[order]
    starts = np.r_[0, np.flatnonzero(ks[1:] != ks[:-1]) + 1]
    for a, b in zip(starts, np.r_[starts[1:], len(ks)], strict=True):
        idx = order[a:b]
        if b - a <= min_others:
            continue
        vals = values[idx]
        for j, i in enumerate(idx):
            rest = np.delete(vals, j)
            rest = rest[np.isfinite(rest)]
            if len(rest) >= min_others:
                out[i] = float(np.median(rest))
    return out


def _exposure_seeing(alerts) -> np.ndarray:
    """Seeing (arcsec) of each alert's exposure, from image-level data where possible.

    In order: the forced-photometry image seeing of the alert's own exposure; the median
    PSF width of the *other* alerts of the same whole exposure (same field and time, all
    detector sections; ≥ 3 of them) in the batch, else of the same detector section
    (≥ 2) — an exposure-level quantity (science.md §1); pooling the whole exposure keeps
    its noise small, which matters because noise in z dilutes the adjustment
    (regression towards zero); the alert's own PSF width as the last resort.
    """
    n = len(alerts)
    own = np.array([a.context.fwhm * PIXEL_SCALE.get(a.survey, 1.0) for a in alerts], dtype=float)
    fp = np.full(n, np.nan)
    for i, a in enumerate(alerts):
        lc = a.lightcurve
        sel = (lc.exposure == a.exposure) & np.isfinite(lc.seeing)
        if sel.any():
            fp[i] = float(np.median(lc.seeing[sel])) * PIXEL_SCALE.get(a.survey, 1.0)
    section = np.array([f"{a.survey}:{a.exposure}" for a in alerts])
    whole = np.array([f"{a.survey}:{a.field}:{a.mjd:.5f}" for a in alerts])
    est = _loo_median(own, whole, 3)
    est = np.where(np.isfinite(est), est, _loo_median(own, section, 2))
    return np.where(np.isfinite(fp), fp, np.where(np.isfinite(est), est, own))


def conditions(alerts) -> pd.DataFrame:
    """Observing conditions of each alert's exposure, columns :data:`CONDITIONS`.

    Airmass and Moon geometry come from (ra, dec, mjd) at the survey's site
    (:func:`sky_geometry`, vectorised over the batch, no network).
    """
    n = len(alerts)
    out = pd.DataFrame({c: np.full(n, np.nan) for c in CONDITIONS})
    if n == 0:
        return out
    out["seeing"] = _exposure_seeing(alerts)
    out["limit_mag"] = [a.context.limit_mag for a in alerts]
    surveys = np.array([a.survey for a in alerts])
    for survey in np.unique(surveys):
        if survey not in SITES:
            continue
        idx = np.flatnonzero(surveys == survey)
        sub = [alerts[i] for i in idx]
        geo = sky_geometry(np.array([a.ra for a in sub]), np.array([a.dec for a in sub]),
                           np.array([a.mjd for a in sub]), SITES[survey], scale=sub[0].time_scale)
        for c in ("airmass", "moon_illumination", "moon_separation"):
            out.loc[idx, c] = geo[c]
    return out


#: TAI − UTC (s) since 2017: Rubin times are TAI, the ephemerides below want UT (UT1 ≈ UTC here).
TAI_MINUS_UTC_S = 37.0


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
    jd = mjd + 2400000.5 - (TAI_MINUS_UTC_S / 86400.0 if scale == "tai" else 0.0)
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


def alert_features(alerts, corrected_flux=None) -> pd.DataFrame:
    """Feature table for a batch of alerts.

    Parameters
    ----------
    alerts : sequence of Alert
    corrected_flux : sequence of ndarray or None, optional
        Per alert, the HSR-corrected flux aligned with ``alert.lightcurve``.

    Returns
    -------
    pandas.DataFrame
        One row per alert, columns :data:`FEATURES`, index = position in ``alerts``.
    """
    rows = []
    for i, a in enumerate(alerts):
        c = a.context
        flux = None if corrected_flux is None else corrected_flux[i]
        row = {
            "real_bogus": c.real_bogus, "star_galaxy": c.star_galaxy, "ps1_distance": c.ps1_distance,
            "gaia_distance": c.gaia_distance, "gaia_mag": c.gaia_mag, "ref_mag": c.ref_mag,
            "ref_distance": c.ref_distance, "ss_distance": c.ss_distance, "elongation": c.elongation,
            "fwhm": c.fwhm, "n_bad_pixels": c.n_bad_pixels, "n_negative_pixels": c.n_negative_pixels,
            "snr": c.snr, "extendedness": c.extendedness, "mag": c.mag, "limit_mag": c.limit_mag,
            "n_det_history": c.n_det_history if c.n_det_history >= 0 else np.nan,
        }
        row.update(lightcurve_features(a.lightcurve, a.mjd, c.first_det_mjd, flux))
        row.update(position_features(a.lightcurve))
        rows.append(row)
    cond = conditions(alerts)
    df = pd.DataFrame(rows, columns=[f for f in FEATURES if f not in ("galactic_latitude",) + CONDITIONS
                                     or f == "limit_mag"])
    df.insert(FEATURES.index("galactic_latitude"), "galactic_latitude",
              galactic_latitude([a.ra for a in alerts], [a.dec for a in alerts]) if len(alerts) else [])
    for c in CONDITIONS:
        if c != "limit_mag":
            df[c] = cond[c].to_numpy()
    return df[list(FEATURES)].astype(float)

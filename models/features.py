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
)

#: Conditions of the observation (not of the source): what causal adjustment acts on.
CONDITIONS = ("seeing", "airmass", "limit_mag_cond", "moon_illumination")


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
        rows.append(row)
    df = pd.DataFrame(rows, columns=[f for f in FEATURES if f != "galactic_latitude"])
    df.insert(FEATURES.index("galactic_latitude"), "galactic_latitude",
              galactic_latitude([a.ra for a in alerts], [a.dec for a in alerts]) if len(alerts) else [])
    return df.astype(float)

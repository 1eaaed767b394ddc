"""The batch (vectorised) light-curve features against a plain per-alert reference."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from conftest import DATA

from causal.hsr import HSR
from models.features import lightcurve_features
from stream.alert import FORCED, NONDETECTION, Alert, Envelope
from stream.decode import Decoder
from stream.simulate import simulate


def _mag(flux):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(flux > 0, 23.9 - 2.5 * np.log10(np.where(flux > 0, flux, 1.0)), np.nan)


# Reference: the per-alert definitions, one light curve at a time (slow, obvious).
def ref_lightcurve_features(lc, now_mjd: float, first_det_mjd: float, flux=None) -> dict:
    """Shape features from one light curve. ``flux`` overrides ``lc.flux`` (HSR-corrected)."""
    from stream.alert import DETECTION, FORCED, NONDETECTION, PREVIOUS

    f = lc.flux if flux is None else flux
    det = ((lc.kind == DETECTION) | (lc.kind == PREVIOUS)) & np.isfinite(f)
    # Forced points before the alert at the survey's 5σ (on the survey's own fluxes).
    with np.errstate(invalid="ignore"):
        hist = (lc.kind == FORCED) & (lc.mjd < now_mjd) & np.isfinite(lc.flux) & (lc.flux_err > 0)
        f_det = hist & (np.abs(lc.flux) >= 5 * lc.flux_err)
    f_non = hist & ~f_det
    now_det = int((det & (lc.kind == DETECTION)).sum())
    out = {"n_det": max(int(det.sum()), now_det + int(f_det.sum())),
           "n_nondet": max(int((lc.kind == NONDETECTION).sum()), int(f_non.sum())),
           "n_forced": int((lc.kind == FORCED).sum())}
    td = lc.mjd[det | f_det]  # forced points at ≥ 5σ are detections too
    first = np.nanmin([first_det_mjd, td.min() if len(td) else np.nan]) if len(td) or np.isfinite(first_det_mjd) \
        else np.nan
    out["days_since_first"] = now_mjd - first if np.isfinite(first) else 0.0
    nd = lc.mjd[((lc.kind == NONDETECTION) | f_non) & (lc.mjd < now_mjd)]
    out["days_since_last_nondet"] = now_mjd - nd.max() if len(nd) else np.nan
    # The shape: listed detections, or with none before the alert, the forced points at ≥ 5σ.
    shape = det | (f_det & np.isfinite(f)) if not (det & (lc.kind == PREVIOUS)).any() else det
    t, fd, bands = lc.mjd[shape], f[shape], lc.band[shape]
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


def ref_position_features(lc) -> dict:
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



def _check(alerts, fluxes=None):
    got = lightcurve_features(alerts, fluxes)
    for i, a in enumerate(alerts):
        flux = None if fluxes is None else fluxes[i]
        want = ref_lightcurve_features(a.lightcurve, a.mjd, a.context.first_det_mjd, flux)
        want.update(ref_position_features(a.lightcurve))
        for k, v in want.items():
            assert np.isclose(got[k][i], v, rtol=1e-9, atol=1e-12, equal_nan=True), (a.alert_id, k, got[k][i], v)


def test_batch_features_match_reference_on_vendored_alerts():
    dec = Decoder(keep_cutouts=False)
    alerts = [x for f in sorted(DATA.rglob("*.avro")) for x in dec.decode(Envelope(f.read_bytes()))
              if isinstance(x, Alert)]
    assert len(alerts) > 100
    _check(alerts)


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_batch_features_match_reference_on_simulated_alerts_with_hsr(mode):
    res = simulate(4, mode=mode, quadrants=2 if mode == "dense" else 8, nights=3, n_alerts=400)
    dec = Decoder(keep_cutouts=False)
    alerts = [x for e in res.envelopes() for x in dec.decode(e) if isinstance(x, Alert)]
    fluxes = HSR().correct(alerts)[0]
    _check(alerts, fluxes)
    _check(alerts)


def test_counts_and_shape_come_from_forced_photometry_when_the_history_lacks_them():
    # AMPEL's schema 3.5 alerts: forced photometry, no limits, detections redacted.
    dec = Decoder(keep_cutouts=False)
    alerts = [dec.decode(Envelope(p.read_bytes(), str(p)))[0]
              for p in sorted((DATA / "ztf_ampel" / "alerts_2021720_programid1_nocutouts").glob("*.avro"))[:20]]
    feats = lightcurve_features(alerts)
    for i, a in enumerate(alerts):
        lc = a.lightcurve
        before = (lc.kind == FORCED) & (lc.mjd < a.mjd) & np.isfinite(lc.flux)
        snr = np.abs(lc.flux[before]) / lc.flux_err[before]
        assert not (lc.kind == NONDETECTION).any()  # no limits in this archive
        assert feats["n_nondet"][i] == (snr < 5).sum() and feats["n_det"][i] == 1 + (snr >= 5).sum()
    assert (feats["n_nondet"] > 0).any() and (feats["n_det"] > 1).any()
    # ... and so does the light-curve shape, from those forced detections and the alert's own.
    several = feats["n_det"] > 2
    assert several.any() and np.isfinite(feats["amplitude_mag"][several]).all()
    # ... and the time since the first detection, also without the survey's own first-detection time (Rubin's
    # is null): it had been 0 (stage "first") for an alert whose shape spanned days of forced detections.
    import dataclasses

    blind = [dataclasses.replace(a, context=dataclasses.replace(a.context, first_det_mjd=np.nan)) for a in alerts]
    got = lightcurve_features(blind)["days_since_first"]
    for i, a in enumerate(blind):
        lc = a.lightcurve
        before = (lc.kind == FORCED) & (lc.mjd < a.mjd) & np.isfinite(lc.flux) & (lc.flux_err > 0)
        early = lc.mjd[before & (np.abs(lc.flux) >= 5 * lc.flux_err)]
        assert got[i] == pytest.approx(a.mjd - early.min() if len(early) else 0.0)
    assert (got[several] > 0).all()
    _check(blind)


def test_batch_features_of_an_empty_batch():
    out = lightcurve_features([])
    assert all(len(v) == 0 for v in out.values())


def test_feature_table_of_an_empty_batch_has_every_column():
    from models.features import FEATURES, alert_features

    assert list(alert_features([]).columns) == list(FEATURES)


def test_detection_seeing_is_the_median_seeing_of_the_detections_exposures():
    from models.features import PIXEL_SCALE, conditions
    from stream.alert import DETECTION, PREVIOUS

    res = simulate(4, mode="sparse", quadrants=8, nights=3, n_alerts=300)
    dec = Decoder(keep_cutouts=False)
    alerts = [x for e in res.envelopes() for x in dec.decode(e) if isinstance(x, Alert)]
    cond = conditions(alerts)
    n_from_history = 0
    for i, a in enumerate(alerts):
        lc = a.lightcurve
        det_exp = set(lc.exposure[(lc.kind == DETECTION) | (lc.kind == PREVIOUS)].tolist())
        fp = (lc.kind == FORCED) & np.isfinite(lc.seeing)
        seen = [s for e, s in zip(lc.exposure[fp].tolist(), lc.seeing[fp].tolist(), strict=True) if e in det_exp]
        want = np.median(seen) * PIXEL_SCALE["ztf"] if seen else cond["seeing"].iloc[i]
        assert cond["det_seeing"].iloc[i] == pytest.approx(want), a.alert_id
        n_from_history += len(seen) > 1
    # Histories with several detections exist, and there the value differs from tonight's seeing.
    assert n_from_history > 20
    assert (cond["det_seeing"] != cond["seeing"]).sum() >= n_from_history // 2


def test_a_non_finite_value_is_missing_and_does_not_touch_the_rest_of_the_batch():
    import dataclasses

    from stream.pipeline import Pipeline

    dec = Decoder(keep_cutouts=False)
    alerts = [x for f in sorted((DATA / "ztf_fink").rglob("*.avro"))[:30] for x in dec.decode(Envelope(f.read_bytes()))
              if isinstance(x, Alert)]
    bad = dataclasses.replace(alerts[3], context=dataclasses.replace(alerts[3].context, elongation=float("inf"),
                                                                     snr=float("-inf")))
    pl = Pipeline(hsr=False)
    clean, _ = pl.annotate(alerts, [Envelope(b"")] * len(alerts))
    hurt, _ = pl.annotate(alerts[:3] + [bad] + alerts[4:], [Envelope(b"")] * len(alerts))
    assert all(a.status == "scored" for a in hurt)
    assert np.isnan(hurt[3].features["elongation"]) and np.isnan(hurt[3].features["snr"])
    for i, (a, b) in enumerate(zip(clean, hurt, strict=True)):
        if i != 3:
            assert (a.p_real, a.p_extragalactic, a.p_fast) == (b.p_real, b.p_extragalactic, b.p_fast)


def _one_exposure_alerts():
    """AMPEL's 100 alerts of one exposure, the last one having a PSF width of its own (so a seeing in the batch)."""
    dec = Decoder(keep_cutouts=False)
    alerts = [x for f in sorted((DATA / "ztf_ampel").rglob("*.avro")) for x in dec.decode(Envelope(f.read_bytes()))
              if isinstance(x, Alert)]
    exposure = collections.Counter(a.exposure for a in alerts).most_common(1)[0][0]
    alerts = [a for a in alerts if a.exposure == exposure]
    k = max(i for i, a in enumerate(alerts) if np.isfinite(a.context.fwhm))
    return alerts[:k] + alerts[k + 1:] + [alerts[k]]


def test_exposure_companions_carry_an_exposure_across_micro_batches():
    """An alert scored after its exposure's companions gets the seeing it would get among all of them."""
    from models.features import ExposureCompanions, image_level_seeing

    alerts = _one_exposure_alerts()
    fp = np.full(len(alerts), np.nan)  # leave the forced-photometry seeing out: the companions decide
    whole = image_level_seeing(alerts, fp)
    assert np.isfinite(whole).sum() > 50
    mem = ExposureCompanions()
    np.testing.assert_array_equal(image_level_seeing(alerts, fp, mem), whole)  # one batch: the same numbers
    mem = ExposureCompanions()
    for a in alerts[:-1]:  # one alert at a time, then the last one alone
        image_level_seeing([a], fp[:1], mem)
    last = image_level_seeing(alerts[-1:], fp[:1], mem)
    assert last[0] == whole[-1]
    # without the memory, an alert alone has no companions at all
    assert np.isnan(image_level_seeing(alerts[-1:], fp[:1])[0])
    # seen again (a retried batch), an alert is not its own companion
    np.testing.assert_array_equal(image_level_seeing(alerts, fp, mem), whole)


def test_a_stream_pipeline_scores_an_alert_alike_in_any_batch():
    from stream.pipeline import Pipeline

    alerts = _one_exposure_alerts()
    envs = [Envelope(b"")] * len(alerts)
    together, _ = Pipeline(hsr=False).annotate(alerts, envs)
    pl = Pipeline(hsr=False)
    pl.annotate(alerts[:-1], envs[:-1])
    alone, _ = pl.annotate(alerts[-1:], envs[-1:])
    assert alone[0].features["seeing"] == together[-1].features["seeing"]
    assert (alone[0].p_real, alone[0].p_extragalactic, alone[0].p_fast) == \
        (together[-1].p_real, together[-1].p_extragalactic, together[-1].p_fast)


def test_exposure_companions_leave_one_out_median_against_brute_force():
    from models.features import ExposureCompanions

    rng = np.random.default_rng(3)
    for n in range(1, 9):
        w = np.round(rng.uniform(1, 3, n), 1)  # rounded: ties too
        w[rng.uniform(size=n) < 0.2] = np.nan
        ids = list(range(n))
        keys = np.array(["e"] * n)
        mem = ExposureCompanions()
        mem.add(keys, ids, w)
        got = mem.loo_median(keys, ids, 2)
        for j in range(n):
            rest = np.delete(w, j)
            rest = rest[np.isfinite(rest)]
            want = np.median(rest) if len(rest) >= 2 else np.nan
            np.testing.assert_equal(got[j], want)


def test_exposure_companions_stay_bounded_and_ignore_unknown_exposures():
    from models.features import ExposureCompanions

    mem = ExposureCompanions(max_exposures=50, max_alerts=300)
    for e in range(200):  # 200 exposures of 10 alerts, each under one key
        mem.add(np.array([f"e{e}"] * 10, dtype=object), [(e, i) for i in range(10)], np.full(10, 2.0))
        assert len(mem._widths) <= 50 and mem._n <= 300
    assert mem._n == sum(len(d) for d in mem._widths.values())
    assert "e199" in mem._widths and "e0" not in mem._widths  # the oldest go first
    mem.add(np.array([None, None], dtype=object), ["a", "b"], np.array([1.0, 3.0]))
    assert None not in mem._widths
    assert np.isnan(mem.loo_median(np.array([None], dtype=object), ["a"], 1)[0])


def test_every_feature_has_words_for_the_explanations():
    from models.features import FEATURE_WORDS, FEATURES

    assert set(FEATURE_WORDS) == set(FEATURES)


def test_an_alert_is_aged_by_the_stream_as_it_arrived_not_by_its_batchs_newest():
    """On the stream clock an alert's age is against the newest alert seen up to it: the batch's newest had aged
    the earlier alerts of its batch, so a replay's priorities depended on the batch size (a review: down to
    0.84 of the one-by-one priority with batches of 500)."""
    import dataclasses

    from models.rank import priority
    from stream.pipeline import Pipeline

    alerts = _one_exposure_alerts()[:6]
    alerts = [dataclasses.replace(a, mjd=a.mjd + 0.5 * k) for k, a in enumerate(alerts)]  # arriving in time order
    late = dataclasses.replace(alerts[2], mjd=alerts[0].mjd - 1.0)  # and one that arrives a day late
    batch = [*alerts, late]
    anns, _ = Pipeline(hsr=False, clock="stream").annotate(batch, [Envelope(b"")] * len(batch))

    def age(a):  # from the priority's freshness factor, 0.5 + 0.5·exp(−age / 3 d)
        fresh = a.priority / float(priority(a.p_real, a.p_extragalactic, a.p_fast, a.stage, 0.0))
        return -3.0 * np.log(2.0 * fresh - 1.0)

    assert [age(a) for a in anns] == pytest.approx([0.0] * len(alerts) + [alerts[-1].mjd - late.mjd], abs=1e-9)

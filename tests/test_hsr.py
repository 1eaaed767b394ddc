"""Half-sibling regression: the hygiene rules R1–R5 of science.md §1, and the estimator contract."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sklearn.base import clone

from causal.hsr import HSR, HalfSiblingRegressor, SiblingStore, _obj_hash
from stream.decode import Decoder
from stream.simulate import simulate


@pytest.fixture(scope="module")
def sim():
    res = simulate(3, nights=1, quadrants=1, mode="dense", n_alerts=700)
    dec = Decoder(keep_cutouts=False)
    alerts = [dec.decode(e)[0] for e in res.envelopes()]
    return res, alerts


def _target(res, alerts, cls="constant"):
    classes = res.truth.set_index("candid")["class"]
    return [a for a in alerts if classes[a.alert_id] == cls][-1]


def test_r1_leave_one_out_is_bit_identical(sim):
    """Siblings of a target with the target ingested and left out == never ingested at all."""
    res, alerts = sim
    tgt = _target(res, alerts)
    full, without = HSR(), HSR()
    full.store.ingest(alerts)
    without.store.ingest([a for a in alerts if a.object_id != tgt.object_id])
    f1, f2 = full.fit_one(tgt), without.fit_one(tgt)
    assert np.array_equal(f1.corrected, f2.corrected, equal_nan=True)
    assert np.array_equal(f1.systematic, f2.systematic)
    excl = full.store.neighbours(tgt.object_id, tgt.ra, tgt.dec)
    v1 = full.store.sibling_vector(tgt.lightcurve.exposure, excl)
    v2 = without.store.sibling_vector(tgt.lightcurve.exposure, excl)
    for k in ("a", "s", "c", "n"):
        assert np.array_equal(v1[k], v2[k]), k
    # ... and leaving the target out matters: its own rows are in the full store.
    v3 = full.store.sibling_vector(tgt.lightcurve.exposure, exclude=())
    assert not np.array_equal(v1["n"], v3["n"])


def test_r2_transient_siblings_only_before_first_detection(sim):
    """A transient contributes only epochs before its first detection − margin, chosen by time."""
    res, alerts = sim
    classes = res.truth.set_index("candid")["class"]

    def first_det(a):
        lc = a.lightcurve
        return min(lc.mjd[(lc.kind == 0) | (lc.kind == 1)].min(), a.context.first_det_mjd)

    # A transient: first detected well inside its 30-day light curve.
    tgt = next(a for a in alerts if classes[a.alert_id] in ("sn", "fast", "slow_sn")
               and first_det(a) > a.lightcurve.mjd.min() + 10)
    store = SiblingStore(quiet_margin_days=2.0)
    store.ingest([tgt])
    lc = tgt.lightcurve
    first = first_det(tgt)
    obj = _obj_hash(tgt.object_id)
    used = {e for (e, o) in store.row_keys() if o == obj}
    assert used  # it does contribute its quiet past
    mjd_of = dict(zip(lc.exposure.tolist(), lc.mjd.tolist(), strict=True))
    assert max(mjd_of[e] for e in used) < first - 2.0
    # Same times, but a huge flux on one early epoch: the set of rows does not change (no value cut).
    flux = lc.flux.copy()
    early = np.flatnonzero((lc.kind == 3) & (lc.mjd < first - 5))[0]
    flux[early] = 1e4
    lc2 = dataclasses.replace(lc, flux=flux)
    store2 = SiblingStore(quiet_margin_days=2.0)
    store2.ingest([dataclasses.replace(tgt, lightcurve=lc2)])
    assert {e for (e, o) in store2.row_keys() if o == obj} == used


def test_r3_no_target_measured_field_in_the_sibling_vector(sim):
    """Changing what the target measured about itself (fwhm, rb, ...) changes nothing in its correction."""
    res, alerts = sim
    tgt = _target(res, alerts)
    hsr = HSR()
    hsr.store.ingest(alerts)
    before = hsr.fit_one(tgt)
    ctx = dataclasses.replace(tgt.context, fwhm=9.9, real_bogus=0.01, elongation=3.0, snr=1.0)
    after = hsr.fit_one(dataclasses.replace(tgt, context=ctx))
    assert np.array_equal(before.corrected, after.corrected, equal_nan=True)


def test_r4_current_exposure_uses_only_arrived_alerts(sim):
    """Before other alerts of an exposure arrive, the target's current epoch has no siblings from them."""
    res, alerts = sim
    tgt = alerts[-1]
    same = [a for a in alerts if a.exposure == tgt.exposure and a.object_id != tgt.object_id]
    assert len(same) > 5
    hsr = HSR()
    hsr.store.ingest([tgt])
    alone = hsr.store.sibling_vector([tgt.exposure], [_obj_hash(tgt.object_id)])
    hsr.store.ingest(same)
    later = hsr.store.sibling_vector([tgt.exposure], [_obj_hash(tgt.object_id)])
    assert alone["n"][0] == 0 and later["n"][0] > 0


def test_r5_ingesting_twice_leaves_state_unchanged(sim):
    _, alerts = sim
    store = SiblingStore()
    store.ingest(alerts[:300])
    snap = (store.sums.copy(), store.row_keys(), len(store), dict(store._judged))
    store.ingest(alerts[:300])
    store.ingest(alerts[100:200])
    assert np.array_equal(store.sums, snap[0])
    assert store.row_keys() == snap[1] and len(store) == snap[2] and store._judged == snap[3]



def test_quiet_verdicts_judged_in_runs_equal_those_judged_one_at_a_time():
    """Long-lived sources are judged quiet in runs by a fixed point that must give the one-at-a-time
    verdicts bit for bit. It solved the exposures without their priors while the one-at-a-time path
    had them: 1 of 314 verdicts, and so the store's sums, differed."""
    res = simulate(3, nights=2, quadrants=1, mode="dense", n_alerts=700)
    dec = Decoder(keep_cutouts=False)
    alerts = [dec.decode(e)[0] for e in res.envelopes()]

    def store(in_runs):
        s = SiblingStore()
        if not in_runs:
            s._verdicts = lambda *args, **kwargs: None  # no fixed point: every object judged in turn
        for i in range(0, len(alerts), 50):
            s.ingest(alerts[i:i + 50])
        return s

    a, b = store(True), store(False)
    assert len(a._judged) > 300 and a._judged == b._judged
    assert np.array_equal(a.sums, b.sums)


def test_overfit_alarm_fires_when_it_should():
    """Many noisy predictors and few points: in-sample residuals far below held-out ones."""
    rng = np.random.default_rng(0)
    reg = HalfSiblingRegressor(alpha=1e6)  # an (almost) unregularised fit
    X = rng.normal(size=(12, 9))
    y = rng.normal(size=12)
    reg.fit(X, y, prior=np.zeros(9), prior_scale=np.full(9, 1e6))
    r_in = y - reg._A @ reg._beta
    r_loo = reg.loo_residuals(y)
    assert 3 * np.std(r_in) < np.std(r_loo)
    # A well-posed fit does not raise it.
    X = rng.normal(size=(200, 2))
    y = X @ [1.0, 0.5] + rng.normal(size=200)
    reg.fit(X, y, prior=np.zeros(2))
    assert not 3 * np.std(y - reg._A @ reg._beta) < np.std(reg.loo_residuals(y))


def test_estimator_contract_and_prior_shrinkage():
    reg = HalfSiblingRegressor(alpha=0.2, exclusion_days=4.0)
    assert clone(reg).get_params() == reg.get_params()
    rng = np.random.default_rng(1)
    X = rng.normal(size=(30, 2))
    y = X @ [2.0, 0.0] + rng.normal(scale=5.0, size=30)
    tight = HalfSiblingRegressor().fit(X, y, prior=[1.0, 0.0], prior_scale=[1e-3, 1e-3])
    loose = HalfSiblingRegressor().fit(X, y, prior=[1.0, 0.0], prior_scale=[1e3, 1e3])
    assert tight.coef_ == pytest.approx([1.0, 0.0], abs=0.01)  # toward physics, not toward zero
    assert abs(loose.coef_[0] - 2.0) < abs(tight.coef_[0] - 2.0)
    assert hasattr(loose, "coef_") and not hasattr(HalfSiblingRegressor(), "coef_")


def test_hsr_reduces_systematics_on_simulated_constant_stars(sim):
    """A small version of `vigil validate hsr`: the correction removes most injected systematics."""
    from causal import validate as V

    res, alerts = sim
    fits = V._stream(alerts, HSR())
    df = V._rows(res, alerts, fits, classes={"constant"})
    assert V.reduction(df, df["sys_hat"]) > 3.0
    assert V.reduction(df, V.median_offset_baseline(res, df)) < 2.0


def test_no_sibling_shortcut_equals_the_full_computation(sim):
    """Alerts whose exposures hold no sibling rows skip the sibling vector with the same result."""
    _, alerts = sim
    h = HSR()
    target = alerts[0]
    assert not h.store.has_siblings(target.lightcurve.exposure)
    short = h.fit_one(target)
    sib = h.store.sibling_vector(target.lightcurve.exposure, exclude=())
    assert not (sib["n"] > 0).any()
    full = h.regressor.correct(target.lightcurve, sib, target.mjd, target.context.first_det_mjd, target.ra,
                               target.dec, target.survey)
    for k in ("corrected", "corrected_err", "systematic", "train"):
        assert np.array_equal(getattr(short, k), getattr(full, k), equal_nan=True), k
    assert short.diagnostics == full.diagnostics
    h.store.ingest(alerts)
    assert h.store.has_siblings(target.lightcurve.exposure)


def test_eviction_forgets_old_exposures_rows_and_objects():
    """Past the retention window nothing of an earlier stretch is kept: exposures, rows, objects."""
    dec = Decoder(keep_cutouts=False)

    def alerts(seed, start):
        res = simulate(seed, nights=1, quadrants=2, mode="sparse", n_alerts=150, start_jd=start)
        return [dec.decode(e)[0] for e in res.envelopes()]

    early, late = alerts(11, 2460200.5), alerts(12, 2460300.5)
    store = SiblingStore(retention_days=45.0)
    store.ingest(early)
    n_obj = len(store._pos)
    assert n_obj > 0 and store.n_rows > 0
    early_ids = {_obj_hash(a.object_id) for a in early}
    store.ingest(late)
    store.evict()
    assert store.newest_mjd - 45.0 > max(a.mjd for a in early)
    kept = early_ids & (set(store._pos) | set(store._first_det) | set(store._obj_exps) | set(store._last_seen))
    assert not kept - {_obj_hash(a.object_id) for a in late}
    assert all(store.meta[s, 0] >= store.newest_mjd - 45.0 for s in store._slot.values())
    assert sum(len(c) for c in store._cells.values()) == len(store._pos)


def test_each_survey_is_evicted_by_its_own_clock():
    """A stream of the same survey 100 days later evicts the early exposures; another survey's
    alerts do not (they had evicted every exposure of a ZTF replay going on beside them)."""
    import dataclasses

    dec = Decoder(keep_cutouts=False)

    def alerts(seed, start, survey="ztf"):
        res = simulate(seed, nights=1, quadrants=2, mode="sparse", n_alerts=150, start_jd=start)
        return [dataclasses.replace(dec.decode(e)[0], survey=survey) for e in res.envelopes()]

    early = alerts(11, 2460200.5)
    store = SiblingStore(retention_days=45.0)
    store.ingest(early)
    exps, objs = set(store._slot), set(store._pos)
    store.ingest(alerts(12, 2460300.5, survey="rubin"))
    store.evict()
    assert exps <= set(store._slot) and objs <= set(store._pos)  # ZTF's clock has not moved
    assert store._newest["ztf"] < store._newest["rubin"] - 45.0 < store.newest_mjd
    store.ingest(alerts(13, 2460300.5))  # ZTF's own later night
    store.evict()
    assert not exps & set(store._slot) and not objs & set(store._pos)
    assert set(store._exp_survey) == set(store._slot)  # nothing of the evicted exposures kept


def test_a_column_constant_on_training_rows_keeps_its_prior_loading():
    """Seen on a real ZTF alert: the siblings' scale term was the same on every training epoch
    (one visit-level value), its rounding-level spread was standardised into a 10¹⁰ loading,
    and the current detection was 'corrected' to 1.5 × 10⁹ µJy."""
    rng = np.random.default_rng(8)  # weights whose weighted mean of the constant is off by rounding
    X = np.column_stack([rng.normal(size=12), np.full(12, -0.15108003180521806)])
    w = 1.0 / rng.uniform(10.0, 20.0, size=12) ** 2
    y = X[:, 0] + np.random.default_rng(1).normal(scale=30.0, size=12)
    reg = HalfSiblingRegressor().fit(X, y, w, prior=[1.0, 1.0], prior_scale=[3.0, 3.0])
    assert reg.coef_[1] == pytest.approx(1.0, abs=0.05)
    off_sample = np.array([[0.3, -3.2274]])  # the same term on an epoch in the other band
    assert abs(reg.systematic(off_sample)[0]) < 10.0


def test_batched_corrections_equal_one_by_one(sim):
    """HSR corrects a batch together (prior mode on concatenated rows, regressions as a padded
    block); each alert gets what the single-target regressor gives it, up to rounding."""
    _, alerts = sim
    h = HSR()
    h.store.ingest(alerts)
    batch = h.fit_batch(alerts)
    single = h.fit_batch(alerts, max_train=10**9)  # a training cap: the one-by-one path
    modes = {f.diagnostics.mode for f in batch}
    assert {"prior", "full"} <= modes, modes
    for b, s in zip(batch, single, strict=True):
        assert b.diagnostics.mode == s.diagnostics.mode
        assert b.diagnostics.overfit_alarm == s.diagnostics.overfit_alarm
        assert np.array_equal(b.train, s.train)
        np.testing.assert_allclose(b.corrected, s.corrected, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(b.corrected_err, s.corrected_err, rtol=1e-9, atol=1e-9)


def test_targets_of_unlike_history_lengths_are_fitted_apart_with_the_same_result(sim, monkeypatch):
    """Above a padded size, the batched regressions group targets by history length (one long
    history had padded every target to its length: 2.3 GB for 2 in 300); the results do not move."""
    import causal.hsr as hsr_module

    _, alerts = sim
    h = HSR()
    h.store.ingest(alerts)
    together = h.fit_batch(alerts)
    calls = []
    real = hsr_module.HalfSiblingRegressor._fit_many

    def counting(self, ks, *a, **k):
        calls.append(len(ks))
        return real(self, ks, *a, **k)

    monkeypatch.setattr(hsr_module, "_MAX_PADDED_ROWS", 0)
    monkeypatch.setattr(hsr_module, "_PADDING_FACTOR", 1)
    monkeypatch.setattr(hsr_module.HalfSiblingRegressor, "_fit_many", counting)
    apart = h.fit_batch(alerts)
    assert len(calls) > 2  # split into groups of like length
    for a, b in zip(together, apart, strict=True):
        assert a.diagnostics.mode == b.diagnostics.mode
        np.testing.assert_allclose(a.corrected, b.corrected, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(a.corrected_err, b.corrected_err, rtol=1e-9, atol=1e-9)


def test_hsr_runs_on_every_vendored_alert():
    """Real ZTF and Rubin alerts in one batch (Rubin sources carry no reference flux: empty
    per-band groups must not break the batched medians)."""
    from pathlib import Path

    from stream.alert import NONDETECTION, Alert, Envelope

    dec = Decoder(keep_cutouts=False)
    files = sorted((Path(__file__).parent / "data").rglob("*.avro"))
    alerts = [a for f in files for a in dec.decode(Envelope(f.read_bytes(), "t")) if isinstance(a, Alert)]
    assert {"ztf", "rubin"} <= {a.survey for a in alerts}
    rubin = [a for a in alerts if a.survey == "rubin"]
    for batch in (alerts, rubin):  # mixed, and a batch with no reference flux at all
        fluxes, diags = HSR().correct(batch)
        assert len(fluxes) == len(diags) == len(batch)
        for a, f in zip(batch, fluxes, strict=True):
            lc = a.lightcurve
            has = np.isfinite(lc.flux) & (lc.exposure >= 0) & (lc.kind != NONDETECTION)
            assert np.isfinite(f[has]).all()


def _synthetic(oid, ra, mjd, flux, err, kind, exposure, first_det):
    from stream.alert import Alert, Context, LightCurve

    n = len(mjd)

    def full(v, dt=float):
        return np.full(n, v, dtype=dt)

    lc = LightCurve(mjd=np.asarray(mjd, float), band=np.array(["r"] * n), flux=np.asarray(flux, float),
                    flux_err=np.asarray(err, float), kind=np.asarray(kind, np.int8),
                    exposure=np.asarray(exposure, np.int64), field=full(700, np.int64), chip=full(10, np.int64),
                    zp=full(26.0), zp_rms=full(0.02), colour_coeff=full(0.1), limit_mag=full(20.5), seeing=full(2.0),
                    background=full(100.0), ref_flux=full(np.nan), ra=full(np.nan), dec=full(np.nan))
    i = int(np.flatnonzero(lc.kind == 0)[0])
    return Alert(survey="ztf", schema_version="t", alert_id=abs(hash(oid)) % 10**9 + 1, object_id=oid, ra=ra,
                 dec=20.0, mjd=float(lc.mjd[i]), time_scale="utc", band="r", exposure=int(lc.exposure[i]),
                 field=700, chip=10, lightcurve=lc, context=Context(first_det_mjd=first_det, fwhm=2.0))


def test_weightless_siblings_do_not_count_and_bad_errors_do_not_spread():
    """Rows whose weight rounds to zero (errors ~10⁵ µJy or infinite) counted as siblings and made
    the normal matrix singular: LinAlgError for every batch touching those exposures. A NaN error
    on one training row made every corrected error of the light curve NaN."""
    from stream.alert import DETECTION, FORCED

    exps = np.arange(1, 11) + 10**11
    mjd = 60000.0 + np.arange(10)
    alerts = [_synthetic(f"ZTF24sib{j:04d}", 10.0 + j, np.r_[mjd, 60030.0],
                         np.r_[np.random.default_rng(j).normal(0, 5, 10), 500.0],
                         np.r_[np.full(9, 2.0e5), np.inf, 10.0], np.r_[np.full(10, FORCED), DETECTION],
                         np.r_[exps, 10**11 + 100 + j], 60030.0) for j in range(8)]
    h = HSR()
    h.correct(alerts)  # raised LinAlgError
    assert (h.store.sibling_vector(exps, exclude=())["n"] == 0).all()
    # Quiet siblings with ordinary errors, then a target with one NaN error among its training rows.
    sibs = [_synthetic(f"ZTF24q{j:04d}", 30.0 + j, np.r_[mjd, 60030.0], np.r_[np.zeros(10), 300.0],
                       np.r_[np.full(10, 5.0), 10.0], np.r_[np.full(10, FORCED), DETECTION],
                       np.r_[exps, 10**11 + 200 + j], 60030.0) for j in range(8)]
    err = np.r_[np.full(10, 5.0), 10.0]
    err[3] = np.nan
    tgt = _synthetic("ZTF24target", 50.0, np.r_[mjd, 60030.0], np.r_[np.zeros(10), 400.0], err,
                     np.r_[np.full(10, FORCED), DETECTION], np.r_[exps, 10**11 + 300], 60030.0)
    h2 = HSR()
    h2.store.ingest([*sibs, tgt])
    ok = np.isfinite(err)
    # Both paths: the batched one, and the single-target regressor (max_train routes to it).
    for fit in (h2.fit_batch([*sibs, tgt])[-1], h2.fit_batch([tgt], max_train=10**9)[0]):
        assert np.isfinite(fit.corrected_err[ok]).all() and fit.diagnostics.n_train == 9


def test_object_keys_do_not_collide_where_crc32_did():
    assert _obj_hash("ZTF17oftdqir") != _obj_hash("ZTF24lxwftrh")
    assert 0 <= _obj_hash("ZTF17oftdqir") < 2**63


def test_fitted_loadings_do_not_extrapolate_and_each_exposure_trains_once():
    """A loading learnt on a few small sibling offsets multiplied tonight's large one (a loading of
    15 subtracted −1,312 µJy where the truth was −139): beyond the training range only the prior
    loadings (physics) extrapolate."""
    rng = np.random.default_rng(3)
    X = np.column_stack([rng.normal(0, 2, 40), rng.normal(0, 2, 40)])
    y = 15 * X[:, 0] + rng.normal(0, 0.5, 40)
    reg = HalfSiblingRegressor().fit(X, y, np.ones(40), prior=[1.0, 1.0], prior_scale=[100.0, 100.0])
    assert reg.coef_[0] == pytest.approx(15, abs=0.5)
    inside = np.array([[1.0, 0.5]])
    assert reg.systematic(inside)[0] == pytest.approx((inside - reg.x_mean_) @ reg.coef_, rel=1e-12)
    far = np.array([[100.0, 0.0]])
    edge = X[:, 0].max()
    expect = (100.0 - reg.x_mean_[0]) * 1.0 + (edge - reg.x_mean_[0]) * (reg.coef_[0] - 1.0) \
        + (0.0 - reg.x_mean_[1]) * reg.coef_[1]
    assert reg.systematic(far)[0] == pytest.approx(expect, rel=1e-9)
    assert reg.systematic(far)[0] < 200.0  # not 15 × 100


def test_an_exposure_seen_twice_in_a_history_trains_once():
    """A detection repeated in the history and the forced photometry of the same image count once."""
    from stream.alert import DETECTION, FORCED, PREVIOUS

    exps = np.arange(1, 13) + 10**11
    mjd = 60000.0 + np.arange(12)
    sibs = [_synthetic(f"ZTF24q{j:04d}", 30.0 + j, np.r_[mjd, 60030.0], np.r_[np.zeros(12), 300.0],
                       np.r_[np.full(12, 5.0), 10.0], np.r_[np.full(12, FORCED), DETECTION],
                       np.r_[exps, 10**11 + 200 + j], 60030.0) for j in range(8)]
    # A variable star: forced photometry of every image, and six of them also as earlier detections.
    tgt = _synthetic("ZTF24var", 50.0, np.r_[mjd, mjd[:6], 60030.0], np.r_[np.zeros(12), np.full(6, 80.0), 90.0],
                     np.full(19, 5.0), np.r_[np.full(12, FORCED), np.full(6, PREVIOUS), DETECTION],
                     np.r_[exps, exps[:6], 10**11 + 300], 59000.0)
    h = HSR()
    h.store.ingest([*sibs, tgt])
    batch = h.fit_batch([*sibs, tgt])[-1]
    one = h.fit_batch([tgt], max_train=10**9)[0]  # the single-target regressor
    assert batch.diagnostics.n_train == one.diagnostics.n_train == 12
    for fit in (batch, one):
        assert (fit.train[:12]).all() and not fit.train[12:].any()  # the forced rows train


def test_prior_mode_errors_carry_the_sibling_offsets_own_noise():
    """No systematics anywhere; two faint siblings (σ = 100 µJy) per exposure; targets with four quiet
    epochs (σ = 10 µJy) in prior mode. Subtracting the two siblings' noisy offset at full loading
    must show in the corrected error: the pulls of the quiet epochs were 6.6 wide, not 1."""
    from stream.alert import DETECTION, FORCED

    rng = np.random.default_rng(3)
    raw, corrected = [], []
    for trial in range(40):
        mjd = 60000.0 + np.arange(10)
        exps = 10**11 * (trial + 1) + np.arange(10)
        sibs = [_synthetic(f"ZTF24s{trial:03d}{j}", 10.0 + j, np.r_[mjd[:9], 60020.0], rng.normal(0, 100, 10),
                           np.full(10, 100.0), np.r_[np.full(9, FORCED), DETECTION],
                           np.r_[exps[:9], 10**13 + trial * 10 + j], 60020.0) for j in range(2)]
        tgt = _synthetic(f"ZTF24t{trial:03d}", 40.0, mjd[5:], np.r_[rng.normal(0, 10, 4), 500.0], np.full(5, 10.0),
                         np.r_[np.full(4, FORCED), DETECTION], np.r_[exps[5:9], 10**13 + 999], 60009.0)
        h = HSR()
        h.store.ingest([*sibs, tgt])
        batch, one = h.fit_batch([tgt])[0], h.fit_batch([tgt], max_train=10**9)[0]
        assert batch.diagnostics.mode == "prior"
        np.testing.assert_allclose(batch.corrected_err, one.corrected_err, rtol=1e-9)
        raw += list(tgt.lightcurve.flux[:4] / tgt.lightcurve.flux_err[:4])
        corrected += list(batch.corrected[:4] / batch.corrected_err[:4])
    assert 0.8 < np.std(raw) < 1.2
    assert 0.8 < np.std(corrected) < 1.2



def _prior_mode_target(trial, sibs_of, target_flux=None, target_ref=None):
    """A target with four quiet epochs (σ = 10 µJy) and a detection, in prior mode against ``sibs_of``'s
    siblings (called with the ten exposures and their MJDs); returns (target, its fit)."""
    from stream.alert import DETECTION, FORCED

    mjd = 60000.0 + np.arange(10)
    exps = 10**11 * (trial + 1) + np.arange(10)
    sibs = sibs_of(exps, mjd)
    flux = np.r_[np.zeros(4) if target_flux is None else target_flux, 500.0]
    tgt = _synthetic(f"ZTF24t{trial:03d}", 40.0, mjd[5:], flux, np.full(5, 10.0),
                     np.r_[np.full(4, FORCED), DETECTION], np.r_[exps[5:9], 10**13 + 999], 60009.0)
    if target_ref is not None:
        tgt = dataclasses.replace(tgt, lightcurve=dataclasses.replace(tgt.lightcurve, ref_flux=np.full(5, target_ref)))
    h = HSR()
    h.store.ingest([*sibs, tgt])
    fit = h.fit_batch([tgt])[0]
    assert fit.diagnostics.mode == "prior"
    return tgt, fit


def _sibling(name, ra, mjd, flux, err, exps, ref=None):
    from stream.alert import DETECTION, FORCED

    a = _synthetic(name, ra, np.r_[mjd[:9], 60020.0], np.r_[flux[:9], 0.0], np.r_[err[:9], err[0]],
                   np.r_[np.full(9, FORCED), DETECTION], np.r_[exps[:9], 10**13 + hash(name) % 10**9], 60020.0)
    if ref is not None:
        a = dataclasses.replace(a, lightcurve=dataclasses.replace(a.lightcurve, ref_flux=np.full(10, ref)))
    return a


def test_an_exposure_is_corrected_only_as_far_as_its_siblings_outweigh_the_prior():
    """Each exposure's (offset, scale, colour) is a posterior mean under priors scaled by its depth and
    ZP rms. (1) No systematics, two faint siblings of σ = 100 µJy: their noise subtracted at full
    loading moved a σ = 10 µJy target by ~7σ per epoch (a real ZTF history went −87.6 → +3.2 µJy);
    now it stays put. (2) A +30 µJy offset seen by 40 quiet siblings of σ = 5 µJy is still removed
    (≥ 80 %). (3) One bright star (F = 20,000 µJy) 2 % apart between exposures through zero-point
    errors: a faint target (F = 100 µJy) lost the star's whole offset (222 µJy); one sibling gives an
    offset alone, which the prior now takes for noise, so the target keeps its flux (its true share,
    ~1 µJy, is not given either). (4) Eight such stars do give a scale, shared by a bright target."""
    rng = np.random.default_rng(3)
    moved = []
    for trial in range(20):
        tgt, fit = _prior_mode_target(trial, lambda exps, mjd, t=trial: [
            _sibling(f"ZTF24s{t:03d}{j}", 10.0 + j, mjd, rng.normal(0, 100, 10), np.full(10, 100.0), exps)
            for j in range(2)])
        moved += list((fit.corrected[:4] - tgt.lightcurve.flux[:4]) / 10.0)
    assert np.std(moved) < 0.1  # was ~7

    def offset_seen_by_many(exps, mjd):
        return [_sibling(f"ZTF24m{j:03d}", 10.0 + 0.01 * j, mjd, np.r_[np.zeros(5), np.full(5, 30.0)]
                         + rng.normal(0, 5, 10), np.full(10, 5.0), exps) for j in range(40)]

    tgt, fit = _prior_mode_target(100, offset_seen_by_many, target_flux=np.full(4, 30.0))
    # The siblings' nine quiet rows are de-meaned, so what the exposures show is 30 × 5/9 = 16.7 µJy
    # (the target's quiet epochs all fall in them); the prior may take a few per cent of it.
    removed = tgt.lightcurve.flux[:4] - fit.corrected[:4]
    assert np.all((removed > 0.8 * 16.7) & (removed < 18.5)), removed

    def bright_star(exps, mjd):
        return [_sibling("ZTF24bright", 10.0, mjd, np.r_[np.full(5, -200.0), np.full(5, 200.0)],
                         np.full(10, 20.0), exps, ref=2.0e4)]

    tgt, fit = _prior_mode_target(101, bright_star, target_ref=100.0)
    assert np.all(np.abs(fit.corrected[:4] - tgt.lightcurve.flux[:4]) < 10.0), fit.corrected[:4]  # was 222

    # (4) Eight such stars give the scale itself (≥ 6 siblings), which a bright target (F = 5,000 µJy) shares:
    # 1 % of 5,000 × 5/9 after de-meaning, 27.8 µJy; the prior may take a little of it.
    def bright_stars(exps, mjd):
        return [_sibling(f"ZTF24b{j:03d}", 10.0 + 0.01 * j, mjd, np.r_[np.zeros(5), np.full(5, 100.0)]
                         + rng.normal(0, 20, 10), np.full(10, 20.0), exps, ref=1.0e4) for j in range(8)]

    tgt, fit = _prior_mode_target(102, bright_stars, target_flux=np.full(4, 50.0), target_ref=5000.0)
    removed = tgt.lightcurve.flux[:4] - fit.corrected[:4]
    assert np.all((removed > 0.7 * 27.8) & (removed < 1.2 * 27.8)), removed


def test_exposure_priors_take_implausible_metadata_as_missing():
    """A limit of 99 mag (a sentinel) forced an exposure's offset to 0 with no variance, and a zero-point
    rms of 1e-200 or a scale prior of 0 made every fit with six or more siblings NaN."""
    mjd, exps = 60000.0 + np.arange(10), 10**11 + np.arange(10)
    rng = np.random.default_rng(5)

    def alerts(limit, zp_rms):
        out = []
        for j in range(8):
            a = _sibling(f"ZTF24e{j:03d}", 10.0 + 0.01 * j, mjd, 30.0 + rng.normal(0, 5, 10), np.full(10, 5.0), exps,
                         ref=1.0e4)
            out.append(dataclasses.replace(a, lightcurve=dataclasses.replace(
                a.lightcurve, limit_mag=np.full(10, limit), zp_rms=np.full(10, zp_rms))))
        return out

    cases = ((99.0, 0.02, 0.5), (20.5, 1e-200, 0.5), (20.5, 0.02, 0.0), (-99999.0, np.inf, 0.5))
    for limit, zp_rms, scale_prior in cases:
        store = SiblingStore(scale_prior=scale_prior)
        store.ingest(alerts(limit, zp_rms))
        prec = store._prior_precision(store._slots(exps[:9]))  # the siblings' nine quiet exposures
        assert np.isfinite(prec).all() and (prec >= 0).all()
        v = store.sibling_vector(exps[:9], exclude=())
        assert (v["n"] == 8).all()
        for k in ("a", "s", "c"):
            assert np.isfinite(v[k]).all(), (limit, zp_rms, scale_prior, k)
        assert np.isfinite(v["cov"]).all() and (np.diagonal(v["cov"], axis1=1, axis2=2) > 0).any()
        if limit == 99.0:
            assert prec[0, 0] == 0.0  # taken as missing: no prior on the offset



def test_a_fitted_corrections_error_counts_what_the_fit_did_not_see():
    """The excess scatter added to a corrected error is the fit's leave-one-out residual scatter, not its
    training residuals': a fit absorbs part of its own points' scatter, so held-out epochs of quiet
    targets (12 siblings, exposure offsets of 20 µJy, 15 µJy of scatter the siblings do not share,
    σ = 5 µJy, 13 training points: a reduced fit) had pulls 1.17 wide; now 1.06."""
    from stream.alert import DETECTION, FORCED

    rng = np.random.default_rng(7)
    pulls, n = [], 16
    mjd = 60000.0 + np.arange(n)
    for trial in range(150):
        exps = 10**11 * (trial + 1) + np.arange(n)
        off = rng.normal(0, 20, n)
        sibs = [_synthetic(f"ZTF24s{trial:03d}{j:02d}", 10.0 + 0.01 * j, np.r_[mjd, 60040.0],
                           np.r_[off + rng.normal(0, 5, n), 0.0], np.full(n + 1, 5.0),
                           np.r_[np.full(n, FORCED), DETECTION], np.r_[exps, 10**13 + trial * 100 + j], 60040.0)
                for j in range(12)]
        tgt = _synthetic(f"ZTF24t{trial:03d}", 40.0, np.r_[mjd, mjd[-1] + 0.5],
                         np.r_[off + rng.normal(0, 15, n) + rng.normal(0, 5, n), 500.0], np.full(n + 1, 5.0),
                         np.r_[np.full(n, FORCED), DETECTION], np.r_[exps, 10**13 + 99999], 60030.0)
        h = HSR()
        h.store.ingest([*sibs, tgt])
        fit = h.fit_batch([tgt])[0]
        assert fit.diagnostics.mode == "reduced"
        one = h.fit_batch([tgt], max_train=10**9)[0]  # the one-by-one path gives the same errors
        np.testing.assert_allclose(fit.corrected_err, one.corrected_err, rtol=1e-6)
        tr, y, e = fit.train[:n], fit.corrected[:n], fit.corrected_err[:n]
        base = np.sum(y[tr] / e[tr] ** 2) / np.sum(1 / e[tr] ** 2)
        pulls += list(((y - base) / e)[~tr])
    assert 0.9 < np.std(pulls) < 1.12, np.std(pulls)



def test_a_band_with_one_training_row_does_not_inflate_the_errors():
    """A band's one training row is fitted by its own intercept, so its leave-one-out residual is its
    level in that band, not scatter: 12 quiet r rows (σ = 5 µJy) and one i row (σ = 30 µJy) 300 µJy up
    made every corrected error 74 µJy (a review's case) and raised the over-fitting alarm; both paths now
    leave the errors at the photometric ones and the alarm down. The same a hundred times brighter (and
    images 5 mag shallower): a leverage threshold missed that row (0.991, the fixed ridge), so the rows
    are counted per band."""
    from stream.alert import DETECTION, FORCED

    n = 16
    mjd, exps = 60000.0 + np.arange(n), 10**11 + np.arange(n)
    for scale in (1.0, 100.0):
        rng = np.random.default_rng(11)
        off = rng.normal(0, 20, n) * scale
        sibs = [_synthetic(f"ZTF24s{j:02d}", 10.0 + 0.01 * j, np.r_[mjd, 60040.0],
                           np.r_[off + rng.normal(0, scale, n), 0.0], np.full(n + 1, scale),
                           np.r_[np.full(n, FORCED), DETECTION], np.r_[exps, 10**13 + j], 60040.0) for j in range(12)]
        flux = np.r_[off + rng.normal(0, 5, n) * scale, 500.0 * scale]
        flux[6] += 300.0 * scale
        err = np.full(n + 1, 5.0 * scale)
        err[6] = 30.0 * scale
        tgt = _synthetic("ZTF24target", 40.0, np.r_[mjd, mjd[-1] + 0.5], flux, err,
                         np.r_[np.full(n, FORCED), DETECTION], np.r_[exps, 10**13 + 999], 60030.0)
        band = np.array(["r"] * (n + 1))
        band[6] = "i"
        tgt = dataclasses.replace(tgt, lightcurve=dataclasses.replace(tgt.lightcurve, band=band))
        # Everything scales with the images' noise, the offset prior's unit, too (5 mag for ×100).
        sibs, tgt = ([dataclasses.replace(a, lightcurve=dataclasses.replace(
            a.lightcurve, limit_mag=a.lightcurve.limit_mag - 2.5 * np.log10(scale))) for a in group]
            for group in (sibs, [tgt]))
        tgt = tgt[0]
        h = HSR()
        h.store.ingest([*sibs, tgt])
        for fit in (h.fit_batch([tgt])[0], h.fit_batch([tgt], max_train=10**9)[0]):
            assert fit.diagnostics.mode == "reduced" and fit.train[6] and not fit.diagnostics.overfit_alarm
            np.testing.assert_allclose(fit.corrected_err[:n], err[:n], rtol=0.05)


def test_validate_hsr_on_real_alerts_counts_what_it_could_not_read(tmp_path):
    from conftest import DATA

    from causal.validate import run_real

    (tmp_path / "notes.avro").write_bytes(b"not an alert")
    out = run_real([DATA / "ztf_fink" / "2018-12-02_schema3.2", tmp_path])
    assert out["alerts"] == 6 and out["rejected"] == {"bad_magic_byte": 1}
    from causal.validate import _real_report

    text = _real_report(out)  # in words, said to be a report (it had read "noise_added: True" unexplained)
    assert text.startswith("HSR on 6 real alerts (1 exposures), 0 sibling rows stored: a report, no pass/fail")
    assert "rejected by the decoder: {'bad_magic_byte': 1}" in text and "median RMS after / before HSR: none" in text


def test_rows_of_an_unknown_exposure_pass_through_uncorrected():
    """A row HSR cannot correct (exposure −1: a Rubin source without a visit) keeps its measured
    flux, so the features still count it (before, the detections vanished: n_det 16 → 1)."""
    from conftest import avro_files

    from stream.alert import PREVIOUS, Envelope
    from stream.pipeline import Pipeline

    dec = Decoder()
    alerts = [dec.decode(Envelope(f.read_bytes(), str(f)))[0] for f in avro_files("ztf_fink")]
    a = max(alerts, key=lambda x: x.lightcurve.n_detections)
    lc = a.lightcurve
    assert lc.n_detections >= 3
    unknown = dataclasses.replace(a, lightcurve=dataclasses.replace(
        lc, exposure=np.where(lc.kind == PREVIOUS, -1, lc.exposure)))
    feats = {}
    for on, hsr in ((True, None), (False, False)):  # (None: the pipeline's own HSR)
        anns, _ = Pipeline(hsr=hsr).annotate([unknown], [Envelope(b"")])
        feats[on] = anns[0].features
    assert feats[True]["n_det"] == feats[False]["n_det"] == lc.n_detections
    assert feats[True]["days_since_first"] == feats[False]["days_since_first"] > 0


def test_a_store_given_to_hsr_is_used_even_while_empty(sim):
    """``HSR(store=...)`` keeps the store it is given: an empty one (``len`` 0, falsy) had been replaced by a
    default store, so its settings (retention, priors, ...) were silently ignored."""
    store = SiblingStore(offset_prior=0.0, retention_days=10.0)
    h = HSR(store=store)
    assert h.store is store
    h.correct(sim[1][:50])
    assert len(store) > 0

"""Causal adjustment: residualisation on conditions (cross-fitted) and inverse-propensity weighting."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from conftest import SHARED, needs_shared

from causal.adjust import (
    ConditionResidualiser,
    PropensityWeighter,
    effective_sample_size,
    standardised_mean_differences,
)


def _synthetic(n=3000, seed=0):
    """Class c ⊥ seeing z; feature x = class signal + a seeing effect (multiplicative for fwhm)."""
    rng = np.random.default_rng(seed)
    z = rng.lognormal(np.log(2.0), 0.2, n)
    c = rng.random(n) < 0.4
    fwhm = z * np.where(c, 1.15, 1.0) * rng.lognormal(0, 0.05, n)
    snr = 20 - 4 * z + 3 * c + rng.normal(0, 1, n)
    return pd.DataFrame({"seeing": z, "fwhm": fwhm, "snr": snr, "other": rng.normal(size=n)}), c


def test_residualiser_removes_condition_dependence_and_keeps_signal():
    X, c = _synthetic()
    r = ConditionResidualiser((("fwhm", "log"), ("snr", "identity")), (("seeing", "log"),), degree=1)
    R = r.fit_transform(X)
    logz = np.log(X["seeing"])
    assert abs(np.corrcoef(np.log(X["fwhm"]), logz)[0, 1]) > 0.9  # strongly seeing-driven before
    assert abs(np.corrcoef(X["snr"], logz)[0, 1]) > 0.5
    for col in ("fwhm", "snr"):
        assert abs(np.corrcoef(R[col], logz)[0, 1]) < 0.05
        # the class signal survives: residuals separate the classes
        assert R[col][c].mean() - R[col][~c].mean() > 0.1
    assert (R["other"] == X["other"]).all()  # untouched column
    assert (R["seeing"] == X["seeing"]).all()


def test_cross_fitting_is_leave_fold_out():
    X, _ = _synthetic(600, seed=1)
    r = ConditionResidualiser((("fwhm", "log"),), (("seeing", "log"),), n_splits=4, random_state=3)
    R = r.fit_transform(X)
    folds = r.fold_ids_
    assert sorted(np.unique(folds)) == [0, 1, 2, 3]
    for f in range(4):
        held = folds == f
        # each fold's residuals equal those of a fit that never saw that fold ...
        other = ConditionResidualiser((("fwhm", "log"),), (("seeing", "log"),)).fit(X[~held])
        np.testing.assert_allclose(R.loc[held, "fwhm"], other.transform(X[held])["fwhm"], rtol=1e-10)
    # ... and differ from the in-sample (full-data) residuals used at inference
    assert not np.allclose(R["fwhm"], r.transform(X)["fwhm"])
    # applied to the same rows with the condition blanked (as a survey without it sends them), each
    # fold's fit is the same and the blank condition sits at that fit's median
    Xb = X.copy()
    Xb["seeing"] = np.nan
    Rb = r.cross_fitted(X, Xb)
    for f in range(4):
        held = folds == f
        other = ConditionResidualiser((("fwhm", "log"),), (("seeing", "log"),)).fit(X[~held])
        np.testing.assert_allclose(Rb.loc[held, "fwhm"], other.transform(Xb[held])["fwhm"], rtol=1e-10)
    np.testing.assert_array_equal(r.cross_fitted(X)["fwhm"], R["fwhm"])
    # A column of whole numbers (a count) takes its float residuals (pandas refused int64 slots).
    Xi = X.assign(snr=np.round(X["snr"]).astype(np.int64))
    ri = ConditionResidualiser((("snr", "identity"),), (("seeing", "log"),), n_splits=4, random_state=3)
    Ri = ri.fit_transform(Xi)
    assert Ri["snr"].dtype == float and abs(np.corrcoef(Ri["snr"], np.log(X["seeing"]))[0, 1]) < 0.1  # was > 0.5


def test_residualiser_json_round_trip_and_missing_values():
    X, _ = _synthetic(500, seed=2)
    X.loc[:9, "fwhm"] = np.nan
    X.loc[10:19, "seeing"] = np.nan
    r = ConditionResidualiser((("fwhm", "log"), ("snr", "identity")), (("seeing", "log"),)).fit(X)
    r2 = ConditionResidualiser.from_json(r.to_json())
    assert r2.get_params() == r.get_params() and r2.loss == "absolute"  # the loss travels with the model
    a, b = r.transform(X), r2.transform(X)
    np.testing.assert_array_equal(a.to_numpy(), b.to_numpy())
    assert a["fwhm"].iloc[:10].isna().all()  # missing feature stays missing
    assert a["fwhm"].iloc[10:20].notna().all()  # missing condition is imputed


def test_median_residualiser_resists_a_seeing_dependent_share_of_artefacts():
    """Artefacts (long, odd PSF widths) grow with seeing; real sources' widths do not depend on it here."""
    rng = np.random.default_rng(4)
    n = 4000
    z = rng.lognormal(np.log(2.0), 0.2, n)
    artefact = rng.random(n) < 0.4 * (z / 2.0) ** 2 * 0.5  # ~20 % at 2″, ~45 % at 3″
    x = np.where(artefact, rng.lognormal(1.0, 0.3, n), rng.lognormal(0.05, 0.05, n))
    X = pd.DataFrame({"seeing": z, "elong": x})
    slope = {}
    for loss in ("absolute", "squared"):
        r = ConditionResidualiser((("elong", "log"),), (("seeing", "log"),), degree=1, loss=loss).fit(X)
        real = ~artefact
        res = r.transform(X)["elong"].to_numpy()[real]
        slope[loss] = np.polyfit(np.log(z[real]), res, 1)[0]
    # The mean follows the artefacts' share and leaves real sources a spurious seeing trend.
    assert abs(slope["absolute"]) < 0.1 < abs(slope["squared"])
    with pytest.raises(ValueError, match="unknown loss"):
        ConditionResidualiser((("elong", "log"),), (("seeing", "log"),), loss="huber").fit(X)
    # A model saved before the loss was a parameter keeps its least-squares fit.
    d = ConditionResidualiser((("elong", "log"),), (("seeing", "log"),), loss="squared").fit(X).to_json()
    del d["loss"]
    assert ConditionResidualiser.from_json(d).loss == "squared"


def test_median_regression_matches_exact_least_absolute_deviations():
    from sklearn.linear_model import QuantileRegressor

    from causal.adjust import _ridge_median

    rng = np.random.default_rng(5)
    y = rng.standard_t(2, 301)
    assert _ridge_median(np.ones((301, 1)), y, 0.0)[0] == pytest.approx(np.median(y), abs=1e-3)
    P = np.column_stack([np.ones(400), rng.normal(size=400)])
    y = 0.3 + 0.8 * P[:, 1] + np.where(rng.random(400) < 0.3, rng.exponential(3, 400), rng.normal(0, 0.1, 400))
    exact = QuantileRegressor(quantile=0.5, alpha=0.0, fit_intercept=False, solver="highs").fit(P, y).coef_
    np.testing.assert_allclose(_ridge_median(P, y, 1e-6), exact, atol=2e-3)


def test_residualiser_rejects_unknown_transform_and_missing_columns():
    X, _ = _synthetic(50)
    with pytest.raises(ValueError, match="transform"):
        ConditionResidualiser((("fwhm", "sqrt"),), (("seeing", "log"),)).fit(X)
    with pytest.raises(ValueError, match="airmass"):
        ConditionResidualiser((("fwhm", "log"),), (("airmass", "identity"),)).fit(X)


def test_effective_sample_size_hand_example():
    assert effective_sample_size([1, 1, 2]) == pytest.approx(16 / 6)
    assert effective_sample_size(np.ones(10)) == pytest.approx(10)


def test_ipw_balances_a_synthetic_selection():
    rng = np.random.default_rng(4)
    n = 6000
    mag = rng.uniform(16, 21, n)
    seeing = rng.lognormal(np.log(2), 0.2, n)
    e = 1 / (1 + np.exp(-(-1.0 + 0.9 * (18.5 - mag) - 1.2 * (seeing - 2))))
    lab = rng.random(n) < e
    V = pd.DataFrame({"mag": mag, "seeing": seeing})
    pw = PropensityWeighter().fit(V, lab)
    d = pw.diagnostics(V, lab)
    assert abs(d.smd_before["mag"]) > 0.5  # labelled alerts are much brighter
    assert abs(d.smd_after["mag"]) < 0.1 and abs(d.smd_after["seeing"]) < 0.1
    assert 0.2 * d.n_labelled <= d.ess <= d.n_labelled
    ehat = pw.propensity(V)
    assert np.corrcoef(ehat, e)[0, 1] > 0.95
    assert d.n_extrapolated == int((ehat < 0.01).sum()) > 0  # faint alerts outside the labelled support
    smd = standardised_mean_differences(V, lab, pw.weights(V[lab]))
    assert smd == d.smd_after


class _ReadsOneColumn:
    """A stand-in scorer whose two intrinsic scores are a fixed function of one feature."""

    def __init__(self, column, centre=0.0):
        self.column, self.centre = column, centre

    def score(self, X, contributions=False):
        from types import SimpleNamespace

        p = 1 / (1 + np.exp(-np.nan_to_num(X[self.column].to_numpy(float) - self.centre)))
        return SimpleNamespace(p_extragalactic=p, p_fast=p)


def test_do_seeing_by_resimulation_matches_alerts_and_moves_only_seeing_dependent_scores():
    from models.train import intervene_seeing

    kw = {"mode": "transient", "quadrants": 3, "nights": 2}
    do = intervene_seeing(5, seeing=(1.8, 2.8), last_nights=None, **kw)
    lo, hi = (t.truth.iloc[r].reset_index(drop=True) for t, r in zip(do.tables, do.rows, strict=True))
    assert len(lo) > 50
    assert (lo["sim_key"] == hi["sim_key"]).all() and (lo["class"] == hi["class"]).all()
    assert not lo["class"].eq("bogus").any()
    # The PSF width follows seeing (log 2.8/1.8 = 0.44); a catalogue neighbour's score cannot move.
    assert do.shift(_ReadsOneColumn("star_galaxy")) == {"p_extragalactic": 0.0, "p_fast": 0.0}
    assert do.shift(_ReadsOneColumn("fwhm"))["p_fast"] > 0.05
    # The interval brackets the shift; it excludes 0 for a scorer that moves and is 0 for one that cannot.
    d, d_lo, d_hi = do.shift_interval(_ReadsOneColumn("fwhm"))["p_fast"]
    assert 0 < d_lo < d < d_hi
    assert do.shift_interval(_ReadsOneColumn("star_galaxy"))["p_fast"] == (0.0, 0.0, 0.0)
    # On a subpopulation: the mask picks its alerts (the full mask reproduces the whole).
    every = np.ones(len(do.rows[0]), dtype=bool)
    assert do.shift_interval(_ReadsOneColumn("fwhm"), mask=every)["p_fast"] == (d, d_lo, d_hi)
    half = np.arange(len(every)) % 2 == 0
    paired = do._paired(_ReadsOneColumn("fwhm"), ("p_fast",))["p_fast"]
    assert do.shift_interval(_ReadsOneColumn("fwhm"), mask=half)["p_fast"][0] == pytest.approx(paired[half].mean())
    assert np.isnan(do.shift_interval(_ReadsOneColumn("fwhm"), mask=~every)["p_fast"]).all()
    # One model's shifts, per-stage shifts and type shifts read one scoring of each run (each call
    # scored both runs anew: `vigil evaluate` scored every intervention table twice).
    calls = []

    class Counting(_ReadsOneColumn):
        def score(self, X, contributions=False):
            calls.append(len(X))
            out = super().score(X, contributions)
            out.type_proba = None
            return out

    m, other = Counting("fwhm"), Counting("fwhm")
    assert do.shift_interval(m)["p_fast"] == (d, d_lo, d_hi)
    do.shift_interval(other, mask=half)  # validate alternates two scorers stage by stage
    do.shift_interval(m, mask=half)
    assert do.type_shift(m) == {} and do.type_shift(other) == {} and len(calls) == 4
    assert dataclasses.replace(do, rows=do.rows)._scores == {}  # a copy scores afresh
    last = intervene_seeing(5, seeing=(1.8, 2.8), last_nights=1, **kw)
    nights = last.tables[0].truth["night"].iloc[last.rows[0]]
    assert 0 < len(nights) < len(lo) and nights.nunique() == 1


def test_do_moon_by_resimulation_darkens_the_sky_only_where_the_moon_is_up():
    from models.train import MOONLIT_START_JD, intervene_moon

    kw = {"mode": "transient", "quadrants": 3, "nights": 2}
    do = intervene_moon(5, moon=(0.0, 1.0), last_nights=1, start_jd=MOONLIT_START_JD, **kw)
    dark, full = (t.truth.iloc[r].reset_index(drop=True) for t, r in zip(do.tables, do.rows, strict=True))
    assert len(dark) > 30 and do.condition == "moon"
    assert (dark["sim_key"] == full["sim_key"]).all() and not dark["class"].eq("bogus").any()
    assert dark["night"].nunique() == 1  # the last night only
    assert (dark["seeing_arcsec"] == full["seeing_arcsec"]).all()  # seeing is not the Moon's
    # Moonlight costs depth where the Moon is up; a score reading the depth moves, a catalogue one cannot.
    lim = [t.X["limit_mag"].to_numpy()[r] for t, r in zip(do.tables, do.rows, strict=True)]
    assert np.nanmedian(lim[0] - lim[1]) > 0.2
    assert do.shift(_ReadsOneColumn("limit_mag", centre=20.0))["p_fast"] < -0.05
    assert do.shift(_ReadsOneColumn("star_galaxy")) == {"p_extragalactic": 0.0, "p_fast": 0.0}
    # At the default start the alert nights fall at new moon: the Moon is down, nothing to act on.
    new = intervene_moon(5, moon=(0.0, 1.0), last_nights=1, **kw)
    lim = [t.X["limit_mag"].to_numpy()[r] for t, r in zip(new.tables, new.rows, strict=True)]
    assert np.nanmax(np.abs(lim[0] - lim[1])) < 1e-9


def test_within_object_slopes_recover_a_seeing_effect_and_hold_controls_fixed():
    from models.train import within_object_slopes

    rng = np.random.default_rng(3)
    n_obj, per = 150, 3
    obj = np.repeat(np.arange(n_obj), per)
    days = rng.uniform(0, 3, n_obj * per)
    # Seeing drifts with time and is worse in a damaged block, so scores that follow time or
    # the damage but not seeing only stay at zero if those are held fixed.
    damaged = (rng.random(n_obj * per) < 0.3).astype(float)
    seeing = 2.0 + 0.3 * days + 0.4 * damaged + rng.normal(0, 0.3, n_obj * per)
    base = rng.uniform(0, 1, n_obj)[obj]
    scores = {"moved": base + 0.08 * seeing + rng.normal(0, 0.02, len(obj)),
              "evolving": base + 0.1 * days + 0.3 * damaged + rng.normal(0, 0.02, len(obj))}
    fig = within_object_slopes(obj, seeing, scores, {"days": days, "damaged": damaged}, n_boot=300)
    assert fig["objects"] == n_obj and fig["alerts"] == n_obj * per and fig["controls"] == ["days", "damaged"]
    b, lo, hi = fig["slopes"]["moved"]
    assert lo < 0.08 < hi and abs(b - 0.08) < 0.01
    b, lo, hi = fig["slopes"]["evolving"]
    assert abs(b) < 0.02 and max(abs(lo), abs(hi)) < 0.03  # noise 0.02 per alert: SE ≈ 0.006
    # Without the damage held fixed, the evolving score looks seeing-dependent.
    assert within_object_slopes(obj, seeing, scores, {"days": days}, n_boot=50)["slopes"]["evolving"][0] > 0.1
    # A control that never changes within an object drops out instead of making the fit singular.
    const = np.repeat(rng.random(n_obj), per)
    assert within_object_slopes(obj, seeing, scores, {"c": const}, n_boot=50)["controls"] == []
    # No seeing change within any object: NaN, not a reassuring zero.
    flat = within_object_slopes(obj, np.repeat(rng.random(n_obj), per), scores, n_boot=50)
    assert all(np.isnan(v).all() for v in flat["slopes"].values())
    # Objects seen once carry no within-object information.
    one = within_object_slopes(np.arange(10), np.ones(10), {"s": np.zeros(10)})
    assert one["objects"] == 0 and np.isnan(one["slopes"]["s"][0])


class _SeeingModel:
    """A stand-in scorer whose P(extragalactic) follows the seeing by ``slope`` per arcsec."""

    model_version = "test"

    def __init__(self, slope):
        self.slope = slope

    def score(self, X, contributions=False):
        from models.score import ScoreBatch

        p = np.clip(0.4 + self.slope * (X["seeing"].to_numpy(float) - 2.0), 0, 1)
        half = np.full(len(X), 0.5)
        return ScoreBatch(half, p, half, tuple(X.columns), {}, self.model_version)


@needs_shared
def test_validate_causal_real_finds_a_seeing_dependent_scorer_on_real_alerts():
    from models.train import validate_causal_real

    paths = [str(SHARED / "ztf_alerts_fink_broker")]
    checks, fig = validate_causal_real(paths, _SeeingModel(0.1), n_boot=300)
    b, lo, hi = fig["slopes"]["p_extragalactic"]
    assert fig["objects"] >= 80 and abs(b - 0.1) < 1e-6 and not checks[0].passed
    checks, fig = validate_causal_real(paths, _SeeingModel(0.0), n_boot=300)
    assert np.allclose(fig["slopes"]["p_extragalactic"], 0.0, atol=1e-12) and checks[0].passed and checks[1].passed


def test_validate_causal_real_without_repeat_visits_is_inconclusive_not_a_fail(capsys):
    from conftest import DATA

    from stream.cli import main

    # six alerts of six objects: no object is seen twice, so there is no within-object slope
    rc = main(["validate", "causal", "--real", str(DATA / "ztf_fink" / "2018-12-02_schema3.2"), "--alerts-only"])
    assert rc == 2 and "inconclusive" in capsys.readouterr().err


@needs_shared
def test_validate_causal_real_cli_reports_the_shipped_model(capsys):
    from stream.cli import main

    rc = main(["validate", "causal", "--real", str(SHARED / "ztf_alerts_fink_broker"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["figures"]["controls"] == ["days", "cross_match_missing"] and len(out["checks"]) == 2
    assert rc == (0 if all(c["pass"] for c in out["checks"]) else 1)


@needs_shared
def test_real_seeing_slopes_over_alert_histories():
    """science.md §3 on real alerts, with the earlier detections of every alert's history.

    Both the shipped model (ĝ(z) a conditional median fitted on simulated alerts) and the
    same model with ĝ refitted on these alerts (cross-fitted by object) bound both slopes;
    the model with a least-squares ĝ did not (P(fast) +0.022 [+0.011, +0.033] per ″).
    """
    from models.train import validate_causal_real

    paths = [str(SHARED / "ztf_alerts_fink_broker"), str(SHARED / "ztf_alerts_ampel")]
    for refit in (False, True):
        checks, fig = validate_causal_real(paths, n_boot=500, refit_conditions=refit)
        assert fig["history"] and fig["objects"] >= 200 and fig["alerts"] >= 1500
        assert ("cross-fitted by object" in fig["model_version"]) == refit
        assert all(c.passed for c in checks), [c.line() for c in checks]
    # Alerts alone: few objects have an image-level seeing more than once.
    _, alone = validate_causal_real(paths, n_boot=50, history=False)
    assert alone["objects"] < fig["objects"] / 5


def test_cross_fitted_condition_scores_never_fit_on_the_scored_objects():
    from models.score import ScoreBatch
    from models.train import cross_fitted_scores

    rng = np.random.default_rng(0)
    objects = np.repeat([f"ZTF{i:04d}" for i in range(150)], 3)
    X = pd.DataFrame({"v": rng.random(len(objects))})
    fits = []

    class Stub:  # records which rows each ĝ was fitted on, and scores rows by their index
        def __init__(self, fitted=None):
            self.fitted = fitted

        def with_conditions_fitted_on(self, Xf, source=""):
            fits.append(set(Xf.index))
            return Stub(set(Xf.index))

        def score(self, Xs, contributions=False):
            fitted_objects = {objects[i] for i in self.fitted}
            assert not fitted_objects & {objects[i] for i in Xs.index}  # no scored object was fitted on
            idx = Xs.index.to_numpy(float)
            return ScoreBatch(idx, idx, idx, ("v",), {}, "stub")

    out = cross_fitted_scores(Stub(), X, objects)
    assert len(fits) == 2 and not fits[0] & fits[1] and fits[0] | fits[1] == set(range(len(X)))
    assert np.array_equal(out["p_fast"], np.arange(len(X)))  # every row scored, in place
    with pytest.raises(ValueError, match="too few"):
        cross_fitted_scores(Stub(), X.iloc[:60], objects[:60])

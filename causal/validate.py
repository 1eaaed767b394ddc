"""``vigil validate hsr``: injection–recovery evidence for half-sibling regression (science.md §3).

On simulated alerts with known systematics and signals it prints, per check, the figure,
the target and pass/fail:

* systematic-RMS reduction on constant sources, dense and sparse, beside a naive
  per-exposure median-offset baseline measured on the same rows;
* amplitude preservation for transients and variables (slope of corrected on true flux);
* null pulls on constant sources (held-out epochs against the training baseline);
* reduction as the number of training points shrinks (0, 2, 4, 8, 16, 32);
* the power check: an in-sample fit on many raw sibling light curves must *fail* the
  amplitude check (otherwise the amplitude check could not tell).

With ``--real PATH...`` it replays real alerts through the same store and reports sibling
counts per exposure and whether the correction added noise to quiet histories.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from causal.hsr import HSR
from stream.alert import DETECTION, FORCED, PREVIOUS

VARIABLE_CLASSES = ("sn", "slow_sn", "fast", "cv", "periodic", "agn", "flare")


def _stream(alerts, hsr: HSR, batch: int = 500, max_train=None):
    """Feed alerts in stream order (ingest a batch, then correct it), as the service does."""
    fits = []
    for i in range(0, len(alerts), batch):
        b = alerts[i:i + batch]
        hsr.store.ingest(b)
        fits += hsr.fit_batch(b, max_train=max_train)
    return fits


def _decode(res):
    from stream.decode import Decoder

    dec = Decoder(keep_cutouts=False)
    return [dec.decode(e)[0] for e in res.envelopes()]


def _rows(res, alerts, fits, classes=None) -> pd.DataFrame:
    """One row per (alert, light-curve epoch with a flux), joined to the simulator's truth."""
    cls = res.truth.set_index("candid")["class"]
    parts = []
    for a, f in zip(alerts, fits, strict=True):
        c = cls[a.alert_id]
        if classes is not None and c not in classes:
            continue
        lc = a.lightcurve
        m = np.isfinite(f.corrected) & ((lc.kind == FORCED) | (lc.kind == DETECTION) | (lc.kind == PREVIOUS))
        n = int(m.sum())
        parts.append(pd.DataFrame({
            "alert": np.full(n, a.alert_id), "objectId": np.full(n, a.object_id), "cls": np.full(n, c),
            "pid": lc.exposure[m], "band": lc.band[m], "mjd": lc.mjd[m], "kind": lc.kind[m], "flux": lc.flux[m],
            "err": lc.flux_err[m], "corrected": f.corrected[m], "corrected_err": f.corrected_err[m],
            "sys_hat": f.systematic[m], "train": f.train[m],
        }))
    df = pd.concat(parts, ignore_index=True)
    # A detection and a forced measurement of the same epoch: keep the forced one.
    df = df.sort_values("kind", ascending=False).drop_duplicates(["alert", "pid"]).sort_index()
    ph = res.photometry.set_index(["objectId", "pid"])[["true_flux_ujy", "sys_flux_ujy", "meas_flux_ujy"]]
    return df.join(ph, on=["objectId", "pid"], how="inner")


def _centred(x: pd.Series, df: pd.DataFrame) -> pd.Series:
    return x - x.groupby([df["alert"], df["band"]]).transform("mean")


def _rms(x) -> float:
    x = np.asarray(x, dtype=float)
    return float(np.sqrt(np.mean(x**2))) if len(x) else float("nan")


def reduction(df: pd.DataFrame, sys_hat: pd.Series) -> float:
    """RMS of the injected systematic before / after subtracting ``sys_hat`` (per alert and band centred)."""
    return _rms(_centred(df["sys_flux_ujy"], df)) / _rms(_centred(df["sys_flux_ujy"] - sys_hat, df))


def median_offset_baseline(res, df: pd.DataFrame) -> pd.Series:
    """Naive ensemble correction: per exposure, the median de-meaned flux of the other sources."""
    ph = res.photometry
    ph = ph[~ph["detected"].astype(bool)] if "detected" in ph else ph
    dm = ph["meas_flux_ujy"] - ph.groupby(["objectId", "fid"])["meas_flux_ujy"].transform("mean")
    med = dm.groupby(ph["pid"]).median()
    return df["pid"].map(med).fillna(0.0)


def amplitude_ratios(df: pd.DataFrame, col: str = "corrected", min_snr: float = 20.0) -> np.ndarray:
    """Per alert, the weighted slope of ``col`` on the true flux (1 = amplitude preserved).

    Only alerts whose true variability is measured at S/N ≥ ``min_snr`` count, so the
    spread reflects the correction, not photometric noise.
    """
    out = []
    for _, g in df.groupby("alert"):
        q, y, w = g["true_flux_ujy"].to_numpy(), g[col].to_numpy(), 1.0 / g["err"].to_numpy() ** 2
        qc = q - np.sum(w * q) / np.sum(w)
        if np.sum(w * qc**2) < min_snr**2 or len(g) < 5:
            continue
        yc = y - np.sum(w * y) / np.sum(w)
        out.append(np.sum(w * qc * yc) / np.sum(w * qc**2))
    return np.array(out)


def _amp_check(r: np.ndarray) -> tuple[bool, str]:
    if len(r) == 0:
        return False, "no alerts"
    med, lo, hi = np.median(r), np.percentile(r, 16), np.percentile(r, 84)
    ok = abs(med - 1) <= 0.02 and lo >= 0.95 and hi <= 1.05
    return ok, f"median {med:.3f}, 16–84 % [{lo:.3f}, {hi:.3f}] (n={len(r)})"


def null_pulls(df: pd.DataFrame) -> np.ndarray:
    """(corrected − training baseline)/σ on held-out epochs of constant sources.

    σ is the corrected point's error (photometric ⊕ the residual scatter HSR measured on
    the training epochs), so this tests that the reported uncertainties are honest.
    """
    out = []
    for _, g in df.groupby(["alert", "band"]):
        tr = g["train"].to_numpy()
        if tr.sum() < 5 or (~tr).sum() < 1:
            continue
        err = g["corrected_err"].to_numpy()
        w = 1.0 / err**2
        y = g["corrected"].to_numpy()
        base = np.sum(w[tr] * y[tr]) / np.sum(w[tr])
        out.append(((y - base) / err)[~tr])
    return np.concatenate(out) if out else np.array([])


def power_check(res, df_var: pd.DataFrame, n_predictors: int = 60) -> np.ndarray:
    """Amplitude ratios after an in-sample OLS on many raw sibling light curves (no exclusion window)."""
    ph = res.photometry
    const = res.objects.loc[res.objects["class"] == "constant", "objectId"]
    wide = ph[ph["objectId"].isin(const)].pivot_table(index="pid", columns="objectId", values="meas_flux_ujy")
    out = []
    for _, g in df_var.groupby("alert"):
        pids = g["pid"].to_numpy()
        if not np.isin(pids, wide.index).all():
            continue
        X = wide.loc[pids].dropna(axis=1)
        if X.shape[1] < 5:
            continue
        X = X.iloc[:, : min(n_predictors, len(g) - 2)].to_numpy()
        A = np.column_stack([np.ones(len(g)), X])
        y = g["flux"].to_numpy()
        beta = np.linalg.lstsq(A, y, rcond=None)[0]
        gg = g.assign(cpm=y - A[:, 1:] @ beta[1:])
        out.extend(amplitude_ratios(gg, "cpm"))
    return np.array(out)


def run(seed: int = 1, quadrants: int = 2, nights: int = 2) -> list[dict]:
    """All simulated checks; returns a list of {check, figure, target, pass}."""
    from stream.simulate import simulate

    checks = []

    def add(name, figure, target, ok, detail=""):
        checks.append({"check": name, "figure": figure, "target": target, "pass": bool(ok), "detail": detail})

    t0 = time.monotonic()
    res = simulate(seed, nights=nights, quadrants=quadrants, mode="dense")
    alerts = _decode(res)
    fits = _stream(alerts, HSR())
    df = _rows(res, alerts, fits)
    const = df[df["cls"] == "constant"]
    r_dense = reduction(const, const["sys_hat"])
    r_base = reduction(const, median_offset_baseline(res, const))
    add("reduction, dense (constant sources)", round(r_dense, 2), "≥ 3×", r_dense >= 3.0,
        f"median-offset baseline {r_base:.2f}× on the same rows; {len(const)} epochs, "
        f"{const['alert'].nunique()} alerts")
    var = df[df["cls"].isin(VARIABLE_CLASSES)]
    ratios = amplitude_ratios(var)
    ok, text = _amp_check(ratios)
    raw_ok, raw_text = _amp_check(amplitude_ratios(var, "flux"))
    add("amplitude preserved (transients, variables)", text, "median ±2 %, 16–84 % ±5 %", ok,
        f"uncorrected: {raw_text}")
    pulls = null_pulls(const)
    sd = float(np.std(pulls)) if len(pulls) else float("nan")
    add("null pulls on constant sources", round(sd, 3), "std in [0.9, 1.1]", 0.9 <= sd <= 1.1,
        f"{len(pulls)} held-out epochs")
    steps = []
    for n in (0, 2, 4, 8, 16, 32):
        f_n = _stream(alerts, HSR(), max_train=n)
        d_n = _rows(res, alerts, f_n, classes={"constant"})
        steps.append((n, reduction(d_n, d_n["sys_hat"])))
    worst = min(r for _, r in steps)
    add("reduction vs training points 0,2,4,8,16,32", " ".join(f"{r:.2f}" for _, r in steps), "≥ 1.0 each",
        worst >= 1.0)
    pc = power_check(res, var)
    pc_ok, pc_text = _amp_check(pc)
    add("power check: in-sample many-predictor fit", pc_text, "must FAIL the amplitude check", not pc_ok,
        "fails as it must" if not pc_ok else "passed: the amplitude check has no power")
    res_s = simulate(seed + 1, nights=nights, quadrants=max(quadrants * 4, 16), mode="sparse")
    alerts_s = _decode(res_s)
    fits_s = _stream(alerts_s, HSR())
    df_s = _rows(res_s, alerts_s, fits_s, classes={"constant"})
    r_sparse = reduction(df_s, df_s["sys_hat"])
    r_sparse_base = reduction(df_s, median_offset_baseline(res_s, df_s))
    add("reduction, sparse (constant sources)", round(r_sparse, 2), "≥ 1.3×", r_sparse >= 1.3,
        f"median-offset baseline {r_sparse_base:.2f}×; {len(df_s)} epochs")
    # Shown, not judged: the spec's null test is on the dense field, and the sparse one's errors are
    # known to be too small (its alerts' own exposures have few siblings).
    p_s = null_pulls(df_s)
    sd_s = float(np.std(p_s)) if len(p_s) else None
    mad = float(1.4826 * np.median(np.abs(p_s - np.median(p_s)))) if len(p_s) else float("nan")
    checks.append({"check": "null pulls, sparse (information)", "figure": None if sd_s is None else round(sd_s, 3),
                   "target": "information", "pass": True, "info": True,
                   "detail": f"{len(p_s)} held-out epochs; robust width (1.48 × MAD) {mad:.3f}"})
    checks.append({"check": "wall time", "figure": round(time.monotonic() - t0, 1), "target": "s", "pass": True,
                   "info": True, "detail": f"{len(alerts)} dense + {len(alerts_s)} sparse alerts"})
    return checks


def run_real(paths) -> dict:
    """Replay real alerts through the sibling store; report sibling counts and the null behaviour."""
    from stream.decode import Decoder
    from stream.sources import iter_envelopes

    dec = Decoder(keep_cutouts=False)
    decoded = [x for env in iter_envelopes(paths) for x in dec.decode(env)]
    alerts = [x for x in decoded if hasattr(x, "lightcurve")]
    rejected = pd.Series([x.reason for x in decoded if not hasattr(x, "lightcurve")], dtype=object).value_counts()
    hsr = HSR()
    fits = _stream(alerts, hsr)
    per_exp = pd.Series([a.exposure for a in alerts]).value_counts()
    modes = pd.Series([f.diagnostics.mode for f in fits]).value_counts().to_dict()
    ratios, max_pull = [], 0.0
    for a, f in zip(alerts, fits, strict=True):
        d = f.diagnostics
        if d.rms_before and d.rms_after is not None and d.n_train >= 3:
            ratios.append(d.rms_after / d.rms_before)
        ok = np.isfinite(f.corrected) & (a.lightcurve.flux_err > 0)
        if ok.any():
            shift = np.abs(f.corrected[ok] - a.lightcurve.flux[ok]) / a.lightcurve.flux_err[ok]
            max_pull = max(max_pull, float(shift.max()))
    return {
        "alerts": len(alerts), "rejected": {str(k): int(v) for k, v in rejected.items()},
        "exposures": int(len(per_exp)),
        "alerts_per_exposure": {str(k): int(v) for k, v in per_exp.head(10).items()},
        "sibling_rows": hsr.store.n_rows, "modes": modes,
        "median_rms_after_over_before": float(np.median(ratios)) if ratios else None,
        "histories_with_training": len(ratios),
        "noise_added": bool(ratios and np.median(ratios) > 1.0),
        "max_shift_in_sigma": round(max_pull, 3),
    }


def _real_report(out: dict) -> str:
    """:func:`run_real`'s figures in words. A report, not checks: alerts are the sources that varied,
    and the quiet, non-alerting sources science.md's real-data check needs are in no alert."""
    per = ", ".join(f"{k} {v}" for k, v in out["alerts_per_exposure"].items())
    modes = ", ".join(f"{k} {v}" for k, v in out["modes"].items())
    ratio = out["median_rms_after_over_before"]
    lines = [
        f"HSR on {out['alerts']} real alerts ({out['exposures']} exposures), {out['sibling_rows']} sibling rows "
        "stored: a report, no pass/fail (alerts hold no quiet, non-alerting sources to test a correction on)",
        f"  rejected by the decoder: {out['rejected'] or 'none'}",
        f"  alerts per exposure (largest): {per}",
        f"  correction mode per alert: {modes}",
        f"  histories with training epochs: {out['histories_with_training']}; median RMS after / before HSR: "
        + (f"{ratio:.3f} (these sources alerted: their RMS is mostly their variability)" if ratio is not None
           else "none"),
        f"  largest change to a flux: {out['max_shift_in_sigma']:.1f} times its error",
    ]
    return "\n".join(lines)


def cmd_validate_hsr(args) -> int:
    from stream.sinks import print_json

    if args.real:
        out = run_real(args.real)
        if args.json:
            print_json(out, indent=2)
        else:
            print(_real_report(out))
        return 0
    checks = run(args.seed, args.quadrants)
    if args.json:
        print_json(checks, indent=2)
    else:
        print(f"{'check':<46} {'figure':<44} {'target':<28} result")
        for c in checks:
            res = "PASS" if c["pass"] else "FAIL"
            if c.get("info"):  # shown, not judged
                res = ""
            print(f"{c['check']:<46} {str(c['figure']):<44} {c['target']:<28} {res}")
            if c.get("detail"):
                print(f"{'':<46} {c['detail']}")
    return 0 if all(c["pass"] for c in checks) else 1


def register(subparsers) -> None:
    """Add ``vigil validate hsr`` to the ``validate`` command created by :mod:`models.train`."""
    import models.train as mt

    p = mt.VALIDATE_SUBPARSERS.add_parser("hsr", help="injection–recovery checks of half-sibling regression")
    p.add_argument("--json", action="store_true")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quadrants", type=int, default=2, help="dense-mode quadrants to simulate")
    p.add_argument("--real", nargs="+", help="instead: real alerts (files/directories) to check the null behaviour")
    p.set_defaults(func=cmd_validate_hsr)

"""Training, evaluation and causal validation of the scorers, and their CLI commands.

Commands added to ``vigil`` (see :func:`register`):

* ``vigil train --simulate --seed S --out DIR`` — the three alert scores from a simulated
  stream with truth (labels only for the simulator's ``vetted`` subset, inverse-propensity
  weighted; intrinsic scores on condition-residualised features);
* ``vigil train --table CSV --label-column L --positive a,b --negative c,d --out DIR`` —
  one calibrated score from a labelled feature table (e.g. ATLAS vetting data);
* ``vigil score --table CSV --model DIR --out scores.csv``;
* ``vigil evaluate`` — ROC AUC, recall at rank K and its area (AuRaK) against a baseline
  ordering, ECE; grouped cross-validation with a HistGradientBoosting baseline on tables;
  on simulated data also the do(seeing) invariance test and the IPW effective sample size;
* ``vigil validate causal [--json]`` — the science.md §3 checks for the adjusted scorer;
  ``--real PATH...`` instead measures, on real alerts, the within-object slope of each
  score on seeing (no truth needed; the intrinsic scores should not follow the seeing).

Metrics
-------
*Recall at rank K* is the fraction of all positives found in the top K of a list sorted
by decreasing score; *AuRaK* is the area under that curve over K = 1…N divided by the
area of the perfect list (all positives first), so 1 is a perfect ranking and a random
one scores about N / (2N − P + 1). Tied scores count as if their order were random
(expected recall), so a constant column gets no credit for the input order.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

#: Target seeing values (arcsec) of the two interventions contrasted by the invariance test;
#: both lie inside the simulator's seeing distribution (median 2.0″).
DO_SEEING = (1.8, 2.8)
#: do(moon): the Moon's illuminated fraction, a dark sky against a full Moon wherever it is up.
DO_MOON = (0.0, 1.0)
#: A survey start whose six alert nights (after 30 history nights) are around full moon
#: (2023-10-28); the default start's fall at new moon, where do(moon) has nothing to act on.
MOONLIT_START_JD = 2460214.5

TARGETS = {"p_real": "is_real", "p_extragalactic": "is_extragalactic", "p_fast": "is_fast"}


# --------------------------------------------------------------------------- metrics


def recall_at_rank(y, score) -> np.ndarray:
    """Recall at rank K for K = 1…N (expected value over random order within ties).

    Parameters
    ----------
    y : array of {0, 1}
    score : array
        Higher = earlier in the list. NaN scores go last.

    Returns
    -------
    ndarray, shape (N,)
    """
    y = np.asarray(y, float)
    s = np.nan_to_num(np.asarray(score, float), nan=-np.inf)
    n, p = len(y), y.sum()
    if n == 0 or p == 0:
        return np.full(n, np.nan)
    order = np.argsort(-s, kind="stable")
    ys, ss = y[order], s[order]
    # Tie groups: spread each group's positives evenly over its ranks.
    # (Compared, not differenced: −inf − −inf is NaN, which had split the NaN scores into groups of one.)
    starts = np.r_[0, np.flatnonzero(ss[1:] != ss[:-1]) + 1]
    ends = np.r_[starts[1:], n]
    cum = np.empty(n)
    before = 0.0
    for a, b in zip(starts, ends, strict=True):
        k = ys[a:b].sum()
        cum[a:b] = before + k * np.arange(1, b - a + 1) / (b - a)
        before += k
    return cum / p


def aurak(y, score) -> float:
    """Area under the recall-at-rank-K curve relative to the perfect list's (1 = perfect)."""
    y = np.asarray(y, float)
    r = recall_at_rank(y, score)
    if not len(r) or not np.isfinite(r).all():
        return float("nan")
    ideal = recall_at_rank(y, y)
    return float(np.sum(r) / np.sum(ideal))


def list_to_recall(y, score, recall: float = 0.99) -> float:
    """Fraction of the ranked list a vetter must read to find ``recall`` of the positives."""
    r = recall_at_rank(y, score)
    if not len(r) or not np.isfinite(r).all():
        return float("nan")
    return float((np.searchsorted(r, recall - 1e-12) + 1) / len(r))


def ranking_metrics(y, score, probability: bool = True) -> dict:
    """ROC AUC, AuRaK, recall at K = number of positives, the list share to 99 % recall, ECE."""
    r = recall_at_rank(y, score)
    k = int(np.sum(y))
    return {"auc": roc_auc(y, score), "aurak": aurak(y, score),
            "recall_at_k": float(r[k - 1]) if 0 < k <= len(r) and np.isfinite(r[k - 1]) else float("nan"),
            "list_for_99": list_to_recall(y, score),
            "ece": expected_calibration_error(y, score) if probability else float("nan")}


def ranking_lines(metrics: dict) -> list:
    """A table of :func:`ranking_metrics` per ordering."""
    out = [f"{'ordering':<28} {'ROC AUC':>8} {'AuRaK':>8} {'R@K=P':>8} {'list→99%':>9} {'ECE':>8}"]
    for name, m in metrics.items():
        f = [f"{m[c]:{w}.4f}" if np.isfinite(m[c]) else f"{'n/a':>{w}}"
             for c, w in (("auc", 8), ("aurak", 8), ("recall_at_k", 8), ("list_for_99", 9), ("ece", 8))]
        out.append(f"{name:<28} {' '.join(f)}")
    out.append("R@K=P: recall in the first K entries, K the number of positives; list→99%: share of the list read "
               "to find 99 % of them")
    return out


def roc_auc(y, score, sample_weight=None) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y, int)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, np.nan_to_num(np.asarray(score, float), nan=-1e9), sample_weight=sample_weight))


def expected_calibration_error(y, p, n_bins: int = 10, sample_weight=None) -> float:
    """ECE with equal-width probability bins: Σ_b (n_b/N)·|mean(y)_b − mean(p)_b|."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, float)
    ok = np.isfinite(p)  # an unscored alert has no probability to calibrate
    y, p, w = y[ok], p[ok], w[ok]
    if not ok.any():
        return float("nan")
    b = np.clip((p * n_bins).astype(int), 0, n_bins - 1)
    tot = w.sum()
    e = 0.0
    for k in range(n_bins):
        m = b == k
        if m.any() and w[m].sum() > 0:
            e += w[m].sum() / tot * abs(np.average(y[m], weights=w[m]) - np.average(p[m], weights=w[m]))
    return float(e)


def calibration_in_the_large(y, p) -> float:
    """Mean predicted probability minus the observed rate (over the alerts with a probability)."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    ok = np.isfinite(p)
    return float(np.mean(p[ok]) - np.mean(y[ok])) if ok.any() else float("nan")


# --------------------------------------------------------------------------- labelled tables


@dataclass(frozen=True)
class LabelledTable:
    """A feature table reduced to a binary task."""

    X: pd.DataFrame  # numeric feature columns only
    y: np.ndarray  # 1 = positive
    ids: np.ndarray | None  # group ids (object ids, as strings); None without an id column
    frame: pd.DataFrame  # the selected input rows, all columns
    features: tuple


def _split_list(s) -> list:
    return [v.strip() for v in str(s).split(",") if v.strip()] if s else []


def feature_columns(df: pd.DataFrame, exclude=()) -> list:
    """Numeric (or boolean) columns that are not ids, labels or split markers.

    A column of numbers or True/False that pandas read as text because of a blank cell is one
    too; one whose numbers are spoilt by a few other values is refused by name
    (:func:`models.scorer.as_number_column`); a column of text is left out.
    """
    from models.scorer import as_number_column

    out, unnamed = [], []
    for c in df.columns:
        # Split markers by name (ATLAS's ``upstream_split``), not any column with "split" in it.
        if c in exclude or str(c).lower() in SPLIT_COLUMNS:
            continue
        if str(c).startswith("Unnamed: "):  # pandas's name for a blank header: a saved row index, most often
            unnamed.append(c)
            continue
        if pd.api.types.is_bool_dtype(df[c]) or pd.api.types.is_numeric_dtype(df[c]) \
                or as_number_column(df[c]) is not None:
            out.append(c)
    if unnamed:
        # A row index written with the table counts rows in the file's order; in a file sorted by label it
        # is the label (a review: ATLAS day-1 sorted so, ROC AUC 0.943 → 0.988 with it).
        log.warning("column(s) %s have no name in the header (a saved row index?): not used as features",
                    ", ".join(map(str, unnamed)))
    return out


#: Column names taken as train/test split markers, never as features.
SPLIT_COLUMNS = ("split", "upstream_split", "fold")

#: Fewest rows of each class a table model trains or cross-validates on: the calibrator's
#: out-of-fold margins need both classes in every fold.
MIN_CLASS_ROWS = 10


def labelled_table(df: pd.DataFrame, label_column: str, positive, negative, id_column: str | None = None,
                   exclude=(), require_all_labels: bool = True) -> LabelledTable:
    """Select the rows whose label is in ``positive`` or ``negative`` and build X, y, ids.

    Raises ``ValueError`` naming the column or label when a named column is absent, a
    named label matches no row (with ``require_all_labels``; else a warning, as for a
    held-out split that lacks a rare label), a class is empty, or an id is missing.
    """
    from models.scorer import numeric_table

    if {"decision_id", "action", "is_real"} <= set(df.columns):
        # Its decision and score columns (is_real, p_real, ...) would be read as features.
        raise ValueError("this is a `vigil queue export-labels` table: retrain an alert model on it with "
                         "`vigil train --labels PATH --out DIR`")
    if label_column not in df.columns:
        raise ValueError(f"label column {label_column!r} not in the table (columns: {list(df.columns)})")
    if id_column and id_column not in df.columns:
        raise ValueError(f"id column {id_column!r} not in the table (columns: {list(df.columns)})")
    pos, neg = set(_split_list(positive)), set(_split_list(negative))
    if not pos or not neg or pos & neg:
        raise ValueError("need non-empty, disjoint --positive and --negative label lists")
    # Labels as text without surrounding spaces (" good" is "good"); a label that differs from a
    # class only in case is refused rather than silently left out.
    labels = df[label_column].astype("string").str.strip()
    given = (labels.notna() & (labels != "")).to_numpy()
    lab = labels.fillna("").to_numpy(dtype=str)
    seen = {str(v) for v in lab[given]}
    folded = {c.casefold(): c for c in pos | neg}
    near = sorted(v for v in seen - pos - neg if v.casefold() in folded)
    if near:
        counts = ", ".join(f"{v!r} ({int((lab == v).sum())} rows)" for v in near)
        raise ValueError(f"label(s) {counts} of column {label_column!r} differ from "
                         f"{sorted({folded[v.casefold()] for v in near})} only in case: fix the table or name them")
    absent = sorted((pos | neg) - seen)
    if absent:
        if require_all_labels:  # a typo would otherwise train a constant model on one class
            raise ValueError(f"label(s) {absent} match no row of column {label_column!r} "
                             f"(labels present: {sorted(seen)[:20]})")
        log.warning("label(s) %s match no row of column %r", absent, label_column)
    unknown = sorted(seen - pos - neg)
    if unknown:
        log.info("ignoring rows with labels %s", unknown)
    if not given.all():
        log.info("ignoring %d row(s) with a blank label", int((~given).sum()))
    keep = given & np.isin(lab, sorted(pos | neg))
    if not (keep & np.isin(lab, sorted(pos))).any() or not (keep & np.isin(lab, sorted(neg))).any():
        raise ValueError(f"no row of column {label_column!r} is of the positive class or none of the negative")
    # Columns judged on the selected rows with the file's row numbers, so that an error names the file's row.
    feats = feature_columns(df.loc[keep], exclude={label_column, id_column, *exclude})
    sub = df.loc[keep].reset_index(drop=True)
    if not feats:
        raise ValueError("no numeric feature columns in the table")
    if id_column:
        ids = sub[id_column].to_numpy()
        blank = sub[id_column].isna().to_numpy() | (sub[id_column].astype(str).str.strip() == "").to_numpy()
        if blank.any():
            raise ValueError(f"id column {id_column!r} is empty in {int(blank.sum())} selected rows")
        ids = ids.astype(str)  # one type, so that grouping can sort them
    else:
        ids = None
    return LabelledTable(numeric_table(sub[feats]), np.isin(lab[keep], sorted(pos)).astype(int), ids, sub,
                         tuple(feats))


def _groups_for(t: LabelledTable, folds: int):
    """The table's object ids, checked for what grouped folds need."""
    if t.ids is None:
        # Rows of one object share features and label: split by row, they leak between folds
        # (on the ATLAS dev table, AUC 0.9999 against 0.73 grouped).
        raise ValueError("--id-column is required to train or cross-validate on a table: rows of one object "
                         "must stay in one fold")
    n_pos = int(t.y.sum())
    if min(n_pos, len(t.y) - n_pos) < MIN_CLASS_ROWS:
        raise ValueError(f"too few rows of a class to train on: {n_pos} positive, {len(t.y) - n_pos} negative "
                         f"(need {MIN_CLASS_ROWS} of each)")
    n_groups = len(np.unique(t.ids))
    if n_groups < folds:
        raise ValueError(f"{n_groups} distinct ids in the id column: grouped {folds}-fold splits need at least {folds}")
    # Rows of a class in fewer objects than folds leave some training fold without that class.
    for name, cls in (("positive", 1), ("negative", 0)):
        n = len(np.unique(t.ids[t.y == cls]))
        if n < folds:
            raise ValueError(f"the {name} rows belong to {n} distinct ids: grouped {folds}-fold splits need at "
                             f"least {folds}")
    return t.ids


def _table_estimator(random_state: int = 0):
    from models.scorer import XGBBinaryScorer

    # Small data (~10³ rows): shallow trees, strong subsampling, many small steps.
    return XGBBinaryScorer(n_estimators=400, max_depth=4, learning_rate=0.03, subsample=0.8, colsample_bytree=0.7,
                           min_child_weight=2.0, reg_lambda=2.0, calibration="platt", random_state=random_state)


def _version_tag(data_h: str, *estimators) -> str:
    """8 hex digits naming a model: its training data, its estimators' parameters and what they learnt.

    The fitted content (trees, calibrators, condition regressions) is part of the name, so a
    change of code that changes a model also changes its name, with the same data and settings.
    """
    import hashlib

    parts = []
    for e in estimators:
        parts.append(json.dumps(e.get_params(), sort_keys=True, default=str))
        if hasattr(e, "booster_"):
            parts.append(hashlib.sha256(bytes(e.booster_.save_raw("ubj"))).hexdigest())
        if hasattr(e, "calibrator_"):
            parts.append(json.dumps(e.calibrator_.to_json(), sort_keys=True, default=str))
        if hasattr(e, "temperature_"):
            parts.append(repr(float(e.temperature_)))
        if hasattr(e, "coef_") and hasattr(e, "to_json"):
            parts.append(json.dumps(e.to_json(), sort_keys=True, default=str))
    return hashlib.sha256(f"{data_h}:{':'.join(parts)}".encode()).hexdigest()[:8]


def train_table(t: LabelledTable, source: str = "", id_column: str | None = None, random_state: int = 0,
                task: dict | None = None):
    """Fit a :class:`models.scorer.TableScorer` on a labelled table.

    ``task`` (``label_column``, ``positive``, ``negative``) is recorded in the metadata, so
    that evaluating the model against another task can be refused.
    """
    from models.scorer import TableScorer, data_hash

    est = _table_estimator(random_state)
    est.fit(t.X, t.y, groups=_groups_for(t, est.calibration_folds))
    h = data_hash(t.X, t.y)
    meta = {"training_data_hash": h, "training_source": str(source), "n_train": int(len(t.y)),
            "n_positive": int(t.y.sum()), "id_column": id_column, **(task or {}),
            "training_ids": sorted(set(id_digests(t.ids)))}
    return TableScorer(est, f"xgb-table-{_version_tag(h, est)}", meta)


def id_digests(ids) -> list:
    """Short digests of object ids (12 hex digits each), to recognise training objects later.

    Enough to tell whether an evaluation table shares objects with the training one (a
    held-out id passes for a training one with probability n / 2⁴⁸, 4·10⁻⁹ for n = 10⁶
    training objects). Not a secret: survey ids can be enumerated and hashed, so the list of
    training objects can be recovered from a model.
    """
    import hashlib

    return [hashlib.blake2b(str(i).encode(), digest_size=6).hexdigest() for i in ids]


def _hgb(random_state: int = 0):
    from sklearn.ensemble import HistGradientBoostingClassifier

    # No early stopping: its validation split is by row, and rows of one object would sit on both sides
    # (scikit-learn turns it on above 10,000 rows; the ATLAS dev tables are smaller, so their figures
    # are those of this setting). Uncalibrated: the plain baseline the spec names.
    return HistGradientBoostingClassifier(random_state=random_state, early_stopping=False)


@dataclass(frozen=True)
class CVReport:
    """Out-of-fold scores of a grouped cross-validation, and their metrics."""

    n: int
    n_positive: int
    folds: int
    scores: dict  # name → out-of-fold scores (array)
    metrics: dict  # name → {"auc", "aurak", "ece"}

    def lines(self) -> list:
        return [f"grouped {self.folds}-fold CV: {self.n} rows, {self.n_positive} positive",
                *ranking_lines(self.metrics)]


def cross_validate_table(t: LabelledTable, folds: int = 5, baseline: str | None = "hgb",
                         baseline_column: str | None = None, random_state: int = 0) -> CVReport:
    """Grouped K-fold CV (GroupKFold on ids) of Vigil's scorer, optionally beside an HGB baseline.

    Both models see the same folds and columns; ``baseline_column`` (e.g. the survey's
    real/bogus score) is also reported as an ordering of its own.
    """
    from sklearn.model_selection import GroupKFold

    scores = {"vigil (xgboost, calibrated)": np.full(len(t.y), np.nan)}
    if baseline == "hgb":
        scores["baseline: sklearn HGB"] = np.full(len(t.y), np.nan)
    for tr, te in GroupKFold(n_splits=folds).split(t.X, t.y, _groups_for(t, folds)):
        est = _table_estimator(random_state).fit(t.X.iloc[tr], t.y[tr], groups=t.ids[tr])
        scores["vigil (xgboost, calibrated)"][te] = est.predict_proba(t.X.iloc[te])[:, 1]
        if baseline == "hgb":
            # HGB cannot fit a column with no value in the training fold (XGBoost ignores it).
            cols = t.X.columns[t.X.iloc[tr].notna().any().to_numpy()]
            h = _hgb(random_state).fit(t.X.iloc[tr][cols], t.y[tr])
            scores["baseline: sklearn HGB"][te] = h.predict_proba(t.X.iloc[te][cols])[:, 1]
    if baseline_column:
        if baseline_column not in t.frame.columns:
            raise ValueError(f"baseline column {baseline_column!r} not in the table")
        scores[f"survey score: {baseline_column}"] = t.frame[baseline_column].to_numpy(float)
    metrics = {}
    for name, s in scores.items():
        metrics[name] = ranking_metrics(t.y, s, probability=not name.startswith("survey score"))
    return CVReport(len(t.y), int(t.y.sum()), folds, scores, metrics)


# --------------------------------------------------------------------------- simulated streams


@dataclass(frozen=True)
class SimTable:
    """Features of a simulated stream with its truth, aligned row by row.

    ``truth`` has the simulator's truth columns plus ``sim_key``
    (:meth:`stream.simulate.SimResult.alert_keys`), which matches alerts across do(seeing) runs.

    ``selection`` holds the covariates of label selection (observables, including
    later data): what the propensity model conditions on.
    """

    X: pd.DataFrame
    truth: pd.DataFrame
    selection: pd.DataFrame
    seed: int
    config: dict = field(default_factory=dict)


#: Simulation used for training and validation: the transient field mode, a sparse sky
#: (~10 alerts per exposure) whose alerts are those a transient search sees — new sources
#: and their galactic mimics (M-dwarf flares, CV outbursts) beside variable and constant
#: stars, so that every score has its classes in numbers (the dense mode is ~85 % constant
#: stars); six alert nights so that the conditions z span several nights (two nights give
#: ĝ(z) two clusters of seeing to learn from, and do(seeing) then extrapolates).
SIM_DEFAULTS = {"mode": "transient", "fields": 1, "quadrants": 24, "nights": 6}


def pipeline_features(alerts) -> pd.DataFrame:
    """Features of alerts (in stream order) on HSR-corrected light curves, as the service computes them.

    HSR runs in micro-batches of 500 as the pipeline does, so a model sees in training
    and validation what it will see in service.
    """
    from causal.hsr import HSR
    from models.features import alert_features

    hsr, fluxes = HSR(), []
    for i in range(0, len(alerts), 500):
        fluxes += hsr.correct(alerts[i:i + 500])[0]
    return alert_features(alerts, fluxes)


def simulated_table(seed: int, **sim_kwargs) -> SimTable:
    """Simulate a stream, decode it like the pipeline does, and compute features and truth."""
    from stream.alert import Alert, Envelope
    from stream.decode import Decoder
    from stream.simulate import simulate

    kw = dict(SIM_DEFAULTS, **sim_kwargs)
    res = simulate(seed, **kw)
    dec = Decoder(keep_cutouts=False)
    env = Envelope(b"", f"sim:{seed}")
    alerts = [a for a in (dec.to_alert(rec, env) for rec in res.alerts()) if isinstance(a, Alert)]
    X = pipeline_features(alerts)
    truth = res.truth.assign(sim_key=res.alert_keys()).set_index("candid").loc[[a.alert_id for a in alerts]]
    truth = truth.reset_index()
    # Later data: detections of the same object in the next 3 days (known after the fact).
    obj = np.array([a.object_id for a in alerts])
    mjd = np.array([a.mjd for a in alerts])
    n_later = np.zeros(len(alerts))
    for o in np.unique(obj):
        idx = np.flatnonzero(obj == o)
        if len(idx) > 1:
            t = mjd[idx]
            n_later[idx] = [np.sum((t > ti) & (t <= ti + 3.0)) for ti in t]
    flux = np.array([abs(a.flux) for a in alerts])
    with np.errstate(divide="ignore"):
        det_mag = np.where(flux > 0, 23.9 - 2.5 * np.log10(np.where(flux > 0, flux, 1.0)), np.nan)
    catalogued = np.array([(a.context.star_galaxy > 0.8) & (a.context.ps1_distance < 0.5)
                           & (a.context.ps1_mag_r < 18.5) for a in alerts], dtype=float)
    V = pd.DataFrame({"det_mag": det_mag, "seeing": X["seeing"].to_numpy(), "airmass": X["airmass"].to_numpy(),
                      "limit_mag": X["limit_mag"].to_numpy(), "n_later": n_later, "catalogued_star": catalogued})
    return SimTable(X, truth, V, seed, kw)


#: The source type (:data:`models.score.SOURCE_TYPES`) of each simulated class; artefacts have
#: none (the types are of real sources: P(real) speaks for the rest).
SIM_TYPES = {"sn": "supernova", "slow_sn": "supernova", "fast": "fast_transient", "agn": "agn", "cv": "cv",
             "flare": "flare", "pm_star": "pm_star", "periodic": "star", "constant": "star", "sso": "asteroid"}


def _type_estimator(random_state: int = 0):
    from models.scorer import XGBTypeScorer

    # 60 rounds of depth-3 trees per type: on the transient mix (seeds 1 → 2, 24 quadrants) as
    # accurate as 120 (top-1 0.934 against 0.933, ECE 0.008 both) at half the size (~400 kB).
    return XGBTypeScorer(n_estimators=60, max_depth=3, learning_rate=0.15, subsample=0.8, colsample_bytree=0.8,
                         min_child_weight=3.0, reg_lambda=2.0, random_state=random_state)


def source_type_metrics(classes, types, proba) -> dict:
    """Top-1 accuracy, per-type recall and precision, and the ECE of the top type's probability.

    Over the real alerts (those whose simulated ``classes`` have a type, :data:`SIM_TYPES`)
    that have type probabilities; ``types`` name the columns of ``proba``.
    """
    kind = pd.Series(np.asarray(classes)).map(SIM_TYPES).to_numpy()
    proba = np.asarray(proba, float)
    keep = pd.notna(kind) & np.isfinite(proba).all(axis=1)
    names = np.asarray(types, dtype=object)
    true, P = kind[keep].astype(str), proba[keep]
    pred = names[np.argmax(P, axis=1)] if len(P) else np.array([], dtype=object)
    right = pred == true
    per = {}
    for t in names:
        n_true, n_pred = int((true == t).sum()), int((pred == t).sum())
        per[str(t)] = {"n": n_true, "recall": float(right[true == t].mean()) if n_true else float("nan"),
                       "precision": float(right[pred == t].mean()) if n_pred else float("nan")}
    return {"n": int(keep.sum()), "accuracy": float(right.mean()) if len(right) else float("nan"),
            "ece_top": expected_calibration_error(right.astype(int), P.max(axis=1)) if len(P) else float("nan"),
            "per_type": per}


def _sim_estimator(random_state: int = 0):
    from models.scorer import XGBBinaryScorer

    # Sized for the explanations: every alert gets TreeSHAP contributions, whose cost grows
    # with the leaves. On the transient mix, 150 depth-3 trees match 250 depth-4 ones
    # (ROC AUC 0.986 for P(fast) on seed 2, ECE within 0.002) with 40 % of the leaves, and
    # explain in ~90 instead of ~240 µs per alert.
    return XGBBinaryScorer(n_estimators=150, max_depth=3, learning_rate=0.08, subsample=0.8, colsample_bytree=0.8,
                           min_child_weight=5.0, reg_lambda=2.0, calibration="platt", random_state=random_state)


@dataclass(frozen=True)
class TrainReport:
    """Diagnostics of one alert-model training run."""

    n_alerts: int
    n_labelled: int
    ipw: dict
    positives: dict
    n_eyeballed: int = 0
    ipw_real: dict = field(default_factory=dict)


def train_alert_model(sim: SimTable, adjust: bool = True, weight: bool = True, random_state: int = 0,
                      reduced: bool = True):
    """Train the three-score :class:`models.scorer.AlertScorer` on a simulated stream.

    Parameters
    ----------
    sim : SimTable
    adjust : bool
        Residualise the intrinsic scores' inputs on the conditions (False gives the
        *naive* scorer: raw features with the conditions as plain inputs).
    weight : bool
        Inverse-propensity weights for the label selection: P(real) learns from the eyeballed
        alerts (``truth["eyeballed"]``: a vetter's real/bogus call), the intrinsic scores from
        the followed-up ones (``truth["vetted"]``: the class is known), each weighted by its own
        propensity model.
    reduced : bool
        Also train the *reduced* scorers, on the same alerts with every input in
        :data:`models.features.SURVEY_OPTIONAL` blanked: they score alerts of surveys that do not
        send one of those groups (Rubin), which the full scorers never saw without them.

    Returns
    -------
    (AlertScorer, TrainReport)
    """
    from causal.adjust import ConditionResidualiser, LabelSupport, PropensityWeighter
    from models.features import FEATURES, SURVEY_OPTIONAL
    from models.score import SCORES
    from models.scorer import (
        CONDITION_SENSITIVE,
        CONDITION_TRANSFORMS,
        INTRINSIC,
        TYPE_SCORE,
        AlertScorer,
        condition_bank,
        data_hash,
        support_covariates,
    )

    X = sim.X[list(FEATURES)]
    lab = sim.truth["vetted"].to_numpy(bool)
    eye = sim.truth["eyeballed"].to_numpy(bool)
    groups = sim.truth["objectId"].to_numpy()
    # Linear in (log seeing, airmass, depth, moon): the PSF width and S/N scale as powers of
    # seeing, and a straight line extrapolates sanely at the edges of the seeing range.
    res = ConditionResidualiser(CONDITION_SENSITIVE if adjust else (), CONDITION_TRANSFORMS, degree=1,
                                random_state=random_state)
    R = res.fit_transform(X)  # cross-fitted on all alerts, labelled or not
    pw = PropensityWeighter().fit(sim.selection, lab)
    diag = pw.diagnostics(sim.selection, lab)
    pw_real = PropensityWeighter().fit(sim.selection, eye)
    diag_real = pw_real.diagnostics(sim.selection, eye)
    labelled = {s: (eye if s == "p_real" else lab) for s in SCORES}
    weights = {s: ((pw_real if s == "p_real" else pw).weights(sim.selection[labelled[s]]) if weight
                   else np.ones(int(labelled[s].sum()))) for s in SCORES}
    blank = [c for group in SURVEY_OPTIONAL for c in group]
    if reduced and adjust:  # residuals as an alert without those inputs gets them (limit_mag is a condition too)
        Xb = X.copy()
        Xb.loc[:, blank] = np.nan
        Rb = res.cross_fitted(X, Xb)
    scorers, small, positives = {}, {}, {}
    for s in SCORES:
        cols = [c for c in FEATURES if not (adjust and s in INTRINSIC and c in _conditions())]
        D = (R if s in INTRINSIC else X)[cols]
        y = sim.truth[TARGETS[s]].to_numpy(int)
        rows, w = labelled[s], weights[s]
        positives[s] = int(y[rows].sum())
        scorers[s] = _sim_estimator(random_state).fit(D[rows], y[rows], sample_weight=w, groups=groups[rows])
        if reduced and adjust:
            Db = (Rb if s in INTRINSIC else X)[cols][rows].copy()
            Db.loc[:, [c for c in blank if c in cols]] = np.nan
            small[s] = _sim_estimator(random_state).fit(Db, y[rows], sample_weight=w, groups=groups[rows])
    types, type_counts = None, {}
    if adjust and "class" in sim.truth:
        # The source type of the followed-up real alerts (the class is known there), from the
        # intrinsic scores' inputs, with their weights: the contaminants named, not left as noise.
        kind = sim.truth["class"].map(SIM_TYPES)
        rows = lab & kind.notna().to_numpy()
        cols = [c for c in FEATURES if c not in _conditions()]
        y = kind.to_numpy()[rows].astype(str)
        w = pw.weights(sim.selection[rows]) if weight else None
        type_counts = {str(k): int(v) for k, v in zip(*np.unique(y, return_counts=True), strict=True)}
        full = _type_estimator(random_state).fit(R[cols][rows], y, sample_weight=w, groups=groups[rows])
        thin = None
        if reduced:
            Db = Rb[cols][rows].copy()
            Db.loc[:, [c for c in blank if c in cols]] = np.nan
            thin = _type_estimator(random_state).fit(Db, y, sample_weight=w, groups=groups[rows])
        types = (full, thin)
    # Where the labels reach, judged with what is known when an alert is scored (the weights'
    # ê also reads later data): each score's alerts flagged as extrapolated.
    # The types are P(type | real) and learnt from the followed-up real alerts: their support is
    # the followed-up share among real alerts like this one.
    now = support_covariates(X)
    sets = {"followed_up": PropensityWeighter().fit(now, lab), "eyeballed": PropensityWeighter().fit(now, eye)}
    if types:
        real = sim.truth["is_real"].to_numpy(bool)
        sets["followed_up_real"] = PropensityWeighter().fit(now[real], lab[real])
    support = LabelSupport(sets, {s: "eyeballed" if s == "p_real" else "followed_up" for s in SCORES}
                           | ({TYPE_SCORE: "followed_up_real"} if types else {}))
    h = data_hash(X, sim.truth[list(TARGETS.values()) + ["vetted", "eyeballed"]].astype(float))
    # Everything fitted is part of the name: the same trees on other residuals are another model.
    tag = _version_tag(h, res, *(scorers[s] for s in SCORES), *(small[s] for s in small),
                       *(t for t in (types or ()) if t is not None), *support.models.values())
    version = f"xgb-sim{sim.seed}-{tag}" + ("" if adjust else "-naive")
    meta = {"training_data_hash": h, "training_source": f"stream.simulate seed={sim.seed} {sim.config}",
            "n_alerts": len(X), "n_labelled": int(lab.sum()), "n_eyeballed": int(eye.sum()),
            "positives_labelled": positives, "ipw": diag.to_json(), "propensity_model": pw.to_json(),
            "ipw_real": diag_real.to_json(), "propensity_model_real": pw_real.to_json(), "adjusted": adjust,
            "source_types_labelled": type_counts,
            "condition_bank": condition_bank(X, random_state=random_state)}
    model = _NaiveAlertScorer(scorers, res, version, meta) if not adjust else \
        AlertScorer(scorers, res, version, meta, reduced=small or None, types=types, support=support)
    return model, TrainReport(len(X), int(lab.sum()), diag.to_json(), positives, int(eye.sum()), diag_real.to_json())


def _conditions():
    from models.features import CONDITIONS

    return CONDITIONS


class _NaiveAlertScorer:
    """The unadjusted comparison scorer: every score reads the raw features and the conditions.

    Only for validation (it is what giving z to XGBoost "as a plain feature" means; the
    validation trains it without label weights too); it is never saved or shipped.
    """

    def __init__(self, scorers, residualiser, version, metadata):
        self.scorers, self.residualiser, self.model_version, self.metadata = scorers, residualiser, version, metadata

    def score(self, X, contributions: bool = False):
        from models.features import FEATURES
        from models.score import ScoreBatch

        A = X[list(FEATURES)]
        p = {s: e.predict_proba(A)[:, 1] for s, e in self.scorers.items()}
        return ScoreBatch(p["p_real"], p["p_extragalactic"], p["p_fast"], tuple(FEATURES), {}, self.model_version)


# --------------------------------------------------------------------------- vetters' decisions

#: Scores that the eyeball queue's decisions label, and the column of ``vigil queue
#: export-labels`` holding each (1/0, empty where the decision says nothing about it). No
#: vetting action says whether a source is fast, so P(fast) is never retrained from them.
DECISION_TARGETS = {"p_real": "is_real", "p_extragalactic": "is_extragalactic"}


def read_decisions(path) -> pd.DataFrame:
    """A ``vigil queue export-labels`` table (``.parquet`` or ``.csv``), checked for its columns."""
    from models.features import FEATURES

    path = Path(path)
    if path.suffix not in (".parquet", ".csv"):
        raise ValueError(f"--labels must end in .parquet or .csv (as `vigil queue export-labels` writes), "
                         f"not {path.name!r}")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, dtype={"object_id": str})
    missing = [c for c in ("object_id", "decided_ms", "action", *DECISION_TARGETS.values()) if c not in df.columns]
    if not missing and df.empty:  # an export of a store without decisions has no feature columns either
        raise ValueError(f"{path} holds no decisions: nothing to retrain on")
    missing += [c for c in FEATURES if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: not a `vigil queue export-labels` table: it lacks {missing[:6]}"
                         + (f" and {len(missing) - 6} more" if len(missing) > 6 else ""))
    return df


def retrain_on_decisions(base, decisions: pd.DataFrame, source: str = "", random_state: int = 0) -> tuple:
    """Retrain P(real) and P(extragalactic) of an alert model on vetters' decisions.

    Each object counts once per question, with its latest decision and the features of
    the alert the vetter saw then (a vetter may change their mind; the earlier call is
    superseded); an alert the model cannot score (no evidence on the detection) is left
    out. A score is retrained only with at least :data:`MIN_CLASS_ROWS` objects of
    each class; otherwise, and always for P(fast), the base model's scorer is kept. Inputs
    are those of the base model: the raw features for P(real), and for P(extragalactic) the
    features residualised by the base model's ĝ(z) (fitted on the stream, not on these
    labels). The reduced scorers of a retrained score are retrained on the same decisions
    with the survey-optional inputs blanked.

    No inverse-propensity weights: vetters pick alerts from the ranked list, that is mainly
    on the features the scorer sees, and selection on the inputs leaves P(label | inputs)
    unbiased where the vetted alerts reach. It does not where vetters pick on what the
    inputs lack (the cutouts), and the calibration is that of vetted-like alerts.

    Parameters
    ----------
    base : AlertScorer
    decisions : pandas.DataFrame
        From :func:`read_decisions`.
    source : str
        Where the decisions came from (recorded in the metadata).

    Returns
    -------
    (AlertScorer, dict)
        The model (version ``<base>+v<hash>``) and, per labelled score, the counts and the
        ranking metrics of the base scorer and of the retrained one, out of fold (grouped
        by object), on the same decisions.
    """
    from sklearn.model_selection import GroupKFold

    from models.features import FEATURES, SURVEY_OPTIONAL
    from models.scorer import MIN_EVIDENCE, AlertScorer, data_hash

    folds = _sim_estimator().calibration_folds
    blank = [c for g in SURVEY_OPTIONAL for c in g]
    scorers, reduced = dict(base.scorers), dict(base.reduced)
    # Objects whose decisions trained the base model already (a model retrained before): its
    # figures on them are in-sample.
    known = set(base.metadata.get("decisions_fit", {}).get("object_digests", ()))
    report, fitted, hashes, objects = {}, [], [], set()

    def full_decisions(X, y):
        """(rows the full scorer scores, whether they hold enough of each class, positives, negatives)."""
        rows = ~base.lacking_rows(X) if base.reduced else np.ones(len(y), dtype=bool)
        n1 = int(y[rows].sum())
        n0 = int(rows.sum()) - n1
        return rows, min(n0, n1) >= MIN_CLASS_ROWS, n1, n0

    def fit(s, X, y, groups):
        """Full scorer and, where the base has them, reduced scorer, trained as score() will use them.

        The full scorer learns only from the alerts it will score: those with every
        survey-optional input (score() sends the others, Rubin's, to the reduced scorer). Where
        those alerts hold fewer than :data:`MIN_CLASS_ROWS` of either class, the base's full
        scorer is kept (one bogus among 40 taught a constant P(real)).
        """
        D = base.design(X)[s]
        if not base.reduced:
            return _sim_estimator(random_state).fit(D, y, groups=groups), None
        full_rows, enough = full_decisions(X, y)[:2]
        full = (_sim_estimator(random_state).fit(D[full_rows], y[full_rows], groups=groups[full_rows])
                if enough else base.scorers[s])
        Xb = X.copy()  # as score() does for an alert lacking a group: blank, then residualise
        Xb.loc[:, blank] = np.nan
        Db = base.design(Xb)[s].copy()
        Db.loc[:, [c for c in blank if c in Db.columns]] = np.nan
        return full, _sim_estimator(random_state).fit(Db, y, groups=groups)

    for s, col in DECISION_TARGETS.items():
        # The latest call on each object, in the store's commit order (its decision ids) where the
        # table has them: the order in which the queue's own state took the calls.
        order = "decision_id" if "decision_id" in decisions.columns else "decided_ms"
        d = decisions[decisions[col].notna()].sort_values(order, kind="stable")
        d = d.groupby("object_id", sort=False).tail(1)
        # A call on an alert without any evidence on the detection (never scored) teaches nothing.
        d = d[d[list(MIN_EVIDENCE)].apply(pd.to_numeric, errors="coerce").notna().any(axis=1)].reset_index(drop=True)
        y = d[col].astype(int).to_numpy()
        groups = d["object_id"].astype(str).to_numpy()
        n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
        entry = {"objects": len(y), "positive": n_pos, "negative": n_neg}
        report[s] = entry
        if min(n_pos, n_neg) < MIN_CLASS_ROWS:
            entry["retrained"] = False
            entry["why"] = f"{n_pos} positive and {n_neg} negative objects; need {MIN_CLASS_ROWS} of each"
            continue
        X = d[list(FEATURES)].apply(pd.to_numeric, errors="coerce").astype(float)
        before = getattr(base.score(X, contributions=False), s)
        # Out of fold, each row scored as the deployed model would score it: by the reduced
        # scorer where the alert lacks a group of survey-optional inputs (Rubin), else the full one.
        probe = AlertScorer(dict(base.scorers), base.residualiser, "probe", reduced=dict(base.reduced) or None,
                            types=base.types)  # (no label support: these figures do not read it)
        oof = np.full(len(y), np.nan)
        for tr, te in GroupKFold(n_splits=folds).split(X, y, groups):
            probe.scorers[s], r = fit(s, X.iloc[tr], y[tr], groups[tr])
            if r is not None:
                probe.reduced[s] = r
            oof[te] = getattr(probe.score(X.iloc[te], contributions=False), s)
        digests = id_digests(groups)
        entry.update(retrained=True, base=ranking_metrics(y, before), retrained_out_of_fold=ranking_metrics(y, oof),
                     base_in_sample=int(np.isin(digests, sorted(known)).sum()) if known else 0)
        scorers[s], r = fit(s, X, y, groups)
        _, enough, n1, n0 = full_decisions(X, y)
        entry["full_scorer"] = (f"retrained on the {n1} positive and {n0} negative objects with every input" if enough
                                else f"kept from the base: {n1} positive and {n0} negative objects have every input "
                                     f"(need {MIN_CLASS_ROWS} of each)")
        fitted.append(scorers[s])
        if r is not None:
            reduced[s] = r
            fitted.append(r)
        hashes.append(data_hash(X, y))
        objects.update(digests)
    if not fitted:
        raise ValueError("too few decisions to retrain any score: "
                         + "; ".join(f"{s}: {r['why']}" for s, r in report.items()))
    tag = _version_tag(":".join(hashes), *fitted)
    # The base's provenance moves under "base": P(fast) and the kept scorers are still its, the
    # retrained ones are not. Without conditions_fit at the top, a later refit of ĝ(z) names the
    # model after this version rather than after the one before the retraining.
    meta = {"base": {k: v for k, v in base.metadata.items()
                     if k not in ("format", "kind", "scores", "reduced", "condition_bank")},
            "condition_bank": base.metadata.get("condition_bank"),  # the same conditions model
            "decisions_fit": {"source": str(source), "from_version": base.model_version,
                              "data_hash": ":".join(hashes), "object_digests": sorted(objects | known),
                              "scores": {s: {k: v for k, v in r.items() if k in ("objects", "positive", "negative",
                                                                                   "retrained", "why", "full_scorer")}
                                         for s, r in report.items()}}}
    # The retrained scorers learnt from vetters' decisions, not from the labels the base's support
    # describes, and there is no stream here to fit theirs on: they lose the flag — where only the
    # reduced scorer was retrained (too few decisions with every input), only on the alerts it scores.
    support = None
    if base.support is not None:
        redone = [s for s, r in report.items() if r.get("retrained")]
        full = [s for s in redone if not report[s]["full_scorer"].startswith("kept")]
        support = base.support.without(full, reduced=[s for s in redone if s not in full and base.reduced])
    model = AlertScorer(scorers, base.residualiser, f"{base.model_version}+v{tag}", meta, reduced=reduced or None,
                        types=base.types, support=support)  # no vetting action names a source type: the base's kept
    return model, report


# --------------------------------------------------------------------------- do(seeing)


@dataclass(frozen=True)
class Intervention:
    """The same simulated stream observed under do(condition = v) for each v in ``values``.

    Built by re-running the simulator with the seeing (or the Moon's illuminated fraction) of
    every exposure, or of those of the last alert nights, set (see
    :func:`stream.simulate.simulate`): the same objects with the same noise realisations, and
    everything the condition causes — depth, noise, detections and so the light-curve
    histories, systematics, artefacts, PSF width and survey scores — follows the generative
    model. Each run goes through the pipeline's own decode → HSR → features.
    ``rows[k]`` picks, in run *k*, the real alerts (same object, same exposure) detected
    in every run, in one common order: the fixed population whose mean score must not move.
    """

    values: tuple
    tables: tuple
    rows: tuple
    condition: str = "seeing"
    # Each model's scores of the first and last runs (keyed by identity; the model is kept, so its id
    # cannot be reused): the shifts, per-stage shifts and type shifts read the same two score batches
    # (each call scored both tables anew). Not an init field, so dataclasses.replace starts afresh.
    _scores: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def _scored(self, model) -> list:
        """The common alerts scored by ``model`` in the first and in the last run."""
        hit = self._scores.get(id(model))
        if hit is not None and hit[0] is model:
            return hit[1]
        out = [model.score(t.X.iloc[r].reset_index(drop=True), contributions=False)
               for t, r in zip((self.tables[0], self.tables[-1]), (self.rows[0], self.rows[-1]), strict=True)]
        self._scores[id(model)] = (model, out)
        return out

    def _paired(self, model, scores) -> dict:
        """Per common alert, score in the last run minus in the first."""
        out = self._scored(model)
        return {s: np.asarray(getattr(out[1], s), float) - np.asarray(getattr(out[0], s), float) for s in scores}

    def type_shift(self, model) -> dict:
        """Per source type, mean P(type | real) in the last run minus in the first (common alerts
        typed in both); empty when the model names no types."""
        out = self._scored(model)
        if out[0].type_proba is None:
            return {}
        ok = np.isfinite(out[0].type_proba).all(axis=1) & np.isfinite(out[1].type_proba).all(axis=1)
        d = (out[1].type_proba[ok] - out[0].type_proba[ok]).mean(axis=0)
        return {str(t): float(v) for t, v in zip(out[0].types, d, strict=True)}

    def shift(self, model, scores=("p_extragalactic", "p_fast")) -> dict:
        """Mean score in the last run minus in the first, over the common alerts."""
        return {s: float(np.mean(d)) for s, d in self._paired(model, scores).items()}

    def shift_interval(self, model, scores=("p_extragalactic", "p_fast"), n_boot: int = 1000,
                       seed: int = 0, mask=None) -> dict:
        """Mean shift with a 95 % interval, bootstrapping objects (an object's alerts move together).

        Returns ``{score: (shift, low, high)}``. The interval is what tells whether a scorer
        measurably moves under the intervention, whatever the size of the move. ``mask``
        (over the common alerts) restricts it to a subpopulation, e.g. one light-curve stage.
        """
        d = self._paired(model, scores)
        obj = self.tables[0].truth["objectId"].to_numpy()[self.rows[0]]
        if mask is not None:
            d = {s: x[mask] for s, x in d.items()}
            obj = obj[mask]
        if not len(obj):
            return {s: (float("nan"),) * 3 for s in d}
        codes, inv = np.unique(obj, return_inverse=True)
        n_obj = len(codes)
        counts = np.bincount(inv, minlength=n_obj).astype(float)
        # Resample objects with replacement: the mean over the drawn objects' alerts.
        draws = np.random.default_rng(seed).multinomial(n_obj, np.full(n_obj, 1.0 / n_obj), size=n_boot)
        out = {}
        for s, x in d.items():
            sums = np.bincount(inv, weights=x, minlength=n_obj)
            boot = (draws @ sums) / (draws @ counts)
            lo, hi = np.percentile(boot, [2.5, 97.5])
            out[s] = (float(np.mean(x)), float(lo), float(hi))
        return out


def intervene_seeing(seed: int, seeing=DO_SEEING, last_nights: int | None = 1, **sim_kwargs) -> Intervention:
    """Simulate stream ``seed`` under do(seeing = s) for each ``s`` and match the alerts.

    ``last_nights``: the intervention acts on the last this many alert nights and the
    population is the alerts of those nights (None: every night of the survey, histories
    included, and every alert).
    """
    tables = tuple(simulated_table(seed, seeing=float(s), seeing_nights=last_nights, **sim_kwargs) for s in seeing)
    # The intervened exposures are those at the set seeing (all of them without last_nights).
    return _matched(tables, tables[0].truth["seeing_arcsec"].to_numpy() == float(seeing[0]), tuple(seeing), "seeing")


def intervene_moon(seed: int, moon=DO_MOON, last_nights: int | None = 1, **sim_kwargs) -> Intervention:
    """Simulate stream ``seed`` under do(the Moon's illuminated fraction = v) for each ``v`` and match the alerts.

    As :func:`intervene_seeing`; the intervention matters only where the Moon is up, so give a
    ``start_jd`` whose alert nights are moonlit (:data:`MOONLIT_START_JD`).
    """
    from stream.simulate import SimConfig

    tables = tuple(simulated_table(seed, moon=float(v), seeing_nights=last_nights, **sim_kwargs) for v in moon)
    # The nights the simulator intervened on (as it counts them, whether or not each has alerts).
    cfg = tables[0].config
    first = 0 if last_nights is None else cfg.get("history_days", SimConfig.history_days) + cfg["nights"] - last_nights
    return _matched(tables, tables[0].truth["night"].to_numpy() >= first, tuple(moon), "moon")


def _matched(tables, intervened, values, condition) -> Intervention:
    """The real alerts of the intervened exposures of run 0 that every run detected, in one order."""
    keys = [t.truth["sim_key"].to_numpy() for t in tables]
    keep = ~tables[0].truth["class"].eq("bogus").to_numpy() & intervened
    common = set(keys[0][keep])
    for k in keys[1:]:
        common &= set(k)
    order = np.array(sorted(common))
    rows = tuple(pd.Series(np.arange(len(k)), index=k).loc[order].to_numpy() for k in keys)
    return Intervention(values, tables, rows, condition)


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class Check:
    """One line of ``vigil validate``: a figure, its target and whether it passed."""

    name: str
    value: float
    target: str
    passed: bool
    detail: str = ""

    def line(self) -> str:
        out = f"{'PASS' if self.passed else 'FAIL'}  {self.name:<52} {self.value:9.4f}   target {self.target}"
        return out + (f"   ({self.detail})" if self.detail else "")


def validate_causal(train_seed: int = 1, test_seed: int = 2, **sim_kwargs) -> tuple:
    """science.md §3 checks of the adjusted scorer on simulated streams (train on one seed, test on another).

    do(seeing) on the test stream, and do(moon) on the same seed observed from a start whose
    alert nights are moonlit (:data:`MOONLIT_START_JD`; the training stream's are at new moon).

    Returns
    -------
    (list of Check, list of dict)
        The checks, and the do(seeing) shifts per light-curve stage (information beside the
        checks, whose targets are for the whole population): one dict per intervention,
        stage, scorer and score with the shift, its 95 % interval and the number of alerts.
    """
    from models.rank import STAGES, stage_of

    train = simulated_table(train_seed, **sim_kwargs)
    test = simulated_table(test_seed, **sim_kwargs)
    adj, rep = train_alert_model(train, adjust=True)
    # Naive = no adjustment at all: raw features and conditions, no label weights.
    naive, _ = train_alert_model(train, adjust=False, weight=False)
    checks, by_stage = [], []
    sa, sn = adj.score(test.X, contributions=False), naive.score(test.X, contributions=False)
    lo, hi = DO_SEEING
    # Tonight's conditions (the spec's check), then the survey's: every exposure, histories too.
    for nights, what in ((1, "last night"), (None, "every night")):
        do = intervene_seeing(test_seed, last_nights=nights, **sim_kwargs)
        d_adj, d_naive = do.shift_interval(adj), do.shift_interval(naive)
        for s in ("p_extragalactic", "p_fast"):
            (a, a_lo, a_hi), (n, n_lo, n_hi) = d_adj[s], d_naive[s]
            checks.append(Check(f"{s}: adjusted |Δ mean| do(seeing {lo}→{hi}″), {what}", abs(a), "≤ 0.03",
                                abs(a) <= 0.03, f"Δ {a:+.4f}, 95 % [{a_lo:+.4f}, {a_hi:+.4f}]"))
            checks.append(Check(f"{s}: naive |Δ mean|, {what} (power of the test)", abs(n), "≥ 0.05",
                                abs(n) >= 0.05, f"Δ {n:+.4f}, 95 % [{n_lo:+.4f}, {n_hi:+.4f}]"))
        # Stage as the vetter sees it in the unintervened run (young alerts carry the least evidence).
        stage = stage_of(do.tables[0].X["days_since_first"].to_numpy()[do.rows[0]])
        for st in STAGES:
            m = stage == st
            for who, model in (("adjusted", adj), ("naive", naive)):
                for s, (v, v_lo, v_hi) in do.shift_interval(model, mask=m).items():
                    by_stage.append({"intervention": what, "stage": st, "scorer": who, "score": s, "shift": v,
                                     "low": v_lo, "high": v_hi, "n": int(m.sum())})
    # do(moon) where the Moon is up: the training stream's alert nights fall at new moon, so the
    # scorers never saw moonlight; it reaches them through the depth and the artefacts it costs.
    m_lo, m_hi = DO_MOON
    for nights, what in ((1, "last night"), (None, "every night")):
        do = intervene_moon(test_seed, last_nights=nights, **dict(sim_kwargs, start_jd=MOONLIT_START_JD))
        d_adj, d_naive = do.shift_interval(adj), do.shift_interval(naive)
        for s in ("p_extragalactic", "p_fast"):
            (a, a_lo, a_hi), n = d_adj[s], d_naive[s][0]
            checks.append(Check(f"{s}: adjusted |Δ mean| do(moon {m_lo:g}→{m_hi:g}), {what}", abs(a), "≤ 0.03",
                                abs(a) <= 0.03, f"Δ {a:+.4f}, 95 % [{a_lo:+.4f}, {a_hi:+.4f}]; naive {n:+.4f}"))
        if nights is None:  # the whole stream under a full Moon
            full = do.tables[-1]
            e = expected_calibration_error(full.truth["is_real"].to_numpy(int),
                                           adj.score(full.X, contributions=False).p_real)
            checks.append(Check("p_real: ECE under a full Moon (every night)", e, "≤ 0.05", e <= 0.05))
    for s in ("p_real", "p_extragalactic", "p_fast"):
        y, p = test.truth[TARGETS[s]].to_numpy(int), getattr(sa, s)
        e = expected_calibration_error(y, p)
        citl = calibration_in_the_large(y, p)
        checks.append(Check(f"{s}: ECE, whole test stream", e, "≤ 0.05", e <= 0.05))
        checks.append(Check(f"{s}: calibration-in-the-large |mean p − rate|", abs(citl), "≤ 0.05", abs(citl) <= 0.05))
    # P(real) is not invariant but must be calibrated within strata of conditions.
    see = test.X["seeing"].to_numpy(float)
    edges = np.nanquantile(see, [1 / 3, 2 / 3])
    strata = np.digitize(np.nan_to_num(see, nan=float(np.nanmedian(see))), edges)
    worst = max(expected_calibration_error(test.truth["is_real"].to_numpy(int)[strata == k], sa.p_real[strata == k])
                for k in range(3))
    checks.append(Check("p_real: worst ECE within seeing terciles", worst, "≤ 0.05", worst <= 0.05))
    for s in ("p_extragalactic", "p_fast"):
        y = test.truth[TARGETS[s]].to_numpy(int)
        cost = roc_auc(y, getattr(sn, s)) - roc_auc(y, getattr(sa, s))
        checks.append(Check(f"{s}: AUC cost of adjustment (naive − adjusted)", cost, "≤ 0.01", cost <= 0.01))
    frac = rep.ipw["ess_fraction"]
    # Balance is reported beside the ESS (science.md §2 asks for both; the target is on the ESS).
    before, after = rep.ipw["smd_before"], rep.ipw["smd_after"]
    worst = max(after, key=lambda k: abs(after[k])) if after else None
    balance = (f"max |SMD| after weighting {abs(after[worst]):.2f} ({worst}; before {abs(before[worst]):.2f}, "
               f"worst before {max(abs(v) for v in before.values()):.2f})") if worst else ""
    checks.append(Check(f"IPW effective sample size / labelled (n={rep.n_labelled})", frac, "≥ 0.20", frac >= 0.20,
                        balance))
    frac = rep.ipw_real["ess_fraction"]
    checks.append(Check(f"IPW effective sample size / eyeballed, P(real)'s labels (n={rep.n_eyeballed})", frac,
                        "≥ 0.20", frac >= 0.20))
    return checks, by_stage


def within_object_slopes(objects, seeing, scores: dict, controls: dict | None = None, n_boot: int = 2000,
                         seed: int = 0) -> dict:
    """Within-object regression of each score on seeing, other within-object changes held fixed.

    Per object, score, seeing and each control (e.g. time, whether the alert's context is
    complete) are centred on the object's means; one least-squares fit of score on
    (seeing, controls) over all objects gives the slope per arcsec. A control that never
    varies within an object drops out. A 95 % interval comes from resampling objects with
    replacement. Objects need two or more alerts with finite values; a fit whose design
    is singular (no seeing change left) is NaN, not zero.

    Returns
    -------
    dict
        ``{"objects", "alerts", "seeing_range_median", "controls", "slopes": {score: (slope, lo, hi)}}``
        (``controls``: those that varied within objects and were held fixed).
    """
    controls = dict(controls or {})
    obj = pd.Series(np.asarray(objects)).astype(str).to_numpy()
    z = np.column_stack([np.asarray(seeing, float)] + [np.asarray(v, float) for v in controls.values()])
    names = list(scores)
    P = np.column_stack([np.asarray(scores[k], float) for k in names])
    ok = np.isfinite(z).all(axis=1) & np.isfinite(P).all(axis=1)
    obj, z, P = obj[ok], z[ok], P[ok]
    _, inv, counts = np.unique(obj, return_inverse=True, return_counts=True)
    multi = counts[inv] >= 2
    z, P = z[multi], P[multi]
    _, codes = np.unique(inv[multi], return_inverse=True)
    n_obj = int(codes.max()) + 1 if len(codes) else 0
    empty = {"objects": n_obj, "alerts": int(len(z)), "seeing_range_median": float("nan"), "controls": [],
             "slopes": {k: (float("nan"),) * 3 for k in names}}
    if n_obj < 3:
        return empty
    size = np.bincount(codes, minlength=n_obj)[:, None]

    def centred(a):
        m = np.stack([np.bincount(codes, a[:, j], n_obj) for j in range(a.shape[1])], 1) / size
        return a - m[codes]

    zc, pc = centred(z), centred(P)
    # (centring leaves rounding residue in a constant column: compare with the column's scale)
    varies = np.abs(zc).max(axis=0) > 1e-9 * np.abs(z).max(axis=0)
    if not varies[0]:  # no seeing change within any object
        return empty
    varies[0] = True
    zc = zc[:, varies]
    k = zc.shape[1]
    # Per-object cross-products, so a bootstrap replicate is a weighted sum of them.
    Szz = np.zeros((n_obj, k, k))
    Szp = np.zeros((n_obj, k, P.shape[1]))
    np.add.at(Szz, codes, zc[:, :, None] * zc[:, None, :])
    np.add.at(Szp, codes, zc[:, :, None] * pc[:, None, :])

    full = np.diag(Szz.sum(axis=0))

    def fit(w):
        A, b = np.tensordot(w, Szz, 1), np.tensordot(w, Szp, 1)
        d = np.sqrt(np.diag(A))
        # Singular (e.g. a resample of objects whose seeing never changed): NaN, not lstsq's zero.
        if (d**2 <= 1e-9 * full * w.sum() / n_obj).any() or np.linalg.cond(A / np.outer(d, d)) > 1e10:
            return np.full(P.shape[1], np.nan)
        return np.linalg.solve(A, b)[0]  # the seeing row

    est = fit(np.ones(n_obj))
    rng = np.random.default_rng(seed)
    boot = np.array([fit(np.bincount(rng.integers(0, n_obj, n_obj), minlength=n_obj).astype(float))
                     for _ in range(n_boot)])
    with np.errstate(invalid="ignore"):
        lo, hi = np.nanpercentile(boot, [2.5, 97.5], axis=0) if np.isfinite(boot).any() else (est * np.nan,) * 2
    span = pd.Series(z[:, 0]).groupby(codes).agg(lambda v: v.max() - v.min())
    return {"objects": n_obj, "alerts": int(len(z)), "seeing_range_median": float(span.median()),
            "controls": [c for c, v in zip(controls, varies[1:], strict=True) if v],
            "slopes": {k_: (float(est[i]), float(lo[i]), float(hi[i])) for i, k_ in enumerate(names)}}


def real_alerts(paths, history: bool = False) -> list:
    """The alerts in ``paths``, each (object, alert id) once, in time order.

    Parameters
    ----------
    paths : list of str
        Files, directories or archives (:func:`stream.sources.iter_envelopes`).
    history : bool
        Each ZTF alert also as it stood at its earlier detections
        (:meth:`stream.decode.Decoder.decode_history`). A detection that is an alert in the
        sample is kept as that alert, not as a re-creation from a later one.

    Returns
    -------
    list of stream.alert.Alert
    """
    from stream.alert import Alert
    from stream.decode import Decoder
    from stream.sources import iter_envelopes

    dec = Decoder(keep_cutouts=False)
    own, earlier, rejected = {}, {}, {}
    for env in iter_envelopes(paths):
        for epochs in (dec.decode_history(env) if history else [[x] for x in dec.decode(env)]):
            *before, last = epochs
            if isinstance(last, Alert):
                own.setdefault((last.object_id, last.alert_id), last)
            else:
                rejected[last.reason] = rejected.get(last.reason, 0) + 1
            for x in before:
                if isinstance(x, Alert):
                    earlier.setdefault((x.object_id, x.alert_id), x)
    if rejected:  # not silently: the figures rest on the alerts that were read
        log.warning("%d input(s) rejected and not used (%s)", sum(rejected.values()),
                    ", ".join(f"{k}={v}" for k, v in sorted(rejected.items())))
    alerts = list(own.values()) + [a for k, a in earlier.items() if k not in own]
    alerts.sort(key=lambda a: a.mjd)
    return alerts


def cross_fitted_scores(model, X: pd.DataFrame, groups) -> dict:
    """Scores with the condition regressions ĝ(z) refitted on the data, cross-fitted by group.

    The groups (objects) are split in two halves by a hash of their name; each half is
    scored by ``model.with_conditions_fitted_on`` the other half, so no row's residual
    comes from a fit that saw its group.

    Parameters
    ----------
    model : AlertScorer
    X : pandas.DataFrame
        Feature rows.
    groups : sequence of str
        Per row, its group (object id).

    Returns
    -------
    dict
        ``{score name: array}`` aligned with ``X``.
    """
    from models.scorer import MIN_CONDITION_ROWS

    half = np.array([zlib.crc32(str(g).encode()) % 2 for g in groups])
    out = {s: np.full(len(X), np.nan) for s in TARGETS}
    for h in (0, 1):
        if min((half == h).sum(), (half != h).sum()) < MIN_CONDITION_ROWS:
            raise ValueError(f"a half of the objects has fewer than {MIN_CONDITION_ROWS} alerts: too few to fit "
                             "and test ĝ(z) on separate objects")
        part = model.with_conditions_fitted_on(X[half != h], source="the other half of the objects")
        sb = part.score(X[half == h], contributions=False)
        for s in TARGETS:
            out[s][half == h] = getattr(sb, s)
    return out


#: science.md §3 on real data: score slopes against within-object seeing changes should be
#: ~0 for the intrinsic classes. The bound is the simulated invariance target over the
#: 1″ span of do(seeing 1.8″ → 2.8″); the check passes only when the whole 95 % interval
#: lies within it, so a sample too small to bound the slope does not pass.
REAL_SLOPE_TARGET = 0.03


def validate_causal_real(paths, model=None, n_boot: int = 2000, history: bool = True,
                         refit_conditions: bool = False) -> tuple:
    """Real alerts: within-object slopes of the scores on seeing (science.md §3, real data).

    With ``history`` (the default), each ZTF alert is also re-created as it stood at every
    earlier detection in its history (:func:`stream.decode.ztf_history_records`), so an
    object contributes the exposures of its last 30 days, not only the alerts in the
    sample; each (object, detection) is used once, and every epoch scores with the
    history's ``rb`` (the alert's own ``drb`` has no history counterpart). The seeing is
    image-level only (:func:`models.features.image_level_seeing`: forced photometry, or
    the other detections of the same exposure); epochs with nothing but their own PSF
    width are left out, since a seeing measured on the target is noisy and would bias the
    slopes towards zero.

    With ``refit_conditions``, the model's condition regressions ĝ(z) are refitted on these
    real alerts (:meth:`models.scorer.AlertScorer.with_conditions_fitted_on`), cross-fitted
    by object: the objects are split in two halves by a hash of their name, and each half is
    scored with a ĝ fitted on the other, so no epoch's residual comes from a fit that saw
    its object.

    Held fixed within each object: time, and whether the alert's cross-match context is
    complete (a damaged run that loses it can coincide with other seeing, and changes the
    scores through the missing evidence, not through seeing).

    Parameters
    ----------
    paths : list of str
        Real alerts: files, directories, archives.
    model : AlertScorer, optional
        Default: the shipped model.
    n_boot : int
        Bootstrap resamples of objects for the intervals.
    history : bool
        Add each ZTF alert's re-created earlier detections.
    refit_conditions : bool
        Score with ĝ(z) refitted on these alerts, cross-fitted by object halves.

    Returns
    -------
    (list of Check, dict)
        The checks (intrinsic scores; the figure is the larger end of the 95 % interval in
        absolute value) and the figures behind them, P(real) included (it is not required
        to be invariant: bad seeing really makes bogus detections).
    """
    from models.features import image_level_seeing
    from models.scorer import default_scorer

    model = model or default_scorer()
    alerts = real_alerts(paths, history)
    X = pipeline_features(alerts)
    if refit_conditions:
        scores = cross_fitted_scores(model, X, [a.object_id for a in alerts])
        version = f"{model.model_version} with ĝ refitted on these alerts (cross-fitted by object)"
    else:
        sb = model.score(X, contributions=False)
        scores, version = {s: getattr(sb, s) for s in TARGETS}, model.model_version
    controls = {"days": [a.mjd for a in alerts],
                "cross_match_missing": (X["ps1_distance"].isna() & X["gaia_distance"].isna()).astype(float)}
    seeing = image_level_seeing(alerts)
    fig = within_object_slopes([a.object_id for a in alerts], seeing, scores, controls, n_boot=n_boot)
    fig.update(model_version=version, alerts_read=len(alerts), history=history,
               image_level_seeing=int(np.isfinite(seeing).sum()))
    if not all(np.isfinite(fig["slopes"][s]).all() for s in ("p_extragalactic", "p_fast")):
        # Not a failure of the scorers: the data cannot say (a FAIL line with "nan" read as one).
        raise ValueError(f"inconclusive: {fig['objects']} object(s) with an image-level seeing at two or more "
                         f"epochs of {len(alerts)} alerts read, and no seeing change within an object left to fit; "
                         "give more alerts (a night's archive" + ("" if history else ", or omit --alerts-only to "
                                                                  "add their histories") + ")")
    checks = []
    for s in ("p_extragalactic", "p_fast"):
        b, lo, hi = fig["slopes"][s]
        worst = max(abs(lo), abs(hi))
        checks.append(Check(f"{s}: within-object slope on seeing {b:+.3f}/″, |95 % interval|", worst,
                            f"≤ {REAL_SLOPE_TARGET}", bool(worst <= REAL_SLOPE_TARGET)))
    return checks, fig


# --------------------------------------------------------------------------- real alerts, weak labels

#: SIMBAD main types (as a broker's cross-match names them, e.g. Fink's ``cdsxmatch``) of
#: sources outside the Galaxy.
SIMBAD_EXTRAGALACTIC = frozenset({
    "QSO", "QSO_Candidate", "AGN", "AGN_Candidate", "Seyfert", "Seyfert_1", "Seyfert_2", "LINER", "Blazar",
    "Blazar_Candidate", "BLLac", "BLLac_Candidate", "RadioG", "Galaxy", "GinPair", "GinCl", "GinGroup", "PartofG",
    "EmG", "StarburstG", "HII_G", "LSB_G", "BClG", "BrightestCG", "ClG", "GroupG", "Compact_Gr_G", "IG", "PairG",
    "LensedImage", "LensedQ", "LensingEv", "SN", "SN_Candidate"})
#: Types that do not say which side of the Galaxy's edge a source is on: detections in one band,
#: unknowns, failed cross-matches. Every other type is a kind of star or Galactic nebula.
SIMBAD_UNINFORMATIVE = frozenset({
    "Unknown", "Fail", "", "IR", "NIR", "MIR", "FIR", "UV", "Blue", "Radio", "Radio(cm)", "Radio(mm)",
    "Radio(sub-mm)", "X", "gamma", "EmObj", "Candidate_Lens", "multiple_object", "Inexistent", "Transient",
    "Candidate_SN*", "Planet?", "Planet"})
#: TNS classifications of Galactic transients (every other classified TNS object is extragalactic).
TNS_GALACTIC = frozenset({"CV", "Nova", "M dwarf", "Varstar", "Galactic Nuclear", "LBV", "ILRT", "Other",
                          "Impostor-SN", "YSO"})


def xmatch_label(simbad, tns) -> int | None:
    """1 extragalactic, 0 Galactic, None unknown, from a SIMBAD main type and a TNS class.

    A TNS classification (spectroscopic) wins over the SIMBAD type of the position.
    """
    tns = (tns or "").strip()
    if tns:
        return 0 if tns in TNS_GALACTIC else 1
    simbad = (simbad or "").strip()
    if simbad in SIMBAD_UNINFORMATIVE:
        return None
    return 1 if simbad in SIMBAD_EXTRAGALACTIC else 0


def xmatch_labelled_alerts(paths) -> tuple:
    """Real ZTF alerts stored as rows of Parquet files, labelled by the broker's cross-match.

    Each row is a ZTF alert (``candidate``, ``prv_candidates``, ...) plus the broker's
    annotations: Fink's ``cdsxmatch`` (SIMBAD main type at the position) and, where present,
    ``tns`` (TNS classification). Rows whose label is unknown are left out; an alert in
    several files counts once.

    Returns
    -------
    (list of Alert, numpy.ndarray of {0, 1}, list of str)
        The alerts in time order, the extragalactic label and the type it came from.
    """
    import pyarrow.parquet as pq

    from stream.alert import Alert, Envelope
    from stream.decode import Decoder

    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.rglob("*.parquet"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such file or directory: {p}")
    dec = Decoder(keep_cutouts=False)
    out, seen, rejected = [], set(), {}
    for f in dict.fromkeys(files):
        try:
            cols = pq.read_schema(f).names
        except Exception as e:  # noqa: BLE001 - pyarrow's errors name neither the file nor the format wanted
            raise ValueError(f"{f}: not a Parquet table of alerts ({e})") from None
        if "cdsxmatch" not in cols:
            raise ValueError(f"{f}: no cdsxmatch column (a broker's SIMBAD cross-match) to label the alerts with")
        for rec in pq.read_table(f).to_pylist():
            if rec.get("candid") in seen:
                continue
            seen.add(rec.get("candid"))
            y = xmatch_label(rec.get("cdsxmatch"), rec.get("tns"))
            if y is None:
                continue
            a = dec.to_alert(rec, Envelope(b"", f"{f}!{rec.get('candid')}"))
            if isinstance(a, Alert):
                out.append((a, y, (rec.get("tns") or "").strip() or rec.get("cdsxmatch")))
            else:
                rejected[a.reason] = rejected.get(a.reason, 0) + 1
    if rejected:
        log.warning("%d alert(s) rejected and not used (%s)", sum(rejected.values()),
                    ", ".join(f"{k}={v}" for k, v in sorted(rejected.items())))
    if not out:
        raise ValueError(f"no alert with an informative cross-match label in {[str(p) for p in paths]}")
    out.sort(key=lambda t: t[0].mjd)
    return [t[0] for t in out], np.array([t[1] for t in out]), [t[2] for t in out]


def evaluate_xmatch(paths, model=None, n_boot: int = 2000) -> dict:
    """P(extragalactic) of an alert model against a broker's SIMBAD/TNS cross-match labels.

    Weak labels (a SIMBAD type is the catalogued source at the position, not a vetted
    class), but independent of the simulation the model learnt from. The ROC AUC's 95 %
    interval resamples objects.
    """
    from models.scorer import default_scorer

    model = model or default_scorer()
    alerts, y, kinds = xmatch_labelled_alerts(paths)
    sb = model.score(pipeline_features(alerts), contributions=False)
    p = np.asarray(sb.p_extragalactic, float)
    ok = np.isfinite(p)
    obj = np.array([a.object_id for a in alerts])[ok]
    y, p = y[ok], p[ok]
    codes, inv = np.unique(obj, return_inverse=True)
    rng = np.random.default_rng(0)
    boots = []
    members = [np.flatnonzero(inv == k) for k in range(len(codes))]
    for _ in range(n_boot):
        idx = np.concatenate([members[k] for k in rng.integers(0, len(codes), len(codes))])
        if 0 < y[idx].sum() < len(idx):
            boots.append(roc_auc(y[idx], p[idx]))
    unsure = (p > 0.1) & (p < 0.9)
    return {"model_version": model.model_version, "alerts": int(len(y)), "unscored": int((~ok).sum()),
            "objects": {"extragalactic": len(set(obj[y == 1])), "galactic": len(set(obj[y == 0]))},
            "alerts_by_class": {"extragalactic": int(y.sum()), "galactic": int(len(y) - y.sum())},
            "p_extragalactic": ranking_metrics(y, p),
            "auc_interval": [float(v) for v in np.percentile(boots, [2.5, 97.5])] if boots else [None, None],
            "unsure_fraction": {"extragalactic": float(unsure[y == 1].mean()),
                                "galactic": float(unsure[y == 0].mean())},
            "mean_p_real": float(np.nanmean(np.asarray(sb.p_real, float)[ok])),
            "types": dict(sorted({k: kinds.count(k) for k in set(kinds)}.items()))}


# --------------------------------------------------------------------------- CLI


def _write_json(obj) -> None:
    from stream.sinks import print_json

    print_json(obj)


def _check_model_out(out, kind: str) -> None:
    """Refuse an ``--out`` that cannot take a model of ``kind``: a file, or a directory holding a
    model of another kind (its booster files would stay beside the new metadata)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file, not a model directory")
    meta = out / "metadata.json"
    if meta.is_file():
        try:
            theirs = json.loads(meta.read_text(encoding="utf-8")).get("kind")
        except (ValueError, AttributeError):
            theirs = "unreadable"
        if theirs != kind:
            raise ValueError(f"--out {out} holds a model of kind {theirs!r}; a {kind} model goes in a directory "
                             "of its own")


def cmd_train(args) -> int:
    if sum(map(bool, (args.simulate, args.table, args.refit_conditions, args.labels))) != 1:
        raise ValueError("give exactly one of --simulate, --table, --refit-conditions or --labels")
    if args.model and not (args.refit_conditions or args.labels):
        raise ValueError("--model goes with --refit-conditions or --labels")
    _check_model_out(args.out, "table" if args.table else "alert")  # before the training, not after
    if args.refit_conditions or args.labels:  # a derived model never replaces the one it is derived from
        from models.scorer import DEFAULT_MODEL_DIR

        base = Path(args.model or DEFAULT_MODEL_DIR).resolve()
        if Path(args.out).resolve() == base:
            which = "--model" if args.model else "the shipped default"
            raise ValueError(f"--out {args.out}: the model it is derived from ({which}); write it to another "
                             "directory")
    if args.labels:
        from models.scorer import DEFAULT_MODEL_DIR, AlertScorer

        base = AlertScorer.load(args.model or DEFAULT_MODEL_DIR)
        model, report = retrain_on_decisions(base, read_decisions(args.labels), source=args.labels,
                                             random_state=args.seed)
        model.save(args.out)
        print(f"{base.model_version} → {model.model_version}: retrained on the vetters' decisions in {args.labels}")
        for s, r in report.items():
            head = f"{s}: {r['objects']} objects ({r['positive']} positive, {r['negative']} negative)"
            if not r["retrained"]:
                print(f"{head}: kept from {base.model_version} ({r['why']})")
                continue
            print(f"{head}: retrained; both scorers on these decisions:"
                  + (f" ({r['base_in_sample']} of these objects trained {base.model_version} already: its figures "
                     "are partly in-sample)" if r["base_in_sample"] else ""))
            print("\n".join("  " + line for line in ranking_lines(
                {f"{base.model_version}": r["base"], "retrained, out of fold": r["retrained_out_of_fold"]})))
            if base.reduced:
                print(f"  full scorer (alerts with every survey-optional input): {r['full_scorer']}")
        print("p_fast: kept (no vetting action labels it)")
        print(f"saved to {args.out}")
        return 0
    if args.refit_conditions:
        from models.scorer import DEFAULT_MODEL_DIR, AlertScorer

        base = AlertScorer.load(args.model or DEFAULT_MODEL_DIR)
        alerts = real_alerts(args.refit_conditions)
        model = base.with_conditions_fitted_on(pipeline_features(alerts), source=" ".join(args.refit_conditions))
        model.save(args.out)
        print(f"{base.model_version} → {model.model_version}: condition regressions refitted on {len(alerts)} alerts")
        print(f"saved to {args.out}")
        return 0
    if args.table:
        args.label_column = args.label_column or "label"
        df = read_table(args.table, args.id_column, label_column=args.label_column)
        t = labelled_table(df, args.label_column, args.positive, args.negative, args.id_column,
                           exclude=_dropped(args, df))
        model = train_table(t, source=args.table, id_column=args.id_column, random_state=args.seed,
                            task=_table_task(args))
        model.save(args.out)
        print(f"trained {model.model_version} on {len(t.y)} rows ({int(t.y.sum())} positive), "
              f"{len(t.features)} features: {', '.join(t.features)}")
        print(f"saved to {args.out}")
        return 0
    sim = simulated_table(args.seed, **_sim_kwargs(args))
    model, rep = train_alert_model(sim)
    model.save(args.out)
    print(f"trained {model.model_version} on {rep.n_alerts} simulated alerts, {rep.n_labelled} labelled "
          f"(followed up: the class known), {rep.n_eyeballed} eyeballed (real/bogus known); positives: {rep.positives}")
    for what, d in (("labelled", rep.ipw), ("eyeballed", rep.ipw_real)):
        print(f"IPW: ESS {d['ess']:.1f} = {d['ess_fraction']:.1%} of {what}; "
              f"{d['n_extrapolated']} alerts with ê < 0.01; max weight {d['max_weight']:.2f}")
    if model.support is not None:  # the flag scoring will raise, on the training stream itself
        from models.scorer import support_covariates

        e = model.support.propensity(support_covariates(sim.X))
        flagged = {s: int((v < model.support.threshold).sum()) for s, v in e.items()}
        print(f"label support at alert time (no later data): ê < {model.support.threshold:g} "
              f"(scores flagged as extrapolated) for {flagged} of the {len(sim.X)} alerts")
    print(f"saved to {args.out}")
    return 0


def read_table(path, *id_columns, label_column: str | None = None) -> pd.DataFrame:
    """A feature table from CSV, the id column(s) and the label column read as text.

    As text, an id stays what the file says: read as a number, one blank id would turn
    the column into floats and round 18-digit ids (ATLAS's) to the nearest 256; an id
    written ``NA`` or ``null`` stays that, not a missing value. Labels as text match ``1``
    and ``0`` whether or not some are blank (read as numbers they would become 1.0 and 0.0).
    """
    ids = [c for c in id_columns if c]
    text = {c: str for c in [*ids, label_column] if c}
    try:
        # A header that names a column twice: pandas renames the second "x.1" without a word, and a
        # scorer would then read the first "x" (a review: a column of zeros before the real one).
        with open(path, newline="", encoding="utf-8-sig") as fh:
            named = [h for h in next(csv.reader(fh), []) if h != ""]
        twice = sorted({h for h in named if named.count(h) > 1})
        if twice:
            raise ValueError(f"{path}: the header names column(s) {twice} more than once")
        df = pd.read_csv(path, dtype=text or None)
        present = [c for c in ids if c in df.columns]
        if present:
            raw = pd.read_csv(path, usecols=present, dtype=str, keep_default_na=False)
            for c in present:
                df[c] = raw[c].to_numpy()
        return df
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: not a CSV table ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def _table_task(args) -> dict:
    """The binary task of a table command, as recorded in a table model's metadata."""
    return {"task": {"label_column": args.label_column, "positive": sorted(_split_list(args.positive)),
                     "negative": sorted(_split_list(args.negative))}}


def cmd_score(args) -> int:
    from models.scorer import TableScorer

    if Path(args.out).resolve() == Path(args.table).resolve():
        raise ValueError(f"--out {args.out} is the input table: choose another file")
    if not str(args.out).lower().endswith(".csv"):  # it is written as CSV whatever its name says
        raise ValueError(f"--out {args.out}: name it *.csv (the format written)")
    model = TableScorer.load(args.model)
    idc = args.id_column or model.metadata.get("id_column")
    df = read_table(args.table, idc)
    p = model.predict(df)
    if idc and idc not in df.columns:
        how = "--id-column" if args.id_column else f"the model's id column (trained with --id-column {idc})"
        raise ValueError(f"{how} {idc!r} is not in {args.table} (columns: {list(df.columns)})")
    out = pd.DataFrame({idc: df[idc]} if idc else {"row": np.arange(len(df))})
    out["score"] = p
    out.to_csv(args.out, index=False)
    print(f"scored {len(out)} rows with {model.model_version} → {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    # One kind of evaluation a run: the others' inputs had been ignored without a word.
    modes = [flag for flag, given in (("--simulate", args.simulate), ("--table", args.table),
                                      ("--xmatch-labels", args.xmatch_labels)) if given]
    if len(modes) > 1:
        raise ValueError(f"give one of --simulate, --table or --xmatch-labels, not {' and '.join(modes)}")
    if args.simulate:
        return _evaluate_sim(args)
    if args.xmatch_labels:
        return _evaluate_xmatch(args)
    if not args.table:
        raise ValueError("give --table CSV, --simulate or --xmatch-labels PATH")
    from models.scorer import TableScorer, data_hash, numeric_table

    model = TableScorer.load(args.model) if args.model else None
    task = model.metadata.get("task") if model is not None else None
    if task:  # what is not given is what the model was trained for
        args.label_column = args.label_column or task["label_column"]
        args.positive = args.positive or ",".join(task["positive"])
        args.negative = args.negative or ",".join(task["negative"])
    args.label_column = args.label_column or "label"
    df = read_table(args.table, args.id_column, model.metadata.get("id_column") if model else None,
                    label_column=args.label_column)
    if args.model and args.drop:
        raise ValueError("--drop is for training: a trained model reads the features it was trained on")
    t = labelled_table(df, args.label_column, args.positive, args.negative, args.id_column,
                       exclude=_dropped(args, df),
                       require_all_labels=not args.model)  # a held-out split may lack a rare label
    bcol = args.baseline_column or next((c for c in ("rb_pix", "real_bogus", "drb", "rb") if c in df.columns), None)
    if model is not None:
        theirs, ours = model.metadata.get("task"), _table_task(args)["task"]
        # The classes must be the model's; the column may be named otherwise in this table.
        if theirs is not None and (not set(ours["positive"]) <= set(theirs["positive"])
                                   or not set(ours["negative"]) <= set(theirs["negative"])):
            raise ValueError(f"{args.model} was trained for {theirs}, not for {ours}")
        cols = list(model.features)
        seen = _rows_in_training(model, t)
        if set(cols) <= set(t.frame.columns) and \
                model.metadata.get("training_data_hash") == data_hash(numeric_table(t.frame[cols]), t.y):
            print("note: this is the model's own training table: the figures are in-sample", file=sys.stderr)
        elif seen:
            print(f"note: {seen} of {len(t.y)} rows are of objects the model was trained on: those figures are "
                  "in-sample (evaluate on held-out objects)", file=sys.stderr)
        metrics = {"vigil": ranking_metrics(t.y, model.predict(t.frame))}
        if bcol:
            metrics[f"survey score: {bcol}"] = ranking_metrics(t.y, t.frame[bcol].to_numpy(float), probability=False)
        if args.json:
            _write_json({"model": model.model_version, "n": len(t.y), "n_positive": int(t.y.sum()),
                         "rows_of_training_objects": seen, "metrics": metrics})
        else:
            print(f"{model.model_version} on {len(t.y)} rows ({int(t.y.sum())} positive)")
            print("\n".join(ranking_lines(metrics)))
        return 0
    if args.cv < 2:
        raise ValueError(f"--cv {args.cv}: grouped cross-validation needs at least 2 folds")
    rep = cross_validate_table(t, folds=args.cv, baseline=args.baseline, baseline_column=bcol)
    if args.json:
        _write_json({"n": rep.n, "n_positive": rep.n_positive, "folds": rep.folds, "metrics": rep.metrics})
    else:
        print("\n".join(rep.lines()))
    return 0


def _rows_in_training(model, t: LabelledTable) -> int | None:
    """Rows of ``t`` whose object the table model was trained on (None: cannot tell)."""
    known, col = model.metadata.get("training_ids"), model.metadata.get("id_column")
    if known is None or not col or col not in t.frame.columns:
        return None
    return int(np.isin(id_digests(t.frame[col].to_numpy().astype(str)), known).sum())


def _evaluate_xmatch(args) -> int:
    from models.scorer import AlertScorer

    r = evaluate_xmatch(args.xmatch_labels, AlertScorer.load(args.model) if args.model else None)
    if args.json:
        _write_json(r)
        return 0
    o, a = r["objects"], r["alerts_by_class"]
    print(f"{r['model_version']} on {r['alerts']} real alerts labelled by their SIMBAD/TNS cross-match: "
          f"{a['extragalactic']} extragalactic ({o['extragalactic']} objects), {a['galactic']} galactic "
          f"({o['galactic']} objects)" + (f"; {r['unscored']} unscored, left out" if r["unscored"] else ""))
    lo, hi = r["auc_interval"]
    print("\n".join(ranking_lines({"P(extragalactic)": r["p_extragalactic"]})[:2]))
    if lo is not None:
        print(f"ROC AUC 95 % interval, resampling objects: [{lo:.3f}, {hi:.3f}]")
    u = r["unsure_fraction"]
    print(f"unsure (0.1 < p < 0.9): {u['extragalactic']:.1%} of extragalactic, {u['galactic']:.1%} of galactic alerts; "
          f"mean P(real) {r['mean_p_real']:.3f} (every one is a catalogued real source)")
    print("weak labels: a SIMBAD type is the catalogued source at the position; types: "
          + ", ".join(f"{k} {v}" for k, v in r["types"].items()))
    return 0


def _null_ece(p, draws: int = 200) -> list | None:
    """ECE a perfectly calibrated score would show on these alerts (outcomes drawn from ``p``
    itself): its mean and 95th percentile over ``draws``. ECE grows as the alerts get fewer, so
    a small subset's ECE is read against this, not against a large one's."""
    p = np.asarray(p, float)
    p = p[np.isfinite(p)]
    if not len(p):
        return None
    rng = np.random.default_rng(0)
    e = [expected_calibration_error((rng.random(len(p)) < p).astype(int), p) for _ in range(draws)]
    return [float(np.mean(e)), float(np.quantile(e, 0.95))]


def _null_text(part) -> str:
    n = part["ece_if_calibrated"]
    return f"{n[0]:.4f}, 95 % {n[1]:.4f}" if n else "--"


def _fig(v) -> str:
    """A figure of a report line, ``--`` where there is none (one class only, nothing scored)."""
    return f"{v:.4f}" if v is not None and np.isfinite(v) else "--"


def _evaluate_sim(args) -> int:
    from causal.adjust import PropensityWeighter
    from models.scorer import AlertScorer, default_scorer

    model = AlertScorer.load(args.model) if args.model else default_scorer()
    sim = simulated_table(args.seed, **_sim_kwargs(args))
    sb = model.score(sim.X, contributions=False)
    rb = sim.X["real_bogus"].to_numpy(float)
    out = {"model": model.model_version, "seed": args.seed, "n_alerts": len(sim.X), "scores": {}, "interventions": []}
    lines = [f"{model.model_version} on simulated seed {args.seed}: {len(sim.X)} alerts",
             f"{'score':<16} {'ROC AUC':>8} {'AuRaK':>8} {'AuRaK rb':>9} {'ECE':>8} {'mean p−rate':>12}"]
    for s, tcol in TARGETS.items():
        y, p = sim.truth[tcol].to_numpy(int), getattr(sb, s)
        m = out["scores"][s] = {"auc": roc_auc(y, p), "aurak": aurak(y, p), "aurak_real_bogus": aurak(y, rb),
                                "ece": expected_calibration_error(y, p),
                                "calibration_in_the_large": calibration_in_the_large(y, p)}
        lines.append(f"{s:<16} {m['auc']:8.4f} {m['aurak']:8.4f} {m['aurak_real_bogus']:9.4f} "
                     f"{m['ece']:8.4f} {m['calibration_in_the_large']:12.4f}")
    if sb.label_propensity:
        # The flag of scores beyond the labels' reach: how many, and how those scores fare there.
        ex = sb.extrapolated()
        sup = out["label_support"] = {"flagged": {s: int(sum(s in e for e in ex)) for s in sb.label_propensity},
                                      "scores": {}}
        lines.append("label support: alerts whose scores are flagged extrapolated (alert-time ê < "
                     f"{sb.support_threshold:g}): " + ", ".join(f"{s} {n} ({n / max(len(ex), 1):.1%})"
                                                                 for s, n in sup["flagged"].items()))
        for s, tcol in TARGETS.items():
            flag = np.array([s in e for e in ex])
            y, p = sim.truth[tcol].to_numpy(int), getattr(sb, s)
            part = {}
            for name, rows in (("flagged", flag), ("not_flagged", ~flag)):
                yy, pp = y[rows], p[rows]
                both = 0 < yy.sum() < len(yy)
                ece = expected_calibration_error(yy, pp) if rows.any() else float("nan")
                part[name] = {"n": int(rows.sum()), "auc": roc_auc(yy, pp) if both else None,
                              "ece": ece if np.isfinite(ece) else None,
                              "ece_if_calibrated": _null_ece(pp) if rows.any() else None}
            sup["scores"][s] = part
            if flag.any():
                f, o = part["flagged"], part["not_flagged"]
                lines.append(f"  {s:<16} flagged: ROC AUC {_fig(f['auc'])}, ECE {_fig(f['ece'])} "
                             f"(calibrated: {_null_text(f)}; {f['n']} alerts); the rest: {_fig(o['auc'])}, "
                             f"{_fig(o['ece'])} ({_null_text(o)}; {o['n']})")
    if sb.type_proba is not None:
        out["source_types"] = st = source_type_metrics(sim.truth["class"], sb.types, sb.type_proba)
        lines.append(f"source type of the {st['n']} real alerts (given real): top-1 accuracy {st['accuracy']:.3f}, "
                     f"ECE of the top type's probability {st['ece_top']:.3f}")
        lines.append(f"  {'type':<16} {'alerts':>6} {'recall':>7} {'precision':>9}")
        for t, m in st["per_type"].items():
            lines.append(f"  {t:<16} {m['n']:6d} {m['recall']:7.3f} {m['precision']:9.3f}")
    kw = _sim_kwargs(args)
    interventions = ((f"do(seeing {DO_SEEING[0]}→{DO_SEEING[1]}″)", intervene_seeing, kw),
                     (f"do(moon {DO_MOON[0]:g}→{DO_MOON[1]:g}, moonlit nights)", intervene_moon,
                      dict(kw, start_jd=MOONLIT_START_JD)))
    for label, intervene, skw in interventions:
        for nights, what in ((1, "last night"), (None, "every night")):
            do = intervene(args.seed, last_nights=nights, **skw)
            for s, (v, v_lo, v_hi) in do.shift_interval(model).items():
                out["interventions"].append({"intervention": label, "nights": what, "alerts": len(do.rows[0]),
                                             "score": s, "shift": v, "low": v_lo, "high": v_hi})
                lines.append(f"{label}, {what}, {len(do.rows[0])} alerts: Δ mean {s} = {v:+.4f}, "
                             f"95 % [{v_lo:+.4f}, {v_hi:+.4f}]  (target |Δ| ≤ 0.03)")
            ts = do.type_shift(model)
            if ts:
                worst = max(ts, key=lambda t: abs(ts[t]))
                out.setdefault("source_type_shifts", []).append({"intervention": label, "nights": what,
                                                                 "alerts": len(do.rows[0]), "shifts": ts})
                lines.append(f"{label}, {what}: source types, largest Δ mean P(type | real) = {ts[worst]:+.4f} "
                             f"({worst}; information, no target)")
    for key, what, col in (("ipw", "labelled", "vetted"), ("ipw_real", "eyeballed (P(real))", "eyeballed")):
        lab = sim.truth[col].to_numpy(bool)
        diag = PropensityWeighter().fit(sim.selection, lab).diagnostics(sim.selection, lab)
        out[key] = diag.to_json()
        lines.append(f"IPW on this stream: ESS {diag.ess:.1f} = {diag.ess_fraction:.1%} of {diag.n_labelled} {what}; "
                     f"{diag.n_extrapolated} alerts with ê < 0.01")
    if args.json:
        _write_json(out)
    else:
        print("\n".join(lines))
    return 0


def cmd_validate_causal(args) -> int:
    if args.real:
        return _validate_causal_real(args)
    if args.model:
        raise ValueError("--model is for --real (the simulated checks train their own scorers)")
    for flag, given in (("--alerts-only", args.alerts_only), ("--refit-conditions", args.refit_conditions)):
        if given:  # (it had started the simulated validation, ignoring it)
            raise ValueError(f"{flag} is for --real")
    checks, by_stage = validate_causal(args.train_seed, args.test_seed, **_sim_kwargs(args))
    if args.json:
        _write_json({"checks": [{"check": c.name, "value": c.value, "target": c.target, "pass": c.passed,
                                 "detail": c.detail} for c in checks], "by_stage": by_stage})
    else:
        for c in checks:
            print(c.line())
        print(f"{sum(c.passed for c in checks)}/{len(checks)} checks passed")
        print("\ndo(seeing) shift by light-curve stage (information: the targets above are for the whole population)")
        print(f"{'intervention':<13} {'stage':<9} {'n':>5}  {'score':<16} {'adjusted Δ [95 %]':<28} naive Δ [95 %]")
        for r in by_stage:
            if r["scorer"] != "adjusted":
                continue
            nv = next(x for x in by_stage if x["scorer"] == "naive" and all(
                x[k] == r[k] for k in ("intervention", "stage", "score")))
            print(f"{r['intervention']:<13} {r['stage']:<9} {r['n']:>5}  {r['score']:<16} "
                  f"{r['shift']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]{'':<6} "
                  f"{nv['shift']:+.3f} [{nv['low']:+.3f}, {nv['high']:+.3f}]")
    return 0 if all(c.passed for c in checks) else 1


def _validate_causal_real(args) -> int:
    from models.scorer import AlertScorer

    model = AlertScorer.load(args.model) if args.model else None
    checks, fig = validate_causal_real(args.real, model, history=not args.alerts_only,
                                       refit_conditions=args.refit_conditions)
    if args.json:  # (strict JSON: _write_json writes NaN as null)
        _write_json({"figures": fig, "checks": [{"check": c.name, "value": c.value, "target": c.target,
                                                 "pass": c.passed} for c in checks]})
    else:
        held = ", ".join(fig["controls"]) or "nothing"
        what = "alerts and earlier detections (re-created from the alerts' histories)" if fig["history"] else "alerts"
        print(f"{fig['model_version']} on {fig['alerts_read']} real {what}, {fig['image_level_seeing']} with an "
              f"image-level seeing: {fig['alerts']} {'epochs' if fig['history'] else 'alerts'} of {fig['objects']} "
              f"objects seen more than once (median seeing "
              f"range within an object {fig['seeing_range_median']:.2f}″); slope of each score on seeing within "
              f"objects ({held} held fixed):")
        for s, (b, lo, hi) in fig["slopes"].items():
            note = "  (not required to be invariant)" if s == "p_real" else ""
            print(f"  {s:<16} {b:+.4f} per ″, 95 % [{lo:+.4f}, {hi:+.4f}]{note}")
        for c in checks:
            print(c.line())
        for s in ("p_extragalactic", "p_fast"):
            b, lo, hi = fig["slopes"][s]
            if lo <= 0 <= hi and max(abs(lo), abs(hi)) > REAL_SLOPE_TARGET:
                print(f"  {s}: the interval holds 0 but is wider than the target: too few objects to bound the slope")
        print(f"{sum(c.passed for c in checks)}/{len(checks)} checks passed")
    return 0 if all(c.passed for c in checks) else 1


def _sim_kwargs(args) -> dict:
    # Every value given, 0 included: the simulator refuses a size of 0 (it used to mean "the default").
    return {k: getattr(args, k) for k in ("mode", "fields", "quadrants", "nights", "cadence")
            if getattr(args, k, None) is not None}


def _add_sim_args(p) -> None:
    from stream.simulate import CADENCES, MODES

    p.add_argument("--mode", choices=MODES, help=f"simulator field mode (default {SIM_DEFAULTS['mode']})")
    p.add_argument("--fields", type=int, help=f"simulated fields (default {SIM_DEFAULTS['fields']})")
    p.add_argument("--quadrants", type=int, help=f"quadrants per field (default {SIM_DEFAULTS['quadrants']})")
    p.add_argument("--nights", type=int, help=f"alert nights (default {SIM_DEFAULTS['nights']})")
    p.add_argument("--cadence", choices=CADENCES, help="simulated survey cadence (default nightly)")


def _dropped(args, df: pd.DataFrame) -> set:
    """``--drop``'s columns, each of which must be in the table."""
    cols = set(_split_list(getattr(args, "drop", "")))
    missing = sorted(cols - set(df.columns))
    if missing:
        raise ValueError(f"--drop: column(s) {missing} not in the table")
    return cols


def _add_table_args(p) -> None:
    p.add_argument("--table", help="labelled feature table (CSV)")
    p.add_argument("--label-column", help="label column (default: label; evaluate --model: the model's own)")
    p.add_argument("--positive", help="comma-separated labels of the positive class (evaluate --model: "
                                      "default, the model's own)")
    p.add_argument("--negative", help="comma-separated labels of the negative class (evaluate --model: "
                                      "default, the model's own)")
    p.add_argument("--id-column", help="object id column; required to train or cross-validate (rows of one "
                                       "object stay in one fold)")
    p.add_argument("--drop", default="", help="comma-separated columns not to learn from (e.g. ra,dec: every "
                                              "other numeric column is a feature)")


#: The ``vigil validate`` sub-parsers object, so other modules can add checks
#: (``VALIDATE_SUBPARSERS.add_parser("hsr", ...)``); set by :func:`register`.
VALIDATE_SUBPARSERS = None


def register(subparsers) -> None:
    """Add ``train``, ``score``, ``evaluate`` and ``validate causal`` to the ``vigil`` parser."""
    global VALIDATE_SUBPARSERS

    p = subparsers.add_parser("train", help="train scorers on simulated alerts or a labelled feature table")
    p.add_argument("--simulate", action="store_true", help="train the alert model on a simulated stream")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--refit-conditions", nargs="+", metavar="PATH",
                   help="instead: refit the condition regressions ĝ(z) of --model (default: the shipped model) on "
                        "these unlabelled alerts of the survey (files, directories, archives); scorers unchanged")
    p.add_argument("--labels", metavar="PATH",
                   help="instead: retrain P(real) and P(extragalactic) of --model (default: the shipped model) on the "
                        "vetters' decisions exported by `vigil queue export-labels` (.parquet or .csv)")
    p.add_argument("--model", help="with --refit-conditions or --labels: the alert model to start from")
    _add_table_args(p)
    _add_sim_args(p)
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("score", help="score a feature table with a table model")
    p.add_argument("--table", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="CSV with the id column and a 'score' column")
    p.add_argument("--id-column", help="id column to copy (default: the one used in training, if present)")
    p.set_defaults(func=cmd_score)

    p = subparsers.add_parser("evaluate", help="AUC, recall at rank K / AuRaK and calibration of a model")
    _add_table_args(p)
    p.add_argument("--model", help="trained model directory (default for --simulate: the shipped model)")
    p.add_argument("--cv", type=int, default=5, help="grouped CV folds when no --model is given (default 5)")
    p.add_argument("--baseline", choices=["hgb", "none"], default="hgb", help="ML baseline trained the same way")
    p.add_argument("--baseline-column", help="survey score column as baseline ordering (default: rb_pix if present)")
    p.add_argument("--simulate", action="store_true", help="evaluate an alert model on a simulated stream")
    p.add_argument("--xmatch-labels", nargs="+", metavar="PATH",
                   help="evaluate an alert model's P(extragalactic) on real alerts stored as Parquet rows with a "
                        "broker's SIMBAD (cdsxmatch) and TNS (tns) cross-match as weak labels")
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--json", action="store_true")
    _add_sim_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser("validate", help="validation checks with targets (pass/fail)")
    VALIDATE_SUBPARSERS = p.add_subparsers(dest="validate_command", required=True)
    q = VALIDATE_SUBPARSERS.add_parser("causal", help="do(seeing) invariance, calibration, AUC cost, IPW ESS")
    q.add_argument("--json", action="store_true")
    q.add_argument("--train-seed", type=int, default=1)
    q.add_argument("--test-seed", type=int, default=2)
    q.add_argument("--real", nargs="+", metavar="PATH",
                   help="instead: real alerts (files/directories): within-object score slopes on seeing")
    q.add_argument("--model", help="with --real: alert model directory (default: the shipped model)")
    q.add_argument("--alerts-only", action="store_true",
                   help="with --real: only the alerts themselves, not their re-created earlier detections")
    q.add_argument("--refit-conditions", action="store_true",
                   help="with --real: the model with its ĝ(z) refitted on these alerts, cross-fitted by object")
    _add_sim_args(q)
    q.set_defaults(func=cmd_validate_causal)

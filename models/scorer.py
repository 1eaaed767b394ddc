"""Calibrated XGBoost scorers: the estimator, the alert scorer the pipeline calls, model IO.

* :class:`XGBBinaryScorer` — one calibrated binary XGBoost model with the scikit-learn
  estimator contract (``fit(X, y, sample_weight=None)``, ``predict_proba``).
  Probabilities are calibrated by a Platt or isotonic map fitted on out-of-fold margins
  (with the same sample weights, i.e. the inverse-propensity weights), so calibration
  is judged on data the booster did not see.
* :class:`AlertScorer` — the three independent scores P(real), P(extragalactic),
  P(fast). The intrinsic scores read condition-sensitive features residualised on the
  observing conditions (:class:`causal.adjust.ConditionResidualiser`) and never the
  conditions themselves; P(real) reads the raw features *and* the conditions (bad
  seeing really makes bogus detections). One ``score(X)`` call per micro-batch:
  ``inplace_predict`` on a float32 array, plus the explanations' per-feature
  contributions (:class:`TreeShap`: XGBoost's ``pred_contribs`` values, batch-wise).
* :class:`TableScorer` — a single calibrated score on the numeric columns of a labelled
  feature table (e.g. the ATLAS vetting features), for ``vigil train/score --table``.

Model directory layout (never pickled)::

    metadata.json        format, kind, version, created, feature names and order, classes,
                         training-data hash, calibrators, residualiser, IPW audit
    <score>.ubj          one XGBoost booster per score (UBJSON)

:func:`load` refuses a directory whose format is unknown or whose feature names/order
differ from the running code.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin

from models.features import CONDITIONS, FEATURES, SURVEY_OPTIONAL
from models.score import SCORES, ScoreBatch

log = logging.getLogger(__name__)

_OPTIONAL = {c for group in SURVEY_OPTIONAL for c in group}
#: On-disk format of a model directory; :func:`load` refuses anything else.
FORMAT = "vigil-scorer/1"
SUPPORTED_FORMATS = (FORMAT,)
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"

#: Scores that must not move under do(conditions) (science.md §2).
INTRINSIC = ("p_extragalactic", "p_fast")

#: Features whose distribution the observing conditions shift, with the transform in which
#: that shift is (close to) additive: PSF width and S/N scale with seeing and depth, the
#: survey's real/bogus score degrades in bad seeing, astrometric scatter grows as seeing/S/N.
CONDITION_SENSITIVE = (
    ("fwhm", "log"), ("snr", "log"), ("real_bogus", "logit"), ("elongation", "log"),
    ("pos_scatter", "log"), ("pos_offset_now", "log"),
)
#: How the conditions enter the residualiser's regression.
CONDITION_TRANSFORMS = (("seeing", "log"), ("airmass", "identity"), ("limit_mag", "identity"),
                        ("moon_illumination", "identity"), ("moon_separation", "identity"), ("det_seeing", "log"))

#: An alert with none of these is not scored (its scores and priority are null, status ``unscored``).
#: The survey's real/bogus score alone: every alert a model learnt from had one, so without it
#: the boosters would send the alert down whichever branch training defaulted to (for P(real),
#: "real": P(real) ≈ 1 and the top of the queue).
MIN_EVIDENCE = ("real_bogus",)
#: Fewest alerts (with every condition known) a refit of the condition regressions accepts.
MIN_CONDITION_ROWS = 50

#: Inputs of the intrinsic scorers: every feature except the conditions themselves.
INTRINSIC_FEATURES = tuple(f for f in FEATURES if f not in CONDITIONS)
#: Rows of observing conditions a model keeps for its standardised ("typical conditions") scores.
CONDITION_BANK_ROWS = 32
#: What the label support (:class:`causal.adjust.LabelSupport`) reads of an alert when it is
#: scored: what follow-up and eyeballing select on, less the later data (see :func:`support_covariates`).
SUPPORT_COVARIATES = ("det_mag", "seeing", "airmass", "catalogued_star")
#: Version of how :func:`support_covariates` computes them: a model whose support was fitted on
#: another definition is refused (its coefficients would be applied to other numbers).
SUPPORT_DEFINITION = 2
#: Name of the source types in a label support's scores (beside :data:`models.score.SCORES`).
TYPE_SCORE = "source_type"


def support_covariates(X: pd.DataFrame) -> pd.DataFrame:
    """The alert-time covariates of the label support (:data:`SUPPORT_COVARIATES`) from feature rows.

    ``det_mag`` is the magnitude of the triggering detection's absolute flux (|flux now / peak ×
    peak|, so a negative difference has one too; the alert's own magnitude where the light curve
    gives none), ``catalogued_star`` 1 for a PS1 source with star/galaxy score > 0.8 within
    0.5″, 0 for another PS1 neighbour, missing without a PS1 cross-match (a survey that sends
    none, a cross-match outage: the propensity model has a missing-indicator for it). The
    depth is not among them: the training alerts always had one, and a survey without it
    (Rubin) would have been judged at the simulated median.
    """
    now = np.abs(X["flux_now_over_peak"].to_numpy(float) * X["peak_flux"].to_numpy(float))
    sg, d = X["star_galaxy"].to_numpy(float), X["ps1_distance"].to_numpy(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        det_mag = np.where(now > 0, 23.9 - 2.5 * np.log10(np.where(now > 0, now, 1.0)), X["mag"].to_numpy(float))
        star = np.where(np.isfinite(sg) & np.isfinite(d), ((sg > 0.8) & (d < 0.5)).astype(float), np.nan)
    return pd.DataFrame({"det_mag": det_mag, "seeing": X["seeing"].to_numpy(float),
                         "airmass": X["airmass"].to_numpy(float), "catalogued_star": star}, index=X.index)


def condition_bank(X: pd.DataFrame, rows: int = CONDITION_BANK_ROWS, random_state: int = 0) -> dict:
    """A reference bank of observing conditions: ``rows`` alerts of ``X`` drawn at random, every condition known.

    Drawn from all the alerts of a training stream (labelled or not), or of the survey stream a
    ĝ(z) is refitted on, so the bank follows that distribution of conditions; see
    :meth:`AlertScorer.standardised_scores`.
    """
    Z = X[list(CONDITIONS)].to_numpy(float)
    Z = Z[np.isfinite(Z).all(axis=1)]
    pick = np.random.default_rng(random_state).choice(len(Z), size=min(rows, len(Z)), replace=False)
    return {"columns": list(CONDITIONS), "rows": np.round(Z[np.sort(pick)], 6).tolist()}


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=float)))


def _as_float32(X, names=None) -> np.ndarray:
    """Float32 rows for XGBoost, a value that overflows float32 (or was ±inf) as NaN: missing,
    not an error that fails the whole batch."""
    with np.errstate(over="ignore"):  # (a float64 beyond float32 becomes inf, then NaN below)
        if isinstance(X, pd.DataFrame):
            X = X[list(names)] if names is not None else X
            A = X.to_numpy(dtype=np.float32, na_value=np.nan)
        else:
            A = np.asarray(X, dtype=np.float32)
    inf = np.isinf(A)
    if inf.any():
        A = np.where(inf, np.float32(np.nan), A)  # a new array: X is never written to
    return np.ascontiguousarray(A)


# --------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Calibrator:
    """Monotone map from a booster margin to a probability, stored as plain numbers.

    ``method`` is ``"platt"`` (``params = {"a", "b"}``: p = σ(a·margin + b)),
    ``"isotonic"`` (``params = {"x", "y"}``: piecewise-linear in σ(margin)) or
    ``"identity"`` (p = σ(margin)).
    """

    method: str
    params: dict = field(default_factory=dict)

    @property
    def slope(self) -> float:
        """d(calibrated log-odds)/d(margin) where it is one number (Platt: ``a``), else 1."""
        return float(self.params["a"]) if self.method == "platt" else 1.0

    def __call__(self, margin) -> np.ndarray:
        m = np.asarray(margin, dtype=float)
        if self.method == "platt":
            return _sigmoid(self.params["a"] * m + self.params["b"])
        if self.method == "isotonic":
            return np.interp(_sigmoid(m), self.params["x"], self.params["y"])
        return _sigmoid(m)

    def to_json(self) -> dict:
        return {"method": self.method, "params": {k: (list(v) if isinstance(v, (list, tuple, np.ndarray)) else v)
                                                  for k, v in self.params.items()}}

    @classmethod
    def from_json(cls, d: dict) -> Calibrator:
        """Read a calibrator, refusing one :func:`fit_calibrator` could not have written (an edited
        metadata file: a Platt slope ≤ 0 would reverse the ranking)."""
        if d["method"] not in ("platt", "isotonic", "identity"):
            raise ValueError(f"unknown calibration method {d['method']!r}")
        cal = cls(d["method"], {k: (tuple(float(x) for x in v) if isinstance(v, list) else float(v))
                                for k, v in d.get("params", {}).items()})
        p = cal.params
        if cal.method == "platt" and not (p.get("a", 0.0) > 0 and math.isfinite(p["a"])
                                          and math.isfinite(p.get("b", math.nan))):
            raise ValueError(f"Platt calibration {p}: the slope must be a positive number and the offset finite")
        if cal.method == "isotonic":
            x, y = np.asarray(p.get("x", ()), float), np.asarray(p.get("y", ()), float)
            if not (len(x) == len(y) >= 1 and np.all(np.diff(x) >= 0) and np.all(np.diff(y) >= 0)
                    and np.all((y >= 0) & (y <= 1))):
                raise ValueError("isotonic calibration: thresholds must be paired, sorted, and map into [0, 1]")
        return cal


def fit_calibrator(margin, y, sample_weight=None, method: str = "platt") -> Calibrator:
    """Fit a :class:`Calibrator` on held-out margins (weighted)."""
    m, y = np.asarray(margin, float), np.asarray(y, int)
    w = np.ones(len(m)) if sample_weight is None else np.asarray(sample_weight, float)
    if method == "identity" or len(np.unique(y)) < 2:
        return Calibrator("identity")
    if method == "platt":
        from sklearn.linear_model import LogisticRegression

        lr = LogisticRegression(C=1e4, max_iter=1000).fit(m[:, None], y, sample_weight=w)
        a = float(lr.coef_[0, 0])
        if not a > 0:
            # Held-out margins that rank the classes backwards (or not at all): inverting the
            # booster would flip its ranking and every explanation's sign. Keep its own scale.
            log.warning("Platt slope %.3g ≤ 0 on held-out margins: identity calibration kept", a)
            return Calibrator("identity")
        return Calibrator("platt", {"a": a, "b": float(lr.intercept_[0])})
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        ir = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(_sigmoid(m), y, sample_weight=w)
        return Calibrator("isotonic", {"x": tuple(float(v) for v in ir.X_thresholds_),
                                       "y": tuple(float(v) for v in ir.y_thresholds_)})
    raise ValueError(f"unknown calibration method {method!r} (platt, isotonic or identity)")


# --------------------------------------------------------------------------- binary estimator


class _XGBEstimator(ClassifierMixin, BaseEstimator):
    """What the XGBoost scorers share: booster settings, inputs, weights. Subclasses define
    ``__init__`` (the scikit-learn contract wants every parameter spelt out there) and
    ``_objective`` (the booster's objective settings)."""

    _objective: dict = {}

    def _train(self, X, y, w, **objective):
        import xgboost as xgb

        params = {**self._objective, **objective, "tree_method": "hist", "max_depth": self.max_depth,
                  "eta": self.learning_rate, "subsample": self.subsample, "colsample_bytree": self.colsample_bytree,
                  "min_child_weight": self.min_child_weight, "lambda": self.reg_lambda, "seed": self.random_state,
                  "nthread": self.n_jobs}
        names = list(getattr(self, "feature_names_in_", [])) or None
        d = xgb.DMatrix(X, label=y, weight=w, feature_names=names, missing=np.nan)
        return xgb.train(params, d, num_boost_round=self.n_estimators)

    def _fit_inputs(self, X, sample_weight, n: int) -> tuple:
        """(float32 rows, weights at mean 1); records the input names and count."""
        if isinstance(X, pd.DataFrame):
            self.feature_names_in_ = np.asarray(X.columns, dtype=object)
        elif hasattr(self, "feature_names_in_"):
            del self.feature_names_in_
        Xa = _as_float32(X)
        self.n_features_in_ = Xa.shape[1]
        w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, float)
        if not (np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
            raise ValueError("sample_weight must be finite, non-negative and not all zero")
        # Weights are defined up to a constant (stabilised inverse propensities), but XGBoost's
        # min_child_weight and lambda are in summed-weight units: at mean 1 they count rows, so
        # the fit does not depend on the scale (×3 weights moved an ECE from 0.06 to 0.10).
        return Xa, w / w.mean()

    def _check_X(self, X) -> np.ndarray:
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self, "booster_")
        names = getattr(self, "feature_names_in_", None)
        if isinstance(X, pd.DataFrame) and names is not None:
            missing = [n for n in names if n not in X.columns]
            if missing:
                raise ValueError(f"missing feature columns: {missing}")
            Xa = _as_float32(X, names)
        else:
            Xa = _as_float32(X)
        if Xa.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {Xa.shape[1]} features, the model expects {self.n_features_in_}")
        return Xa


class XGBBinaryScorer(_XGBEstimator):
    """Calibrated binary XGBoost classifier (scikit-learn estimator contract).

    Parameters
    ----------
    n_estimators, max_depth, learning_rate, subsample, colsample_bytree, min_child_weight, reg_lambda
        XGBoost booster settings (``xgb.train`` with ``binary:logistic``, ``hist`` trees).
    calibration : {"platt", "isotonic", "identity"}
        Map fitted on out-of-fold margins.
    calibration_folds : int
        Folds for those out-of-fold margins (stratified, or grouped when ``groups`` is
        given to :meth:`fit`).
    random_state : int
    n_jobs : int
        XGBoost threads.

    Attributes
    ----------
    booster_ : xgboost.Booster
        Trained on all rows.
    calibrator_ : Calibrator
    classes_ : ndarray
        ``[0, 1]``.
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Only when fitted on a DataFrame.
    """

    def __init__(self, n_estimators: int = 300, max_depth: int = 4, learning_rate: float = 0.05,
                 subsample: float = 0.8, colsample_bytree: float = 0.8, min_child_weight: float = 1.0,
                 reg_lambda: float = 1.0, calibration: str = "platt", calibration_folds: int = 5,
                 random_state: int = 0, n_jobs: int = 2):
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.learning_rate = learning_rate
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.min_child_weight = min_child_weight
        self.reg_lambda = reg_lambda
        self.calibration = calibration
        self.calibration_folds = calibration_folds
        self.random_state = random_state
        self.n_jobs = n_jobs

    _objective = {"objective": "binary:logistic", "eval_metric": "logloss"}

    def fit(self, X, y, sample_weight=None, groups=None):
        """Fit the booster on all rows and the calibrator on out-of-fold margins.

        Parameters
        ----------
        X : DataFrame or array, shape (n, p)
        y : array of {0, 1} or bool
        sample_weight : array, optional
            E.g. inverse-propensity weights; used by the booster *and* the calibrator, rescaled
            to mean 1 (so ``min_child_weight`` is in rows and the fit ignores their scale).
        groups : array, optional
            Group ids (e.g. object ids) so that out-of-fold margins never share a group.
        """
        from sklearn.model_selection import GroupKFold, StratifiedKFold

        y = np.asarray(y).astype(int)
        if set(np.unique(y)) - {0, 1}:
            raise ValueError("y must be binary (0/1)")
        Xa, w = self._fit_inputs(X, sample_weight, len(y))
        self.classes_ = np.array([0, 1])
        k = min(self.calibration_folds, int(np.bincount(y, minlength=2).min()))
        if self.calibration != "identity" and k >= 2:
            oof = np.full(len(y), np.nan)
            if groups is not None:
                splits = GroupKFold(n_splits=min(k, len(np.unique(groups)))).split(Xa, y, groups)
            else:
                splits = StratifiedKFold(n_splits=k, shuffle=True, random_state=self.random_state).split(Xa, y)
            for tr, te in splits:
                b = self._train(Xa[tr], y[tr], w[tr])
                oof[te] = b.inplace_predict(Xa[te], predict_type="margin")
            self.calibrator_ = fit_calibrator(oof, y, w, self.calibration)
        else:
            self.calibrator_ = Calibrator("identity")
        self.booster_ = self._train(Xa, y, w)
        return self

    def decision_function(self, X) -> np.ndarray:
        """Raw booster margin (log-odds before calibration)."""
        Xa = self._check_X(X)
        return self.booster_.inplace_predict(Xa, predict_type="margin")

    def predict_proba(self, X) -> np.ndarray:
        """Calibrated probabilities, shape (n, 2)."""
        margin = self.decision_function(X)
        p = self.calibrator_(margin)
        return np.column_stack([1.0 - p, p])

    def predict(self, X) -> np.ndarray:
        return (self.predict_proba(X)[:, 1] >= 0.5).astype(int)

    def tree_shap(self) -> TreeShap | None:
        """The booster's :class:`TreeShap` tables (built on first use, once per booster), or None."""
        cached = getattr(self, "_tree_shap", None)
        if cached is None or cached[0] is not self.booster_:
            cached = self._tree_shap = (self.booster_, TreeShap.of(self.booster_))
        return cached[1]

    def contributions(self, X, nthread: int | None = None) -> np.ndarray:
        """Per-row signed feature contributions to the margin (XGBoost ``pred_contribs``), bias dropped.

        Computed by :class:`TreeShap` (XGBoost's values to float32 rounding, ~1e-6; 2.5–5× faster
        on the shipped models) where the booster allows, else by XGBoost itself. ``nthread`` bounds the threads
        that build XGBoost's DMatrix (default: all cores).
        """
        import xgboost as xgb

        Xa = self._check_X(X)
        tables = self.tree_shap()
        if tables is not None:
            return tables.contributions(Xa)
        names = list(getattr(self, "feature_names_in_", [])) or None
        c = self.booster_.predict(xgb.DMatrix(Xa, feature_names=names, missing=np.nan, nthread=nthread),
                                  pred_contribs=True)
        return np.asarray(c[:, :-1], dtype=float)


class XGBTypeScorer(_XGBEstimator):
    """Calibrated multi-class XGBoost classifier of the source type (scikit-learn contract).

    What kind of source a real alert most likely is (a supernova, a CV outburst, an M-dwarf
    flare...): the contaminants a vetter must recognise, named. ``multi:softprob`` trees,
    then one temperature ``T`` (probabilities ``softmax(margin / T)``) fitted on out-of-fold
    margins by weighted log loss: it fixes over- or under-confidence without changing the order.

    Parameters
    ----------
    n_estimators, max_depth, learning_rate, subsample, colsample_bytree, min_child_weight, reg_lambda
        XGBoost booster settings (per class: a round grows one tree per class).
    calibration_folds : int
        Folds for the out-of-fold margins (grouped when ``groups`` is given to :meth:`fit`).
    random_state : int
    n_jobs : int

    Attributes
    ----------
    booster_ : xgboost.Booster
    classes_ : ndarray of str
        Sorted type names; the columns of :meth:`predict_proba`.
    temperature_ : float
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Only when fitted on a DataFrame.
    """

    def __init__(self, n_estimators: int = 60, max_depth: int = 3, learning_rate: float = 0.15,
                 subsample: float = 0.8, colsample_bytree: float = 0.8, min_child_weight: float = 3.0,
                 reg_lambda: float = 2.0, calibration_folds: int = 5, random_state: int = 0, n_jobs: int = 2):
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.learning_rate = learning_rate
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.min_child_weight = min_child_weight
        self.reg_lambda = reg_lambda
        self.calibration_folds = calibration_folds
        self.random_state = random_state
        self.n_jobs = n_jobs

    _objective = {"objective": "multi:softprob", "eval_metric": "mlogloss"}

    def fit(self, X, y, sample_weight=None, groups=None):
        """Fit the booster on all rows and the temperature on out-of-fold margins.

        Parameters
        ----------
        X : DataFrame or array, shape (n, p)
        y : array of type names (two or more distinct)
        sample_weight : array, optional
            Rescaled to mean 1, as in :class:`XGBBinaryScorer`.
        groups : array, optional
            Group ids (object ids): out-of-fold margins never share a group.
        """
        from scipy.optimize import minimize_scalar
        from sklearn.model_selection import GroupKFold, KFold

        self.classes_, codes = np.unique(np.asarray(y).astype(str), return_inverse=True)
        k = len(self.classes_)
        if k < 2:
            raise ValueError("y must hold at least two source types")
        Xa, w = self._fit_inputs(X, sample_weight, len(codes))
        folds = min(self.calibration_folds, len(np.unique(groups)) if groups is not None else len(codes))
        self.temperature_ = 1.0
        if folds >= 2:
            oof = np.zeros((len(codes), k))
            splits = (GroupKFold(n_splits=folds).split(Xa, codes, groups) if groups is not None else
                      KFold(n_splits=folds, shuffle=True, random_state=self.random_state).split(Xa))
            for tr, te in splits:
                oof[te] = self._train(Xa[tr], codes[tr], w[tr], num_class=k).inplace_predict(
                    Xa[te], predict_type="margin")

            def nll(log_t):
                z = oof / np.exp(log_t)
                z = z - z.max(axis=1, keepdims=True)
                logp = z[np.arange(len(codes)), codes] - np.log(np.exp(z).sum(axis=1))
                return -float(np.average(logp, weights=w))

            self.temperature_ = float(np.exp(minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded").x))
        self.booster_ = self._train(Xa, codes, w, num_class=k)
        return self

    def predict_proba(self, X) -> np.ndarray:
        """Calibrated probabilities, shape (n, len(classes_)); each row sums to 1."""
        Xa = self._check_X(X)
        z = self.booster_.inplace_predict(Xa, predict_type="margin").reshape(len(Xa), len(self.classes_))
        z = z.astype(np.float64) / self.temperature_  # (in float32 a wide spread could underflow a whole row)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


class TreeShap:
    """Exact path-dependent Tree SHAP of a binary XGBoost booster, vectorised over rows.

    The values of XGBoost's ``pred_contribs`` (Lundberg, Erion & Lee 2018, arXiv:1802.03888,
    Algorithm 1: features outside the coalition follow the trees' covers), bias dropped,
    computed batch-wise; like XGBoost's, the tables and sums are float32, so the two agree to
    float32 rounding (~1e-6), not bit for bit.
    Why: XGBoost walks each row through each tree one at a time, which cost ~50 µs per row
    and score on the shipped models, more than every other scoring step together.

    How: a tree's expected value given a coalition S is a sum over its leaves of the leaf
    value times, along the leaf's path, the product over the path's features of either
    "the row goes this way at every node of that feature" (feature in S) or the covers'
    fraction (not in S). Each leaf is therefore a product game over the few features of its
    path, whose Shapley values depend on the row only through which of the path's nodes the
    row would pass: one bit per node. So every path gets a table of its features' Shapley
    values for each pattern of bits (built once), and a batch needs only each node's
    comparison, one table lookup per row and path, and a sum per feature.

    Use :meth:`of`, which returns None for a booster this does not cover (not a single-output
    ``gbtree``, categorical splits, or paths deeper than :attr:`MAX_PATH`): XGBoost then does it.
    """

    #: Deepest root-to-leaf path tabulated (a table holds 2**depth patterns per path).
    MAX_PATH = 6

    def __init__(self, trees: list, n_features: int):
        feat, thr, default_left, paths = [], [], [], []
        for t in trees:
            left, right, cover, value = t["left_children"], t["right_children"], t["sum_hessian"], t["split_conditions"]
            node = {}  # this tree's split nodes → index among all split nodes
            for i, child in enumerate(left):
                if child != -1:
                    node[i] = len(feat)
                    feat.append(t["split_indices"][i])
                    thr.append(value[i])
                    default_left.append(bool(t["default_left"][i]))
            stack = [(0, ())]
            while stack:
                i, path = stack.pop()
                if left[i] == -1:  # a leaf: its value is in split_conditions
                    paths.append((path, value[i]))
                    continue
                for child, goes_left in ((left[i], True), (right[i], False)):
                    stack.append((child, (*path, (node[i], goes_left, cover[child] / cover[i]))))
        k = max([len(p) for p, _ in paths] + [1])
        if k > self.MAX_PATH:
            raise ValueError(f"paths of {k} nodes (at most {self.MAX_PATH} tabulated)")
        n_paths = len(paths)
        self.node_feature = np.asarray(feat, dtype=np.int64)
        self.node_threshold = np.asarray(thr, dtype=np.float32)  # XGBoost compares in float32
        self.node_default_left = np.asarray(default_left, dtype=bool)
        self.slot_node = np.zeros((k, n_paths), dtype=np.int64)  # slot s of each path: its node
        self.slot_flip = np.zeros((k, n_paths), dtype=np.uint8)  # 1 where the path goes right
        self.slot_used = np.zeros((k, n_paths), dtype=np.uint8)  # 0 past the path's end
        table = np.zeros((k, n_paths, 2 ** k))  # [slot, path, bit pattern] → Shapley value
        self.slot_feature = np.zeros((k, n_paths, n_features))  # one-hot: the slot's feature
        lengths = np.array([len(p) for p, _ in paths])
        for n in np.unique(lengths[lengths > 0]).tolist():  # the tables of all paths of n nodes at once
            js = np.flatnonzero(lengths == n)
            nodes = np.array([[g for g, _, _ in paths[j][0]] for j in js.tolist()], dtype=np.int64)
            fractions = np.array([[f for _, _, f in paths[j][0]] for j in js.tolist()])
            values = np.array([paths[j][1] for j in js.tolist()])
            self.slot_node[:n, js] = nodes.T
            self.slot_flip[:n, js] = np.array([[not gl for _, gl, _ in paths[j][0]] for j in js.tolist()]).T
            self.slot_used[:n, js] = 1
            phi = _path_shapley(fractions, self.node_feature[nodes]) * values[:, None, None]  # (paths, 2**n, n)
            table[:n, js, :2 ** n] = phi.transpose(2, 0, 1)
            for s in range(n):
                self.slot_feature[s, js, self.node_feature[nodes[:, s]]] = 1.0
        # float32, as XGBoost's own sums: half the memory traffic
        self.table = table.reshape(k, -1).astype(np.float32)
        self.slot_feature = self.slot_feature.astype(np.float32)
        self.path_offset = np.arange(n_paths) * 2 ** k

    @classmethod
    def of(cls, booster) -> TreeShap | None:
        """The tables of ``booster``, or None where XGBoost must compute the contributions."""
        try:
            model = json.loads(booster.save_raw("json"))
            learner = model["learner"]
            gb = learner["gradient_booster"]
            param = learner["learner_model_param"]
            trees = gb["model"]["trees"]
            if (gb["name"] != "gbtree" or int(param.get("num_class", 0)) > 1 or int(param.get("num_target", 1)) != 1
                    or any(t.get("categories_nodes") or any(t["split_type"]) for t in trees)):
                return None
            return cls(trees, int(param["num_feature"]))
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:  # (a node of zero cover)
            log.debug("Tree SHAP tables not built (%s); XGBoost computes the contributions", e)
            return None

    def contributions(self, X: np.ndarray) -> np.ndarray:
        """Contributions of each feature to each row's margin, shape (n, n_features)."""
        X = np.asarray(X, dtype=np.float32)
        out = np.empty((len(X), self.slot_feature.shape[2]))
        for lo in range(0, len(X), self.ROWS):
            out[lo:lo + self.ROWS] = self._contributions(X[lo:lo + self.ROWS])
        return out

    #: Rows per pass: the temporaries then stay in a core's cache (three times faster than
    #: a whole 500-row micro-batch at once, when the rest of the pipeline has evicted the tables).
    ROWS = 64

    def _contributions(self, X: np.ndarray) -> np.ndarray:
        if not len(self.node_feature):  # every tree a single leaf (e.g. trained on one class): no splits
            return np.zeros((len(X), self.slot_feature.shape[2]), dtype=np.float32)
        x = X[:, self.node_feature]
        with np.errstate(invalid="ignore"):
            goes_left = np.where(np.isnan(x), self.node_default_left, x < self.node_threshold).astype(np.uint8)
        pattern = np.zeros((len(X), self.slot_node.shape[1]), dtype=np.int64)
        for s in range(len(self.slot_node)):  # bit s: the row passes the path's node s
            bit = goes_left[:, self.slot_node[s]] ^ self.slot_flip[s]
            bit &= self.slot_used[s]
            pattern |= bit.astype(np.int64) << s
        pattern += self.path_offset  # row of the flattened table
        out = np.take(self.table[0], pattern) @ self.slot_feature[0]
        for s in range(1, len(self.slot_node)):
            out += np.take(self.table[s], pattern) @ self.slot_feature[s]
        return out


def _path_shapley(fractions: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Shapley values of leaves' product games, for every pattern of their paths' node bits.

    ``fractions`` and ``features``, shape (m, k): for m paths of k nodes, the covers' fraction
    of the child taken at each node and the node's feature. Returns (m, 2**k, k): for
    pattern c (bit s = the row passes node s), each feature's value at the first node that
    splits on it (0 at its later nodes). A path's game is over its distinct features:
    v(S) = Π_f (o_f if f in S else z_f), with o_f the product of the bits and z_f of the
    fractions at f's nodes, and
    φ_f = (o_f − z_f) Σ_{S ⊆ others} |S|! (d − |S| − 1)! / d! Π_{g∈S} o_g Π_{g∉S} z_g,
    the sum taken as the coefficients of Π_g (z_g + o_g t). A feature's later nodes are
    folded into its first and then act as null players (o = z = 1), which change no other
    player's value, so every path can be taken with d = k.
    """
    m, k = features.shape
    bits = (np.arange(2 ** k)[:, None] >> np.arange(k)) & 1
    o = np.repeat(bits[None].astype(float), m, axis=0)  # (m, 2**k, k)
    z = np.repeat(np.asarray(fractions, dtype=float)[:, None, :], 2 ** k, axis=1)
    for s in range(1, k):
        for r in range(s):  # fold node s into the first earlier node of its feature
            fold = (features[:, s] == features[:, r]) & ~(features[:, :r] == features[:, [s]]).any(axis=1)
            o[fold, :, r] *= o[fold, :, s]
            z[fold, :, r] *= z[fold, :, s]
            o[fold, :, s] = 1.0
            z[fold, :, s] = 1.0
    weight = [math.factorial(n) * math.factorial(k - n - 1) / math.factorial(k) for n in range(k)]
    out = np.empty((m, 2 ** k, k))
    for s in range(k):
        coef = [np.ones((m, 2 ** k))]  # coefficients of Π over the other nodes of (z + o t)
        for g in range(k):
            if g != s:
                coef = [a * z[:, :, g] + b * o[:, :, g] for a, b in zip([*coef, 0.0], [0.0, *coef], strict=True)]
        out[:, :, s] = (o[:, :, s] - z[:, :, s]) * sum(w * a for w, a in zip(weight, coef, strict=True))
    return out


# --------------------------------------------------------------------------- persistence helpers


def data_hash(*frames) -> str:
    """SHA-256 (first 16 hex) of the training arrays, for the model's provenance record."""
    h = hashlib.sha256()
    for f in frames:
        a = f.to_numpy(dtype=float, na_value=np.nan) if isinstance(f, (pd.DataFrame, pd.Series)) \
            else np.asarray(f, dtype=float)
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save_scorer(est: XGBBinaryScorer, path: Path) -> dict:
    est.booster_.save_model(str(path))
    return {"file": path.name, "sha256": _sha256(path), "calibrator": est.calibrator_.to_json(),
            "params": est.get_params(), "n_features": int(est.n_features_in_)}


def _save_type_scorer(est: XGBTypeScorer, path: Path) -> dict:
    est.booster_.save_model(str(path))
    return {"file": path.name, "sha256": _sha256(path), "classes": [str(c) for c in est.classes_],
            "temperature": float(est.temperature_), "params": est.get_params(), "n_features": int(est.n_features_in_)}


def _load_type_scorer(d: dict, directory: Path, names) -> XGBTypeScorer:
    est = XGBTypeScorer(**d.get("params", {}))
    est.classes_ = np.asarray(d["classes"], dtype=object)
    est.temperature_ = float(d["temperature"])
    from models.score import SOURCE_TYPES

    names_ = [str(c) for c in est.classes_]
    if not (len(names_) >= 2 and names_ == sorted(set(names_)) and est.temperature_ > 0):
        raise ValueError(f"{d['file']}: a source-type scorer needs two or more distinct types in sorted order "
                         f"and a temperature > 0 (metadata: {names_}, {est.temperature_})")
    unknown = sorted(set(names_) - set(SOURCE_TYPES))
    if unknown:
        raise ValueError(f"{d['file']}: source types {unknown} are not ones this code knows ({sorted(SOURCE_TYPES)})")
    _load_booster(est, d, directory, names)
    # The booster's own class count: a metadata list cut short would fail mid-stream, one
    # reordered would name every alert's type wrongly (the SHA-256 covers the file, not the list).
    k = int(json.loads(est.booster_.save_config())["learner"]["learner_model_param"]["num_class"])
    if k != len(names_):
        raise ValueError(f"{d['file']}: the booster has {k} classes, the metadata names {len(names_)} types")
    return est


def _load_scorer(d: dict, directory: Path, names) -> XGBBinaryScorer:
    est = XGBBinaryScorer(**d.get("params", {}))
    est.calibrator_ = Calibrator.from_json(d["calibrator"])
    est.classes_ = np.array([0, 1])
    _load_booster(est, d, directory, names)
    return est


def _load_booster(est, d: dict, directory: Path, names) -> None:
    """Read ``d["file"]`` into ``est.booster_``, refusing a file the metadata does not describe."""
    import xgboost as xgb

    path = directory / d["file"]
    # The calibrator in the metadata belongs to one booster file: a file copied in from another
    # training run would load and give miscalibrated scores without a word.
    if "sha256" not in d:
        raise ValueError(f"{d['file']}: the metadata records no SHA-256 for it, so it cannot be told from "
                         "another run's booster (a model written before 2026-11-26: retrain it with `vigil train`)")
    if _sha256(path) != d["sha256"]:
        raise ValueError(f"{path}: SHA-256 differs from the metadata's; the booster is not the one "
                         "this metadata describes")
    booster = xgb.Booster()
    try:
        booster.load_model(str(path))
    except xgb.core.XGBoostError as e:  # a file XGBoost cannot read: one line, not its C++ trace
        raise ValueError(f"{path}: XGBoost cannot read it ({str(e).splitlines()[0][:200]})") from None
    est.booster_ = booster
    est.n_features_in_ = int(d["n_features"])
    if names is not None:
        est.feature_names_in_ = np.asarray(names, dtype=object)
    if booster.num_features() != est.n_features_in_:
        raise ValueError(f"{d['file']}: booster has {booster.num_features()} features, metadata says "
                         f"{est.n_features_in_}")
    if names is not None and booster.feature_names is not None and list(booster.feature_names) != list(names):
        raise ValueError(f"{d['file']}: the booster's feature names differ from the expected inputs")


#: What each score is the probability of (negative class, positive class).
CLASSES = {"p_real": ["bogus", "real"], "p_extragalactic": ["galactic", "extragalactic"], "p_fast": ["slow", "fast"]}


def xgboost_version() -> str:
    import xgboost as xgb

    return xgb.__version__


def _read_metadata(directory) -> dict:
    directory = Path(directory)
    meta_path = directory / "metadata.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"no model at {directory} (metadata.json missing)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta_path}: not a JSON model description ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: not a JSON model description (a {type(meta).__name__})")
    if meta.get("format") not in SUPPORTED_FORMATS:
        raise ValueError(f"{directory}: unknown model format {meta.get('format')!r} "
                         f"(this code reads {', '.join(SUPPORTED_FORMATS)})")
    return meta


@contextlib.contextmanager
def _complete_model(directory):
    """A metadata file lacking a key, or holding a value of the wrong type, as one line naming the model."""
    try:
        yield
    except (KeyError, TypeError, IndexError) as e:
        what = f"no {e.args[0]!r} entry" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise ValueError(f"{directory}: not a complete Vigil model ({what} in metadata.json)") from None


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


def _no_moving_static(proba: np.ndarray, names, X: pd.DataFrame) -> np.ndarray:
    """No "asteroid" type for an alert whose position had detections on an earlier night.

    A lone moving object cannot have been detected at the same place a night before, nor
    several times there (the survey's history at the spot — ZTF's ``jdstarthist`` and
    ``ndethist`` — is someone else's; see :data:`models.score.STATIC_HISTORY`), unless a known
    solar-system object lies within :data:`models.score.KNOWN_SSO_ARCSEC` now. The simulated
    sky never taught this: there, a Galactic source's alert always carried earlier detections in
    its light curve, so the trees told asteroids from stars by that count alone, and real
    stars alerting once in the packet's 30 days despite years of history (35, 278 detections at
    the spot) were typed asteroids. The asteroid's share goes to the other types of its own cell
    (Galactic and slow: a star, a proper-motion star), in proportion, evenly where they hold
    none: the cell never empties, so the raking's margins still hold.
    """
    from models.score import EXTRAGALACTIC_TYPES, FAST_TYPES

    names = list(names)
    if "asteroid" not in names or not len(proba):
        return proba
    j = names.index("asteroid")
    mates = [k for k, t in enumerate(names) if t not in (*EXTRAGALACTIC_TYPES, *FAST_TYPES) and k != j]
    rows = _static_rows(X) & (np.nan_to_num(proba[:, j]) > 0)
    if not mates or not rows.any():
        return proba
    out = proba.copy()
    held = out[np.ix_(rows, mates)]
    total = held.sum(axis=1, keepdims=True)
    share = np.where(total > 0, held / np.where(total > 0, total, 1.0), 1.0 / len(mates))
    out[np.ix_(rows, mates)] = held + share * out[rows, j][:, None]
    out[rows, j] = 0.0
    return out


def _static_rows(X: pd.DataFrame) -> np.ndarray:
    """Alerts with a history at their position and no known solar-system object near (see above).

    Where the survey sends no count of detections at the spot, an earlier first detection alone
    decides.
    """
    from models.score import KNOWN_SSO_ARCSEC, STATIC_AFTER_DAYS, STATIC_HISTORY

    n = X["n_det_history"].to_numpy(float)
    earlier = (X["days_since_first"].to_numpy(float) > STATIC_AFTER_DAYS) & (np.isnan(n) | (n >= 3))
    return (earlier | (n >= STATIC_HISTORY)) & ~(X["ss_distance"].to_numpy(float) <= KNOWN_SSO_ARCSEC)


def _nest_types(proba: np.ndarray, names, p_extragalactic, p_fast, rounds: int = 30) -> np.ndarray:
    """Source-type probabilities made coherent with P(extragalactic) and P(fast).

    The extragalactic types (:data:`models.score.EXTRAGALACTIC_TYPES`) together must hold
    P(extragalactic), the fast ones (:data:`models.score.FAST_TYPES`) P(fast): the type scorer's
    distribution is raked (iterative proportional fitting, ``rounds`` passes) to those two
    margins, which keeps its odds within each of the four cells (extragalactic or not × fast or
    not; every cell has a type). The binary scores are the better-evidenced ones (more labels
    per class, validated under do(seeing)), and a list that said "P(extragalactic) 0.01" beside
    "supernova-like" would contradict itself: on a real Galactic-plane exposure the type scorer
    alone called 31 of 100 variable stars supernova-like. A margin whose types all fall on one
    side is left alone; a side whose types all hold 0 shares its margin evenly; a NaN score
    gives a NaN row.
    """
    from models.score import EXTRAGALACTIC_TYPES, FAST_TYPES

    names = np.asarray(names)
    margins = [(block, np.asarray(p, float)[:, None]) for block, p in
               ((np.isin(names, EXTRAGALACTIC_TYPES), p_extragalactic), (np.isin(names, FAST_TYPES), p_fast))
               if block.any() and not block.all()]
    out = np.asarray(proba, dtype=np.float64).copy()
    for _ in range(rounds if margins else 0):
        for block, p in margins:
            for side, share in ((block, p), (~block, 1.0 - p)):
                part = out[:, side]
                tot = part.sum(axis=1, keepdims=True)
                out[:, side] = np.where(tot > 0, share * part / np.where(tot > 0, tot, 1.0), share / side.sum())
        block, p = margins[0]
        if np.nanmax(np.abs(out[:, block].sum(axis=1, keepdims=True) - p), initial=0.0) < 1e-9:
            break  # (the last margin fitted holds exactly; the first now does too)
    for _, p in margins:
        out[~np.isfinite(p[:, 0])] = np.nan
    return out


# --------------------------------------------------------------------------- alert scorer


class AlertScorer:
    """The trained three-score model the pipeline calls once per micro-batch.

    Parameters
    ----------
    scorers : dict
        ``score name → fitted XGBBinaryScorer``, for every name in :data:`models.score.SCORES`.
    residualiser : causal.adjust.ConditionResidualiser
        Fitted; applied to the intrinsic scores' inputs.
    version : str
        Goes into every annotation as ``model_version``.
    metadata : dict
        Provenance and training diagnostics (saved with the model).
    reduced : dict, optional
        ``score name → fitted XGBBinaryScorer`` trained with every input of
        :data:`models.features.SURVEY_OPTIONAL` blanked. An alert that lacks any of those
        inputs (a survey that does not send a group, a null field) is scored by these; the full
        scorers never saw such alerts in training. Without them, such alerts go to the full scorers.
    types : tuple of XGBTypeScorer, optional
        ``(full, reduced)`` source-type scorers (what a real alert most likely is), reading the
        intrinsic scores' inputs; the reduced one scores the alerts that lack a survey-optional
        input (without it, those alerts get no type). None: no source types (models before
        2026-11-27).
    support : causal.adjust.LabelSupport, optional
        Alert-time label propensities on :data:`SUPPORT_COVARIATES`, per score (and
        :data:`TYPE_SCORE`): which scores of an alert rest on labels that hardly reach alerts
        like it (flagged as extrapolated). None: no flag (models trained before the seventh
        session, 2026-11-27; scores retrained on vetters' decisions are left out of a support).
    """

    def __init__(self, scorers: dict, residualiser, version: str, metadata: dict | None = None,
                 reduced: dict | None = None, types: tuple | None = None, support=None):
        missing = [s for s in SCORES if s not in scorers]
        if missing:
            raise ValueError(f"scorers missing for {missing}")
        if reduced and set(reduced) != set(SCORES):
            raise ValueError(f"reduced scorers for {sorted(reduced)}, not for every score")
        self.scorers = scorers
        self.reduced = reduced or {}
        self.types = tuple(types) if types else None
        if self.types and self.types[1] is not None and list(self.types[0].classes_) != list(self.types[1].classes_):
            raise ValueError("the full and reduced source-type scorers know different types")
        if support is not None and tuple(support.covariates) not in ((), SUPPORT_COVARIATES):
            raise ValueError(f"label support reads {list(support.covariates)}, this code gives "
                             f"{list(SUPPORT_COVARIATES)}; retrain")
        unknown = sorted(set(support.scores) - {*SCORES, TYPE_SCORE}) if support is not None else []
        if unknown:
            raise ValueError(f"label support names unknown scores {unknown}")
        self.support = support
        self.residualiser = residualiser
        self.model_version = version
        self.metadata = metadata or {}
        self._cols = {s: (INTRINSIC_FEATURES if s in INTRINSIC else FEATURES) for s in SCORES}
        self._index = {s: np.array([FEATURES.index(f) for f in self._cols[s]]) for s in SCORES}
        self._blank = {s: np.array([i for i, c in enumerate(self._cols[s]) if c in _OPTIONAL], dtype=int)
                       for s in SCORES}

    def lacking_rows(self, X: pd.DataFrame) -> np.ndarray:
        """Rows that lack any input of :data:`models.features.SURVEY_OPTIONAL` (scored by the reduced scorers).

        A part of a group missing (a null ``elong`` beside a known ``fwhm``) counts too: the
        full scorers never saw one missing and would send it down an arbitrary branch.
        """
        return X[list(_OPTIONAL)].isna().to_numpy().any(axis=1)

    def with_conditions_fitted_on(self, X: pd.DataFrame, source: str = "") -> AlertScorer:
        """A copy whose condition regressions ĝ(z) are refitted on the feature rows ``X``.

        ĝ(z), the typical x at conditions z, needs no labels (science.md §2), so it can come from the survey's
        own stream rather than the simulation the scorers were trained on: where the real
        features depend on the conditions differently from the simulated ones, the
        simulated ĝ leaves (or puts) a seeing dependence in the residuals.

        Parameters
        ----------
        X : pandas.DataFrame
            Feature rows (:data:`models.features.FEATURES`) of unlabelled alerts, at least
            :data:`MIN_CONDITION_ROWS` of them with every condition known.
        source : str
            Where they came from (recorded in the metadata).

        Returns
        -------
        AlertScorer
            The same scorers; version ``<original>+g<data hash>``; metadata ``conditions_fit``.
        """
        from sklearn.base import clone

        r = self.residualiser
        complete = int(np.isfinite(X[[c for c, _ in r.conditions]].to_numpy(float)).all(axis=1).sum())
        if complete < MIN_CONDITION_ROWS:
            raise ValueError(f"{complete} alerts with every condition known; refitting ĝ(z) needs "
                             f"at least {MIN_CONDITION_ROWS}")
        res = clone(r).fit(X[list(FEATURES)])  # same parameters, fitted afresh
        h = data_hash(X[list(FEATURES)])
        base = self.metadata.get("conditions_fit", {}).get("from_version", self.model_version)
        meta = dict(self.metadata, created=None, conditions_fit={"source": source, "n_alerts": len(X),
                                                                 "data_hash": h, "from_version": base},
                    condition_bank=condition_bank(X))  # typical conditions of that survey now
        return AlertScorer(self.scorers, res, f"{base}+g{h[:8]}", meta, reduced=self.reduced, types=self.types,
                           support=self.support)

    def design(self, X: pd.DataFrame) -> dict:
        """Per-score input tables: raw features for P(real), residualised ones for the intrinsic scores."""
        missing = [f for f in FEATURES if f not in X.columns]
        if missing:
            raise ValueError(f"feature table lacks {missing}")
        R = self.residualiser.transform(X[list(FEATURES)])
        return {s: (R if s in INTRINSIC else X)[list(self._cols[s])] for s in SCORES}

    #: XGBoost threads while scoring. A micro-batch of a few hundred rows gains little from
    #: threads, and when the other cores are busy (a service pinned to one core, or sharing the
    #: host) OpenMP barriers cost far more than they save: on 2 busy cores one 500-row DMatrix
    #: took 23 ms with 2 threads against 0.3 ms with 1. Results do not depend on it.
    inference_threads = 1

    def _inference_booster(self, est):
        b = est.booster_
        if getattr(b, "_vigil_nthread", None) != self.inference_threads:
            b.set_param({"nthread": self.inference_threads})
            b._vigil_nthread = self.inference_threads
        return b

    def score(self, X: pd.DataFrame, contributions: bool = True) -> ScoreBatch:
        """Scores (and, by default, contributions) for one batch of feature rows."""
        n, X0 = len(X), X
        thin = self.lacking_rows(X) if self.reduced and n else np.zeros(n, dtype=bool)
        if thin.any():
            # The reduced scorers learnt on residuals taken with every optional input blanked (a
            # blanked condition, the depth, at its median): theirs are taken the same way.
            X = X.copy()
            X.loc[thin, list(_OPTIONAL)] = np.nan
        D = self.design(X)
        # Without the survey's real/bogus score the boosters have no learnt answer: such an
        # alert is unscored (NaN), not given an arbitrary branch's score.
        blind = X[list(MIN_EVIDENCE)].isna().to_numpy().all(axis=1) if n else np.zeros(0, dtype=bool)
        full_rows = ~thin
        probs, contrib = {}, {}
        for s in SCORES:
            A = _as_float32(D[s])
            p = np.zeros(n)
            # Contributions live in the FEATURES space for every score so one explanation
            # routine serves all; a residualised input keeps its feature's name.
            full = np.zeros((n, len(FEATURES))) if contributions else None
            for est, rows in ((self.scorers[s], full_rows), (self.reduced.get(s), thin)):
                if est is None or not rows.any():
                    continue
                self._inference_booster(est)
                B = A[rows]
                if est is not self.scorers[s]:
                    B[:, self._blank[s]] = np.nan  # as in training: the whole group, not a part
                p[rows] = est.calibrator_(est.booster_.inplace_predict(B, predict_type="margin"))
                if contributions:  # in the calibrated score's log-odds where the calibrator is linear
                    full[np.ix_(rows, self._index[s])] = (est.contributions(B, nthread=self.inference_threads)
                                                          * est.calibrator_.slope)
            probs[s] = np.where(blind, np.nan, p)
            if contributions:
                full[blind] = 0.0
                contrib[s] = full
        type_names, type_proba = (), None
        if self.types:
            # The source type is intrinsic too: it reads the intrinsic scores' (residualised) inputs.
            A = _as_float32(D[INTRINSIC[0]])
            type_names = tuple(str(c) for c in self.types[0].classes_)
            type_proba = np.full((n, len(type_names)), np.nan)
            for est, rows in zip(self.types, (full_rows, thin), strict=True):
                if est is None or not rows.any():
                    continue
                self._inference_booster(est)
                B = A[rows]
                if est is not self.types[0]:
                    B[:, self._blank[INTRINSIC[0]]] = np.nan
                type_proba[rows] = est.predict_proba(B)
            type_proba = _no_moving_static(type_proba, type_names, X0)
            type_proba = _nest_types(type_proba, type_names, probs["p_extragalactic"], probs["p_fast"])
            # (again: where every Galactic type held 0, the raking shares that side evenly, the asteroid too)
            type_proba = _no_moving_static(type_proba, type_names, X0)
            type_proba[blind] = np.nan
        relative = tuple(c for c, _ in self.residualiser.columns)
        support, threshold = {}, None
        if self.support is not None and self.support.scores and n:
            # (of the alert as it came: a blanked depth is a survey's lack, not this alert's)
            support = {s: np.where(blind, np.nan, e) for s, e in self.support.propensity(support_covariates(X0)).items()
                       if s != TYPE_SCORE or type_proba is not None}
            for s in self.support.full_only:  # (their reduced scorer learnt from other labels since)
                if s in support:
                    support[s][thin] = np.nan
            threshold = self.support.threshold
        return ScoreBatch(probs["p_real"], probs["p_extragalactic"], probs["p_fast"], tuple(FEATURES), contrib,
                          self.model_version, {s: relative for s in INTRINSIC}, type_names, type_proba,
                          support, threshold)

    def standardised_scores(self, X: pd.DataFrame) -> dict | None:
        """Scores under typical conditions: each averaged over the model's reference bank of conditions.

        The backdoor formula of science.md §2 (estimator 3): the alert's features are kept and
        its observing conditions are replaced by each of the bank's rows (drawn from the training
        stream) in turn. A display of what the scores would read in typical conditions, beside
        the scores themselves; never a ranking score. Conditions an alert lacks stay missing (a
        survey that sends no depth must still go to the reduced scorers).

        Parameters
        ----------
        X : pandas.DataFrame
            Feature rows (:data:`models.features.FEATURES`).

        Returns
        -------
        dict or None
            ``{score: array}`` (NaN for unscored rows), or None for a model saved without a bank.
        """
        bank = self.metadata.get("condition_bank")
        if not bank or not bank.get("rows") or not len(X):
            return None
        Z = np.asarray(bank["rows"], dtype=float)
        n, k = len(X), len(Z)
        R = pd.concat([X[list(FEATURES)]] * k, ignore_index=True)
        for j, c in enumerate(bank["columns"]):
            have = R[c].notna().to_numpy()
            R.loc[have, c] = np.repeat(Z[:, j], n)[have]
        sb = self.score(R, contributions=False)
        return {s: np.asarray(getattr(sb, s), dtype=float).reshape(k, n).mean(axis=0) for s in SCORES}

    def save(self, directory) -> Path:
        """Write boosters (UBJSON) and ``metadata.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = dict(self.metadata)
        meta.update({
            "format": FORMAT, "kind": "alert", "version": self.model_version,
            "created": meta.get("created") or _now(), "features": list(FEATURES),
            "conditions": list(CONDITIONS), "intrinsic_features": list(INTRINSIC_FEATURES),
            "scores": {s: _save_scorer(self.scorers[s], directory / f"{s}.ubj") for s in SCORES},
            "classes": CLASSES, "residualiser": self.residualiser.to_json(),
            "xgboost_version": xgboost_version(),
        })
        if self.reduced:
            meta["reduced"] = {"blanked": [list(g) for g in SURVEY_OPTIONAL],
                               "scores": {s: _save_scorer(self.reduced[s], directory / f"{s}.reduced.ubj")
                                          for s in SCORES}}
        else:
            meta.pop("reduced", None)
        if self.types:
            meta["source_types"] = {"full": _save_type_scorer(self.types[0], directory / "source_type.ubj")}
            if self.types[1] is not None:
                meta["source_types"]["reduced"] = _save_type_scorer(self.types[1],
                                                                    directory / "source_type.reduced.ubj")
        else:
            meta.pop("source_types", None)
        if self.support is not None:
            meta["label_support"] = dict(self.support.to_json(), covariates=list(SUPPORT_COVARIATES),
                                         definition=SUPPORT_DEFINITION)
        else:
            meta.pop("label_support", None)
        (directory / "metadata.json").write_text(json.dumps(meta, indent=1, default=_json_default))
        return directory

    @classmethod
    def load(cls, directory) -> AlertScorer:
        """Read a model directory, refusing unknown formats and feature mismatches."""
        from causal.adjust import ConditionResidualiser, LabelSupport

        directory = Path(directory)
        meta = _read_metadata(directory)
        if meta.get("kind") != "alert":
            raise ValueError(f"{directory}: a model of kind {meta.get('kind')!r}, not an alert scorer")
        if tuple(meta.get("features", ())) != tuple(FEATURES):
            theirs, ours = meta.get("features", []), list(FEATURES)
            diff = sorted(set(theirs) ^ set(ours)) or "same names, different order"
            raise ValueError(f"{directory}: model features do not match this code's FEATURES ({diff}); "
                             "retrain with `vigil train`")
        if tuple(meta.get("intrinsic_features", ())) != tuple(INTRINSIC_FEATURES):
            raise ValueError(f"{directory}: intrinsic-score inputs differ from this code's; retrain")
        if "classes" in meta and meta["classes"] != CLASSES:
            raise ValueError(f"{directory}: score classes {meta['classes']} differ from this code's {CLASSES}")
        names = {s: INTRINSIC_FEATURES if s in INTRINSIC else FEATURES for s in SCORES}
        with _complete_model(directory):
            scorers = {s: _load_scorer(meta["scores"][s], directory, names[s]) for s in SCORES}
            reduced = None
            if "reduced" in meta:
                if [list(g) for g in SURVEY_OPTIONAL] != meta["reduced"]["blanked"]:
                    raise ValueError(f"{directory}: reduced scorers blank {meta['reduced']['blanked']}, this "
                                     f"code's survey-optional inputs are {[list(g) for g in SURVEY_OPTIONAL]}; "
                                     "retrain")
                reduced = {s: _load_scorer(meta["reduced"]["scores"][s], directory, names[s]) for s in SCORES}
            for est in [*scorers.values(), *(reduced or {}).values()]:
                est.tree_shap()  # the explanations' tables, built at start rather than in the first batch
            types = None
            if "source_types" in meta:
                st = meta["source_types"]
                types = (_load_type_scorer(st["full"], directory, INTRINSIC_FEATURES),
                         _load_type_scorer(st["reduced"], directory, INTRINSIC_FEATURES) if "reduced" in st
                         else None)
            support = None
            if "label_support" in meta:
                ls = meta["label_support"]
                if ls.get("covariates") != list(SUPPORT_COVARIATES) or ls.get("definition") != SUPPORT_DEFINITION:
                    raise ValueError(f"{directory}: label support reads {ls.get('covariates')} (definition "
                                     f"{ls.get('definition')}), this code gives {list(SUPPORT_COVARIATES)} "
                                     f"(definition {SUPPORT_DEFINITION}); retrain")
                support = LabelSupport.from_json(ls)
            return cls(scorers, ConditionResidualiser.from_json(meta["residualiser"]), meta["version"], meta,
                       reduced=reduced, types=types, support=support)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load(directory):
    """Load any Vigil model directory (alert scorer or table scorer)."""
    meta = _read_metadata(directory)
    return TableScorer.load(directory) if meta.get("kind") == "table" else AlertScorer.load(directory)


def default_scorer():
    """The shipped default model.

    Raises
    ------
    ValueError
        If it is missing or does not fit this code (an install without its files, a model left
        from another version). Annotating on regardless — with the placeholder rule, as until
        2026-11-27 — wrote "scored" annotations of a rule, noticed only by a warning in the log
        and ``model_version "none"``; the rule (:class:`models.score.PlaceholderScorer`) is
        still there for whoever asks for it in code.
    """
    try:
        return AlertScorer.load(DEFAULT_MODEL_DIR)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"the shipped model does not load ({e}); reinstall Vigil, or name a model trained "
                         "by `vigil train` (--model DIR; scoring.model in a service's config)") from None


# --------------------------------------------------------------------------- table scorer


class TableScorer:
    """One calibrated score on the numeric columns of a labelled feature table.

    Parameters
    ----------
    estimator : XGBBinaryScorer
        Fitted on a DataFrame (its ``feature_names_in_`` are the table columns used).
    version : str
    metadata : dict
    """

    def __init__(self, estimator: XGBBinaryScorer, version: str, metadata: dict | None = None):
        self.estimator = estimator
        self.model_version = version
        self.metadata = metadata or {}

    @property
    def features(self) -> tuple:
        return tuple(self.estimator.feature_names_in_)

    def predict(self, table: pd.DataFrame) -> np.ndarray:
        """Calibrated probability of the positive class for each row."""
        missing = [c for c in self.features if c not in table.columns]
        if missing:
            raise ValueError(f"table lacks the model's feature columns {missing}")
        return self.estimator.predict_proba(numeric_table(table[list(self.features)]))[:, 1]

    def save(self, directory) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = dict(self.metadata)
        meta.update({"format": FORMAT, "kind": "table", "version": self.model_version,
                     "created": meta.get("created") or _now(), "features": list(self.features),
                     "scores": {"score": _save_scorer(self.estimator, directory / "score.ubj")}})
        (directory / "metadata.json").write_text(json.dumps(meta, indent=1, default=_json_default))
        return directory

    @classmethod
    def load(cls, directory) -> TableScorer:
        directory = Path(directory)
        meta = _read_metadata(directory)
        if meta.get("kind") != "table":
            raise ValueError(f"{directory}: a model of kind {meta.get('kind')!r}, not a table scorer")
        with _complete_model(directory):
            est = _load_scorer(meta["scores"]["score"], directory, meta["features"])
            return cls(est, meta["version"], meta)


_TRUE, _FALSE = {"true", "t", "yes"}, {"false", "f", "no"}


def as_number_column(col: pd.Series) -> pd.Series | None:
    """A text column read as numbers (booleans as 0/1, blanks as missing), or None if it is text.

    Parameters
    ----------
    col : pandas.Series
        A column that pandas did not read as numbers (a blank turns True/False into text).

    Returns
    -------
    pandas.Series or None
        Floats (NaN where blank), or None for a column of text (at most 90 % numbers).

    Raises
    ------
    ValueError
        Naming the column, the count and the first bad value, when most of its values are
        numbers but some are not: a typo would otherwise drop the whole column from a model,
        or fail scoring without a name.
    """
    text = col.astype("string").str.strip()
    filled = text.notna() & (text != "")
    if not filled.any():
        return None
    low = text[filled].str.lower()
    if low.isin(_TRUE | _FALSE).all():  # True/False with blanks: pandas leaves it as text
        return pd.Series(np.where(filled, text.str.lower().isin(_TRUE), np.nan), index=col.index, dtype=float)
    num = pd.to_numeric(text.where(filled), errors="coerce")
    bad = filled & num.isna()
    if not bad.any():
        return num.astype(float)
    if bad.sum() <= 0.1 * filled.sum():
        # The row as the table has it (its index: a file's data rows from 0), not a filtered view's position.
        at = col.index[int(np.flatnonzero(bad.to_numpy())[0])]
        where = f"data row {int(at) + 1}" if isinstance(at, (int, np.integer)) else f"row {at!r}"
        raise ValueError(f"column {col.name!r}: {int(bad.sum())} value(s) are not numbers (e.g. "
                         f"{text[bad].iloc[0]!r} in {where}); fix them, or drop the column")
    return None


def numeric_table(df: pd.DataFrame) -> pd.DataFrame:
    """Numeric view of a feature table: booleans become 0/1, everything as float."""
    out = df.copy()
    for c in out.columns:
        if out[c].dtype == bool or str(out[c].dtype) == "boolean":
            out[c] = out[c].astype(float)
        elif not pd.api.types.is_numeric_dtype(out[c]):
            num = as_number_column(out[c])
            if num is None:
                raise ValueError(f"column {c!r} holds text, not numbers")
            out[c] = num
    # ±inf is no measurement: as missing (XGBoost refuses it in training, and would read it
    # as a huge value when scoring).
    return out.astype(float).replace([np.inf, -np.inf], np.nan)

"""Causal adjustment for the alert scorers (science.md §2): feature residualisation and IPW.

Assumed causal graph
--------------------
::

    C (class: real?, extragalactic?, fast?) ───────────────► X (features measured on the alert)
         │                                                  ▲   ▲
         └──► S (source brightness, host, position) ────────┘   │
                   │                                            │
    B (galactic latitude, extinction) ──► C, S, X               │
                                                                │
    Z (observing conditions: seeing, airmass, depth, moon) ─────┘
         │
         └──► R (detected / bogus artefact)   ──► L (labelled: someone followed it up)
    S, Z, later data ───────────────────────────► L

* Classification is anticausal: the class C causes the features X; the observing
  conditions Z are a second parent of X (the PSF width, the S/N, the survey's own
  real/bogus score, positional scatter all move with seeing and depth) but Z does not
  cause C. Z includes the conditions of the exposures the history was detected in (their
  median seeing), not only tonight's: history features such as the positional scatter
  were measured there. A scorer that reads X therefore mixes the class signal with Z, and its
  population-mean score moves under do(Z). For the *intrinsic* classes (extragalactic,
  fast) we remove the Z → X path: each condition-sensitive feature x_k is replaced by
  x_k − ĝ_k(z), with ĝ_k(z) the typical x_k at conditions z (a conditional median: the
  mean would follow the artefacts, whose share grows with seeing; see
  :class:`ConditionResidualiser`) fitted on all alerts (labels are not needed,
  so the full stream is used), K-fold cross-fitted at training time so that no row's
  residual comes from a regression that saw that row (double-ML style). The scorer
  then never sees Z itself.
* Galactic latitude / extinction B is a real common cause of class and features:
  it stays an input (adjusting it away would remove real information).
* Z → R is real: bad seeing really produces more bogus detections, so P(real) is *not*
  made invariant; it keeps Z as an input and is calibrated within condition strata.
* L (labelling) depends on observables (brightness, conditions, later data, catalogue
  membership), not on C given those (selection on observables). Inverse-propensity
  weights 1/ê(v), ê(v) = P(L=1 | v) fitted on all alerts, make the labelled set stand
  in for the whole stream. Alerts with ê < 0.01 are outside the labelled support: in
  training their weights are clipped; when an alert is scored, before its later data
  exist, :class:`LabelSupport` judges the same with ê_now = P(L=1 | what is known now) and
  flags its scores as extrapolated.

Everything here is plain numpy/scikit-learn; every fitted quantity serialises to JSON
arrays and coefficients (never pickle).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import KFold

#: Propensities below this are outside the labelled support (flagged, and clipped).
EXTRAPOLATION_THRESHOLD = 0.01

_TRANSFORMS = ("identity", "log", "logit")


def _forward(x: np.ndarray, kind: str) -> np.ndarray:
    """Map a feature to the space where its dependence on z is (close to) additive."""
    x = np.asarray(x, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "log":
            return np.where(x > 0, np.log(np.where(x > 0, x, 1.0)), np.nan)
        if kind == "logit":
            p = np.clip(x, 1e-4, 1 - 1e-4)
            return np.where(np.isfinite(x), np.log(p / (1 - p)), np.nan)
    return x


def _design(Z: np.ndarray, degree: int) -> np.ndarray:
    """Polynomial basis of standardised conditions: 1, z_i, and (degree 2) z_i·z_j for i ≤ j."""
    cols = [np.ones(len(Z))] + [Z[:, i] for i in range(Z.shape[1])]
    if degree >= 2:
        for i in range(Z.shape[1]):
            for j in range(i, Z.shape[1]):
                cols.append(Z[:, i] * Z[:, j])
    return np.column_stack(cols)


@dataclass(frozen=True)
class _ZScaler:
    """Median imputation + standardisation of the conditions (with their transforms)."""

    transforms: tuple
    median: np.ndarray
    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, Z: np.ndarray, transforms: tuple) -> _ZScaler:
        T = np.column_stack([_forward(Z[:, i], transforms[i]) for i in range(Z.shape[1])])
        med = np.array([np.nanmedian(c) if np.isfinite(c).any() else 0.0 for c in T.T])
        T = np.where(np.isfinite(T), T, med)
        sd = T.std(axis=0)
        return cls(tuple(transforms), med, T.mean(axis=0), np.where(sd > 0, sd, 1.0))

    def __call__(self, Z: np.ndarray) -> np.ndarray:
        T = np.column_stack([_forward(Z[:, i], self.transforms[i]) for i in range(Z.shape[1])])
        T = np.where(np.isfinite(T), T, self.median)
        return (T - self.mean) / self.scale


def _ridge(P: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """Ridge coefficients (intercept unpenalised) by the normal equations."""
    pen = alpha * np.eye(P.shape[1])
    pen[0, 0] = 0.0
    return np.linalg.solve(P.T @ P + pen, P.T @ y)


def _ridge_median(P: np.ndarray, y: np.ndarray, alpha: float, iters: int = 30) -> np.ndarray:
    """Ridge-penalised least-absolute-deviation coefficients: a conditional median.

    ``iters`` rounds of iteratively reweighted least squares from the least-squares start
    (a fixed number, so that a model retrains to the same coefficients; on the 48-quadrant
    training stream they are within 2e-4 of the fully converged ones). A fit whose last
    round still moved a coefficient by more than 1e-3 (relative) warns: that happens on
    small refits. Residuals are floored at 5 % of their median absolute deviation (and a
    tiny fraction of the data's scale) so that the weights stay finite. The penalty is
    scaled by the mean weight, so equal weights give :func:`_ridge` exactly and the fit
    does not depend on the data's units; the ridge strength is then α·mean(1/|r|).
    """
    b = _ridge(P, y, alpha)
    r = y - P @ b
    floor = max(0.05 * float(np.median(np.abs(r - np.median(r)))), 1e-9 * (1.0 + float(np.max(np.abs(y)))))
    pen = alpha * np.eye(P.shape[1])
    pen[0, 0] = 0.0
    moved = 0.0
    for _ in range(iters):
        w = 1.0 / np.maximum(np.abs(r), floor)
        Pw = P * w[:, None]
        b_new = np.linalg.solve(P.T @ Pw + pen * w.mean(), Pw.T @ y)
        moved = float(np.max(np.abs(b_new - b)))
        b, r = b_new, y - P @ b_new
    if moved > 1e-3 * (1.0 + float(np.max(np.abs(b)))):
        warnings.warn(f"median regression of ĝ(z) still moving after {iters} rounds (last move {moved:.2g}); "
                      "too few or too scattered alerts?", ConvergenceWarning, stacklevel=2)
    return b


#: Regression of ĝ(z): conditional median or mean.
_LOSSES = {"absolute": _ridge_median, "squared": _ridge}


class ConditionResidualiser(TransformerMixin, BaseEstimator):
    """Replace condition-sensitive features by their residual on the observing conditions.

    For each column k in ``columns`` (after its transform: ``log`` for positive scale-like
    quantities, ``logit`` for scores in (0, 1)), fit ĝ_k(z), the typical t(x_k) at
    conditions z, as a ridge regression on a polynomial basis of the standardised
    conditions, and output t(x_k) − ĝ_k(z). Rows where x_k is missing stay missing;
    missing conditions are imputed by their training median.

    ``loss="absolute"`` (the default) makes ĝ a conditional *median* rather than the mean
    E[t(x_k) | z] of science.md §2. Why: the stream mixes real sources with artefacts, and
    the artefacts' share grows with seeing, so the mean follows that share and moves the
    residuals of real sources with seeing, the opposite of its purpose. On the 48-quadrant
    training stream the mean regression gave log elongation +0.39 per unit of log seeing
    (simulated real sources: none), and on real ZTF alerts the shipped model's P(fast) then
    followed the seeing by +0.022 per ″; the median gives +0.04 and +0.004 (nearly all of
    the change in the term of the history's seeing). The median resists the artefacts
    while real sources dominate the stream it is fitted on; its bias still grows with their
    share.

    Parameters
    ----------
    columns : tuple of (name, transform)
        Features to residualise, with transform ``"identity"``, ``"log"`` or ``"logit"``.
    conditions : tuple of (name, transform)
        Condition columns z (e.g. ``("seeing", "log")``).
    degree : {1, 2}
        Polynomial degree of the basis in z.
    alpha : float
        Ridge penalty on the standardised basis.
    n_splits : int
        Folds for cross-fitting in :meth:`fit_transform`.
    random_state : int
        Seed of the fold assignment.
    loss : {"absolute", "squared"}
        Conditional median (robust to the seeing-dependent share of artefacts) or mean.

    Attributes
    ----------
    scaler_ : _ZScaler
        Imputation and standardisation of z.
    coef_ : ndarray, shape (n_columns, n_basis)
        Full-data regression coefficients (what :meth:`transform` uses).
    fold_ids_ : ndarray
        Fold of each row in the last :meth:`fit_transform` (cross-fitting audit).
    """

    def __init__(self, columns=(), conditions=(), degree: int = 2, alpha: float = 1.0, n_splits: int = 5,
                 random_state: int = 0, loss: str = "absolute"):
        self.columns = columns
        self.conditions = conditions
        self.degree = degree
        self.alpha = alpha
        self.n_splits = n_splits
        self.random_state = random_state
        self.loss = loss

    # -- helpers ------------------------------------------------------------------

    def _check(self):
        if self.loss not in _LOSSES:
            raise ValueError(f"unknown loss {self.loss!r} (use one of {tuple(_LOSSES)})")
        for _, t in tuple(self.columns) + tuple(self.conditions):
            if t not in _TRANSFORMS:
                raise ValueError(f"unknown transform {t!r} (use one of {_TRANSFORMS})")

    def _zx(self, X: pd.DataFrame):
        missing = [n for n, _ in tuple(self.columns) + tuple(self.conditions) if n not in X.columns]
        if missing:
            raise ValueError(f"residualiser needs columns {missing}")
        Z = X[[n for n, _ in self.conditions]].to_numpy(float)
        T = np.column_stack([_forward(X[n].to_numpy(float), t) for n, t in self.columns]) if self.columns \
            else np.empty((len(X), 0))
        return Z, T

    @staticmethod
    def _fit_arrays(Z, T, transforms, degree, alpha, loss):
        scaler = _ZScaler.fit(Z, transforms)
        P = _design(scaler(Z), degree)
        coef = np.zeros((T.shape[1], P.shape[1]))
        for k in range(T.shape[1]):
            ok = np.isfinite(T[:, k])
            if ok.sum() > P.shape[1]:
                coef[k] = _LOSSES[loss](P[ok], T[ok, k], alpha)
            elif ok.any():
                # too few rows for a regression: remove the typical value only
                coef[k, 0] = np.median(T[ok, k]) if loss == "absolute" else T[ok, k].mean()
        return scaler, coef

    def _residual(self, X, scaler, coef) -> pd.DataFrame:
        Z, T = self._zx(X)
        G = _design(scaler(Z), self.degree) @ coef.T
        out = X.copy()
        for k, (name, _) in enumerate(self.columns):
            out[name] = T[:, k] - G[:, k]
        return out

    # -- estimator API ------------------------------------------------------------

    def fit(self, X: pd.DataFrame, y=None):
        """Fit ĝ on all rows of ``X`` (labels are not used)."""
        self._check()
        Z, T = self._zx(X)
        self.scaler_, self.coef_ = self._fit_arrays(Z, T, tuple(t for _, t in self.conditions), self.degree,
                                                    self.alpha, self.loss)
        self.n_features_in_ = X.shape[1]
        return self

    def transform(self, X: pd.DataFrame) -> pd.DataFrame:
        """Residualise with the full-data fit (inference)."""
        return self._residual(X, self.scaler_, self.coef_)

    def fit_transform(self, X: pd.DataFrame, y=None, **fit_params) -> pd.DataFrame:
        """Cross-fitted residuals: row i's residual comes from a fit that excluded i's fold.

        Also fits the full-data regression used later by :meth:`transform`.
        """
        self._check()
        self.fit(X)
        return self.cross_fitted(X)

    def cross_fitted(self, X: pd.DataFrame, applied_to: pd.DataFrame | None = None) -> pd.DataFrame:
        """Cross-fitted residuals of ``applied_to`` (default ``X``), each row's ĝ fitted on ``X``
        without that row's fold.

        ``applied_to`` is ``X`` with some inputs blanked, as a survey that lacks them sends its
        alerts: the scorers for such alerts must learn from the residuals they will be given
        (a blanked condition is imputed at its median, at training as at scoring).
        """
        A = X if applied_to is None else applied_to
        n = len(X)
        k = min(self.n_splits, n)
        if k < 2:
            self.fold_ids_ = np.zeros(n, int)
            return self.transform(A)
        fold_ids = np.empty(n, int)
        out = A.copy()
        for name, _ in self.columns:  # residuals are floats, whatever the column held (a count, say)
            out[name] = out[name].astype(float)
        Z, T = self._zx(X)
        Za, Ta = (Z, T) if applied_to is None else self._zx(A)
        trans = tuple(t for _, t in self.conditions)
        for f, (tr, te) in enumerate(KFold(k, shuffle=True, random_state=self.random_state).split(X)):
            fold_ids[te] = f
            scaler, coef = self._fit_arrays(Z[tr], T[tr], trans, self.degree, self.alpha, self.loss)
            G = _design(scaler(Za[te]), self.degree) @ coef.T
            for j, (name, _) in enumerate(self.columns):
                out.iloc[te, out.columns.get_loc(name)] = Ta[te, j] - G[:, j]
        self.fold_ids_ = fold_ids
        return out

    # -- plain-JSON persistence ---------------------------------------------------

    def to_json(self) -> dict:
        """Parameters and fitted coefficients as plain JSON types."""
        return {
            "columns": [list(c) for c in self.columns], "conditions": [list(c) for c in self.conditions],
            "degree": self.degree, "alpha": self.alpha, "n_splits": self.n_splits,
            "random_state": self.random_state, "loss": self.loss,
            "z_median": self.scaler_.median.tolist(), "z_mean": self.scaler_.mean.tolist(),
            "z_scale": self.scaler_.scale.tolist(), "coef": self.coef_.tolist(),
        }

    @classmethod
    def from_json(cls, d: dict) -> ConditionResidualiser:
        """Inverse of :meth:`to_json`."""
        # Models saved before the loss was a parameter were fitted by least squares.
        r = cls(tuple(tuple(c) for c in d["columns"]), tuple(tuple(c) for c in d["conditions"]), int(d["degree"]),
                float(d["alpha"]), int(d["n_splits"]), int(d["random_state"]), d.get("loss", "squared"))
        r._check()
        r.scaler_ = _ZScaler(tuple(t for _, t in r.conditions), np.asarray(d["z_median"], float),
                             np.asarray(d["z_mean"], float), np.asarray(d["z_scale"], float))
        coef = np.asarray(d["coef"], float)
        k = len(r.conditions)
        n_terms = 1 + k + (k * (k + 1) // 2 if r.degree >= 2 else 0)  # the columns of _design
        if coef.size != len(r.columns) * n_terms:
            raise ValueError(f"residualiser: {coef.size} coefficients for {len(r.columns)} columns × "
                             f"{n_terms} terms")
        r.coef_ = coef.reshape(len(r.columns), n_terms)
        return r


# --------------------------------------------------------------------------- IPW


def effective_sample_size(w) -> float:
    """Kish effective sample size (Σw)² / Σw²."""
    w = np.asarray(w, dtype=float)
    s2 = float(np.sum(w**2))
    return float(np.sum(w) ** 2 / s2) if s2 > 0 else 0.0


def standardised_mean_differences(V: pd.DataFrame, labelled, weights=None) -> dict:
    """SMD of each covariate between the (weighted) labelled set and the whole population.

    ``(mean_labelled_w − mean_all) / sqrt((var_labelled + var_all) / 2)``, NaN-aware;
    |SMD| < 0.1 is the usual balance criterion.
    """
    lab = np.asarray(labelled, bool)
    w = np.ones(int(lab.sum())) if weights is None else np.asarray(weights, float)
    out = {}
    for c in V.columns:
        x = V[c].to_numpy(float)
        xa, xl = x[np.isfinite(x)], x[lab]
        ok = np.isfinite(xl)
        if ok.sum() < 2 or len(xa) < 2:
            out[c] = float("nan")
            continue
        ml = float(np.average(xl[ok], weights=w[ok])) if w[ok].sum() > 0 else float("nan")
        sd = np.sqrt((np.var(xl[ok]) + np.var(xa)) / 2)
        out[c] = float((ml - xa.mean()) / sd) if sd > 0 else 0.0
    return out


@dataclass(frozen=True)
class IPWDiagnostics:
    """What the weighting achieved; all plain numbers (JSON-ready via :meth:`to_json`)."""

    n_all: int
    n_labelled: int
    ess: float
    ess_fraction: float
    n_extrapolated: int  # alerts (of all) with ê below the threshold
    fraction_extrapolated: float
    max_weight: float
    smd_before: dict
    smd_after: dict

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class PropensityWeighter(BaseEstimator):
    """Inverse-propensity weights for label selection.

    ê(v) = P(labelled | v) by an L2 logistic regression on standardised covariates
    (missing values imputed by the median, with a missing-indicator column), fitted on
    all alerts. Weights of labelled alerts are stabilised, ``w = P(L=1) / ê``, with ê
    clipped below at ``min_propensity`` (:meth:`diagnostics` counts those alerts as extrapolated) and
    the weights truncated at their ``max_quantile`` quantile.

    Parameters
    ----------
    C : float
        Inverse L2 strength of the logistic regression.
    min_propensity : float
    max_quantile : float

    Attributes
    ----------
    mean_, scale_, median_ : ndarray
        Covariate preprocessing.
    coef_, intercept_ : ndarray, float
        Logistic-regression coefficients (on the preprocessed covariates).
    columns_ : tuple
    base_rate_ : float
        P(L=1) on the fit data (the stabiliser).
    """

    def __init__(self, C: float = 1.0, min_propensity: float = EXTRAPOLATION_THRESHOLD, max_quantile: float = 0.99):
        self.C = C
        self.min_propensity = min_propensity
        self.max_quantile = max_quantile

    def _prep(self, V) -> np.ndarray:
        # (an array is taken to hold columns_ in order: LabelSupport converts a batch once for its models)
        X = V[list(self.columns_)].to_numpy(float) if isinstance(V, pd.DataFrame) else np.asarray(V, float)
        miss = ~np.isfinite(X)
        X = np.where(miss, self.median_, X)
        return np.column_stack([(X - self.mean_) / self.scale_, miss[:, self.miss_cols_].astype(float)])

    def fit(self, V: pd.DataFrame, labelled):
        from sklearn.linear_model import LogisticRegression

        lab = np.asarray(labelled, bool)
        self.columns_ = tuple(V.columns)
        X = V.to_numpy(float)
        miss = ~np.isfinite(X)
        self.median_ = np.array([np.nanmedian(c) if np.isfinite(c).any() else 0.0 for c in X.T])
        X = np.where(miss, self.median_, X)
        self.mean_ = X.mean(axis=0)
        sd = X.std(axis=0)
        self.scale_ = np.where(sd > 0, sd, 1.0)
        self.miss_cols_ = np.flatnonzero(miss.any(axis=0) & ~miss.all(axis=0))
        lr = LogisticRegression(C=self.C, max_iter=2000).fit(self._prep(V), lab)
        self.coef_, self.intercept_ = lr.coef_.ravel(), float(lr.intercept_[0])
        self.base_rate_ = float(lab.mean())
        return self

    def propensity(self, V) -> np.ndarray:
        """ê(v) for every row (unclipped); ``V`` a frame with :attr:`columns_`, or an array of them in order."""
        eta = self._prep(V) @ self.coef_ + self.intercept_
        return 1.0 / (1.0 + np.exp(-eta))

    def weights(self, V: pd.DataFrame) -> np.ndarray:
        """Stabilised, clipped weights for the rows of ``V`` (meant for the labelled ones)."""
        e = np.clip(self.propensity(V), self.min_propensity, 1.0)
        w = self.base_rate_ / e
        return np.minimum(w, np.quantile(w, self.max_quantile)) if len(w) else w

    def diagnostics(self, V: pd.DataFrame, labelled) -> IPWDiagnostics:
        """ESS, extrapolation count and covariate balance before/after weighting."""
        lab = np.asarray(labelled, bool)
        e = self.propensity(V)
        w = self.weights(V[lab])
        ess = effective_sample_size(w)
        n_ext = int((e < self.min_propensity).sum())
        return IPWDiagnostics(
            n_all=len(V), n_labelled=int(lab.sum()), ess=ess, ess_fraction=ess / max(int(lab.sum()), 1),
            n_extrapolated=n_ext, fraction_extrapolated=n_ext / max(len(V), 1),
            max_weight=float(w.max()) if len(w) else 0.0,
            smd_before=standardised_mean_differences(V, lab), smd_after=standardised_mean_differences(V, lab, w),
        )

    def to_json(self) -> dict:
        """Fitted coefficients as plain JSON types (for the model's audit record)."""
        return {"columns": list(self.columns_), "median": self.median_.tolist(), "mean": self.mean_.tolist(),
                "scale": self.scale_.tolist(), "missing_indicators": self.miss_cols_.tolist(),
                "coef": self.coef_.tolist(), "intercept": self.intercept_, "base_rate": self.base_rate_,
                "min_propensity": self.min_propensity, "max_quantile": self.max_quantile, "C": self.C}

    @classmethod
    def from_json(cls, d: dict) -> PropensityWeighter:
        """Inverse of :meth:`to_json`, refusing coefficient counts that do not fit the columns."""
        pw = cls(C=d["C"], min_propensity=d["min_propensity"], max_quantile=d["max_quantile"])
        pw.columns_ = tuple(d["columns"])
        pw.median_, pw.mean_, pw.scale_ = (np.asarray(d[k], dtype=float) for k in ("median", "mean", "scale"))
        pw.miss_cols_ = np.asarray(d["missing_indicators"], dtype=int)
        pw.coef_, pw.intercept_, pw.base_rate_ = np.asarray(d["coef"], dtype=float), float(d["intercept"]), \
            float(d["base_rate"])
        k = len(pw.columns_)
        if not (len(pw.median_) == len(pw.mean_) == len(pw.scale_) == k and len(pw.coef_) == k + len(pw.miss_cols_)
                and all(0 <= j < k for j in pw.miss_cols_)):
            raise ValueError(f"propensity model: {len(pw.coef_)} coefficients do not fit {k} covariates "
                             f"and {len(pw.miss_cols_)} missing indicators")
        numbers = np.r_[pw.median_, pw.mean_, pw.scale_, pw.coef_, pw.intercept_, pw.base_rate_]
        if not np.isfinite(numbers).all() or (pw.scale_ <= 0).any():
            raise ValueError("propensity model: coefficients that are not finite, or a scale ≤ 0")
        return pw


@dataclass(frozen=True)
class LabelSupport:
    """Whether the labels behind each score reach an alert, judged when it is scored.

    The weights' ê(v) conditions on later data an alert does not have yet, so the flag of
    science.md §2 ("ê < 0.01: extrapolated") is taken from a second propensity model per label
    set, fitted on all training alerts with only what is known at alert time (its brightness,
    conditions, a catalogued star under it): ê_now = P(labelled | what is known now), the
    later data averaged out. Below ``threshold`` the training labels hardly reach alerts like
    this one, and a score learnt from them is an extrapolation (flagged, not changed).

    ê_now estimates the share of alerts *like this one in those covariates* that were labelled,
    by a straight-line logistic: it says "fainter (or in worse seeing) than the labels", not
    that the score's own inputs had labels near them.

    Parameters
    ----------
    models : dict
        Label set name (e.g. ``"followed_up"``) → fitted :class:`PropensityWeighter` on the
        alert-time covariates.
    scores : dict
        Score name → the label set it learnt from; a score absent has no flag (its labels came
        from elsewhere, such as vetters' decisions).
    threshold : float
    full_only : tuple
        Scores whose flag holds only for the alerts their *full* scorer scores: their reduced
        scorer (alerts lacking a survey-optional input) learnt from other labels since.
    """

    models: dict
    scores: dict
    threshold: float = EXTRAPOLATION_THRESHOLD
    full_only: tuple = ()

    def __post_init__(self):
        unknown = sorted(set(self.scores.values()) - set(self.models))
        if unknown:
            raise ValueError(f"label support: scores learnt from label sets without a propensity model: {unknown}")
        cols = {m.columns_ for m in self.models.values()}
        if len(cols) > 1:
            raise ValueError("label support: the propensity models read different covariates")

    @property
    def covariates(self) -> tuple:
        return next(iter(self.models.values())).columns_ if self.models else ()

    def propensity(self, V: pd.DataFrame) -> dict:
        """Score name → ê_now of each row of ``V`` (the alert-time covariates)."""
        A = V[list(self.covariates)].to_numpy(float)  # once for every model (they read the same columns)
        by_set = {name: m.propensity(A) for name, m in self.models.items() if name in self.scores.values()}
        return {s: by_set[name] for s, name in self.scores.items()}

    def without(self, scores, reduced=()) -> LabelSupport:
        """The support after some scorers learnt from other labels (vetters' decisions).

        ``scores``: no longer flagged at all (their full scorers changed); ``reduced``: flagged
        only where their full scorer scores (their reduced scorer changed).
        """
        drop = set(scores)
        keep = {s: m for s, m in self.scores.items() if s not in drop}
        full_only = tuple(s for s in keep if s in set(self.full_only) | set(reduced))
        return LabelSupport({n: m for n, m in self.models.items() if n in keep.values()}, keep, self.threshold,
                            full_only)

    def to_json(self) -> dict:
        return {"threshold": self.threshold, "scores": dict(self.scores), "full_only": list(self.full_only),
                "models": {n: m.to_json() for n, m in self.models.items()}}

    @classmethod
    def from_json(cls, d: dict) -> LabelSupport:
        try:
            threshold = float(d["threshold"])
            models = {n: PropensityWeighter.from_json(m) for n, m in d["models"].items()}
            scores, full_only = dict(d["scores"]), tuple(d.get("full_only", ()))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"label support: malformed ({type(exc).__name__}: {exc})") from None
        if not 0 < threshold < 1:
            raise ValueError(f"label support: threshold {threshold} is not a probability")
        return cls(models, scores, threshold, full_only)

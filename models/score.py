"""Scorers: the interface the pipeline calls, and the documented placeholder rule.

A scorer maps a feature table to three independent probabilities (P(real),
P(extragalactic), P(fast)) plus per-alert contributions for the explanation. The
placeholder is *not a model*: annotations it produces carry ``model_version "none"``.

Placeholder rule (until trained scorers are loaded):

* P(real) = the survey's own real/bogus score (ZTF drb, else rb; Rubin reliability);
* P(extragalactic) = 0.15 if a PS1 source within 1.5″ looks like a star
  (sgscore > 0.5) or a Gaia source lies within 1.5″, 0.6 otherwise;
* P(fast) = 0.6 if the object brightened by more than 0.5 mag/day, else 0.2 (0.4 when
  no rise could be measured).

Alerts with no real/bogus score are ``unscored``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from models.features import COUNT_SINGULAR, FEATURE_WORDS, MISSING_WORDS

SCORES = ("p_real", "p_extragalactic", "p_fast")
#: Source types a model may name (what a real alert most likely is), in a vetter's words. The
#: contaminants of a transient search are among them, named rather than left as noise.
SOURCE_TYPES = {
    "supernova": "supernova-like", "fast_transient": "fast transient", "agn": "AGN", "cv": "CV outburst",
    "flare": "M-dwarf flare", "pm_star": "proper-motion star", "star": "variable or constant star",
    "asteroid": "asteroid",
}
#: The extragalactic source types: together they hold P(extragalactic), the others 1 − P(extragalactic).
EXTRAGALACTIC_TYPES = ("supernova", "fast_transient", "agn")
#: The fast source types (rise < 3 d): together they hold P(fast).
FAST_TYPES = ("fast_transient", "flare", "cv")
#: A known solar-system object this close (arcsec) makes an alert a known asteroid (the queue marks
#: it so; the source types let it be one whatever the alert's history).
KNOWN_SSO_ARCSEC = 5.0
#: A history at an alert's position rules out a lone moving object: two earlier detections there
#: (the survey's count, itself included, ≥ 3), the first this long (days) before it, or
#: STATIC_HISTORY detections there in all. ZTF counts raw detections down to S/N ~3 within 1.5″,
#: so one earlier detection can be noise, and a moving object can cross a source at the spot:
#: of the 223 real known asteroids here, 16 had a count of 2 or 3, 3 a first detection over a day
#: before, 1 both (it keeps its type, being known; unknown, it would lose it); none had 4 (a bound
#: read off the same data, so a guess).
STATIC_AFTER_DAYS = 0.5
STATIC_HISTORY = 4


@dataclass(frozen=True)
class ScoreBatch:
    """Scores for a batch, aligned with the feature table rows.

    ``contributions[score]`` is an (n, n_features) array of signed log-odds
    contributions (the bias column dropped), or None. They are XGBoost's per-row feature
    contributions to the booster margin, times the calibrator's slope where it has one
    (Platt), so they are in the log-odds of the calibrated score; each says how far that
    feature moves this alert from the training population's average alert (the bias), so
    an alert below the average can have every top item "lowering" it. ``relative[score]`` names the features
    that score reads relative to their typical value at the alert's observing conditions
    (residualised on them), so an explanation can say so. ``type_proba`` is an (n, len(types))
    array of source-type probabilities given that the alert is real (:data:`SOURCE_TYPES`), NaN
    rows where there is none; None when the model has no source-type scorer.
    ``label_propensity[score]`` (keys from :data:`SCORES` and ``"source_type"``) is each alert's
    alert-time probability of having been labelled like the labels that score learnt from
    (:class:`causal.adjust.LabelSupport`), NaN where unscored; below ``support_threshold`` the
    score is an extrapolation. Empty (and the threshold None) for a model without one.
    """

    p_real: np.ndarray
    p_extragalactic: np.ndarray
    p_fast: np.ndarray
    feature_names: tuple
    contributions: dict
    model_version: str
    relative: dict = field(default_factory=dict)
    types: tuple = ()
    type_proba: np.ndarray | None = None
    label_propensity: dict = field(default_factory=dict)
    support_threshold: float | None = None

    def extrapolated(self) -> list:
        """Per row, the scores (names of ``label_propensity``) whose labels hardly reach it (ê below the threshold)."""
        n = len(self.p_real)
        if not self.label_propensity or self.support_threshold is None:
            return [[] for _ in range(n)]
        names = list(self.label_propensity)
        low = np.column_stack([np.asarray(self.label_propensity[s], float) < self.support_threshold for s in names])
        return [[names[j] for j in np.flatnonzero(r)] for r in low] if low.any() else [[] for _ in range(n)]


def _logit(p):
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


class PlaceholderScorer:
    """The documented rule above; ``model_version`` is ``"none"``."""

    model_version = "none"

    def score(self, X: pd.DataFrame) -> ScoreBatch:
        n = len(X)
        rb = X["real_bogus"].to_numpy(float)
        p_real = np.clip(rb, 0.0, 1.0)
        star = ((X["star_galaxy"] > 0.5) & (X["ps1_distance"] < 1.5)) | (X["gaia_distance"] < 1.5)
        p_x = np.where(star.to_numpy(), 0.15, 0.6)
        rise = X["rise_rate"].to_numpy(float)
        p_f = np.where(np.isnan(rise), 0.4, np.where(rise > 0.5, 0.6, 0.2))
        p_x = np.where(np.isnan(p_real), np.nan, p_x)
        p_f = np.where(np.isnan(p_real), np.nan, p_f)
        names = ("real_bogus", "star_galaxy", "rise_rate")
        contrib = {
            "p_real": np.column_stack([_logit(p_real), np.zeros(n), np.zeros(n)]),
            "p_extragalactic": np.column_stack([np.zeros(n), _logit(p_x), np.zeros(n)]),
            "p_fast": np.column_stack([np.zeros(n), np.zeros(n), _logit(p_f)]),
        }
        return ScoreBatch(p_real, p_x, p_f, names, contrib, self.model_version)


_LABELS = {"p_real": "P(real)", "p_extragalactic": "P(extragalactic)", "p_fast": "P(fast)"}


def explain_batch(batch: ScoreBatch, X: pd.DataFrame, k: int = 3) -> list:
    """Top-``k`` signed contributions per score for every row of a batch.

    The ranking is done once per score for the whole batch (one argsort), and feature
    values come from one numpy view of ``X``, so the cost per alert is a few string
    formats rather than pandas look-ups.

    Returns
    -------
    list, one entry per row, of ``(items, text)``: ``items`` a list of
    (score, feature, value, contribution); ``text`` score → one sentence, e.g.
    ``"P(real)=0.91: survey real/bogus score 0.97 raises it; S/N 5.1 lowers it"`` (features
    in a vetter's words, :data:`models.features.FEATURE_WORDS`; ``items`` keep their names);
    a missing value reads ``"positional scatter unmeasured lowers it"``; a feature the score reads
    relative to the conditions (``batch.relative``) reads ``"PSF width 2.4″ for its
    conditions raises it"``. Values are the alert's own (raw) values.
    """
    n = len(X)
    out = [([], {}) for _ in range(n)]
    names = list(batch.feature_names)
    col = {c: j for j, c in enumerate(X.columns)}
    Xv = X.to_numpy(dtype=float, copy=False)
    vals_idx = np.array([col.get(nm, -1) for nm in names])
    for s in SCORES:
        c = batch.contributions.get(s) if batch.contributions else None
        if c is None:
            continue
        relative = set((batch.relative or {}).get(s, ()))
        p_all = np.asarray(getattr(batch, s), dtype=float)
        top = np.argsort(-np.abs(c), axis=1)[:, :k]
        # Everything a row needs, gathered for the batch and turned into Python lists once.
        rows = np.arange(n)[:, None]
        contrib = c[rows, top]
        cols = vals_idx[top]
        vals = np.where(cols >= 0, Xv[rows, np.maximum(cols, 0)], np.nan)
        keep = (contrib != 0) & np.isfinite(contrib)
        ok = np.isfinite(p_all)
        for i, (p, tj, cv, xv, kp) in enumerate(zip(p_all.tolist(), top.tolist(), contrib.tolist(), vals.tolist(),
                                                   keep.tolist(), strict=True)):
            if not ok[i]:
                continue
            items, text = out[i]
            parts = []
            for j, v, val, use in zip(tj, cv, xv, kp, strict=True):
                if not use:
                    continue
                name = names[j]
                items.append((s, name, val, v))
                what = feature_phrase(name, val, relative=name in relative)
                # "3 bad pixels lower it", "1 detection raises it"
                plural = name in COUNT_SINGULAR and (value_text(val) != "1" if not math.isnan(val)
                                                     else name not in MISSING_WORDS)
                verb = ("raise" if v > 0 else "lower") if plural else ("raises" if v > 0 else "lowers")
                parts.append(f"{what} {verb} it")
            text[s] = f"{_LABELS[s]}={p:.2f}" + (": " + "; ".join(parts) if parts else "")
    return out


def feature_phrase(name: str, value: float, relative: bool = False) -> str:
    """A feature and its value in a vetter's words, as an explanation writes them.

    ``"PSF width 2.4″"``, counts number first (``"1 detection"``, ``"3 bad pixels"``), a
    missing value as what its absence means (``"positional scatter unmeasured"``: one detection
    has none, and that is evidence too; ``"no earlier non-detection"``); ``relative`` adds
    ``" for its conditions"`` (a feature the score reads relative to the observing conditions).
    """
    words, unit = FEATURE_WORDS.get(name, (name, ""))
    if math.isnan(value):
        return MISSING_WORDS.get(name, f"no {words.removesuffix(' at')}")
    if name in COUNT_SINGULAR:
        text = value_text(value)
        what = f"{text} {COUNT_SINGULAR[name] if text == '1' else words}"
    else:
        what = f"{words} {value_text(value)}{unit}"
    return what + (" for its conditions" if relative else "")


def value_text(v: float) -> str:
    """A feature value as an explanation writes it: three significant digits, and no exponent
    where a vetter would not write one (12,300 µJy, 1,750 detections; 8.5e-05 stays)."""
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def explain(batch: ScoreBatch, X: pd.DataFrame, i: int, k: int = 3):
    """Top-``k`` signed contributions per score for row ``i`` (see :func:`explain_batch`)."""
    sub = ScoreBatch(
        *(np.asarray(getattr(batch, s))[i:i + 1] for s in SCORES), batch.feature_names,
        {s: c[i:i + 1] for s, c in (batch.contributions or {}).items() if c is not None}, batch.model_version,
        batch.relative,
    )
    return explain_batch(sub, X.iloc[i:i + 1], k)[0]

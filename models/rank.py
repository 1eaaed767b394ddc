"""Light-curve stage and the eyeball-queue priority.

Priority policy (documented in the README):

``priority = P(real) · (0.35 + 0.65 · interest) · urgency · freshness``

* ``interest = 1 − (1 − P(extragalactic)) · (1 − P(fast))`` — either an extragalactic
  or a fast transient is worth a look (the scores are not mutually exclusive), and
  both together is best;
* ``urgency`` favours young objects, where a decision still changes what gets
  observed: 1.0 at stage ``first``, 0.8 ``updating``, 0.5 ``longterm``;
* ``freshness = 0.5 + 0.5 · exp(−age / 3 d)`` where age is the time between the
  alert's observation and now: the wall clock live, and in replays the newest alert
  time seen so far, so an archive ranks much as it would have live.

Recall matters more than purity, so nothing is multiplied towards zero except
P(real): a bogus alert should sink, a real one never disappears. Alerts that could
not be scored get no priority at all (``None``), never 0.
"""

from __future__ import annotations

import numpy as np

STAGES = ("first", "updating", "longterm")
URGENCY = {"first": 1.0, "updating": 0.8, "longterm": 0.5}
FIRST_DAYS, UPDATING_DAYS = 2.0, 21.0
FRESHNESS_DAYS = 3.0


def stage_of(days_since_first) -> np.ndarray:
    """Vetter stage per alert: ``first`` ≤ 2 d, ``updating`` ≤ 21 d, else ``longterm``."""
    d = np.nan_to_num(np.asarray(days_since_first, dtype=float), nan=0.0)
    return np.where(d <= FIRST_DAYS, "first", np.where(d <= UPDATING_DAYS, "updating", "longterm"))


def priority(p_real, p_extragalactic, p_fast, stage, age_days=0.0) -> np.ndarray:
    """Queue priority in [0, 1]; NaN where any score is NaN (unscored)."""
    p_real, p_x, p_f = (np.asarray(a, dtype=float) for a in (p_real, p_extragalactic, p_fast))
    interest = 1.0 - (1.0 - p_x) * (1.0 - p_f)
    urgency = np.vectorize(URGENCY.get, otypes=[float])(np.asarray(stage))
    fresh = 0.5 + 0.5 * np.exp(-np.clip(np.asarray(age_days, dtype=float), 0, None) / FRESHNESS_DAYS)
    return p_real * (0.35 + 0.65 * interest) * urgency * fresh

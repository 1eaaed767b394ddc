"""The fixed flow: decode each message alone, then everything else per micro-batch.

``Envelope`` → decode → ``Alert`` → HSR correction → features → scorers → ranking →
``Annotation``. Bad input becomes ``Rejected``; nothing is dropped silently, so for
every batch ``read == annotated + rejected``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from models.features import ExposureCompanions, alert_features
from models.rank import priority, stage_of
from models.score import SCORES, explain_batch
from models.scorer import default_scorer
from stream.alert import DETECTION, FORCED, NONDETECTION, PREVIOUS, Alert, Envelope, Rejected
from stream.annotation import Annotation, Contribution, HSRDiagnostics, code_version
from stream.decode import Decoder

log = logging.getLogger(__name__)


@dataclass
class BatchResult:
    """Output of one micro-batch: ``annotations`` plus ``rejected`` (with their envelopes)."""

    annotations: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    alerts: list = field(default_factory=list)  # the decoded alerts, aligned with annotations
    envelopes: list = field(default_factory=list)  # their envelopes, aligned with annotations
    corrected_flux: list = field(default_factory=list)  # HSR-corrected flux per alert (None if off)

    @property
    def n_read(self) -> int:
        return len(self.annotations) + len(self.rejected)


class ErrorBudget:
    """Counts unexpected exceptions; raises once more than ``limit`` happened.

    ``limit=0`` re-raises the first one (what tests use).
    """

    def __init__(self, limit: int = 100):
        self.limit = limit
        self.spent = 0

    def spend(self, exc: BaseException) -> None:
        self.spent += 1
        log.error("unexpected error (%d/%d): %r", self.spent, self.limit, exc)
        if self.spent > self.limit:
            raise RuntimeError(f"error budget exhausted ({self.spent} unexpected errors)") from exc


def _unscored_text(features: dict) -> dict:
    """Why an alert has no scores, in each score's explanation (the vetter's page shows it)."""
    rb = features.get("real_bogus")
    why = ("unscored: the alert has no survey real/bogus score in [0, 1], and the models never learnt without one"
           if rb is None or not math.isfinite(rb) else "unscored")
    return {s: why for s in SCORES}


class Pipeline:
    """Decode, correct, score and rank micro-batches of envelopes.

    Parameters
    ----------
    decoder : Decoder
    scorer : object with ``score(features) -> ScoreBatch``; default the shipped model
        (:func:`models.scorer.default_scorer`, which refuses to start without it).
    hsr : object with ``correct(alerts) -> (fluxes, diagnostics)``, or False
        Half-sibling regression (default: a fresh :class:`causal.hsr.HSR`, whose sibling
        store then lives as long as the pipeline); ``False`` switches it off and
        annotations say ``hsr.mode = "off"``. A correction uses what the store holds when
        the alert's micro-batch arrives (R4), so the same stream cut into other batches (a
        replay's batch size, a live consumer's timeouts) can correct an alert differently,
        most at tonight's exposure.
    clock : {"stream", "wall"}
        What "now" is for freshness: the latest event time of the alert's survey seen up to it (replays
        rank as they would have live; each survey is its own stream) or the wall clock (live
        service).
    error_budget : ErrorBudget
    """

    def __init__(self, decoder: Decoder | None = None, scorer=None, hsr=None, clock: str = "stream",
                 error_budget: ErrorBudget | None = None):
        self.decoder = decoder or Decoder()
        self.scorer = scorer or default_scorer()
        if hsr is None:
            from causal.hsr import HSR

            hsr = HSR()
        self.hsr = hsr or None
        self.clock = clock
        self.errors = error_budget or ErrorBudget()
        self.stream_mjd: dict = {}  # survey → latest event time seen (the stream clock)
        self.code_version = code_version()
        self.companions = ExposureCompanions()  # exposure seeing across micro-batches

    def process(self, envelopes) -> BatchResult:
        """Run one micro-batch end to end."""
        out = BatchResult()
        good: list[tuple[Alert, Envelope]] = []
        for item, env in self.decoder.decode_batch(envelopes):
            if isinstance(item, Rejected):
                out.rejected.append(item)
            else:
                good.append((item, env))
        if good:
            try:
                anns, fluxes = self.annotate([a for a, _ in good], [e for _, e in good])
                out.annotations.extend(anns)
                out.corrected_flux.extend(fluxes)
                out.alerts.extend(a for a, _ in good)
                out.envelopes.extend(e for _, e in good)
            except Exception as exc:  # isolate the culprit: retry one by one
                self.errors.spend(exc)
                for a, e in good:
                    try:
                        anns, fluxes = self.annotate([a], [e])
                        out.annotations.extend(anns)
                        out.corrected_flux.extend(fluxes)
                        out.alerts.append(a)
                        out.envelopes.append(e)
                    except Exception as exc1:
                        self.errors.spend(exc1)
                        out.rejected.append(Rejected(e, "process", "internal_error", f"{type(exc1).__name__}: {exc1}",
                                                     a.alert_id, a.object_id))
        return out

    def annotate(self, alerts: list, envelopes: list) -> tuple[list, list]:
        """Annotations for decoded alerts (one batch: features and scores are vectorised).

        Returns the annotations and, aligned with them, the HSR-corrected flux of each
        alert's light curve (None when HSR is off).
        """
        if not alerts:
            return [], []
        if self.hsr is not None:
            fluxes, diags = self.hsr.correct(alerts)
        else:
            fluxes, diags = None, [HSRDiagnostics(flux_raw=a.flux, flux_corrected=a.flux) for a in alerts]
        X = alert_features(alerts, fluxes, self.companions)
        sb = self.scorer.score(X)
        mjd = np.array([a.mjd for a in alerts])
        survey = np.array([a.survey for a in alerts])
        # The stream clock as each alert arrived: the newest time seen up to it, in arrival order (the
        # batch's newest alert had aged the earlier alerts of its batch, so priorities depended on how
        # the stream was cut into batches).
        seen = np.empty(len(alerts))
        for sv in np.unique(survey):
            m = survey == sv
            seen[m] = np.maximum.accumulate(np.maximum(mjd[m], self.stream_mjd.get(sv, -np.inf)))
            self.stream_mjd[sv] = float(seen[m][-1])
        now = seen if self.clock == "stream" else time.time() / 86400.0 + 40587.0
        stages = stage_of(X["days_since_first"].to_numpy())
        prio = priority(sb.p_real, sb.p_extragalactic, sb.p_fast, stages, now - mjd)
        t_ms = int(time.time() * 1000)
        anns = []
        cols = list(X.columns)  # (rows as Python lists: a third of what DataFrame.to_dict costs)
        feats = [dict(zip(cols, row, strict=True)) for row in X.to_numpy().tolist()]
        explained = explain_batch(sb, X)
        # Per-alert values as Python numbers, and the light-curve row counts by kind, in one
        # pass over the batch rather than a few numpy calls per alert.
        p_lists = [np.asarray(p, dtype=float).tolist() for p in (sb.p_real, sb.p_extragalactic, sb.p_fast)]
        prio_l, mjd_l, stage_l = prio.tolist(), mjd.tolist(), [str(s) for s in stages]
        # Source types (if the model names them): the most likely one and every probability, per alert.
        tp = sb.type_proba
        type_rows = (tp.tolist() if tp is not None else [None] * len(alerts))
        # Where the model's labels hardly reach (flagged, not changed), and each score's ê at alert time.
        extrapolated = sb.extrapolated()
        support = {s: np.asarray(e, float).tolist() for s, e in sb.label_propensity.items()}
        kinds = [a.lightcurve.kind for a in alerts]
        owner = np.repeat(np.arange(len(alerts)), [len(k) for k in kinds])
        kind = np.concatenate(kinds).astype(np.int64)
        known = (kind >= 0) & (kind < 4)  # (a code outside the four is counted nowhere)
        counts = np.bincount(owner[known] * 4 + kind[known], minlength=4 * len(alerts))
        counts = counts.reshape(len(alerts), 4).tolist()  # DETECTION, PREVIOUS, NONDETECTION, FORCED
        for i, (a, env) in enumerate(zip(alerts, envelopes, strict=True)):
            scores = (p_lists[0][i], p_lists[1][i], p_lists[2][i])
            scored = all(math.isfinite(s) for s in scores)
            items, text = explained[i] if scored else ([], _unscored_text(feats[i]))
            n_kind = counts[i]
            probs = type_rows[i]
            typed = scored and probs is not None and all(math.isfinite(v) for v in probs)
            best = max(range(len(probs)), key=probs.__getitem__) if typed else None
            anns.append(Annotation(
                alert_id=a.alert_id, object_id=a.object_id, survey=a.survey,
                survey_schema_version=a.schema_version, ra=a.ra, dec=a.dec, band=a.band, exposure=a.exposure,
                event_mjd=a.mjd, event_time_scale=a.time_scale, processing_time_ms=t_ms,
                status="scored" if scored else "unscored",
                p_real=scores[0] if scored else None, p_extragalactic=scores[1] if scored else None,
                p_fast=scores[2] if scored else None, priority=prio_l[i] if scored else None,
                stage=stage_l[i], source_type=sb.types[best] if typed else None,
                source_type_p=probs[best] if typed else None,
                source_types=dict(zip(sb.types, probs, strict=True)) if typed else {},
                extrapolated=tuple(extrapolated[i]) if scored else (),
                label_propensity={s: e[i] for s, e in support.items() if math.isfinite(e[i])} if scored else {},
                explanation=tuple(Contribution(*t) for t in items), explanation_text=text,
                hsr=diags[i], n_detections=n_kind[DETECTION] + n_kind[PREVIOUS],
                n_nondetections=n_kind[NONDETECTION], n_forced=n_kind[FORCED],
                first_mjd=mjd_l[i] - feats[i]["days_since_first"], mag=a.context.mag,
                peak_flux=feats[i]["peak_flux"], features=feats[i], model_version=sb.model_version,
                code_version=self.code_version, source_topic=env.source, source_partition=env.partition,
                source_offset=env.offset,
            ))
        return anns, (list(fluxes) if fluxes is not None else [None] * len(anns))

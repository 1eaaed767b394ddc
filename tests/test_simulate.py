"""Simulator: determinism, truth ↔ alert join, official-schema validity, decoder round trip,
sibling density, label-selection bias, tarball output."""

from __future__ import annotations

import hashlib
import io
from collections import defaultdict

import fastavro
import numpy as np
import pandas as pd
import pytest
from conftest import DATA, SHARED

from stream.alert import DETECTION, FORCED, NONDETECTION, PREVIOUS, Alert, Envelope
from stream.decode import Decoder
from stream.simulate import simulate, ujy
from stream.sources import iter_envelopes

OFFICIAL = SHARED / "ztf_avro_schema_official" / "schema"


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """One quadrant, one alert night, dense, 12 days of history (short packets keep tests fast)."""
    out = tmp_path_factory.mktemp("dense")
    return simulate(11, out, nights=1, quadrants=1, mode="dense", history_days=12), out


@pytest.fixture(scope="module")
def sparse():
    return simulate(11, nights=2, quadrants=2, mode="sparse")


def _tree_digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _records(paths):
    for env in iter_envelopes(paths):
        yield from fastavro.reader(io.BytesIO(env.payload))


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = simulate(5, tmp_path / "a", nights=1, quadrants=1, mode="sparse")
    simulate(5, tmp_path / "b", nights=1, quadrants=1, mode="sparse")
    simulate(6, tmp_path / "c", nights=1, quadrants=1, mode="sparse")
    assert len(a.truth) > 5
    for name in ("truth.parquet", "exposures.parquet", "objects.parquet", "photometry.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert _tree_digest(tmp_path / "a" / "alerts") == _tree_digest(tmp_path / "b" / "alerts")
    assert (tmp_path / "a" / "truth.parquet").read_bytes() != (tmp_path / "c" / "truth.parquet").read_bytes()


def test_truth_joins_alerts_one_to_one(dense):
    res, out = dense
    truth = pd.read_parquet(out / "truth.parquet")
    recs = list(_records([out / "alerts"]))
    assert len(recs) == len(truth) > 300
    assert truth["candid"].is_unique
    by_id = truth.set_index("candid")
    assert set(by_id.index) == {r["candid"] for r in recs}
    for r in recs:
        t = by_id.loc[r["candid"]]
        c = r["candidate"]
        assert r["objectId"] == t["objectId"] and c["pid"] == t["pid"] and c["fid"] == t["fid"]
        assert c["candid"] == r["candid"] and c["isdiffpos"] == t["isdiffpos"]
        assert len(r["prv_candidates"]) == t["n_prv_det"] + t["n_prv_nondet"]
        assert len(r["fp_hists"]) == t["n_fp"]
    # Every prv detection candid is unique per detection across the whole stream.
    seen = defaultdict(set)
    for r in recs:
        for p in r["prv_candidates"]:
            if p["candid"] is not None:
                seen[p["candid"]].add((p["pid"], r["objectId"]))
    assert all(len(v) == 1 for v in seen.values())
    assert set(truth["class"]) >= {"constant", "bogus"}
    assert truth.loc[truth["class"] == "bogus", "is_real"].eq(False).all()
    assert truth.loc[truth["class"] != "bogus", "is_real"].all()


def test_fast_encoder_matches_fastavro(dense):
    res, _ = dense
    pay = dict(res.payloads())
    for k, rec in enumerate(res.alerts()):
        if k % 25:
            continue
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, res.schema, rec)
        body = buf.getvalue()
        assert body in pay[rec["candid"]]
        (back,) = fastavro.reader(io.BytesIO(pay[rec["candid"]]))
        assert back["candid"] == rec["candid"] and len(back["fp_hists"]) == len(rec["fp_hists"])


@pytest.mark.skipif(not (OFFICIAL / "alert.avsc").is_file(),
                    reason=f"official ZTF schema not found at {OFFICIAL} (set VIGIL_SHARED_DATA)")
def test_alerts_validate_against_official_schema(dense):
    from fastavro.schema import load_schema_ordered
    from fastavro.validation import validate

    _, out = dense
    official = load_schema_ordered([str(OFFICIAL / f"{n}.avsc")
                                    for n in ("cutout", "candidate", "prv_candidate", "fp_hist", "alert")])
    truth = pd.read_parquet(out / "truth.parquet")
    # A few alerts (a constant star, a bogus, the last one) keep the slow pure-Python validator quick.
    first = truth.groupby("class")["candid"].first()
    want = {first["constant"], first["bogus"], truth["candid"].iloc[-1]}
    checked = 0
    for rec in _records([out / "alerts"]):
        if rec["candid"] in want:
            assert validate(rec, official, raise_errors=True)
            buf = io.BytesIO()
            fastavro.schemaless_writer(buf, official, rec)  # the official schema encodes it too
            checked += 1
    assert checked == len(want)


def test_decoder_round_trip(dense):
    res, out = dense
    truth = res.truth.set_index("candid")
    dec = Decoder()
    pulls, n = [], 0
    for k, env in enumerate(iter_envelopes([out / "alerts"])):
        if k % 3:
            continue  # a third of the stream is plenty
        (a,) = dec.decode(env)
        assert isinstance(a, Alert), a
        rec = next(iter(fastavro.reader(io.BytesIO(env.payload))))
        t = truth.loc[a.alert_id]
        lc = a.lightcurve
        assert a.object_id == t["objectId"] and a.exposure == t["pid"] and a.schema_version == "4.02"
        assert (lc.kind == DETECTION).sum() == 1
        assert (lc.kind == PREVIOUS).sum() == t["n_prv_det"]
        assert (lc.kind == NONDETECTION).sum() == t["n_prv_nondet"]
        assert (lc.kind == FORCED).sum() == sum(p["procstatus"] == "0" for p in rec["fp_hists"])
        f = lc.flux[lc.kind == DETECTION][0]
        assert f == pytest.approx(t["meas_flux_ujy"], rel=1e-5)
        # Decoded flux minus the known truth is pure noise of the stated size.
        pulls.append((f - t["true_flux_ujy"] - t["sys_flux_ujy"] - t["nuisance_flux_ujy"]) / t["flux_err_ujy"])
        assert a.lightcurve.flux_err[lc.kind == DETECTION][0] == pytest.approx(t["flux_err_ujy"], rel=1e-3)
        n += 1
    assert n > 100
    pulls = np.array(pulls)
    assert abs(pulls.mean()) < 0.2 and 0.85 < pulls.std() < 1.15


def test_forced_photometry_matches_truth(dense):
    res, _ = dense
    phot = res.photometry.set_index(["objectId", "pid"])
    checked = 0
    for k, rec in enumerate(res.alerts()):
        if k % 50:
            continue
        for p in rec["fp_hists"]:
            t = phot.loc[(rec["objectId"], p["pid"])]
            if p["procstatus"] != "0":
                assert t["fp_flagged"] and p["forcediffimflux"] == -99999.0
                continue
            flux = p["forcediffimflux"] * 10 ** (-0.4 * (p["magzpsci"] - 23.9))
            assert flux == pytest.approx(t["meas_flux_ujy"], rel=1e-4, abs=1e-3)
            checked += 1
    assert checked > 100


def test_noise_consistent_with_diffmaglim():
    res = simulate(3, nights=1, quadrants=4, mode="sparse", sys_scale=0.0)
    ph = res.photometry.merge(res.exposures[["pid", "diffmaglim"]], on="pid")
    empty = ph[(ph["ref_flux_ujy"] == 0) & (ph["true_flux_ujy"] == 0)]  # empty sky: bogus positions
    assert len(empty) > 20
    np.testing.assert_allclose(empty["flux_err_ujy"], ujy(empty["diffmaglim"]) / 5.0, rtol=1e-9)
    assert (res.truth["sys_flux_ujy"] == 0).all()
    r = res.photometry
    pull = (r["meas_flux_ujy"] - r["true_flux_ujy"] - r["nuisance_flux_ujy"]) / r["flux_err_ujy"]
    assert 0.95 < pull.std() < 1.05


def test_systematics_shared_within_exposure(dense):
    res, _ = dense
    ph = res.photometry.merge(res.objects[["object_index", "class", "loading"]], on="object_index")
    const = ph[ph["class"] == "constant"]
    ex = res.exposures.set_index("pid")
    # Injected systematic of a constant star = F_pos·(10^(-0.4 δ) − 1) + b_e with δ built from the pid's terms.
    row = const.iloc[len(const) // 2]
    e = ex.loc[row["pid"]]
    assert row["sys_mag"] == pytest.approx(
        e["sys_zp_mag"] + row["loading"] * e["sys_seeing_mag"]
        + (res.objects.set_index("object_index").loc[row["object_index"], "colour"] - 0.6) * e["sys_colour_mag"])
    # Relative systematics of stars are strongly correlated within one exposure (what siblings exploit).
    rel = const.assign(s=const["sys_flux_ujy"] / const["ref_flux_ujy"]).groupby("pid")["s"]
    assert rel.mean().std() > 3 * rel.std().median() / np.sqrt(rel.size().median())
    assert 0.01 < np.sqrt((const["sys_mag"] ** 2).mean()) < 0.06


def _recovered_sources(records):
    per_pid = defaultdict(set)
    for r in records:
        obj = r["objectId"]
        per_pid[r["candidate"]["pid"]].add(obj)
        for p in r["prv_candidates"]:
            if p["magpsf"] is not None:
                per_pid[p["pid"]].add(obj)
        for p in r["fp_hists"]:
            if p["procstatus"] == "0":
                per_pid[p["pid"]].add(obj)
    return pd.Series({k: len(v) for k, v in per_pid.items()})


def test_sibling_density_dense_vs_sparse(dense, sparse):
    res, _ = dense
    d = _recovered_sources(res.alerts())
    s = _recovered_sources(sparse.alerts())
    # The fast matrix count used in the summary agrees with counting the records.
    pd.testing.assert_series_equal(res.sibling_counts().loc[d.index].sort_index(), d.sort_index(), check_names=False)
    # Every exposure within 30 days of the alerts has ≥ 100 recoverable sources.
    lo = max(res.config.start_jd, res.truth["jd"].min() - 29)
    ex = res.exposures.set_index("pid")
    recent = d[ex.loc[d.index, "jd"].to_numpy() >= lo]
    assert len(recent) > 20 and recent.min() >= 100
    assert 3 <= s.median() <= 25
    assert s.max() < 60


def test_label_selection_is_biased(dense):
    res, _ = dense
    t = res.truth
    assert 0.02 < t["vetted"].mean() < 0.5
    assert t["propensity"].between(0.002, 0.98).all()
    q1, q3 = t["magpsf"].quantile([0.25, 0.75])
    bright, faint = t[t["magpsf"] < q1], t[t["magpsf"] > q3]
    assert q3 - q1 > 0.5 and len(bright) > 30
    assert bright["vetted"].mean() > 3 * faint["vetted"].mean()
    # Selection over-represents transients relative to the stream (it shifts the class mix);
    # compared on the true propensity, which the Bernoulli draws of one quadrant only sample.
    assert t.loc[t["is_extragalactic"], "propensity"].mean() > 1.5 * t["propensity"].mean()
    # Eyeballing (real/bogus calls) covers every followed-up alert and a screened share of the rest,
    # so artefacts, which follow-up almost never picks, are labelled far more often.
    assert (t["eyeballed"] >= t["vetted"]).all() and t["eyeballed"].mean() > 1.5 * t["vetted"].mean()
    assert (t["eyeball_propensity"] >= t["propensity"]).all()
    bogus = t[~t["is_real"]]
    assert len(bogus) >= 10 and bogus["eyeball_propensity"].mean() > 3 * bogus["propensity"].mean()


def test_tarballs_and_cli(tmp_path, capsys):
    from stream.cli import main

    out = tmp_path / "tar"
    rc = main(["simulate", "--seed", "4", "--out", str(out), "--nights", "2", "--quadrants", "1", "--mode", "sparse",
               "--format", "tarballs"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "injected systematic RMS" in printed and "class mix" in printed
    tars = sorted((out / "alerts").glob("ztf_public_*.tar.gz"))
    assert len(tars) == 2
    truth = pd.read_parquet(out / "truth.parquet")
    envs = list(iter_envelopes([out / "alerts"]))
    assert len(envs) == len(truth)
    assert all("!" in e.source and e.source.endswith(".avro") for e in envs)
    dec = Decoder()
    ids = [dec.decode(e)[0].alert_id for e in envs]
    assert sorted(ids) == sorted(truth["candid"])
    # a second run into the same directory would mix its alerts with these under one truth table
    assert main(["simulate", "--seed", "5", "--out", str(out), "--nights", "1", "--quadrants", "1",
                 "--mode", "sparse", "--n-alerts", "20"]) == 2
    assert "already holds alerts" in capsys.readouterr().err
    assert len(pd.read_parquet(out / "truth.parquet")) == len(truth)
    # bad sizes are named by their flag, before any simulating (a NaN scale had written 16 bogus alerts)
    for flag, value in (("--history-days", "-3"), ("--sys-scale", "nan"), ("--n-alerts", "0"), ("--nights", "0")):
        assert main(["simulate", "--seed", "5", "--out", str(out.parent / "other"), flag, value]) == 2
        assert f"({flag}) = " in capsys.readouterr().err, flag
    assert main(["simulate", "--seed", "5", "--out", str(out / "truth.parquet")]) == 2
    assert "a file, not a directory" in capsys.readouterr().err


def test_n_alerts_cut_is_exact():
    res = simulate(2, nights=1, mode="sparse", n_alerts=150)
    assert len(res.truth) == 150 == sum(1 for _ in res.alerts())
    assert res.truth["jd"].is_monotonic_increasing


def test_start_must_be_0h_ut():
    """A start JD that is not 0h UT would put the night windows in daylight: refused, not looped on."""
    with pytest.raises(ValueError, match="0h UT"):
        simulate(2, nights=1, mode="sparse", n_alerts=10, start_jd=2460209.97)


def test_do_seeing_observes_the_same_objects_under_other_conditions():
    kw = {"mode": "transient", "quadrants": 3, "nights": 2}
    runs = {s: simulate(5, seeing=s, **kw) for s in (1.8, 2.8)}
    last = simulate(5, seeing=2.8, seeing_nights=1, **kw)
    natural = simulate(5, **kw)
    ex = runs[1.8].exposures
    assert (ex["seeing_arcsec"] == 1.8).all()
    # Depth follows seeing: −2.5 log10(2.8 / 1.8) = −0.48 mag at every pid.
    d = runs[2.8].exposures["diffmaglim"].to_numpy() - ex["diffmaglim"].to_numpy()
    np.testing.assert_allclose(d, -2.5 * np.log10(2.8 / 1.8), atol=1e-9)
    # Only the last alert night is intervened on with seeing_nights=1: every alert of the
    # night before is the same packet, with the same truth, as without it.
    lx, nx = last.exposures, natural.exposures
    late = lx["night"] == lx["night"].max()
    assert (lx.loc[late, "seeing_arcsec"] == 2.8).all()
    np.testing.assert_array_equal(lx.loc[~late, "seeing_arcsec"], nx.loc[~late, "seeing_arcsec"])
    before = {}
    for r in (last, natural):
        early = r.truth["night"] < r.truth["night"].max()
        recs = [a for a, keep in zip(r.alerts(), early, strict=True) if keep]
        # (object_index is a row number of objects.parquet; the next 3 days' detections are later data)
        t = r.truth[early].drop(columns=["object_index", "n_later_det", "propensity", "vetted", "eyeball_propensity",
                                           "eyeballed"])
        before[r is last] = (t.reset_index(drop=True), recs)
    assert len(before[True][1]) > 20
    pd.testing.assert_frame_equal(before[True][0], before[False][0])
    assert before[True][1] == before[False][1]
    t = {s: r.truth.assign(key=r.alert_keys()).set_index("key") for s, r in runs.items()}
    real = [k for k in t[1.8].index.intersection(t[2.8].index) if ":b" not in k]
    assert len(real) > 50
    a, b = t[1.8].loc[real], t[2.8].loc[real]
    assert (a["class"] == b["class"]).all() and (a["pid"] == b["pid"]).all()
    # Same object name; its year is that of the first detection, which seeing can move.
    assert (a["objectId"].str[5:] == b["objectId"].str[5:]).all()
    # Candidate fields that seeing does not touch keep their draws.
    cand = {s: {k: rec["candidate"] for k, rec in zip(r.alert_keys(), r.alerts(), strict=True)}
            for s, r in runs.items()}
    for name in ("sky", "classtar", "chipsf", "sumrat", "dsnrms", "distpsnr1", "sgscore1", "neargaia"):
        assert [cand[1.8][k][name] for k in real] == [cand[2.8][k][name] for k in real], name
    # Same objects, same reference mismatch and the same standard-normal noise draws, rescaled.
    np.testing.assert_allclose(a["nuisance_flux_ujy"], b["nuisance_flux_ujy"])
    np.testing.assert_allclose(a["noise_flux_ujy"] / a["flux_err_ujy"], b["noise_flux_ujy"] / b["flux_err_ujy"])
    steady = a["class"] != "pm_star"  # a moving star's dipole flux depends on the PSF, hence on seeing
    np.testing.assert_allclose(a.loc[steady, "true_flux_ujy"], b.loc[steady, "true_flux_ujy"])
    assert (b["flux_err_ujy"] >= a["flux_err_ujy"]).all()
    with pytest.raises(ValueError, match="n_alerts"):
        simulate(5, seeing=2.0, n_alerts=100, **kw)
    with pytest.raises(ValueError, match="needs seeing"):
        simulate(5, seeing_nights=1, **kw)
    # Asteroids do not depend on seeing: the same ones, with the same draws (only their detection does).
    sso = {s: r.objects[r.objects["class"] == "sso"].reset_index(drop=True) for s, r in runs.items()}
    assert len(sso[1.8])
    cols = [c for c in sso[1.8].columns if c not in ("n_alerts", "object_index")]  # (indices count artefacts)
    pd.testing.assert_frame_equal(sso[1.8][cols], sso[2.8][cols])
    # Artefacts are drawn afresh, more of them in bad seeing.
    n_bogus = {s: int((r.truth["class"] == "bogus").sum()) for s, r in runs.items()}
    assert n_bogus[2.8] > n_bogus[1.8]


def test_faint_sources_lose_their_catalogue_counterparts():
    res = simulate(7, nights=2, quadrants=8, mode="transient")
    recs = {r["candid"]: r["candidate"] for r in res.alerts()}
    obj = res.objects.set_index("objectId")
    t = res.truth.assign(mag_r=res.truth["objectId"].map(obj["mag_r"]))
    t = t[~t["pid"].map(res.exposures.set_index("pid")["xmatch_outage"])]  # (outages: next test)
    stars = t[t["class"].isin(["flare", "cv"]) & t["mag_r"].notna()]
    bright, faint = stars[stars["mag_r"] < 19.5], stars[stars["mag_r"] > 21.6]
    assert len(bright) and len(faint)

    def gaia(rows):
        return np.array([recs[c]["neargaia"] for c in rows["candid"]])

    assert (gaia(bright) < 0.5).all()  # G ≈ r + 0.3 < 20.7: matched to itself
    assert (gaia(faint) > 1.5).all()  # below Gaia's depth: the nearest Gaia source is unrelated
    assert np.mean([recs[c]["distnr"] > 2 for c in faint["candid"]]) > 0.9  # nor in the reference image


def test_public_cadence_observes_every_other_night_once_in_each_band():
    kw = dict(nights=4, quadrants=2, mode="transient")
    pub, nightly = simulate(3, cadence="public", **kw), simulate(3, **kw)
    ex = pub.exposures.drop_duplicates("exposure_id")
    last = int(ex["night"].max())
    assert last == int(nightly.exposures["night"].max())  # the last night is observed (do(seeing) acts on it)
    assert ((last - ex["night"]) % 2 == 0).all()
    assert (ex.groupby(["night", "fid"]).size() == 1).all()  # one visit: a g and an r exposure at most
    # A third or less of the nightly cadence's exposures (one field here).
    assert 3 * len(ex) < nightly.exposures["exposure_id"].nunique()
    with pytest.raises(ValueError, match="cadence"):
        simulate(3, cadence="hourly", **kw)


def test_asteroids_are_real_single_epoch_sources_most_of_them_catalogued():
    res = simulate(7, nights=2, quadrants=8, mode="transient")
    t = res.truth
    out = t["pid"].map(res.exposures.set_index("pid")["xmatch_outage"]).to_numpy(bool)
    sso = t[(t["class"] == "sso").to_numpy() & ~out]
    assert len(sso) > 20
    assert sso["is_real"].all() and not sso["is_extragalactic"].any() and not sso["is_fast"].any()
    # Nothing at the position before or after (it moves on), but upper limits there; a slow
    # one is seen again in the night's next exposure, a little further on.
    assert (sso["n_prv_nondet"] > 0).all() and (sso["n_prv_det"] <= 1).all() and (sso["n_later_det"] <= 1).all()
    again = sso[sso["n_prv_det"] == 1]
    assert 0 < len(again) < 0.2 * len(sso)
    first = sso[sso["n_later_det"] == 1].set_index("objectId").loc[again["objectId"]]
    assert len(first) == len(again)
    assert (first["night"].to_numpy() == again["night"].to_numpy()).all()
    shift = np.hypot((again["ra"].to_numpy() - first["ra"].to_numpy()) * np.cos(np.radians(again["dec"].to_numpy())),
                     again["dec"].to_numpy() - first["dec"].to_numpy()) * 3600
    assert (shift < 1.5).all() and np.median(shift) > 0.2
    dec = Decoder(keep_cutouts=False)
    recs = {r["candid"]: r for r in res.alerts()}
    ss = np.array([dec.to_alert(recs[c], Envelope(b"", "sim")).context.ss_distance for c in sso["candid"]])
    known = np.isfinite(ss)
    assert 0.6 < known.mean() < 0.97
    assert set(ss[known]) <= {0.0, 1.0} and np.mean(ss[known] == 0) > 0.85  # whole arcsec, as ZTF reports it
    # Other alerts carry no solar-system match (ssdistnr −999 reads as missing).
    other = t[(t["class"] != "sso").to_numpy() & ~out]["candid"][:200]
    assert all(recs[c]["candidate"]["ssdistnr"] == -999.0 for c in other)


def test_cross_match_outages_look_like_the_real_damaged_run_and_decode_as_missing():
    res = simulate(9, nights=2, quadrants=8, mode="transient")  # a seed with an outage on an alert night
    out = res.truth["pid"].map(res.exposures.set_index("pid")["xmatch_outage"]).to_numpy(bool)
    assert 0 < out.mean() < 0.5
    dec = Decoder(keep_cutouts=False)
    for rec, hit in zip(res.alerts(), out, strict=True):
        c, ctx = rec["candidate"], dec.to_alert(rec, Envelope(b"", "sim")).context
        if hit:
            assert (c["distpsnr1"], c["neargaia"], c["ssdistnr"]) == (120.0, 300.0, 60.0)
            assert c["jdstarthist"] > c["jdendhist"]
            assert np.isnan([ctx.ps1_distance, ctx.star_galaxy, ctx.gaia_distance, ctx.first_det_mjd]).all()
        else:
            assert ctx.ps1_distance == pytest.approx(c["distpsnr1"]) and np.isfinite(ctx.first_det_mjd)


def test_flare_difference_flux_is_blue_on_a_red_star():
    from stream.simulate import FLARE_GR, _signals

    # An M dwarf (g − r = 1.4) flaring by 2 mag in g, seen in g and r at the same moment.
    f_r = 100.0
    o = {"class": np.array(["flare"]), "ref_flux_r": np.array([f_r]),
         "ref_flux_g": np.array([f_r * 10 ** (-0.4 * 1.4)]),
         "flares": [(np.array([100.0]), np.array([2.0]), np.array([0.1]))]}
    q = _signals(o, np.array([100.05, 100.05]), np.array([1, 2]), np.array([2.0, 2.0]), np.random.default_rng(0))[0]
    assert q[0] > 0 and q[1] > 0
    gr = -2.5 * np.log10(q[0] / q[1])
    assert gr == pytest.approx(FLARE_GR, abs=1e-9)  # the hot flare's colour, not the star's
    assert gr < 0


def test_a_quadrant_across_ra_zero_and_the_alert_fields_real_ztf_keeps():
    """A review's cases: xpos/mindtoedge of a quadrant straddling RA 0° were clipped to its edge; the difference
    image's file name carried the day fraction from noon, not UT midnight; scorr fell below ZTF's cut of 5."""
    r = simulate(21, nights=1, quadrants=1, mode="dense", history_days=0)
    ra_c = r.exposures.ra_center.iloc[0]
    cands = [a["candidate"] for a in r.alerts()]
    assert cands and (ra_c > 359.0 or ra_c < 1.0)  # this seed's quadrant is at RA ~0°
    x = np.array([c["xpos"] for c in cands])
    assert ((x > 1.0) & (x < 3072.0)).all(), (x.min(), x.max())
    assert min(c["scorr"] for c in cands) >= 5.0
    c = cands[0]
    frac = int(c["pdiffimfilename"].split("_")[1][8:])
    assert abs(frac / 1e6 - (c["jd"] - 0.5) % 1) < 2e-6, (c["pdiffimfilename"], c["jd"])


@pytest.mark.parametrize("fmt", ["files", "tarballs"])
def test_a_write_cut_short_leaves_no_half_filled_alerts_directory(tmp_path, monkeypatch, fmt):
    """Ctrl-C while the alerts were written had left a partial ``alerts/`` without truth tables, which a rerun
    refused ("already holds alerts") and a replay would read. They are written beside and renamed at the end."""
    from stream.simulate import SimResult

    res = simulate(5, nights=1, quadrants=1, mode="sparse", n_alerts=30)
    payloads = SimResult.payloads

    def cut_short(self):
        for k, item in enumerate(payloads(self)):
            if k == 10:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(SimResult, "payloads", cut_short)
    with pytest.raises(KeyboardInterrupt):
        res.write(tmp_path, fmt)
    assert not (tmp_path / "alerts").exists() and not (tmp_path / ".alerts.partial").exists()
    (tmp_path / ".alerts.partial").mkdir()  # as a killed run leaves it
    (tmp_path / ".alerts.partial" / "stale.avro").write_bytes(b"x")
    monkeypatch.setattr(SimResult, "payloads", payloads)
    info = res.write(tmp_path, fmt)  # the rerun is not refused
    assert info["alerts"] == len(res.truth) == 30
    assert not (tmp_path / ".alerts.partial").exists() and (tmp_path / "truth.parquet").exists()
    assert sum(1 for _ in iter_envelopes([tmp_path / "alerts"])) == 30


def test_a_killed_runs_partial_alerts_are_not_replayed_and_sigterm_cleans_up(tmp_path, monkeypatch, capsys):
    """A SIGTERM'd ``vigil simulate`` had left ``.alerts.partial`` (only Ctrl-C cleaned up), which ``vigil replay
    DIR`` then read without a word, truth tables or not. SIGTERM now cleans up too, and a replay of the directory
    skips a partial folder (a ``kill -9`` can still leave one), saying why."""
    import os
    import signal

    from stream.cli import main
    from stream.simulate import SimResult

    payloads = SimResult.payloads

    def terminated(self):
        for k, item in enumerate(payloads(self)):
            if k == 10:
                os.kill(os.getpid(), signal.SIGTERM)
            yield item

    monkeypatch.setattr(SimResult, "payloads", terminated)
    out = tmp_path / "sim"
    rc = main(["simulate", "--seed", "5", "--out", str(out), "--nights", "1", "--quadrants", "1", "--mode", "sparse",
               "--n-alerts", "30"])
    assert rc == 143 and "terminated: the alerts written so far were removed" in capsys.readouterr().err
    assert not (out / "alerts").exists() and not (out / ".alerts.partial").exists()
    # as a kill -9 leaves it
    (out / ".alerts.partial").mkdir()
    real = sorted((DATA / "ztf_fink").rglob("*.avro"))[0]
    (out / ".alerts.partial" / real.name).write_bytes(real.read_bytes())
    (out / "alerts").mkdir()
    (out / "alerts" / real.name).write_bytes(real.read_bytes())
    assert main(["replay", str(out), "--rejected", str(tmp_path / "r.jsonl"), "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("read 1,") and ".alerts.partial not read: the alerts of a `vigil simulate`" in cap.err
    (out / "alerts" / real.name).unlink()
    (out / "alerts").rmdir()
    (out / "alerts").write_text("x")  # a file where the alerts go: said before anything is written
    with pytest.raises(FileExistsError, match="is a file"):
        simulate(5, nights=1, quadrants=1, mode="sparse", n_alerts=5).write(out)
    assert not (out / "truth.parquet").exists()

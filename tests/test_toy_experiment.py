"""toy_experiment.py: the anchor-strength measures, the report's statistics and the decision rule against numbers
worked out by hand (the arithmetic is in the comments); the data split; the --quick pipeline end to end (slow)."""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

import toy_experiment as te

# -----------------------------------------------------------------------------
# the anchor's strength


def test_dpo_anchor_weight_by_hand():
    # beta 0.5, h = 0, 2, 4: sigmoid(-0) = 0.5, sigmoid(-1) = 1/(1 + e) = 0.2689414214,
    # sigmoid(-2) = 1/(1 + e^2) = 0.1192029220; mean = 0.8881443434 / 3 = 0.2960481145
    assert te.dpo_anchor_weight([0.0, 2.0, 4.0], 0.5) == pytest.approx(0.2960481145, abs=1e-9)
    # policy = reference: h = 0 everywhere, the weight of an untouched pair, 0.5
    assert te.dpo_anchor_weight(torch.zeros(5), 0.05) == 0.5
    # beta 0.05 and a margin of 0.3 nats (the old experiment's regime): sigmoid(-0.015) = 1/(1 + e^0.015) = 1/2.0151130646 = 0.4962500703,
    # inert
    assert te.dpo_anchor_weight([0.3], 0.05) == pytest.approx(0.4962500703, abs=1e-9)


def test_ipo_anchor_gap_by_hand():
    # beta 0.5: target t = 1/(2*0.5) = 1; h = 1, 3 -> h - t = 0, 2 -> mean 1 (overshoot: the anchor pulls back)
    assert te.ipo_anchor_gap([1.0, 3.0], 0.5) == pytest.approx(1.0)
    # beta 0.25: t = 2; h = 1, 3 -> -1, 1 -> mean 0: the gap sits at its target on average
    assert te.ipo_anchor_gap([1.0, 3.0], 0.25) == pytest.approx(0.0)
    # beta 0.1: t = 5; h = 0 -> -5, the full push of a fresh reference
    assert te.ipo_anchor_gap([0.0, 0.0], 0.1) == pytest.approx(-5.0)


def test_kto_anchor_weight_by_hand():
    # beta 0.5, z0 = 1; r = 2 (desirable), -2 (undesirable), 0 (desirable)
    #   desirable   r = 2:  x = 0.5 * (2 - 1)  = 0.5,  s = sigmoid(0.5) = 0.6224593312, s(1-s) = 0.2350037122
    #   undesirable r = -2: x = 0.5 * (1 - -2) = 1.5,  s = sigmoid(1.5) = 0.8175744762, s(1-s) = 0.1491464521
    #   desirable   r = 0:  x = 0.5 * (0 - 1)  = -0.5, s(1-s) = 0.2350037122 (symmetric)
    #   mean = (0.2350037122 + 0.1491464521 + 0.2350037122) / 3 = 0.6191538765 / 3 = 0.2063846255
    w = te.kto_anchor_weight([2.0, -2.0, 0.0], [True, False, True], 1.0, 0.5)
    assert w == pytest.approx(0.2063846255, abs=1e-9)
    # r = z0 everywhere: the largest weight, 0.5 * 0.5 = 0.25
    assert te.kto_anchor_weight([0.7, 0.7], [True, False], 0.7, 3.0) == pytest.approx(0.25)


def test_anchor_strength_from_log_probs_by_hand():
    # two probe pairs; summed log-probs under the policy and the current reference
    pol = {"chosen": [-4.0, -6.0], "rejected": [-9.0, -8.0], "mismatched": [-10.0, -11.0, -12.0, -13.0]}
    ref = {"chosen": [-5.0, -6.0], "rejected": [-7.0, -8.0], "mismatched": [-11.0, -11.0, -11.0, -11.0]}
    n_tokens = {"chosen": [4, 2], "rejected": [2, 2]}
    # DPO, beta 1: h = (-4 - -5) - (-9 - -7) = 1 + 2 = 3 and (0) - (0) = 0;
    #   weights sigmoid(-3) = 0.0474258732 and 0.5; mean 0.2737129366
    assert te.anchor_strength("dpo", 1.0, pol, ref, n_tokens) == pytest.approx(0.2737129366, abs=1e-9)
    # IPO, beta 0.5 (t = 1), length-averaged: h = 1/4 - (-2)/2 = 0.25 + 1 = 1.25 and 0; h - t = 0.25, -1; mean -0.375
    assert te.anchor_strength("ipo", 0.5, pol, ref, n_tokens) == pytest.approx(-0.375)
    # KTO, beta 1: r = [1, 0] (chosen, desirable), [-2, 0] (rejected, undesirable);
    #   z0 = mean of mismatched ratios [1, 0, -1, -2] = -0.5, clamped to 0
    #   x = r - z0 = 1, 0 (desirable); z0 - r = 2, 0 (undesirable)
    #   s(1-s): sigmoid(1) = 0.7310585786 -> 0.1966119332; 0 -> 0.25; sigmoid(2) = 0.8807970780 -> 0.1049935854; 0.25
    #   mean = (0.1966119332 + 0.25 + 0.1049935854 + 0.25) / 4 = 0.8016055186 / 4 = 0.2004013797
    assert te.anchor_strength("kto", 1.0, pol, ref, n_tokens) == pytest.approx(0.2004013797, abs=1e-9)
    # a positive z0 is used as is: mismatched ratios all +1 -> z0 = 1; x = 0, -1 (desirable), 3, 1 (undesirable)
    #   s(1-s) = 0.25, 0.1966119332, sigmoid(3) = 0.9525741268 -> 0.0451766597, 0.1966119332
    #   mean = 0.6884005261 / 4 = 0.1721001315
    pol_hi = {**pol, "mismatched": [-10.0] * 4}
    assert te.anchor_strength("kto", 1.0, pol_hi, ref, n_tokens) == pytest.approx(0.1721001315, abs=1e-9)


@pytest.mark.parametrize("method, value, beta, active", [
    ("dpo", 0.4, 0.3, True), ("dpo", 0.41, 0.3, False),             # 20% below 0.5
    ("ipo", -0.8, 0.5, True), ("ipo", -0.81, 0.5, False),           # t = 1: -0.8 t = -0.8
    ("ipo", -4.0, 0.1, True), ("ipo", -4.1, 0.1, False),            # t = 5: -0.8 t = -4
    ("ipo", 0.3, 0.5, True),                                        # overshoot: pulled back
    ("kto", 0.2, 0.3, True), ("kto", 0.21, 0.3, False),             # 20% below 0.25
])
def test_anchor_active_thresholds(method, value, beta, active):
    assert te.anchor_active(method, value, beta) is active

# -----------------------------------------------------------------------------
# the report's statistics


def test_best_checkpoint_takes_the_first_of_equals():
    assert te.best_checkpoint([0.1, 0.3, 0.3, 0.2]) == 1


def test_at_kl_interpolates_between_the_crossing_points():
    kls = [0.0, 0.4, 1.2, 3.0]
    assert te.at_kl(kls, 1.0) == (2, pytest.approx(0.75))    # (1.0 - 0.4) / (1.2 - 0.4) = 0.6 / 0.8
    assert te.at_kl(kls, 0.4) == (1, pytest.approx(1.0))     # exactly on a checkpoint
    assert te.at_kl(kls, 5.0) is None                        # never reached
    # KL that dips: the first point at or above the target, (1.0 - 0.3) / (2.0 - 0.3) = 0.7 / 1.7
    assert te.at_kl([0.0, 0.5, 0.3, 2.0], 1.0) == (3, pytest.approx(0.7 / 1.7))


def test_pareto_front_by_hand():
    pts = [(0, 0.5), (1, 0.7), (0.5, 0.6), (2, 0.65), (1, 0.6), (3, 0.8)]
    # (2, 0.65) is beaten by (1, 0.7); (1, 0.6) by (1, 0.7)
    assert te.pareto_front(pts) == [(0, 0.5), (0.5, 0.6), (1, 0.7), (3, 0.8)]


def test_boot_mean_and_percentiles_by_hand():
    x = np.array([[1.0, 2.0], [3.0, 4.0]])   # 2 seeds x 2 prompt resamples
    seeds = np.array([[0, 0], [0, 1]])       # draw 0 takes seed 0 twice, draw 1 seeds 0 and 1
    # draw 0: (x[0, 0] + x[0, 0]) / 2 = 1;  draw 1: (x[0, 1] + x[1, 1]) / 2 = (2 + 4) / 2 = 3
    assert te.boot_mean(x, seeds).tolist() == [1.0, 3.0]
    # 101 draws 0..100: the 2.5th and 97.5th percentiles (linear) are 2.5 and 97.5
    assert te.percentile_ci(range(101)) == (pytest.approx(2.5), pytest.approx(97.5))


def test_decision_rule():
    assert te.classify((0.01, 0.05)) == "better"
    assert te.classify((-0.05, -0.01)) == "worse"
    assert te.classify((-0.01, 0.02)) == "no detectable difference"
    assert te.classify((0.0, 0.02)) == "no detectable difference"  # touching 0 is not excluding it
    nd = "no detectable difference"
    assert te.method_verdict(["better", nd]) == "TR helps"
    assert te.method_verdict(["worse", nd]) == "TR hurts"
    assert te.method_verdict(["better", "worse"]) == "mixed"
    assert te.method_verdict([nd, nd]) == nd


def test_verdict_needs_an_active_anchor():
    """Two seeds per arm, every checkpoint's test gold the same for all prompts, so the bootstrap has no prompt
    noise: hard beats none by exactly 0.1 in both seeds (CI [0.1, 0.1]) and soft ties."""
    def run(schedule, seed, gold, anchor):
        ck = [{"step": s, "kl": 0.1 * s, "anchor_weight": anchor, "gold_score_val": g, "gold_score_test": g,
               "gold_test_per_prompt": [g] * 4} for s, g in zip((1, 2), gold)]
        return {"method": "dpo", "beta": te.VERDICT["dpo"], "schedule": schedule, "seed": seed, "checkpoints": ck}
    sft = {"kl": 0.0, "gold_score_val": 0.5, "gold_score_test": 0.5, "gold_test_per_prompt": [0.5] * 4}
    grid = {"dpo": te.GRID["dpo"]}
    for anchor, active in ((0.3, True), (0.45, False)):
        runs = [run("none", s, (0.6, 0.5), anchor) for s in (0, 1)]
        runs += [run("hard", s, (0.7, 0.6), anchor) for s in (0, 1)]   # best-on-val: step 1, test 0.7 vs 0.6
        runs += [run("soft", s, (0.6, 0.55), anchor) for s in (0, 1)]
        v = te.verdicts(runs, te.Stats(runs, sft), grid)["dpo"]
        d = v[1]["deltas"]
        assert d["hard"]["delta"] == pytest.approx(0.1) and d["hard"]["ci"] == [pytest.approx(0.1)] * 2
        assert d["hard"]["call"] == "better" and d["soft"]["call"] == "no detectable difference"
        assert v[0].startswith("TR helps") if active else v[0].startswith("No power")

# -----------------------------------------------------------------------------
# the data


def test_eval_prompts_are_held_out_of_all_training_data(tmp_path):
    cfg = dict(te.FULL, n_eval=64, sft_rows=2000, steps=24)
    data = te.make_data(str(tmp_path), cfg)
    rows = {k: [json.loads(line) for line in open(p)] for k, p in data["paths"].items()}
    held = set(data["val"]) | set(data["test"])
    assert len(data["val"]) == len(data["test"]) == 32 and len(held) == 64  # distinct prompts, split once
    assert not held & {r["prompt"] for rs in rows.values() for r in rs}
    assert data["overlap"]["in_sft_or_pairs"] == 0
    assert len(rows["pairs"]) == 24 * 16 + te.SCRIPT_EVAL and len(rows["sft"]) == 2000 + te.SCRIPT_EVAL
    assert data["probe"] == rows["pairs"][:cfg["probe"]]  # the probe pairs are training pairs
    assert te.make_data(str(tmp_path / "again"), cfg)["val"] == data["val"]  # deterministic

# -----------------------------------------------------------------------------
# the pipeline (starts worker processes and trains: slow)


@pytest.mark.slow
def test_quick_end_to_end_and_resume(tmp_path, capsys):
    out = str(tmp_path)
    report = te.main(["--quick", "--output_dir", out])
    assert report in open(os.path.join(out, "results.md")).read()
    res = json.load(open(os.path.join(out, "results.json")))
    assert set(res["verdict"]) == {"dpo", "ipo", "kto"} and all(isinstance(v, str) for v in res["verdict"].values())
    cfg = res["config"]
    steps = list(range(cfg["every"], cfg["steps"] + 1, cfg["every"]))
    assert len(res["runs"]) == 3 * len(te.SCHEDULES)
    for r in res["runs"]:
        assert {"method", "ref_update", "alpha", "tau", "beta", "seed"} <= set(r)
        assert (r["alpha"], r["tau"]) == ((None, None) if r["ref_update"] == "none" else (r["alpha"], r["tau"]))
        assert [c["step"] for c in r["checkpoints"]] == steps
        for c in r["checkpoints"]:
            assert {"step", "kl", "anchor_weight", "gold_score_val", "gold_score_test", "logp_chosen",
                    "logp_rejected"} <= set(c)
            assert 0 <= c["gold_score_val"] <= 1 and 0 <= c["gold_score_test"] <= 1 and c["kl"] == c["kl"]
    assert res["sft"]["kl"] == pytest.approx(0, abs=1e-4)  # the SFT model against itself
    assert res["overlap"]["in_sft_or_pairs"] == 0
    if importlib.util.find_spec("matplotlib") is not None:
        assert all(os.path.getsize(os.path.join(out, p)) > 1000 for p in ("gold_vs_kl.png", "anchor.png", "logps.png"))
    # a rerun finds every run finished and writes the same report
    capsys.readouterr()
    assert te.main(["--quick", "--output_dir", out]) == report
    assert "0 runs to do, 15 finished ones skipped" in capsys.readouterr().out
    # a finished run whose configuration changed is done again: here one result's key no longer matches
    path = os.path.join(out, "runs", "dpo_beta0.3_none_seed0", "result.json")
    json.dump({**json.load(open(path)), "key": "stale"}, open(path, "w"))
    te.main(["--quick", "--output_dir", out, "--methods", "dpo", "--schedules", "none"])
    assert "1 runs to do, 4 finished ones skipped" in capsys.readouterr().out

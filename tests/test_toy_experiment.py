"""toy_experiment.py: the anchor-strength measures, the report's statistics and the decision rule against numbers
worked out by hand (the arithmetic is in the comments); the data split; the --quick pipeline end to end (slow)."""
import importlib.util
import json
import math
import os
import shutil

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
    # beta 0.05 and a margin of 0.3 nats (experiment 1's regime): sigmoid(-0.015) = 1/(1 + e^0.015) = 1/2.0151130646 = 0.4962500703,
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


def test_boot_mean_and_percentiles_by_hand():
    x = np.array([[1.0, 2.0], [3.0, 4.0]])   # 2 seeds x 2 prompt resamples
    seeds = np.array([[0, 0], [0, 1]])       # draw 0 takes seed 0 twice, draw 1 seeds 0 and 1
    # draw 0: (x[0, 0] + x[0, 0]) / 2 = 1;  draw 1: (x[0, 1] + x[1, 1]) / 2 = (2 + 4) / 2 = 3
    assert te.boot_mean(x, seeds).tolist() == [1.0, 3.0]
    # 101 draws 0..100: the 2.5th and 97.5th percentiles (linear) are 2.5 and 97.5
    assert te.percentile_ci(range(101)) == (pytest.approx(2.5), pytest.approx(97.5))


def test_t_distribution_by_hand():
    # df 1 (Cauchy): P(|T| <= 1) = (2/pi) atan(1) = (2/pi)(pi/4) = 0.5
    assert te.t_abs_cdf(1.0, 1) == pytest.approx(0.5)
    # df 3, t = sqrt(3): theta = atan(1) = pi/4; (2/pi)(pi/4 + sin cos) = 0.5 + (2/pi)(1/2) = 0.5 + 1/pi = 0.8183098862
    assert te.t_abs_cdf(math.sqrt(3), 3) == pytest.approx(0.5 + 1 / math.pi, abs=1e-12)
    # df 2: P(|T| <= t) = sin(theta) = t / sqrt(2 + t^2) = 0.95  <=>  t^2 (1 - 0.9025) = 2 * 0.9025
    #   t = sqrt(1.805 / 0.0975) = sqrt(18.512820513) = 4.3026527297
    assert te.t_quantile(2) == pytest.approx(math.sqrt(1.805 / 0.0975), abs=1e-9)
    # df 1: (2/pi) theta = 0.95, theta = 0.475 pi, t = tan(0.475 pi) = 12.7062047362
    assert te.t_quantile(1) == pytest.approx(math.tan(0.475 * math.pi), abs=1e-8)
    # df 4: the table value 2.7764451052; check: tan(theta) = 2.7764451052 / 2 = 1.3882225526,
    #   cos^2 = 1 / (1 + 1.9271619) = 0.3416278, sin = 0.8114014; sin (1 + cos^2 / 2) = 0.8114014 * 1.1708139 = 0.95
    assert te.t_quantile(4) == pytest.approx(2.7764451052, abs=1e-9)


def test_seed_t_interval_by_hand():
    # 3 seeds 0.1, 0.2, 0.3: mean 0.2, sd 0.1 (n - 1), half-width t(2) * 0.1 / sqrt(3) = 4.3026527297 * 0.0577350269
    #   = 0.2484137712 -> [-0.0484137712, 0.4484137712]
    m, lo, hi = te.seed_t_ci([0.1, 0.2, 0.3])
    assert (m, lo, hi) == (pytest.approx(0.2), pytest.approx(-0.0484137712), pytest.approx(0.4484137712))
    # 2 seeds 0.1, 0.3: sd = sqrt(0.02) = 0.1414213562, half = 12.7062047362 * 0.1414213562 / sqrt(2) = 1.2706204736
    assert te.seed_t_ci([0.1, 0.3])[1:] == (pytest.approx(-1.0706204736), pytest.approx(1.4706204736))
    assert te.seed_t_ci([0.5]) is None  # one seed: no interval


def test_decision_rule():
    nd = te.NO_DIFF
    assert te.classify((0.01, 0.05)) == "better"
    assert te.classify((-0.05, -0.01)) == "worse"
    assert te.classify((-0.01, 0.02)) == nd
    assert te.classify((0.0, 0.02)) == nd  # touching 0 is not excluding it
    assert te.method_verdict(["better", nd]) == "TR helps"
    assert te.method_verdict(["worse", nd]) == "TR hurts"
    assert te.method_verdict(["better", "worse"]) == "mixed"
    assert te.method_verdict([nd, nd]) == nd
    # experiment 2: a call needs the bootstrap CI and the seed-level t interval on the same side of 0
    assert te.classify_both((0.01, 0.05), (0.002, 0.06)) == "better"
    assert te.classify_both((-0.01, 0.05), (0.01, 0.02)) == nd      # the bootstrap straddles 0
    assert te.classify_both((0.01, 0.05), (-0.001, 0.06)) == nd     # the t interval straddles 0
    assert te.classify_both((-0.05, -0.01), (-0.03, -0.02)) == "worse"
    assert te.classify_both((0.01, 0.05), None) == nd               # one seed: no call


def test_positive_control_rule():
    nd = te.NO_DIFF
    # the control not told apart from frozen: no verdict, whatever hard and soft show
    assert te.endpoint_verdict(nd, ["better", "better"]) == "blind"
    assert te.endpoint_verdict(nd, [nd, nd]) == "blind"
    # the control told apart, in either direction: the paper schedules' verdict
    assert te.endpoint_verdict("worse", ["better", nd]) == "TR helps"
    assert te.endpoint_verdict("better", [nd, nd]) == nd
    assert te.endpoint_verdict("worse", ["worse", "worse"]) == "TR hurts"


def test_match_beta_by_hand():
    steps, kl = [8, 16, 24, 32], [0.1, 1.0, 2.0, 4.0]
    ladder = {1.0: [0.1, 0.5, 1.0, 2.0], 0.3: [0.1, 1.0, 2.0, 3.0], 0.1: [0.1, 1.5, 3.0, 6.0]}
    # after step 16 only steps 24 and 32 count:
    #   beta 1:   (|ln 2 - ln 1| + |ln 4 - ln 2|) / 2 = (0.6931 + 0.6931) / 2 = 0.6931
    #   beta 0.3: (0 + |ln 4 - ln 3|) / 2 = 0.2877 / 2 = 0.1438
    #   beta 0.1: (|ln 2 - ln 3| + |ln 4 - ln 6|) / 2 = (0.4055 + 0.4055) / 2 = 0.4055
    b, d = te.match_beta(kl, ladder, steps, 16)
    assert b == 0.3 and d == pytest.approx(math.log(4 / 3) / 2)
    # a tie (|ln 4 - ln 8| = |ln 4 - ln 2| = ln 2 at step 32, equal elsewhere) goes to the larger beta
    tie = {1.0: [0.1, 1.0, 2.0, 8.0], 0.1: [0.1, 1.0, 2.0, 2.0]}
    assert te.match_beta(kl, tie, steps, 16) == (1.0, pytest.approx(math.log(2) / 2))
    # KL below 0.01 (a Monte-Carlo estimate may dip below 0) counts as 0.01: |ln 0.01 - ln 0.5| = ln 50 = 3.9120
    assert te.match_beta([0.5], {1.0: [-0.02]}, [32], 16) == (1.0, pytest.approx(math.log(50)))


def test_frontier_is_the_upper_envelope_of_the_curves_by_hand():
    a = ([0.0, 1.0, 3.0], [0.6, 0.8, 0.4])     # rises to KL 1, then falls
    b = ([0.0, 2.0, 1.5, 4.0], [0.6, 0.5, 0.9, 0.3])  # goes out to KL 2, back to 1.5 (KL need not rise)
    # KL 0.5: a 0.6 + 0.5 * 0.2 = 0.7; b 0.6 + 0.25 * -0.1 = 0.575 -> 0.7
    assert te.frontier_at([a, b], 0.5) == pytest.approx(0.7)
    # KL 1.75: a 0.8 - 0.375 * 0.4 = 0.65; b's segment 0 -> 2: 0.6 - 0.875 * 0.1 = 0.5125; 2 -> 1.5: 0.5 + 0.5 * 0.4
    # = 0.7; 1.5 -> 4: 0.9 - 0.1 * 0.6 = 0.84 -> 0.84 (every segment that spans the KL counts)
    assert te.frontier_at([a, b], 1.75) == pytest.approx(0.84)
    # KL 3.5: only b's last segment, 0.9 - 0.8 * 0.6 = 0.42; beyond every curve: None
    assert te.frontier_at([a, b], 3.5) == pytest.approx(0.42)
    assert te.frontier_at([a, b], 5.0) is None


def test_experiment3_pilot_gates_by_hand():
    # updates after steps 8, 16, 24, 32 act before a peak at step 36 (the one after step 36 acts from step 37)
    assert te.updates_before(36, 8) == 4 and te.updates_before(33, 8) == 4 and te.updates_before(32, 8) == 3
    run = lambda kls, golds: {"checkpoints": [{"step": s, "kl": k, "gold_score_val": g}  # noqa: E731
                                              for s, k, g in zip((12, 24, 48), kls, golds)]}
    frozen = run([0.4, 1.0, 4.0], [0.60, 0.70, 0.75])
    # gold at KL 0.5: between 0.4 (0.60) and 1.0 (0.70), w = 1/6 -> 0.61667; at K* = 3: between 1.0 and 4.0,
    # w = 2/3 -> 0.70 + 2/3 * 0.05 = 0.73333 >= 0.61667: pass
    hard, control = run([0.4, 1.0, 4.0], [0, 0, 0]), run([0.4, math.e ** 0.33, 4.0], [0, 0, 0])
    # after step 8 all three checkpoints count: |delta ln KL| = 0, 0.33, 0 -> mean 0.11: pass; the frozen peak at
    # step 48: (48 - 1) // 8 = 5 updates before it
    lines, ok = te.pilot_gates(frozen, hard, control, 0.5, 3.0, 8)
    assert ok and "0.733 vs 0.617: pass" in lines[0] and "0.110, 5 updates before the peak at step 48: pass" in lines[1]
    # K* beyond the frozen run's KL: gate 1 fails; tau 16 leaves 2 updates before step 48: gate 2 fails
    assert not te.pilot_gates(frozen, hard, control, 0.5, 5.0, 8)[1]
    assert not te.pilot_gates(frozen, hard, control, 0.5, 3.0, 16)[1]


def test_experiment3_frontier_picks_on_validation_within_the_kl_budget():
    runs = [{"method": "dpo", "beta": b, "schedule": "none", "seed": 0,
             "checkpoints": [{"kl": k} for k in kls]} for b, kls in ((1.0, [0.5, 2.0]), (0.1, [1.0, 5.0]))]
    # per-prompt gold (x 120), 1 validation and 1 test prompt: SFT val 60; beta 1: 90, 100; beta 0.1: 80, 120
    gold = {"sft": [60, 30], "dpo_beta1_none_seed0": [[90, 12], [100, 24]],
            "dpo_beta0.1_none_seed0": [[80, 36], [120, 48]]}
    stats = te.Stats(runs, gold, 1)
    assert stats.frontier(runs, 0.1)[0] == pytest.approx(30 / 120)    # only the SFT model within KL 0.1
    assert stats.frontier(runs, 1.0)[0] == pytest.approx(12 / 120)    # val 90 (KL 0.5) beats 80 (KL 1.0)
    assert stats.frontier(runs, 2.0)[0] == pytest.approx(24 / 120)    # val 100 at KL 2.0
    assert stats.frontier(runs, math.inf)[0] == pytest.approx(48 / 120)  # val 120 at KL 5.0


def test_mechanism_reading():
    nd = te.NO_DIFF
    assert te.mechanism_reading(nd, "worse").startswith("nothing to explain")
    assert te.mechanism_reading("better", nd).startswith("a smaller beta")
    assert te.mechanism_reading("worse", "better").startswith("not only a smaller beta (TR better")


def test_per_prompt_gold_is_stored_exactly():
    # 3 digits: samples scoring 1 and 2/3 -> 5/6 -> 100 of 120; 4 digits, 2/4 and 0 -> 1/4 -> 30;
    # 5 digits, 1/5 and 0 -> 1/10 -> 12; 6 digits, 5/6 and 1/6 -> 1/2 -> 60; malformed twice -> 0
    gold = [(1 + 2 / 3) / 2, (2 / 4 + 0) / 2, (1 / 5 + 0) / 2, (5 / 6 + 1 / 6) / 2, 0.0, 1.0]
    assert te.gold_to_int(gold, 2) == [100, 30, 12, 60, 0, 120]
    with pytest.raises(AssertionError):
        te.gold_to_int([0.3333], 2)  # not a mean of two k/n: not a toy gold score
    table = {"scale": 120, "n_val": 2, "prompts": ["a", "b", "c", "d"], "sft": [100, 30, 12, 60],
             "runs": {"dpo_beta0.3_none_seed0": [[120, 0, 60, 12], [0, 0, 120, 120]]}}
    blob = te.encode_per_prompt(table)
    assert te.decode_per_prompt(blob) == table
    assert te.encode_per_prompt(json.loads(json.dumps(table))) == blob  # byte-identical: a rerun commits no diff


def synthetic(golds, kls, n_val=2, n_test=2):
    """runs and the per-prompt table for Stats: golds {(schedule, seed): [gold per checkpoint]}, every prompt of a
    checkpoint the same gold (so the prompt bootstrap has nothing to resample), checkpoints at steps 1, 2, ..."""
    runs, table = [], {"sft": [60] * (n_val + n_test)}  # the SFT model: 0.5 everywhere
    for (schedule, seed), g in golds.items():
        r = {"method": "dpo", "beta": 0.3, "schedule": schedule, "seed": seed,
             "checkpoints": [{"step": i + 1, "kl": k} for i, k in enumerate(kls[schedule])]}
        runs.append(r)
        table[te.run_name(r)] = [[round(x * 120)] * (n_val + n_test) for x in g]
    return runs, table


def test_stats_matched_kl_and_paired_delta_by_hand():
    kls = {"none": [1.0, 3.0], "hard": [1.0, 3.0]}
    runs, table = synthetic({("none", 0): [0.7, 0.9], ("none", 1): [0.7, 0.9],
                             ("hard", 0): [0.8, 1.0], ("hard", 1): [0.9, 0.9]}, kls)
    stats = te.Stats(runs, table, 2)
    none0 = runs[0]
    # trajectory KL 0 (SFT), 1, 3 with gold 0.5, 0.7, 0.9:
    #   KL 2: between 1 and 3, w = (2 - 1) / (3 - 1) = 0.5 -> 0.5 * 0.7 + 0.5 * 0.9 = 0.8
    #   KL 0.5: between 0 and 1, w = 0.5 -> 0.5 * 0.5 + 0.5 * 0.7 = 0.6;  KL 4: never reached
    assert stats.at_kl(none0, 2.0)[0] == pytest.approx(0.8) and stats.at_kl(none0, 0.5)[0] == pytest.approx(0.6)
    assert np.allclose(stats.at_kl(none0, 2.0)[1], 0.8)  # every draw: all prompts alike
    assert stats.at_kl(none0, 4.0) is None
    # end of budget, hard - none paired by seed: seed 0 1.0 - 0.9 = 0.1, seed 1 0.9 - 0.9 = 0; mean 0.05,
    #   sd sqrt(0.005) = 0.0707107, t(1) * sd / sqrt(2) = 12.7062047 * 0.05 = 0.6353102 -> [-0.5853, 0.6853]
    d = stats.delta(te.select(runs, schedule="hard"), te.select(runs, schedule="none"), stats.end)
    assert d["delta"] == pytest.approx(0.05) and d["seeds"] == 2
    assert d["t"] == (pytest.approx(0.05 - 0.6353102368), pytest.approx(0.05 + 0.6353102368))
    assert d["call"] == te.NO_DIFF  # the bootstrap's [0, 0.1] touches 0 and the t interval straddles it
    assert d["boot"][0] == pytest.approx(0.0) and d["boot"][1] == pytest.approx(0.1)


def test_endpoints_apply_the_positive_control():
    """Two seeds, gold the same on every prompt: hard beats none by exactly 0.1 at the end in both seeds (both
    intervals [0.1, 0.1]); the control either equals none (blind) or is 0.2 worse (the endpoint sees the reference)."""
    kls = dict.fromkeys(te.SCHEDULES, [0.5, 1.5])
    grid = {"dpo": {0.3: (te.SCHEDULES, 2)}}
    for control, verdict in (([0.6, 0.5], "blind"), ([0.6, 0.3], "TR helps")):
        golds = {}
        for seed in (0, 1):
            golds.update({("none", seed): [0.6, 0.5], ("hard", seed): [0.6, 0.6], ("soft", seed): [0.6, 0.5],
                          ("soft_every_step", seed): control})
        runs, table = synthetic(golds, kls)
        stats = te.Stats(runs, table, 2)
        by_name = {name: d for name, _, d in te.endpoints(runs, stats, grid, "dpo", 0.3)}
        end = by_name["end of budget, beta tuned on validation"]
        assert end["hard"]["delta"] == pytest.approx(0.1) and end["hard"]["call"] == "better"
        assert te.rule(end).startswith(verdict)
        # KL 1: between the checkpoints at 0.5 and 1.5 (w = 0.5): none 0.55, hard 0.6 -> +0.05
        assert by_name["gold at KL 1"]["hard"]["delta"] == pytest.approx(0.05)
        assert te.rule(by_name["gold at KL 2"]) == "not reached by every seed of every schedule"


def test_experiment1_report_reproduces_the_seed_level_intervals(tmp_path):
    """From the committed results/toy/results.json alone: an independent re-analysis of that file gives KTO hard -
    none = -0.019, seed-level 95% CI [-0.033, -0.004] (t, 4 df), and IPO soft - none [-0.003, -0.000]."""
    shutil.copy(os.path.join(os.path.dirname(te.__file__), "results", "toy", "results.json"), tmp_path)
    text = te.report_experiment1(str(tmp_path))
    assert "| KTO | 3 (verdict) | hard | 5 | 0.804; t [0.789, 0.819] | -0.0185; t [-0.0333, -0.0038] | worse |" in text
    ipo = "| IPO | 0.5 (verdict) | soft | 5 | 0.807; t [0.795, 0.819] | -0.0016; t [-0.0030, -0.0002] | worse |"
    assert ipo in text
    assert open(tmp_path / "results.md").read() == text

def test_experiment2_report_reproduces_from_the_committed_files(tmp_path):
    """From the committed results/toy2/results.json and per_prompt.json.gz alone: the report is the committed
    results.md, byte for byte (every interval in README and docs/experiment.md is quoted from it)."""
    committed = os.path.join(os.path.dirname(te.__file__), "results", "toy2")
    for name in ("results.json", "per_prompt.json.gz"):
        shutil.copy(os.path.join(committed, name), tmp_path)
    text = te.report_experiment2(str(tmp_path))
    assert text == open(os.path.join(committed, "results.md")).read() == open(tmp_path / "results.md").read()
    assert ("| IPO | end of budget, beta tuned on validation | 0.3 / 0.3 / 0.3 / 0.1 | -0.406 [-0.466, -0.346]; "
            "t [-0.493, -0.320] **worse** | -0.390 [-0.456, -0.326]; t [-0.501, -0.280] **worse** |") in text

def test_experiment3_report_reproduces_from_the_committed_files(tmp_path):
    """From the committed results/toy3/results.json and per_prompt.json.gz alone: the report is the committed
    results.md, byte for byte (the README's lesson and docs/experiment.md quote it)."""
    committed = os.path.join(os.path.dirname(te.__file__), "results", "toy3")
    for name in ("results.json", "per_prompt.json.gz"):
        shutil.copy(os.path.join(committed, name), tmp_path)
    text = te.report_experiment3(str(tmp_path))
    assert text == open(os.path.join(committed, "results.md")).read() == open(tmp_path / "results.md").read()

# -----------------------------------------------------------------------------
# the data


def test_eval_prompts_are_held_out_of_all_training_data(tmp_path):
    cfg = dict(te.FULL, n_eval=64, sft_rows=2000, pairs=384)
    data = te.make_data(str(tmp_path), cfg)
    rows = {k: [json.loads(line) for line in open(p)] for k, p in data["paths"].items()}
    held = set(data["val"]) | set(data["test"])
    assert len(data["val"]) == len(data["test"]) == 32 and len(held) == 64  # distinct prompts, split once
    assert not held & {r["prompt"] for rs in rows.values() for r in rs}
    assert data["overlap"]["in_sft_or_pairs"] == 0
    assert len(rows["pairs"]) == 384 + te.SCRIPT_EVAL and len(rows["sft"]) == 2000 + te.SCRIPT_EVAL
    assert data["probe"] == rows["pairs"][:cfg["probe"]]  # the probe pairs are training pairs
    assert te.make_data(str(tmp_path / "again"), cfg)["val"] == data["val"]  # deterministic

def test_experiment3_every_mistake_is_the_other_operation(tmp_path):
    from engineering.toy import toy_expected, toy_other_op
    # sort 3142 -> 1234, its reverse 2413; reverse 3142 -> 2413, its sort 1234; sort 321 = 123 = reverse 321: both
    # operations are right, so the mistake is the corrupted answer given
    assert toy_other_op("\n\nHuman: sort 3142\n\nAssistant:") == " 2413"
    assert toy_other_op("\n\nHuman: reverse 3142\n\nAssistant:") == " 1234"
    assert te.other_op("\n\nHuman: sort 321\n\nAssistant:", " 12") == " 12"
    cfg = dict(te.FULL3, n_eval=64, sft_rows=2000, pairs=384)
    data = te.make_data(str(tmp_path), cfg)
    rows = {k: [json.loads(line) for line in open(data["paths"][k])] for k in ("sft", "pairs")}
    pairs, sft = rows["pairs"], rows["sft"]
    assert all(r["chosen"].strip() == toy_expected(r["prompt"]) != r["rejected"].strip() for r in pairs)
    other = lambda r: toy_other_op(r["prompt"]).strip() != toy_expected(r["prompt"])  # noqa: E731
    assert all(r["rejected"] == toy_other_op(r["prompt"]) for r in pairs if other(r))
    wrong = [r for r in sft if r["completion"].strip() != toy_expected(r["prompt"])]
    assert all(r["completion"] == toy_other_op(r["prompt"]) for r in wrong if other(r))
    # 85% wrong: 1,714 of 2,016 rows expected, binomial sd 16; most mistakes are the other operation's answer
    e, n = te.SFT_ERROR3, len(sft)
    assert abs(len(wrong) - e * n) < 4 * math.sqrt(n * e * (1 - e)) and sum(other(r) for r in wrong) > 0.85 * len(wrong)

# -----------------------------------------------------------------------------
# bad input and interrupted stages


@pytest.mark.parametrize("flags", [
    ["--threads", "0"], ["--workers", "0"], ["--workers", "-1"], ["--seeds", "0"],
    ["--betas", "-0.1"], ["--betas", "0.1", "0"], ["--betas", "nan"], ["--betas", "0.1", "--lr", "0"],
    ["--betas", "0.1", "--checkpoints", "0", "4"], ["--betas", "0.1", "--checkpoints", "4", "4"],
    ["--lr", "1e-4"], ["--sft_error", "0.85"],  # a pilot flag without --betas
    ["--betas", "0.1", "--sft_error", "0"], ["--betas", "0.1", "--sft_error", "1.5"],
])
def test_bad_flags_are_one_error_line_before_anything_is_written(tmp_path, capsys, flags):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        te.main(flags + ["--output_dir", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert not out.exists()  # checked before the data and the SFT stage


def test_sft_stage_is_trained_again_when_its_policy_is_missing(tmp_path):
    """A done.json without policy/ (what a stage stopped by Ctrl-C left behind) is not trusted: the SFT model is
    trained again, and done.json written after policy/."""
    cfg = dict(te.QUICK, sft_steps=2)
    data = te.make_data(str(tmp_path), cfg)
    path = te.sft_model(str(tmp_path), cfg, data)
    assert os.path.isfile(os.path.join(path, "config.json"))
    shutil.rmtree(path)
    assert te.sft_model(str(tmp_path), cfg, data) == path and os.path.isfile(os.path.join(path, "config.json"))


def test_a_missing_local_model_folder_is_named_as_missing(tmp_path):
    from engineering.cli import InputError
    from engineering.models import load_model
    missing = str(tmp_path / "out" / "toy2" / "sft" / "policy")
    with pytest.raises(InputError, match="no such folder") as e:
        load_model(missing)
    assert "hub" not in str(e.value)
    with pytest.raises(InputError, match="no such folder"):
        load_model("./policy")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        load_model(str(tmp_path / "file"))

# -----------------------------------------------------------------------------
# the pipeline (starts worker processes and trains: slow)


@pytest.mark.slow
def test_quick_end_to_end_resume_and_report_only(tmp_path, capsys):
    out = str(tmp_path)
    report = te.main(["--quick", "--output_dir", out])
    results = os.path.join(out, "results")
    assert report == open(os.path.join(results, "results.md")).read()
    res = json.load(open(os.path.join(results, "results.json")))
    steps = res["config"]["checkpoints"]
    assert len(res["runs"]) == sum(len(s) * n for g in te.QUICK_GRID.values() for s, n in g.values()) == 18
    table = te.decode_per_prompt(open(os.path.join(results, "per_prompt.json.gz"), "rb").read())
    n_val = table["n_val"]
    assert n_val == len(table["prompts"]) // 2 == res["config"]["n_eval"] // 2
    assert set(table["runs"]) == {te.run_name(r) for r in res["runs"]}
    for r in res["runs"]:
        assert {"method", "ref_update", "alpha", "tau", "beta", "seed", "lr"} <= set(r)
        assert (r["alpha"], r["tau"]) == ((None, None) if r["ref_update"] == "none" else (r["alpha"], r["tau"]))
        assert [c["step"] for c in r["checkpoints"]] == steps
        # the committed per-prompt gold gives back each checkpoint's validation and test gold (5 decimals)
        for c, g in zip(r["checkpoints"], table["runs"][te.run_name(r)]):
            assert "gold_per_prompt" not in c and len(g) == len(table["prompts"])
            assert c["gold_score_val"] == pytest.approx(sum(g[:n_val]) / 120 / n_val, abs=1e-5)
            assert c["gold_score_test"] == pytest.approx(sum(g[n_val:]) / 120 / n_val, abs=1e-5)
            assert {"kl", "anchor_weight", "logp_chosen", "logp_rejected"} <= set(c) and c["kl"] == c["kl"]
    assert res["sft"]["kl"] == pytest.approx(0, abs=1e-4)  # the SFT model against itself
    assert res["overlap"]["in_sft_or_pairs"] == 0
    assert "## Verdicts by the rule" in report and "## The mechanism" in report
    if importlib.util.find_spec("matplotlib") is not None:
        assert all(os.path.getsize(os.path.join(results, p)) > 1000
                   for p in ("gold_vs_kl.png", "kl_vs_step.png", "gold_vs_step.png"))
    # a rerun finds every run finished and writes the same report
    capsys.readouterr()
    assert te.main(["--quick", "--output_dir", out]) == report
    assert "0 runs to do, 18 finished ones skipped" in capsys.readouterr().out
    # a finished run whose configuration changed is done again: here one result's key no longer matches
    path = os.path.join(out, "runs", f"dpo_beta{te.MAIN_BETA['dpo']:g}_none_seed0", "result.json")
    before = json.load(open(path))
    json.dump({**before, "key": "stale"}, open(path, "w"))
    report = te.main(["--quick", "--output_dir", out, "--methods", "dpo"])
    assert "1 runs to do, 9 finished ones skipped" in capsys.readouterr().out
    assert json.load(open(path))["checkpoints"] == before["checkpoints"]  # trained again, bit for bit
    # --report_only needs nothing but the committed folder: every number comes back from it
    shutil.rmtree(os.path.join(out, "runs"))
    assert te.main(["--quick", "--report_only", "--output_dir", out]) == report

"""
A fair, powered test of the trust-region update at laptop scale: SFT, then DPO / IPO / KTO under five reference
schedules and three betas, every checkpoint judged by an exact gold score, and a verdict by a rule fixed in advance.

The TR paper (Gorbatovski et al., arXiv 2404.09656) trains SFT models, then each method with a frozen reference and
with the trust-region update theta_ref <- alpha*theta + (1 - alpha)*theta_ref after every tau-th optimizer step, and
compares them by judged quality and by KL to the SFT model. Here the task is toy.toy_problem (sort or reverse
3-6 digits) with an exact gold score (toy.toy_gold_score), the model is 'small' (2 layers, 128 wide) and
everything runs on 2 CPU cores.

Pipeline
1. Data, written as local .jsonl files: 512 distinct eval prompts are drawn FIRST and split once into a validation
   half (picks checkpoints and beta) and a test half (everything reported); the SFT demonstrations
   (toy.toy_sft_rows, 30% wrong on purpose) and the preference pairs (toy.toy_preferences) are the same
   generators' streams with every eval prompt removed. 3-digit puzzles are few (2,000 prompts): drawn without this
   exclusion, 95 of the 512 eval prompts would also be SFT prompts and 27 preference prompts (data/overlap.json
   and results.md report the counts; the exclusion leaves 0).
2. SFT once (sft.py, 1,200 steps); the SFT model is the policy's start and the initial reference of every run.
3. Runs: method x beta x schedule x seed (GRID); 120 steps of 16 pairs, one epoch without repeats (KTO: the same
   pairs as 32 unpaired examples per step), lr LR constant after 10 warmup steps, trained in segments of 12 steps
   with --resume (bit-exact), so each segment's end is a checkpoint of one uninterrupted run. A seed changes the
   batch order only. Reference schedules (the paper's authors apply alpha once every tau steps: TRL's
   SyncRefModelCallback and their turbo-alignment library):
     none             --ref_update none                        the baseline: frozen reference
     hard             --ref_update hard --tau 16               copy after steps 16, 32, ..., 112 (7 updates)
     soft             --ref_update soft --alpha 0.6 --tau 16   the authors' code: alpha 0.6 once every 16 steps
     ema              --ref_update soft --alpha 0.1 --tau 1    a slow per-step EMA (mean lag 9 steps, hard's 8)
     soft_every_step  --ref_update soft --alpha 0.6 --tau 1    NO-ANCHOR CONTROL: after k steps 0.4^k of the old
                                                               reference is left; it trails the policy by < 1 step
   GRID (147 runs): per method three betas; at the inert one (the baseline's anchor never engages) only none, hard
   and soft, 3 seeds; at the others all five schedules, 3 seeds, and 5 seeds at the VERDICT beta:
     DPO  beta 0.05 (3 x 3), 0.3 (5 x 5, verdict), 1 (5 x 3)
     IPO  beta 0.1 (3 x 3),  0.5 (5 x 5, verdict), 2 (5 x 3)      (length-averaged log-probs, target 1/(2 beta))
     KTO  beta 0.1 (3 x 3),  1 (5 x 3),            3 (5 x 5, verdict)
4. At every checkpoint, with the policy and the run's CURRENT reference (the policy/ and reference/ a segment saves):
   - gold_score_val / gold_score_test: 2 samples per eval prompt at temperature 1 (the same sampling seed for every
     model: common random numbers), mean gold score over the half;
   - kl: KL(policy || SFT), the mean of log pi - log pi_SFT (summed over response tokens) on the policy's samples;
   - anchor_weight: the anchor's strength on a probe of 128 training pairs against the current reference
     (anchor_strength): DPO mean sigmoid(-beta*h); IPO mean (h - 1/(2 beta)) on length-averaged log-probs
     (tr_ipo.py --logps mean, passed explicitly); KTO mean sigmoid'(.) = s(1 - s), z0 from mismatched pairs of the
     probe and clamped at 0, as in training;
   - logp_chosen / logp_rejected: the policy's mean summed log-prob of the probe's chosen / rejected answers.
5. Report: results.md, results.json (every run and checkpoint, the verdict), gold_vs_kl.png (Pareto fronts with
   bootstrap bands), gold_vs_step.png, anchor.png, logps.png. Per-prompt test scores stay in runs/*/result.json.

Pilots (lr and betas: seed 0, schedule none only, before any TR run had been started):
- Learning rate, plain DPO at beta 0.05, 120 steps, validation gold at steps 12, 24, ..., 120 (SFT 0.710):
    lr 1e-4: 0.782 0.782 0.688 0.578 0.632 0.581 0.607 0.643 0.606 0.548   peak at the first checkpoints
    lr 3e-5: 0.744 0.778 0.808 0.820 0.805 0.766 0.746 0.722 0.699 0.685   peak at step 48, then over-optimises
    lr 1e-5: 0.726 0.738 0.754 0.762 0.781 0.786 0.796 0.812 0.817 0.816   still rising at the end
  Criterion: the baseline peaks mid-run, neither at the first checkpoint nor at the end: lr 3e-5 (DPO beta 0.3
  also peaked at step 48), for every method.
- Betas, the baseline's anchor at step 120 (threshold: 20% below its value at h = 0):
    DPO  0.05: 0.460 (inert)  0.3: 0.322  1: 0.176                      (h = 0: 0.5,  active <= 0.4)
    IPO  0.1: -4.37 (inert)   0.5: -0.535  2: -0.088                    (h = 0: -t,   active >= -0.8 t)
    KTO  0.1: 0.244 (inert)   0.3: 0.222 (inert)  1: 0.189  3: 0.139    (h = 0: 0.25, active <= 0.2)
  The VERDICT beta is the smallest beta whose pilot anchor was at least a third below its h = 0 value (DPO 0.3:
  36%, IPO 0.5: 46%, KTO 3: 44%; KTO 1 only 24%), so that the full run's 20% power check is likely to pass.
  KTO's sweep is 0.1, 1, 3 (0.3 was as inert as 0.1).
- tau, changed once after TR pilots: the first design updated every 32 steps (alpha 0.05 for ema). Pilot TR runs
  made to test the pipeline and time it (DPO beta 0.3, all schedules, seeds 0-1; KTO beta 3 hard, seed 0) showed
  the flaw the issue names for the old experiment: the baseline peaks at step 48, only 16 steps after the first
  update, so the primary endpoint could hardly differ by construction (every DPO schedule's best checkpoint was
  step 48; Deltas within +-0.005; KTO hard -0.011). tau 16 puts three updates before the peak and seven in the
  run; ema's alpha 0.1 keeps its mean lag next to hard's. After a TR result was seen nothing else changed but
  cost (the probe went from 256 to 128 pairs).

DECISION RULE (fixed before the full run; verdicts() applies it and nothing else)
- Primary endpoint, per run: the test gold of its best-on-validation checkpoint (highest gold_score_val); per
  cell the mean over seeds.
- Verdict cell, per method: the VERDICT beta, all five schedules, 5 seeds.
- Power check: a verdict is drawn only if the baseline's (none) anchor at the verdict beta, at its last checkpoint,
  mean over seeds, is active: DPO weight <= 0.4; IPO mean (h - t) >= -0.8 t, t = 1/(2 beta); KTO weight <= 0.2
  (each 20% below its value at h = 0, where a frozen reference does not pull yet: 0.5, -t, 0.25). Otherwise the
  verdict reads "No power: ... the baseline's anchor is inert".
- Comparison: for each TR schedule S, Delta_S = primary(S) - primary(none) with a 95% bootstrap CI (2,000 draws;
  seeds resampled with one draw for both arms, paired by seed, since a seed fixes the batch order; test prompts
  resampled jointly for all runs). S is "better" when the CI lies above 0, "worse" when below it, else "no
  detectable difference" (the CI's half-width is the effect the test could have seen).
- The method's verdict rests on the paper authors' two schedules, hard and soft (alpha 0.6 every 16 steps): "TR
  helps" if at least one is better and neither worse; "TR hurts" if at least one is worse and neither better;
  "mixed" if one is better and the other worse; else "no detectable difference". Two tests at 95%: about a 10%
  chance of a helps/hurts call when nothing differs. ema and the no-anchor control are reported beside it and do
  not change it; nor do the secondary views (gold at matched KL, end-of-budget gold and best-on-validation gold
  with beta picked on validation, the Pareto fronts).

Cost, measured on pilots (2 workers, one torch thread each), CPU seconds per run: DPO and IPO ~40 s with a frozen
reference, 40-45 s with a moving one (12-14 s of training, the rest judging 10 checkpoints); KTO ~48 / ~52 s; SFT
~90 s. The machine was shared (load 2-4); in a quiet spell two DPO TR runs side by side took 40 s wall each, their
CPU time. Predicted for the 147 runs on 2 idle cores: 53-60 min (low end: the quiet-spell rate; high end: CPU
seconds under load). Per method, about a third each: DPO ~19 min with SFT, IPO ~17, KTO ~20.

    python toy_experiment.py                      # the full grid, 53-60 min on 2 idle cores; resumable
    python toy_experiment.py --methods dpo        # one method per sitting (~20 min); then ipo, kto
    python toy_experiment.py --report_only        # rewrite results.md/json and plots from the finished runs
    python toy_experiment.py --quick              # a smoke test (CI): 'tiny' model, a few steps; numbers mean nothing
"""
import argparse
import hashlib
import json
import math
import multiprocessing
import os
import random
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import torch
from transformers import AutoModelForCausalLM

import sft
import tr_dpo
import tr_ipo
import tr_kto
from evaluate import response_logps, sample
from models import load_model
from toy import toy_gold_score, toy_malformed, toy_preferences, toy_problem, toy_sft_rows

# -----------------------------------------------------------------------------
# the design (experiment 2; experiment 1's is in results/toy/results.json)

LR = 3e-5        # PLACEHOLDER until the frozen-reference pilot (docstring)
TAU = 16         # hard and soft updates after steps 16, 32, ..., 112 of 120
CHECKPOINTS = (12, 24, 36, 48, 60, 72, 84, 96, 108, 120)  # PLACEHOLDER until the pilot
GOLD_SCALE = 120  # a prompt's gold (mean over 2 samples of k/n, n = 3..6 digits) times 120 is an integer: stored as one

FULL = dict(model="small", sft_steps=1200, sft_lr=3e-3, lr=LR, checkpoints=CHECKPOINTS, pairs=1920, tau=TAU,
            n_eval=512, samples=2, probe=128, sft_rows=8192)
QUICK = dict(model="tiny", sft_steps=30, sft_lr=3e-3, lr=1e-4, checkpoints=(2, 4, 6, 8), pairs=128, tau=4,
             n_eval=32, samples=2, probe=16, sft_rows=512)

SCHEDULES = ("none", "hard", "soft", "soft_every_step")
CONTROL = "soft_every_step"  # the positive control: alpha 0.6 after EVERY step, no anchor left
PAPER_SCHEDULES = ("hard", "soft")  # the verdicts rest on these (the authors' code)
# per method: beta -> (schedules, seeds)
GRID = {"dpo": {0.3: (SCHEDULES, 5)}, "ipo": {0.5: (SCHEDULES, 5)}, "kto": {3.0: (SCHEDULES, 5)}}  # PLACEHOLDER
QUICK_GRID = {"dpo": {0.3: (SCHEDULES, 2), 0.1: (("none",), 2)}, "ipo": {0.5: (SCHEDULES, 1)},
              "kto": {3.0: (SCHEDULES, 1)}}
SCRIPTS = {"dpo": tr_dpo, "ipo": tr_ipo, "kto": tr_kto}
SCRIPT_EVAL = 16      # rows at the end of each .jsonl that the scripts hold out for their own (unused) eval
MAX_NEW_TOKENS = 10   # the longest answer is 7 tokens (" " + 6 digits) + EOS: room to show rambling
N_BOOT = 2000


def schedule_flags(schedule, cfg):
    """(ref_update, alpha, tau) of a schedule; alpha and tau are None for the frozen baseline. soft_every_step, the
    positive control: after k steps 0.4^k of the old reference is left, it trails the policy by < 1 step."""
    return {"none": ("none", None, None), "hard": ("hard", 1.0, cfg["tau"]), "soft": ("soft", 0.6, cfg["tau"]),
            "soft_every_step": ("soft", 0.6, 1)}[schedule]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke test of the whole pipeline in a minute or two")
    p.add_argument("--methods", nargs="+", default=list(SCRIPTS), choices=list(SCRIPTS), type=str.lower,
                   help="train these methods only (a full run can be split into sittings); the report covers every "
                        "finished run")
    p.add_argument("--workers", type=int, default=2, help="runs trained at once, one process each")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per process. These models are too small for more to pay off, and when other "
                        "processes share the cores, extra threads spin and wait: on 2 busy cores 2 threads ran 10x slower")
    p.add_argument("--output_dir", default="out/toy2", help="the runs, the SFT model and the data (not committed)")
    p.add_argument("--results_dir", help="results.md/json, per_prompt.json.gz and the plots: the committed record "
                                         "(default results/toy2; with --quick, OUTPUT_DIR/results)")
    p.add_argument("--report_only", action="store_true",
                   help="no training, no out/: rewrite both experiments' reports from the committed results folders")
    g = p.add_argument_group("pilots (frozen reference only, before the full run; output_dir only, nothing committed)")
    g.add_argument("--lr", type=float, help=f"learning rate of every run (default {LR})")
    g.add_argument("--checkpoints", nargs="+", type=int, help="checkpoint steps; the last ends the run")
    g.add_argument("--betas", nargs="+", type=float, help="these betas for every method given, instead of the grid")
    g.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=["none"], help="with --betas")
    g.add_argument("--seeds", type=int, default=1, help="seeds per cell, with --betas")
    return p.parse_args(argv)

# -----------------------------------------------------------------------------
# the anchor's strength: how hard the loss still pulls towards the CURRENT reference (pure; test_toy_experiment.py)


def dpo_anchor_weight(h, beta):
    """Mean DPO loss weight over pairs: d(-log sigmoid(beta*h))/dh = -beta * sigmoid(-beta*h), so sigmoid(-beta*h) is
    the pair's weight. 0.5 at h = 0 (policy = reference); it falls towards 0 as the margin h grows: the frozen
    reference then brakes the pair. h (B,): [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)], summed."""
    return torch.sigmoid(-beta * torch.as_tensor(h, dtype=torch.float64)).mean().item()


def ipo_anchor_gap(h, beta):
    """Mean (h - 1/(2 beta)) over pairs, h (B,) on length-averaged log-probs: the IPO gradient is 2(h - t) dh, t =
    1/(2 beta). -t at h = 0 (full push); 0 when the gap sits at its target, above 0 when it overshoots (the anchor
    pulls it back)."""
    return (torch.as_tensor(h, dtype=torch.float64) - 1 / (2 * beta)).mean().item()


def kto_anchor_weight(r, desirable, z0, beta):
    """Mean KTO loss weight sigmoid'(.) = s(1 - s), s = sigmoid(beta*(r - z0)) for a desirable example and
    sigmoid(beta*(z0 - r)) for an undesirable one (the same value: s(1-s) is symmetric). r (B,) = log pi - log ref,
    summed; desirable (B,) bool; z0 the clamped KL estimate. 0.25 at r = z0; smaller as |r - z0| grows."""
    r = torch.as_tensor(r, dtype=torch.float64)
    x = beta * torch.where(torch.as_tensor(desirable), r - z0, z0 - r)
    s = torch.sigmoid(x)
    return (s * (1 - s)).mean().item()


def anchor_strength(method, beta, pol, ref, n_tokens):
    """The anchor's strength on the probe pairs. pol, ref: summed log-probs (B,) under the policy and the current
    reference of "chosen" and "rejected", and (KTO) "mismatched": prompt i of the unpaired list [chosen..., rejected...]
    with the completion of example i + 1, as Judge.probe_logps builds it; n_tokens: response lengths (EOS included)
    of "chosen" and "rejected", for IPO's length-averaged log-probs (tr_ipo.py --logps mean)."""
    ratio = {k: torch.as_tensor(pol[k], dtype=torch.float64) - torch.as_tensor(ref[k], dtype=torch.float64)
             for k in pol}
    if method == "dpo":
        return dpo_anchor_weight(ratio["chosen"] - ratio["rejected"], beta)
    if method == "ipo":
        n = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in n_tokens.items()}
        return ipo_anchor_gap(ratio["chosen"] / n["chosen"] - ratio["rejected"] / n["rejected"], beta)
    z0 = max(0.0, ratio["mismatched"].mean().item())  # tr_kto.py's reference point, clamped at 0 as in training
    desirable = [True] * len(ratio["chosen"]) + [False] * len(ratio["rejected"])
    return kto_anchor_weight(torch.cat([ratio["chosen"], ratio["rejected"]]), desirable, z0, beta)


def anchor_active(method, value, beta):
    """The power check: the anchor is active when its mean weight is at least 20% below its value at h = 0."""
    if method == "dpo":
        return value <= 0.4  # 0.8 * 0.5
    if method == "ipo":
        return value >= -0.8 / (2 * beta)  # 0.8 * (-t)
    return value <= 0.2  # kto: 0.8 * 0.25

# -----------------------------------------------------------------------------
# statistics for the report (pure; test_toy_experiment.py)


def best_checkpoint(val):
    """Index of the highest validation gold (the first of equal ones)."""
    return max(range(len(val)), key=lambda i: (val[i], -i))


def at_kl(kls, target):
    """Where a trajectory reaches KL `target`: (i, w) with value = (1 - w) * v[i - 1] + w * v[i], interpolating
    linearly between the first point at or above the target and the one before it. kls[0] is the start (0, the SFT
    model). None when the run never reaches the target."""
    for i in range(1, len(kls)):
        if kls[i] >= target:
            lo, hi = kls[i - 1], kls[i]
            return i, (target - lo) / (hi - lo) if hi > lo else 1.0
    return None


def pareto_front(points):
    """The upper envelope of (kl, gold) points: those no other point beats with less or equal KL and more gold,
    sorted by KL (gold rises along it)."""
    front = []
    for kl, gold in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or gold > front[-1][1]:
            front.append((kl, gold))
    return front


def percentile_ci(draws, level=0.95):
    """(low, high) percentiles of bootstrap draws."""
    a = np.asarray(draws, dtype=float)
    return float(np.quantile(a, (1 - level) / 2)), float(np.quantile(a, (1 + level) / 2))


def paired_seed_draws(n_seeds, n_boot, rng):
    """(n_boot, n_seeds) seed indices drawn with replacement; one table is used for every arm of a comparison."""
    return rng.integers(0, n_seeds, size=(n_boot, n_seeds))


def boot_mean(x, seeds):
    """Bootstrap means over seeds: x (n_seeds, n_boot), column b computed on the b-th resample of the test prompts;
    seeds (n_boot, n_seeds). Draw b averages x[seeds[b, j], b] over j."""
    return x[seeds, np.arange(x.shape[1])[:, None]].mean(1)


def classify(ci):
    """The rule's reading of a 95% CI of Delta = TR - none."""
    return "better" if ci[0] > 0 else "worse" if ci[1] < 0 else "no detectable difference"


def method_verdict(calls):
    """The method's verdict from the paper schedules' readings (classify)."""
    better, worse = "better" in calls, "worse" in calls
    return ("mixed" if better and worse else "TR helps" if better else "TR hurts" if worse
            else "no detectable difference")

def gold_to_int(gold, samples):
    """Per-prompt gold as integers: the mean over `samples` samples of k/n (k of n = 3..6 digits right) times
    GOLD_SCALE = 2 * lcm(3, 4, 5, 6) is a whole number, so one byte per prompt stores it exactly."""
    assert samples == 2, "GOLD_SCALE assumes 2 samples per prompt"
    ints = [round(g * GOLD_SCALE) for g in gold]
    assert all(abs(i - g * GOLD_SCALE) < 1e-6 for i, g in zip(ints, gold))
    return ints


# -----------------------------------------------------------------------------
# data: the eval prompts first, then SFT and preference data without them


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def make_data(out, cfg):
    """Eval prompts (distinct; first half validation, second half test), SFT rows and preference pairs as local
    .jsonl files for the scripts, none of whose training rows has an eval prompt. Returns paths, prompts, overlap."""
    rng, prompts = random.Random("toy-experiment-eval"), []
    while len(prompts) < cfg["n_eval"]:
        p, _ = toy_problem(rng)
        if p not in prompts:
            prompts.append(p)
    held = set(prompts)
    n_sft, n_pairs = cfg["sft_rows"] + SCRIPT_EVAL, cfg["pairs"] + SCRIPT_EVAL  # pairs: 120 steps of 16 = 1 epoch
    sft_stream, pair_stream = toy_sft_rows(2 * n_sft, 0), toy_preferences(2 * n_pairs, 0)
    sft_rows = [r for r in sft_stream if r["prompt"] not in held][:n_sft]
    pairs = [r for r in pair_stream if r["prompt"] not in held][:n_pairs]
    # the scripts train on all rows but the last SCRIPT_EVAL: those are the training prompts
    train_prompts = {r["prompt"] for r in sft_rows[:-SCRIPT_EVAL] + pairs[:-SCRIPT_EVAL]}
    overlap = {"eval_prompts": len(prompts), "in_sft_or_pairs": len(held & train_prompts),
               "would_be_in_sft_without_exclusion": len(held & {r["prompt"] for r in sft_stream[:n_sft]}),
               "would_be_in_pairs_without_exclusion": len(held & {r["prompt"] for r in pair_stream[:n_pairs]})}
    assert overlap["in_sft_or_pairs"] == 0
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    paths = {k: os.path.join(out, "data", f"{k}.jsonl") for k in ("sft", "pairs")}
    write_jsonl(paths["sft"], sft_rows)
    write_jsonl(paths["pairs"], pairs)
    with open(os.path.join(out, "data", "overlap.json"), "w") as f:
        json.dump(overlap, f, indent=1)
    half = len(prompts) // 2
    return {"paths": paths, "val": prompts[:half], "test": prompts[half:], "probe": pairs[:cfg["probe"]],
            "overlap": overlap}

# -----------------------------------------------------------------------------
# judging one checkpoint (in a worker process)


class Judge:
    """The SFT model, the eval prompts' ids and the probe pairs, set up once per worker process."""

    def __init__(self, sft_path, data, cfg):
        self.sft, self.tok = load_model(sft_path)
        self.sft.eval()
        enc = lambda texts: self.tok(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
        eos = [self.tok.eos_token_id]
        self.prompts = data["val"] + data["test"]
        self.n_val, self.samples = len(data["val"]), cfg["samples"]
        self.prompt_ids = enc(self.prompts)
        probe = data["probe"]
        self.probe_prompts = enc([r["prompt"] for r in probe])
        self.probe = {k: [c + eos for c in enc([r[k] for r in probe])] for k in ("chosen", "rejected")}
        self.sft_probe = self.probe_logps(self.sft)
        self.sft_eval = self.gold_and_kl(self.sft)

    def logps(self, model, prompt_ids, response_ids):
        # batches of 64: on one CPU thread faster than 256 (measured); no effect on the values
        return torch.tensor(response_logps(model, self.tok.pad_token_id, prompt_ids, response_ids, 64),
                            dtype=torch.float64)

    def probe_logps(self, model, mismatched=True):
        """Summed log-probs of the probe's chosen and rejected answers, and (for KTO's z0) of mismatched pairs: the
        unpaired list is [chosen..., rejected...] (data.unpair) and example i is paired with the completion of i + 1
        (a different prompt: neighbours in that list never share one), as tr_kto.mismatched_pairs does."""
        out = {k: self.logps(model, self.probe_prompts, v) for k, v in self.probe.items()}
        if mismatched:
            completions = self.probe["chosen"] + self.probe["rejected"]
            out["mismatched"] = self.logps(model, self.probe_prompts * 2, completions[1:] + completions[:1])
        return out

    @torch.no_grad()
    def gold_and_kl(self, model):
        """`samples` responses per prompt at temperature 1, the same sampling seed for every model; per-prompt gold
        (mean over its samples; validation prompts first, as integers: gold_to_int), accuracy and invalid rates, and
        KL(model || SFT) on the model's own samples."""
        prompt_ids = self.prompt_ids * self.samples  # sample s of prompt i sits at s * n + i
        torch.manual_seed(0)
        ids = [r for b in range(0, len(prompt_ids), 256)  # chunks of 256: on one CPU thread faster than all at once
               for r in sample(model, self.tok, prompt_ids[b:b + 256], MAX_NEW_TOKENS)]
        eos, n = self.tok.eos_token_id, len(self.prompts)
        texts = [self.tok.decode([t for t in r if t != eos], skip_special_tokens=True) for r in ids]
        kl = (self.logps(model, prompt_ids, ids) - self.logps(self.sft, prompt_ids, ids)).mean().item()
        per = lambda f: [sum(f(self.prompts[i], texts[s * n + i]) for s in range(self.samples)) / self.samples  # noqa: E731
                         for i in range(n)]
        gold = per(toy_gold_score)
        exact, invalid = per(lambda p, t: float(toy_gold_score(p, t) == 1.0)), per(lambda p, t: float(toy_malformed(p, t)))
        v, mean = self.n_val, lambda xs: sum(xs) / len(xs)  # noqa: E731
        return {"kl": kl, "gold_score_val": mean(gold[:v]), "gold_score_test": mean(gold[v:]),
                "accuracy_test": mean(exact[v:]), "invalid_test": mean(invalid[v:]), "example": texts[v:v + 4],
                "gold_per_prompt": gold_to_int(gold, self.samples)}

    def __call__(self, method, beta, policy, reference):
        """Everything recorded at a checkpoint; reference None means the SFT model (a frozen baseline's)."""
        kto = method == "kto"
        pol = self.probe_logps(policy.eval(), kto)
        ref = self.sft_probe if reference is None else self.probe_logps(reference.eval(), kto)
        n_tokens = {k: [len(r) for r in v] for k, v in self.probe.items()}
        return {"anchor_weight": anchor_strength(method, beta, pol, ref, n_tokens),
                "logp_chosen": pol["chosen"].mean().item(), "logp_rejected": pol["rejected"].mean().item(),
                **self.gold_and_kl(policy)}

# -----------------------------------------------------------------------------
# one run (in a worker process)

_judges = {}  # one Judge per worker process, built on its first run


def run_name(job):
    return f"{job['method']}_beta{job['beta']:g}_{job['schedule']}_seed{job['seed']}"


def run_key(job, cfg):
    """What a finished run's numbers depend on: a rerun skips a run whose key matches."""
    keep = {k: cfg[k] for k in ("model", "sft_steps", "sft_lr", "lr", "checkpoints", "pairs", "tau", "n_eval",
                                "samples", "probe", "sft_rows")}
    return hashlib.sha1(json.dumps([job, keep], sort_keys=True).encode()).hexdigest()[:12]


def train_and_judge(args):
    """Train one method x beta x schedule x seed from the SFT model in segments that end at the checkpoint steps
    (--resume is bit-exact), judging each segment's end. The scripts' output goes to the run's train.log. Writes
    result.json."""
    job, cfg, data, sft_path, run, threads = args
    torch.set_num_threads(threads)
    judge = _judges.get(sft_path) or _judges.setdefault(sft_path, Judge(sft_path, data, cfg))
    shutil.rmtree(run, ignore_errors=True)
    os.makedirs(run)
    method, beta = job["method"], job["beta"]
    ref_update, alpha, tau = schedule_flags(job["schedule"], cfg)
    batch = "32" if method == "kto" else "16"  # KTO counts examples: 32 = the 16 pairs of DPO and IPO
    every = str(math.gcd(*cfg["checkpoints"]))  # each segment's last step saves the checkpoint the next resumes
    flags = ["--model", sft_path, "--dataset", data["paths"]["pairs"], "--eval_size", str(SCRIPT_EVAL),
             "--eval_every", "0", "--log_every", every, "--save_every", every, "--seed", str(job["seed"]),
             "--lr", str(cfg["lr"]), "--beta", str(beta), "--batch_size", batch, "--micro_batch_size", batch,
             "--ref_update", ref_update, "--output_dir", run]
    flags += (["--alpha", str(alpha), "--tau", str(tau)] if ref_update != "none" else [])
    flags += ["--logps", "mean"] if method == "ipo" else []
    checkpoints, wall, cpu = [], {"train": 0.0, "eval": 0.0}, {"train": 0.0, "eval": 0.0}
    clock = lambda: (time.time(), time.process_time())  # noqa: E731  (CPU seconds: what an idle core would take)

    def timed(phase, since):
        now = clock()
        wall[phase], cpu[phase] = wall[phase] + now[0] - since[0], cpu[phase] + now[1] - since[1]
        return now
    with open(os.path.join(run, "train.log"), "w") as log, redirect_stdout(log), redirect_stderr(log):
        for k, step in enumerate(cfg["checkpoints"]):
            t = clock()
            SCRIPTS[method].main(flags + ["--max_steps", str(step)] + (["--resume"] if k else []))
            t = timed("train", t)
            policy = AutoModelForCausalLM.from_pretrained(os.path.join(run, "policy"))
            reference = (None if ref_update == "none"
                         else AutoModelForCausalLM.from_pretrained(os.path.join(run, "reference")))
            checkpoints.append({"step": step, **judge(method, beta, policy, reference)})
            timed("eval", t)
    for d in ("checkpoint", "policy", "reference"):  # weights and optimizer state: not needed any more
        shutil.rmtree(os.path.join(run, d), ignore_errors=True)
    result = {**job, "ref_update": ref_update, "alpha": alpha, "tau": tau, "lr": cfg["lr"], "key": run_key(job, cfg),
              "train_s": wall["train"], "eval_s": wall["eval"], "train_cpu_s": cpu["train"], "eval_cpu_s": cpu["eval"],
              "checkpoints": checkpoints}
    with open(os.path.join(run, "result.json"), "w") as f:
        json.dump(result, f)
    return result

# -----------------------------------------------------------------------------
# the report: tables, verdict, plots


def progress(r):
    """One line per finished run: its validation gold, KL and anchor at every checkpoint, and its cost."""
    row = lambda key, f: " ".join(f.format(c[key]) for c in r["checkpoints"])  # noqa: E731
    return (f"val gold {row('gold_score_val', '{:.3f}')}; KL {row('kl', '{:.2f}')}; anchor "
            f"{row('anchor_weight', '{:.3f}')}; e.g. {r['checkpoints'][-1]['example']} (train {r['train_s']:.0f} s, "
            f"eval {r['eval_s']:.0f} s; CPU {r['train_cpu_s']:.0f} + {r['eval_cpu_s']:.0f} s)")


def print_pilot(runs, sft_eval):
    """The pilots' table: validation gold, KL to the SFT model and the anchor per checkpoint (no test numbers)."""
    L = [f"pilot, SFT val gold {sft_eval['gold_score_val']:.3f}; per checkpoint: val gold / KL / anchor"]
    for r in runs:
        L.append(f"{r['method']} beta {r['beta']:g} {r['schedule']} seed {r['seed']} lr {r['lr']:g}: " + "  ".join(
            f"{c['step']}: {c['gold_score_val']:.3f}/{c['kl']:.2f}/{c['anchor_weight']:.3f}" for c in r["checkpoints"])
            + f"  (CPU {r['train_cpu_s']:.0f} + {r['eval_cpu_s']:.0f} s, wall {r['train_s'] + r['eval_s']:.0f} s)")
    print("\n".join(L))
    return "\n".join(L)


def load_runs(runs_dir, cfg, grid):
    """Every finished run of the grid whose key matches this configuration."""
    runs = []
    for job in jobs_of(grid, None):
        path = os.path.join(runs_dir, run_name(job), "result.json")
        if os.path.exists(path):
            r = json.load(open(path))
            if r.get("key") == run_key(job, cfg):
                runs.append(r)
    return runs


def jobs_of(grid, methods):
    """Seed-major order: every cell's seed 0 first, so a sitting stopped early leaves whole seeds."""
    return [{"method": m, "beta": b, "schedule": s, "seed": seed}
            for m in grid if methods is None or m in methods
            for seed in range(max(n for _, n in grid[m].values()))
            for b, (scheds, n) in grid[m].items() if seed < n
            for s in scheds]


class Stats:
    """Bootstrap machinery over the finished runs: each run's per-prompt test gold at each checkpoint is resampled
    with ONE table of prompt weights for all runs (N_BOOT draws), so comparisons are paired by prompt; seeds are
    resampled per comparison with one table for both arms (paired by seed)."""

    def __init__(self, runs, sft_eval, seed=0):
        self.rng = np.random.default_rng(seed)
        n_prompts = len(sft_eval["gold_test_per_prompt"])
        w = self.rng.multinomial(n_prompts, np.full(n_prompts, 1 / n_prompts), size=N_BOOT).T / n_prompts
        as_boot = lambda per_prompt: np.asarray(per_prompt) @ w  # noqa: E731  (checkpoints, N_BOOT)
        self.sft_boot = as_boot([sft_eval["gold_test_per_prompt"]])[0]
        self.boot = {id(r): as_boot([c["gold_test_per_prompt"] for c in r["checkpoints"]]) for r in runs}
        self.sft = sft_eval

    def trajectory(self, run, key):
        """The run's values from the SFT start (step 0) on."""
        return [self.sft[key]] + [c[key] for c in run["checkpoints"]]

    def best(self, run):
        """(point estimate, N_BOOT draws) of the test gold at the best-on-validation checkpoint."""
        i = best_checkpoint([c["gold_score_val"] for c in run["checkpoints"]])
        return run["checkpoints"][i]["gold_score_test"], self.boot[id(run)][i]

    def last(self, run):
        return run["checkpoints"][-1]["gold_score_test"], self.boot[id(run)][-1]

    def at_kl(self, run, target, key="gold_score_test"):
        """(point, draws) of the gold interpolated at KL target along the run's trajectory; None if not reached."""
        where = at_kl(self.trajectory(run, "kl"), target)
        if where is None:
            return None
        i, w = where
        vals = self.trajectory(run, key)
        draws = np.vstack([self.sft_boot, self.boot[id(run)]])
        return (1 - w) * vals[i - 1] + w * vals[i], (1 - w) * draws[i - 1] + w * draws[i]

    def cell(self, runs, stat):
        """Mean over seeds of stat(run) with its 95% CI: (mean, low, high); None if any run has no value."""
        vals = [stat(r) for r in runs]
        if not vals or any(v is None for v in vals):
            return None
        seeds = paired_seed_draws(len(vals), N_BOOT, self.rng)
        return (float(np.mean([v[0] for v in vals])),
                *percentile_ci(boot_mean(np.array([v[1] for v in vals]), seeds)))

    def delta(self, runs_a, runs_b, stat):
        """mean(stat over a) - mean(stat over b), paired by seed (the seeds both have), with its 95% CI."""
        by_seed = lambda runs: {r["seed"]: stat(r) for r in runs}  # noqa: E731
        a, b = by_seed(runs_a), by_seed(runs_b)
        common = sorted(set(a) & set(b))
        if not common:
            return None
        diff = np.array([a[s][1] - b[s][1] for s in common])
        seeds = paired_seed_draws(len(common), N_BOOT, self.rng)
        return (float(np.mean([a[s][0] - b[s][0] for s in common])), *percentile_ci(boot_mean(diff, seeds)), len(common))


def select(runs, **kw):
    return [r for r in runs if all(r[k] == v for k, v in kw.items())]


def mean_of(runs, f):
    return float(np.mean([f(r) for r in runs]))


def fmt_ci(c, digits=3):
    return "—" if c is None else f"{c[0]:.{digits}f} [{c[1]:.{digits}f}, {c[2]:.{digits}f}]"


def verdicts(runs, stats, grid):
    """The decision rule of the docstring, per method: (sentence, details)."""
    out = {}
    for m in grid:
        beta = VERDICT[m]
        base = select(runs, method=m, beta=beta, schedule="none")
        if not base:
            out[m] = (f"Not run yet: no finished {m.upper()} baseline at the verdict beta {beta:g}.", {})
            continue
        anchor = mean_of(base, lambda r: r["checkpoints"][-1]["anchor_weight"])
        details = {"beta": beta, "baseline_anchor_last": anchor, "active": anchor_active(m, anchor, beta),
                   "seeds": len(base), "baseline": stats.cell(base, stats.best), "deltas": {}}
        for s in SCHEDULES[1:]:
            d = stats.delta(select(runs, method=m, beta=beta, schedule=s), base, stats.best)
            if d is not None:
                details["deltas"][s] = {"delta": d[0], "ci": [d[1], d[2]], "seeds": d[3], "call": classify(d[1:3])}
        calls = [details["deltas"][s]["call"] for s in PAPER_SCHEDULES if s in details["deltas"]]
        name = m.upper()
        if not details["active"]:
            sentence = (f"No power: at beta {beta:g} the {name} baseline's anchor is inert (mean {anchor:.3f} at its "
                        f"last checkpoint), so no TR verdict is drawn.")
        elif len(calls) < len(PAPER_SCHEDULES):
            sentence = f"Incomplete: the paper schedules at beta {beta:g} have not all finished."
        else:
            v = method_verdict(calls)
            parts = ", ".join(f"{s} {details['deltas'][s]['delta']:+.3f} [{details['deltas'][s]['ci'][0]:+.3f}, "
                              f"{details['deltas'][s]['ci'][1]:+.3f}]" for s in PAPER_SCHEDULES)
            sentence = (f"{v}: at beta {beta:g} (baseline anchor {anchor:.3f}, active) the best-on-validation test "
                        f"gold of TR-{name} minus {name}, {details['seeds']} seed(s), 95% CI: {parts}.")
        details["verdict"] = sentence
        out[m] = (sentence, details)
    return out


def header(runs, sft_eval, cfg, overlap, sittings):
    wall = ", ".join(f"{x['trained']} runs in {x['wall_s'] / 60:.1f} min" for x in sittings)
    return [
        "# Toy experiment: is the trust-region update better than a frozen reference?\n",
        f"Model '{cfg['model']}', SFT {cfg['sft_steps']} steps; every run {cfg['steps']} steps of 16 pairs (one "
        f"epoch), lr {cfg['lr']:g} (chosen on a plain-DPO pilot, see toy_experiment.py), checkpoints every "
        f"{cfg['every']} steps. Schedules: none (frozen reference), hard and soft (alpha 0.6) every {cfg['tau']} steps "
        f"(the paper authors' code), ema (alpha {cfg['ema']:g} every step), soft_every_step (alpha 0.6 every step: "
        f"the no-anchor control). {cfg['n_eval']} held-out prompts ({cfg['n_eval'] // 2} validation, "
        f"{cfg['n_eval'] // 2} test), {cfg['samples']} samples each at temperature 1; anchor strength on "
        f"{cfg['probe']} training pairs. {len(runs)} runs; wall time {sum(x['wall_s'] for x in sittings) / 60:.1f} "
        f"min over {len(sittings)} invocation(s) ({wall}).\n",
        f"Eval prompts in the training data: {overlap['in_sft_or_pairs']} of {overlap['eval_prompts']} (excluded by "
        f"construction; drawn without the exclusion, {overlap['would_be_in_sft_without_exclusion']} would be SFT "
        f"prompts and {overlap['would_be_in_pairs_without_exclusion']} preference prompts). SFT model: test gold "
        f"{sft_eval['gold_score_test']:.3f}, validation gold {sft_eval['gold_score_val']:.3f}.\n",
        "Intervals: 95% bootstrap CIs (seeds and test prompts resampled). The decision rule is in toy_experiment.py's "
        "docstring, fixed before the full run.\n"]


def power_table(runs, grid):
    L = ["## Power check: the baseline's anchor (schedule none), mean over seeds\n",
         "Active: DPO weight <= 0.4, IPO mean (h - t) >= -0.8 t, KTO weight <= 0.2 (each 20% below its value at "
         "h = 0).\n",
         "| method | beta | seeds | anchor at first / middle / last checkpoint | active at the end |",
         "|---|---|---|---|---|"]
    for m in grid:
        for b in grid[m]:
            base = select(runs, method=m, beta=b, schedule="none")
            if base:
                n = len(base[0]["checkpoints"])
                a = [mean_of(base, lambda r, i=i: r["checkpoints"][i]["anchor_weight"]) for i in (0, n // 2, n - 1)]
                L.append(f"| {m.upper()} | {b:g} | {len(base)} | {a[0]:.3f} / {a[1]:.3f} / {a[2]:.3f} | "
                         f"{'yes' if anchor_active(m, a[2], b) else 'no'} |")
    return L + [""]


def primary_table(runs, stats, grid):
    L = ["## Primary: test gold at each run's best-on-validation checkpoint (mean over seeds)\n",
         "Delta = schedule minus none, paired by seed. The verdict rests on the verdict beta's hard and soft rows.\n",
         "| method | beta | schedule | seeds | best-on-val test gold | best step (mean) | Delta vs none |",
         "|---|---|---|---|---|---|---|"]
    best_step = lambda r: r["checkpoints"][best_checkpoint([c["gold_score_val"] for c in r["checkpoints"]])]["step"]  # noqa: E731
    for m in grid:
        for b, (scheds, _) in grid[m].items():
            for s in scheds:
                rs = select(runs, method=m, beta=b, schedule=s)
                if not rs:
                    continue
                d = stats.delta(rs, select(runs, method=m, beta=b, schedule="none"), stats.best) if s != "none" else None
                L.append(f"| {m.upper()} | {b:g}{' (verdict)' if b == VERDICT[m] else ''} | {s} | {len(rs)} | "
                         f"{fmt_ci(stats.cell(rs, stats.best))} | {mean_of(rs, best_step):.0f} | "
                         f"{'—' if d is None else fmt_ci(d[:3])} |")
    return L + [""]


def picked_beta_table(runs, stats, grid):
    L = ["## Beta picked on validation, reported on test\n",
         "Per schedule, the beta with the highest mean validation gold (at each run's best checkpoint; at the end).\n",
         "| method | schedule | beta | best-on-val test gold | beta (end) | end-of-budget test gold |",
         "|---|---|---|---|---|---|"]
    for m in grid:
        for s in SCHEDULES:
            cells = {b: select(runs, method=m, beta=b, schedule=s) for b in grid[m]}
            cells = {b: rs for b, rs in cells.items() if rs}
            if not cells:
                continue
            pick = lambda f: max(cells, key=lambda b: mean_of(cells[b], f))  # noqa: E731
            b_best = pick(lambda r: max(c["gold_score_val"] for c in r["checkpoints"]))
            b_end = pick(lambda r: r["checkpoints"][-1]["gold_score_val"])
            L.append(f"| {m.upper()} | {s} | {b_best:g} | {fmt_ci(stats.cell(cells[b_best], stats.best))} | "
                     f"{b_end:g} | {fmt_ci(stats.cell(cells[b_end], stats.last))} |")
    return L + [""]


def matched_kl_table(runs, stats, grid):
    L = ["## Gold at matched KL to the SFT model (test; beta picked on validation at that KL)\n",
         "Each run's trajectory (the SFT model at KL 0, then its checkpoints) interpolated linearly at the KL; — = no "
         "beta whose every seed reaches it.\n",
         "| method | schedule | " + " | ".join(f"KL {k:g}" for k in KL_TARGETS) + " |",
         "|---|---|" + "---|" * len(KL_TARGETS)]
    for m in grid:
        for s in SCHEDULES:
            cells = {b: select(runs, method=m, beta=b, schedule=s) for b in grid[m]}
            row = []
            for k in KL_TARGETS:
                ok = [b for b, rs in cells.items() if rs and all(stats.at_kl(r, k) is not None for r in rs)]
                if not ok:
                    row.append("—")
                    continue
                b = max(ok, key=lambda b: mean_of(cells[b], lambda r: stats.at_kl(r, k, "gold_score_val")[0]))
                row.append(f"{fmt_ci(stats.cell(cells[b], lambda r: stats.at_kl(r, k)))} (beta {b:g})")
            if any(c != "—" for c in row):
                L.append(f"| {m.upper()} | {s} | " + " | ".join(row) + " |")
    return L + [""]


def logps_table(runs, sft_eval, grid, cfg):
    steps = (cfg["every"], cfg["steps"] // 2 // cfg["every"] * cfg["every"], cfg["steps"])
    L = ["## Log-probs of the probe pairs over training (verdict beta, mean over seeds)\n",
         "log pi(chosen) / log pi(rejected), summed over response tokens; the SFT model: "
         f"{sft_eval['logp_chosen']:.2f} / {sft_eval['logp_rejected']:.2f}.\n",
         "| method | schedule | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|---|" + "---|" * len(steps)]
    for m in grid:
        for s in SCHEDULES:
            rs = select(runs, method=m, beta=VERDICT[m], schedule=s)
            if rs:
                at = lambda step, key: mean_of(rs, lambda r: next(c[key] for c in r["checkpoints"] if c["step"] == step))  # noqa: E731
                L.append(f"| {m.upper()} | {s} | " +
                         " | ".join(f"{at(t, 'logp_chosen'):.2f} / {at(t, 'logp_rejected'):.2f}" for t in steps) + " |")
    return L + [""]


def dump_results(path, summary, runs):
    """results.json: the summary indented, then `runs`, one compact line per run (floats to 5 decimals)."""
    def compact(x):
        return (round(x, 5) if isinstance(x, float) else [compact(v) for v in x] if isinstance(x, list)
                else {k: compact(v) for k, v in x.items()} if isinstance(x, dict) else x)
    lines = [json.dumps(compact(r)) for r in runs]
    with open(path, "w") as f:
        f.write(json.dumps(summary, indent=1)[:-2] + ',\n "runs": [\n  ' + ",\n  ".join(lines) + "\n ]\n}\n")


def write_report(out, runs, sft_eval, cfg, grid, overlap, sittings):
    """results.md, results.json and the plots from the finished runs; `sittings`: every invocation's wall seconds
    and runs trained (a full run may be split into sittings, e.g. one per method)."""
    stats = Stats(runs, sft_eval)
    verdict = verdicts(runs, stats, grid)
    L = header(runs, sft_eval, cfg, overlap, sittings)
    L += ["## Verdict\n"] + [f"- **{m.upper()}**: {verdict[m][0]}" for m in grid] + [""]
    L += power_table(runs, grid) + primary_table(runs, stats, grid) + picked_beta_table(runs, stats, grid)
    L += matched_kl_table(runs, stats, grid) + logps_table(runs, sft_eval, grid, cfg)
    pngs = plot(out, runs, stats, grid)
    L += [f"Plots: {', '.join(os.path.basename(p) for p in pngs)}." if pngs else "Plots: matplotlib not installed."]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(L) + "\n")
    summary = {"config": cfg, "grid": {m: {str(b): {"schedules": list(s), "seeds": n} for b, (s, n) in g.items()}
                                       for m, g in grid.items()},
               "verdict_beta": VERDICT, "overlap": overlap, "sittings": sittings,
               "wall_s": sum(x["wall_s"] for x in sittings),
               "sft": {k: v for k, v in sft_eval.items() if k != "gold_test_per_prompt"},
               "verdict": {m: v[0] for m, v in verdict.items()}, "verdict_details": {m: v[1] for m, v in verdict.items()}}
    dump_results(os.path.join(out, "results.json"), summary,
                 [{**{k: v for k, v in r.items() if k not in ("checkpoints", "key")},
                   "checkpoints": [{k: v for k, v in c.items() if k != "gold_test_per_prompt"} for c in r["checkpoints"]]}
                  for r in runs])
    return "\n".join(L)


COLORS = {"none": "black", "hard": "tab:red", "soft": "tab:blue", "ema": "tab:green", "soft_every_step": "tab:gray"}


def plot(out, runs, stats, grid):
    """gold_vs_kl.png (per method: every cell's seed-mean checkpoints and each schedule's Pareto front, with a 95%
    band from the bootstrap), gold_vs_step.png, anchor.png and logps.png (verdict beta)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    methods = [m for m in grid if select(runs, method=m)]
    if not methods:
        return []
    curve = lambda rs, key: [float(np.mean([r["checkpoints"][i][key] for r in rs]))  # noqa: E731
                             for i in range(len(rs[0]["checkpoints"]))]
    paths = []

    def figure(name, draw, ylabel, xlabel="optimizer step"):
        fig, axes = plt.subplots(1, len(methods), figsize=(4.6 * len(methods), 3.9), squeeze=False)
        for ax, m in zip(axes[0], methods):
            draw(ax, m)
            ax.set(title=m.upper(), xlabel=xlabel)
            ax.legend(fontsize="x-small")
        axes[0][0].set_ylabel(ylabel)
        fig.tight_layout()
        paths.append(os.path.join(out, name))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    def gold_vs_kl(ax, m):
        """Thin lines: each cell's seed-mean trajectory from the SFT model. Thick: the schedule's upper envelope over
        checkpoints and betas (the best gold at KL <= x), its band the envelope's 95% range over bootstrap draws."""
        sft_point = (0.0, stats.sft["gold_score_test"])
        for s in SCHEDULES:
            cells = [rs for rs in (select(runs, method=m, beta=b, schedule=s) for b in grid[m]) if rs]
            if not cells:
                continue
            pts, draws = [sft_point], [stats.sft_boot]
            for rs in cells:
                kls, golds = curve(rs, "kl"), curve(rs, "gold_score_test")
                ax.plot([0.0] + kls, [sft_point[1]] + golds, "-", lw=0.6, alpha=0.35, color=COLORS[s])
                seeds = paired_seed_draws(len(rs), N_BOOT, stats.rng)
                pts += list(zip(kls, golds))
                draws += [boot_mean(np.array([stats.boot[id(r)][i] for r in rs]), seeds) for i in range(len(kls))]
            front = pareto_front(pts)
            xs = [p[0] for p in front] + [max(p[0] for p in pts)]
            ax.plot(xs, [p[1] for p in front] + [front[-1][1]], "-", lw=1.8, color=COLORS[s], label=s,
                    drawstyle="steps-post")
            band = [percentile_ci(np.max([d for p, d in zip(pts, draws) if p[0] <= x], axis=0)) for x in xs]
            ax.fill_between(xs, *zip(*band), step="post", color=COLORS[s], alpha=0.08)

    def gold_vs_step(ax, m):
        b = VERDICT[m]
        for s in SCHEDULES:
            rs = select(runs, method=m, beta=b, schedule=s)
            if rs:
                steps = [0] + [c["step"] for c in rs[0]["checkpoints"]]
                ax.plot(steps, [stats.sft["gold_score_val"]] + curve(rs, "gold_score_val"), "o-", ms=3,
                        color=COLORS[s], label=f"{s} (beta {b:g})")
        for b, style in zip([b for b in grid[m] if b != VERDICT[m]], (":", "-.")):
            rs = select(runs, method=m, beta=b, schedule="none")
            if rs:
                ax.plot([0] + [c["step"] for c in rs[0]["checkpoints"]], [stats.sft["gold_score_val"]] +
                        curve(rs, "gold_score_val"), style, color="black", alpha=0.6, label=f"none (beta {b:g})")

    def anchor(ax, m):
        for b in grid[m]:
            rs = select(runs, method=m, beta=b, schedule="none")
            if rs:
                ax.plot([c["step"] for c in rs[0]["checkpoints"]], curve(rs, "anchor_weight"), "o-", ms=3,
                        label=f"none, beta {b:g}")
        for s in SCHEDULES[1:]:
            rs = select(runs, method=m, beta=VERDICT[m], schedule=s)
            if rs:
                ax.plot([c["step"] for c in rs[0]["checkpoints"]], curve(rs, "anchor_weight"), "--", color=COLORS[s],
                        label=f"{s}, beta {VERDICT[m]:g}")

    def logps(ax, m):
        for s in SCHEDULES:
            rs = select(runs, method=m, beta=VERDICT[m], schedule=s)
            if rs:
                steps = [0] + [c["step"] for c in rs[0]["checkpoints"]]
                for key, style in (("logp_chosen", "-"), ("logp_rejected", "--")):
                    ax.plot(steps, [0.0] + [v - stats.sft[key] for v in curve(rs, key)], style, color=COLORS[s],
                            label=f"{s} (beta {VERDICT[m]:g})" if key == "logp_chosen" else None)

    figure("gold_vs_kl.png", gold_vs_kl, "test gold score (seed means)", "KL(policy || SFT), nats")
    figure("gold_vs_step.png", gold_vs_step, "validation gold score (seed means)")
    figure("anchor.png", anchor, "anchor strength (DPO, KTO: weight; IPO: h - t)")
    figure("logps.png", logps, "log pi - log pi_SFT (solid: chosen, dashed: rejected)")
    return paths

# -----------------------------------------------------------------------------
# main


def main(argv=None):
    args = get_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)  # main() may be called from a test: leave the process as it was


def run(args):
    pilot = args.betas is not None
    if (args.lr is not None or args.checkpoints is not None) and not pilot:
        raise SystemExit("error: --lr and --checkpoints are pilot flags: give --betas too")
    if args.report_only:
        return report_all(args)
    cfg = dict(QUICK if args.quick else FULL, quick=args.quick)
    cfg.update({k: v for k, v in (("lr", args.lr), ("checkpoints", args.checkpoints)) if v is not None})
    cfg["checkpoints"] = sorted(cfg["checkpoints"])
    grid = QUICK_GRID if args.quick else GRID
    if pilot:
        grid = {m: {b: (args.schedules, args.seeds) for b in args.betas} for m in args.methods}
    t0, out = time.time(), args.output_dir
    os.makedirs(out, exist_ok=True)

    # -------------------------------------------------------------------------
    # 1. data (deterministic: rewritten identically on every invocation)
    data = make_data(out, cfg)
    print(f"data: {json.dumps(data['overlap'])}")

    # -------------------------------------------------------------------------
    # 2. SFT, once (kept: a rerun with the same configuration reuses it)
    sft_dir = os.path.join(out, "sft")
    sft_key = hashlib.sha1(json.dumps([cfg[k] for k in ("model", "sft_steps", "sft_lr", "n_eval", "sft_rows")]).encode()).hexdigest()[:12]
    sft_path, done_path = os.path.join(sft_dir, "policy"), os.path.join(sft_dir, "done.json")
    if not (os.path.exists(done_path) and json.load(open(done_path)).get("key") == sft_key):
        shutil.rmtree(sft_dir, ignore_errors=True)
        os.makedirs(sft_dir)
        with open(os.path.join(sft_dir, "train.log"), "w") as log, redirect_stdout(log), redirect_stderr(log):
            sft.main(["--model", cfg["model"], "--dataset", data["paths"]["sft"], "--eval_size", str(SCRIPT_EVAL),
                      "--max_steps", str(cfg["sft_steps"]), "--lr", str(cfg["sft_lr"]), "--lr_schedule", "cosine",
                      "--warmup_steps", "20", "--batch_size", "32", "--micro_batch_size", "32", "--log_every", "50",
                      "--eval_every", "0", "--output_dir", sft_dir])
        with open(done_path, "w") as f:
            json.dump({"key": sft_key}, f)
    judge = Judge(sft_path, data, cfg)
    sft_eval = {**judge.sft_eval, "logp_chosen": judge.sft_probe["chosen"].mean().item(),
                "logp_rejected": judge.sft_probe["rejected"].mean().item()}
    print(f"SFT: val gold {sft_eval['gold_score_val']:.3f} ({time.time() - t0:.0f} s)", flush=True)

    # -------------------------------------------------------------------------
    # 3. the runs not finished yet, --workers at a time, each in its own (spawned) process
    runs_dir = os.path.join(out, "pilots" if pilot else "runs", f"lr{cfg['lr']:g}" if pilot else "")
    finished = {run_name(r) for r in load_runs(runs_dir, cfg, grid)}
    jobs = [j for j in jobs_of(grid, args.methods) if run_name(j) not in finished]
    print(f"{len(jobs)} runs to do, {len(finished)} finished ones skipped", flush=True)
    work = [(j, cfg, data, sft_path, os.path.join(runs_dir, run_name(j)), args.threads) for j in jobs]
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for k, r in enumerate(pool.map(train_and_judge, work)):
            print(f"[{k + 1}/{len(jobs)}] {run_name(r)}: " + progress(r) + f" ({time.time() - t0:.0f} s)", flush=True)
    if pilot:  # pilots show validation gold, KL and the anchor only (the docstring says what was looked at)
        return print_pilot(load_runs(runs_dir, cfg, grid), sft_eval)

    # -------------------------------------------------------------------------
    # 4. the committed record (every finished run of the grid, whatever --methods trained now), and the report
    log_path = os.path.join(out, "sittings.jsonl")  # every invocation that trained something: its wall time
    if jobs:
        with open(log_path, "a") as f:
            f.write(json.dumps({"wall_s": round(time.time() - t0, 1), "trained": len(jobs), "workers": args.workers,
                                "methods": args.methods}) + "\n")
    sittings = [json.loads(line) for line in open(log_path)] if os.path.exists(log_path) else []
    results = args.results_dir or (os.path.join(out, "results") if args.quick else "results/toy2")
    save_record(results, load_runs(runs_dir, cfg, grid), sft_eval, cfg, grid, data["overlap"], sittings)
    report = report_experiment2(results)
    print(report)
    return report


if __name__ == "__main__":
    main()

"""
The trust-region update tested at laptop scale: SFT, then DPO / IPO / KTO with a frozen or a moving reference, every
checkpoint judged by an exact gold score, verdicts by rules fixed before the runs. This file runs experiment 2 and
reports both experiments; docs/experiment.md is the long account.

The TR paper (Gorbatovski et al., arXiv 2404.09656) trains SFT models, then each method with a frozen reference and
with the trust-region update theta_ref <- alpha*theta + (1 - alpha)*theta_ref after every tau-th optimizer step, and
compares them by judged quality and by KL to the SFT model; its later version places the claim at large KL ("strong
performance even when substantially deviating from the initial reference policy"). Here the task is toy.toy_problem
(sort or reverse 3-6 digits) with an exact gold score (toy.toy_gold_score), the model is 'small' (2 layers, 128
wide) and everything runs on 2 CPU cores.

Pipeline
1. Data, written as local .jsonl files: 512 distinct eval prompts are drawn FIRST and split once into a validation
   half (picks checkpoints and betas) and a test half (everything reported); the SFT demonstrations
   (toy.toy_sft_rows, 30% wrong on purpose) and the preference pairs (toy.toy_preferences) are the same
   generators' streams with every eval prompt removed (drawn without the exclusion, 95 eval prompts would be SFT
   prompts and 58 preference prompts; the exclusion leaves 0).
2. SFT once (sft.py, 1,200 steps); the SFT model is the policy's start and the initial reference of every run.
3. Runs: method x beta x schedule x seed (GRID), one epoch of 16 pairs per step without repeats (KTO: the same pairs
   as 32 unpaired examples per step), lr constant after 10 warmup steps, trained in segments that end at the
   checkpoints with --resume (bit-exact), so each segment's end is a checkpoint of one uninterrupted run. A seed
   changes the batch order only. Schedules (the authors apply alpha once every tau steps: TRL's
   SyncRefModelCallback and their turbo-alignment library):
     none             --ref_update none                        the baseline: frozen reference
     hard             --ref_update hard --tau 16               copy after steps 16, 32, ...
     soft             --ref_update soft --alpha 0.6 --tau 16   the authors' code: alpha 0.6 once every 16 steps
     soft_every_step  --ref_update soft --alpha 0.6 --tau 1    the POSITIVE CONTROL: after k steps 0.4^k of the old
                                                               reference is left, it trails the policy by < 1 step
4. At every checkpoint, with the policy and the run's CURRENT reference: 2 samples per eval prompt at temperature 1
   (the same sampling seed for every model), each prompt's gold (the mean of its 2 samples' scores), kept for every
   validation and test prompt; KL(policy || SFT), the mean of log pi - log pi_SFT (summed over response tokens) on
   the policy's samples; the anchor's strength on 128 training pairs against the current reference
   (anchor_strength); the probe's log-probs.
5. The record, committed: results/toy2/results.json (every run and checkpoint) and per_prompt.json.gz (each
   prompt's gold x 120, an integer, for the SFT model and every checkpoint: gold_to_int). The report (results.md,
   gold_vs_kl.png, kl_vs_step.png, gold_vs_step.png) is computed from these two files alone, and
   `--report_only` recomputes it, and experiment 1's, from the committed folders.

EXPERIMENT 1 (results/toy/; 147 runs made by commit 4299a3f's version of this file; `git checkout 4299a3f` and
`python toy_experiment.py` rerun them). lr 3e-5, 120 steps (one epoch of 1,920 pairs), checkpoints every 12 steps,
tau 16 (updates after steps 16, 32, ..., 112), betas DPO 0.05 / 0.3 / 1, IPO 0.1 / 0.5 / 2, KTO 0.1 / 1 / 3,
schedules none, hard, soft, ema (alpha 0.1 every step) and soft_every_step, 3-5 seeds. Its pre-registered rule: the
test gold at each run's best-on-validation checkpoint, TR minus frozen at a verdict beta (DPO 0.3, IPO 0.5, KTO 3; 5
seeds) with a bootstrap CI over seeds and test prompts, and a power check on the frozen anchor. Its verdict: "no
detectable difference" for all three. Corrections from a re-analysis, all in results/toy/results.md:
- Only TWO reference updates act before the frozen baseline's peak at step 48 (after steps 16 and 32; the step-48
  update acts from step 49 on), not three as its design said.
- The per-prompt gold was not committed, so its bootstrap CIs cannot be recomputed; every interval in its report is
  a seed-level t interval (mean +- t(n-1) sd/sqrt(n) over seeds, paired by seed, test prompts fixed), from
  results.json. With them KTO hard - none = -0.0185, t [-0.0333, -0.0038] (the committed bootstrap CI's upper
  bound, +0.001, was a near miss), IPO soft - none = -0.0016, t [-0.0030, -0.0002].
- Every beta's cells are reported, including those that cut both ways: IPO beta 2, TR above frozen at the best
  checkpoint (soft +0.035, t [+0.012, +0.059]; hard +0.034, t [-0.009, +0.077]), KTO beta 1, TR below (hard
  -0.022, t [-0.055, +0.012]).
- Applied after the fact, the positive control of experiment 2 finds the primary endpoint blind for DPO (control -
  none +0.0015, t [-0.0046, +0.0075]) and KTO (-0.0219, t [-0.0451, +0.0012]): there "no detectable difference"
  was close to guaranteed, since picking the best checkpoint on validation does the anchor's job. For IPO the t
  interval alone separates them (-0.0045, t [-0.0089, -0.0001]; without the prompts' noise, a bound 0.0001 from 0).

EXPERIMENT 2 (results/toy2/; designed and pre-registered here before its full run)
Questions: (a) does the paper's protocol (a fixed budget, no early stopping, beta tuned on validation) favour TR?
(b) in the regime of the later version's claim, KL of 4 nats and more from the SFT model, does TR give more gold
at the same KL? (c) is TR at beta b just a frozen reference at a smaller beta? And for each endpoint: can it see
the reference at all (the positive control)?

Design
- lr 1e-4 (LR), one epoch of 3,840 fresh pairs = 240 steps (the first 1,920 are experiment 1's pairs), checkpoints
  at CHECKPOINTS (12, 24, 36, 48, 72, 96, 120, 160, 200, 240), tau 16 (the updates after steps 16, ..., 224 act on
  training), the SFT recipe of experiment 1.
- GRID, per method, with the main beta b = 0.1 that the pilots gave (below) for all three: at b all four
  schedules, 5 seeds; at 3b = 0.3 (a stronger anchor, so that tuning beta is a real choice) none, hard and soft, 3
  seeds; frozen only at 0.3b = 0.03 and 0.1b = 0.01 (the ladder for the mechanism), 3 seeds. 35 runs per method,
  105 in all. The same lr and betas for DPO, IPO (length-averaged log-probs, target 1/(2 beta)) and KTO.

Pilots (frozen reference only, seed 0; printed in results/toy2/pilots.md; what was looked at: validation gold, KL
to the SFT model and the anchor at each checkpoint, and four sampled answers to test prompts at each run's last
checkpoint; no test gold, and no experiment-2 run with a moving reference was started before this design was
fixed). The SFT model experiment 2's machine trains from experiment 1's recipe scores 0.653 on validation, not
experiment 1's 0.710: experiment 1 ran on an Intel Xeon with AMX, experiment 2 on an AMD EPYC; there commit 4299a3f's
code and this file's train bit-identical SFT weights, judged alike, so the difference is the CPU's float kernels, carried
through 1,200 steps. Trained twice there it came out identical: the pilots' SFT model is the full run's.
- Learning rate and length, frozen DPO (validation gold / KL at the checkpoints):
    lr 1e-4, 120 steps (1,920 pairs), KL at steps 24 / 48 / 120: beta 0.1 0.35 / 1.33 / 2.92, beta 0.3 0.32 / 1.25
      / 2.36, beta 1 0.25 / 0.78 / 1.30, beta 3 0.14 / 0.29 / 0.39; validation gold peaks at step 24 (0.77).
    lr 3e-4, 120 steps: beta 0.3 KL 0.46 at step 12, 2.55 at 24 (validation gold 0.762 -> 0.586 in those 12
      steps), 4.78 at 120; beta 1 0.35 / 2.65 / 3.43; beta 3 0.22 / 1.02 / 1.43.
    lr 1e-4, 240 steps (3,840 pairs): beta 0.1 KL 1.38 (48), 3.25 (144), 3.94 (216), 5.06 (240), validation gold
      0.765 (24) -> 0.501 (240); beta 0.3 3.55 at 240 (the beta 1 run was stopped unfinished).
    lr 2e-4, 240 steps: beta 0.3 KL 0.20 (12), 1.60 (24), 4.51 (168), 3.31 (216), 4.17 (240); beta 1 0.17 (12),
      1.08 (24), 3.65 (168), 3.24 (240).
  Criterion: a frozen run reaches KL >= 5 by the end (so that every schedule and seed likely passes 4), with KL
  rising smoothly enough that KL 1 and 2 fall between checkpoints. 3e-4 and 2e-4 jump past KL 1 within 12 steps
  and fall back later; 1e-4 rises steadily, and at 240 steps its beta 0.1 run passes 5 nats. A longer run (360
  steps) did not fit the budget with 5 seeds.
- Betas, frozen IPO and KTO at lr 1e-4, 240 steps:
    (KL at the end, its peak where higher; validation gold and the anchor at the end)
    IPO  beta 0.03: 14.93 (0.136, -14.69 of t = 16.7); 0.1: 9.53 (0.322, -3.13 of t = 5); 0.3: 4.10 (0.533, -0.53)
    KTO  beta 0.03: 3.56, peak 4.13 (0.593, weight 0.245 of 0.25: inert); 0.1: 2.03, peak 2.76 (0.705, 0.221);
         0.3: 1.18 (0.785, 0.180). At lr 2e-4, KTO beta 0.1: 2.01, peak 3.20; beta 0.3: 1.03 (KL 0.19 -> 1.65 from
         step 12 to 24).
  Rule, fixed after the DPO pilots and before the IPO and KTO ones: the main beta b is the largest pilot beta whose
  frozen run ends at >= 5 nats; the other TR beta is 3b; the ladder b/3 and b/10 (written 0.3b and 0.1b). DPO 0.1,
  IPO 0.1. No KTO beta reached 5 nats at either lr: a frozen KTO run ends under 3.6 nats at every pilot beta (its
  highest checkpoint 4.13, at beta 0.03, where the anchor is inert). Chosen AFTER seeing those KTO pilots: b = 0.1
  for KTO as well (the same lr and betas as DPO and IPO; its anchor ends 12% below 0.25, beta 0.03's only 2%). KTO
  therefore does not meet the high-KL requirement, and its matched-KL endpoints at 4 and 8 nats are expected to
  read "not reached".

ENDPOINTS AND DECISION RULES (fixed before the full run; endpoints() and rule() apply them and nothing else)
- Statistics. A cell is its seed mean. Delta = schedule minus none, paired by seed (a seed fixes the batch order)
  and by test prompt, with two 95% intervals: the bootstrap (2,000 draws; test prompts resampled with one table for
  every run; seeds resampled with one table for both arms) and the seed-level t interval (n - 1 df). A Delta is
  "better" ("worse") only when BOTH lie above (below) 0, else "no detectable difference" (classify_both): with
  5 seeds the percentile bootstrap is too narrow along seeds, and the t interval ignores the prompts.
- The positive control. On each endpoint, Delta_control = soft_every_step minus none. Only if its call is "better"
  or "worse" does the endpoint give a verdict on TR; otherwise the verdict reads "blind: the endpoint cannot tell
  the no-anchor control from the frozen reference on this task", with the numbers.
- The verdict on an endpoint that sees the reference, from hard and soft (the authors' schedules): "TR helps" if
  at least one is better and neither worse; "TR hurts" if at least one is worse and neither better; "mixed" if one
  each; else "no detectable difference".
- The endpoints, per method (each gets its verdict):
  E1 best-on-validation: the test gold of each run's best-on-validation checkpoint, at the main beta (experiment 1's
     primary endpoint).
  E2 the paper's protocol: the test gold at the end of the budget (step 240, no early stopping), beta tuned per
     schedule: of the TR betas the schedule ran at, the one with the highest seed-mean end-of-budget validation gold
     (the control runs at the main beta only). Delta pairs the tuned cells by seed.
  E3 matched KL: the test gold where each run's trajectory (the SFT model at KL 0, then its checkpoints) reaches KL
     1, 2, 4 and 8, interpolated linearly between checkpoints, at the main beta; KL is taken as measured, not
     resampled. A KL is compared only if every seed of all four schedules reaches it ("not reached" otherwise).
  E4 the mechanism, for each TR cell (schedule S at beta b): the matched frozen beta b' is the frozen beta (any of
     the method's, ladder included) whose seed-mean KL trajectory is nearest, the smallest mean |ln KL_S - ln KL_b'|
     over the checkpoints after step 16 (match_beta). On the mean test gold over the checkpoints (the whole
     trajectory): Delta_TR = S(b) - none(b) and Delta_mech = S(b) - none(b'). Reading: "nothing to explain" if
     Delta_TR makes no call; "a smaller beta" if Delta_TR does and Delta_mech does not; "not only a smaller beta"
     if both do. The end-of-budget and best-on-validation Deltas against none(b') are reported beside it.
- The high-KL requirement: every schedule at the main beta should end at >= 4 nats (every seed); the report lists
  each cell's end KL, and a KL not reached by all is "not reached" in E3, not dropped.
- Reported, no verdict: the same endpoints at 3b, every cell, the plots. With 6 endpoints x 3 methods x 2 schedules,
  a few calls are expected by chance if nothing differs; read the pattern, not one call.

Cost, measured on the pilots (2 workers, one torch thread each; the machine shared, load 7-10 on 2 cores), CPU
seconds per frozen run of 240 steps (train + judge): DPO 37 + 37 (11 checkpoints; ~34 with 10), IPO 35 + 32, KTO
50 + 33; a moving reference adds ~3 s (experiment 1). The 14 frozen and 21 TR runs per method: DPO ~2,550 s, IPO
~2,410, KTO ~2,970; with the SFT model (~100 s) ~8,030 CPU seconds, 67 min on each of 2 idle cores, ~70 min
with each sitting's start and its last run's tail (DPO's sitting ~23 min with the SFT model, IPO ~21, KTO ~26). On
a loaded machine it takes longer: the pilots ran at 2.5-5x their CPU time. All pilots together used ~25 CPU
minutes.

EXPERIMENT 3 (results/toy3/; pre-registered here and in docs/experiment.md before its full run; the run's report is
results/toy3/results.md). Experiment 2 compared a weak frozen anchor with no anchor on a task whose best policy lies ~1.2 nats from
SFT. The paper's later claim is about over-optimisation: a moving reference lets the policy travel further from SFT
while keeping quality, a better gold-versus-KL frontier. Experiment 3 tests that, for DPO only (the budget).
- Task: the same toy, but the SFT demonstrations are SFT_ERROR3 = 85% wrong with one systematic, well-formed
  mistake, MISTAKE3: the other operation's answer (sort for reverse, reverse for sort; toy_other_op), and every
  pair's rejected answer is that same mistake (other_op; a toy_corrupt answer where both operations agree). K* =
  -E log p_SFT(correct answer) (the probe pairs' chosen answers, printed with the SFT line) is 5.55 nats: the best
  reachable policy lies several nats from SFT, in a direction the pairs point to. The model, the SFT recipe, the eval
  prompts and the judge are experiment 2's; the budget is one epoch of 5,760 fresh pairs = 360 steps at lr 1e-4, with
  checkpoints at CHECKPOINTS3 (experiment 2's and 300, 360), so that a frozen run reaches K* after its peak.
- Arms (GRID3, 5 seeds each; the main beta 0.3 is where the gates were piloted and the every-step control runs):
    frozen (none)        beta 0.1, 0.3, 1, 3
    hard, soft (alpha 0.6), every tau = TAU3 = 32 steps   beta 0.3, 1 (the main beta and 3x: the hard pilot at beta 0.3
                         ends at KL 14.4, the frozen one at 7.7)
    soft_every_step      beta 0.3: the no-anchor control
    flipped              beta 0.3, 1: the FRONTIER POSITIVE CONTROL, a frozen reference trained on the same pairs
                         with FLIP3 = 30% of the labels flipped (a seeded choice): it is known to lower the frontier
  55 runs.
- Primary endpoint, per seed and arm: F(k) = the test gold of the checkpoint with the highest validation gold
  among every checkpoint of every beta of the arm whose KL to SFT is <= k, and the SFT model (Stats.frontier), at
  k = K*, 2 K* and infinity (the unconstrained peak). Delta = arm minus frozen, paired by seed and by test prompt,
  both 95% intervals (the bootstrap over prompts and seeds, the seed-level t interval); "better"/"worse" only when
  both agree (classify_both).
- Decision rule, per k: if flipped - frozen is not "worse", the endpoint is blind ("blind: the flipped-label
  control is not seen") and gives no verdict; else the verdict from hard and soft (method_verdict): "TR helps" if
  at least one is better and neither worse, "TR hurts" the reverse, "mixed", or "no detectable difference". The
  every-step control is reported beside them, no verdict rests on it. Reported without a verdict: the frontier
  envelope (frontier_at) at fixed KLs and K*, every cell, the plots.
- Power, before the run: with n = 5 seeds the t interval detects (80% power, 5% two-sided) a Delta of about
  (t(4, 0.975) + t(4, 0.80)) sd / sqrt(5) = (2.776 + 0.941) / 2.236 sd = 1.66 sd, sd the seed-level sd of the
  per-seed Delta. On experiment 2's data the same endpoint (F(k) of hard, soft or the control minus frozen, seeds
  0-2) had sd 0.0015-0.026 (DPO 0.0015-0.004): a minimum detectable difference of 0.003-0.043 gold, about 0.007
  for DPO if its sd carries over; the bootstrap over prompts adds about as much again. A true difference under
  ~0.01 gold will most likely read "no detectable difference". For scale, on the pilots' validation gold (one
  seed) the unconstrained peaks are frozen 0.509, hard 0.478, the control 0.473 (beta 0.3).
- Pilot gates (pilot_gates; frozen, hard and the every-step control at one beta, seed 0; validation gold and KL
  only), all to pass before the full run: (1) the frozen pilot's validation gold at KL K* >= its gold at KL 0.5;
  (2) mean |ln KL_hard - ln KL_control| over the checkpoints after step tau >= 0.1, and >= 4 reference updates
  before the frozen run's best validation checkpoint. The task, the budget, beta and tau were chosen from the
  pilots so that both hold; the pilots of every round, their commands and gate readings are committed in
  results/toy3/pilots/ (pilots.md). Rounds 1-4 failed a gate and changed the design:
    1 (SFT 90% wrong by random corruption, toy_corrupt; beta 1, tau 8, 240 steps): gold peaks at step 24 (KL 0.7)
      and falls onto malformed strings (gate 1 0.347 at K* = 3.00 vs 0.442); hard = control (0.050), 2 updates.
    2 (95% wrong, the other operation's answer; beta 1, tau 8): gate 2 passes (0.106, 24 updates), but K* = 11.17
      lies beyond the frozen run's KL (1.85 at step 240; its gold rises to 0.409 at step 200).
    3 (85% wrong; beta 0.3, tau 8): K* = 5.55 beyond the frozen run's 4.28 at step 240 (its gold still above the
      KL-0.5 level there); hard = control (0.017).
    4 (75% wrong; beta 0.3, tau 32): K* = 3.69, but gold peaks at KL 0.84 (step 72) and falls (0.440 at K* vs
      0.478); stopped after the frozen run.
  Round 5, this design (85% wrong, 360 steps, beta 0.3, tau 32): gate 1 PASSES, 0.473 at K* = 5.55 vs 0.436 at
  KL 0.5 (frozen peak 0.509 at step 160, KL 2.59; 0.383 at KL 7.74); gate 2 PASSES, 0.111 with 4 updates before
  the step-160 peak. Both margins are thin: one seed, +0.037 gold and 0.011 above the threshold.
- Cost, from the round-5 pilots (one torch thread each): a 360-step run takes 48-49 + 35-37 CPU seconds (training +
  judging 12 checkpoints), whatever its schedule; 55 runs and the SFT model ~4,700 CPU seconds: ~40 min on 2 idle
  cores, ~45 min with start-up and the last run's tail. A loaded machine stretches it (the pilots ran at 1.4-7x
  their CPU time).

    python toy_experiment.py --experiment 3       # experiment 3's full run (56 min on 2 cores)
    python toy_experiment.py --experiment 3 --betas 0.3 --schedules none hard soft_every_step --lr 1e-4 --tau 32
                                                  # its pilot and gates (add the --checkpoints of CHECKPOINTS3)

    python toy_experiment.py                      # experiment 2, all 105 runs, ~70 min on 2 idle cores; resumable
    python toy_experiment.py --methods dpo        # or one method per sitting (21-26 min); then ipo, then kto
    python toy_experiment.py --report_only        # both reports from the committed results/ folders alone
    python toy_experiment.py --quick              # a smoke test (CI): 'tiny' model, a few steps; numbers mean nothing
    python toy_experiment.py --methods dpo --betas 0.1 0.3 --lr 1e-4 --checkpoints 12 24 48 96 240
                                                  # a pilot: frozen reference, seed 0, out/toy2/pilots only
"""
import gzip
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
from engineering import cli
from engineering.models import load_model
from engineering.toy import (toy_expected, toy_gold_score, toy_malformed, toy_other_op, toy_preferences, toy_problem,
                              toy_sft_rows)
from evaluate import response_logps, sample

# -----------------------------------------------------------------------------
# the design (experiment 2; experiment 1's is in results/toy/results.json)

LR = dict.fromkeys(("dpo", "ipo", "kto"), 1e-4)  # chosen on frozen-reference pilots (docstring)
TAU = 16          # updates after steps 16, 32, ..., 224 act on training (the one after step 240 ends the run)
CHECKPOINTS = (12, 24, 36, 48, 72, 96, 120, 160, 200, 240)  # dense early, where KL 1 and 2 are crossed
GOLD_SCALE = 120  # a prompt's gold (mean over 2 samples of k/n, n = 3..6 digits) times 120 is an integer: stored as one

FULL = dict(model="small", sft_steps=1200, sft_lr=3e-3, lr=LR, checkpoints=CHECKPOINTS, pairs=3840, tau=TAU,
            n_eval=512, samples=2, probe=128, sft_rows=8192)
QUICK = dict(model="tiny", sft_steps=30, sft_lr=3e-3, lr=dict.fromkeys(LR, 1e-4), checkpoints=(2, 4, 6, 8),
             pairs=128, tau=4, n_eval=32, samples=2, probe=16, sft_rows=512)

# experiment 3 (pre-registered in the docstring; DPO only): a task where the best policy lies >= 3 nats from SFT
SFT_ERROR3 = 0.85  # the SFT demonstrations' error rate (experiments 1 and 2: 0.3)
MISTAKE3 = "other_op"  # every wrong demonstration and every rejected answer: the other operation's answer
FLIP3 = 0.3       # the frontier positive control trains on pairs with this fraction of labels flipped
TAU3 = 32  # hard and soft: 4 updates act before the frozen pilot's peak at step 160
CHECKPOINTS3 = CHECKPOINTS + (300, 360)  # 5,760 pairs, 360 steps: the frozen runs reach K* after their peak
FULL3 = dict(FULL, sft_error=SFT_ERROR3, mistake=MISTAKE3, flip=FLIP3, tau=TAU3, lr=dict(LR), pairs=5760,
             checkpoints=CHECKPOINTS3)
MAIN_BETA3 = {"dpo": 0.3}  # where the gates were piloted and the every-step control runs
GRID3 = {"dpo": {0.1: (("none",), 5), 0.3: (("none", "hard", "soft", "soft_every_step", "flipped"), 5),
                 1.0: (("none", "hard", "soft", "flipped"), 5), 3.0: (("none",), 5)}}
ARMS3 = ("hard", "soft", "soft_every_step", "flipped")  # each compared with the frozen arm ("none")

SCHEDULES = ("none", "hard", "soft", "soft_every_step")
CONTROL = "soft_every_step"  # the positive control: alpha 0.6 after EVERY step, no anchor left
PAPER_SCHEDULES = ("hard", "soft")  # the verdicts rest on these (the authors' code)
FROZEN, PAPER = ("none",), ("none", "hard", "soft")
# per method: beta -> (schedules, seeds). The main beta b (the pilots' choice, 0.1 for all three): every schedule, 5
# seeds; 3b: the paper schedules and the baseline, 3 seeds (so that tuning beta is a real choice); 0.3b and 0.1b:
# frozen only, 3 seeds (the mechanism's ladder). 35 runs per method.
MAIN_BETA = dict.fromkeys(("dpo", "ipo", "kto"), 0.1)
GRID = {m: {0.1: (SCHEDULES, 5), 0.3: (PAPER, 3), 0.03: (FROZEN, 3), 0.01: (FROZEN, 3)} for m in MAIN_BETA}
KL_TARGETS = (1.0, 2.0, 4.0, 8.0)
FRONTIER_KL = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)  # where the report reads the frontier (frontier_at)
QUICK_GRID = {"dpo": {MAIN_BETA["dpo"]: (SCHEDULES, 2), MAIN_BETA["dpo"] / 4: (FROZEN, 2)},
              "ipo": {MAIN_BETA["ipo"]: (SCHEDULES, 1)}, "kto": {MAIN_BETA["kto"]: (SCHEDULES, 1)}}
SCRIPTS = {"dpo": tr_dpo, "ipo": tr_ipo, "kto": tr_kto}
SCRIPT_EVAL = 16      # rows at the end of each .jsonl that the scripts hold out for their own (unused) eval
MAX_NEW_TOKENS = 10   # the longest answer is 7 tokens (" " + 6 digits) + EOS: room to show rambling
N_BOOT = 2000


def schedule_flags(schedule, cfg):
    """(ref_update, alpha, tau) of a schedule; alpha and tau are None for the frozen baseline. soft_every_step, the
    positive control: after k steps 0.4^k of the old reference is left, it trails the policy by < 1 step. flipped
    (experiment 3's frontier positive control): a frozen reference, trained on the pairs with flipped labels."""
    return {"none": ("none", None, None), "flipped": ("none", None, None), "hard": ("hard", 1.0, cfg["tau"]), "soft": ("soft", 0.6, cfg["tau"]),
            "soft_every_step": ("soft", 0.6, 1)}[schedule]


def get_args(argv=None):
    p = cli.ArgumentParser(__doc__)  # a bad flag is one line, exit code 2, before anything is written
    p.add_argument("--quick", action="store_true", help="a smoke test of the whole pipeline in a minute or two")
    p.add_argument("--methods", nargs="+", default=list(SCRIPTS), choices=list(SCRIPTS), type=str.lower,
                   help="train these methods only (a full run can be split into sittings); the report covers every "
                        "finished run")
    p.add_argument("--workers", type=cli.count, default=2, help="runs trained at once, one process each")
    p.add_argument("--threads", type=cli.count, default=1,
                   help="torch CPU threads per process (more do not pay on these small models: docs/performance.md)")
    p.add_argument("--experiment", type=int, choices=(2, 3), default=2,
                   help="2: the second experiment; 3: the third (results/toy2/, results/toy3/)")
    p.add_argument("--output_dir", help="the runs, the SFT model and the data, not committed (default out/toyN)")
    p.add_argument("--results_dir", help="the committed record: results.md/json, per_prompt.json.gz, plots "
                                         "(default results/toy2; --quick: OUTPUT_DIR/results)")
    p.add_argument("--report_only", action="store_true",
                   help="no training, no out/: rewrite both experiments' reports from the committed results folders")
    g = p.add_argument_group("pilots (frozen reference only, before the full run; output_dir only, nothing committed)")
    g.add_argument("--lr", type=cli.positive, help=f"learning rate of every run (default {LR})")
    g.add_argument("--checkpoints", nargs="+", type=cli.count, help="checkpoint steps; the last ends the run")
    g.add_argument("--betas", nargs="+", type=cli.positive, help="these betas for every method given, instead of the grid")
    g.add_argument("--schedules", nargs="+", choices=SCHEDULES + ("flipped",), default=["none"], help="with --betas")
    g.add_argument("--tau", type=cli.count, help="the reference update interval of hard and soft")
    g.add_argument("--seeds", type=cli.count, default=1, help="seeds per cell, with --betas")
    g.add_argument("--sft_error", type=cli.fraction,
                   help="the SFT demonstrations' error rate (trains its own SFT model)")
    args = p.parse_args(argv)
    args.output_dir = args.output_dir or f"out/toy{args.experiment}"
    return args

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


def percentile_ci(draws, level=0.95):
    """(low, high) percentiles of bootstrap draws."""
    a = np.asarray(draws, dtype=float)
    return float(np.quantile(a, (1 - level) / 2)), float(np.quantile(a, (1 + level) / 2))


def seed_table(n_seeds):
    """(N_BOOT, n_seeds) seed indices drawn with replacement, one fixed table per number of seeds (so a CI does not
    depend on the order the report computes them in); one table serves both arms of a comparison (paired by seed)."""
    return np.random.default_rng(1000 + n_seeds).integers(0, n_seeds, size=(N_BOOT, n_seeds))


def boot_mean(x, seeds):
    """Bootstrap means over seeds: x (n_seeds, n_boot), column b computed on the b-th resample of the test prompts;
    seeds (n_boot, n_seeds). Draw b averages x[seeds[b, j], b] over j."""
    return x[seeds, np.arange(x.shape[1])[:, None]].mean(1)


def t_abs_cdf(t, df):
    """P(|T| <= t) for Student's t with integer df >= 1, in closed form (Abramowitz and Stegun 26.7.3-4):
    theta = atan(t / sqrt(df)), c = cos(theta), s = sin(theta),
        odd df:  (2/pi) (theta + s (c + 2/3 c^3 + 2*4/(3*5) c^5 + ... up to c^(df-2)))     (df 1: 2 theta/pi)
        even df: s (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ... up to c^(df-2))
    each coefficient the previous one times (j + 1)/(j + 2), j the previous power."""
    theta = math.atan(abs(t) / math.sqrt(df))
    c, s = math.cos(theta), math.sin(theta)
    j, coef, total = df % 2, 1.0, 0.0
    while j <= df - 2:
        total += coef * c ** j
        coef *= (j + 1) / (j + 2)
        j += 2
    return 2 / math.pi * (theta + s * total) if df % 2 else s * total


def t_quantile(df, level=0.95):
    """The t with P(|T| <= t) = level (two-sided; 2.776 for df 4 at 95%), by bisection on t_abs_cdf."""
    lo, hi = 0.0, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_abs_cdf(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def seed_t_ci(values, level=0.95):
    """(mean, low, high): mean +- t(n - 1) * sd / sqrt(n) over the seeds' values (sd with n - 1); None for one seed.
    The test prompts are held fixed: this interval is about the batch order (the seed) only."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return None
    half = t_quantile(len(x) - 1, level) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


NO_DIFF = "no detectable difference"


def classify(ci):
    """Experiment 1's reading of one 95% CI of Delta = TR - none."""
    return "better" if ci[0] > 0 else "worse" if ci[1] < 0 else NO_DIFF


def classify_both(boot_ci, t_ci):
    """Experiment 2's reading of Delta: "better" ("worse") only when the bootstrap CI over seeds and test prompts
    AND the seed-level t interval both lie above (below) 0. With few seeds the percentile bootstrap is too narrow in
    the seed direction, and the t interval ignores the prompts: a call needs both. One seed: no call."""
    if t_ci is None:
        return NO_DIFF
    calls = {classify(boot_ci), classify(t_ci)}
    return calls.pop() if len(calls) == 1 else NO_DIFF


def method_verdict(calls):
    """A verdict from the paper schedules' readings (classify, classify_both)."""
    better, worse = "better" in calls, "worse" in calls
    return "mixed" if better and worse else "TR helps" if better else "TR hurts" if worse else NO_DIFF


def endpoint_verdict(control_call, calls):
    """The positive control: an endpoint gives a verdict on TR only if it tells the no-anchor control
    (soft_every_step) from the frozen reference, in either direction; otherwise it is "blind" on this task."""
    return "blind" if control_call == NO_DIFF else method_verdict(calls)


def match_beta(kl, ladder, steps, after):
    """The frozen beta whose KL trajectory is nearest to `kl`: the smallest mean over the checkpoints after step
    `after` (the first reference update: before it a TR run and a frozen run at its beta are the same run) of
    |ln kl - ln kl_b|, kl and each ladder[b] being seed-mean KL per checkpoint (floored at 0.01 nats, since the
    Monte-Carlo estimate can dip below 0 near the start). Returns (beta, distance); a tie goes to the larger beta."""
    at = [i for i, s in enumerate(steps) if s > after]
    ln = lambda v: math.log(max(v, 0.01))  # noqa: E731
    dist = {b: float(np.mean([abs(ln(kl[i]) - ln(k[i])) for i in at])) for b, k in ladder.items()}
    b = min(dist, key=lambda b: (dist[b], -b))
    return b, dist[b]


def frontier_at(curves, k):
    """The frontier at KL k: the upper envelope of gold-versus-KL curves, the highest gold any curve has at k.
    curves: [(kls, golds)], each piecewise linear from the SFT model (KL 0) through a cell's checkpoints (seed
    means; KL need not rise monotonically). Every segment whose KL span contains k is interpolated linearly at k,
    and the largest value wins. None when no curve reaches k."""
    best = None
    for kls, golds in curves:
        for i in range(1, len(kls)):
            lo, hi = kls[i - 1], kls[i]
            if min(lo, hi) <= k <= max(lo, hi):
                w = (k - lo) / (hi - lo) if hi != lo else 1.0
                v = (1 - w) * golds[i - 1] + w * golds[i]
                best = v if best is None else max(best, v)
    return best


def mechanism_reading(tr_call, mech_call):
    """Is TR at beta b a frozen reference at the KL-matched beta b'? tr_call: TR(b) - frozen(b); mech_call:
    TR(b) - frozen(b'), both read by classify_both."""
    if tr_call == NO_DIFF:
        return "nothing to explain (TR not told apart from frozen at its own beta)"
    if mech_call == NO_DIFF:
        return f"a smaller beta (TR {tr_call} than frozen at its beta, not told apart from frozen at the matched one)"
    return f"not only a smaller beta (TR {mech_call} than frozen at the matched beta too)"


def gold_to_int(gold, samples):
    """Per-prompt gold as integers: the mean over 2 samples of k/n (k of n = 3..6 digits right) times
    GOLD_SCALE = 2 * lcm(3, 4, 5, 6) = 120 is a whole number, so one byte per prompt stores it exactly."""
    assert samples == 2, "GOLD_SCALE assumes 2 samples per prompt"
    ints = [round(g * GOLD_SCALE) for g in gold]
    assert all(abs(i - g * GOLD_SCALE) < 1e-6 for i, g in zip(ints, gold))
    return ints


def encode_per_prompt(table):
    """The per-prompt record as gzip'd JSON, byte-identical for the same table (mtime 0, no spaces). table:
    {"scale", "n_val", "prompts", "sft": [ints], "runs": {run name: [[ints] per checkpoint]}}."""
    return gzip.compress(json.dumps(table, separators=(",", ":"), sort_keys=True).encode(), mtime=0)


def decode_per_prompt(blob):
    return json.loads(gzip.decompress(blob))


# -----------------------------------------------------------------------------
# data: the eval prompts first, then SFT and preference data without them


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def other_op(prompt, wrong):
    """Experiment 3's systematic mistake: the other operation's answer (toy_other_op), or `wrong` (a corrupted
    answer, toy_corrupt) where both operations give the right one."""
    other = toy_other_op(prompt)
    return wrong if other.strip() == toy_expected(prompt) else other


def make_data(out, cfg):
    """Eval prompts (distinct; first half validation, second half test), SFT rows and preference pairs as local
    .jsonl files for the scripts, none of whose training rows has an eval prompt. Returns paths, prompts, overlap."""
    rng, prompts = random.Random("toy-experiment-eval"), []
    while len(prompts) < cfg["n_eval"]:
        p, _ = toy_problem(rng)
        if p not in prompts:
            prompts.append(p)
    held = set(prompts)
    n_sft, n_pairs = cfg["sft_rows"] + SCRIPT_EVAL, cfg["pairs"] + SCRIPT_EVAL  # one epoch: pairs / 16 steps
    sft_stream = toy_sft_rows(2 * n_sft, 0, cfg.get("sft_error", 0.3))
    pair_stream = toy_preferences(2 * n_pairs, 0)
    if cfg.get("mistake") == "other_op":  # experiment 3: every wrong answer is the other operation's (other_op)
        sft_stream = [r if r["completion"].strip() == toy_expected(r["prompt"]) else
                      {**r, "completion": other_op(r["prompt"], r["completion"])} for r in sft_stream]
        pair_stream = [{**r, "rejected": other_op(r["prompt"], r["rejected"])} for r in pair_stream]
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
    if cfg.get("flip"):  # the same pairs, a fixed fraction with chosen and rejected swapped (a seeded choice)
        flip = set(random.Random("toy-experiment-flip").sample(range(len(pairs)), round(cfg["flip"] * len(pairs))))
        paths["pairs_flipped"] = os.path.join(out, "data", "pairs_flipped.jsonl")
        write_jsonl(paths["pairs_flipped"], [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} if i in flip
                                             else r for i, r in enumerate(pairs)])
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


class Stopped(RuntimeError):
    """A training script stopped before its last step (SIGINT/SIGTERM): the run is not recorded."""


def run_name(job):
    return f"{job['method']}_beta{job['beta']:g}_{job['schedule']}_seed{job['seed']}"


def run_key(job, cfg):
    """What a finished run's numbers depend on: a rerun skips a run whose key matches."""
    keep = {k: cfg[k] for k in ("model", "sft_steps", "sft_lr", "checkpoints", "pairs", "tau", "n_eval", "samples",
                                "probe", "sft_rows", "sft_error", "mistake", "flip") if k in cfg}
    keep["lr"] = cfg["lr"][job["method"]]  # another method's lr is not this run's
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
    pairs = data["paths"]["pairs_flipped" if job["schedule"] == "flipped" else "pairs"]
    flags = ["--model", sft_path, "--dataset", pairs, "--eval_size", str(SCRIPT_EVAL),
             "--eval_every", "0", "--log_every", every, "--save_every", every, "--seed", str(job["seed"]),
             "--lr", str(cfg["lr"][method]), "--beta", str(beta), "--batch_size", batch, "--micro_batch_size", batch,
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
            for d in ("policy", "reference"):  # the previous segment's: a segment that stops early writes none
                shutil.rmtree(os.path.join(run, d), ignore_errors=True)
            SCRIPTS[method].main(flags + ["--max_steps", str(step)] + (["--resume"] if k else []))
            if not os.path.isdir(os.path.join(run, "policy")):  # SIGINT/SIGTERM: checkpoint/ only
                raise Stopped(f"{run_name(job)} stopped before step {step} (a signal?); a rerun trains it again")
            t = timed("train", t)
            policy = AutoModelForCausalLM.from_pretrained(os.path.join(run, "policy"))
            reference = (None if ref_update == "none"
                         else AutoModelForCausalLM.from_pretrained(os.path.join(run, "reference")))
            checkpoints.append({"step": step, **judge(method, beta, policy, reference)})
            timed("eval", t)
    for d in ("checkpoint", "policy", "reference"):  # weights and optimizer state: not needed any more
        shutil.rmtree(os.path.join(run, d), ignore_errors=True)
    result = {**job, "ref_update": ref_update, "alpha": alpha, "tau": tau, "lr": cfg["lr"][method],
              "key": run_key(job, cfg),
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


def print_pilot(runs, sft_eval, tau):
    """The pilots' table: validation gold, KL to the SFT model and the anchor per checkpoint (no test numbers);
    experiment 3's gates wherever a beta has the frozen, hard and every-step-control runs of a seed."""
    kstar = -sft_eval["logp_chosen"]
    L = [f"pilot, SFT val gold {sft_eval['gold_score_val']:.3f}, K* {kstar:.2f} nats; per checkpoint: val gold / KL / "
         "anchor"]
    for r in runs:
        L.append(f"{r['method']} beta {r['beta']:g} {r['schedule']} seed {r['seed']} lr {r['lr']:g}: " + "  ".join(
            f"{c['step']}: {c['gold_score_val']:.3f}/{c['kl']:.2f}/{c['anchor_weight']:.3f}" for c in r["checkpoints"])
            + f"  (CPU {r['train_cpu_s']:.0f} + {r['eval_cpu_s']:.0f} s, wall {r['train_s'] + r['eval_s']:.0f} s)")
    for r in runs:
        if r["schedule"] == "none":
            trio = [select(runs, method=r["method"], beta=r["beta"], seed=r["seed"], schedule=s)
                    for s in ("hard", "soft_every_step")]
            if all(trio):
                lines, ok = pilot_gates(r, trio[0][0], trio[1][0], sft_eval["gold_score_val"], kstar, tau)
                L += [f"{r['method']} beta {r['beta']:g} seed {r['seed']}: " + line for line in lines]
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
    """The bootstrap over the committed per-prompt gold. Each run's test gold at each checkpoint is resampled with ONE
    table of test-prompt weights for every run (N_BOOT multinomial draws, seed 0), so comparisons are paired by
    prompt; seeds are resampled with seed_table, one table for both arms (paired by seed). Validation gold, which
    picks checkpoints and betas, and KL, which places a run on the KL axis, are taken as measured (not resampled).

    gold: {run name: (checkpoints, prompts) integer gold, validation prompts first}; "sft": the SFT model's
    (prompts,)."""

    def __init__(self, runs, gold, n_val):
        n_test = len(gold["sft"]) - n_val
        w = np.random.default_rng(0).multinomial(n_test, np.full(n_test, 1 / n_test), size=N_BOOT).T / n_test
        self.val, self.test, self.boot = {}, {}, {}
        for name, g in [("sft", [gold["sft"]])] + [(run_name(r), gold[run_name(r)]) for r in runs]:
            g = np.asarray(g, dtype=float) / GOLD_SCALE
            self.val[name], self.test[name] = g[:, :n_val].mean(1), g[:, n_val:].mean(1)
            self.boot[name] = g[:, n_val:] @ w

    # each statistic of a run: (point estimate, its N_BOOT draws); None where the run has no value
    def best(self, run):
        """Test gold at the best-on-validation checkpoint."""
        i, name = best_checkpoint(list(self.val[run_name(run)])), run_name(run)
        return self.test[name][i], self.boot[name][i]

    def end(self, run):
        return self.test[run_name(run)][-1], self.boot[run_name(run)][-1]

    def mean_over_checkpoints(self, run):
        return self.test[run_name(run)].mean(), self.boot[run_name(run)].mean(0)

    def at_kl(self, run, target):
        """Test gold where the run's trajectory (the SFT model at KL 0, then its checkpoints) reaches KL target,
        interpolated linearly (at_kl), the draws with the same weights."""
        where = at_kl([0.0] + [c["kl"] for c in run["checkpoints"]], target)
        if where is None:
            return None
        (i, w), name = where, run_name(run)
        vals = np.concatenate([self.test["sft"], self.test[name]])
        draws = np.vstack([self.boot["sft"], self.boot[name]])
        return (1 - w) * vals[i - 1] + w * vals[i], (1 - w) * draws[i - 1] + w * draws[i]

    def frontier(self, runs, k):
        """Experiment 3's endpoint F(k) for one seed of one arm: of the checkpoints of `runs` (every beta of the
        arm, that seed) with KL <= k, and the SFT model (KL 0), the one with the highest validation gold (the
        first of equal ones: SFT, then runs in order, checkpoints in order); its test gold and draws."""
        best, at = self.val["sft"][0], ("sft", 0)
        for r in runs:
            for i, c in enumerate(r["checkpoints"]):
                if c["kl"] <= k and self.val[run_name(r)][i] > best:
                    best, at = self.val[run_name(r)][i], (run_name(r), i)
        return self.test[at[0]][at[1]], self.boot[at[0]][at[1]]

    def cell(self, runs, stat):
        """{"mean", "boot", "t", "seeds"} of stat over the runs (seeds) of one cell; None if any run has no value."""
        vals = [stat(r) for r in runs]
        if not vals or any(v is None for v in vals):
            return None
        boot = boot_mean(np.array([v[1] for v in vals]), seed_table(len(vals)))
        t = seed_t_ci([v[0] for v in vals])
        return {"mean": float(np.mean([v[0] for v in vals])), "boot": percentile_ci(boot),
                "t": t and t[1:], "seeds": len(vals)}

    def delta(self, runs_a, runs_b, stat_a, stat_b=None):
        """stat_a over a minus stat_b over b, paired by seed (the seeds both have, each needing a value), with both
        intervals and classify_both's call: {"delta", "boot", "t", "seeds", "call"}; None without a common seed."""
        return self.paired({r["seed"]: stat_a(r) for r in runs_a}, {r["seed"]: (stat_b or stat_a)(r) for r in runs_b})

    def paired(self, a, b):
        """Delta from {seed: (point, draws) or None} of each arm: the seeds both have values for."""
        common = sorted(s for s in set(a) & set(b) if a[s] is not None and b[s] is not None)
        if not common:
            return None
        boot = boot_mean(np.array([a[s][1] - b[s][1] for s in common]), seed_table(len(common)))
        t = seed_t_ci([a[s][0] - b[s][0] for s in common])
        d = {"delta": float(np.mean([a[s][0] - b[s][0] for s in common])), "boot": percentile_ci(boot),
             "t": t and t[1:], "seeds": len(common)}
        return {**d, "call": classify_both(d["boot"], d["t"])}


def fmt(d, digits=3):
    """A cell or a Delta: mean or Delta, the bootstrap CI and the seed-level t interval."""
    if d is None:
        return "—"
    sign = "+" if "delta" in d else ""
    v = d.get("delta", d.get("mean"))
    t = f"; t [{d['t'][0]:{sign}.{digits}f}, {d['t'][1]:{sign}.{digits}f}]" if d.get("t") else ""
    boot = f" [{d['boot'][0]:{sign}.{digits}f}, {d['boot'][1]:{sign}.{digits}f}]" if d.get("boot") else ""
    return f"{v:{sign}.{digits}f}{boot}{t}"


def fmt_boot(c):
    """A cell with its bootstrap CI only (the tables of cells)."""
    return "—" if c is None else fmt({k: v for k, v in c.items() if k != "t"})


def fmt_call(d):
    """A Delta with its call, when it makes one."""
    return "—" if d is None else fmt(d) + ("" if d["call"] == NO_DIFF else f" **{d['call']}**")


def fmt_t(d, digits=3):
    """A seed-level result: {"delta" or "mean", "t"}."""
    return fmt({k: v for k, v in d.items() if k != "boot"}, digits) if d else "—"


def dump_results(path, summary, runs):
    """results.json: the summary indented, then `runs`, one compact line per run (floats to 5 decimals)."""
    def compact(x):
        return (round(x, 5) if isinstance(x, float) else [compact(v) for v in x] if isinstance(x, (list, tuple))
                else {k: compact(v) for k, v in x.items()} if isinstance(x, dict) else x)
    lines = [json.dumps(compact(r)) for r in runs]
    with open(path, "w") as f:
        f.write(json.dumps(summary, indent=1)[:-2] + ',\n "runs": [\n  ' + ",\n  ".join(lines) + "\n ]\n}\n")


def grid_json(grid):
    return {m: {str(b): {"schedules": list(s), "seeds": n} for b, (s, n) in g.items()} for m, g in grid.items()}


def grid_from_json(g):
    return {m: {float(b): (tuple(c["schedules"]), c["seeds"]) for b, c in cells.items()} for m, cells in g.items()}


def save_record(results, runs, sft_eval, cfg, grid, overlap, sittings, prompts):
    """The committed record of experiment 2: results.json (every run and checkpoint without the per-prompt gold) and
    per_prompt.json.gz (the per-prompt validation and test gold of the SFT model and of every checkpoint)."""
    os.makedirs(results, exist_ok=True)
    n_val = len(prompts) // 2
    table = {"scale": GOLD_SCALE, "n_val": n_val, "prompts": prompts, "sft": sft_eval["gold_per_prompt"],
             "runs": {run_name(r): [c["gold_per_prompt"] for c in r["checkpoints"]] for r in runs}}
    with open(os.path.join(results, "per_prompt.json.gz"), "wb") as f:
        f.write(encode_per_prompt(table))
    summary = {"experiment": 3 if "sft_error" in cfg else 2, "config": cfg, "grid": grid_json(grid),
               "main_beta": MAIN_BETA3 if "sft_error" in cfg else MAIN_BETA, "overlap": overlap,
               "sittings": sittings, "wall_s": sum(x["wall_s"] for x in sittings),
               "sft": {k: v for k, v in sft_eval.items() if k != "gold_per_prompt"}}
    dump_results(os.path.join(results, "results.json"), summary,
                 [{**{k: v for k, v in r.items() if k not in ("checkpoints", "key")},
                   "checkpoints": [{k: v for k, v in c.items() if k != "gold_per_prompt"} for c in r["checkpoints"]]}
                  for r in runs])


def select(runs, **kw):
    return [r for r in runs if all(r[k] == v for k, v in kw.items())]


def seed_mean(rs, key):
    """The seed-mean trajectory of a checkpoint field."""
    return [float(np.mean([r["checkpoints"][i][key] for r in rs])) for i in range(len(rs[0]["checkpoints"]))]

# -----------------------------------------------------------------------------
# experiment 1's report: from the committed results/toy/results.json alone (no per-prompt gold), seed-level intervals


def seed_cell(runs, f):
    vals = [f(r) for r in runs]
    if not vals or any(v is None for v in vals):
        return None
    t = seed_t_ci(vals)
    return {"mean": float(np.mean(vals)), "t": t and t[1:], "seeds": len(vals)}


def seed_delta(runs_a, runs_b, f_a, f_b=None):
    """Paired by seed: {"delta", "t", "seeds", "call"} from the seeds' differences, classify on the t interval."""
    a, b = {r["seed"]: f_a(r) for r in runs_a}, {r["seed"]: (f_b or f_a)(r) for r in runs_b}
    common = sorted(s for s in set(a) & set(b) if a[s] is not None and b[s] is not None)
    if not common:
        return None
    t = seed_t_ci([a[s] - b[s] for s in common])
    return {"delta": float(np.mean([a[s] - b[s] for s in common])), "t": t and t[1:], "seeds": len(common),
            "call": classify(t[1:]) if t else NO_DIFF}


def e1_best(r):
    c = r["checkpoints"]
    return c[best_checkpoint([x["gold_score_val"] for x in c])]["gold_score_test"]


def e1_end(r):
    return r["checkpoints"][-1]["gold_score_test"]


def e1_at_kl(target, key="gold_score_test"):
    def f(r, sft):
        where = at_kl([0.0] + [c["kl"] for c in r["checkpoints"]], target)
        if where is None:
            return None
        (i, w), v = where, [sft[key]] + [c[key] for c in r["checkpoints"]]
        return (1 - w) * v[i - 1] + w * v[i]
    return f


def report_experiment1(results):
    """results/toy/results.md from results/toy/results.json: every cell of experiment 1 with seed-level t intervals,
    the pre-registered verdict quoted as committed, and the positive control applied after the fact."""
    res = json.load(open(os.path.join(results, "results.json")))
    runs, cfg, sft, grid = res["runs"], res["config"], res["sft"], grid_from_json(res["grid"])
    vbeta = res["verdict_beta"]
    schedules = ("none", "hard", "soft", "ema", "soft_every_step")
    steps = [c["step"] for c in runs[0]["checkpoints"]]
    L = ["# Experiment 1: is the trust-region update better than a frozen reference? (committed runs, corrected)\n",
         f"Model '{cfg['model']}', SFT {cfg['sft_steps']} steps (test gold {sft['gold_score_test']:.3f}, validation "
         f"{sft['gold_score_val']:.3f}); every run {cfg['steps']} steps of 16 pairs (one epoch), lr {cfg['lr']:g}, "
         f"checkpoints every {cfg['every']} steps. Schedules: none (frozen), hard and soft (alpha 0.6) every "
         f"{cfg['tau']} steps, ema (alpha {cfg['ema']:g} every step), soft_every_step (alpha 0.6 every step: no "
         f"anchor). {len(runs)} runs, {res['wall_s'] / 60:.1f} min in {len(res['sittings'])} sittings. Design, "
         "pilots and the rule: docs/experiment.md; the runs were made by commit 4299a3f's toy_experiment.py.\n",
         f"Reference updates: after steps {', '.join(str(s) for s in range(cfg['tau'], cfg['steps'] + 1, cfg['tau']))}"
         f". The frozen baseline peaks on validation at step 48, and the policy of step 48 was trained under the "
         "references of the updates after steps 16 and 32 only: TWO updates act before the peak (the step-48 update "
         "acts from step 49 on), not three as the design said.\n",
         "**Intervals.** The per-prompt gold was not committed for this experiment (out/ was not kept), so the "
         "pre-registered bootstrap over seeds and test prompts cannot be recomputed. Every interval below is a "
         "seed-level 95% t interval, recomputed by `python toy_experiment.py --report_only` from results.json: "
         "mean +- t(n-1) sd/sqrt(n) over the seeds (n = 3 or 5, 2 or 4 df), Deltas paired by seed; the 256 test "
         "prompts are held fixed, so these intervals are about the batch order only. A call (better / worse) is "
         "the t interval excluding 0.\n",
         "## The pre-registered verdict, as committed (bootstrap CIs from the uncommitted per-prompt data)\n"]
    L += [f"- **{m.upper()}**: {v}" for m, v in res["verdict"].items()] + [""]

    L += ["## The pre-registered power check: the frozen baseline's anchor at its last checkpoint\n",
          "Active: DPO weight <= 0.4, IPO mean (h - t) >= -0.8 t, KTO weight <= 0.2 (each 20% below its value at "
          "h = 0). Seed means.\n",
          "| method | beta | seeds | anchor at the first / middle / last checkpoint | active |",
          "|---|---|---|---|---|"]
    for m in grid:
        for b in grid[m]:
            base = select(runs, method=m, beta=b, schedule="none")
            a = seed_mean(base, "anchor_weight")
            L.append(f"| {m.upper()} | {b:g} | {len(base)} | {a[0]:.3f} / {a[len(a) // 2]:.3f} / {a[-1]:.3f} | "
                     f"{'yes' if anchor_active(m, a[-1], b) else 'no'} |")
    L += [""]

    for title, f in (("best-on-validation test gold (the primary endpoint)", e1_best),
                     ("end-of-budget test gold (step 120; a secondary view in this experiment)", e1_end)):
        L += [f"## The verdict betas with seed-level intervals and the positive control (after the fact): {title}\n",
              "Schedule minus none at the verdict beta, paired by seed. The positive control (experiment 2's, applied "
              "after the fact): an endpoint can give a verdict on TR only if it tells the no-anchor control "
              "(soft_every_step) from the frozen reference.\n",
              "| method (verdict beta) | seeds | control − none | hard − none | soft − none | ema − none | "
              "calls by t: control; hard, soft | the rule with the positive control, by t |",
              "|---|---|---|---|---|---|---|---|"]
        for m, b in vbeta.items():
            base = select(runs, method=m, beta=b, schedule="none")
            d = {s: seed_delta(select(runs, method=m, beta=b, schedule=s), base, f) for s in schedules[1:]}
            v = endpoint_verdict(d["soft_every_step"]["call"], [d["hard"]["call"], d["soft"]["call"]])
            L.append(f"| {m.upper()} ({b:g}) | {len(base)} | " +
                     " | ".join(fmt_t(d[s], 4) for s in ("soft_every_step", "hard", "soft", "ema")) +
                     f" | {d['soft_every_step']['call']}; {d['hard']['call']}, {d['soft']['call']} | {v} |")
        L.append("")
    L += ["The t intervals leave out the test prompts' sampling noise, so they are narrower than the "
          "pre-registered bootstrap's; read a call that rests on a bound within 0.001 of 0 as marginal.", ""]

    for title, f in (("best-on-validation checkpoint (the primary endpoint)", e1_best),
                     ("end of budget (step 120)", e1_end)):
        L += [f"## Every cell: test gold at the {title}\n",
              "Seed means with t intervals; Delta = schedule minus none at the same beta, paired by seed; call by t.\n",
              "| method | beta | schedule | seeds | test gold | Delta vs none | call |",
              "|---|---|---|---|---|---|---|"]
        for m in grid:
            for b, (scheds, _) in grid[m].items():
                base = select(runs, method=m, beta=b, schedule="none")
                for s in scheds:
                    rs = select(runs, method=m, beta=b, schedule=s)
                    d = seed_delta(rs, base, f) if s != "none" else None
                    L.append(f"| {m.upper()} | {b:g}{' (verdict)' if b == vbeta[m] else ''} | {s} | {len(rs)} | "
                             f"{fmt_t(seed_cell(rs, f))} | {fmt_t(d, 4)} | {d['call'] if d else ''} |")
        L.append("")

    L += ["## Beta picked on validation per schedule\n",
          "The beta with the highest seed-mean validation gold at the best checkpoint, and at the end; its test "
          "gold.\n",
          "| method | schedule | beta (best) | best-on-val test gold | beta (end) | end-of-budget test gold |",
          "|---|---|---|---|---|---|"]
    for m in grid:
        for s in schedules:
            cells = {b: select(runs, method=m, beta=b, schedule=s) for b in grid[m]}
            cells = {b: rs for b, rs in cells.items() if rs}
            pick = lambda f: max(cells, key=lambda b: np.mean([f(r) for r in cells[b]]))  # noqa: E731
            bb = pick(lambda r: max(c["gold_score_val"] for c in r["checkpoints"]))
            be = pick(lambda r: r["checkpoints"][-1]["gold_score_val"])
            L.append(f"| {m.upper()} | {s} | {bb:g} | {fmt_t(seed_cell(cells[bb], e1_best))} | {be:g} | "
                     f"{fmt_t(seed_cell(cells[be], e1_end))} |")
    L.append("")

    targets = (0.25, 0.5, 1.0)
    L += ["## Gold at matched KL to the SFT model, every cell\n",
          "Each run's trajectory (the SFT model at KL 0, then its checkpoints) interpolated linearly at the KL; — "
          f"where a seed does not reach it. The highest KL of any checkpoint: "
          f"{max(c['kl'] for r in runs for c in r['checkpoints']):.2f}.\n",
          "| method | beta | schedule | " + " | ".join(f"KL {k:g}" for k in targets) + " |",
          "|---|---|---|" + "---|" * len(targets)]
    for m in grid:
        for b, (scheds, _) in grid[m].items():
            for s in scheds:
                rs = select(runs, method=m, beta=b, schedule=s)
                L.append(f"| {m.upper()} | {b:g} | {s} | " + " | ".join(
                    fmt_t(seed_cell(rs, lambda r, k=k: e1_at_kl(k)(r, sft))) for k in targets) + " |")
    L.append("")

    L += ["## The anchor before the peak (verdict beta, seed means)\n",
          "The anchor's strength against the current reference at each checkpoint up to step 48 (DPO, KTO: mean loss "
          "weight; IPO: mean h - t). Hard's reference is replaced after steps 16, 32 and 48, each time resetting its "
          "anchor to its value at h = 0; the step-48 checkpoint is judged after that step's update.\n",
          "| method | schedule | " + " | ".join(f"step {s}" for s in steps if s <= 48) + " |",
          "|---|---|" + "---|" * len([s for s in steps if s <= 48])]
    for m, b in vbeta.items():
        for s in ("none", "hard", "soft"):
            rs = select(runs, method=m, beta=b, schedule=s)
            a = seed_mean(rs, "anchor_weight")
            L.append(f"| {m.upper()} | {s} | " + " | ".join(f"{a[i]:.3f}" for i, st in enumerate(steps) if st <= 48)
                     + " |")
    L += ["", "Plots (committed with the runs; their bands came from the uncommitted per-prompt data): gold_vs_kl.png, "
          "gold_vs_step.png, anchor.png, logps.png."]
    text = "\n".join(L) + "\n"
    with open(os.path.join(results, "results.md"), "w") as f:
        f.write(text)
    return text

# -----------------------------------------------------------------------------
# experiment 2's report: from the committed results/toy2/ alone (results.json and per_prompt.json.gz)


FRONTIER_ARMS = (("frozen", FROZEN), ("hard", ("hard",)), ("soft", ("soft",)), ("TR", PAPER_SCHEDULES),
                 ("control", (CONTROL,)))


def cell_curve(rs, stats):
    """One cell's seed-mean (KL, test gold) from the SFT model (KL 0) through its checkpoints."""
    return ([0.0] + seed_mean(rs, "kl"),
            [stats.test["sft"][0]] + [float(np.mean([stats.test[run_name(r)][i] for r in rs]))
                                      for i in range(len(rs[0]["checkpoints"]))])


def frontier_curves(runs, stats, grid, m, schedules):
    """The curves of every cell of method m whose schedule is one of `schedules`, at every beta it ran at."""
    return [cell_curve(rs, stats) for b in grid[m] for s in schedules
            for rs in [select(runs, method=m, beta=b, schedule=s)] if rs]


def tr_betas(grid, m):
    """The betas at which the paper schedules run (the TR betas); the others are the frozen-only ladder."""
    return [b for b, (scheds, _) in grid[m].items() if set(PAPER_SCHEDULES) <= set(scheds)]


def tuned_beta(runs, stats, grid, m, schedule):
    """The paper's protocol: of the TR betas this schedule ran at, the one with the highest seed-mean validation
    gold at the END of the budget (the control runs at the main beta only, so that is its beta)."""
    betas = [b for b in tr_betas(grid, m) if select(runs, method=m, beta=b, schedule=schedule)]
    return max(betas, key=lambda b: np.mean([stats.val[run_name(r)][-1]
                                             for r in select(runs, method=m, beta=b, schedule=schedule)]))


def endpoints(runs, stats, grid, m, beta):
    """The rule's endpoints at one TR beta: [(name, betas used, {schedule: Delta vs none})]. Gold at a matched KL
    is compared only where every seed of all four schedules reaches that KL."""
    arms = lambda beta_of: {s: select(runs, method=m, beta=beta_of[s], schedule=s) for s in SCHEDULES}  # noqa: E731
    vs_none = lambda a, stat: {s: stats.delta(a[s], a["none"], stat) for s in SCHEDULES[1:]}  # noqa: E731
    fixed = arms(dict.fromkeys(SCHEDULES, beta))
    tuned = {s: tuned_beta(runs, stats, grid, m, s) for s in SCHEDULES}
    out = [("best-on-validation checkpoint", f"{beta:g}", vs_none(fixed, stats.best)),
           ("end of budget, beta tuned on validation", " / ".join(f"{tuned[s]:g}" for s in SCHEDULES),
            vs_none(arms(tuned), stats.end))]
    for k in KL_TARGETS:
        reached = all(stats.at_kl(r, k) is not None for rs in fixed.values() for r in rs)  # no run: vacuous
        out.append((f"gold at KL {k:g}", f"{beta:g}", vs_none(fixed, lambda r, k=k: stats.at_kl(r, k)) if reached
                    else dict.fromkeys(SCHEDULES[1:])))
    return out


def rule(deltas):
    """The verdict of one endpoint from its Deltas (None: an arm does not reach it)."""
    if any(deltas[s] is None for s in (CONTROL,) + PAPER_SCHEDULES):
        return "not reached by every seed of every schedule"
    v = endpoint_verdict(deltas[CONTROL]["call"], [deltas[s]["call"] for s in PAPER_SCHEDULES])
    return ("blind: the endpoint cannot tell the no-anchor control from the frozen reference on this task"
            if v == "blind" else v)


def report_experiment2(results):
    """results/toy2/results.md and the plots from results/toy2/results.json and per_prompt.json.gz."""
    res = json.load(open(os.path.join(results, "results.json")))
    with open(os.path.join(results, "per_prompt.json.gz"), "rb") as f:
        table = decode_per_prompt(f.read())
    runs, cfg, grid, main = res["runs"], res["config"], grid_from_json(res["grid"]), res["main_beta"]
    done = {run_name(r) for r in runs}
    unfinished = [m for m in grid if any(run_name(j) not in done for j in jobs_of(grid, [m]))]
    grid = {m: g for m, g in grid.items() if m not in unfinished}  # a method is reported once all its runs are in
    runs = [r for r in runs if r["method"] in grid]
    stats = Stats(runs, {"sft": table["sft"], **table["runs"]}, table["n_val"])
    steps, sft = list(cfg["checkpoints"]), res["sft"]
    wall = ", ".join(f"{x['trained']} runs ({'/'.join(x['methods'])}) in {x['wall_s'] / 60:.1f} min"
                     for x in res["sittings"])
    L = ["# Experiment 2: the trust-region update at high KL, with a positive control\n",
         f"Model '{cfg['model']}', SFT {cfg['sft_steps']} steps (validation gold {stats.val['sft'][0]:.3f}, test "
         f"{stats.test['sft'][0]:.3f}); every run {steps[-1]} steps of 16 pairs ({steps[-1] * 16 / cfg['pairs']:g} x "
         f"one epoch of {cfg['pairs']} pairs), lr {', '.join(f'{m.upper()} {v:g}' for m, v in cfg['lr'].items())}, "
         f"checkpoints at steps {', '.join(map(str, steps))}. "
         f"Schedules: none (frozen), hard and soft (alpha 0.6) every {cfg['tau']} steps, soft_every_step (alpha 0.6 "
         f"every step: the positive control, no anchor). {len(runs)} runs; wall time "
         f"{res['wall_s'] / 60:.1f} min ({wall}). The design and the rule, fixed before the run: toy_experiment.py's "
         "docstring and docs/experiment.md.\n",
         "Intervals: 95%; a cell is its seed mean with the bootstrap CI (seeds and test prompts resampled, 2,000 "
         "draws); a Delta (schedule minus none, paired by seed and by prompt) shows the bootstrap CI, then the "
         "seed-level t interval. A call (better / worse) needs both to exclude 0. Every number here is recomputed "
         "by `python toy_experiment.py --report_only` from results.json and per_prompt.json.gz.\n"]
    if unfinished:
        L.append(f"Not reported yet (runs missing): {', '.join(m.upper() for m in unfinished)}.\n")

    L += ["## Verdicts by the rule\n",
          "Per endpoint: the positive control first (soft_every_step minus none: the endpoint can give a verdict "
          "on TR only if it tells no anchor from the frozen reference), then the paper schedules.\n",
          "| method | endpoint | beta | control − none | hard − none | soft − none | verdict |",
          "|---|---|---|---|---|---|---|"]
    secondary = []
    for m in grid:
        for b in tr_betas(grid, m):
            for name, betas, d in endpoints(runs, stats, grid, m, b):
                if b == main[m]:
                    L.append(f"| {m.upper()} | {name} | {betas} | {fmt_call(d[CONTROL])} | {fmt_call(d['hard'])} | "
                             f"{fmt_call(d['soft'])} | {rule(d)} |")
                elif not name.startswith("end of budget"):  # beta is tuned there: one row per method, above
                    secondary.append(f"| {m.upper()} | {name} | {betas} | {fmt_call(d['hard'])} | "
                                     f"{fmt_call(d['soft'])} |")
    L += ["", "The same endpoints at the other TR beta (secondary: no positive control runs there, no verdict rests "
          "on them):\n", "| method | endpoint | beta | hard − none | soft − none |", "|---|---|---|---|---|"]
    L += secondary + [""]

    L += ["## The frontier: the most gold any beta and checkpoint gives at each KL\n",
          "Per method and schedule, the upper envelope of the seed-mean test gold against the seed-mean KL over every "
          "beta the schedule ran at and every checkpoint (each cell's curve runs from the SFT model at KL 0 through "
          "its checkpoints, linear between them; frontier_at). Frozen: every frozen beta, ladder included; TR: the "
          "hard and the soft cells together. The last row per method is the KL of the frozen frontier's highest "
          "checkpoint above 1 nat. The envelopes are the thick lines on gold_vs_kl.png. Seed means only, no "
          "intervals: a description, not a verdict.\n",
          "| method | KL | frozen | hard | soft | TR (hard or soft) | control | frozen − TR |",
          "|---|---|---|---|---|---|---|---|"]
    for m in grid:
        env = {name: frontier_curves(runs, stats, grid, m, scheds) for name, scheds in FRONTIER_ARMS}
        # and where the frozen frontier is highest beyond KL 1 (a vertex: a cell's checkpoint)
        top = max(((g, k) for kls, golds in env["frozen"] for k, g in zip(kls, golds) if k >= 1), default=None)
        for k, label in [(k, f"{k:g}") for k in FRONTIER_KL] + ([(top[1], f"{top[1]:.2f} (frozen's best above 1)")]
                                                               if top else []):
            f = {name: frontier_at(c, k) for name, c in env.items()}
            if all(v is None for v in f.values()):
                continue
            gap = f"{f['frozen'] - f['TR']:+.3f}" if f["frozen"] is not None and f["TR"] is not None else "—"
            L.append(f"| {m.upper()} | {label} | " + " | ".join("—" if f[n] is None else f"{f[n]:.3f}"
                                                            for n, _ in FRONTIER_ARMS) + f" | {gap} |")
    L.append("")

    L += ["## KL reached (the high-KL regime: every schedule should reach 4 nats)\n",
          f"The SFT model: mean log p(correct answer) {sft['logp_chosen']:.3f} nats on the probe pairs' chosen "
          f"answers, malformed answers {sft['invalid_test']:.2f} of its test samples.\n",
          "| method | beta | schedule | seeds | KL at the end, seed mean (lowest seed) | reaches 4 (every seed) | "
          "anchor at the end (DPO, KTO: weight; IPO: h - t) | malformed at the end (test) |",
          "|---|---|---|---|---|---|---|---|"]
    for m in grid:
        for b, (scheds, _) in grid[m].items():
            for s in scheds:
                rs = select(runs, method=m, beta=b, schedule=s)
                ends = [r["checkpoints"][-1]["kl"] for r in rs]
                L.append(f"| {m.upper()} | {b:g} | {s} | {len(rs)} | {np.mean(ends):.2f} ({min(ends):.2f}) | "
                         f"{'yes' if min(ends) >= 4 else 'no'} | {seed_mean(rs, 'anchor_weight')[-1]:.3f} | "
                         f"{seed_mean(rs, 'invalid_test')[-1]:.2f} |")
    L.append("")

    peaks = {}
    for r in runs:
        step = r["checkpoints"][best_checkpoint(list(stats.val[run_name(r)]))]["step"]
        peaks[step] = peaks.get(step, 0) + 1
    L += ["## What the trust-region arms were: distance from the no-anchor control\n",
          "Runs by the step of their best validation gold: " +
          ", ".join(f"step {k}: {v}" for k, v in sorted(peaks.items())) + f" (of {len(runs)}). Of the reference updates "
          f"(after steps {cfg['tau']}, {2 * cfg['tau']}, ...), {sum(1 for t in range(cfg['tau'], max(peaks, key=peaks.get), cfg['tau']))} "
          f"acts before the step-{max(peaks, key=peaks.get)} peak. Per schedule at the main beta, against the control (soft_every_step) and the frozen reference: the mean "
          f"|ln KL - ln KL_control| over the checkpoints after step {cfg['tau']}, the largest |test gold - control's| "
          "at a checkpoint (seed means), and the anchor against the current reference (DPO, KTO: the mean loss weight,"
          " 0.5 and 0.25 when it exerts no pull; IPO: mean h - t, -t = -5 with no pull) at the peak step and its "
          "range after it.\n",
          "| method | schedule | mean abs Δ ln KL vs control | largest abs Δ gold vs control | "
          "anchor at the peak step | anchor after it (min-max) |", "|---|---|---|---|---|---|"]
    peak = steps.index(max(peaks, key=peaks.get))
    for m in grid:
        control = select(runs, method=m, beta=main[m], schedule=CONTROL)
        kl_c, gold_c = cell_curve(control, stats)
        for s in SCHEDULES:
            rs = select(runs, method=m, beta=main[m], schedule=s)
            kl, gold = cell_curve(rs, stats)
            after = [i + 1 for i, st in enumerate(steps) if st > cfg["tau"]]
            d_kl = np.mean([abs(math.log(max(kl[i], 0.01)) - math.log(max(kl_c[i], 0.01))) for i in after])
            a = seed_mean(rs, "anchor_weight")
            L.append(f"| {m.upper()} | {s} {main[m]:g} | {d_kl:.3f} | {max(abs(x - y) for x, y in zip(gold, gold_c)):.3f}"
                     f" | {a[peak]:.3f} | {min(a[peak:]):.3f} to {max(a[peak:]):.3f} |")
    L.append("")

    L += ["## Every cell\n",
          "Test gold, seed means [bootstrap CI]: at the best-on-validation checkpoint, at the end of the budget, the "
          "mean over the checkpoints, and at matched KL (— where a seed does not reach it).\n",
          "| method | beta | schedule | seeds | best-on-val | end | mean over checkpoints | " +
          " | ".join(f"KL {k:g}" for k in KL_TARGETS) + " |",
          "|---|---|---|---|---|---|---|" + "---|" * len(KL_TARGETS)]
    for m in grid:
        for b, (scheds, _) in grid[m].items():
            for s in scheds:
                rs = select(runs, method=m, beta=b, schedule=s)
                cells = [stats.cell(rs, f) for f in (stats.best, stats.end, stats.mean_over_checkpoints)]
                cells += [stats.cell(rs, lambda r, k=k: stats.at_kl(r, k)) for k in KL_TARGETS]
                L.append(f"| {m.upper()} | {b:g} | {s} | {len(rs)} | " +
                         " | ".join(fmt_boot(c) for c in cells) + " |")
    L.append("")

    L += ["## The paper's protocol: end of budget, beta tuned on validation per schedule\n",
          "| method | schedule | tuned beta | validation gold at the end (seed mean) | test gold at the end | "
          "Delta vs none (tuned) |", "|---|---|---|---|---|---|"]
    for m in grid:
        tuned = {s: tuned_beta(runs, stats, grid, m, s) for s in SCHEDULES}
        base = select(runs, method=m, beta=tuned["none"], schedule="none")
        for s in SCHEDULES:
            rs = select(runs, method=m, beta=tuned[s], schedule=s)
            val = np.mean([stats.val[run_name(r)][-1] for r in rs])
            d = stats.delta(rs, base, stats.end) if s != "none" else None
            L.append(f"| {m.upper()} | {s} | {tuned[s]:g} | {val:.3f} | "
                     f"{fmt_boot(stats.cell(rs, stats.end))} | {fmt(d)} |")
    L.append("")

    L += ["## The mechanism: is TR at beta b a frozen reference at a smaller beta?\n",
          f"For each TR cell, the frozen beta b' (of every frozen beta run) whose seed-mean KL trajectory is nearest: "
          f"the smallest mean |ln KL - ln KL_b'| over the checkpoints after step {cfg['tau']} (match_beta). Then "
          "the mean test gold over the checkpoints (the whole trajectory), TR(b) minus frozen(b) and TR(b) minus "
          "frozen(b'); the end-of-budget and best-on-validation Deltas against frozen(b') beside them.\n",
          "| method | TR cell | matched frozen b' (KL distance) | TR(b) − frozen(b), trajectory | "
          "TR(b) − frozen(b'), trajectory | vs frozen(b'), end | vs frozen(b'), best-on-val | reading |",
          "|---|---|---|---|---|---|---|---|"]
    for m in grid:
        frozen = {b: select(runs, method=m, beta=b, schedule="none") for b in grid[m]}
        ladder = {b: seed_mean(rs, "kl") for b, rs in frozen.items() if rs}
        for b in tr_betas(grid, m):
            for s in grid[m][b][0][1:]:
                rs = select(runs, method=m, beta=b, schedule=s)
                bm, dist = match_beta(seed_mean(rs, "kl"), ladder, steps, cfg["tau"])
                d_tr = stats.delta(rs, frozen[b], stats.mean_over_checkpoints)
                d_m = stats.delta(rs, frozen[bm], stats.mean_over_checkpoints)
                L.append(f"| {m.upper()} | {s} {b:g} | {bm:g} ({dist:.2f}) | {fmt(d_tr)} | {fmt(d_m)} | "
                         f"{fmt(stats.delta(rs, frozen[bm], stats.end))} | "
                         f"{fmt(stats.delta(rs, frozen[bm], stats.best))} | "
                         f"{mechanism_reading(d_tr['call'], d_m['call'])} |")
    L.append("")
    pngs = plot(results, runs, stats, grid, main, sft)
    L += [f"Plots: {', '.join(os.path.basename(p) for p in pngs)}." if pngs else "Plots: matplotlib not installed."]
    text = "\n".join(L) + "\n"
    with open(os.path.join(results, "results.md"), "w") as f:
        f.write(text)
    return text


# -----------------------------------------------------------------------------
# experiment 3: the pilot gates and the frontier report (from results/toy3/ alone)


def updates_before(peak_step, tau):
    """Reference updates that act on training before the checkpoint at peak_step: those after steps tau, 2 tau,
    ... below it (the one after step peak_step itself acts from the next step on)."""
    return (peak_step - 1) // tau


def pilot_gates(frozen, hard, control, sft_val, kstar, tau):
    """Experiment 3's gates on one seed of the frozen, hard and every-step-control pilots (validation gold and KL
    only). (1) quality rises with KL: the frozen run's validation gold at KL K* >= at KL 0.5 (its trajectory from
    the SFT model at KL 0, linear between checkpoints, at its first crossing; at_kl); (2) the hard arm is not the
    no-anchor control: mean |ln KL_hard - ln KL_control| over the checkpoints after step tau >= 0.1 (match_beta's
    distance), and >= 4 updates before the frozen run's best validation checkpoint. Returns (lines, passed)."""
    def gold_at(run, k):
        kls = [0.0] + [c["kl"] for c in run["checkpoints"]]
        vals = [sft_val] + [c["gold_score_val"] for c in run["checkpoints"]]
        where = at_kl(kls, k)
        return None if where is None else (1 - where[1]) * vals[where[0] - 1] + where[1] * vals[where[0]]
    g_k, g_half = gold_at(frozen, kstar), gold_at(frozen, 0.5)
    steps = [c["step"] for c in frozen["checkpoints"]]
    _, dist = match_beta([c["kl"] for c in hard["checkpoints"]], {0: [c["kl"] for c in control["checkpoints"]]},
                         steps, tau)
    peak = steps[best_checkpoint([c["gold_score_val"] for c in frozen["checkpoints"]])]
    n = updates_before(peak, tau)
    gate1 = g_k is not None and g_half is not None and g_k >= g_half
    gate2 = dist >= 0.1 and n >= 4
    lines = [f"gate 1 (frozen: validation gold at KL K* = {kstar:.2f} >= at KL 0.5): "
             f"{'—' if g_k is None else f'{g_k:.3f}'} vs {'—' if g_half is None else f'{g_half:.3f}'}: "
             f"{'pass' if gate1 else 'FAIL'}",
             f"gate 2 (hard vs every-step control: mean |delta ln KL| after step {tau} >= 0.1, >= 4 updates before "
             f"the frozen peak): {dist:.3f}, {n} updates before the peak at step {peak}: "
             f"{'pass' if gate2 else 'FAIL'}"]
    return lines, gate1 and gate2


def report_experiment3(results):
    """results/toy3/results.md and the plots from results/toy3/results.json and per_prompt.json.gz: the
    pre-registered endpoints F(K*), F(2 K*) and F(inf), each arm minus frozen, gated by the flipped-label control."""
    res = json.load(open(os.path.join(results, "results.json")))
    with open(os.path.join(results, "per_prompt.json.gz"), "rb") as f:
        table = decode_per_prompt(f.read())
    runs, cfg, grid, main = res["runs"], res["config"], grid_from_json(res["grid"]), res["main_beta"]
    stats = Stats(runs, {"sft": table["sft"], **table["runs"]}, table["n_val"])
    kstar = -res["sft"]["logp_chosen"]
    L = ["# Experiment 3: the gold-versus-KL frontier where the best policy lies far from SFT\n",
         f"Model '{cfg['model']}', SFT {cfg['sft_steps']} steps on demonstrations {cfg['sft_error']:.0%} wrong "
         f"(validation gold {stats.val['sft'][0]:.3f}, test {stats.test['sft'][0]:.3f}); K* = -mean log p_SFT(correct "
         f"answer) = {kstar:.2f} nats. Every run {cfg['checkpoints'][-1]} steps of 16 pairs, lr "
         f"{cfg['lr']['dpo']:g}, tau {cfg['tau']}; {len(runs)} runs, wall {res['wall_s'] / 60:.1f} min. The design "
         "and the rule, fixed before the run: toy_experiment.py's docstring and docs/experiment.md.\n",
         "F(k): per seed, of every checkpoint of every beta of an arm with KL <= k (and the SFT model), the one with "
         "the highest validation gold; its test gold. Delta = arm minus frozen, paired by seed and prompt; 95% "
         "bootstrap CI, then the seed-level t interval; a call needs both. The endpoint gives a verdict only where "
         "flipped (a frozen reference trained on pairs with flipped labels) is worse than frozen.\n",
         "| endpoint | frozen | " + " | ".join(f"{a} − frozen" for a in ARMS3) + " | verdict |",
         "|---|---|" + "---|" * len(ARMS3) + "---|"]
    for m in grid:
        arm = lambda s: {seed: [r for r in select(runs, method=m, schedule=s) if r["seed"] == seed]  # noqa: E731
                         for seed in sorted({r["seed"] for r in runs})}
        for name, k in ((f"F(K*), K* = {kstar:.2f}", kstar), (f"F(2K*) = F({2 * kstar:.2f})", 2 * kstar),
                        ("F(inf), the unconstrained peak", math.inf)):
            f = {s: {seed: stats.frontier(rs, k) for seed, rs in arm(s).items() if rs} for s in ("none",) + ARMS3}
            vals = list(f["none"].values())
            base = {"mean": float(np.mean([v[0] for v in vals])),
                    "boot": percentile_ci(boot_mean(np.array([v[1] for v in vals]), seed_table(len(vals))))}
            d = {s: stats.paired(f[s], f["none"]) for s in ARMS3}
            v = ("blind: the flipped-label control is not seen" if d["flipped"]["call"] != "worse"
                 else method_verdict([d["hard"]["call"], d["soft"]["call"]]))
            L.append(f"| {m.upper()} {name} | {fmt_boot(base)} | " +
                     " | ".join(fmt_call(d[s]) for s in ARMS3) + f" | {v} |")
    L.append("")
    L += ["## The frontier: the most gold any beta and checkpoint gives at each KL (seed means)\n",
          "| KL | " + " | ".join(("frozen",) + ARMS3) + " |", "|---|" + "---|" * (1 + len(ARMS3))]
    for m in grid:
        env = {s: frontier_curves(runs, stats, grid, m, (s,)) for s in ("none",) + ARMS3}
        for k in sorted({0.5, 1.0, kstar, 2 * kstar} | set(FRONTIER_KL)):
            vals = [frontier_at(env[s], k) for s in env]
            L.append(f"| {k:.2f} | " + " | ".join("—" if v is None else f"{v:.3f}" for v in vals) + " |")
    L.append("")
    L += ["## Every cell\n", "| beta | schedule | seeds | best-on-val test gold | end test gold | KL at the end | "
          "malformed at the end |", "|---|---|---|---|---|---|---|"]
    for m in grid:
        for b, (scheds, _) in grid[m].items():
            for s in scheds:
                rs = select(runs, method=m, beta=b, schedule=s)
                if rs:
                    L.append(f"| {b:g} | {s} | {len(rs)} | {fmt_boot(stats.cell(rs, stats.best))} | "
                             f"{fmt_boot(stats.cell(rs, stats.end))} | {np.mean([r['checkpoints'][-1]['kl'] for r in rs]):.2f}"
                             f" | {seed_mean(rs, 'invalid_test')[-1]:.2f} |")
    pngs = plot(results, runs, stats, grid, main, res["sft"])
    L += ["", f"Plots: {', '.join(os.path.basename(p) for p in pngs)}." if pngs else "Plots: matplotlib not installed."]
    text = "\n".join(L) + "\n"
    with open(os.path.join(results, "results.md"), "w") as f:
        f.write(text)
    return text


COLORS = {"none": "black", "hard": "tab:red", "soft": "tab:blue", "soft_every_step": "tab:gray", "flipped": "tab:green"}


def plot(out, runs, stats, grid, main, sft):
    """gold_vs_kl.png (seed-mean test gold against seed-mean KL, every cell from the SFT model on, and the frozen and TR frontiers), kl_vs_step.png
    (the trajectories the mechanism matches, the frozen ladder in grey) and gold_vs_step.png (validation gold)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    methods, paths = list(grid), []
    if not methods:
        return []

    def figure(name, draw, ylabel, xlabel, logy=False):
        fig, axes = plt.subplots(1, len(methods), figsize=(4.8 * len(methods), 4.0), squeeze=False)
        for ax, m in zip(axes[0], methods):
            draw(ax, m)
            ax.set(title=m.upper(), xlabel=xlabel, yscale="log" if logy else "linear")
            ax.legend(fontsize="x-small")
        axes[0][0].set_ylabel(ylabel)
        fig.tight_layout()
        paths.append(os.path.join(out, name))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    def cells(m):
        """(label, color, style, runs): TR cells by schedule (solid at the main beta, dashed at the other) and the
        frozen betas that only the ladder has, in grey."""
        ladder = [b for b in grid[m] if b not in tr_betas(grid, m)]
        for b in tr_betas(grid, m):
            for s in grid[m][b][0]:
                yield f"{s} {b:g}", COLORS[s], "-" if b == main[m] else "--", select(runs, method=m, beta=b, schedule=s)
        for j, b in enumerate(sorted(ladder)):
            grey = str(0.3 + 0.5 * j / max(1, len(ladder)))
            yield f"none {b:g}", grey, ":", select(runs, method=m, beta=b, schedule="none")

    def gold_vs_kl(ax, m):
        for label, color, style, rs in cells(m):
            ax.plot(*cell_curve(rs, stats), style, color=color, label=label, lw=1.2)
        for name, color in (("frozen", "black"), ("TR", "tab:purple")):  # the frontiers, read at every vertex
            curves = frontier_curves(runs, stats, grid, m, dict(FRONTIER_ARMS)[name])
            ks = sorted({k for kls, _ in curves for k in kls})
            ax.plot(ks, [frontier_at(curves, k) for k in ks], "-", color=color, lw=4, alpha=0.25,
                    label=f"frontier: {name}")

    def kl_vs_step(ax, m):
        for label, color, style, rs in cells(m):
            ax.plot([c["step"] for c in rs[0]["checkpoints"]], seed_mean(rs, "kl"), style, color=color, label=label)

    def gold_vs_step(ax, m):
        for label, color, style, rs in cells(m):
            ax.plot([0] + [c["step"] for c in rs[0]["checkpoints"]], [stats.val["sft"][0]] + [float(np.mean(
                [stats.val[run_name(r)][i] for r in rs])) for i in range(len(rs[0]["checkpoints"]))], style,
                color=color, label=label)

    figure("gold_vs_kl.png", gold_vs_kl, "test gold (seed means)", "KL(policy || SFT), nats")
    figure("kl_vs_step.png", kl_vs_step, "KL(policy || SFT), nats (seed means)", "optimizer step", logy=True)
    figure("gold_vs_step.png", gold_vs_step, "validation gold (seed means)", "optimizer step")
    return paths


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")  # the committed record, in the repo


def results_dir(args):
    return args.results_dir or (os.path.join(args.output_dir, "results") if args.quick else
                                os.path.join(RESULTS, f"toy{args.experiment}"))


def report_all(args):
    """--report_only: the reports from the committed folders alone: experiment 1's (results/toy), experiment 2's
    and experiment 3's once it has run; with --quick, the smoke test's folder only."""
    r2 = results_dir(args) if args.quick or args.experiment == 2 else os.path.join(RESULTS, "toy2")
    parts = [] if args.quick else [report_experiment1(os.path.join(RESULTS, "toy"))]
    if os.path.exists(os.path.join(r2, "results.json")):
        parts.append(report_experiment2(r2))
    r3 = os.path.join(RESULTS, "toy3")
    if not args.quick and os.path.exists(os.path.join(r3, "results.json")):  # once experiment 3 has run
        parts.append(report_experiment3(r3))
    text = "\n".join(parts)
    print(text)
    return text


# -----------------------------------------------------------------------------
# main


def sft_model(out, cfg, data):
    """The SFT model's folder, OUT/sft/policy: trained once (sft.py) and reused while done.json holds this
    configuration's key and policy/ exists. done.json is written only after policy/ is complete, so a stage stopped
    by a signal (sft.py then saves a checkpoint and returns without policy/) is trained again by the next run."""
    sft_dir = os.path.join(out, "sft")
    keys = ("model", "sft_steps", "sft_lr", "n_eval", "sft_rows", "sft_error", "mistake")
    sft_key = hashlib.sha1(json.dumps([cfg[k] for k in keys if k in cfg]).encode()).hexdigest()[:12]
    sft_path, done_path = os.path.join(sft_dir, "policy"), os.path.join(sft_dir, "done.json")
    if not (os.path.exists(done_path) and json.load(open(done_path)).get("key") == sft_key
            and os.path.isdir(sft_path)):
        shutil.rmtree(sft_dir, ignore_errors=True)
        os.makedirs(sft_dir)
        with open(os.path.join(sft_dir, "train.log"), "w") as log, redirect_stdout(log), redirect_stderr(log):
            sft.main(["--model", cfg["model"], "--dataset", data["paths"]["sft"], "--eval_size", str(SCRIPT_EVAL),
                      "--max_steps", str(cfg["sft_steps"]), "--lr", str(cfg["sft_lr"]), "--lr_schedule", "cosine",
                      "--warmup_steps", "20", "--batch_size", "32", "--micro_batch_size", "32", "--log_every", "50",
                      "--eval_every", "0", "--output_dir", sft_dir])
        if not os.path.isdir(sft_path):  # SIGINT/SIGTERM: sft.py saved a checkpoint and returned without policy/
            raise SystemExit(f"error: the SFT stage stopped before its last step ({sft_dir}/train.log); nothing is "
                             "marked done: a rerun trains it again")
        with open(done_path, "w") as f:  # written only once policy/ is complete
            json.dump({"key": sft_key}, f)
    return sft_path



def main(argv=None):
    with cli.exit_on_bad_input():  # every bad flag: one error: line, exit code 2, before anything is written
        args = get_args(argv)
        pilot = args.betas is not None
        cli.need(pilot or not (args.lr or args.checkpoints or args.tau or args.sft_error),
                 "--lr, --tau, --checkpoints and --sft_error are pilot flags: give --betas too")
        cli.need(not args.checkpoints or len(set(args.checkpoints)) == len(args.checkpoints),
                 "--checkpoints: each step once")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)  # main() may be called from a test: leave the process as it was


def run(args):
    pilot = args.betas is not None
    if args.report_only:
        return report_all(args)
    cfg = dict(QUICK if args.quick else FULL3 if args.experiment == 3 else FULL, quick=args.quick)
    if args.tau is not None:
        cfg["tau"] = args.tau
    if args.lr is not None:
        cfg["lr"] = dict.fromkeys(SCRIPTS, args.lr)
    if args.checkpoints is not None:
        cfg["checkpoints"] = args.checkpoints
    if args.sft_error is not None:
        cfg["sft_error"] = args.sft_error
    cfg["checkpoints"] = sorted(cfg["checkpoints"])
    grid = QUICK_GRID if args.quick else GRID3 if args.experiment == 3 else GRID
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
    sft_path = sft_model(out, cfg, data)
    judge = Judge(sft_path, data, cfg)
    sft_eval = {**judge.sft_eval, "logp_chosen": judge.sft_probe["chosen"].mean().item(),
                "logp_rejected": judge.sft_probe["rejected"].mean().item()}
    print(f"SFT: val gold {sft_eval['gold_score_val']:.3f}, K* = -mean log p(correct answer) = "
          f"{-sft_eval['logp_chosen']:.2f} nats ({time.time() - t0:.0f} s)", flush=True)

    # -------------------------------------------------------------------------
    # 3. the runs not finished yet, --workers at a time, each in its own (spawned) process
    runs_dir = (os.path.join(out, "runs") if not pilot else
                os.path.join(out, "pilots", f"lr{args.lr or 'default'}" + (f"_tau{args.tau}" if args.tau else "")
                             + (f"_sft_error{args.sft_error:g}" if args.sft_error else "")))
    finished = {run_name(r) for r in load_runs(runs_dir, cfg, {m: grid[m] for m in args.methods if m in grid})}
    jobs = [j for j in jobs_of(grid, args.methods) if run_name(j) not in finished]
    print(f"{len(jobs)} runs to do, {len(finished)} finished ones skipped", flush=True)
    work = [(j, cfg, data, sft_path, os.path.join(runs_dir, run_name(j)), args.threads) for j in jobs]
    try:
        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for k, r in enumerate(pool.map(train_and_judge, work)):
                print(f"[{k + 1}/{len(jobs)}] {run_name(r)}: " + progress(r) + f" ({time.time() - t0:.0f} s)",
                      flush=True)
    except Stopped as e:  # the finished runs are kept; a rerun skips them
        raise SystemExit(f"error: {e}") from None
    if pilot:  # pilots show validation gold, KL and the anchor only (the docstring says what was looked at)
        return print_pilot(load_runs(runs_dir, cfg, grid), sft_eval, cfg["tau"])

    # -------------------------------------------------------------------------
    # 4. the committed record (every finished run of the grid, whatever --methods trained now), and the report
    log_path = os.path.join(out, "sittings.jsonl")  # every invocation that trained something: its wall time
    if jobs:
        with open(log_path, "a") as f:
            f.write(json.dumps({"wall_s": round(time.time() - t0, 1), "trained": len(jobs), "workers": args.workers,
                                "methods": args.methods}) + "\n")
    sittings = [json.loads(line) for line in open(log_path)] if os.path.exists(log_path) else []
    results = results_dir(args)
    save_record(results, load_runs(runs_dir, cfg, grid), sft_eval, cfg, grid, data["overlap"], sittings,
                data["val"] + data["test"])
    report = (report_experiment3 if "sft_error" in cfg else report_experiment2)(results)
    print(report)
    return report


if __name__ == "__main__":
    main()

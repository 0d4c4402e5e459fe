"""
The paper's experiment at laptop scale: SFT, then DPO, IPO and KTO with a frozen, a soft-updated and a
hard-updated reference, every run judged against the SFT model by an exact gold score.

The TR paper (Gorbatovski et al., arXiv 2404.09656) trains Pythia SFT models on Anthropic-HH and Reddit TL;DR, then
each method with and without the trust-region reference update, and judges the policies side by side with GPT-4
and by their KL to the SFT model. Here everything is shrunk to 2 CPU cores and a task whose best answer is known:

1. SFT once (sft.py) on the toy digit puzzles (common.toy_problem: sort or reverse 3-6 digits), with 30% of the
   demonstrations wrong on purpose (common.toy_sft_rows). Sampled, the SFT model is often wrong: room to improve.
2. From that one SFT model (policy and initial reference), for each seed: DPO, IPO, KTO with --ref_update none (the
   baseline), soft (the paper's alpha 0.6, every step) and hard (every quarter of the run; the paper: tau 512 of
   ~2,500 steps), one epoch over 2,048 preference pairs (the right answer over a corrupted one, common.toy_preferences),
   each script with its own default beta. A run is trained in segments with --resume, which is bit-exact, so
   each segment's end is a checkpoint of one uninterrupted run.
3. At every checkpoint, on N held-out prompts (the toy eval split, as evaluate.py uses it): sample one response per
   prompt at temperature 1 from the policy and from the SFT model, and score them with evaluate.py's gold judge:
   win rate vs SFT (higher gold score wins, ties half), gold score, accuracy (exact answers) and invalid outputs
   (not a digit string of the answer's length), KL(policy || SFT) estimated on the policy's own samples, and the
   change in log pi(chosen) on the held-out pairs' chosen (right) answers.
4. results.md: the table at the end of training, mean +- sd over seeds; gold_vs_kl.png (needs matplotlib, else
   skipped with a message): gold score against KL over the checkpoints, the paper's over-optimisation picture;
   results.json: every checkpoint's numbers.

    python toy_experiment.py              # the full run: 'small' model, 3 seeds (wall time in results.md)
    python toy_experiment.py --quick      # a smoke test (CI): 'tiny' model, 1 seed, a few steps, no real learning
"""
import argparse
import json
import math
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import redirect_stderr, redirect_stdout

import torch
from transformers import AutoModelForCausalLM

import sft
import tr_dpo
import tr_ipo
import tr_kto
from common import load_model, load_preferences
from evaluate import gold_criteria, gold_pairwise, response_logps, sample, win_rate

# Run sizes. A preference step is one batch of 16 pairs (KTO: 32 unpaired examples, the same pairs), so 128 steps
# are one epoch of the 2,048 toy pairs; `checkpoints` are the steps where each run is judged, the last is its end.
FULL = dict(model="small", sft_steps=1200, sft_lr=3e-3, checkpoints=(16, 32, 64, 96, 128), lr=1e-4, seeds=3,
            n_prompts=256)
QUICK = dict(model="tiny", sft_steps=30, sft_lr=3e-3, checkpoints=(4, 8), lr=1e-4, seeds=1, n_prompts=32)
SCRIPTS = {"DPO": tr_dpo, "IPO": tr_ipo, "KTO": tr_kto}
MAX_NEW_TOKENS = 10  # the longest answer is 7 tokens (" " + 6 digits) + EOS: room to show rambling


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke test of the whole pipeline in about a minute")
    p.add_argument("--seeds", type=int, help="seeds per method (default: 3, --quick: 1)")
    p.add_argument("--methods", nargs="+", default=list(SCRIPTS), choices=list(SCRIPTS))
    p.add_argument("--workers", type=int, default=2, help="preference runs trained at once, one process each")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads. These models are too small for more to pay off, and when other processes "
                        "share the cores, extra threads spin and wait: on 2 busy cores 2 threads ran 10x slower than 1")
    p.add_argument("--output_dir", default="out/toy")
    return p.parse_args(argv)


def variants(cfg, methods):
    """(method, update, label, flags) for every method x reference update; hard updates every quarter of the run."""
    hard_tau = max(1, cfg["checkpoints"][-1] // 4)
    return [(name, upd, name if upd == "none" else f"TR-{name} {upd}", flags)
            for name in methods
            for upd, flags in (("none", ["--ref_update", "none"]),
                               ("soft", ["--ref_update", "soft", "--alpha", "0.6", "--tau", "1"]),
                               ("hard", ["--ref_update", "hard", "--tau", str(hard_tau)]))]

# -----------------------------------------------------------------------------
# the gold evaluation of one policy against the SFT model


class GoldEval:
    """Held-out prompts, the SFT model's samples on them and its log-probs of the chosen answers, computed once."""

    def __init__(self, sft_path, n_prompts):
        self.sft, self.tok = load_model(sft_path)
        self.sft.eval()
        _, rows = load_preferences("toy", n_prompts, seed=0)  # evaluate.py's toy prompts: held out of every run
        enc = lambda texts: self.tok(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
        self.prompts = [r["prompt"] for r in rows]
        self.prompt_ids = enc(self.prompts)
        self.chosen_ids = [c + [self.tok.eos_token_id] for c in enc([r["chosen"] for r in rows])]
        self.sft_chosen = response_logps(self.sft, self.tok.pad_token_id, self.prompt_ids, self.chosen_ids, len(rows))
        self.sft_texts, _ = self.generate(self.sft)

    def generate(self, model):
        """One sample per prompt at temperature 1 (the same seed for every model): texts and token ids."""
        torch.manual_seed(0)
        ids = sample(model, self.tok, self.prompt_ids, MAX_NEW_TOKENS)
        eos = self.tok.eos_token_id
        return [self.tok.decode([t for t in r if t != eos], skip_special_tokens=True) for r in ids], ids

    @torch.no_grad()
    def __call__(self, model):
        model.eval()
        texts, ids = self.generate(model)
        pad, n = self.tok.pad_token_id, len(self.prompts)
        log_ratio = [a - b for a, b in zip(response_logps(model, pad, self.prompt_ids, ids, n),
                                           response_logps(self.sft, pad, self.prompt_ids, ids, n))]
        chosen = response_logps(model, pad, self.prompt_ids, self.chosen_ids, n)
        crit = gold_criteria(self.prompts, texts)
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        return {"win_rate": win_rate(gold_pairwise(self.prompts, texts, self.sft_texts))["rate"],
                "gold_score": mean(crit["gold score"]), "accuracy": mean(crit["gold accuracy"]),
                "invalid": mean(crit["invalid output"]), "kl": mean(log_ratio),
                "chosen_logp_change": mean([a - b for a, b in zip(chosen, self.sft_chosen)]), "example": texts[:4]}

# -----------------------------------------------------------------------------
# the report


def mean_sd(xs):
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else math.nan


def cell(xs, scale=1.0, digits=1):
    m, sd = mean_sd([x * scale for x in xs])
    return f"{m:.{digits}f}" + ("" if math.isnan(sd) else f" ± {sd:.{digits}f}")


def write_results(out, records, sft_record, cfg, wall_s):
    """results.md: one row per method with its final checkpoints' numbers, mean ± sd over seeds, and its best
    checkpoint: the highest gold score of the seed-mean curve, at that step."""
    cols = [("gold win rate vs SFT (%)", "win_rate", 100, 1), ("gold accuracy (%)", "accuracy", 100, 1),
            ("gold score", "gold_score", 1, 3), ("invalid outputs (%)", "invalid", 100, 1),
            ("KL to SFT (nats)", "kl", 1, 2), ("chosen log-prob change (nats)", "chosen_logp_change", 1, 2)]
    lines = ["| method | " + " | ".join(c[0] for c in cols) + " | best gold score (step) |", "|---" * (len(cols) + 2) + "|",
             "| SFT | — | " + " | ".join(cell([sft_record[k]], s, dg) for _, k, s, dg in cols[1:]) + " | — |"]
    for label in dict.fromkeys(r["method"] for r in records):
        at = lambda step: [r for r in records if r["method"] == label and r["step"] == step]  # noqa: E731
        best = max((mean_sd([r["gold_score"] for r in at(step)])[0], step) for step in cfg["checkpoints"])
        lines.append(f"| {label} | " + " | ".join(cell([r[k] for r in at(cfg["checkpoints"][-1])], s, dg)
                                                  for _, k, s, dg in cols) + f" | {best[0]:.3f} ({best[1]}) |")
    n_seeds = len({r["seed"] for r in records})
    header = (f"# Toy experiment: gold-judged DPO / IPO / KTO with and without the trust-region update\n\n"
              f"Model '{cfg['model']}', SFT {cfg['sft_steps']} steps; each run {cfg['checkpoints'][-1]} steps of 16 pairs "
              f"(lr {cfg['lr']}), {n_seeds} seed(s) per method, mean ± sd over seeds at the last step "
              f"(checkpoints at steps {', '.join(map(str, cfg['checkpoints']))}); "
              f"{cfg['n_prompts']} held-out prompts, one sample each at temperature 1. "
              f"Wall time {wall_s / 60:.1f} min.\n\n")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(header + "\n".join(lines) + "\n")
    return header + "\n".join(lines)


def plot(out, records, sft_record):
    """gold_vs_kl.png: per method, gold score against KL to SFT over the checkpoints (mean over seeds)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping gold_vs_kl.png (pip install matplotlib to get it)")
        return None
    families = list(dict.fromkeys(r["family"] for r in records))
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 3.8), squeeze=False, sharey=True)
    for ax, family in zip(axes[0], families):
        for label in dict.fromkeys(r["method"] for r in records if r["family"] == family):
            mine = [r for r in records if r["method"] == label]
            steps = sorted({r["step"] for r in mine})
            at = lambda s, k: sum(r[k] for r in mine if r["step"] == s) / sum(r["step"] == s for r in mine)  # noqa: E731
            line, = ax.plot([0] + [at(s, "kl") for s in steps],
                            [sft_record["gold_score"]] + [at(s, "gold_score") for s in steps], "o-", label=label)
            ax.scatter([r["kl"] for r in mine], [r["gold_score"] for r in mine], s=8, alpha=0.35,
                       color=line.get_color())  # every seed's checkpoints
        ax.set(title=family, xlabel="KL(policy || SFT), nats")
        ax.legend(fontsize="small")
    axes[0][0].set_ylabel("gold score (mean over held-out prompts)")
    fig.tight_layout()
    path = os.path.join(out, "gold_vs_kl.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

# -----------------------------------------------------------------------------
# one preference run (in a worker process)

COMMON_FLAGS = ["--dataset", "toy", "--eval_size", "32", "--log_every", "8", "--eval_every", "0"]
_judges = {}  # one GoldEval per worker process, built on its first run


def train_and_judge(job):
    """Train one method x update x seed from the SFT model, stopping (and resuming) at each checkpoint to judge
    it. The scripts' own output (progress bars, messages) goes to the run's train.log. Returns the records."""
    family, update, label, flags, seed, cfg, sft_path, run, threads = job
    torch.set_num_threads(threads)
    key = (sft_path, cfg["n_prompts"])
    judge = _judges[key] = _judges.get(key) or GoldEval(sft_path, cfg["n_prompts"])
    shutil.rmtree(run, ignore_errors=True)
    os.makedirs(run)
    batch = "32" if family == "KTO" else "16"  # KTO counts examples: 32 = the 16 pairs of DPO and IPO
    records = []
    with open(os.path.join(run, "train.log"), "w") as log, redirect_stdout(log), redirect_stderr(log):
        for k, step in enumerate(cfg["checkpoints"]):  # train on to `step` (resuming: bit-exact), then judge
            SCRIPTS[family].main(COMMON_FLAGS + flags + [
                "--model", sft_path, "--seed", str(seed), "--lr", str(cfg["lr"]), "--batch_size", batch,
                "--micro_batch_size", batch, "--max_steps", str(step), "--save_every", str(math.gcd(*cfg["checkpoints"])),
                "--output_dir", run] + (["--resume"] if k else []))
            policy = AutoModelForCausalLM.from_pretrained(os.path.join(run, "policy"))
            records.append({"method": label, "family": family, "update": update, "seed": seed, "step": step,
                            **judge(policy)})
    shutil.rmtree(os.path.join(run, "checkpoint"), ignore_errors=True)  # optimizer state: not needed any more
    return records

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
    cfg = dict(QUICK if args.quick else FULL)
    cfg["seeds"] = args.seeds or cfg["seeds"]
    t0, out = time.time(), args.output_dir
    os.makedirs(out, exist_ok=True)

    # -------------------------------------------------------------------------
    # 1. SFT, once
    sft_dir = os.path.join(out, "sft")
    shutil.rmtree(sft_dir, ignore_errors=True)
    sft.main(COMMON_FLAGS + ["--model", cfg["model"], "--max_steps", str(cfg["sft_steps"]), "--lr", str(cfg["sft_lr"]),
                             "--lr_schedule", "cosine", "--warmup_steps", "20", "--batch_size", "32",
                             "--micro_batch_size", "32", "--output_dir", sft_dir])
    sft_path = os.path.join(sft_dir, "policy")
    judge = GoldEval(sft_path, cfg["n_prompts"])
    sft_record = judge(judge.sft)
    print(f"SFT: {json.dumps(sft_record)} ({time.time() - t0:.0f} s)")

    # -------------------------------------------------------------------------
    # 2-3. every method x reference update x seed from the SFT model, judged at each checkpoint; --workers runs
    # in parallel, each in its own process (spawned: no fork of a process that already runs torch threads)
    jobs = [(family, update, label, flags, seed, cfg, sft_path,
             os.path.join(out, "runs", f"{family}_{update}_seed{seed}"), args.threads)
            for seed in range(cfg["seeds"]) for family, update, label, flags in variants(cfg, args.methods)]
    records = []
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for job, recs in zip(jobs, pool.map(train_and_judge, jobs)):
            records += recs
            last, scores = recs[-1], " ".join(f"{r['gold_score']:.3f}" for r in recs)
            print(f"{job[2]} seed {job[4]}: gold score {scores} at steps {cfg['checkpoints']}; at the end win rate "
                  f"{last['win_rate']:.3f}, KL {last['kl']:.2f}, invalid {last['invalid']:.3f}, e.g. {last['example']} "
                  f"({time.time() - t0:.0f} s)", flush=True)

    # -------------------------------------------------------------------------
    # 4. report
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"config": cfg, "sft": sft_record, "checkpoints": records, "wall_s": time.time() - t0}, f, indent=1)
    png = plot(out, records, sft_record)
    table = write_results(out, records, sft_record, cfg, time.time() - t0)
    print(table + (f"\n\nplot: {png}" if png else ""))
    return table


if __name__ == "__main__":
    main()

r"""
SFT: supervised fine-tuning on the preferred responses, the first stage of the paper's pipeline.

The TR paper (Gorbatovski et al., arXiv 2404.09656) starts every DPO/IPO/KTO run, with or without the trust-region
update, from one SFT model, which is also the initial reference. This script trains it: maximum likelihood of the
response given the prompt,

    loss = - sum_t log pi_theta(y_t | x, y_<t) / (number of response tokens in the global batch)

the token-mean negative log-likelihood over the response tokens (EOS included) of the global batch. The prompt is
masked by common.build_sequence(), as in the TR scripts; the per-sequence sums come from common.sequence_logps().
Dividing by the global batch's token count (not a per-micro-batch mean) makes the gradient independent of how the
batch is split into micro-batches and ranks.

Data (--dataset): 'toy' = digit puzzles whose SFT answers are wrong 30% of the time on purpose (toy.toy_sft_rows),
'hh[:subset]' = the chosen dialogues, 'tldr' = the reference summaries of CarperAI/openai_summarize_tldr, or a local
file, dataset folder or hub id of {"prompt", "completion"} rows, {"prompt", "label"} rows (TL;DR style) or
preference pairs (chosen used), in text or chat format (data.py, chat.py).
Flags, DDP, logging, checkpoints and resume are those of the TR scripts, and the step is theirs without a
reference model; the trust-region flags are accepted and unused. The output is policy/, the --model of every TR run:

    python sft.py --model small --max_steps 1200 --lr 3e-3 --lr_schedule cosine --warmup_steps 20 \
        --batch_size 32 --micro_batch_size 32 --output_dir out/sft      # toy_experiment.py's SFT: ~2 min, 2 cores
    python tr_dpo.py --model out/sft/policy --lr 1e-4 --ref_update soft --alpha 0.6 --tau 1

At paper scale on 8 GPUs (Pythia on Anthropic-HH, SFT on the chosen responses as in the paper; the learning rate
and schedule below are not the paper's verified values):
    torchrun --nproc_per_node=8 sft.py --model EleutherAI/pythia-2.8b --dataset hh --lr 1e-6 --epochs 1 \
        --max_steps 0 --max_length 1024 --max_prompt_length 512 --warmup_steps 100 --batch_size 64 \
        --micro_batch_size 4 --eval_every 500 --save_every 500 --output_dir out/sft-hh
"""
import os

import torch

from common import (Metrics, add_common_args, cleanup_distributed, collate_unpaired, eval_micro_batches, global_batch,
                    make_optimizer, rank_micro_batches, setup_distributed, to_device, tokenize_rows, total_steps,
                    validate_args)
from engineering.checkpoint import (Preemption, check_finite, exit_on_lost_rank, load_checkpoint, save_checkpoint,
                                    save_final)
from engineering.cli import ArgumentParser, exit_on_bad_input
from engineering.curves import plot_curves
from engineering.data import load_sft
from engineering.logger import Logger, count_tokens
from engineering.models import autocast, load_model
from engineering.parallel import no_sync, wrap_models
from engineering.speed import example_lengths


def get_args(argv=None):
    p = ArgumentParser(__doc__)  # --help shows the defaults; a bad flag is one line, exit code 2
    add_common_args(p, "sft")
    return p.parse_args(argv)


def main(argv=None):
    """`python sft.py [flags]`, `torchrun ... sft.py [flags]`, or main([flags]) from Python."""
    with exit_on_bad_input():  # a bad flag, file or row: its one line on stderr, exit code 2
        args = get_args(argv)
        d = setup_distributed(args.dist_timeout)  # one process, or one per GPU/CPU slot under torchrun
        with exit_on_lost_rank(d):
            train_loop(args, d)
    cleanup_distributed()


def train_loop(args, d):
    """The whole run on this rank."""
    validate_args(args, d.world_size)
    torch.manual_seed(args.seed + d.rank)

    # -------------------------------------------------------------------------
    # data: {"prompt", "completion"} rows, validated before anything is written; tokenised once
    train_rows, eval_rows = load_sft(args.dataset, args.eval_size, args.seed, args.skip_bad_rows)
    model, tokenizer = load_model(args.model, args.seed, args.trust_remote_code, args.gradient_checkpointing)
    tok = lambda rows: tokenize_rows(tokenizer, rows, ("completion",), args.max_length, args.max_prompt_length)  # noqa: E731
    train, evals = tok(train_rows), tok(eval_rows)
    eval_batches = eval_micro_batches(len(evals), d, args.micro_batch_size)  # this rank's share of the eval rows
    num_steps = total_steps(len(train), args.batch_size, args.max_steps, args.epochs)
    lengths = example_lengths(train) if args.group_by_length else None  # batches of similar length: less padding
    os.makedirs(args.output_dir, exist_ok=True)

    # -------------------------------------------------------------------------
    # model and optimiser; SFT has no reference model
    model.to(d.device).train()
    policy, policy_lm, _ = wrap_models(model, None, d, args.fsdp)
    opt, sched = make_optimizer(model, args.lr, args.weight_decay, args.warmup_steps, args.lr_schedule, num_steps,
                                d.device)
    start, state = 0, {"skipped_steps": 0}
    if args.resume:
        start, state = load_checkpoint(args.output_dir, d, model, None, opt, sched)

    def sft_batch(examples, metrics, lm):
        """Summed response log-probs (B,) of a micro-batch; its token-mean NLL is logged as `loss`."""
        batch = to_device(collate_unpaired(examples, tokenizer.pad_token_id), d.device)
        with autocast(args.dtype, d.device):
            logps, n_tokens = lm(**batch)
        metrics.add(loss=-logps, n_loss=n_tokens, logps=logps, n=torch.ones_like(logps),
                    tokens=count_tokens(examples, ("completion",), d.device))
        return logps

    @torch.no_grad()
    def evaluate():
        """Held-out token-mean NLL, each rank on its eval_batches, summed across ranks."""
        metrics = Metrics()
        model.eval()
        for ids in eval_batches:  # policy_lm, not DDP's forward: no collectives
            sft_batch([evals[j] for j in ids], metrics, policy_lm)
        model.train()
        return {f"eval_{k}": v for k, v in metrics.reduce().items() if k != "tokens"}

    # -------------------------------------------------------------------------
    # training loop: one iteration = one optimizer step over a global batch of --batch_size examples
    logger, metrics, preemption = Logger(args.output_dir, d.master, start, num_steps), Metrics(), Preemption(d)
    for step in range(start, num_steps):
        batch_ids = global_batch(step, len(train), args.batch_size, args.seed, lengths)
        n_global = sum(len(train[j]["completion"]) for j in batch_ids)  # response tokens (EOS included) in the batch
        micro = rank_micro_batches(batch_ids, d, args.micro_batch_size)
        for i, idx in enumerate(micro):
            # gradients are all-reduced (DDP) or reduce-scattered (FSDP) once per step, on the last micro-batch
            with no_sync(policy, args.fsdp, last=i == len(micro) - 1):
                logps = sft_batch([train[j] for j in idx], metrics, policy)
                # the ranks' gradients are averaged, hence * world_size: the sum is the global token-mean NLL
                (-logps.sum() * d.world_size / n_global).backward()
        done = step + 1  # optimizer steps finished, counted from 1

        # the optimizer step: clip the gradient norm, and never apply a non-finite one (skip it, or stop)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
        if check_finite(grad_norm, done, batch_ids, state["skipped_steps"], args.skip_nonfinite, args.output_dir):
            opt.step()
            metrics.add(grad_norm=grad_norm, n_grad_norm=torch.ones_like(grad_norm))  # once per step and rank
        else:
            state["skipped_steps"] += 1
        sched.step()
        opt.zero_grad(set_to_none=True)

        # log, evaluate and checkpoint on their intervals
        if done % args.log_every == 0 or done == num_steps:
            rec = metrics.reduce()  # means over the interval, all-reduced across ranks
            rec.pop("n_grad_norm", None)
            rec["tokens_per_s"] = logger.throughput(rec.pop("tokens"))
            rec["lr"] = sched.get_last_lr()[0]
            logger.log(done, rec, show=("loss",))
        if (args.eval_every and done % args.eval_every == 0) or done == num_steps:
            logger.log(done, evaluate(), show=("eval_loss",))
        if args.save_every and done % args.save_every == 0:
            save_checkpoint(args.output_dir, d, model, None, opt, sched, done, state)
        logger.bar.update(1)
        if done < num_steps and preemption.stop_requested():  # SIGTERM/SIGINT: checkpoint here and stop
            save_checkpoint(args.output_dir, d, model, None, opt, sched, done, state)
            logger.close()
            print(f"stopped by a signal after step {done}; continue with --resume")
            return

    # -------------------------------------------------------------------------
    # save policy/ (save_pretrained + tokenizer), curves.png; the summary on stdout
    logger.close()
    save_final(args.output_dir, d, model, None, tokenizer)
    png = plot_curves(os.path.join(args.output_dir, "metrics.jsonl")) if d.master else None  # None: no matplotlib
    logger.summary(("loss",), ("policy/", "metrics.jsonl") + (("curves.png",) if png else ()))


if __name__ == "__main__":
    main()

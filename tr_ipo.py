r"""
TR-IPO: Identity Preference Optimisation with a trust-region reference model.

IPO (Azar et al., arXiv 2310.12036, Eq. 17) regresses the policy's log-ratio gap on a pair (x, y_w, y_l), y_w
preferred, onto a fixed target instead of pushing it to infinity as DPO does:

    h(x, y_w, y_l) = [log pi_theta(y_w|x) - log pi_ref(y_w|x)] - [log pi_theta(y_l|x) - log pi_ref(y_l|x)]
    loss           = (h - 1 / (2 * beta))^2

beta plays the role of the paper's tau: a smaller beta asks for a larger gap. Rewards, as in TR-DPO, are
beta * [log pi_theta(y|x) - log pi_ref(y|x)].

Log-probs (--logps). By default each log pi(y|x) is the MEAN over the response tokens, not the sum: the IPO
authors confirmed to TRL that the loss is meant on length-averaged log-likelihoods (huggingface.co/blog/
pref-tuning, "Addendum"), and TRL and HALOs do so. Summed, the target 1/(2*beta) is a gap in nats per
sequence, so what beta asks for changes with response length. --logps sum gives the summed variant.

beta (default 0.5). With averaged log-probs the target gap is 1/(2*beta) = 1 nat per token. IPO is sensitive
to beta and there is no agreed default: TRL and HALOs ship 0.1 (a 5-nat target), HF's pref-tuning study swept
0.01-0.9 on 7B models with the best value depending on the model. 0.5 lies in that range and its target is
reachable by the toy demo within one reference period, so the demo's loss visibly falls (with 0.1 it stays
near its starting 25). Sweep it for real models.

TR-IPO (Gorbatovski et al., arXiv 2404.09656) moves the reference: after every tau-th optimizer step

    theta_ref <- alpha * theta + (1 - alpha) * theta_ref          (soft; alpha = 1 is the hard update)

Everything but the loss and --logps is as in tr_dpo.py: the data, masking and log-probs of common.py, and the
same training step, written out here in full so that this file reads on its own. --ref_update none is plain IPO.

Offline demo (tiny model built in code, toy digit puzzles, 250 steps, ~22 s on 2 CPU cores):
    python tr_ipo.py
The loss starts at 1/(4*beta^2) = 1 (h = 0) and falls as h approaches its target 1/(2*beta) = 1; every
reference update pulls h back towards 0, so the loss steps up a little after each and falls again. eval_init_*
score the same eval log-probs against the initial reference (kept from step 0), comparable over time, as in
tr_dpo.py.
Plain IPO, hard update, summed log-probs:
    python tr_ipo.py --ref_update none
    python tr_ipo.py --ref_update hard --tau 16
    python tr_ipo.py --logps sum --beta 0.1
The paper's settings, as its authors' own code runs them: alpha is applied once every tau optimizer steps
(TRL's SyncRefModelCallback, contributed in TRL pull request 1593, and the authors' turbo-alignment library);
TRL's paper index cites Tables 1-2 as alpha 0.6, tau 512, beta 0.05 (for DPO), lr 1e-6, 1 epoch, max length 1024,
grad-norm clip 2, 100 warm-up steps. Not verified here: the tables themselves, the batch size (64 is ours)
and max_prompt_length. See README, "The paper's settings".
TR-IPO here uses --logps sum: the authors' library sums log-probs by default (turbo-alignment's
DPOTrainingArguments.average_log_prob = False, used by its IPO loss too); beta 0.1 for IPO is not verified.
Soft update on 8 GPUs (Pythia SFT models), Anthropic-HH:
    torchrun --nproc_per_node=8 tr_ipo.py --model path/to/pythia-2.8b-sft --dataset hh \
        --beta 0.1 --lr 1e-6 --epochs 1 --max_steps 0 --max_length 1024 --max_prompt_length 512 \
        --max_grad_norm 2 --warmup_steps 100 --batch_size 64 --micro_batch_size 4 --logps sum \
        --ref_update soft --alpha 0.6 --tau 512 --eval_every 500 --save_every 500 --output_dir out/tr-ipo-hh
Reddit TL;DR (an SFT model trained on TL;DR summaries):
    torchrun --nproc_per_node=8 tr_ipo.py --model path/to/pythia-2.8b-sft-tldr --dataset tldr \
        --beta 0.1 --lr 1e-6 --epochs 1 --max_steps 0 --max_length 1024 --max_prompt_length 512 \
        --max_grad_norm 2 --warmup_steps 100 --batch_size 64 --micro_batch_size 4 --logps sum \
        --ref_update soft --alpha 0.6 --tau 512 --eval_every 500 --save_every 500 --output_dir out/tr-ipo-tldr
    (hard update: --ref_update hard --tau 512. beta: the paper tuned it per method and its IPO value is not
    verified here; 0.1 is TRL's and HALOs' default, sweep it.)
"""
import os
from contextlib import nullcontext

import torch

from common import (Metrics, add_common_args, cleanup_distributed, collate_pairs, eval_micro_batches, global_batch,
                    make_optimizer, make_reference, rank_micro_batches, sequence_logps, setup_distributed,
                    should_update_reference, to_device, tokenize_rows, total_steps, update_reference, validate_args)
from engineering.checkpoint import (Preemption, check_finite, exit_on_lost_rank, load_checkpoint, save_checkpoint,
                                    save_final)
from engineering.cli import ArgumentParser, exit_on_bad_input
from engineering.curves import plot_curves
from engineering.data import load_preferences
from engineering.logger import Logger, count_tokens
from engineering.models import autocast, load_model
from engineering.parallel import example_logps, no_sync, wrap_models
from engineering.speed import collate_shared_prompt, example_lengths, shared_prompt_logps

# -----------------------------------------------------------------------------
# the loss


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """IPO loss per pair.

    Args: response log-probs (averaged or summed, see logps_for_loss) under the policy and the reference,
    each shape (B,); beta > 0. Returns (losses, chosen_rewards, rejected_rewards), each shape (B,); rewards are
    detached and scaled by beta.
    """
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    losses = (h - 1 / (2 * beta)) ** 2  # IPO Eq. 17 (arXiv 2310.12036), beta = the paper's tau
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def logps_for_loss(logps, n_tokens, mode):
    """The log-probs the loss sees (--logps): sequence_logps() gives sums; "mean" divides them by the response
    length (>= 1: every response ends in EOS, or in a chat template's end of turn), "sum" keeps them."""
    return logps / n_tokens if mode == "mean" else logps

# -----------------------------------------------------------------------------
# flags


def get_args(argv=None):
    p = ArgumentParser(__doc__)  # --help shows the defaults; a bad flag is one line, exit code 2
    add_common_args(p, "tr_ipo")
    g = p.add_argument_group("TR-IPO")
    g.add_argument("--beta", type=float, default=0.5, help="IPO's tau: the target gap is 1/(2*beta) (TRL, HALOs: 0.1; see the docstring)")
    g.add_argument("--logps", default="mean", choices=["mean", "sum"],
                   help="length-averaged (IPO authors, TRL, HALOs) or summed response log-probs")
    return p.parse_args(argv)


def main(argv=None, hooks=None):
    """`python tr_ipo.py [flags]`, `torchrun ... tr_ipo.py [flags]`, or main([flags]) from Python (hooks: bench.py's,
    see train_loop)."""
    with exit_on_bad_input():  # a bad flag, file or row: its one line on stderr, exit code 2
        args = get_args(argv)
        d = setup_distributed(args.dist_timeout)  # one process, or one per GPU/CPU slot under torchrun
        with exit_on_lost_rank(d):
            train_loop(args, d, hooks)
    cleanup_distributed()


def train_loop(args, d, hooks=None):
    """The whole run on this rank. `hooks` is bench.py's seam and None in a normal run: it wraps the collate
    function (to count tokens and padding), times the reference update and marks the end of each step."""
    validate_args(args, d.world_size, positive=("beta",))
    torch.manual_seed(args.seed + d.rank)

    # -------------------------------------------------------------------------
    # data: validated before anything is written; tokenised once
    train_rows, eval_rows = load_preferences(args.dataset, args.eval_size, args.seed, args.skip_bad_rows)
    model, tokenizer = load_model(args.model, args.seed, args.trust_remote_code, args.gradient_checkpointing)
    tok = lambda rows: tokenize_rows(tokenizer, rows, ("chosen", "rejected"), args.max_length, args.max_prompt_length)  # noqa: E731
    train, evals = tok(train_rows), tok(eval_rows)
    eval_batches = eval_micro_batches(len(evals), d, args.micro_batch_size)  # this rank's share of the eval rows
    num_steps = total_steps(len(train), args.batch_size, args.max_steps, args.epochs)
    lengths = example_lengths(train, args.share_prompt) if args.group_by_length else None  # less padding
    os.makedirs(args.output_dir, exist_ok=True)

    # -------------------------------------------------------------------------
    # models: the policy (fp32 master weights) and its frozen reference copy, under DDP or FSDP2
    model.to(d.device).train()
    ref = make_reference(model, getattr(torch, args.ref_dtype))
    # --share_prompt (speed.py): each prompt stored once and run once, its KV cache reused for both responses
    collate, logps_fn = ((collate_shared_prompt, shared_prompt_logps) if args.share_prompt
                         else (collate_pairs, sequence_logps))
    policy, policy_lm, ref_lm = wrap_models(model, ref, d, args.fsdp, logps_fn)
    opt, sched = make_optimizer(model, args.lr, args.weight_decay, args.warmup_steps, args.lr_schedule, num_steps,
                                d.device)
    start, state = 0, {"ref_updates": 0, "last_ref_update": 0, "skipped_steps": 0}
    if args.resume:
        start, state = load_checkpoint(args.output_dir, d, model, ref, opt, sched)
    else:  # the initial reference's eval log-probs, once (the eval set is fixed; checkpoints keep them)
        state["init_ref_logps"] = example_logps(ref_lm, evals, eval_batches, collate, tokenizer.pad_token_id, 2,
                                                d.device, lambda: autocast(args.dtype, d.device))
    init_ref_logps = state["init_ref_logps"].to(d.device)
    if hooks:  # bench.py counts the tokens and padding of every batch from here on (not the step-0 ones above)
        collate = hooks.counted(collate)

    def ipo_batch(examples, metrics, lm, init_logps=None):
        """Loss per pair for a micro-batch; chosen and rejected go through the model in one forward pass.
        init_logps (eval only): the initial reference's log-probs of these pairs, laid out as ref_logps; the
        same policy log-probs are scored against them too, logged as init_*."""
        batch = to_device(collate(examples, tokenizer.pad_token_id), d.device)
        with autocast(args.dtype, d.device):
            logps, n_tokens = lm(**batch)
            with torch.inference_mode():  # no autograd bookkeeping at all for the reference
                ref_logps, _ = ref_lm(**batch)
        ref_logps = ref_logps.clone()  # a normal tensor: autograd may not save inference tensors for backward
        logps, ref_logps = logps_for_loss(logps, n_tokens, args.logps), logps_for_loss(ref_logps, n_tokens, args.logps)
        pi_c, pi_r = logps.chunk(2)
        ref_c, ref_r = ref_logps.chunk(2)
        losses, r_c, r_r = ipo_loss(pi_c, pi_r, ref_c, ref_r, args.beta)
        metrics.add(n=torch.ones_like(losses), loss=losses, reward_accuracy=(r_c > r_r).float(),
                    reward_margin=r_c - r_r, chosen_reward=r_c, rejected_reward=r_r,
                    logps_chosen=pi_c, logps_rejected=pi_r, logps_margin=pi_c - pi_r,
                    tokens=count_tokens(examples, ("chosen", "rejected"), d.device))
        if init_logps is not None:
            init_c, init_r = logps_for_loss(init_logps, n_tokens, args.logps).chunk(2)
            init_losses, i_c, i_r = ipo_loss(pi_c, pi_r, init_c, init_r, args.beta)
            metrics.add(init_loss=init_losses, init_reward_accuracy=(i_c > i_r).float(), init_reward_margin=i_c - i_r,
                        init_chosen_reward=i_c, init_rejected_reward=i_r)
        return losses

    @torch.no_grad()
    def evaluate():
        """Held-out metrics, each rank on its eval_batches, summed across ranks: against the reference as it is now,
        and (init_*) against the initial reference, whose rewards can be compared from one evaluation to the next."""
        metrics = Metrics()
        model.eval()
        for ids in eval_batches:  # policy_lm, not DDP's forward: no collectives
            ipo_batch([evals[j] for j in ids], metrics, policy_lm, init_ref_logps[:, ids].flatten())
        model.train()
        return {f"eval_{k}": v for k, v in metrics.reduce().items() if k != "tokens"}

    # -------------------------------------------------------------------------
    # training loop: one iteration = one optimizer step over a global batch of --batch_size pairs
    logger, metrics, preemption = Logger(args.output_dir, d.master, start, num_steps), Metrics(), Preemption(d)
    for step in range(start, num_steps):
        batch_ids = global_batch(step, len(train), args.batch_size, args.seed, lengths)
        micro = rank_micro_batches(batch_ids, d, args.micro_batch_size)
        for i, idx in enumerate(micro):
            # gradients are all-reduced (DDP) or reduce-scattered (FSDP) once per step, on the last micro-batch
            with no_sync(policy, args.fsdp, last=i == len(micro) - 1):
                losses = ipo_batch([train[j] for j in idx], metrics, policy)
                (losses.mean() / len(micro)).backward()  # the mean over the global batch, after the ranks' average
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

        # trust region: after optimizer step s, update the reference when s % tau == 0 (never at step 0)
        if should_update_reference(done, args.ref_update, args.tau):
            with hooks.timing_update() if hooks else nullcontext():
                update_reference(ref, model, 1.0 if args.ref_update == "hard" else args.alpha)
            state["ref_updates"] += 1
            state["last_ref_update"] = done

        # log, evaluate and checkpoint on their intervals
        if done % args.log_every == 0 or done == num_steps:
            rec = metrics.reduce()  # means over the interval, all-reduced across ranks
            rec.pop("n_grad_norm", None)
            rec["tokens_per_s"] = logger.throughput(rec.pop("tokens"))
            rec.update(lr=sched.get_last_lr()[0], ref_updates=state["ref_updates"],
                       steps_since_ref_update=done - state["last_ref_update"])
            logger.log(done, rec, show=("loss", "reward_accuracy", "logps_margin", "ref_updates"))
        if hooks:
            hooks.step_end()  # bench.py: the step's time ends here, before evaluation
        if (args.eval_every and done % args.eval_every == 0) or done == num_steps:
            logger.log(done, evaluate(), show=("eval_loss", "eval_reward_accuracy"))
        if args.save_every and done % args.save_every == 0:
            save_checkpoint(args.output_dir, d, model, ref, opt, sched, done, state)
        logger.bar.update(1)
        if done < num_steps and preemption.stop_requested():  # SIGTERM/SIGINT: checkpoint here and stop
            save_checkpoint(args.output_dir, d, model, ref, opt, sched, done, state)
            logger.close()
            print(f"stopped by a signal after step {done}; continue with --resume")
            return

    # -------------------------------------------------------------------------
    # save policy/ and reference/ (save_pretrained + tokenizer), curves.png; the summary on stdout
    logger.close()
    save_final(args.output_dir, d, model, ref, tokenizer)
    png = plot_curves(os.path.join(args.output_dir, "metrics.jsonl")) if d.master else None  # None: no matplotlib
    logger.summary(("loss", "reward_accuracy", "reward_margin", "logps_margin"),
                   ("policy/", "reference/", "metrics.jsonl") + (("curves.png",) if png else ()))


if __name__ == "__main__":
    main()

"""
TR-DPO: Direct Preference Optimization with a trust-region reference model.

DPO (Rafailov et al., arXiv 2305.18290, Eq. 7) trains the policy pi_theta on pairs (x, y_w, y_l), y_w preferred:

    h(x, y_w, y_l) = [log pi_theta(y_w|x) - log pi_ref(y_w|x)] - [log pi_theta(y_l|x) - log pi_ref(y_l|x)]
    loss           = -log sigmoid(beta * h)

with implicit rewards r(x, y) = beta * [log pi_theta(y|x) - log pi_ref(y|x)]. Log-probs are summed over response
tokens (the DPO authors' convention). Plain DPO freezes pi_ref at the SFT model. TR-DPO (Gorbatovski et al.,
arXiv 2404.09656) moves it: after every tau-th optimizer step

    theta_ref <- alpha * theta + (1 - alpha) * theta_ref          (soft; alpha = 1 is the hard update)

so the policy is held close to a recent version of itself (a trust region) instead of to the SFT model.

Offline demo (tiny model built in code, toy digit puzzles, 250 steps, ~20 s on 2 CPU cores):
    python tr_dpo.py
The loss is measured against a moving reference, so it drifts back towards ln 2 after each reference update;
`logps_margin` = log pi(y_w|x) - log pi(y_l|x), the policy's own preference, keeps rising.
Plain DPO baseline, hard update:
    python tr_dpo.py --ref_update none
    python tr_dpo.py --ref_update hard --tau 16
The paper's setting on 8 GPUs (Pythia 2.8B SFT model on Anthropic-HH; soft: alpha 0.6, hard: tau 512):
    torchrun --nproc_per_node=8 tr_dpo.py --model path/to/pythia-2.8b-sft --dataset hh \
        --beta 0.05 --lr 1e-6 --epochs 1 --max_steps 0 --max_length 1024 --max_prompt_length 512 \
        --max_grad_norm 2 --warmup_steps 100 --batch_size 64 --micro_batch_size 4 \
        --ref_update soft --alpha 0.6 --tau 1 --eval_every 500 --save_every 500 --output_dir out/tr-dpo-hh
    (hard update: --ref_update hard --tau 512)
"""
import argparse
import os

import torch
import torch.nn.functional as F

from common import (Logger, Metrics, Preemption, add_common_args, autocast, cleanup_distributed, collate_pairs,
                    count_tokens, end_of_step, example_lengths, exit_on_lost_rank, global_batch, load_checkpoint,
                    load_model, load_preferences, make_optimizer, make_reference, no_sync, optimizer_step,
                    rank_micro_batches, save_checkpoint, save_final, setup_distributed, should_update_reference,
                    to_device, tokenize_rows, total_steps, update_reference, validate_args, wrap_models)

# -----------------------------------------------------------------------------
# the loss


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """DPO loss per pair.

    Args: summed response log-probs under the policy and the reference, each shape (B,); beta > 0.
    Returns (losses, chosen_rewards, rejected_rewards), each shape (B,); rewards are detached and scaled by beta.
    """
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    losses = -F.logsigmoid(beta * h)  # DPO Eq. 7 (arXiv 2305.18290)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards

# -----------------------------------------------------------------------------
# flags


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, "tr_dpo")
    p.add_argument("--beta", type=float, default=0.05, help="strength of the KL penalty towards the reference (paper: 0.05)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    # -------------------------------------------------------------------------
    # set-up: one process, or one per GPU/CPU slot under torchrun
    d = setup_distributed(args.dist_timeout)
    with exit_on_lost_rank(d):
        train_loop(args, d)
    cleanup_distributed()


def train_loop(args, d):
    validate_args(args, d.world_size)
    torch.manual_seed(args.seed + d.rank)

    # -------------------------------------------------------------------------
    # data: validated before anything is written; tokenised once
    train_rows, eval_rows = load_preferences(args.dataset, args.eval_size, args.seed, args.skip_bad_rows)
    model, tokenizer = load_model(args.model, args.seed, args.trust_remote_code)
    tok = lambda rows: tokenize_rows(tokenizer, rows, ("chosen", "rejected"), args.max_length, args.max_prompt_length)  # noqa: E731
    train, evals = tok(train_rows), tok(eval_rows)
    num_steps = total_steps(args, len(train))
    lengths = example_lengths(train, args.share_prompt) if args.group_by_length else None  # less padding
    os.makedirs(args.output_dir, exist_ok=True)

    # -------------------------------------------------------------------------
    # models: the policy (fp32 master weights) and its frozen reference copy, under DDP or FSDP2
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(d.device).train()
    ref = make_reference(model, getattr(torch, args.ref_dtype))
    policy, policy_lm, ref_lm = wrap_models(model, ref, d, args)
    opt, sched = make_optimizer(model, args, d.device, num_steps)
    start, state = 0, {"ref_updates": 0, "last_ref_update": 0, "skipped_steps": 0}
    if args.resume:
        start, state = load_checkpoint(args, d, model, ref, opt, sched)

    def dpo_batch(examples, metrics, lm):
        """Loss per pair for a micro-batch; chosen and rejected go through the model in one forward pass
        (--share_prompt: their prompt once, its KV cache reused for both)."""
        batch = to_device(collate_pairs(examples, tokenizer.pad_token_id, args.share_prompt), d.device)
        with autocast(args, d.device):
            logps, _ = lm(**batch)
            with torch.inference_mode():  # no autograd bookkeeping at all for the reference
                ref_logps, _ = ref_lm(**batch)
        ref_logps = ref_logps.clone()  # a normal tensor: autograd may not save inference tensors for backward
        pi_c, pi_r = logps.chunk(2)
        ref_c, ref_r = ref_logps.chunk(2)
        losses, r_c, r_r = dpo_loss(pi_c, pi_r, ref_c, ref_r, args.beta)
        metrics.add(n=torch.ones_like(losses), loss=losses, reward_accuracy=(r_c > r_r).float(),
                    reward_margin=r_c - r_r, chosen_reward=r_c, rejected_reward=r_r,
                    logps_chosen=pi_c, logps_rejected=pi_r, logps_margin=pi_c - pi_r, tokens=count_tokens(batch))
        return losses

    @torch.no_grad()
    def evaluate():
        """Held-out metrics, each rank on an equal share of the eval rows (the last len % world_size are left
        out, so under FSDP every rank runs the same number of forwards), summed across ranks."""
        metrics = Metrics()
        model.eval()
        mine = evals[:len(evals) - len(evals) % d.world_size][d.rank::d.world_size]
        for i in range(0, len(mine), args.micro_batch_size):
            dpo_batch(mine[i:i + args.micro_batch_size], metrics, policy_lm)  # not DDP's forward: no collectives
        model.train()
        return {f"eval_{k}": v for k, v in metrics.reduce().items() if k != "tokens"}

    # -------------------------------------------------------------------------
    # training loop: one iteration = one optimizer step over a global batch of --batch_size pairs
    logger, metrics, preemption = Logger(args, d, start, num_steps), Metrics(), Preemption(d)
    for step in range(start, num_steps):
        batch_ids = global_batch(step, len(train), args.batch_size, args.seed, lengths)
        micro = rank_micro_batches(batch_ids, d, args.micro_batch_size)
        for i, idx in enumerate(micro):
            # gradients are all-reduced (DDP) or reduce-scattered (FSDP) once per step, on the last micro-batch
            with no_sync(policy, args, last=i == len(micro) - 1):
                losses = dpo_batch([train[j] for j in idx], metrics, policy)
                (losses.mean() / len(micro)).backward()  # the mean over the global batch, after the ranks' average
        optimizer_step(model, opt, sched, args, state, step + 1, batch_ids, metrics)  # clip, NaN guard, step
        done = step + 1  # optimizer steps finished

        # trust region: after optimizer step s, update the reference when s % tau == 0 (never at step 0)
        if should_update_reference(done, args.ref_update, args.tau):
            update_reference(ref, model, 1.0 if args.ref_update == "hard" else args.alpha)
            state["ref_updates"] += 1
            state["last_ref_update"] = done

        # log, evaluate and checkpoint on their intervals; a SIGTERM/SIGINT checkpoints here and stops
        if end_of_step(done, num_steps, args, state, sched, logger, metrics.reduce, evaluate,
                       lambda: save_checkpoint(args, d, model, ref, opt, sched, done, state), preemption,
                       show=("loss", "reward_accuracy", "logps_margin")):
            return

    # -------------------------------------------------------------------------
    # save policy/ and reference/ (save_pretrained + tokenizer)
    logger.close()
    save_final(args, d, model, ref, tokenizer)


if __name__ == "__main__":
    main()

r"""
TR-DPO: Direct Preference Optimization with a trust-region reference model.

DPO (Rafailov et al., arXiv 2305.18290, Eq. 7) trains the policy pi_theta on pairs (x, y_w, y_l), y_w preferred:

    h(x, y_w, y_l) = [log pi_theta(y_w|x) - log pi_ref(y_w|x)] - [log pi_theta(y_l|x) - log pi_ref(y_l|x)]
    loss           = -log sigmoid(beta * h)

with implicit rewards r(x, y) = beta * [log pi_theta(y|x) - log pi_ref(y|x)], log-probs summed over response
tokens (the DPO authors' convention). Plain DPO freezes pi_ref at the SFT model. TR-DPO (Gorbatovski et al.,
arXiv 2404.09656) moves it: after every tau-th optimizer step

    theta_ref <- alpha * theta + (1 - alpha) * theta_ref          (soft; alpha = 1 is the hard update)

so the policy is held close to a recent version of itself (a trust region) instead of to the SFT model.

Offline demo (a tiny model built in code, toy digit puzzles, 250 steps; about 20 s on an idle CPU core):
    python tr_dpo.py                        # soft update, alpha 0.6 every 100 steps
    python tr_dpo.py --ref_update none      # plain DPO
    python tr_dpo.py --lora_r 8 --lora_targets all-linear+head   # LoRA: the reference an adapter too, docs/lora.md
The loss is measured against a moving reference, so it climbs back towards ln 2 after each update, while
logps_margin = log pi(y_w|x) - log pi(y_l|x), the policy's own preference, keeps rising. eval_* score the eval
pairs against the reference as it is, eval_init_* against the initial one (docs/metrics.md).
The paper's setting on 8 GPUs (alpha once every tau steps, as the authors' code runs it: docs/paper_settings.md):
    torchrun --nproc_per_node=8 tr_dpo.py --model path/to/pythia-2.8b-sft --dataset hh \
        --beta 0.05 --lr 1e-6 --epochs 1 --max_steps 0 --max_length 1024 --max_prompt_length 512 \
        --max_grad_norm 2 --warmup_steps 100 --batch_size 64 --micro_batch_size 4 \
        --ref_update soft --alpha 0.6 --tau 512 --eval_every 500 --save_every 500 --output_dir out/tr-dpo-hh
"""
import torch
import torch.nn.functional as F

from common import (Metrics, SequenceLogps, collate_pairs, global_batch, make_optimizer, make_reference,
                    rank_micro_batches, sequence_logps, to_device, tokenize_rows, total_steps, update_alpha,
                    update_reference)
from engineering import chat, cli, data, logger, models, parallel, speed
from engineering.run import Run, launch

# what a run shows (metrics.jsonl holds every metric logged): the progress bar's keys, and the metrics plotted in
# curves.png and summed up at the end, train and eval
SHOW = ("loss", "reward_accuracy", "logps_margin", "ref_updates", "eval_loss", "eval_reward_accuracy")
PLOT = ("loss", "reward_accuracy", "reward_margin", "logps_margin")

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
    p = cli.ArgumentParser(__doc__)  # --help shows the defaults; a bad flag is one line, exit code 2
    cli.add_common_args(p, "tr_dpo")  # engineering/cli.py: model, data, optimisation, trust region, logging
    g = p.add_argument_group("TR-DPO")
    g.add_argument("--beta", type=cli.positive, default=0.05, help="strength of the KL penalty towards the reference (paper: 0.05)")
    return p.parse_args(argv)


def main(argv=None):
    """`python tr_dpo.py [flags]`, `torchrun ... tr_dpo.py [flags]`, or main([flags]) from Python."""
    launch(train_loop, get_args, argv)  # one process, or one per GPU/CPU slot under torchrun


def train_loop(args, d):
    """The whole run on this rank (d: its rank, the world size and its device)."""
    # -------------------------------------------------------------------------
    # data: validated before anything is written; tokenised once
    train_rows, eval_rows = data.load_preferences(args.dataset, args.eval_size, args.seed, args.skip_bad_rows)
    lm, tokenizer = models.load_model(args.model, args.seed, args.trust_remote_code, args.gradient_checkpointing,
                                      args.lora_r, args.lora_alpha, args.lora_targets, args.base_dtype,
                                      fsdp=args.fsdp)  # --fsdp: rank 0 alone reads the weights
    keys = ("chosen", "rejected")
    # chat-format rows are first rendered as text by the model's chat template (engineering/chat.py)
    tok = lambda rows: tokenize_rows(tokenizer, chat.render_rows(tokenizer, rows, keys), keys, args.max_length,  # noqa: E731
                                     args.max_prompt_length)
    train, evals = tok(train_rows), tok(eval_rows)
    eval_batches = parallel.eval_micro_batches(len(evals), d, args.micro_batch_size)  # this rank's share of the eval pairs
    num_steps = total_steps(len(train), args.batch_size, args.max_steps, args.epochs)
    lengths = speed.example_lengths(train, args.share_prompt) if args.group_by_length else None  # less padding

    # -------------------------------------------------------------------------
    # networks: policy and ref, each a common.SequenceLogps: net(**batch) -> (summed response log-probs, token counts)
    collate, logps_fn = collate_pairs, sequence_logps  # the plain path (common.py)
    if args.share_prompt:  # the flagged alternative: each prompt run once for both responses (engineering/speed.py)
        collate, logps_fn = speed.shared_prompt_layout(lm)
    policy = SequenceLogps(lm, logps_fn).train()  # lm: the Hugging Face model; fp32 master weights
    ref = make_reference(policy, getattr(torch, args.ref_dtype))  # a frozen copy; --lora_r: an adapter on the same base
    # ddp: the policy's training forward, under DDP when torchrun starts several processes (it all-reduces the
    # gradients in backward); with --fsdp the policy sharded in place; with one process the policy itself
    ddp = parallel.wrap_models(policy, ref, d, args.fsdp)
    opt, sched = make_optimizer(policy, args.lr, args.weight_decay, args.warmup_steps, args.lr_schedule, num_steps)
    amp = lambda: models.autocast(args.dtype, d.device)  # noqa: E731  (--dtype)
    run = Run(args, d, policy, ref, opt, sched, num_steps, SHOW)  # metrics.jsonl, checkpoint/ (and --resume), outputs
    # the initial reference's eval log-probs, once: eval_init_* score against them, comparable over time
    init_ref_logps = run.initial("init_ref_logps", lambda: parallel.example_logps(
        ref, evals, eval_batches, collate, tokenizer.pad_token_id, 2, d.device, amp))

    def dpo_batch(examples, metrics, net, init_logps=None):
        """Loss per pair for a micro-batch; chosen and rejected go through net (ddp or policy) in one forward pass.
        init_logps (eval only): the initial reference's log-probs of these pairs, laid out as ref_logps."""
        batch = to_device(collate(examples, tokenizer.pad_token_id), d.device)
        with amp():
            logps, _ = net(**batch)
            with torch.inference_mode():  # no autograd bookkeeping at all for the reference
                ref_logps, _ = ref(**batch)
        pi_c, pi_r = logps.chunk(2)
        ref_c, ref_r = ref_logps.clone().chunk(2)  # clone: autograd may not save inference tensors for backward
        losses, r_c, r_r = dpo_loss(pi_c, pi_r, ref_c, ref_r, args.beta)
        metrics.mean(loss=losses, reward_accuracy=(r_c > r_r).float(), reward_margin=r_c - r_r, chosen_reward=r_c,
                     rejected_reward=r_r, logps_chosen=pi_c, logps_rejected=pi_r, logps_margin=pi_c - pi_r)
        metrics.total(tokens=logger.count_tokens(examples, ("chosen", "rejected"), d.device))  # for tokens/s
        if init_logps is not None:  # the same policy log-probs against the initial reference
            init_c, init_r = init_logps.chunk(2)
            init_losses, i_c, i_r = dpo_loss(pi_c, pi_r, init_c, init_r, args.beta)
            metrics.mean(init_loss=init_losses, init_reward_accuracy=(i_c > i_r).float(), init_reward_margin=i_c - i_r,
                         init_chosen_reward=i_c, init_rejected_reward=i_r)
        return losses

    @torch.no_grad()
    def evaluate():
        """Held-out metrics, each rank on its eval_batches, summed across ranks."""
        metrics = Metrics()
        policy.eval()
        for ids in eval_batches:  # policy, not ddp: no collectives
            dpo_batch([evals[j] for j in ids], metrics, policy, init_ref_logps[:, ids].flatten())
        policy.train()
        return metrics.reduce("eval_")

    # -------------------------------------------------------------------------
    # training loop: one iteration = one optimizer step over a global batch of --batch_size pairs
    metrics = Metrics()
    for step in range(run.start, num_steps):
        batch_ids = global_batch(step, len(train), args.batch_size, args.seed, lengths)
        micro = rank_micro_batches(batch_ids, d, args.micro_batch_size)
        for i, idx in enumerate(micro):
            # gradients are all-reduced (DDP) or reduce-scattered (FSDP) once per step, on the last micro-batch
            with parallel.no_sync(ddp, args.fsdp, last=i == len(micro) - 1):
                losses = dpo_batch([train[j] for j in idx], metrics, ddp)
                (losses.mean() / len(micro)).backward()  # the mean over the global batch, after the ranks' average
        done = step + 1  # optimizer steps finished, counted from 1

        # the optimizer step: clip the gradient norm; a non-finite one is never applied (skipped, or the run stops)
        if run.clip_gradients(args.max_grad_norm, done, batch_ids, metrics):  # the norm is logged as grad_norm
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

        # trust region: after optimizer step s, when s % tau == 0 (never at step 0); alpha is 1 for a hard update
        alpha = update_alpha(done, args.ref_update, args.alpha, args.tau)
        if alpha:
            update_reference(ref, policy, alpha)
            run.reference_updated(done, alpha)  # counted for the log, an event for the trackers

        # log, evaluate and checkpoint on their intervals
        if done % args.log_every == 0 or done == num_steps:
            run.log_train(done, metrics.reduce(), sched.get_last_lr()[0])  # means over the interval, all ranks
        if (args.eval_every and done % args.eval_every == 0) or done == num_steps:
            run.log_eval(done, evaluate())
        if args.save_every and done % args.save_every == 0:
            run.save(done)
        run.end_step(done)  # the progress bar; after SIGTERM/SIGINT: checkpoint/, then exit 143/130 (--resume)

    # -------------------------------------------------------------------------
    # policy/ and reference/ (save_pretrained + tokenizer), curves.png; the summary on stdout
    run.finish(tokenizer, PLOT)


if __name__ == "__main__":
    main()

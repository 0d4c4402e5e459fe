r"""
TR-KTO: Kahneman-Tversky Optimisation with a trust-region reference model.

KTO (Ethayarajh et al., arXiv 2402.01306, Sec. 4) learns from unpaired examples (x, y, desirable?) instead of
preference pairs. With r(x, y) = log pi_theta(y|x) - log pi_ref(y|x) (summed over response tokens) and a
reference point z0 ~ KL(pi_theta || pi_ref):

    desirable y:    loss = lambda_D * (1 - sigmoid(beta * (r - z0)))
    undesirable y:  loss = lambda_U * (1 - sigmoid(beta * (z0 - r)))

Rewards are beta * r. TR-KTO (Gorbatovski et al., arXiv 2404.09656) moves the reference: after every tau-th
optimizer step theta_ref <- alpha * theta + (1 - alpha) * theta_ref (alpha = 1 is the hard update);
--ref_update none is plain KTO.

Data. A paired set (toy, hh, tldr, a paired file, folder or hub set) gives one desirable (chosen) and one
undesirable (rejected) example per pair; a source of {"prompt", "completion", "label": true/false} rows, text or
chat messages, is read as is (data.load_unpaired). At start-up we warn when lambda_D * n_D / (lambda_U * n_U) falls outside [1, 4/3], the
range the KTO paper recommends (its Eq. 8); paired data gives n_D = n_U.

The reference point z0, and why it is the same whatever the world size. As in the KTO authors' code, z0 is
estimated on mismatched pairs: prompt i of the GLOBAL batch with the completion of example i+1 (mod batch size;
further on when i+1 has the same prompt, as a pair's chosen and rejected do), the mean of log pi_theta - log pi_ref
over them (summed log-probs), under no_grad, clamped at 0 and never differentiated. Before the micro-batches of a
step run, each rank scores the mismatched pairs at its own positions of the global batch, the sums and counts
are all-reduced, and every rank and every micro-batch of that step uses the one z0. So z0 is a function of the
global batch and the weights only: 1 process and N processes (same --batch_size, --seed) compute the same z0 and
follow the same trajectory; a micro-batch of 1 is fine (only --batch_size 1 is refused); and a rank or
micro-batch holding one class only changes nothing (the loss is a mean over examples; per-class rewards are
logged through sums and counts, never a 0/0). Cost: one extra no_grad forward of policy and reference per
example, as in HALOs and TRL. Eval uses the same scheme over the whole eval set. --share_prompt is refused (one
completion per prompt: nothing to share).

Offline demo (tiny model built in code, toy digit puzzles, 250 steps, ~22 s on 2 CPU cores; a little longer than
tr_dpo.py's demo, for the forwards on the mismatched pairs):
    python tr_kto.py
Logged: loss, kl (z0), desirable_reward / undesirable_reward and desirable_logps / undesirable_logps (means over
each class), reward_margin and logps_margin (desirable minus undesirable), n_desirable / n_undesirable (examples
per interval). Measured against a moving reference, loss and rewards drift back after each reference update;
logps_margin, the policy's own preference for the desirable completions, keeps rising. Eval records also hold
eval_init_loss, _desirable_reward, _undesirable_reward, _reward_margin and _kl: the same eval log-probs against
the initial reference, kept from step 0, comparable over time (tr_dpo.py's docstring; curves.png plots both).
Plain KTO, hard update, your own unpaired data:
    python tr_kto.py --ref_update none
    python tr_kto.py --ref_update hard --tau 16
    python tr_kto.py --dataset my_feedback.jsonl --desirable_weight 1.33
The paper's settings, as its authors' own code runs them: alpha is applied once every tau optimizer steps
(TRL's SyncRefModelCallback, contributed in TRL pull request 1593, and the authors' turbo-alignment library);
TRL's paper index cites Tables 1-2 as alpha 0.6, tau 512, beta 0.05 (for DPO), lr 1e-6, 1 epoch, max length 1024,
grad-norm clip 2, 100 warm-up steps. Not verified here: the tables themselves, the batch size (64 is ours)
and max_prompt_length. See README, "The paper's settings".
Soft update on 8 GPUs (Pythia SFT models), Anthropic-HH:
    torchrun --nproc_per_node=8 tr_kto.py --model path/to/pythia-2.8b-sft --dataset hh \
        --beta 0.1 --lr 1e-6 --epochs 1 --max_steps 0 --max_length 1024 --max_prompt_length 512 \
        --max_grad_norm 2 --warmup_steps 100 --batch_size 128 --micro_batch_size 8 \
        --ref_update soft --alpha 0.6 --tau 512 --eval_every 500 --save_every 500 --output_dir out/tr-kto-hh
Reddit TL;DR (an SFT model trained on TL;DR summaries):
    torchrun --nproc_per_node=8 tr_kto.py --model path/to/pythia-2.8b-sft-tldr --dataset tldr \
        --beta 0.1 --lr 1e-6 --epochs 1 --max_steps 0 --max_length 1024 --max_prompt_length 512 \
        --max_grad_norm 2 --warmup_steps 100 --batch_size 128 --micro_batch_size 8 \
        --ref_update soft --alpha 0.6 --tau 512 --eval_every 500 --save_every 500 --output_dir out/tr-kto-tldr
    (hard update: --ref_update hard --tau 512. --batch_size counts examples: 128 = the 64 pairs of the TR-DPO
    command. beta 0.1 is the KTO authors' default; the paper's own TR-KTO value is not verified here.)
"""
import os
from contextlib import nullcontext

import torch

from common import (Metrics, add_common_args, all_reduce_sum, cleanup_distributed, collate_unpaired, eval_micro_batches,
                    global_batch, make_optimizer, make_reference, rank_micro_batches, setup_distributed,
                    should_update_reference, to_device, tokenize_rows, total_steps, truncate, update_reference,
                    validate_args)
from engineering.checkpoint import (Preemption, check_finite, exit_on_lost_rank, load_checkpoint, save_checkpoint,
                                    save_final)
from engineering.cli import ArgumentParser, InputError, exit_on_bad_input
from engineering.curves import plot_curves
from engineering.data import load_unpaired
from engineering.logger import Logger, count_tokens
from engineering.models import autocast, load_model
from engineering.parallel import example_logps, no_sync, wrap_models
from engineering.speed import example_lengths

# -----------------------------------------------------------------------------
# the loss and its reference point


def kto_loss(policy_logps, ref_logps, desirable, kl, beta, desirable_weight=1.0, undesirable_weight=1.0):
    """KTO loss per example.

    Args: summed response log-probs under the policy and the reference, shape (B,); desirable, bool (B,); kl, the
    KL estimate (a scalar; clamped at 0 here and never differentiated); beta > 0; lambda_D, lambda_U.
    Returns (losses, rewards), each shape (B,); rewards = beta * r, detached.
    """
    r = policy_logps - ref_logps
    z0 = torch.as_tensor(kl, dtype=r.dtype, device=r.device).detach().clamp(min=0)
    losses = torch.where(desirable,  # KTO loss, arXiv 2402.01306 Sec. 4: lambda_y - v(x, y)
                         desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    return losses, beta * r.detach()


def mismatched_pairs(examples, max_length, max_prompt_length):
    """The pairs z0 is estimated on (token ids): prompt i with the completion of the next example whose prompt
    differs, i + 1 (mod len) unless it shares prompt i (a pair's chosen and rejected do). A prompt with another
    example's completion can be longer than either original, so the pair is truncated again (common.truncate)."""
    n = len(examples)
    pairs = []
    for i, e in enumerate(examples):
        j = next((k % n for k in range(i + 1, i + n) if examples[k % n]["prompt"] != e["prompt"]), (i + 1) % n)
        prompt, (completion,) = truncate(e["prompt"], [examples[j]["completion"]], max_length, max_prompt_length)
        pairs.append({"prompt": prompt, "completion": completion})
    return pairs


@torch.no_grad()
def estimate_kl(policy_lm, ref_lm, pairs, micro_batch_size, pad_id, device, amp=nullcontext,
                collate=collate_unpaired, init_ref_logps=None):
    """Mean of log pi_theta(y'|x) - log pi_ref(y'|x) over the mismatched pairs of ALL ranks (each rank passes its
    own): sums and counts are all-reduced, so every rank returns the same value. Not clamped. Every rank must call
    it, with or without pairs. init_ref_logps (eval only): the pairs' log-probs under the initial reference, shape
    (len(pairs),); the same policy log-probs give the estimate against it too, and both are returned, shape (2,)."""
    # [sum of log-ratios, (sum of log-ratios to the initial reference,) number of pairs]
    total = torch.zeros(2 if init_ref_logps is None else 3, device=device)
    for i in range(0, len(pairs), micro_batch_size):
        batch = to_device(collate(pairs[i:i + micro_batch_size], pad_id), device)
        with amp():
            logps, _ = policy_lm(**batch)
            ref_logps, _ = ref_lm(**batch)
        init = [] if init_ref_logps is None else [(logps - init_ref_logps[i:i + micro_batch_size]).sum()]
        total += torch.stack([(logps - ref_logps).sum(), *init, torch.tensor(float(len(logps)), device=device)])
    total = all_reduce_sum(total)
    return total[0] / total[1] if init_ref_logps is None else total[:2] / total[2]


def class_balance_warning(n_desirable, n_undesirable, desirable_weight, undesirable_weight):
    """A warning (str) when lambda_D * n_D / (lambda_U * n_U) is outside [1, 4/3] (KTO paper, Eq. 8), else None."""
    d, u = desirable_weight * n_desirable, undesirable_weight * n_undesirable
    if u > 0 and 1 <= d / u <= 4 / 3:
        return None
    ratio = f"{d / u:.3g}" if u else "inf"
    hint = (f"; e.g. --desirable_weight {undesirable_weight * n_undesirable / n_desirable:.3g} gives 1"
            if n_desirable and n_undesirable else "; KTO needs both classes to place z0 between them")
    return (f"warning: lambda_D*n_D / (lambda_U*n_U) = {desirable_weight:g}*{n_desirable} / ({undesirable_weight:g}*"
            f"{n_undesirable}) = {ratio}, outside [1, 4/3] recommended by the KTO paper (Eq. 8){hint}")

# -----------------------------------------------------------------------------
# flags


def get_args(argv=None):
    p = ArgumentParser(__doc__)  # --help shows the defaults; a bad flag is one line, exit code 2
    add_common_args(p, "tr_kto")
    # examples, not pairs: 32 examples per step are the 16 pairs (32 sequences) of tr_dpo.py's default
    p.set_defaults(batch_size=32, micro_batch_size=16)
    g = p.add_argument_group("TR-KTO")
    g.add_argument("--beta", type=float, default=0.1, help="KTO's beta (the KTO authors' default: 0.1)")
    g.add_argument("--desirable_weight", type=float, default=1.0, help="lambda_D, the weight of desirable examples")
    g.add_argument("--undesirable_weight", type=float, default=1.0, help="lambda_U, the weight of undesirable examples")
    return p.parse_args(argv)


def main(argv=None, hooks=None):
    """`python tr_kto.py [flags]`, `torchrun ... tr_kto.py [flags]`, or main([flags]) from Python (hooks: bench.py's,
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
    validate_args(args, d.world_size, positive=("beta", "desirable_weight", "undesirable_weight"))
    if args.batch_size < 2:
        raise InputError("--batch_size must be >= 2: z0 pairs each prompt with another example's completion")
    if args.share_prompt:
        raise InputError("--share_prompt shares a prompt between the two responses of a pair; KTO has one")
    torch.manual_seed(args.seed + d.rank)

    # -------------------------------------------------------------------------
    # data: unpaired examples {"prompt", "completion", "label"}, validated before anything is written; tokenised once
    train_rows, eval_rows = load_unpaired(args.dataset, args.eval_size, args.seed, args.skip_bad_rows)
    n_des = sum(r["label"] for r in train_rows)
    warning = class_balance_warning(n_des, len(train_rows) - n_des, args.desirable_weight, args.undesirable_weight)
    if warning and d.master:
        print(warning)
    model, tokenizer = load_model(args.model, args.seed, args.trust_remote_code, args.gradient_checkpointing)

    def tok(rows):
        ids = tokenize_rows(tokenizer, rows, ("completion",), args.max_length, args.max_prompt_length)
        return [{**t, "label": r["label"]} for t, r in zip(ids, rows)]
    train, evals = tok(train_rows), tok(eval_rows)
    evals = evals[:len(evals) - len(evals) % d.world_size]  # equal shares: under FSDP every rank runs as many forwards
    if not evals:
        raise InputError(f"{len(eval_rows)} eval examples cannot be shared by {d.world_size} ranks; raise --eval_size")
    eval_pairs = mismatched_pairs(evals, args.max_length, args.max_prompt_length)  # over the whole eval set
    eval_batches = eval_micro_batches(len(evals), d, args.micro_batch_size)  # this rank's examples and their pairs
    num_steps = total_steps(len(train), args.batch_size, args.max_steps, args.epochs)
    lengths = example_lengths(train) if args.group_by_length else None  # batches of similar length: less padding
    os.makedirs(args.output_dir, exist_ok=True)

    # -------------------------------------------------------------------------
    # models: the policy (fp32 master weights) and its frozen reference copy, under DDP or FSDP2
    model.to(d.device).train()
    ref = make_reference(model, getattr(torch, args.ref_dtype))
    collate = collate_unpaired
    policy, policy_lm, ref_lm = wrap_models(model, ref, d, args.fsdp)
    opt, sched = make_optimizer(model, args.lr, args.weight_decay, args.warmup_steps, args.lr_schedule, num_steps,
                                d.device)
    start, state = 0, {"ref_updates": 0, "last_ref_update": 0, "skipped_steps": 0}
    if args.resume:
        start, state = load_checkpoint(args.output_dir, d, model, ref, opt, sched)
    else:  # the initial reference's log-probs of the eval examples and their pairs, once (checkpoints keep them)
        state["init_ref_logps"] = torch.cat([
            example_logps(ref_lm, examples, eval_batches, collate, tokenizer.pad_token_id, 1, d.device,
                          lambda: autocast(args.dtype, d.device)) for examples in (evals, eval_pairs)])
    init_ref_logps = state["init_ref_logps"].to(d.device)  # (2, len(evals)): examples, then their pairs
    if hooks:  # bench.py counts the tokens and padding of every batch from here on (not the step-0 ones above)
        collate = hooks.counted(collate)
    kl_of = lambda pairs, init=None: estimate_kl(  # noqa: E731
        policy_lm, ref_lm, pairs, args.micro_batch_size, tokenizer.pad_token_id, d.device,
        lambda: autocast(args.dtype, d.device), collate, init).clamp(min=0)

    def kto_batch(examples, kl, metrics, lm, init=None):
        """Loss per example for a micro-batch, given the step's z0. init (eval only): (z0, these examples'
        log-probs) against the initial reference; the same policy log-probs are scored against it too, as init_*."""
        batch = to_device(collate(examples, tokenizer.pad_token_id), d.device)
        desirable = torch.tensor([e["label"] for e in examples], device=d.device)
        with autocast(args.dtype, d.device):
            logps, _ = lm(**batch)
            with torch.inference_mode():  # no autograd bookkeeping at all for the reference
                ref_logps, _ = ref_lm(**batch)
        ref_logps = ref_logps.clone()  # a normal tensor: autograd may not save inference tensors for backward
        losses, rewards = kto_loss(logps, ref_logps, desirable, kl, args.beta, args.desirable_weight, args.undesirable_weight)
        metrics.add(n=torch.ones_like(losses), loss=losses, tokens=count_tokens(examples, ("completion",), d.device))
        classes = (("desirable", desirable.float()), ("undesirable", (~desirable).float()))
        for name, m in classes:
            # per-class means as sums and counts: Metrics divides 'x' by 'n_x', so an absent class gives 0, not nan
            metrics.add(**{f"{name}_reward": rewards * m, f"n_{name}_reward": m, f"{name}_logps": logps * m,
                           f"n_{name}_logps": m})
        if init is not None:
            init_kl, init_logps = init
            init_losses, init_rewards = kto_loss(logps, init_logps, desirable, init_kl, args.beta,
                                                 args.desirable_weight, args.undesirable_weight)
            metrics.add(init_loss=init_losses)
            for name, m in classes:
                metrics.add(**{f"init_{name}_reward": init_rewards * m, f"n_init_{name}_reward": m})
        return losses

    def summary(metrics):
        """Reduce across ranks; name the class counts; the margins between the classes' means (eval: also against
        the initial reference)."""
        rec = metrics.reduce()
        for name in ("desirable", "undesirable"):
            rec[f"n_{name}"] = rec.pop(f"n_{name}_reward")
            rec.pop(f"n_{name}_logps")
            rec.pop(f"n_init_{name}_reward", None)
        rec["reward_margin"] = rec["desirable_reward"] - rec["undesirable_reward"]
        rec["logps_margin"] = rec["desirable_logps"] - rec["undesirable_logps"]  # the policy's own preference
        if "init_loss" in rec:
            rec["init_reward_margin"] = rec["init_desirable_reward"] - rec["init_undesirable_reward"]
        rec.pop("n_kl")  # kl, like grad_norm, is a per-step mean: every rank added the same value once
        rec.pop("n_init_kl", None)
        return rec

    @torch.no_grad()
    def evaluate():
        """Held-out metrics, each rank on its eval_batches of examples and of their mismatched pairs: against the
        reference as it is now, and (init_*) against the initial reference, comparable from one evaluation to the
        next."""
        metrics = Metrics()
        model.eval()
        mine = [j for ids in eval_batches for j in ids]
        kl, init_kl = kl_of([eval_pairs[j] for j in mine], init_ref_logps[1, mine])
        for ids in eval_batches:  # policy_lm, not DDP's forward: no collectives
            kto_batch([evals[j] for j in ids], kl, metrics, policy_lm, (init_kl, init_ref_logps[0, ids]))
        metrics.add(kl=kl, n_kl=torch.ones_like(kl), init_kl=init_kl, n_init_kl=torch.ones_like(init_kl))
        model.train()
        return {f"eval_{k}": v for k, v in summary(metrics).items() if k != "tokens"}

    # -------------------------------------------------------------------------
    # training loop: one iteration = one optimizer step over a global batch of --batch_size examples
    logger, metrics, preemption = Logger(args.output_dir, d.master, start, num_steps), Metrics(), Preemption(d)
    for step in range(start, num_steps):
        batch_ids = global_batch(step, len(train), args.batch_size, args.seed, lengths)
        batch = [train[j] for j in batch_ids]
        micro = rank_micro_batches(list(range(len(batch))), d, args.micro_batch_size)  # positions in the global batch
        # z0 first, over the whole global batch (see the docstring): one value for every rank and micro-batch
        pairs = mismatched_pairs(batch, args.max_length, args.max_prompt_length)
        kl = kl_of([pairs[k] for pos in micro for k in pos])
        for i, pos in enumerate(micro):
            # gradients are all-reduced (DDP) or reduce-scattered (FSDP) once per step, on the last micro-batch
            with no_sync(policy, args.fsdp, last=i == len(micro) - 1):
                losses = kto_batch([batch[k] for k in pos], kl, metrics, policy)
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
        metrics.add(kl=kl, n_kl=torch.ones_like(kl))

        # trust region: after optimizer step s, update the reference when s % tau == 0 (never at step 0)
        if should_update_reference(done, args.ref_update, args.tau):
            with hooks.timing_update() if hooks else nullcontext():
                update_reference(ref, model, 1.0 if args.ref_update == "hard" else args.alpha)
            state["ref_updates"] += 1
            state["last_ref_update"] = done

        # log, evaluate and checkpoint on their intervals
        if done % args.log_every == 0 or done == num_steps:
            rec = summary(metrics)  # means over the interval, all-reduced across ranks
            rec.pop("n_grad_norm", None)
            rec["tokens_per_s"] = logger.throughput(rec.pop("tokens"))
            rec.update(lr=sched.get_last_lr()[0], ref_updates=state["ref_updates"],
                       steps_since_ref_update=done - state["last_ref_update"])
            logger.log(done, rec, show=("loss", "logps_margin", "kl", "ref_updates"))
        if hooks:
            hooks.step_end()  # bench.py: the step's time ends here, before evaluation
        if (args.eval_every and done % args.eval_every == 0) or done == num_steps:
            logger.log(done, evaluate(), show=("eval_loss", "eval_logps_margin"))
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
    logger.summary(("loss", "reward_margin", "logps_margin", "kl"),
                   ("policy/", "reference/", "metrics.jsonl") + (("curves.png",) if png else ()))


if __name__ == "__main__":
    main()

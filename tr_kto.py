r"""
TR-KTO: Kahneman-Tversky Optimisation with a trust-region reference model.

KTO (Ethayarajh et al., arXiv 2402.01306, Sec. 4) learns from unpaired examples (x, y, desirable?). With
r(x, y) = log pi_theta(y|x) - log pi_ref(y|x) (summed over response tokens) and a reference point z0:

    desirable y:    loss = lambda_D * (1 - sigmoid(beta * (r - z0)))
    undesirable y:  loss = lambda_U * (1 - sigmoid(beta * (z0 - r)))

Rewards are beta * r. TR-KTO (Gorbatovski et al., arXiv 2404.09656) moves pi_ref after every tau-th optimizer
step: theta_ref <- alpha * theta + (1 - alpha) * theta_ref (alpha = 1: hard update); --ref_update none is KTO.

z0 ~ KL(pi_theta || pi_ref), as in the KTO authors' code: the mean log-ratio over mismatched pairs, prompt i of the
GLOBAL batch with the completion of the next example with another prompt, under no_grad, clamped at 0. Each rank
scores its share and the sums are all-reduced before the step's micro-batches, so z0 depends on the global batch
and the weights only: 1 and N processes train alike, and a micro-batch holding one class is fine. It costs one
extra no_grad forward of policy and reference per example. Paired data gives one desirable (chosen) and one
undesirable (rejected) example per pair; {"prompt", "completion", "label": true/false} rows are read as they are.
We warn when lambda_D * n_D / (lambda_U * n_U) is outside [1, 4/3] (the KTO paper's Eq. 8).

Offline demo (tiny model, toy digit puzzles, 250 steps; about 30 s on an idle CPU core):
    python tr_kto.py                        # --batch_size counts examples: 32 = the 16 pairs of tr_dpo.py
    python tr_kto.py --ref_update none      # plain KTO
    python tr_kto.py --lora_r 8 --lora_targets all-linear+head   # LoRA: the reference an adapter too, docs/lora.md
The paper's setting on 8 GPUs (docs/paper_settings.md; beta 0.1 is the KTO authors' default, not verified there):
    torchrun --nproc_per_node=8 tr_kto.py --model path/to/pythia-2.8b-sft --dataset hh \
        --beta 0.1 --lr 1e-6 --epochs 1 --max_steps 0 --max_length 1024 --max_prompt_length 512 \
        --max_grad_norm 2 --warmup_steps 100 --batch_size 128 --micro_batch_size 8 \
        --ref_update soft --alpha 0.6 --tau 512 --eval_every 500 --save_every 500 --output_dir out/tr-kto-hh
"""
from contextlib import nullcontext

import torch

from common import (Metrics, SequenceLogps, all_reduce_sum, collate_unpaired, global_batch, make_optimizer,
                    make_reference, rank_micro_batches, to_device, tokenize_rows, total_steps, truncate, update_alpha,
                    update_reference)
from engineering import chat, cli, data, logger, models, parallel, speed
from engineering.run import Run, launch

# what a run shows (metrics.jsonl holds every metric logged): the progress bar's keys, and the metrics plotted in
# curves.png and summed up at the end, train and eval
SHOW = ("loss", "logps_margin", "kl", "ref_updates", "eval_loss")
PLOT = ("loss", "reward_margin", "logps_margin", "kl")

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
def estimate_kl(policy, ref, pairs, positions, micro_batch_size, pad_id, device, amp=nullcontext,
                init_ref_logps=None):
    """Mean of log pi_theta(y'|x) - log pi_ref(y'|x) over the mismatched pairs of ALL ranks, each rank scoring the
    pairs at its positions (its micro-batches of indices into pairs): sums and counts are all-reduced, so every rank
    returns the same value. Not clamped. Every rank must call it, with or without positions. init_ref_logps (eval
    only): every pair's log-prob under the initial reference, shape (len(pairs),); the same policy log-probs give the
    estimate against it too, and both are returned, shape (2,)."""
    mine = [k for pos in positions for k in pos]
    pairs, init_ref_logps = [pairs[k] for k in mine], None if init_ref_logps is None else init_ref_logps[mine]
    # [sum of log-ratios, (sum of log-ratios to the initial reference,) number of pairs]
    total = torch.zeros(2 if init_ref_logps is None else 3, device=device)
    for i in range(0, len(pairs), micro_batch_size):
        batch = to_device(collate_unpaired(pairs[i:i + micro_batch_size], pad_id), device)
        with amp():
            logps, _ = policy(**batch)
            ref_logps, _ = ref(**batch)
        init = [] if init_ref_logps is None else [(logps - init_ref_logps[i:i + micro_batch_size]).sum()]
        total += torch.stack([(logps - ref_logps).sum(), *init, torch.tensor(float(len(logps)), device=device)])
    total = all_reduce_sum(total)
    return total[0] / total[1] if init_ref_logps is None else total[:2] / total[2]


def class_balance_warning(rows, desirable_weight, undesirable_weight, show=False):
    """A warning (str) when lambda_D * n_D / (lambda_U * n_U) is outside [1, 4/3] (KTO paper, Eq. 8), else None;
    rows: the training examples, each with its "label" (True: desirable). show: also print it."""
    n_desirable = sum(r["label"] for r in rows)
    n_undesirable = len(rows) - n_desirable
    d, u = desirable_weight * n_desirable, undesirable_weight * n_undesirable
    if u > 0 and 1 <= d / u <= 4 / 3:
        return None
    ratio = f"{d / u:.3g}" if u else "inf"
    hint = (f"; e.g. --desirable_weight {undesirable_weight * n_undesirable / n_desirable:.3g} gives 1"
            if n_desirable and n_undesirable else "; KTO needs both classes to place z0 between them")
    warning = (f"warning: lambda_D*n_D / (lambda_U*n_U) = {desirable_weight:g}*{n_desirable} / ({undesirable_weight:g}"
               f"*{n_undesirable}) = {ratio}, outside [1, 4/3] recommended by the KTO paper (Eq. 8){hint}")
    if show:
        print(warning)
    return warning

def eval_set(evals, d, micro_batch_size, max_length, max_prompt_length):
    """(eval examples, their mismatched pairs, this rank's micro-batches of both): the examples cut to equal shares
    for every rank (under FSDP every rank runs as many forwards), the pairs over the whole eval set."""
    n = len(evals) - len(evals) % d.world_size
    cli.need(n, f"{len(evals)} eval examples cannot be shared by {d.world_size} ranks; raise --eval_size")
    pairs = mismatched_pairs(evals[:n], max_length, max_prompt_length)
    return evals[:n], pairs, parallel.eval_micro_batches(n, d, micro_batch_size)


def tokenize_examples(tokenizer, rows, max_length, max_prompt_length):
    """common.tokenize_rows for unpaired rows: {"prompt": ids, "completion": ids + [EOS], "label": bool}."""
    ids = tokenize_rows(tokenizer, chat.render_rows(tokenizer, rows, ("completion",)), ("completion",), max_length,
                        max_prompt_length)  # chat-format rows rendered as text first (engineering/chat.py)
    return [{**t, "label": r["label"]} for t, r in zip(ids, rows)]


def class_means(metrics, desirable, prefix="", **values):
    """Log each value's mean over the desirable and over the undesirable examples, as <prefix><class>_<name>: a
    class mask counts the class's examples, so a class absent from an interval gives 0, not nan."""
    for name, m in (("desirable", desirable.float()), ("undesirable", (~desirable).float())):
        metrics.mean(count=m, **{f"{prefix}{name}_{k}": v * m for k, v in values.items()})


def with_margins(rec, p=""):
    """A reduced record with the margins, desirable minus undesirable, of the rewards and of the policy's own
    log-probs (p: the keys' prefix, "eval_" for eval records)."""
    rec[p + "reward_margin"] = rec[p + "desirable_reward"] - rec[p + "undesirable_reward"]
    rec[p + "logps_margin"] = rec[p + "desirable_logps"] - rec[p + "undesirable_logps"]
    if p + "init_loss" in rec:
        rec[p + "init_reward_margin"] = rec[p + "init_desirable_reward"] - rec[p + "init_undesirable_reward"]
    return rec

# -----------------------------------------------------------------------------
# flags


def get_args(argv=None):
    p = cli.ArgumentParser(__doc__)  # --help shows the defaults; a bad flag is one line, exit code 2
    cli.add_common_args(p, "tr_kto", pairs=False)  # engineering/cli.py: model, data, optimisation, trust region, ...
    # examples, not pairs: 32 examples per step are the 16 pairs (32 sequences) of tr_dpo.py's default
    p.set_defaults(batch_size=32, micro_batch_size=16)
    g = p.add_argument_group("TR-KTO")
    g.add_argument("--beta", type=cli.positive, default=0.1, help="KTO's beta (the KTO authors' default: 0.1)")
    g.add_argument("--desirable_weight", type=cli.positive, default=1.0, help="lambda_D, the weight of desirable examples")
    g.add_argument("--undesirable_weight", type=cli.positive, default=1.0, help="lambda_U, the weight of undesirable examples")
    args = p.parse_args(argv)
    cli.need(args.batch_size >= 2, "--batch_size must be >= 2: z0 pairs each prompt with another example's completion")
    return args


def main(argv=None):
    """`python tr_kto.py [flags]`, `torchrun ... tr_kto.py [flags]`, or main([flags]) from Python."""
    launch(train_loop, get_args, argv)  # one process, or one per GPU/CPU slot under torchrun


def train_loop(args, d):
    """The whole run on this rank (d: its rank, the world size and its device)."""
    # -------------------------------------------------------------------------
    # data: unpaired examples {"prompt", "completion", "label"}, validated before anything is written; tokenised once
    train_rows, eval_rows = data.load_unpaired(args.dataset, args.eval_size, args.seed, args.skip_bad_rows)
    class_balance_warning(train_rows, args.desirable_weight, args.undesirable_weight, show=d.master)
    lm, tokenizer = models.load_model(args.model, args.seed, args.trust_remote_code, args.gradient_checkpointing,
                                      args.lora_r, args.lora_alpha, args.lora_targets, args.base_dtype,
                                      fsdp=args.fsdp)  # --fsdp: rank 0 alone reads the weights
    pad = tokenizer.pad_token_id
    train, evals = (tokenize_examples(tokenizer, rows, args.max_length, args.max_prompt_length)
                    for rows in (train_rows, eval_rows))
    evals, eval_pairs, eval_batches = eval_set(evals, d, args.micro_batch_size, args.max_length, args.max_prompt_length)
    num_steps = total_steps(len(train), args.batch_size, args.max_steps, args.epochs)
    lengths = speed.example_lengths(train) if args.group_by_length else None  # batches of similar length: less padding

    # -------------------------------------------------------------------------
    # networks: policy and ref, each a common.SequenceLogps: net(**batch) -> (summed response log-probs, token counts)
    policy = SequenceLogps(lm).train()  # lm: the Hugging Face model; fp32 master weights; common.sequence_logps
    ref = make_reference(policy, getattr(torch, args.ref_dtype))  # a frozen copy; --lora_r: an adapter on the same base
    # ddp: the policy's training forward, under DDP when torchrun starts several processes (it all-reduces the
    # gradients in backward); with --fsdp the policy sharded in place; with one process the policy itself
    ddp = parallel.wrap_models(policy, ref, d, args.fsdp)
    opt, sched = make_optimizer(policy, args.lr, args.weight_decay, args.warmup_steps, args.lr_schedule, num_steps)
    amp = lambda: models.autocast(args.dtype, d.device)  # noqa: E731  (--dtype)
    run = Run(args, d, policy, ref, opt, sched, num_steps, SHOW)  # metrics.jsonl, checkpoint/ (and --resume), outputs
    # the initial reference's log-probs of the eval examples and of their pairs (2, len(evals)), once
    init_ref_logps = run.initial("init_ref_logps", lambda: torch.cat([parallel.example_logps(
        ref, examples, eval_batches, collate_unpaired, pad, 1, d.device, amp) for examples in (evals, eval_pairs)]))
    kl_of = lambda pairs, positions, init=None: estimate_kl(  # noqa: E731  (z0: this, clamped at 0)
        policy, ref, pairs, positions, args.micro_batch_size, pad, d.device, amp, init).clamp(min=0)
    weights = dict(beta=args.beta, desirable_weight=args.desirable_weight, undesirable_weight=args.undesirable_weight)

    def kto_batch(examples, kl, metrics, net, init=None):
        """Loss per example for a micro-batch (through net: ddp or policy), given z0. init (eval): z0 and log-probs of the initial reference."""
        batch = to_device(collate_unpaired(examples, pad), d.device)
        desirable = torch.tensor([e["label"] for e in examples], device=d.device)
        with amp():
            logps, _ = net(**batch)
            with torch.inference_mode():  # no autograd bookkeeping at all for the reference
                ref_logps, _ = ref(**batch)
        losses, rewards = kto_loss(logps, ref_logps.clone(), desirable, kl, **weights)  # clone: see tr_dpo.py
        metrics.mean(loss=losses, kl=kl)
        class_means(metrics, desirable, reward=rewards, logps=logps)
        metrics.total(n_desirable=desirable.float(), n_undesirable=(~desirable).float(),
                      tokens=logger.count_tokens(examples, ("completion",), d.device))  # tokens: for tokens/s
        if init is not None:  # the same policy log-probs against the initial reference
            init_losses, init_rewards = kto_loss(logps, init[1], desirable, init[0], **weights)
            metrics.mean(init_loss=init_losses, init_kl=init[0])
            class_means(metrics, desirable, "init_", reward=init_rewards)
        return losses

    @torch.no_grad()
    def evaluate():
        """Held-out metrics, each rank on its eval_batches of examples and of their mismatched pairs."""
        metrics = Metrics()
        policy.eval()
        kl, init_kl = kl_of(eval_pairs, eval_batches, init_ref_logps[1])
        for ids in eval_batches:  # policy, not ddp: no collectives
            kto_batch([evals[j] for j in ids], kl, metrics, policy, (init_kl, init_ref_logps[0, ids]))
        policy.train()
        return with_margins(metrics.reduce("eval_"), "eval_")

    # -------------------------------------------------------------------------
    # training loop: one iteration = one optimizer step over a global batch of --batch_size examples
    metrics = Metrics()
    for step in range(run.start, num_steps):
        batch_ids = global_batch(step, len(train), args.batch_size, args.seed, lengths)
        batch = [train[j] for j in batch_ids]
        micro = rank_micro_batches(list(range(len(batch))), d, args.micro_batch_size)  # positions in the global batch
        # z0 first, over the whole global batch (see the docstring): one value for every rank and micro-batch
        kl = kl_of(mismatched_pairs(batch, args.max_length, args.max_prompt_length), micro)
        for i, pos in enumerate(micro):
            # gradients are all-reduced (DDP) or reduce-scattered (FSDP) once per step, on the last micro-batch
            with parallel.no_sync(ddp, args.fsdp, last=i == len(micro) - 1):
                losses = kto_batch([batch[k] for k in pos], kl, metrics, ddp)
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
            run.log_train(done, with_margins(metrics.reduce()), sched.get_last_lr()[0])  # means over the interval
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

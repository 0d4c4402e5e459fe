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

Data (--dataset): 'toy' = digit puzzles whose SFT answers are wrong 30% of the time on purpose, 'hh[:subset]' = the
chosen dialogues, 'tldr' = the reference summaries of CarperAI/openai_summarize_tldr, or demonstrations, KTO rows or
preference pairs (the chosen response) from a file, folder or hub id, text or chat (docs/data.md). The flags and the
step are the TR scripts' without a reference model (no --ref_update, --alpha, --tau, --ref_dtype), pairs
(--share_prompt) or --beta. The output is policy/, the --model of every TR run:

    python sft.py --model small --max_steps 1200 --lr 3e-3 --lr_schedule cosine --warmup_steps 20 \
        --batch_size 32 --micro_batch_size 32 --output_dir out/sft      # toy_experiment.py's SFT: ~2 min, 2 cores
    python tr_dpo.py --model out/sft/policy --lr 3e-5 --ref_update soft --alpha 0.6 --tau 16

At paper scale on 8 GPUs (Pythia on Anthropic-HH, SFT on the chosen responses as in the paper; the learning rate
and schedule below are not the paper's verified values):
    torchrun --nproc_per_node=8 sft.py --model EleutherAI/pythia-2.8b --dataset hh --lr 1e-6 --epochs 1 \
        --max_steps 0 --max_length 1024 --max_prompt_length 512 --warmup_steps 100 --batch_size 64 \
        --micro_batch_size 4 --eval_every 500 --save_every 500 --output_dir out/sft-hh
"""
import torch

from common import (Metrics, SequenceLogps, collate_unpaired, global_batch, make_optimizer, rank_micro_batches,
                    to_device, tokenize_rows, total_steps)
from engineering import chat, cli, data, logger, models, parallel, speed
from engineering.run import Run, launch

# what a run shows (metrics.jsonl holds every metric logged): the progress bar's keys, and the metrics plotted in
# curves.png and summed up at the end, train and eval
SHOW = ("loss", "eval_loss")
PLOT = ("loss",)


def get_args(argv=None):
    p = cli.ArgumentParser(__doc__)  # --help shows the defaults; a bad flag is one line, exit code 2
    cli.add_common_args(p, "sft", reference=False, pairs=False)  # engineering/cli.py: no trust-region flags
    return p.parse_args(argv)


def main(argv=None):
    """`python sft.py [flags]`, `torchrun ... sft.py [flags]`, or main([flags]) from Python."""
    launch(train_loop, get_args, argv)  # one process, or one per GPU/CPU slot under torchrun


def train_loop(args, d):
    """The whole run on this rank (d: its rank, the world size and its device)."""
    # -------------------------------------------------------------------------
    # data: {"prompt", "completion"} rows, validated before anything is written; tokenised once
    train_rows, eval_rows = data.load_sft(args.dataset, args.eval_size, args.seed, args.skip_bad_rows)
    lm, tokenizer = models.load_model(args.model, args.seed, args.trust_remote_code, args.gradient_checkpointing,
                                      args.lora_r, args.lora_alpha, args.lora_targets, args.base_dtype,
                                      fsdp=args.fsdp)  # --fsdp: rank 0 alone reads the weights
    keys = ("completion",)
    # chat-format rows are first rendered as text by the model's chat template (engineering/chat.py)
    tok = lambda rows: tokenize_rows(tokenizer, chat.render_rows(tokenizer, rows, keys), keys, args.max_length,  # noqa: E731
                                     args.max_prompt_length)
    train, evals = tok(train_rows), tok(eval_rows)
    eval_batches = parallel.eval_micro_batches(len(evals), d, args.micro_batch_size)  # this rank's share
    num_steps = total_steps(len(train), args.batch_size, args.max_steps, args.epochs)
    lengths = speed.example_lengths(train) if args.group_by_length else None  # batches of similar length: less padding

    # -------------------------------------------------------------------------
    # the policy, a common.SequenceLogps: policy(**batch) -> (summed response log-probs, token counts); no reference
    policy = SequenceLogps(lm).train()  # lm: the Hugging Face model; fp32 master weights; common.sequence_logps
    # ddp: the policy's training forward, under DDP when torchrun starts several processes (it all-reduces the
    # gradients in backward); with --fsdp the policy sharded in place; with one process the policy itself
    ddp = parallel.wrap_models(policy, None, d, args.fsdp)
    opt, sched = make_optimizer(policy, args.lr, args.weight_decay, args.warmup_steps, args.lr_schedule, num_steps)
    run = Run(args, d, policy, None, opt, sched, num_steps, SHOW)  # metrics.jsonl, checkpoint/ (and --resume), policy/

    def sft_batch(examples, metrics, net):
        """Summed response log-probs (B,) of a micro-batch through net (ddp or policy); its token-mean NLL is logged
        as `loss`."""
        batch = to_device(collate_unpaired(examples, tokenizer.pad_token_id), d.device)
        with models.autocast(args.dtype, d.device):
            logps, n_tokens = net(**batch)
        metrics.mean(count=n_tokens, loss=-logps)  # the mean over response tokens
        metrics.mean(logps=logps)  # the mean over sequences
        metrics.total(response_tokens=n_tokens)
        metrics.total(tokens=logger.count_tokens(examples, ("completion",), d.device))  # for tokens/s
        return logps

    @torch.no_grad()
    def evaluate():
        """Held-out token-mean NLL, each rank on its eval_batches, summed across ranks."""
        metrics = Metrics()
        policy.eval()
        for ids in eval_batches:  # policy, not ddp: no collectives
            sft_batch([evals[j] for j in ids], metrics, policy)
        policy.train()
        return metrics.reduce("eval_")

    # -------------------------------------------------------------------------
    # training loop: one iteration = one optimizer step over a global batch of --batch_size examples
    metrics = Metrics()
    for step in range(run.start, num_steps):
        batch_ids = global_batch(step, len(train), args.batch_size, args.seed, lengths)
        n_global = sum(len(train[j]["completion"]) for j in batch_ids)  # response tokens (EOS included) in the batch
        micro = rank_micro_batches(batch_ids, d, args.micro_batch_size)
        for i, idx in enumerate(micro):
            # gradients are all-reduced (DDP) or reduce-scattered (FSDP) once per step, on the last micro-batch
            with parallel.no_sync(ddp, args.fsdp, last=i == len(micro) - 1):
                logps = sft_batch([train[j] for j in idx], metrics, ddp)
                # the ranks' gradients are averaged, hence * world_size: the sum is the global token-mean NLL
                (-logps.sum() * d.world_size / n_global).backward()
        done = step + 1  # optimizer steps finished, counted from 1

        # the optimizer step: clip the gradient norm; a non-finite one is never applied (skipped, or the run stops)
        if run.clip_gradients(args.max_grad_norm, done, batch_ids, metrics):  # the norm is logged as grad_norm
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

        # log, evaluate and checkpoint on their intervals
        if done % args.log_every == 0 or done == num_steps:
            run.log_train(done, metrics.reduce(), sched.get_last_lr()[0])  # means over the interval, all ranks
        if (args.eval_every and done % args.eval_every == 0) or done == num_steps:
            run.log_eval(done, evaluate())
        if args.save_every and done % args.save_every == 0:
            run.save(done)
        run.end_step(done)  # the progress bar; after SIGTERM/SIGINT: checkpoint/, then exit 143/130 (--resume)

    # -------------------------------------------------------------------------
    # policy/ (save_pretrained + tokenizer), curves.png; the summary on stdout
    run.finish(tokenizer, PLOT)


if __name__ == "__main__":
    main()

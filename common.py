"""
The shared core of tr_dpo.py, tr_ipo.py, tr_kto.py and sft.py: distributed set-up, the HH prompt boundary,
tokenisation and masking, sequence log-probs, the trust-region reference update and its schedule, batch order,
the optimizer and metrics. Read it after tr_dpo.py. What a reader can skip lives in engineering/ (its __init__.py
lists the files): the flags and their checks, data loading, models, DDP/FSDP, checkpoints, logging.

Conventions (stated here once, pinned by tests/test_common.py):
- Prompt boundary. A prompt is text; a response is the text the model is trained on. For Anthropic HH the
  prompt is the dialogue up to and including the last "\n\nAssistant:" that chosen and rejected share
  (see split_hh). Prompt and response are tokenised separately, without special tokens, and EOS is appended
  to every text response, so the model learns to stop. A chat-format row reaches tokenize_rows rendered as text by
  the tokenizer's chat template (engineering/chat.py, render_rows: the prompt ends with the assistant header) and
  marked to get no EOS: the template ends every turn with its own end-of-turn token.
- Masking. build_sequence() is the one place where prompt tokens get label -100; padding gets -100 in
  pad_sequences(). Nothing else masks, and nothing depends on a chat template's token count.
- Truncation (truncate()). If prompt + longest response exceeds max_length, the prompt keeps its last
  max_prompt_length tokens (the end holds the question being answered), then every response is cut from
  the right to fit. Decided per example on its longest response, so chosen and rejected share one prompt.
- Log-probs. sequence_logps() returns per-sequence SUMS of response-token log-probs and the token counts;
  a loss that wants averages divides (IPO does by default; DPO and KTO use sums). They are the model's own:
  log_softmax(model(...).logits) up to float rounding, whatever its forward does after the LM head. The scripts'
  networks are SequenceLogps modules: policy(**batch) and ref(**batch) give these sums and counts.
- Reference dtype. The reference is kept in float32 unless --ref_dtype bfloat16; update_reference() then
  computes the lerp in float32 and rounds once, and the reference's forward runs in bfloat16 too (its
  log-probs are still summed in float32). With --lora_r the reference is an adapter (engineering/adapters.py).
- Reference schedule. After optimizer step s (counted from 1), the reference is updated when s % tau == 0:
  never at step 0, first at step tau; update_alpha() is the one place that decides it.
"""
import contextlib
import copy
import datetime
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# errors: a bad input ends the run with one `error:` line and exit code 2 (engineering/cli.py, exit_on_bad_input)


class InputError(ValueError):
    """A mistake in what the user gave: a flag, a file or a row (DataError), a model or dataset that cannot be
    fetched."""


class DataError(InputError):
    """A bad file or row; the message names the file, the row and the field (engineering/data.py)."""

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
# the trust-region reference: a frozen copy of the policy, moved towards it every tau steps


def make_reference(policy, dtype=torch.float32):
    """The reference at step 0 of a policy (a SequenceLogps): a frozen copy, in `dtype`, always in eval mode, whose
    forward gives the same log-probs. A LoRA policy's model carries its own maker, lora_reference(policy): the
    reference is then the policy's own module with a reference adapter, no second model (engineering/adapters.py)."""
    if hasattr(policy.lm, "lora_reference"):
        return policy.lm.lora_reference(policy)
    ref = copy.deepcopy(policy).to(dtype).eval()
    ref.requires_grad_(False)
    return ref


@torch.no_grad()
def update_reference(ref, policy, alpha):
    """Trust-region update, in place: theta_ref <- alpha * theta + (1 - alpha) * theta_ref (arXiv 2404.09656).

    alpha = 1 copies the policy (the hard update). Parameters are matched by name (tied weights appear once). A
    reference kept in a lower precision than the policy (--ref_dtype bfloat16) is updated in float32 and rounded
    once. No communication: under DDP each rank updates its own full copy from identical weights; under FSDP
    policy and reference are sharded alike and each rank updates its own shards (DTensor.to_local()). A LoRA
    reference (--lora_r) makes the same update of the adapted weights itself, exactly: ref.update_towards.
    """
    if hasattr(ref, "update_towards"):  # a LoRA reference: its adapter updated exactly, adapters.py
        return ref.update_towards(policy, alpha)
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731  (FSDP2 parameters are DTensors)
    ref_params = dict(ref.named_parameters())
    for name, p in policy.named_parameters():
        r = local(ref_params[name])
        r.copy_(r.float().lerp_(local(p).float(), alpha))  # lerp: r + alpha * (p - r); float() is r itself in fp32


# The reference schedules, by their --ref_update name (cli.py takes its choices from here): each maps the number of
# optimizer steps done, tau and --alpha to the weight of the update after that step, 0 for none. A new schedule (a
# decaying alpha, say) is one more function here with its @ref_schedule name, and a test of its values.
REF_SCHEDULES = {}


def ref_schedule(name):
    def register(fn):
        REF_SCHEDULES[name] = fn
        return fn
    return register


@ref_schedule("soft")
def soft_schedule(step, tau, alpha):
    """alpha after every tau-th step."""
    return alpha if step % tau == 0 else 0.0


@ref_schedule("hard")
def hard_schedule(step, tau, alpha):
    """1 (a copy of the policy) after every tau-th step."""
    return 1.0 if step % tau == 0 else 0.0


@ref_schedule("none")
def frozen_schedule(step, tau, alpha):
    """Never: the plain method, its reference frozen at the initial model."""
    return 0.0


def update_alpha(step, mode, alpha, tau):
    """The alpha of the reference update after optimizer step `step` (counted from 1) under --ref_update `mode`, or 0
    for no update; never at step 0."""
    return REF_SCHEDULES[mode](step, tau, alpha) if step > 0 else 0.0

# -----------------------------------------------------------------------------
# data: rows of {"prompt", "chosen", "rejected"} text (engineering/data.py loads them); the HH prompt boundary


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
    """Tokenise text rows once, up front: {"prompt": ids, key: ids + [EOS] for key in response_keys}, truncated. A
    row marked "eos": False gets no EOS: a chat-format row, which engineering/chat.py's render_rows has rendered by
    the chat template, whose end-of-turn token ends every response already (see the module docstring)."""
    chat = [not r.get("eos", True) for r in rows]
    # a text of more than `cap` characters holds more than 4 x max_length tokens (none spans more characters than
    # the longest in the vocabulary), so it is cut to them before it is tokenised (the prompt's end, a response's
    # start): the same tokens survive truncate(), and a 200 MB row is not tokenised whole
    cap = 4 * max_length * max(map(len, tokenizer.get_vocab()))

    def enc(key, cut):
        """Token ids of every row's `key`; in a text row a special token's text ("<|endoftext|>") is plain text,
        never an EOS mid-response; a rendered chat row's special tokens are the template's own."""
        ids = [None] * len(rows)
        for c in (False, True):
            which = [i for i in range(len(rows)) if chat[i] == c]
            texts = [cut(rows[i][key]) for i in which]
            for i, t in zip(which, tokenizer(texts, add_special_tokens=False, split_special_tokens=not c)["input_ids"]
                            if which else []):
                ids[i] = t
        return ids
    prompts = enc("prompt", lambda t: t[-cap:])
    resp = {k: enc(k, lambda t: t[:cap]) for k in response_keys}
    out = []
    for i, p in enumerate(prompts):
        eos = [tokenizer.eos_token_id] if rows[i].get("eos", True) else []
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


def keep_mask(positions, shape):
    """The flat positions n * T + t as an (N, T) boolean mask: hidden[mask] lists them in ascending order, as
    `positions` (from nonzero()) are."""
    keep = torch.zeros(shape[0] * shape[1], dtype=torch.bool, device=positions.device)
    return keep.index_fill_(0, positions, True).view(shape)


def response_logits(model, input_ids, attention_mask, positions):
    """(M, V) logits at the M flat positions n * T + t (ascending) that predict a response token, computed as
    model.logps_path says. The loader decides it once per model, by a probe against the model's own forward
    (engineering/logits.py); a model nobody checked gets "forward", exact for any model.
        "head"          the model's body, then its LM head on those M hidden states only: never full-vocabulary
                        logits over prompts and padding; only where the forward does nothing after the head
        "forward_keep"  the model's own forward with logits only at those positions (logits_to_keep, a mask)
        "forward"       the model's own forward, logits at every position, then those rows"""
    path = getattr(model, "logps_path", "forward")
    if path == "head":
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return model.get_output_embeddings()(hidden.flatten(0, 1).index_select(0, positions))
    if path == "forward_keep":
        keep = keep_mask(positions, input_ids.shape)
        return model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits.flatten(0, 1).index_select(0, positions)


def summed_logps(logits, targets, rows, n):
    """Per-token log-probs of targets (M,) under logits (M, V), summed per sequence into (n,) float32 by rows (M,)."""
    token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")
    return torch.zeros(n, device=logits.device).index_add_(0, rows, token_logps)


def sequence_logps(model, input_ids, attention_mask, labels, positions=None):
    """Per-sequence sum of log pi(y_t | x, y_<t) over response tokens, and the number of those tokens.

    Shapes: input_ids, attention_mask, labels (N, T) -> logps (N,) float32, n_tokens (N,) long.
    Logits are made only where a response token is predicted (labels[:, 1:] != -100), and they are the model's own
    (response_logits). `positions` (from pad_sequences) are those places as flat indices n * T + t; without them
    they are found here, a host-device sync on CUDA.
    """
    N, T = labels.shape
    if positions is None:
        positions = F.pad(labels[:, 1:] != -100, (0, 1)).flatten().nonzero().squeeze(1)
    logits = response_logits(model, input_ids, attention_mask, positions)  # position n*T + t predicts token n*T + t + 1
    logps = summed_logps(logits, labels.flatten().index_select(0, positions + 1), positions // T, N)
    return logps, (labels[:, 1:] != -100).sum(1)


class SequenceLogps(torch.nn.Module):
    """A network as the step runs it: forward(**batch) is logps(lm, **batch), the summed response log-probs and
    token counts of a collated batch under the causal LM `lm` (sequence_logps, or a speed path of the same contract
    that a script picks), inside scope() (a LoRA reference's switch to its adapter). A module, not a function,
    because DDP and FSDP2 act through a module's forward: DDP's gradient hooks and FSDP2's gathering of sharded
    weights must see the whole log-prob computation as one forward. Its parameters are lm's, named "lm.<name>"."""

    def __init__(self, lm, logps=sequence_logps, scope=contextlib.nullcontext):
        super().__init__()
        self.lm, self.logps, self.scope = lm, logps, scope

    def forward(self, **batch):
        with self.scope():
            return self.logps(self.lm, **batch)

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


def total_steps(n_train, batch_size, max_steps, epochs):
    """Optimizer steps of the run: max_steps, or (max_steps 0) `epochs` passes over the training examples."""
    per_epoch = n_train // batch_size
    if per_epoch == 0:
        raise InputError(f"{n_train} training examples are fewer than --batch_size {batch_size}")
    return max_steps or epochs * per_epoch

# -----------------------------------------------------------------------------
# optimiser


def make_optimizer(policy, lr, weight_decay, warmup_steps, schedule, num_steps):
    """AdamW over the policy's trainable parameters (fused on CUDA) and an LR schedule: linear warmup, then
    "constant" or "cosine" to 0 at num_steps."""
    params = [p for p in policy.parameters() if p.requires_grad]  # LoRA: the adapter, not the frozen base
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=params[0].is_cuda)

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
    """What a run logs between two log intervals, summed on the device: mean() for means over examples (or any
    count you give), total() for counts. reduce() all-reduces the sums across ranks (the only host-device sync, at
    log intervals) and returns {prefix + name: value}, then starts over."""

    def __init__(self):
        self.sums, self.counts = {}, {}  # name -> summed values; name -> what the mean divides by (None: a total)

    def mean(self, count=None, **values):
        """Add to the mean of each name. Each element of a value is one example, counted once, or, with `count` (a
        tensor shaped like the values, e.g. a 0/1 class mask: values are then given as value * mask), counted
        count times; a name whose count stays 0 reports 0."""
        for k, v in values.items():
            self._add(k, v, v.numel() if count is None else count.detach().float().sum())

    def total(self, **values):
        """Add to the sum of each name: reported as a total (tokens, examples of a class), not a mean."""
        for k, v in values.items():
            self._add(k, v, None)

    def _add(self, k, v, n):
        v = v.detach().float().sum()
        self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.counts[k] = n if k not in self.counts or n is None else self.counts[k] + n

    def reduce(self, prefix=""):
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        device = self.sums[keys[0]].device
        counts = [torch.as_tensor(self.counts[k], dtype=torch.float32, device=device) for k in keys
                  if self.counts[k] is not None]
        totals = all_reduce_sum(torch.stack([self.sums[k] for k in keys] + counts)).tolist()
        sums, counts = dict(zip(keys, totals)), iter(totals[len(keys):])
        out = {}
        for k in keys:
            n = None if self.counts[k] is None else next(counts)
            out[prefix + k] = sums[k] if n is None else sums[k] / n if n else 0.0
        self.sums, self.counts = {}, {}
        return out

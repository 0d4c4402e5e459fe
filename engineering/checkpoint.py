"""
Checkpoints, the final save, and what a long run does when something goes wrong: preemption (SIGTERM/SIGINT), a
non-finite gradient, a lost rank, a second run in the same folder.

A checkpoint holds the weights and optimizer state as torch.distributed.checkpoint (DCP) shards, which every rank
writes and reads in parallel, so that it resumes on any number of processes, with or without --fsdp; the rest is
read without unpickling code (docs/faults.md has the layout). It records its run (run.json: the script, the flags,
a hash of the data, its files and their sizes), so that --resume continues only the run it was written by;
checkpoints and final folders are written beside their place and renamed into it, so that a kill at any moment
leaves a complete one.

None of this changes what a training step computes; it lets a run of hours or days stop and continue to the same
weights (bit for bit on CPU, tested). A reader learning the methods can skip this file; read it before running on a
cluster that preempts jobs, or when a run stopped with one of the errors below.
"""
import json
import math
import os
import random
import shutil
import signal
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist

from common import Dist, barrier
from engineering import adapters, jsonio
from engineering.cli import RUN_FILES, InputError, first_line, need
from engineering.data import fingerprint

# -----------------------------------------------------------------------------
# checkpoints and final save


def gathered_weights(model):
    """The full (unsharded) state dict of one model, gathered to the CPU, for the final save. A collective under
    FSDP: every rank calls it; only rank 0 receives the tensors (cpu_offload), and only this one model's: the
    optimizer and the other model stay sharded. Parameter names are the model's own."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    o = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
    return get_model_state_dict(model, options=o)


def sharded_state(policy, ref, opt, lora=None):
    """What torch.distributed.checkpoint (DCP) saves and loads: policy, reference and optimizer state dicts as each
    rank holds them (FSDP2: its DTensor shards; DDP or one process: whole tensors, written once), named by the
    model's own parameter names, so that a checkpoint written by N processes, with or without --fsdp, loads on M
    (DCP reshards). A LoRA run (lora: adapters.signature) keeps only the trainable adapters of the policy; its
    reference adapter travels in trainer.pt."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    o = StateDictOptions(ignore_frozen_params=lora is not None)
    state = {"policy": get_model_state_dict(policy, options=o),
             "optimizer": get_optimizer_state_dict(policy, opt, options=o)}
    if ref is not None and lora is None:
        state["reference"] = get_model_state_dict(ref)
    return state


@contextmanager
def one_process_quiet():
    """DCP warns on every save and load of one process ("assuming the intent is to ... in a single process"): it is
    the intent, so that warning is not the user's to read."""
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        yield


def save_checkpoint(output_dir, d: Dist, policy, ref, opt, sched, step, extra=None, record=None):
    """Write output_dir/checkpoint atomically: into checkpoint.tmp, with run.json (`record`, the step and every
    file's size) last, then swapped in (swap_in), so a crash mid-save leaves the previous checkpoint intact. The
    reference is part of a TR method's training state and is saved with the policy and optimizer as DCP shards
    (sharded_state: every rank writes its own, in parallel; no rank holds another's), and the small rest without
    pickled code: trainer.pt (LR schedule, step, `extra` counters; torch.load weights_only) and one rng_<rank>.pt
    per rank. SFT has no reference: ref=None. A LoRA run (--lora_r) saves its adapters, not the frozen base."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    final, tmp = (os.path.join(output_dir, n) for n in ("checkpoint", "checkpoint.tmp"))
    lora = adapters.signature(policy)
    if d.master:
        remove(tmp)
        os.makedirs(tmp)
    barrier()
    try:
        with one_process_quiet():
            dcp.save(sharded_state(policy, ref, opt, lora), checkpoint_id=tmp, no_dist=not dist.is_initialized())
    except CheckpointException as e:  # every rank gets every rank's failures: they all stop alike
        err = failure(e)  # a full disk: an OSError, or torch.save's RuntimeError inside DCP's writer (as in write)
        if isinstance(err, (OSError, RuntimeError)):  # the one line of any failed write (Run.writing)
            raise OSError(f"{tmp}: {first_line(err)}") if isinstance(err, RuntimeError) else err from None
        raise
    if d.master:
        write(os.path.join(tmp, "trainer.pt"), {"scheduler": sched.state_dict(), "step": step, "extra": extra or {},
                                                "lora": lora, "reference_adapters": ref.state_dict()
                                                if lora and ref is not None else None})
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    write(os.path.join(tmp, f"rng_{d.rank}.pt"), {"torch": torch.get_rng_state(), "python": random.getstate(),
                                                 "cuda": cuda})
    barrier()
    if d.master:
        files = {n: os.path.getsize(os.path.join(tmp, n)) for n in sorted(os.listdir(tmp))}
        with open(os.path.join(tmp, RECORD), "w") as f:  # last: a checkpoint folder with it is complete
            json.dump({**(record or {}), "step": step, "files": files}, f, indent=1)
        swap_in(final)
    barrier()


def failure(e):
    """The exception behind DCP's CheckpointException (which holds one per failed rank): the lowest rank's."""
    return e.failures[min(e.failures)][0]


def write(path, obj):
    """torch.save, with a failed write (a full disk) an OSError as from any other write: PyTorch's zip writer
    reports it as a RuntimeError ("PytorchStreamWriter failed writing file")."""
    try:
        torch.save(obj, path)
    except RuntimeError as e:
        raise OSError(f"{path}: {first_line(e)}") from None


def swap_in(path):
    """Replace the folder `path` by path.tmp, written whole beforehand: path -> path.old, path.tmp -> path, then
    path.old is removed. A kill between the two renames leaves path.old and path.tmp, both complete, which
    find_checkpoint looks at too."""
    old = path + ".old"
    remove(old)  # a kill after the last swap's second rename left it
    if os.path.lexists(path):  # a folder, or a link to one elsewhere: the link moves, its target stays
        os.replace(path, old)
    os.replace(path + ".tmp", path)
    remove(old)


def load_checkpoint(path, d: Dist, policy, ref, opt, sched):
    """Restore everything save_checkpoint wrote into the folder `path`: each rank reads the DCP shards it needs for
    its own part of the state (any world size, with or without --fsdp) and trainer.pt and its rng file, none of
    them unpickling code; returns (step, extra). The world may differ from the one that wrote it (DCP reshards, and
    the batch order is a function of --seed and the step): rank r restores rng_<r>.pt, and a rank the writing run
    did not have keeps its generators as launch seeded them (--seed + rank) and model loading left them; the other
    ranks' files stay unread. So with dropout (the only draw from these generators in a step) a resume on another
    world size draws other masks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    trainer = read(os.path.join(path, "trainer.pt"))
    lora = adapters.signature(policy)
    kind = lambda s: "full fine-tuning" if s is None else (  # noqa: E731
        f"LoRA r {s['r']}, lora_alpha {s['lora_alpha']} on {len(s['target_modules'])} modules")
    need(trainer.get("lora") == lora, f"--resume: {path} holds {kind(trainer.get('lora'))}, this run asks for "
                                      f"{kind(lora)}; resume with the run's own --lora_r, --lora_alpha, --lora_targets")
    check_metadata(path)
    state = sharded_state(policy, ref, opt, lora)
    try:
        with one_process_quiet():
            dcp.load(state, checkpoint_id=path, planner=weights_only_planner(), no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - a damaged shard, another model: it does not fit
        e = failure(e) if isinstance(e, CheckpointException) else e
        raise InputError(f"--resume: cannot load the weights of {path} ({type(e).__name__}: {first_line(e)}); "
                         f"resume with the run's own --model, or start a new run (--overwrite)") from None
    # a LoRA policy's state holds its adapters only (the frozen base is rebuilt from --model): not strict; dcp.load
    # already refused a checkpoint missing any of them
    o = StateDictOptions(ignore_frozen_params=lora is not None, strict=lora is None)
    set_model_state_dict(policy, state["policy"], options=o)
    set_optimizer_state_dict(policy, opt, state["optimizer"], options=o)
    if "reference" in state:
        set_model_state_dict(ref, state["reference"])
    elif ref is not None:
        ref.load_state_dict(trainer["reference_adapters"])
    sched.load_state_dict(trainer["scheduler"])
    if os.path.exists(os.path.join(path, f"rng_{d.rank}.pt")):
        rng = read(os.path.join(path, f"rng_{d.rank}.pt"))
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None:
            torch.cuda.set_rng_state_all(rng["cuda"])
    return trainer["step"], trainer["extra"]


def weights_only_planner():
    """DCP's default load planner, except that the plain values in the shards (the optimizer's hyperparameters) must
    load weights_only: DCP's own torch.load of them would unpickle anything."""
    import torch.distributed.checkpoint as dcp

    class WeightsOnly(dcp.DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            torch.load(value, weights_only=True)  # raises on anything but tensors and plain values
            value.seek(0)
            super().load_bytes(read_item, value)
    return WeightsOnly()


# what a DCP .metadata file may name besides the classes of torch.distributed.checkpoint.metadata and torch's dtypes
METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                    ("pathlib", "WindowsPath"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}


def check_metadata(path):
    """DCP reads a checkpoint's index, .metadata, with pickle, which runs whatever callable the file names: read it
    here first with only DCP's own metadata classes, torch sizes, dtypes and layouts, and paths allowed, so that a
    .metadata naming anything else is refused in one line, never run."""
    import pickle

    class Allowed(pickle.Unpickler):
        def find_class(self, module, name):
            value = getattr(sys.modules.get(module), name, None)
            if not ((module, name) in METADATA_GLOBALS or isinstance(value, torch.dtype) and module == "torch"
                    or module == "torch.distributed.checkpoint.metadata" and getattr(value, "__module__", "") == module
                    and isinstance(value, type)):
                raise pickle.UnpicklingError(f"it names {module}.{name}, not a part of a checkpoint's index")
            return super().find_class(module, name)
    try:
        with open(os.path.join(path, ".metadata"), "rb") as f:
            Allowed(f).load()
    except Exception as e:  # noqa: BLE001 - truncated, garbage, or code: the index is unusable
        raise InputError(f"--resume: cannot read {path}/.metadata ({first_line(e)}); start a new run (--overwrite)"
                         ) from None


def read(path):
    """torch.load of a checkpoint's small file, weights_only (tensors and plain values: loading runs no code); a file
    that does not load is one line naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, garbage, another format: the file is unusable
        raise InputError(f"--resume: cannot read {path} ({type(e).__name__}: {first_line(e)}); start a new run "
                         f"(--overwrite)") from None


SHARD = "5GB"  # the final folders' safetensors files hold at most this much; a larger model gets several and an index


def save_final(output_dir, d: Dist, policy, ref, tokenizer, merged=False, max_shard_size=SHARD):
    """policy/ and reference/ with save_pretrained (+ tokenizer), loadable with from_pretrained: safetensors files
    of at most max_shard_size, with model.safetensors.index.json when there are several. One model at a time: its
    full weights are gathered to rank 0's CPU (gathered_weights; under FSDP a collective, tensor by tensor), written and
    dropped before the next; the optimizer stays sharded. With ref=None (SFT) only policy/. Each is written whole
    into <name>.tmp/ first and swapped in after all are written: a failed save (a full disk) leaves the folders as
    they were and no .tmp behind. A LoRA run writes peft adapter folders instead, base/ for a model built in code,
    and policy_merged/ when `merged` (adapters.save_final, in place: its adapters name base/ by its final path).
    Returns the folders written."""
    from transformers.utils import logging as hf_logging
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar per folder after the run's own bar
    paths = []
    try:
        if adapters.has_adapters(policy):  # rank 0 alone: every rank holds the same adapters, no collective
            return adapters.save_final(output_dir, policy, ref, tokenizer, merged) if d.master else []
        for name, m in (("policy", policy), ("reference", ref)) if ref is not None else (("policy", policy),):
            weights = gathered_weights(m)
            if d.master:
                paths.append(os.path.join(output_dir, name))
                shutil.rmtree(paths[-1] + ".tmp", ignore_errors=True)
                m.save_pretrained(paths[-1] + ".tmp", state_dict=weights, max_shard_size=max_shard_size)
                tokenizer.save_pretrained(paths[-1] + ".tmp")
            del weights  # before the next model's are gathered
        for path in paths:
            swap_in(path)
        return ["policy/", "reference/"] if ref is not None else ["policy/"]
    except BaseException:
        for path in paths:
            shutil.rmtree(path + ".tmp", ignore_errors=True)
        raise
    finally:
        if bars:
            hf_logging.enable_progress_bar()

# -----------------------------------------------------------------------------
# what a checkpoint knows of its run, checked by --resume before any model or data is loaded

RECORD, FORMAT = "run.json", 2  # the record, written last into a checkpoint; its layout's version
RECORD_FIELDS = {"step": int, "world_size": int, "script": str, "flags": dict, "files": dict,  # what --resume reads
                 "data": (str, type(None))}
# the flags --resume may change: limits, remedies, intervals and parallelism; every other flag (and every flag a
# later version adds) must be the checkpoint's, so that a resumed run computes what the run it continues would have
CHANGEABLE = frozenset({"lr", "max_steps", "epochs", "max_grad_norm", "skip_nonfinite", "log_every", "eval_every",
                        "save_every", "micro_batch_size", "gradient_checkpointing", "fsdp", "dist_timeout", "threads",
                        "trust_remote_code", "save_merged", "output_dir", "resume", "overwrite",
                        "report_to", "run_name", "project"})  # the trackers: watching a run does not change it


def run_flags(args):
    """The flags as a checkpoint records them; an existing --model or --dataset path resolved, so that the same
    run resumes from another working directory."""
    out = {k: v for k, v in vars(args).items() if k != "script"}
    for k in ("model", "dataset"):
        if os.path.exists(out[k]):
            out[k] = os.path.realpath(out[k])
    return out


def run_record(args, world_size):
    """What save_checkpoint writes into run.json besides the step and the files."""
    return {"format": FORMAT, "script": args.script, "world_size": world_size, "flags": run_flags(args),
            "data": fingerprint(args.dataset)}


def complete(path):
    """(record, None) when the checkpoint folder `path` is complete: run.json of this format lists every file with
    the size it was written with; else (None, what is wrong)."""
    try:
        rec = jsonio.read(os.path.join(path, RECORD))
    except FileNotFoundError:
        return None, f"no {RECORD}"
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        return None, f"{RECORD} unreadable ({first_line(e)})"
    if isinstance(rec, dict) and rec.get("format") == 1:
        return None, ("one pickled state.pt, which --resume does not read (loading it could run code stored in it); "
                      "finish that run with the version of this code that wrote it")
    if not (isinstance(rec, dict) and rec.get("format") == FORMAT and all(
            isinstance(rec.get(k), kind) and not isinstance(rec.get(k), bool) for k, kind in RECORD_FIELDS.items())
            and all(isinstance(n, str) and type(size) is int for n, size in rec["files"].items())):
        return None, f"{RECORD} of another format"
    for name, size in rec["files"].items():
        f = os.path.join(path, name)
        if not os.path.isfile(f):
            return None, f"{name} is missing"
        if os.path.getsize(f) != size:
            return None, f"{name} has {os.path.getsize(f)} bytes, {size} were written"
    return rec, None


def find_checkpoint(output_dir):
    """(path, record) of the checkpoint --resume continues: the complete one with the latest step among
    checkpoint/, checkpoint.tmp/ and checkpoint.old/ (a save killed between its renames leaves the last two);
    InputError, saying what is wrong, when there is none."""
    found, problems = [], []
    for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old"):
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            rec, why = complete(path)
            found += [(rec["step"], -len(found), path, rec)] if rec else []
            problems += [] if rec else [f"{name}/: {why}"]
    if found:
        return max(found)[2:]
    legacy = os.path.join(output_dir, "checkpoint")
    need(not (os.path.isfile(os.path.join(legacy, "state.pt")) and not os.path.exists(os.path.join(legacy, RECORD))),
         f"--resume: {legacy} was written by an older version of this code, without the record of its run "
         f"({RECORD}) that --resume checks; start a new run (--overwrite), or finish it with the commit that wrote it")
    need(problems, f"--resume: no checkpoint in {output_dir}; drop --resume or point --output_dir at a run with "
                   f"--save_every")
    raise InputError(f"--resume: no complete checkpoint in {output_dir} ({'; '.join(problems)}); start a new run "
                     f"(--overwrite)")


def check_resume(args):
    """--resume, before any model or data is loaded: the checkpoint it would continue was written by this script,
    with these flags (but CHANGEABLE) and this data; else one line naming the first difference."""
    path, rec = find_checkpoint(args.output_dir)
    need(rec["script"] == args.script, f"--resume: {path} was written by {rec['script']}, not {args.script}; run "
                                       f"{rec['script']} to continue it, or start a new run (--overwrite)")
    now, data = run_flags(args), fingerprint(args.dataset)
    for k, v in rec["flags"].items():
        if k == "dataset" and data is not None and data == rec["data"]:
            continue  # the same bytes at another path (a folder moved, a link): Run.resume says so
        if k in now and k not in CHANGEABLE and now[k] != v:
            if isinstance(v, bool):
                how = f"{'with' if v else 'without'} --{k}; {'add' if v else 'drop'} it"
            else:
                how = f"with --{k} {v}, not {now[k]}; pass --{k} {v}"
            raise InputError(f"--resume: {path} was written {how} to continue that run, or start a new one "
                             f"(--overwrite, or another --output_dir)")
    need(data == rec["data"],
         f"--resume: --dataset {args.dataset} has changed since {path} was written; resume on the data it was "
         f"trained on, or start a new run (--overwrite)")
    return path, rec


def clear_run(output_dir):
    """--overwrite: remove what a run writes into output_dir (RUN_FILES), never the folder or anything else."""
    for name in RUN_FILES:
        remove(os.path.join(output_dir, name))


def remove(path):
    """Remove a file or folder; a symbolic link itself, never what it points to (a checkpoint folder moved to
    another disk and linked back, a dangling link), so that a rename into its place works."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


# -----------------------------------------------------------------------------
# faults: preemption, non-finite steps, lost ranks


class Preemption:
    """SIGTERM/SIGINT set a flag instead of killing the process; the loop asks stop_requested() at each step
    boundary, saves a checkpoint and exits with the shell's code for that signal (128 + its number: 143 for SIGTERM,
    130 for SIGINT), so that `train && next` does not go on after an interrupt; --resume continues to the same
    weights.

    Under torchrun the signal reaches each rank at a slightly different time, so the signal number is all-reduced
    (MAX): every rank stops after the same step. That is one tiny collective per step when distributed."""

    def __init__(self, d: Dist):
        self.d, self.signum = d, 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum

    def stop_requested(self):
        """The number of the signal that asked the run to stop, or 0."""
        if self.d.world_size == 1:
            return self.signum
        t = torch.tensor([float(self.signum)], device=self.d.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())


def check_finite(grad_norm, step, example_ids, skipped, allowed, last_checkpoint):
    """True when the step may be applied. A non-finite gradient norm (from a NaN/inf loss or gradient) is never
    applied: the step is skipped while fewer than `allowed` (--skip_nonfinite) were, else the run stops naming the
    step and the batch's example ids; the last checkpoint on disk was written before this step, so it is a good
    one (`last_checkpoint()` names it, or says there is none). With the clip norm finite and positive (its flag's
    type), the clipped gradient is finite exactly when this norm is: the check sees what the optimizer would apply.
    This .item() is the one host-device sync per step, the price of never training on NaN."""
    if math.isfinite(grad_norm.item()):
        return True
    if skipped < allowed:
        print(f"step {step}: non-finite gradient norm, step skipped ({skipped + 1}/{allowed} allowed); "
              f"example ids {example_ids}", file=sys.stderr)
        return False
    raise SystemExit(f"error: step {step}: non-finite loss or gradient (norm {grad_norm.item()}) on examples "
                     f"{example_ids}; nothing was applied. {last_checkpoint()}; lower --lr, fix those rows, or allow "
                     f"skips with --skip_nonfinite N.")


def nonfinite_weights(model):
    """How many of the model's weights are NaN or inf, summed over ranks (FSDP shards); save checks it, so that
    no checkpoint holds a non-finite policy."""
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    n = sum((~torch.isfinite(local(p).detach())).sum() for p in model.parameters())
    if dist.is_initialized():
        dist.all_reduce(n, op=dist.ReduceOp.SUM)
    return int(n.item())


HELD = []  # the lock files of the run this process is in; launch releases them when it ends


def take_folder(output_dir, d: Dist, recheck):
    """Make output_dir this run's before its first write: rank 0 creates it and takes an exclusive lock on
    output_dir/.lock (its pid inside), then calls recheck() under the lock (the checks made before it, for a run
    that ended meanwhile, and what --overwrite or --resume do to the folder); every rank learns the outcome. A
    second run into the folder is refused in one line while the first holds it; the kernel drops the lock when its
    holder exits, however it exits (SIGKILL included), so a lock is never stale."""
    import fcntl
    error = None
    barrier()  # every rank has read its checkpoint files before rank 0 may move them (recheck)
    if d.master:
        lock = os.path.join(output_dir, ".lock")
        try:
            os.makedirs(output_dir, exist_ok=True)
            # O_NOFOLLOW: a .lock that is a symbolic link fails (ELOOP) instead of getting the pid written through it
            f = os.fdopen(os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")
        except OSError as e:
            error = (f"{lock} is a symbolic link; remove it (a run writes its pid there)" if os.path.islink(lock)
                     else f"cannot write into --output_dir {output_dir} ({e.strerror or e})")
        else:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                error = (f"{output_dir} is in use by another run (pid {f.read().strip() or '?'}); wait for it to "
                         f"end, or choose another --output_dir")
                f.close()
            except OSError as e:  # a file system without locks (some NFS and Lustre mounts)
                print(f"warning: cannot lock {output_dir} ({e.strerror}): make sure no other run writes there")
            if error is None:
                HELD.append(f)
                f.seek(0)
                f.truncate()
                f.write(f"{os.getpid()}\n")
                f.flush()
                try:
                    recheck()
                except InputError as e:
                    error = str(e)
    if d.world_size > 1:  # every rank leaves together
        failed = torch.tensor([float(error is not None)], device=d.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        error = error or ("rank 0 could not take --output_dir (its message says why)" if failed.item() else None)
    need(error is None, error)


def release_folders():
    while HELD:
        HELD.pop().close()  # closing the file drops its lock


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

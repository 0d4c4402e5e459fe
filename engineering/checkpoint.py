"""
Checkpoints, the final save, and what a long run does when something goes wrong: preemption (SIGTERM/SIGINT), a
non-finite gradient, a lost rank.

None of this changes what a training step computes; it lets a run of hours or days stop and continue to the same
weights (bit for bit on CPU, tested). A reader learning the methods can skip this file; read it before running on a
cluster that preempts jobs, or when a run stopped with one of the errors below.
"""
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
from engineering import adapters
from engineering.cli import need

# -----------------------------------------------------------------------------
# checkpoints and final save


def full_state(model, opt=None, trainable_only=False):
    """Full (unsharded) state dicts of a model and its optimizer, gathered to the CPU. A collective under FSDP:
    every rank calls it; with FSDP only rank 0 receives the tensors. Parameter names are the model's own.
    trainable_only: without the frozen parameters (a LoRA policy's base, rebuilt from --model on resume)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    o = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized(), ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=o), (get_optimizer_state_dict(model, opt, options=o) if opt else None)


def save_checkpoint(output_dir, d: Dist, policy, ref, opt, sched, step, extra=None):
    """Write output_dir/checkpoint atomically: into checkpoint.tmp, then rename, so a crash mid-save leaves the
    previous checkpoint intact. The reference is part of a TR method's training state and is saved with the
    policy, optimizer, LR schedule, step, RNG states (one file per rank) and `extra` (counters). SFT has no
    reference: ref=None. A LoRA run (--lora_r) saves its adapters, not the frozen base (adapters.py)."""
    final, tmp = (os.path.join(output_dir, n) for n in ("checkpoint", "checkpoint.tmp"))
    lora = adapters.signature(policy)
    pol, optim = full_state(policy, opt, trainable_only=lora is not None)
    refw = None if ref is None else ref.state_dict() if lora else full_state(ref)[0]
    if d.master:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        torch.save({"policy": pol, "reference": refw, "optimizer": optim, "scheduler": sched.state_dict(),
                    "step": step, "extra": extra or {}, "lora": lora}, os.path.join(tmp, "state.pt"))
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


def load_checkpoint(output_dir, d: Dist, policy, ref, opt, sched):
    """Restore everything save_checkpoint wrote (every rank reads the files); returns (step, extra)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    path = os.path.join(output_dir, "checkpoint")
    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
    lora = adapters.signature(policy)
    kind = lambda s: "full fine-tuning" if s is None else (  # noqa: E731
        f"LoRA r {s['r']}, lora_alpha {s['lora_alpha']} on {len(s['target_modules'])} modules")
    need(state.get("lora") == lora, f"--resume: {path} holds {kind(state.get('lora'))}, this run asks for "
                                    f"{kind(lora)}; resume with the run's own --lora_r, --lora_alpha, --lora_targets")
    o = StateDictOptions(full_state_dict=True, ignore_frozen_params=lora is not None)
    set_model_state_dict(policy, state["policy"], options=o)
    if lora and ref is not None:
        ref.load_state_dict(state["reference"])
    elif ref is not None:
        set_model_state_dict(ref, state["reference"], options=o)
    set_optimizer_state_dict(policy, opt, state["optimizer"], options=o)
    sched.load_state_dict(state["scheduler"])
    rng = torch.load(os.path.join(path, f"rng_{d.rank}.pt"), weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state["step"], state["extra"]


def save_final(output_dir, d: Dist, policy, ref, tokenizer, merged=False):
    """policy/ and reference/ with save_pretrained (+ tokenizer), loadable with from_pretrained. Under FSDP the
    full weights are gathered to rank 0 first. With ref=None (SFT) only policy/. A LoRA run writes peft adapter
    folders instead, base/ for a model built in code, and policy_merged/ when `merged` (adapters.save_final).
    Returns the folders written."""
    from transformers.utils import logging as hf_logging
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar per folder after the run's own bar
    try:
        if adapters.has_adapters(policy):  # rank 0 alone: every rank holds the same adapters, no collective
            return adapters.save_final(output_dir, policy, ref, tokenizer, merged) if d.master else []
        for name, m in (("policy", policy), ("reference", ref)) if ref is not None else (("policy", policy),):
            weights, _ = full_state(m)
            if d.master:
                path = os.path.join(output_dir, name)
                m.save_pretrained(path, state_dict=weights)
                tokenizer.save_pretrained(path)
        return ["policy/", "reference/"] if ref is not None else ["policy/"]
    finally:
        if bars:
            hf_logging.enable_progress_bar()

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


def check_finite(grad_norm, step, example_ids, skipped, allowed, output_dir):
    """True when the step may be applied. A non-finite gradient norm (from a NaN/inf loss or gradient) is never
    applied: the step is skipped while fewer than `allowed` (--skip_nonfinite) were, else the run stops naming the
    step and the batch's example ids; the last checkpoint on disk was written before this step, so it is a good
    one. This .item() is the one host-device sync per step, the price of never training on NaN."""
    if math.isfinite(grad_norm.item()):
        return True
    if skipped < allowed:
        print(f"step {step}: non-finite gradient norm, step skipped ({skipped + 1}/{allowed} allowed); "
              f"example ids {example_ids}", file=sys.stderr)
        return False
    raise SystemExit(f"error: step {step}: non-finite loss or gradient (norm {grad_norm.item()}) on examples "
                     f"{example_ids}; nothing was applied. Resume from {output_dir}/checkpoint with a lower "
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

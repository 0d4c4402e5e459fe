"""
What a training script's main() and loop call around the step, so that the step itself is all the script shows:
launch() (flags, torch.distributed, the CPU thread count, the one-line exits) and Run, one run's bookkeeping:
its output folder (metrics.jsonl and the progress bar with the keys the script shows, checkpoint/ and --resume, the final policy/ and
reference/, curves.png), the gradient clip with its non-finite guard, and preemption.

Nothing here changes what a step computes. A reader learning the methods can skip this file; read it to change
what is logged or saved, or how a run stops and resumes.
"""
import os
import shutil
from contextlib import contextmanager

import torch

from common import cleanup_distributed, setup_distributed
from engineering import adapters
from engineering.checkpoint import (CHANGEABLE, Preemption, check_finite, check_resume, clear_run, exit_on_lost_rank,
                                    find_checkpoint, load_checkpoint, nonfinite_weights, release_folders, remove,
                                    run_flags, run_record, save_checkpoint, save_final, swap_in, take_folder)
from engineering.cli import InputError, check_args, check_paths, exit_on_bad_input, first_line, need
from engineering.curves import plot_curves
from engineering.logger import Logger, Trackers
from engineering.models import autocast_dtype

SMALL = 10_000_000  # parameters: on a CPU, such a model trains on one thread (--threads 0)


def launch(train_loop, get_args, argv=None):
    """Every training script's main(): parse and check the flags, start torch.distributed under torchrun (one
    process otherwise), seed rank r's torch RNG with --seed + r, run train_loop(args, d), tear down. A bad flag,
    file or row ends the run with one `error:` line and exit code 2; a lost rank with one line and exit code 1. The
    process's thread count (set by Run) is restored afterwards: tests and toy_experiment.py call main() in-process."""
    threads = torch.get_num_threads()
    with exit_on_bad_input():
        args = get_args(argv)
        d = setup_distributed(args.dist_timeout)
        check_args(args, d.world_size)
        adapters.check_args(args.lora_r, args.lora_alpha, args.lora_targets, args.base_dtype, args.save_merged,
                            args.fsdp, getattr(args, "ref_dtype", "float32"),
                            autocast_dtype(args.dtype, d.device) == torch.bfloat16)
        if args.resume:  # the checkpoint was written by this script, with these flags, on this data
            check_resume(args)
        torch.manual_seed(args.seed + d.rank)
        try:
            with exit_on_lost_rank(d):
                train_loop(args, d)
        except Stopped:
            cleanup_distributed()
            raise
        finally:
            torch.set_num_threads(threads)
            release_folders()  # the output folder's lock (Run took it): the next run in this process may take it
    cleanup_distributed()


class Run:
    """One run's folder and bookkeeping (rank 0 writes, every rank takes part in saves). With --resume it starts
    from checkpoint/: `start` is the number of optimizer steps already done. policy and ref: the script's networks
    (common.SequenceLogps); ref=None: SFT, no reference.

    Everything that can refuse the run is checked before its first write; then the run takes its folder (a lock:
    one run per folder), --overwrite clears the earlier run's files, and --resume moves the checkpoint it loaded
    into checkpoint/ when a save was killed before doing so."""

    def __init__(self, args, d, policy, ref, opt, sched, num_steps, show=()):
        # what checkpoints and the final folders hold: the Hugging Face models, under their own parameter names
        # (save_pretrained's), or a LoRA reference's adapter state (adapters.AdapterReference)
        model = policy.lm
        if ref is not None and not isinstance(ref, adapters.AdapterReference):
            ref = ref.lm
        self.args, self.d, self.model, self.ref, self.opt, self.sched = args, d, model, ref, opt, sched
        self.num_steps, self.out = num_steps, args.output_dir
        positions = getattr(model.config, "max_position_embeddings", None)  # learned positions end there (GPT-2's 1024)
        need(positions is None or args.max_length <= positions,
             f"--max_length {args.max_length} is beyond the {positions} positions --model {args.model} was built for "
             f"(max_position_embeddings); lower --max_length")
        small = d.device.type == "cpu" and sum(p.numel() for p in model.parameters()) < SMALL
        if args.threads or small:  # a small model's matrices are too small to split; a busy core would stall it
            torch.set_num_threads(args.threads or 1)
        # state: what checkpoints keep besides the weights; the reference updates are counted as they happen
        self.start, self.state = 0, {"skipped_steps": 0, "ref_updates": 0, "last_ref_update": 0}
        self.saved, self.record, loaded = None, None, None  # the step checkpoint/ holds; run.json's fields
        if args.resume:
            loaded = self.resume()
        take_folder(self.out, d, lambda: self.own_folder(loaded))
        # --report_to: the records go on to W&B / TensorBoard too; a resumed run continues its W&B run by its id
        trackers = Trackers(args.report_to, self.out, args.run_name, args.project, run_flags(args),
                            loaded[1].get("tracker_id") if loaded else None)
        self.logger, self.preemption = Logger(self.out, d.master, self.start, num_steps, trackers, show), Preemption(d)

    def resume(self):
        """Load the checkpoint (checked against the flags in launch); a new --lr takes effect from here, the
        schedule's factor at this step times the new peak. Returns (path, record)."""
        path, rec = find_checkpoint(self.out)
        need(self.num_steps >= rec["step"], f"--resume: {path} is at step {rec['step']}, beyond this run's "
                                            f"{self.num_steps} steps; raise --max_steps (or --epochs) to continue it")
        peaks = [g["initial_lr"] for g in self.opt.param_groups]  # this run's --lr
        self.start, loaded = load_checkpoint(path, self.d, self.model, self.ref, self.opt, self.sched)
        self.state.update(loaded)
        self.sched.base_lrs = peaks  # what LambdaLR multiplies by its factor at every step from here on
        for g, peak, factor in zip(self.opt.param_groups, peaks, self.sched.lr_lambdas):
            g["initial_lr"], g["lr"] = peak, peak * factor(self.sched.last_epoch)  # as LambdaLR.step sets it
        self.saved = self.start
        if self.d.master:
            was, now = rec["flags"], run_flags(self.args)
            changed = [f"--{k} {was[k]} -> {now[k]}" for k in sorted(CHANGEABLE - {"resume", "output_dir"})
                       if k in was and k in now and was[k] != now[k]]
            if was.get("dataset", now["dataset"]) != now["dataset"]:  # check_resume passed it: same bytes, new path
                changed.append(f"--dataset {was['dataset']} -> {now['dataset']} (the same data: its sha256 "
                               f"matches)")
            if rec["world_size"] != self.d.world_size:  # ranks the checkpoint has no RNG state of start theirs fresh
                changed.append(f"{rec['world_size']} -> {self.d.world_size} processes")
            print(f"resume: {path} at step {self.start}" + "".join(f"; {c}" for c in changed))
        return path, rec

    def own_folder(self, loaded):
        """Under the folder's lock (rank 0): the checks of check_paths again, for a run that ended while this one
        was loading; the checkpoint resumed is still the latest, and becomes checkpoint/ if it was not; or, with
        --overwrite, the earlier run's files are removed."""
        a = self.args
        check_paths(a.model, a.dataset, a.output_dir, a.resume, a.overwrite)
        if loaded:
            path, rec = find_checkpoint(self.out)
            need((path, rec["step"]) == (loaded[0], loaded[1]["step"]),
                 f"--resume: {path} changed while this run was starting (another run?); resume again")
            final = os.path.join(self.out, "checkpoint")
            if path.endswith(".tmp"):  # a save killed between its renames: finish the swap
                swap_in(final)
            elif path != final:  # checkpoint.old/: checkpoint/ is missing or incomplete (or a dangling link)
                remove(final)
                os.replace(path, final)
        if a.overwrite:
            clear_run(self.out)

    def initial(self, name, compute):
        """A value fixed at step 0 and kept in checkpoints (the initial reference's eval log-probs): compute() on a
        fresh start, read back on --resume."""
        if name not in self.state:
            if self.args.resume:
                self.logger.bar.leave = False  # the progress bar is erased: the error is the run's one line
                self.logger.close()
                raise InputError(f"{self.out}/checkpoint holds no {name} (it was written by an older version of "
                                 f"this code); start a fresh run without --resume, or use that version to finish it")
            self.state[name] = compute()
        return self.state[name].to(self.d.device)

    def clip_gradients(self, max_norm, step, example_ids, metrics):
        """Clip the global gradient norm to max_norm (under FSDP too) and log it (grad_norm); False when it is not
        finite: such a step is never applied. It is skipped while fewer than --skip_nonfinite were, else the run
        stops."""
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
        if check_finite(norm, step, example_ids, self.state["skipped_steps"], self.args.skip_nonfinite, self.kept):
            metrics.mean(grad_norm=norm)
            return True
        self.state["skipped_steps"] += 1
        return False

    def log_train(self, step, record, lr):
        """A train record from the interval's metrics, with tokens_per_s and s_per_step (from their `tokens` total
        and the wall time), the learning rate and, in a TR run, the reference updates so far and the steps since the
        last."""
        tokens_per_s, s_per_step = self.logger.rates(record["tokens"], step)
        record.update(tokens_per_s=tokens_per_s, s_per_step=s_per_step, lr=lr)
        if self.ref is not None:
            record.update(ref_updates=self.state["ref_updates"],
                          steps_since_ref_update=step - self.state["last_ref_update"])
        self.log_eval(step, record)

    def reference_updated(self, step, alpha):
        """Count a reference update made after optimizer step `step`, for the log (ref_updates,
        steps_since_ref_update) and the summary (checkpoints keep the count); a tracker gets it as an event."""
        self.logger.event(step, "ref_update", alpha)
        self.state["ref_updates"] += 1
        self.state["last_ref_update"] = step

    def log_eval(self, step, record):
        with self.writing(f"cannot append to {self.out}/metrics.jsonl at step {step}"):
            self.logger.log(step, record)

    @contextmanager
    def writing(self, what):
        """A write that fails (a full disk: OSError, or the SafetensorError of a safetensors save) ends the run in
        one line saying `what` failed, the OS's reason and the checkpoint that is intact (exit code 1: not a bad
        input), instead of a traceback."""
        from safetensors import SafetensorError
        try:
            yield
        except (OSError, SafetensorError) as e:
            self.logger.close()
            raise SystemExit(f"error: {what} ({first_line(e)}); {self.kept()}") from None

    def save(self, step):
        """checkpoint/, atomically: weights, optimizer, schedule, RNG states, self.state, and run.json, what --resume
        checks. A policy with a NaN or inf weight is never saved; a save that fails (a full disk) is one line and
        leaves no checkpoint.tmp/ behind."""
        self.check_finite_weights(f"step {step}", "no checkpoint is written")
        if self.d.master and self.record is None:  # rank 0 writes run.json; the data hashed once per run
            self.record = {**run_record(self.args, self.d.world_size), "tracker_id": self.logger.trackers.run_id}
        try:
            with self.writing(f"step {step}: cannot write the checkpoint"):
                save_checkpoint(self.out, self.d, self.model, self.ref, self.opt, self.sched, step, self.state,
                                self.record)
        except SystemExit:
            shutil.rmtree(os.path.join(self.out, "checkpoint.tmp"), ignore_errors=True)
            raise
        self.saved = step

    def check_finite_weights(self, when, what):
        """Stop in one line, naming the checkpoint to resume from, when the policy holds a NaN or inf weight: no
        checkpoint or final folder is ever written from it."""
        n = nonfinite_weights(self.model)
        if n:
            self.logger.close()
            raise SystemExit(f"error: {when}: the policy holds {n} non-finite weight(s), so {what}; {self.kept()}; "
                             f"lower --lr")

    def kept(self):
        """What a stop leaves to resume from, for its message."""
        if self.saved is None:
            return "no checkpoint was written (--save_every N writes one every N steps)"
        return f"{self.out}/checkpoint (step {self.saved}) is intact: --resume continues from it"

    def end_step(self, step):
        """The end of every step: the progress bar; after SIGTERM/SIGINT, checkpoint/ is written and the run ends
        with the shell's exit code for the signal (128 + its number: 143, 130)."""
        self.logger.bar.update(1)
        signum = 0 if step == self.num_steps else self.preemption.stop_requested()
        if signum:
            self.save(step)
            self.logger.close()
            print(f"stopped by a signal after step {step}; continue with --resume")
            raise Stopped(128 + signum)

    def finish(self, tokenizer, keys):
        """policy/ and reference/ (save_pretrained, with the tokenizer; peft adapter folders with --lora_r, and
        policy_merged/ with --save_merged), curves.png with a panel per key of `keys`, and the summary on stdout
        with their last train and eval values. A policy with a non-finite weight is not saved (the last
        checkpoint is named)."""
        self.logger.close()
        self.check_finite_weights(f"step {self.num_steps}", f"no {self.out}/policy is written")
        with self.writing(f"cannot write the final weights into {self.out}"):
            written = save_final(self.out, self.d, self.model, self.ref, tokenizer, self.args.save_merged)
            png = plot_curves(os.path.join(self.out, "metrics.jsonl"), panels=keys) if self.d.master else None  # None: no matplotlib
        tb = ("tensorboard/",) if "tensorboard" in self.args.report_to else ()
        self.logger.summary(keys, tuple(written) + ("metrics.jsonl",) + (("curves.png",) if png else ()) + tb)


class Stopped(SystemExit):
    """A run stopped by SIGTERM/SIGINT after its checkpoint was written; launch tears torch.distributed down, then
    the process exits with this code."""

"""
The Logger: one JSON line per log interval in output_dir/metrics.jsonl, the tqdm progress bar, and the summary a run
prints on stdout when it ends.

The scripts build the records (common.Metrics; engineering/run.py adds tokens/s, seconds per step, the learning rate
and the reference-update counters) and Logger.log writes them; count_tokens counts the tokens behind tokens/s. With
--report_to, Trackers sends the same records on to Weights & Biases and TensorBoard as they are written. A reader
needs this file to parse metrics.jsonl or to change what the bar, the summary or a tracker shows.
"""
import json
import os
import secrets
import shutil
import sys
import time

import torch

from engineering.cli import first_line
from engineering.curves import read_metrics


def count_tokens(examples, keys, device):
    """Prompt + response tokens of the sequences a micro-batch runs (one per example and key), for tokens/s: the
    same count whatever the layout (speed.collate_shared_prompt stores a prompt once; it counts once per response).
    A 0-dim tensor on `device`, copied without waiting, so that Metrics adds it without a host-device sync."""
    n = sum(len(e["prompt"]) + len(e[k]) for e in examples for k in keys)
    return torch.tensor(float(n)).to(device, non_blocking=True)


class Logger:
    """Writes metrics.jsonl in output_dir, updates the tqdm bar (the keys in `show`, the script's) and prints the
    summary; rank 0 only."""

    def __init__(self, output_dir, master, start_step, num_steps, trackers=None, show=()):
        from tqdm import tqdm
        self.master, self.output_dir, self.show = master, output_dir, show
        self.bar = tqdm(total=num_steps, initial=start_step, disable=not master, dynamic_ncols=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.latest, self.shown = {}, {}  # the last value of every key; of those the bar shows
        self.trackers, sent = trackers, 0  # sent: the last step the killed run logged (and sent to its trackers)
        if master and os.path.exists(self.path):  # a fresh run starts a new file; a resumed one keeps its past
            past = [r for r in read_metrics(self.path, skip_bad=True) if isinstance(r, dict)]  # a torn line is left out
            keep = [r for r in past if r.get("step", start_step + 1) <= start_step] if start_step else []
            sent = max((r["step"] for r in past if isinstance(r.get("step"), int)), default=0) if start_step else 0
            for r in keep:
                self.latest.update(r)
            with open(self.path + ".tmp", "w") as f:  # whole or not at all: a kill here keeps the old file
                f.writelines(json.dumps(r) + "\n" for r in keep)
            os.replace(self.path + ".tmp", self.path)
        self.t0 = self.started = time.time()
        self.last_step = start_step
        if master and trackers:
            trackers.start(start_step, sent)

    def log(self, step, record):
        """Append the record and send it to the trackers; the bar keeps showing the last value of each key of
        `show` ever logged."""
        if not self.master:
            return
        record = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.trackers:
            self.trackers.log(step, record)
        self.latest.update(record)
        self.shown.update({k: record[k] for k in self.show if k in record})
        self.bar.set_postfix({k: f"{v:.3f}" if isinstance(v, float) else v for k, v in self.shown.items()})

    def rates(self, tokens, step):
        """(tokens per second, seconds per optimizer step) since the last call: global token count, wall time."""
        now = time.time()
        elapsed, steps = max(now - self.t0, 1e-9), max(step - self.last_step, 1)
        self.t0, self.last_step = now, step
        return tokens / elapsed, elapsed / steps

    def event(self, step, name, value):
        """A mark at `step` for the trackers only (a reference update); metrics.jsonl counts them in its records."""
        if self.master and self.trackers:
            self.trackers.log(step, {f"events/{name}": value})

    def close(self):
        self.bar.close()
        if self.master and self.trackers:
            self.trackers.close()

    def summary(self, keys, written):
        """The end of a run on stdout: steps, wall time and reference updates; the last train, eval and eval_init_
        (against the initial reference) values of `keys`; the files in output_dir named by `written`."""
        if not self.master:
            return
        last = self.latest
        head = f"done: step {last.get('step', 0)}, {time.time() - self.started:.0f} s"
        if "ref_updates" in last:
            head += f", {last['ref_updates']} reference update(s)"
            if last["ref_updates"]:
                head += f", the last after step {last['step'] - last['steps_since_ref_update']}"
        lines = [head]
        for label, prefix in (("train (last log interval)", ""), ("eval", "eval_"),
                              ("eval vs initial reference", "eval_init_")):
            values = [f"{k} {last[prefix + k]:.4g}" for k in keys if prefix + k in last]
            if values:
                lines.append(f"{label}: {', '.join(values)}")
        lines.append("wrote " + ", ".join(os.path.join(self.output_dir, name) for name in written))
        print("\n".join(lines))

# -----------------------------------------------------------------------------
# trackers: --report_to wandb, tensorboard


def tag(key):
    """A metrics.jsonl key as a tracker's tag, grouped as the UIs group panels: loss -> train/loss, eval_loss ->
    eval/loss, eval_init_loss -> eval_init/loss; a tag that holds a '/' already is kept."""
    for prefix in ("eval_init_", "eval_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix):]}"
    return key if "/" in key else f"train/{key}"


class Trackers:
    """The records of metrics.jsonl, sent live to Weights & Biases and/or TensorBoard (--report_to), rank 0 only;
    the run's flags are the tracker's config. metrics.jsonl stays the record: a tracker that fails (network, disk)
    warns once and is dropped, and the run goes on.

    TensorBoard writes into output_dir/tensorboard (`tensorboard --logdir out/tr_dpo/tensorboard`). W&B writes its
    run folder where W&B does (./wandb, or $WANDB_DIR; WANDB_MODE=offline: `wandb sync` later). --resume continues
    the same tracker run without a doubled step: TensorBoard purges the steps after the checkpoint's (purge_step),
    which the run logs again, as metrics.jsonl does; W&B cannot rewrite a step, so its run, resumed by the id kept
    in checkpoint/run.json (resume="allow"), receives only the steps after the last it was sent."""

    def __init__(self, names, output_dir, run_name, project, config, run_id=None):
        self.names, self.output_dir, self.config = list(names), output_dir, config
        self.run_name, self.project = run_name or os.path.basename(os.path.abspath(output_dir)), project
        self.run_id = run_id or secrets.token_hex(6)  # checkpoint/run.json keeps it: --resume finds the W&B run
        self.live, self.sent = {}, 0

    def __bool__(self):
        return bool(self.names)

    def start(self, start_step=0, sent=0):
        """Open each tracker; start_step: the checkpoint's step on --resume (0: a fresh run); sent: the last step
        the run resumed logged, which W&B holds already."""
        self.sent = sent
        for name, start in (("wandb", self.start_wandb), ("tensorboard", lambda: self.start_tensorboard(start_step))):
            tracker = self.attempt(name, start) if name in self.names else None
            if tracker is not None:
                self.live[name] = tracker

    def start_wandb(self):
        import wandb
        return wandb.init(project=self.project, name=self.run_name, id=self.run_id, resume="allow",
                          config=self.config)

    def start_tensorboard(self, start_step):
        from torch.utils.tensorboard import SummaryWriter
        folder = os.path.join(self.output_dir, "tensorboard")
        if not start_step:  # a fresh run starts a fresh folder, as it does metrics.jsonl
            shutil.rmtree(folder, ignore_errors=True)
        writer = SummaryWriter(folder, purge_step=start_step + 1 if start_step else None)
        writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in sorted(self.config.items())), start_step)
        return writer

    def log(self, step, record):
        """The record's numbers (not its step) at `step`, each under tag(key)."""
        scalars = {tag(k): v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if "wandb" in self.live and step > self.sent:
            self.attempt("wandb", lambda: self.live["wandb"].log(scalars, step=step))
        if "tensorboard" in self.live:
            self.attempt("tensorboard", lambda: [self.live["tensorboard"].add_scalar(k, v, step)
                                                 for k, v in scalars.items()])

    def summary(self, values):
        """Final values (evaluate.py's report): W&B's run summary; TensorBoard scalars at step 0."""
        if "wandb" in self.live:
            self.attempt("wandb", lambda: self.live["wandb"].summary.update(values))
        if "tensorboard" in self.live:
            self.attempt("tensorboard", lambda: [self.live["tensorboard"].add_scalar(k, v, 0)
                                                 for k, v in values.items()])

    def close(self):
        if "wandb" in self.live:
            self.attempt("wandb", lambda: self.live["wandb"].finish())
        if "tensorboard" in self.live:
            self.attempt("tensorboard", lambda: self.live["tensorboard"].close())
        self.live = {}

    def attempt(self, name, call):
        """call() and its result; on an exception one warning, the tracker is dropped, and None."""
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - a network, disk or service failure must not end a run of hours
            self.live.pop(name, None)
            print(f"warning: --report_to {name} failed ({type(e).__name__}: {first_line(e)}); it is off for the rest "
                  f"of the run, metrics.jsonl stays the record", file=sys.stderr)
            return None


def report_summary(names, output_dir, run_name, project, config, report):
    """evaluate.py's report sent once to the trackers of --report_to: its flags as config, and every number of
    `report` ({model: row}, nested dicts) as a summary value named by its path: policy/win_rate/rate, ..."""
    def numbers(d, path):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from numbers(v, f"{path}{k}/")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                yield f"{path}{k}", v
    trackers = Trackers(names, output_dir, run_name, project, config)
    if trackers:
        trackers.start()
        trackers.summary(dict(numbers(report, "")))
        trackers.close()

"""
The Logger: one JSON line per log interval in output_dir/metrics.jsonl, the tqdm progress bar, and the summary a run
prints on stdout when it ends.

The scripts build the records (common.Metrics; engineering/run.py adds tokens/s, seconds per step, the learning rate
and the reference-update counters) and Logger.log writes them; count_tokens counts the tokens behind tokens/s. A
reader needs this file to parse metrics.jsonl or to change what the bar or the summary shows.
"""
import json
import os
import time

import torch

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

    def __init__(self, output_dir, master, start_step, num_steps, show=()):
        from tqdm import tqdm
        self.master, self.output_dir, self.show = master, output_dir, show
        self.bar = tqdm(total=num_steps, initial=start_step, disable=not master, dynamic_ncols=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.latest, self.shown = {}, {}  # the last value of every key; of those the bar shows
        if master and os.path.exists(self.path):  # a fresh run starts a new file; a resumed one keeps its past
            keep = [r for r in read_metrics(self.path, skip_bad=True)  # a line torn by a kill is left out
                    if isinstance(r, dict) and r.get("step", start_step + 1) <= start_step] if start_step else []
            for r in keep:
                self.latest.update(r)
            with open(self.path + ".tmp", "w") as f:  # whole or not at all: a kill here keeps the old file
                f.writelines(json.dumps(r) + "\n" for r in keep)
            os.replace(self.path + ".tmp", self.path)
        self.t0 = self.started = time.time()
        self.last_step = start_step

    def log(self, step, record):
        """Append the record; the bar keeps showing the last value of each key of `show` ever logged."""
        if not self.master:
            return
        record = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.latest.update(record)
        self.shown.update({k: record[k] for k in self.show if k in record})
        self.bar.set_postfix({k: f"{v:.3f}" if isinstance(v, float) else v for k, v in self.shown.items()})

    def rates(self, tokens, step):
        """(tokens per second, seconds per optimizer step) since the last call: global token count, wall time."""
        now = time.time()
        elapsed, steps = max(now - self.t0, 1e-9), max(step - self.last_step, 1)
        self.t0, self.last_step = now, step
        return tokens / elapsed, elapsed / steps

    def close(self):
        self.bar.close()

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

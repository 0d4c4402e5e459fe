"""
The Logger: one JSON line per log interval in output_dir/metrics.jsonl, and the tqdm progress bar.

The scripts build the record (common.Metrics means, tokens/s, learning rate, reference-update counters) and hand it
to Logger.log; this file only writes it. A reader needs it to parse metrics.jsonl or change what the bar shows.
"""
import json
import os
import time


class Logger:
    """Writes metrics.jsonl in output_dir and updates the tqdm bar; rank 0 only."""

    def __init__(self, output_dir, master, start_step, num_steps):
        from tqdm import tqdm
        self.master = master
        self.bar = tqdm(total=num_steps, initial=start_step, disable=not master, dynamic_ncols=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if master and os.path.exists(self.path):  # a fresh run starts a new file; a resumed one keeps its past
            keep = [line for line in open(self.path) if start_step and json.loads(line)["step"] <= start_step]
            with open(self.path, "w") as f:
                f.writelines(keep)
        self.t0 = time.time()

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

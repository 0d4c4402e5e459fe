"""
Training curves: a PNG of a run's metrics.jsonl, with the reference updates marked.

    python -m engineering.curves out/tr_dpo/metrics.jsonl     # writes out/tr_dpo/curves.png
    python -m engineering.curves out/tr_dpo/metrics.jsonl -o dpo.png

and plot_curves(metrics_path, panels=...) at the end of a run, with the panels its script names (run.finish). One
panel per metric, over optimizer steps, each with up to three lines:
- train: the record written every --log_every steps (means over that interval);
- eval: the held-out records, their rewards measured against the reference AS IT IS at that step. Under a moving
  reference these fall back towards 0 (the loss towards its starting value) after every update, the saw-tooth the
  grey lines at the updates make visible, and cannot be compared over time;
- eval vs initial reference: keys "eval_init_<name>" (eval_init_loss, eval_init_reward_accuracy,
  eval_init_reward_margin), the same eval rows against the initial reference, which can. logps_margin involves no
  reference, so it has no such twin.
The update steps come from the train records' ref_updates and steps_since_ref_update (reference_updates()).

matplotlib is optional: without it plot_curves prints one line saying how to get the plot and returns None.
"""
import argparse
import os
import sys

from engineering import jsonio

KINDS = {"train": "train", "eval": "eval", "eval_init": "eval vs initial reference"}

# -----------------------------------------------------------------------------
# from records to series (pure: test_curves.py feeds literal records)


def read_metrics(path, skip_bad=False):
    """The records of a metrics.jsonl, in file order. A line that is not JSON raises ValueError naming it, or with
    skip_bad is left out (a line torn by a kill mid-write: --resume trims the file with this)."""
    records = []
    with open(path, encoding="utf-8", errors="replace" if skip_bad else "strict") as f:
        text = f.read()
    for n, line in jsonio.lines(text):
        try:
            records.append(jsonio.parse(line))
        except ValueError as e:
            if not skip_bad:
                raise ValueError(f"{path}: line {n}: {e}") from None
    return records


def evaluated(records):
    """The metrics that have an eval twin (<name> and eval_<name>), in the order the records first show them: the
    panels when none are named (the command line without --panels)."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    return [k for k in keys if not k.startswith("eval_") and "eval_" + k in keys]


def series(records, names):
    """{name: {kind: (steps, values)}} for each name in `names` that the records hold, in that order; kind is
    "train" (key <name>), "eval" (eval_<name>) or "eval_init" (eval_init_<name>), present kinds only."""
    out = {name: {} for name in names}
    for r in records:
        for key, value in r.items():
            if key.startswith("eval_init_"):
                kind, name = "eval_init", key[len("eval_init_"):]
            elif key.startswith("eval_"):
                kind, name = "eval", key[len("eval_"):]
            else:
                kind, name = "train", key
            if name in out:
                steps, values = out[name].setdefault(kind, ([], []))
                steps.append(r["step"])
                values.append(value)
    return {name: kinds for name, kinds in out.items() if kinds}


def reference_updates(records):
    """The optimizer steps after which the reference was updated, in order. A train record at step s with
    ref_updates = n and steps_since_ref_update = d says that update n came after step s - d. Updates between two
    that the records show (several in one --log_every interval, tau < log_every) are spread evenly between them,
    as the schedule updates every tau steps."""
    steps, n0, s0 = [], 0, 0
    for r in records:
        if r.get("ref_updates", 0) > n0:
            n, s = r["ref_updates"], r["step"] - r["steps_since_ref_update"]
            steps += [s0 + (s - s0) * (k - n0) // (n - n0) for k in range(n0 + 1, n + 1)]
            n0, s0 = n, s
    return steps


def title(metrics_path, records):
    """The figure's title: the file, and the number of reference updates where the run has a reference (its train
    records log ref_updates; SFT's do not)."""
    if not any("ref_updates" in r for r in records):
        return metrics_path
    return f"{metrics_path}: {len(reference_updates(records))} reference update(s)"

# -----------------------------------------------------------------------------
# the figure


def plot_curves(metrics_path, png_path=None, panels=None):
    """Write the curves of metrics_path to png_path (default: curves.png beside it), one panel per name in `panels`
    (the script's; None: evaluated(records)); return its path, or None when matplotlib is not installed (one line
    printed). A file that cannot be read, holds a line that is not JSON or none of the panels raises OSError or
    ValueError, checked before matplotlib is looked for."""
    png_path = png_path or os.path.join(os.path.dirname(metrics_path), "curves.png")
    records = read_metrics(metrics_path)
    panels = evaluated(records) if panels is None else panels
    curves, updates = series(records, panels), reference_updates(records)
    if not curves:
        raise ValueError(f"{metrics_path}: none of {', '.join(panels) or 'the evaluated metrics'} is logged: "
                         f"nothing to plot")
    try:
        from matplotlib.figure import Figure  # no pyplot: no backend or global figure state to manage
    except ImportError:
        print(f"matplotlib is not installed: no {png_path} "
              f"(pip install matplotlib, then python -m engineering.curves {metrics_path})")
        return None
    cols = min(2, len(curves))
    rows = (len(curves) + cols - 1) // cols
    fig = Figure(figsize=(5.5 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    style = {"train": dict(color="C0", linewidth=1),
             "eval": dict(color="C1", marker="o", markersize=3),
             "eval_init": dict(color="C2", marker="s", markersize=3, linestyle="--")}
    for ax, (name, kinds) in zip(axes, curves.items()):
        for kind in KINDS:
            if kind in kinds:
                ax.plot(*kinds[kind], label=KINDS[kind], **style[kind])
        if updates:  # one collection for all of them: with tau = 1 there is a line per step
            ax.vlines(updates, 0, 1, transform=ax.get_xaxis_transform(), colors="grey", linestyles=":",
                      linewidth=0.8, label="reference update")
        ax.set(title=name, xlabel="optimizer step")
        ax.grid(alpha=0.3)
    for ax in axes[len(curves):]:
        ax.set_visible(False)
    handles = {label: h for ax in axes[:len(curves)] for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=len(handles), fontsize="small")
    fig.suptitle(title(metrics_path, records), fontsize="medium")
    fig.savefig(png_path + ".tmp", dpi=100, format="png")
    os.replace(png_path + ".tmp", png_path)  # whole or not at all, like the run's other outputs
    return png_path


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", help="a run's metrics.jsonl")
    p.add_argument("-o", "--output", help="the PNG to write (default: curves.png beside the metrics file)")
    p.add_argument("--panels", help="comma list of metrics to plot (default: every metric with an eval_ twin)")
    args = p.parse_args()
    try:
        path = plot_curves(args.metrics, args.output, args.panels.split(",") if args.panels else None)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if path is None:
        sys.exit(1)
    print(f"wrote {path}")

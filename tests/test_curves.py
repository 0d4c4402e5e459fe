"""curves.py, pinned: literal metrics records in, literal series and reference-update steps out; the PNG, the
line printed without matplotlib, the command line's errors, and the PNG at the end of a run."""
import importlib
import json
import subprocess
import sys

import pytest

from conftest import FAST, ROOT
from engineering import curves
from engineering.curves import evaluated, plot_curves, read_metrics, reference_updates, series, title

# the records Logger writes for a DPO run with --log_every 50 --eval_every 100 --tau 100 (values made up), the
# eval records also against the initial reference (eval_init_*)
DPO = [
    {"step": 50, "loss": 0.68, "reward_accuracy": 0.6, "reward_margin": 0.02, "logps_margin": -1.5, "grad_norm": 0.4,
     "n": 800.0, "tokens_per_s": 9000.0, "lr": 0.001, "ref_updates": 0, "steps_since_ref_update": 50},
    {"step": 100, "loss": 0.64, "reward_accuracy": 0.75, "reward_margin": 0.1, "logps_margin": -0.5, "grad_norm": 0.5,
     "n": 800.0, "tokens_per_s": 9100.0, "lr": 0.001, "ref_updates": 1, "steps_since_ref_update": 0},
    {"step": 100, "eval_loss": 0.6931, "eval_reward_accuracy": 0.0, "eval_reward_margin": 0.0, "eval_logps_margin": -0.4,
     "eval_init_loss": 0.63, "eval_init_reward_accuracy": 0.8, "eval_init_reward_margin": 0.12, "eval_n": 64.0},
    {"step": 150, "loss": 0.67, "reward_accuracy": 0.65, "reward_margin": 0.03, "logps_margin": 0.2, "grad_norm": 0.4,
     "n": 800.0, "tokens_per_s": 9050.0, "lr": 0.001, "ref_updates": 1, "steps_since_ref_update": 50},
    {"step": 200, "loss": 0.62, "reward_accuracy": 0.8, "reward_margin": 0.15, "logps_margin": 0.9, "grad_norm": 0.6,
     "n": 800.0, "tokens_per_s": 9000.0, "lr": 0.001, "ref_updates": 2, "steps_since_ref_update": 0},
    {"step": 200, "eval_loss": 0.6931, "eval_reward_accuracy": 0.0, "eval_reward_margin": 0.0, "eval_logps_margin": 1.0,
     "eval_init_loss": 0.58, "eval_init_reward_accuracy": 0.85, "eval_init_reward_margin": 0.2, "eval_n": 64.0},
]


DPO_PANELS = ("loss", "reward_accuracy", "reward_margin", "logps_margin")


def test_series_dpo():
    assert series(DPO, DPO_PANELS) == {
        "loss": {"train": ([50, 100, 150, 200], [0.68, 0.64, 0.67, 0.62]), "eval": ([100, 200], [0.6931, 0.6931]),
                 "eval_init": ([100, 200], [0.63, 0.58])},
        "reward_accuracy": {"train": ([50, 100, 150, 200], [0.6, 0.75, 0.65, 0.8]), "eval": ([100, 200], [0.0, 0.0]),
                            "eval_init": ([100, 200], [0.8, 0.85])},
        "reward_margin": {"train": ([50, 100, 150, 200], [0.02, 0.1, 0.03, 0.15]), "eval": ([100, 200], [0.0, 0.0]),
                          "eval_init": ([100, 200], [0.12, 0.2])},
        "logps_margin": {"train": ([50, 100, 150, 200], [-1.5, -0.5, 0.2, 0.9]), "eval": ([100, 200], [-0.4, 1.0])},
    }
    assert list(series(DPO, DPO_PANELS[::-1])) == list(DPO_PANELS[::-1])  # the panels in the order given
    assert evaluated(DPO) == [*DPO_PANELS, "n"]  # without panels: the metrics that have an eval_ twin


def test_series_kto_has_its_own_metrics():
    kto = [{"step": 10, "loss": 0.5, "kl": 0.0, "desirable_reward": 0.01, "undesirable_reward": -0.01,
            "reward_margin": 0.02, "logps_margin": -0.9, "n_desirable": 66.0, "ref_updates": 0,
            "steps_since_ref_update": 10},
           {"step": 10, "eval_loss": 0.49, "eval_kl": 0.1, "eval_reward_margin": 0.03, "eval_logps_margin": -0.8}]
    assert series(kto, ("loss", "reward_margin", "logps_margin", "kl", "reward_accuracy")) == {"loss": {"train": ([10], [0.5]), "eval": ([10], [0.49])},
                           "reward_margin": {"train": ([10], [0.02]), "eval": ([10], [0.03])},
                           "logps_margin": {"train": ([10], [-0.9]), "eval": ([10], [-0.8])},
                           "kl": {"train": ([10], [0.0]), "eval": ([10], [0.1])}}


def test_reference_updates():
    assert reference_updates(DPO) == [100, 200]
    # tau 3, --log_every 10: the records see updates 3 (after step 9) and 6 (after step 18); the rest lie between
    assert reference_updates([{"step": 10, "ref_updates": 3, "steps_since_ref_update": 1},
                              {"step": 20, "ref_updates": 6, "steps_since_ref_update": 2}]) == [3, 6, 9, 12, 15, 18]
    # tau 1 (the paper's soft setting): every step
    assert reference_updates([{"step": 4, "ref_updates": 4, "steps_since_ref_update": 0}]) == [1, 2, 3, 4]
    # --ref_update none, and SFT (no reference)
    assert reference_updates([{"step": 50, "ref_updates": 0, "steps_since_ref_update": 50}]) == []
    assert reference_updates([{"step": 50, "loss": 2.0}, {"step": 50, "eval_loss": 2.1}]) == []


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_title_counts_updates_only_where_there_is_a_reference():
    assert title("out/tr_dpo/metrics.jsonl", DPO) == "out/tr_dpo/metrics.jsonl: 2 reference update(s)"
    frozen = [dict(r, ref_updates=0) if "loss" in r else r for r in DPO]  # --ref_update none: a reference, no update
    assert title("m.jsonl", frozen) == "m.jsonl: 0 reference update(s)"
    sft = [{k: v for k, v in r.items() if k not in ("ref_updates", "steps_since_ref_update")} for r in DPO]
    assert title("out/sft/metrics.jsonl", sft) == "out/sft/metrics.jsonl"


def test_read_metrics_names_a_bad_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(DPO[0]) + "\n\n" + '{"step": 100, "loss"\n')
    with pytest.raises(ValueError) as e:
        read_metrics(str(path))
    assert str(e.value) == f"{path}: line 3: not valid JSON (Expecting ':' delimiter)"


def test_plot_writes_png(tmp_path, capsys):
    metrics = write(tmp_path / "metrics.jsonl", DPO)
    try:
        import matplotlib  # noqa: F401 - optional, not in requirements.txt
    except ImportError:  # CI's environment: the message instead (test_no_matplotlib_message pins it)
        assert plot_curves(metrics) is None and "matplotlib is not installed" in capsys.readouterr().out
        return
    assert plot_curves(metrics) == str(tmp_path / "curves.png")
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert plot_curves(metrics, str(tmp_path / "other.png")) == str(tmp_path / "other.png")
    assert capsys.readouterr().out == ""  # the caller reports where it went


def test_no_matplotlib_message(tmp_path, monkeypatch, capsys):
    metrics = write(tmp_path / "metrics.jsonl", DPO)
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if it were not installed
    assert plot_curves(metrics) is None
    assert capsys.readouterr().out == (f"matplotlib is not installed: no {tmp_path}/curves.png "
                                       f"(pip install matplotlib, then python -m engineering.curves {metrics})\n")
    assert not (tmp_path / "curves.png").exists()


def test_command_line(tmp_path):
    metrics, png = write(tmp_path / "metrics.jsonl", DPO), str(tmp_path / "out.png")
    r = subprocess.run([sys.executable, "-m", "engineering.curves", metrics, "-o", png], cwd=ROOT,
                       capture_output=True, text=True)  # the command its docstring gives
    try:
        import matplotlib  # noqa: F401 - optional, not in requirements.txt
    except ImportError:
        assert r.returncode == 1 and r.stdout.startswith("matplotlib is not installed")
    else:
        assert (r.returncode, r.stdout, r.stderr) == (0, f"wrote {png}\n", "")
    # bad input: one line on stderr, exit code 2
    nothing = write(tmp_path / "nothing.jsonl", [{"step": 10, "grad_norm": 1.0, "lr": 0.001}])
    missing = str(tmp_path / "missing.jsonl")
    for path, message in ((nothing, f"error: {nothing}: none of the evaluated metrics is logged: nothing to plot"),
                          (missing, f"error: [Errno 2] No such file or directory: '{missing}'")):
        r = subprocess.run([sys.executable, "-m", "engineering.curves", path], cwd=ROOT, capture_output=True, text=True)
        assert (r.returncode, r.stdout, r.stderr) == (2, "", message + "\n")

# -----------------------------------------------------------------------------
# the end of a run: curves.png beside metrics.jsonl, named in the summary; the scripts' metric names are curves.py's


@pytest.mark.slow
@pytest.mark.parametrize("script", ["tr_dpo", "tr_kto"])
def test_a_run_ends_with_its_curves(tmp_path, capfd, script):
    pytest.importorskip("matplotlib")
    out = str(tmp_path)
    module = importlib.import_module(script)
    module.main(FAST + ["--max_steps", "4", "--tau", "2", "--eval_every", "2", "--output_dir", out])
    assert capfd.readouterr().out.splitlines()[-1] == (f"wrote {out}/policy/, {out}/reference/, {out}/metrics.jsonl, "
                                                       f"{out}/curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    # every panel the script plots has its train and eval lines, and eval vs the initial reference where the metric
    # involves a reference (logps_margin does not)
    kinds = {name: sorted(k) for name, k in series(records, module.PLOT).items()}
    assert kinds == {name: ["eval", "train"] if name == "logps_margin" else ["eval", "eval_init", "train"]
                     for name in module.PLOT}
    assert reference_updates(records) == [2, 4]

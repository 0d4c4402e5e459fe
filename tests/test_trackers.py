"""--report_to: the records of metrics.jsonl sent to TensorBoard and Weights & Biases, read back offline: TensorBoard's
event files with its own EventAccumulator, W&B's offline run file with its protobuf records. A resumed run doubles
no step; a missing package is one line; a failing tracker warns once."""
import glob
import json
import os

import numpy as np
import pytest

import evaluate as ev
import sft
import tr_dpo
import tr_kto
from conftest import FAST, metrics
from engineering.logger import Trackers, tag

slow = pytest.mark.slow
# a checkpoint after step 3 of 5, a soft reference update every 2 steps, an evaluation every 2 steps
FLAGS = FAST + ["--max_steps", "5", "--save_every", "3", "--tau", "2", "--eval_every", "2"]


def scalars(folder):
    """{tag: {step: value}} of the TensorBoard event files in `folder`, as TensorBoard reads them (purges applied),
    and the tags of its text summaries; a step seen twice fails."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(folder, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    out = {}
    for t in acc.Tags()["scalars"]:
        steps = [e.step for e in acc.Scalars(t)]
        assert len(steps) == len(set(steps)), (t, steps)
        out[t] = {e.step: e.value for e in acc.Scalars(t)}
    return out, acc.Tags()["tensors"]


def expected(out):
    """{tag: {step: value}} that metrics.jsonl's records must give, as float32 (what TensorBoard stores)."""
    want = {}
    for r in metrics(out):
        for k, v in r.items():
            if k != "step":
                want.setdefault(tag(k), {})[r["step"]] = np.float32(v)
    return want


# -----------------------------------------------------------------------------
# the flag and its one-line errors


def test_report_to_takes_a_list_a_comma_list_or_none():
    parse = lambda *flags: tr_dpo.get_args(list(flags)).report_to  # noqa: E731
    assert parse() == [] and parse("--report_to", "none") == []
    assert parse("--report_to", "wandb,tensorboard") == parse("--report_to", "wandb", "tensorboard") == [
        "wandb", "tensorboard"]
    assert parse("--report_to", "tensorboard", "tensorboard,none") == ["tensorboard"]


@pytest.mark.parametrize("flags, message", [
    (["--report_to", "mlflow"], "error: argument --report_to: unknown tracker 'mlflow': choose none, wandb, "
                                "tensorboard (--help lists the flags)"),
    (["--report_to", "wandb"], "error: --report_to wandb needs the wandb package (import of wandb halted; None in "
                               "sys.modules): pip install wandb"),
    (["--report_to", "none", "tensorboard"], "error: --report_to tensorboard needs the tensorboard package (import of "
                                             "tensorboard halted; None in sys.modules): pip install tensorboard")])
def test_a_bad_or_missing_tracker_is_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys, flags,
                                                                         message):
    for name in ("wandb", "tensorboard"):  # as if neither were installed: an import of a name mapped to None fails
        monkeypatch.setitem(__import__("sys").modules, name, None)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        tr_dpo.main(FAST + ["--max_steps", "1", "--output_dir", str(out), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [message] and not out.exists()


def test_a_tracker_that_fails_warns_once_and_is_dropped(tmp_path, capsys):
    class Full:  # a TensorBoard writer on a full disk
        def add_scalar(self, *a):
            raise OSError(28, "No space left on device")

    t = Trackers(["tensorboard"], str(tmp_path), None, "p", {})
    t.live["tensorboard"] = Full()
    for step in (1, 2, 3):
        t.log(step, {"loss": 0.5, "eval_loss": 0.25})
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: --report_to tensorboard failed (OSError: [Errno 28] No space left on device); it is off "
                   "for the rest of the run, metrics.jsonl stays the record"]
    assert t.live == {}


def test_tags_group_train_eval_and_eval_init():
    assert [tag(k) for k in ("loss", "lr", "eval_loss", "eval_init_reward_margin", "events/ref_update")] == [
        "train/loss", "train/lr", "eval/loss", "eval_init/reward_margin", "events/ref_update"]

# -----------------------------------------------------------------------------
# TensorBoard: the scalars are metrics.jsonl's; a resume purges the steps it runs again


@slow
def test_tensorboard_scalars_equal_metrics_and_a_resume_doubles_no_step(tmp_path):
    out = str(tmp_path / "run")
    tr_dpo.main(FLAGS + ["--output_dir", out, "--report_to", "tensorboard", "--run_name", "demo"])
    got, texts = scalars(os.path.join(out, "tensorboard"))
    want = expected(out)
    assert {"train/loss", "train/lr", "train/tokens_per_s", "eval/loss", "eval_init/loss"} <= set(want)
    assert {t: got[t] for t in want} == want
    assert got["events/ref_update"] == {2: np.float32(0.6), 4: np.float32(0.6)}  # after steps 2 and 4 (tau 2)
    assert texts == ["config/text_summary"]
    first = metrics(out)
    # resume from the checkpoint of step 3: steps 4 and 5 run again and replace their first values
    tr_dpo.main(FLAGS + ["--output_dir", out, "--report_to", "tensorboard", "--resume", "--lr", "5e-4"])
    got, _ = scalars(os.path.join(out, "tensorboard"))
    want = expected(out)
    assert {t: got[t] for t in want} == want
    assert sorted(got["train/loss"]) == [1, 2, 3, 4, 5]
    assert got["train/lr"][5] != np.float32(first[-2]["lr"])  # step 5's value is the resumed run's (a new --lr)


@slow
def test_sft_reports_to_tensorboard(tmp_path):
    out = str(tmp_path / "sft")
    sft.main(FAST + ["--max_steps", "2", "--eval_every", "2", "--output_dir", out, "--report_to", "tensorboard"])
    got, _ = scalars(os.path.join(out, "tensorboard"))
    want = expected(out)
    assert {"train/loss", "eval/loss"} <= set(want) and {t: got[t] for t in want} == want
    assert "events/ref_update" not in got  # no reference

# -----------------------------------------------------------------------------
# Weights & Biases, offline: the run file holds the config, each step once, and the summary


def wandb_records(path):
    """The protobuf records of an offline run's .wandb file: a 7-byte W&B header, then LevelDB's log format (32 KiB
    blocks of chunks: crc32 4 bytes, length 2, type 1 (1 full, 2 first, 3 middle, 4 last); a block's tail shorter
    than a chunk header is padding)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, records, pos, part = open(path, "rb").read(), [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        part, pos = part + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            records.append(pb.Record.FromString(part))
            part = b""
    return records


def wandb_run(folder):
    """(run record, {step: {key: value}}, summary {key: value}) of one offline run folder."""
    records = wandb_records(glob.glob(os.path.join(folder, "run-*.wandb"))[0])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    history, summary = {}, {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history[row.pop("_step")] = {k: v for k, v in row.items() if not k.startswith("_")}
        if r.WhichOneof("record_type") == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
    return run, history, summary


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B in offline mode, writing under tmp_path/wandb: no network, no account. W&B reads its environment once
    per process, into its setup: teardown drops it, so that the next test's settings are read."""
    import wandb
    for k, v in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
                 "WANDB_DISABLE_GIT": "true"}.items():
        monkeypatch.setenv(k, v)
    wandb.teardown()
    yield lambda: sorted(glob.glob(os.path.join(tmp_path, "wandb", "offline-run-*")))
    wandb.teardown()


@slow
def test_wandb_offline_run_holds_config_steps_and_summary_and_a_resume_continues_it(tmp_path, wandb_offline):
    out = str(tmp_path / "run")
    flags = FLAGS + ["--output_dir", out, "--report_to", "wandb", "--run_name", "kto-demo", "--project", "tests"]
    tr_kto.main(flags)
    [folder] = wandb_offline()
    run, history, summary = wandb_run(folder)
    run_id = json.load(open(os.path.join(out, "checkpoint", "run.json")))["tracker_id"]
    assert (run.run_id, run.display_name, run.project) == (run_id, "kto-demo", "tests")
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["tau"] == 2 and config["report_to"] == ["wandb"] and config["beta"] == 0.1
    rows = {}
    for r in metrics(out):
        rows.setdefault(r["step"], {}).update({tag(k): v for k, v in r.items() if k != "step"})
    for s in (2, 4):
        rows[s]["events/ref_update"] = 0.6
    assert history == rows  # every record at its step, once; the reference updates as events
    assert summary["train/loss"] == metrics(out, "loss")[-1]["loss"]
    # resume from step 3 to step 7: W&B holds steps 1-5 already, so the same run gets only 6 and 7
    tr_kto.main([*flags, "--resume", "--max_steps", "7"])
    first, second = wandb_offline()
    run2, history2, _ = wandb_run(second)
    assert run2.run_id == run_id and sorted(history2) == [6, 7]
    assert history2[7]["train/loss"] == metrics(out, "loss")[-1]["loss"]


@slow
def test_evaluate_sends_its_summary(tmp_path, wandb_offline):
    out = str(tmp_path / "eval")
    res = ev.main(["--models", "tiny", "--labels", "policy", "--n_prompts", "4", "--max_new_tokens", "8",
                   "--output_dir", out, "--report_to", "wandb", "tensorboard"])
    pol = res["models"][0]
    _, _, summary = wandb_run(wandb_offline()[0])
    assert summary["policy/win_rate/rate"] == pol["win_rate"]["rate"]
    assert summary["policy/criteria/gold accuracy/mean"] == pol["criteria"]["gold accuracy"]["mean"]
    got, _ = scalars(os.path.join(out, "tensorboard"))
    assert got["policy/win_rate/rate"] == {0: np.float32(pol["win_rate"]["rate"])}

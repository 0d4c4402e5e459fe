"""Scale and faults: FSDP2 on two Gloo processes, preemption by a real signal, an interrupted checkpoint save,
non-finite steps, a rank that dies, and property-based tests of the data path."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tr_dpo
from common import global_batch, tokenize_rows
from conftest import ENV, FAST, ROOT, torchrun, weights
from engineering import checkpoint
from engineering.cli import DataError
from engineering.data import load_preferences
from engineering.models import byte_tokenizer

# two micro-batches of 2 per rank under two processes, a reference update every 2 steps
FLAGS = FAST + ["--micro_batch_size", "2", "--tau", "2", "--alpha", "0.5"]
slow = pytest.mark.slow


def steps_logged(out):
    path = os.path.join(out, "metrics.jsonl")
    return [json.loads(line)["step"] for line in open(path)] if os.path.exists(path) else []


# -----------------------------------------------------------------------------
# FSDP2

@slow
def test_fsdp_matches_ddp_and_resumes(tmp_path):
    ddp, fsdp, resumed = (str(tmp_path / n) for n in ("ddp", "fsdp", "resumed"))
    torchrun("tr_dpo.py", *FLAGS, "--max_steps", "4", "--output_dir", ddp)
    torchrun("tr_dpo.py", *FLAGS, "--max_steps", "4", "--fsdp", "--output_dir", fsdp)
    for name in ("policy", "reference"):
        a, b = weights(ddp, name), weights(fsdp, name)
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5), (name, k)
    # resume under FSDP: stop at step 2 with a checkpoint, continue to 4: the same weights as the straight run
    torchrun("tr_dpo.py", *FLAGS, "--max_steps", "2", "--save_every", "2", "--fsdp", "--output_dir", resumed)
    torchrun("tr_dpo.py", *FLAGS, "--max_steps", "4", "--resume", "--fsdp", "--output_dir", resumed)
    for name in ("policy", "reference"):
        a, b = weights(fsdp, name), weights(resumed, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


# -----------------------------------------------------------------------------
# preemption: a real SIGTERM

@slow
def test_sigterm_saves_and_resume_matches(tmp_path):
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    script, flags = os.path.join(ROOT, "tr_dpo.py"), FLAGS + ["--max_steps", "40"]
    run = lambda *extra: subprocess.run([sys.executable, script, *flags, *extra], env=ENV, cwd=ROOT,  # noqa: E731
                                        check=True, capture_output=True, timeout=300)
    run("--output_dir", straight)  # all three runs in subprocesses with one thread each: identical arithmetic
    proc = subprocess.Popen([sys.executable, script, *flags, "--output_dir", stopped],
                            env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(steps_logged(stopped)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    ck = torch.load(os.path.join(stopped, "checkpoint", "state.pt"), weights_only=False)
    assert 3 <= ck["step"] < 40 and f"stopped by a signal after step {ck['step']}" in out
    assert not os.path.exists(os.path.join(stopped, "policy"))  # not finished: only the checkpoint
    run("--resume", "--output_dir", stopped)
    for name in ("policy", "reference"):
        a, b = weights(straight, name), weights(stopped, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


# -----------------------------------------------------------------------------
# a crash in the middle of a checkpoint save leaves the previous checkpoint usable

@slow
def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
    flags = FLAGS + ["--max_steps", "4"]
    tr_dpo.main(flags + ["--output_dir", straight])
    real_save, calls = torch.save, []

    def failing_save(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 3:  # the second checkpoint's state.pt (1: state.pt, 2: rng_0.pt, 3: state.pt of step 4)
            with open(path, "wb") as f:
                f.write(b"half a file")
            raise OSError("disk full (simulated)")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        tr_dpo.main(flags + ["--save_every", "2", "--output_dir", crashed])
    monkeypatch.undo()
    ck = torch.load(os.path.join(crashed, "checkpoint", "state.pt"), weights_only=False)
    assert ck["step"] == 2  # the half-written one stayed in checkpoint.tmp
    tr_dpo.main(flags + ["--resume", "--output_dir", crashed])
    a, b = weights(straight), weights(crashed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@slow
def test_resume_from_a_checkpoint_older_than_the_initial_reference_logps(tmp_path, capfd):
    """A checkpoint written before the scripts kept the initial reference's eval log-probs (its state holds no
    init_ref_logps; --resume ended in a KeyError): one line saying what to do, exit code 2, the run's files as they
    were."""
    out = str(tmp_path)
    tr_dpo.main(FLAGS + ["--max_steps", "2", "--save_every", "2", "--output_dir", out])
    state = os.path.join(out, "checkpoint", "state.pt")
    old = torch.load(state, weights_only=False)
    del old["extra"]["init_ref_logps"]
    torch.save(old, state)
    files = {p: open(p, "rb").read() for p in (state, os.path.join(out, "metrics.jsonl"))}
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
        tr_dpo.main(FLAGS + ["--max_steps", "4", "--resume", "--output_dir", out])
    shown = [line.split("\r")[-1] for line in capfd.readouterr().err.split("\n")]  # what a terminal shows
    assert (e.value.code, [line for line in shown if line.strip()]) == (2, [
        f"error: {out}/checkpoint holds no init_ref_logps (it was written by an older version of this code); start a "
        f"fresh run without --resume, or use that version to finish it"])
    assert files == {p: open(p, "rb").read() for p in files}


# -----------------------------------------------------------------------------
# non-finite loss: never applied; stop naming step and examples, or skip within a limit

def nan_at_step(monkeypatch, bad_step):
    real, calls = tr_dpo.dpo_loss, []

    def poisoned(*args):
        calls.append(1)
        losses, c, r = real(*args)
        micro_per_step = 4  # batch 8 / micro-batch 2, one process
        if (len(calls) - 1) // micro_per_step + 1 == bad_step:
            losses = losses * float("nan")
        return losses, c, r
    monkeypatch.setattr(tr_dpo, "dpo_loss", poisoned)


@slow
def test_nan_stops_with_step_and_example_ids(tmp_path, monkeypatch, capsys):
    out = str(tmp_path)
    nan_at_step(monkeypatch, bad_step=3)
    with pytest.raises(SystemExit) as e:
        tr_dpo.main(FLAGS + ["--max_steps", "6", "--save_every", "2", "--output_dir", out])
    ids = global_batch(2, 2048, 8, 0)  # step 3 is global batch index 2
    assert "step 3: non-finite loss or gradient" in str(e.value) and str(ids) in str(e.value)
    ck = torch.load(os.path.join(out, "checkpoint", "state.pt"), weights_only=False)
    assert ck["step"] == 2 and all(torch.isfinite(v).all() for v in ck["policy"].values())


@slow
def test_nan_step_skipped_within_limit(tmp_path, monkeypatch):
    out = str(tmp_path)
    nan_at_step(monkeypatch, bad_step=3)
    tr_dpo.main(FLAGS + ["--max_steps", "5", "--skip_nonfinite", "1", "--output_dir", out])
    w = weights(out)
    assert all(torch.isfinite(v).all() for v in w.values())
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]


# -----------------------------------------------------------------------------
# a rank dies: the other exits non-zero with a clear message, within a bounded time

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@slow
def test_lost_rank_exits_cleanly(tmp_path):
    out, port = str(tmp_path), free_port()
    procs = []
    for rank in range(2):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, "tr_dpo.py"), *FLAGS, "--max_steps", "500",
                                       "--dist_timeout", "20", "--output_dir", out], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.time() + 120
    while len(steps_logged(out)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    procs[1].kill()  # SIGKILL: no handler, no goodbye
    t0 = time.time()
    _, err = procs[0].communicate(timeout=90)
    assert procs[0].returncode != 0 and time.time() - t0 < 60
    assert "lost contact with another rank" in err


# -----------------------------------------------------------------------------
# property-based tests of the data path

FIELDS = ("prompt", "chosen", "rejected")
values = st.one_of(st.text(max_size=300), st.integers(), st.none(), st.booleans(), st.lists(st.integers(), max_size=2))
rows = st.lists(st.dictionaries(st.sampled_from(FIELDS + ("extra",)), values, max_size=4), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=rows, cut=st.booleans())
def test_any_jsonl_loads_or_fails_with_named_row(tmp_path_factory, rows, cut):
    path = tmp_path_factory.mktemp("prop") / "rows.jsonl"
    text = "\n".join(json.dumps(r) for r in rows)
    path.write_text(text[:len(text) // 2] if cut and len(text) > 2 else text)
    try:
        train, evals = load_preferences(str(path), eval_size=1)
    except DataError as e:
        msg = str(e)
        assert str(path) in msg
        # a row error names the row and what is wrong with it: a field, not an object, or (an HH-style row of
        # chosen + rejected dialogues only) no shared "\n\nAssistant:" to split the prompt at
        named_row = "row " in msg and ("field" in msg or "JSON object" in msg or "Assistant:" in msg)
        assert named_row or "line " in msg or "nothing to train" in msg or "no rows" in msg, msg
        return
    for r in train + evals:  # loaded: every row is three strings with a non-empty prompt
        assert all(isinstance(r[f], str) for f in FIELDS) and r["prompt"].strip()


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=200))
def test_gzip_garbage_fails_cleanly(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("gz") / "rows.jsonl.gz"
    path.write_bytes(data)
    with pytest.raises(DataError):
        load_preferences(str(path), eval_size=1)


TOK = byte_tokenizer()


@settings(max_examples=80, deadline=None)
@given(prompt=st.text(min_size=1, max_size=400), chosen=st.text(max_size=400), rejected=st.text(max_size=400),
       max_length=st.integers(8, 256), frac=st.floats(0.05, 0.95))
def test_truncation_invariants(prompt, chosen, rejected, max_length, frac):
    max_prompt = max(1, min(max_length - 1, int(max_length * frac)))
    (ex,) = tokenize_rows(TOK, [{"prompt": prompt, "chosen": chosen, "rejected": rejected}],
                          ("chosen", "rejected"), max_length, max_prompt)
    full_prompt = list(prompt.encode())
    for k in ("chosen", "rejected"):
        assert len(ex["prompt"]) + len(ex[k]) <= max_length
        assert len(ex[k]) >= 1  # a response keeps at least one token (its EOS when it was empty)
    assert ex["prompt"] == full_prompt[-len(ex["prompt"]):]  # the end of the prompt is what stays
    assert ex["chosen"] == (list(chosen.encode()) + [TOK.eos_token_id])[:len(ex["chosen"])]  # cut from the right

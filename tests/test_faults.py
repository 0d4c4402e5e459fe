"""Scale and faults: FSDP2 on two Gloo processes, preemption by a real signal, an interrupted checkpoint save,
non-finite steps, a rank that dies, and property-based tests of the data path."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sft
import tr_dpo
import tr_kto
from common import Dist, global_batch, tokenize_rows
from conftest import ENV, FAST, ROOT, metrics, torchrun, weights
from conftest import checkpoint as saved
from engineering import checkpoint
from engineering.cli import DataError, InputError, check_paths
from engineering.data import load_preferences
from engineering.models import byte_tokenizer, load_model

# two micro-batches of 2 per rank under two processes, a reference update every 2 steps
FLAGS = FAST + ["--micro_batch_size", "2", "--tau", "2", "--alpha", "0.5"]
slow = pytest.mark.slow


def steps_logged(out):
    path = os.path.join(out, "metrics.jsonl")
    return [json.loads(line)["step"] for line in open(path)] if os.path.exists(path) else []


# -----------------------------------------------------------------------------
# FSDP2 and resuming on another world size

def assert_close_weights(a_out, b_out, atol):
    for name in ("policy", "reference"):
        a, b = weights(a_out, name), weights(b_out, name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=0, atol=atol), (name, k, (a[k] - b[k]).abs().max().item())


@slow
def test_fsdp_matches_ddp_and_resumes(tmp_path):
    ddp, fsdp, resumed = (str(tmp_path / n) for n in ("ddp", "fsdp", "resumed"))
    torchrun("tr_dpo.py", *FLAGS, "--max_steps", "4", "--output_dir", ddp)
    torchrun("tr_dpo.py", *FLAGS, "--max_steps", "4", "--fsdp", "--output_dir", fsdp)
    assert_close_weights(ddp, fsdp, atol=1e-5)
    # resume under FSDP: stop at step 2 with a checkpoint, continue to 4: the same weights as the straight run
    torchrun("tr_dpo.py", *FLAGS, "--max_steps", "2", "--save_every", "2", "--fsdp", "--output_dir", resumed)
    torchrun("tr_dpo.py", *FLAGS, "--max_steps", "4", "--resume", "--fsdp", "--output_dir", resumed)
    for name in ("policy", "reference"):
        a, b = weights(fsdp, name), weights(resumed, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


@slow
def test_resume_on_another_world_size(tmp_path):
    """A checkpoint written by N processes continues on M, with or without --fsdp: two steps each on 1 process, 2
    (DDP), 2 (FSDP), 2 (DDP), 1 process end with the weights of one uninterrupted process within float error (sums
    over ranks add in another order). Equal up to that only because every step's draw of the RNG is nothing: the
    tiny model has no dropout; a rank without its rng_<rank>.pt starts from --seed + rank. The tolerance tells
    float error from a lost state: one process and two differ by up to 1e-6 after these 10 steps, and a resume at
    step 2 that dropped AdamW's moments ends 6e-3 away."""
    straight, chain = str(tmp_path / "straight"), str(tmp_path / "chain")
    tr_dpo.main(FLAGS + ["--max_steps", "10", "--output_dir", straight])
    flags = FLAGS + ["--save_every", "2", "--output_dir", chain]
    tr_dpo.main(flags + ["--max_steps", "2"])
    r = torchrun("tr_dpo.py", *flags, "--max_steps", "4", "--resume")
    assert f"resume: {chain}/checkpoint at step 2; --max_steps 2 -> 4; 1 -> 2 processes" in r.stdout
    r = torchrun("tr_dpo.py", *flags, "--max_steps", "6", "--resume", "--fsdp")
    assert f"resume: {chain}/checkpoint at step 4; --fsdp False -> True; --max_steps 4 -> 6" in r.stdout
    # each rank wrote its own shards and RNG state; run.json last, listing them all
    assert sorted(os.listdir(os.path.join(chain, "checkpoint"))) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "rng_0.pt", "rng_1.pt", "run.json", "trainer.pt"]
    torchrun("tr_dpo.py", *flags, "--max_steps", "8", "--resume")
    tr_dpo.main(flags + ["--max_steps", "10", "--resume"])
    assert saved(chain)["step"] == 10 and metrics(chain)[-1]["step"] == 10
    assert_close_weights(straight, chain, atol=1e-5)


def test_the_final_folders_are_sharded_safetensors_with_an_index(tmp_path):
    """save_final writes each model in safetensors files of at most max_shard_size with an index when there are
    several, and from_pretrained loads them to the model's own weights."""
    import copy

    from transformers import AutoModelForCausalLM
    model, tok = load_model("tiny")
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(0.5)  # the reference's own weights, not a second copy of the policy's
    out = str(tmp_path / "run")
    written = checkpoint.save_final(out, Dist(0, 0, 1, torch.device("cpu")), model, ref, tok, max_shard_size="200KB")
    assert written == ["policy/", "reference/"]
    for name, m in (("policy", model), ("reference", ref)):
        index = json.load(open(os.path.join(out, name, "model.safetensors.index.json")))
        files = sorted(set(index["weight_map"].values()))
        assert len(files) == 3  # 532,480 bytes of float32 weights in files of at most 200 kB
        loaded = AutoModelForCausalLM.from_pretrained(os.path.join(out, name)).state_dict()
        own = m.state_dict()
        assert loaded.keys() == own.keys() and all(torch.equal(loaded[k], own[k]) for k in own)


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
    assert proc.returncode == 143  # the shell's code for SIGTERM, after the checkpoint is written
    ck = saved(stopped)
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
        if not isinstance(path, str):  # DCP's own torch.save into memory (the optimizer's plain values)
            return real_save(obj, path, *a, **k)
        calls.append(path)
        if len(calls) == 3:  # the second checkpoint's trainer.pt (1: trainer.pt, 2: rng_0.pt, 3: trainer.pt of step 4)
            with open(path, "wb") as f:
                f.write(b"half a file")
            raise OSError("disk full (simulated)")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(SystemExit) as e:  # one line, exit code 1: not a bad input
        tr_dpo.main(flags + ["--save_every", "2", "--output_dir", crashed])
    assert str(e.value) == (f"error: step 4: cannot write the checkpoint (disk full (simulated)); {crashed}/checkpoint "
                            f"(step 2) is intact: --resume continues from it")
    monkeypatch.undo()
    ck = saved(crashed)
    assert ck["step"] == 2 and not os.path.exists(os.path.join(crashed, "checkpoint.tmp"))  # the half one removed
    tr_dpo.main(flags + ["--resume", "--output_dir", crashed])
    a, b = weights(straight), weights(crashed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@slow
def test_a_full_disk_while_writing_the_shards_is_one_line(tmp_path):
    """The checkpoint's DCP shards cannot be written (a limit on file size: the write fails with EFBIG, as it fails
    with ENOSPC on a full disk): one line naming the checkpoint that is intact, no checkpoint.tmp/ left."""
    import resource
    out = str(tmp_path / "run")
    tr_dpo.main(FLAGS + ["--max_steps", "2", "--save_every", "2", "--output_dir", out])

    def limited():  # in the child: files of at most 1 MiB (its shards hold about 2 MiB)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 ** 20, 2 ** 20))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tr_dpo.py"), *FLAGS, "--max_steps", "4", "--save_every",
                        "2", "--resume", "--output_dir", out], env=ENV, cwd=ROOT, capture_output=True, text=True,
                       timeout=120, preexec_fn=limited)
    assert r.returncode == 1 and r.stderr.splitlines()[-1] == (
        f"error: step 4: cannot write the checkpoint ([Errno 27] File too large); {out}/checkpoint (step 2) is "
        f"intact: --resume continues from it"), r.stderr[-2000:]
    assert saved(out)["step"] == 2 and not os.path.exists(os.path.join(out, "checkpoint.tmp"))


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
    ck = saved(out)
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


# -----------------------------------------------------------------------------
# a checkpoint knows its run: --resume continues only the run it was written by, before anything is written

def snapshot(root):
    """{relative path: bytes} of every file under root: what "nothing was written" compares."""
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files}


def refused(script, argv, capfd):
    """(exit code, stderr) of script.main(argv) run in this process, which must end in SystemExit."""
    with pytest.raises(SystemExit) as e:
        script.main(argv)
    return e.value.code, capfd.readouterr().err


RUN = FAST + ["--eval_size", "8"]  # a TR-DPO run of the tiny model: checkpoint/ at step 4


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dpo") / "run")
    tr_dpo.main(RUN + ["--max_steps", "4", "--save_every", "4", "--output_dir", out])
    return out


def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return str(tmp_path / "run")


@slow
@pytest.mark.parametrize("script, change, message", [
    (tr_dpo, ["--tau", "1"], "was written with --tau 100, not 1; pass --tau 100 to continue that run"),
    (tr_dpo, ["--batch_size", "16"], "was written with --batch_size 8, not 16"),
    (tr_dpo, ["--eval_size", "16"], "was written with --eval_size 8, not 16"),  # found before it overwrites
    (tr_dpo, ["--model", "small"], "was written with --model tiny, not small"),
    (tr_dpo, ["--beta", "0.5"], "was written with --beta 0.05, not 0.5"),
    (tr_dpo, ["--group_by_length"], "was written without --group_by_length; drop it"),
    (tr_dpo, ["--dataset", "DATA"], "was written with --dataset toy, not "),
    (tr_dpo, ["--max_steps", "3"], "is at step 4, beyond this run's 3 steps; raise --max_steps"),
    (tr_kto, [], "was written by tr_dpo.py, not tr_kto.py; run tr_dpo.py to continue it"),
    (sft, [], "was written by tr_dpo.py, not sft.py"),
    (tr_dpo, ["--overwrite"], "--resume continues the run in --output_dir and --overwrite replaces it"),
])
def test_resume_refuses_another_run_in_one_line(dpo_run, tmp_path, script, change, message, capfd):
    data = str(tmp_path / "data.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps({"prompt": f"Q{i}", "chosen": " a", "rejected": " b"}) + "\n" for i in range(40))
    before = snapshot(dpo_run)
    change = [data if c == "DATA" else c for c in change]
    code, err = refused(script, RUN + ["--max_steps", "6", "--resume", "--output_dir", dpo_run, *change], capfd)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --resume") and message in err, err
    assert snapshot(dpo_run) == before  # the checkpoint, metrics and outputs untouched


@slow
def test_resume_refuses_edited_data_and_an_old_checkpoint(tmp_path, capfd):
    data, out = tmp_path / "data.jsonl", str(tmp_path / "run")
    rows = [json.dumps({"prompt": f"Q{i}", "chosen": " a", "rejected": " b"}) + "\n" for i in range(40)]
    data.write_text("".join(rows))
    flags = RUN + ["--dataset", str(data), "--save_every", "2"]
    tr_dpo.main(flags + ["--max_steps", "2", "--output_dir", out])
    data.write_text("".join(rows[:-1] + [rows[-1].replace("Q39", "Q39?")]))  # the same name, one row edited
    code, err = refused(tr_dpo, flags + ["--max_steps", "4", "--resume", "--output_dir", out], capfd)
    assert code == 2 and f"--dataset {data} has changed since {out}/checkpoint was written" in err
    # a checkpoint of one pickled state.pt (format 1): refused in one line, never unpickled
    data.write_text("".join(rows))
    record_path = os.path.join(out, "checkpoint", "run.json")
    record = json.load(open(record_path))
    json.dump({**record, "format": 1}, open(record_path, "w"))
    code, err = refused(tr_dpo, flags + ["--max_steps", "4", "--resume", "--output_dir", out], capfd)
    assert code == 2 and err == (f"error: --resume: no complete checkpoint in {out} (checkpoint/: one pickled "
                                 f"state.pt, which --resume does not read (loading it could run code stored in it); "
                                 f"finish that run with the version of this code that wrote it); start a new run "
                                 f"(--overwrite)\n")
    # a checkpoint of the code before run records: one line, not a guess
    os.remove(record_path)
    open(os.path.join(out, "checkpoint", "state.pt"), "wb").close()
    code, err = refused(tr_dpo, flags + ["--max_steps", "4", "--resume", "--output_dir", out], capfd)
    assert code == 2 and err == (f"error: --resume: {out}/checkpoint was written by an older version of this code, "
                                 f"without the record of its run (run.json) that --resume checks; start a new run "
                                 f"(--overwrite), or finish it with the commit that wrote it\n")


@slow
def test_resume_without_the_initial_reference_logps_is_one_line(dpo_run, tmp_path, capfd):
    """A checkpoint without init_ref_logps (one made by hand or by other code; unchecked, --resume would end in a
    KeyError): Run.initial says so in one line, the progress bar erased before it, exit code 2, the run's files
    as they were."""
    out = copy_of(dpo_run, tmp_path)
    path = os.path.join(out, "checkpoint", "trainer.pt")
    state = torch.load(path, weights_only=True)
    del state["extra"]["init_ref_logps"]
    torch.save(state, path)
    record = json.load(open(os.path.join(out, "checkpoint", "run.json")))
    record["files"]["trainer.pt"] = os.path.getsize(path)
    json.dump(record, open(os.path.join(out, "checkpoint", "run.json"), "w"))
    before = snapshot(out)
    code, err = refused(tr_dpo, RUN + ["--max_steps", "6", "--resume", "--output_dir", out], capfd)
    shown = [line.split("\r")[-1] for line in err.split("\n")]  # what a terminal shows
    assert (code, [line for line in shown if line.strip()]) == (2, [
        f"error: {out}/checkpoint holds no init_ref_logps (it was written by an older version of this code); start "
        f"a fresh run without --resume, or use that version to finish it"])
    assert snapshot(out) == before


class RunsCode:
    """Pickles as a call of os.mkdir(path): what a .metadata file from a stranger could hold."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


@slow
def test_a_checkpoint_index_that_would_run_code_is_refused(dpo_run, tmp_path, capfd):
    """DCP unpickles a checkpoint's .metadata; one that names a function (os.mkdir here) is refused in one line
    before DCP reads it, the function never called, the run's files as they were."""
    import pickle
    out, ran = copy_of(dpo_run, tmp_path), str(tmp_path / "ran")
    path = os.path.join(out, "checkpoint", ".metadata")
    with open(path, "wb") as f:
        pickle.dump(RunsCode(ran), f)
    record = json.load(open(os.path.join(out, "checkpoint", "run.json")))
    record["files"][".metadata"] = os.path.getsize(path)
    json.dump(record, open(os.path.join(out, "checkpoint", "run.json"), "w"))
    before = snapshot(out)
    code, err = refused(tr_dpo, RUN + ["--max_steps", "6", "--resume", "--output_dir", out], capfd)
    assert (code, err) == (2, f"error: --resume: cannot read {out}/checkpoint/.metadata (it names posix.mkdir, not a "
                              f"part of a checkpoint's index); start a new run (--overwrite)\n")
    assert not os.path.exists(ran) and snapshot(out) == before


@slow
def test_a_shard_value_that_would_run_code_is_refused(dpo_run, tmp_path, capfd):
    """DCP's own loader unpickles the plain values of the shards (the optimizer's hyperparameters) with
    weights_only=False; --resume reads them weights_only: a value that names a function (os.mkdir) is refused in one
    line, the function never called, the run's files as they were."""
    import warnings

    import torch.distributed.checkpoint as dcp
    out, ran = copy_of(dpo_run, tmp_path), str(tmp_path / "ran")
    path = os.path.join(out, "checkpoint")
    state = {k: v for k, v in saved(out).items() if k in ("policy", "reference", "optimizer")}
    state["optimizer"]["param_groups"][0]["lr"] = RunsCode(ran)
    for name in os.listdir(path):
        if name == ".metadata" or name.endswith(".distcp"):
            os.remove(os.path.join(path, name))
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=path, no_dist=True)
    record = json.load(open(os.path.join(path, "run.json")))
    record["files"] = {n: os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n != "run.json"}
    json.dump(record, open(os.path.join(path, "run.json"), "w"))
    before = snapshot(out)
    code, err = refused(tr_dpo, RUN + ["--max_steps", "6", "--resume", "--output_dir", out], capfd)
    assert code == 2 and err.startswith(f"error: --resume: cannot load the weights of {path} (UnpicklingError: ")
    assert err.count("\n") == 1 and not os.path.exists(ran) and snapshot(out) == before


@slow
def test_a_new_lr_on_resume_takes_effect(dpo_run, tmp_path, capfd):
    """--lr 0 from step 4 on: AdamW then moves no weight (no weight decay), so the final policy is the checkpoint's
    bit for bit; had the checkpoint's lr 1e-3 been kept, it would have moved."""
    out = copy_of(dpo_run, tmp_path)
    before = saved(out)["policy"]
    tr_dpo.main(RUN + ["--max_steps", "6", "--lr", "0", "--resume", "--output_dir", out])
    assert f"resume: {out}/checkpoint at step 4; --lr 0.001 -> 0.0; --max_steps 4 -> 6" in capfd.readouterr().out
    final = weights(out)
    assert all(torch.equal(final[k], before[k]) for k in before)
    # warmup 10: step s is logged with lr * (s + 1) / 11, the schedule's factor after s steps
    assert [(m["step"], m["lr"]) for m in metrics(out, "lr")] == [
        (1, round(1e-3 * 2 / 11, 6)), (2, round(1e-3 * 3 / 11, 6)), (3, round(1e-3 * 4 / 11, 6)),
        (4, round(1e-3 * 5 / 11, 6)), (5, 0.0), (6, 0.0)]


# -----------------------------------------------------------------------------
# one run owns its folder; a save killed at any moment leaves a checkpoint to resume from

@slow
def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path, capfd):
    import fcntl
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as holder:  # what a live run holds (another open file: another owner)
        fcntl.flock(holder, fcntl.LOCK_EX)
        holder.write("4242\n")
        holder.flush()
        code, err = refused(tr_dpo, RUN + ["--max_steps", "1", "--output_dir", str(out)], capfd)
        assert (code, err) == (2, f"error: {out} is in use by another run (pid 4242); wait for it to end, or "
                                  f"choose another --output_dir\n")
        assert os.listdir(out) == [".lock"]
    tr_dpo.main(RUN + ["--max_steps", "1", "--output_dir", str(out)])  # the holder gone: the folder is free
    assert metrics(out, "loss")[0]["step"] == 1


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch, capsys):
    import fcntl

    def no_locks(f, how):
        raise OSError(37, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    checks = []
    try:
        checkpoint.take_folder(str(tmp_path / "run"), Dist(0, 0, 1, torch.device("cpu")), lambda: checks.append(1))
    finally:
        checkpoint.release_folders()
    assert checks == [1] and capsys.readouterr().out == (
        f"warning: cannot lock {tmp_path / 'run'} (No locks available): make sure no other run writes there\n")


@slow
def test_overwrite_clears_the_old_run_before_training(dpo_run, tmp_path, monkeypatch, capfd):
    """--overwrite, then the new run dies at its first step: no old checkpoint is left for --resume to mix in."""
    out = copy_of(dpo_run, tmp_path)
    nan_at_step(monkeypatch, bad_step=1)
    stop, _ = refused(tr_dpo, RUN + ["--micro_batch_size", "2", "--max_steps", "4", "--seed", "1", "--overwrite",
                                     "--output_dir", out], capfd)
    assert stop.startswith("error: step 1: non-finite loss")  # and the message knows there is no checkpoint
    assert "nothing was applied. no checkpoint was written (--save_every N writes one every N steps)" in stop
    assert os.listdir(out) == [".lock"]  # no checkpoint/, policy/, reference/ nor metrics of the old run
    monkeypatch.undo()
    code, err = refused(tr_dpo, RUN + ["--max_steps", "6", "--resume", "--output_dir", out], capfd)
    assert code == 2 and f"--resume: no checkpoint in {out}" in err


def fake_checkpoint(path, step, files=None, record=True):
    """A checkpoint folder as find_checkpoint sees it: files of given sizes and, if record, run.json listing them
    (files: {name: (size written, size listed)})."""
    os.makedirs(path)
    files = files or {"trainer.pt": (10, 10), "rng_0.pt": (3, 3)}
    for name, (size, _) in files.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(b"x" * size)
    if record:
        with open(os.path.join(path, "run.json"), "w") as f:
            json.dump({"format": checkpoint.FORMAT, "step": step, "files": {n: s for n, (_, s) in files.items()},
                       "script": "tr_dpo.py", "world_size": 1, "flags": {}, "data": None}, f)


@pytest.mark.parametrize("layout, found", [
    ({"checkpoint": 4}, "checkpoint"),
    ({"checkpoint.old": 2, "checkpoint.tmp": 4}, "checkpoint.tmp"),  # killed between the renames
    ({"checkpoint.old": 2, "checkpoint.tmp": "half"}, "checkpoint.old"),  # killed between them, tmp unfinished
    ({"checkpoint": 4, "checkpoint.tmp": "half"}, "checkpoint"),  # killed while writing the next one
    ({"checkpoint": 2, "checkpoint.tmp": 4}, "checkpoint.tmp"),  # killed after writing it, before any rename
    ({"checkpoint": 4, "checkpoint.old": 2}, "checkpoint"),  # killed before removing .old
    ({"checkpoint": "short", "checkpoint.old": 2}, "checkpoint.old"),
])
def test_resume_finds_the_latest_complete_checkpoint(tmp_path, layout, found):
    for name, what in layout.items():
        if what == "half":  # no run.json yet: written last
            fake_checkpoint(str(tmp_path / name), 0, record=False)
        elif what == "short":  # a file shorter than written (a damaged disk, a copy cut off)
            fake_checkpoint(str(tmp_path / name), 6, {"trainer.pt": (5, 10)})
        else:
            fake_checkpoint(str(tmp_path / name), what)
    path, record = checkpoint.find_checkpoint(str(tmp_path))
    assert path == str(tmp_path / found) and record["step"] == layout[found]


@pytest.mark.parametrize("damage, why", [
    ("no rng file", "checkpoint/: rng_0.pt is missing"),
    ("garbage trainer.pt", "checkpoint/: trainer.pt has 7 bytes, 10 were written"),  # also a truncated one
    ("broken run.json", "checkpoint/: run.json unreadable (not valid JSON (Expecting property name enclosed in double "
                        "quotes))"),
    ("empty folder", "checkpoint/: no run.json"),
])
def test_a_damaged_checkpoint_is_named_before_it_is_read(tmp_path, damage, why):
    path = tmp_path / "checkpoint"
    fake_checkpoint(str(path), 4)
    if damage == "no rng file":
        os.remove(path / "rng_0.pt")
    elif damage == "garbage trainer.pt":
        (path / "trainer.pt").write_bytes(b"garbage")
    elif damage == "broken run.json":
        (path / "run.json").write_text("{")
    else:
        shutil.rmtree(path)
        path.mkdir()
    with pytest.raises(InputError) as e:
        checkpoint.find_checkpoint(str(tmp_path))
    assert str(e.value) == f"--resume: no complete checkpoint in {tmp_path} ({why}); start a new run (--overwrite)"


def test_a_checkpoint_file_that_does_not_load_is_one_line(tmp_path):
    path = tmp_path / "trainer.pt"
    path.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(InputError, match=rf"--resume: cannot read {path} \(.*\); start a new run"):
        checkpoint.read(str(path))


@slow
def test_resume_after_a_kill_between_the_renames_and_a_torn_metrics_line(dpo_run, tmp_path):
    """checkpoint/ gone, checkpoint.tmp/ (step 4) complete, checkpoint.old/ (step 4 too, here) and a metrics line
    cut in the middle: --resume takes the .tmp, moves it into place and continues; the torn line is dropped."""
    out = copy_of(dpo_run, tmp_path)
    shutil.copytree(os.path.join(out, "checkpoint"), os.path.join(out, "checkpoint.old"))
    os.rename(os.path.join(out, "checkpoint"), os.path.join(out, "checkpoint.tmp"))
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "loss": 0.69')
    tr_dpo.main(RUN + ["--max_steps", "6", "--save_every", "6", "--resume", "--output_dir", out])
    assert [m["step"] for m in metrics(out, "loss")] == [1, 2, 3, 4, 5, 6]
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint"]
    assert json.load(open(os.path.join(out, "checkpoint", "run.json")))["step"] == 6


@slow
def test_a_full_disk_at_the_final_save_is_one_line_and_leaves_no_half_folder(tmp_path, monkeypatch, capfd):
    import transformers.modeling_utils as hf
    real, calls = hf.safe_save_file, []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # reference/'s weights, after policy/'s
            open(filename, "wb").write(b"\0" * 100)
            raise OSError(28, "No space left on device (simulated)", filename)
        return real(tensors, filename, metadata=metadata)
    monkeypatch.setattr(hf, "safe_save_file", save_file)
    out = str(tmp_path / "run")
    stop, _ = refused(tr_dpo, RUN + ["--max_steps", "2", "--save_every", "2", "--output_dir", out], capfd)
    assert stop == (f"error: cannot write the final weights into {out} ([Errno 28] No space left on device "
                    f"(simulated): '{out}/reference.tmp/model.safetensors'); {out}/checkpoint (step 2) is intact: "
                    f"--resume continues from it")  # SystemExit(str): printed, exit code 1
    assert sorted(os.listdir(out)) == [".lock", "checkpoint", "metrics.jsonl"]  # no policy/, no half reference/


def test_a_policy_with_a_nan_weight_is_never_checkpointed(tmp_path):
    from common import SequenceLogps
    from engineering.run import Run
    model, _ = load_model("tiny")
    args = tr_dpo.get_args(["--output_dir", str(tmp_path / "run")])
    opt = torch.optim.AdamW(model.parameters())
    run = Run(args, Dist(0, 0, 1, torch.device("cpu")), SequenceLogps(model), None, opt,
              torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), 1)
    try:
        with torch.no_grad():
            next(model.parameters())[0, 0] = float("nan")
        assert checkpoint.nonfinite_weights(model) == 1
        with pytest.raises(SystemExit, match=r"step 3: the policy holds 1 non-finite weight\(s\), so no checkpoint "
                                             r"is written; no checkpoint was written"):
            run.save(3)
        assert not os.path.exists(tmp_path / "run" / "checkpoint")
        with pytest.raises(SystemExit, match=r"^error: step 1: the policy holds 1 non-finite weight\(s\), so no "
                                             r".*/run/policy is written; no checkpoint was written"):
            run.finish(None, ())  # the final save checks like a checkpoint
        assert not os.path.exists(tmp_path / "run" / "policy")
    finally:
        run.logger.close()
        checkpoint.release_folders()


def test_inputs_inside_the_output_folder_are_refused(tmp_path):
    out = tmp_path / "run"
    (out / "policy").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("{}\n")
    for model, dataset, flag in [(str(out / "policy"), "toy", "--model"),
                                 ("tiny", str(out / "metrics.jsonl"), "--dataset")]:
        with pytest.raises(InputError) as e:
            check_paths(model, dataset, str(out), resume=False, overwrite=True)
        assert str(e.value).startswith(f"{flag} {out}/") and "lies inside --output_dir" in str(e.value)


# -----------------------------------------------------------------------------
# model and dataset folders that cannot be used: one line each


def damaged(saved, tmp_path, keep=None, write=None):
    path = tmp_path / "model"
    shutil.copytree(saved, path)
    for name in os.listdir(path):
        if keep is not None and name not in keep:
            os.remove(path / name)
    for name, text in (write or {}).items():
        (path / name).write_text(text)
    return str(path)


BERT = json.dumps({"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                   "intermediate_size": 64, "vocab_size": 300})


@pytest.mark.parametrize("keep, write, message", [
    ([], None, "no config.json in the folder"),
    (None, {"config.json": '{"model_type": "gpt_ne'}, "cannot load --model"),
    (["config.json"], None, "cannot load --model"),  # no weights
    (None, {"config.json": json.dumps({"model_type": "no_such_arch"})}, "cannot load --model"),
    (None, {"tokenizer.json": "{garbage"}, "cannot load --model"),
    (None, {"config.json": BERT}, "weight(s) the config asks for are not in its files"),  # loads: all weights new
    (["config.json", "model.safetensors", "generation_config.json"], None,
     "its tokenizer turns text into no tokens"),  # loads: a 2-token tokenizer that encodes text to []
])
def test_an_unusable_model_folder_is_one_line(saved_tiny, tmp_path, keep, write, message):
    path = damaged(saved_tiny, tmp_path, keep, write)
    with pytest.raises(InputError) as e:
        load_model(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_truncated_weights_are_one_line(saved_tiny, tmp_path):
    path = damaged(saved_tiny, tmp_path)
    weights_file = os.path.join(path, "model.safetensors")
    with open(weights_file, "r+b") as f:
        f.truncate(os.path.getsize(weights_file) // 3)
    with pytest.raises(InputError, match=r"cannot load --model .*SafetensorError"):
        load_model(path)


def test_an_unusable_dataset_folder_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    corrupt = tmp_path / "corrupt" / "data"
    corrupt.mkdir(parents=True)
    (corrupt / "train-00000-of-00001.parquet").write_bytes(b"PAR1" + bytes(2000) + b"PAR1")
    for folder in (tmp_path / "empty", tmp_path / "corrupt"):
        with pytest.raises(DataError, match=rf"{folder}: cannot be read as a dataset \("):
            load_preferences(str(folder), eval_size=1)

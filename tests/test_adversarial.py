"""The standing adversarial suite: inputs nobody listed, thrown at the training scripts by class rather than by
instance. The promise under test (docs/faults.md): a run ends with exit code 0, or with exactly one `error:` line and
no traceback; a bad input (exit code 2) writes nothing; a write that fails (a full disk) names the intact checkpoint
and leaves no half-written folder; nothing earlier is lost."""
import gzip
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tr_dpo
from conftest import ENV, ROOT
from engineering import checkpoint
from engineering.cli import DataError
from engineering.data import read_json_rows

RUN = ["--batch_size", "4", "--micro_batch_size", "4", "--eval_size", "4", "--log_every", "1", "--eval_every", "0",
       "--max_steps", "1"]
GOOD = [{"prompt": f"Q{i}", "chosen": " a", "rejected": " b"} for i in range(12)]


def outcome(argv, capfd, stdout=False):
    """(exit code, stderr[, stdout]) of tr_dpo.main(argv) in this process; any exception but SystemExit fails the
    test."""
    try:
        tr_dpo.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1  # SystemExit("error: ...") prints it, exit code 1
        if not isinstance(e.code, int):
            sys.stderr.write(f"{e.code}\n")
    r = capfd.readouterr()
    return (code, r.err, r.out) if stdout else (code, r.err)


def one_line(err):
    """The promise's shape: no traceback, exactly one `error:` line."""
    return "Traceback" not in err and sum("error:" in line for line in err.replace("\r", "\n").splitlines()) == 1


def last(err):
    """The last line of stderr (a library's progress bar may come before it)."""
    return err.replace("\r", "\n").strip().splitlines()[-1]


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write("".join(line + "\n" for line in lines))
    return str(path)

# -----------------------------------------------------------------------------
# property: any rows, any flag values


HOSTILE_LINES = [
    '{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}',  # a lone surrogate: valid JSON, not a character
    "[" * 50_000 + "]" * 50_000,  # deep enough to overflow the parser
    json.dumps({"prompt": "a\u2028b\u0085c", "chosen": "x", "rejected": "y"}, ensure_ascii=False),  # raw separators
    '{"prompt": ' + "9" * 5000 + ', "chosen": "a", "rejected": "b"}',  # beyond Python's int digits
    json.dumps({"prompt": "Q <|endoftext|>", "chosen": "<|padding|>", "rejected": "b"}),  # special tokens' text
    json.dumps({"prompt": "Q", "chosen": "a" * 200_000, "rejected": "b"}),  # a long row: cut before tokenising
    '{"prompt": NaN, "chosen": "a", "rejected": "b"}', "null", "[]", '"text"', "{", '{"prompt": "Q"}',
    json.dumps({"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}),
]
NUMBERS = st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1", "2", "1e39", "1e400", "1e-400", "-0.0", "3.5",
                           str(2 ** 63), str(2 ** 64), "1" + "0" * 30, "abc", "", "0x10", "1_000"])
FLAGS = ["--lr", "--weight_decay", "--beta", "--alpha", "--tau", "--max_grad_norm", "--max_length",
         "--max_prompt_length", "--warmup_steps", "--threads", "--seed", "--lora_r", "--lora_alpha", "--skip_nonfinite",
         "--save_every", "--dist_timeout"]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hostile=st.lists(st.sampled_from(HOSTILE_LINES), max_size=2), flags=st.dictionaries(
    st.sampled_from(FLAGS), NUMBERS, max_size=2), skip=st.booleans())
def test_any_rows_and_flag_values_end_in_exit_0_or_one_line(tmp_path_factory, capfd, hostile, flags, skip):
    tmp = tmp_path_factory.mktemp("adv")
    data = write_lines(tmp / "d.jsonl", [json.dumps(r) for r in GOOD] + hostile)
    out = str(tmp / "out")
    argv = RUN + ["--dataset", data, "--output_dir", out] + ["--skip_bad_rows"] * skip
    argv += [x for flag, value in flags.items() for x in (f"{flag}={value}",)]
    if "--lora_r" in flags or "--lora_alpha" in flags:
        argv += ["--lora_targets", "all-linear+head"]
    code, err = outcome(argv, capfd)
    assert code in (0, 1, 2), (argv, code, err[-2000:])
    if code:
        assert one_line(err), (argv, err[-3000:])
    if code == 2:
        assert not os.path.exists(out), argv  # a bad input writes nothing
    else:
        assert os.path.exists(os.path.join(out, "metrics.jsonl")), argv

# -----------------------------------------------------------------------------
# the JSON reader, fuzzed


FRAGMENTS = st.sampled_from(['{"prompt": "a", "chosen": "b", "rejected": "c"}', "\n", "\r\n", "\u2028", "\ufeff",
                             "[" * 3000, "]" * 3000, '"\\ud800"', '"\\udc00\\ud800"', '"\\ud83d\\ude00"', "9" * 5000,
                             "\x00", "{", "}", ",", ":", "NaN", "-Infinity", '"', "\\", "[", "]", "null", " "])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.one_of(FRAGMENTS, st.text(max_size=20)), max_size=12), suffix=st.sampled_from(
    [".jsonl", ".json", ".jsonl.gz"]), skip=st.booleans())
def test_the_json_reader_returns_rows_or_one_data_error(tmp_path_factory, parts, suffix, skip):
    path = tmp_path_factory.mktemp("fuzz") / f"d{suffix}"
    raw = "".join(parts).encode("utf-8", "surrogatepass")
    path.write_bytes(gzip.compress(raw) if suffix.endswith(".gz") else raw)
    try:
        rows = read_json_rows(str(path), skip)
    except DataError as e:
        assert "\n" not in str(e)
        return
    json.dumps(rows, ensure_ascii=False).encode("utf-8")  # what came back holds only characters, nesting it can take


def test_a_separator_inside_a_string_does_not_split_its_line(tmp_path):
    row = {"prompt": "one\u2028two\u0085three\u2029", "chosen": "a", "rejected": "b"}
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(row, ensure_ascii=False)] * 3)
    assert read_json_rows(path) == [row] * 3


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "\\ud800"}', "line 2: holds a lone UTF-16 surrogate (e.g. \\ud800), which is not a character"),
    ("[" * 100_000 + "]" * 100_000, "line 2: nested too deeply to be read"),
    ("9" * 5000, "line 2: not readable as JSON (Exceeds the limit (4300 digits)"),
])
def test_a_row_json_cannot_hold_is_named_and_skippable(tmp_path, line, message):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD[0]), line, json.dumps(GOOD[1])])
    with pytest.raises(DataError, match="^" + re.escape(f"{path}: {message}")):
        read_json_rows(path)
    assert read_json_rows(path, skip_bad_rows=True) == GOOD[:2]

# -----------------------------------------------------------------------------
# a full disk: a real small tmpfs where this user can mount one, else RLIMIT_FSIZE (writes past the limit fail with
# EFBIG, as a full disk fails them with ENOSPC: the same OSError path)


def small_disk(path, size):
    """Mount a tmpfs of `size` bytes at `path`; False where this user cannot."""
    os.makedirs(path)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("size, flags, message", [
    (16_000, ["--max_steps", "80"], "cannot append to {out}/metrics.jsonl at step "),
    (1_000_000, ["--max_steps", "2", "--save_every", "1"], "step 1: cannot write the checkpoint ("),
    (256_000, ["--max_steps", "2"], "cannot write the final weights into {out} ("),
])
def test_a_full_disk_is_one_line_and_leaves_no_half_written_folder(tmp_path, size, flags, message):
    disk = tmp_path / "disk"
    mounted = small_disk(disk, size)
    out = str(disk / "run")
    limit = None if mounted else lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    try:
        r = subprocess.run([sys.executable, os.path.join(ROOT, "tr_dpo.py"), *RUN[:-2], *flags, "--output_dir", out],
                           env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=limit)
        assert r.returncode == 1 and one_line(r.stderr), r.stderr[-3000:]
        line = last(r.stderr)
        assert line.startswith("error: " + message.format(out=out)), line
        assert line.endswith("no checkpoint was written (--save_every N writes one every N steps)"), line
        assert not [n for n in os.listdir(out) if n.endswith(".tmp") or n in ("policy", "checkpoint")]
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)

# -----------------------------------------------------------------------------
# nothing lost: earlier records, the lock, moved data and checkpoints, signals


@pytest.mark.parametrize("name", ["metrics.jsonl", "curves.png", "policy.tmp", "base"])
def test_any_earlier_record_is_kept_without_overwrite(tmp_path, capfd, name):
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_text("earlier")
    code, err = outcome(RUN + ["--output_dir", str(out)], capfd)
    suffix = "" if name in ("metrics.jsonl", "curves.png") else "/"
    assert (code, err) == (2, f"error: {out} holds a run ({name}{suffix}): pass --overwrite to replace it, or "
                              f"choose another --output_dir\n")
    assert sorted(os.listdir(out)) == [name] and (out / name).read_text() == "earlier"


def test_a_record_name_taken_by_a_folder_is_refused_before_overwrite(tmp_path, capfd):
    out = tmp_path / "run"
    (out / "curves.png").mkdir(parents=True)
    code, err = outcome(RUN + ["--output_dir", str(out), "--overwrite"], capfd)
    assert (code, err) == (2, f"error: {out}/curves.png is a folder; the run writes its curves.png there: move it or "
                              f"choose another --output_dir\n")
    assert os.listdir(out) == ["curves.png"]


def test_a_lock_that_is_a_link_is_not_written_through(tmp_path, capfd):
    out, victim = tmp_path / "run", tmp_path / "victim"
    out.mkdir()
    victim.write_text("precious\n")
    os.symlink(victim, out / ".lock")
    code, err = outcome(RUN + ["--output_dir", str(out)], capfd)
    assert (code, err) == (2, f"error: {out}/.lock is a symbolic link; remove it (a run writes its pid there)\n")
    assert victim.read_text() == "precious\n" and sorted(os.listdir(out)) == [".lock"]


@pytest.fixture(scope="module")
def data_run(tmp_path_factory):
    """A run on a local file with checkpoint/ at step 2."""
    tmp = tmp_path_factory.mktemp("data_run")
    data = write_lines(tmp / "d.jsonl", [json.dumps(r) for r in GOOD * 2])
    out = str(tmp / "run")
    tr_dpo.main(RUN[:-2] + ["--max_steps", "2", "--save_every", "2", "--dataset", data, "--output_dir", out])
    return data, out


@pytest.mark.slow
@pytest.mark.parametrize("link", [False, True])
def test_resume_takes_the_same_data_at_a_new_path_and_says_so(data_run, tmp_path, capfd, link):
    data, run = data_run
    out = shutil.copytree(run, tmp_path / "run")
    moved = str(shutil.copy(data, tmp_path / "moved.jsonl"))
    given_path = moved
    if link:  # the old name a link to the new place: resolved, it is the new path
        given_path = str(tmp_path / "link.jsonl")
        os.symlink(moved, given_path)
    code, err, said = outcome(RUN[:-2] + ["--max_steps", "3", "--resume", "--dataset", given_path, "--output_dir",
                                          str(out)], capfd, stdout=True)
    assert code == 0, err[-2000:]
    assert said.count(f"resume: {out}/checkpoint at step 2;") == 1
    assert (f"; --dataset {os.path.realpath(data)} -> {os.path.realpath(moved)} (the same data: its sha256 "
            f"matches)") in said, said
    # a file with other bytes at the new path is still refused
    with open(moved, "a") as f:
        f.write(json.dumps(GOOD[0]) + "\n")
    code, err = outcome(RUN[:-2] + ["--max_steps", "4", "--resume", "--dataset", given_path, "--output_dir",
                                    str(out)], capfd)
    assert code == 2 and one_line(err) and "was written with --dataset" in err, err


@pytest.mark.slow
def test_a_checkpoint_moved_away_and_linked_back_keeps_saving(data_run, tmp_path, capfd):
    data, run = data_run
    out = tmp_path / "run"
    shutil.copytree(run, out)
    shutil.move(out / "checkpoint", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", out / "checkpoint")
    os.symlink(tmp_path / "gone", out / "checkpoint.old")  # a stale link from an earlier swap
    flags = RUN[:-2] + ["--save_every", "1", "--resume", "--dataset", data, "--output_dir", str(out)]
    for steps in ("3", "4"):  # two saves: the link swapped out, then a plain folder swapped
        code, err = outcome(flags + ["--max_steps", steps], capfd)
        assert code == 0, err[-2000:]
    assert checkpoint.find_checkpoint(str(out))[1]["step"] == 4
    assert sorted(os.listdir(tmp_path / "elsewhere")) == [".metadata", "__0_0.distcp", "rng_0.pt", "run.json",
                                                         "trainer.pt"]  # never deleted
    assert not os.path.lexists(out / "checkpoint.old")


@pytest.mark.slow
def test_sigint_writes_the_checkpoint_and_exits_130(tmp_path):
    out = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tr_dpo.py"), *RUN[:-2], "--max_steps", "500",
                             "--output_dir", out], env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (
            os.path.exists(metrics) and open(metrics).read().count("\n") >= 2):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130  # 128 + SIGINT: `python tr_dpo.py && next` does not run next
    step = checkpoint.find_checkpoint(out)[1]["step"]
    assert f"stopped by a signal after step {step}; continue with --resume" in stdout

# -----------------------------------------------------------------------------
# model, tokenizer and adapter folders that load and would fail later


def edited(src, tmp_path, edit):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    edit(str(dst))
    return str(dst)


def edit_json(name, change):
    def edit(folder):
        path = os.path.join(folder, name)
        cfg = json.load(open(path))
        change(cfg)
        json.dump(cfg, open(path, "w"))
    return edit


def add_special_token(folder):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    tok.save_pretrained(folder)


def raising_template(folder):
    edit_json("tokenizer_config.json", lambda c: c.update(chat_template=(
        "{% for m in messages %}{% if loop.index0 == 1 and m.role == 'user' %}{{ raise_exception('roles must "
        "alternate') }}{% endif %}{{ m.content }}{% endfor %}")))(folder)


CHAT = [{"prompt": [{"role": "user", "content": f"q{i}"}, {"role": "user", "content": "again"}],
         "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}
        for i in range(12)]


@pytest.mark.parametrize("edit, flags, message", [
    (edit_json("config.json", lambda c: c.update(max_position_embeddings=64)), ["--max_length", "128"],
     "--max_length 128 is beyond the 64 positions --model {m} was built for (max_position_embeddings); lower "
     "--max_length"),
    (edit_json("tokenizer_config.json", lambda c: c.pop("eos_token")), [],
     "--model {m}: its tokenizer has no EOS token, which ends every response; set eos_token in its "
     "tokenizer_config.json"),
    (add_special_token, [], "--model {m}: its tokenizer has token id 258, beyond the model's 258 embedding rows"),
    (raising_template, ["--dataset", "CHAT"], "the chat template fails on the row whose prompt begins 'q0' "
                                              "(TemplateError: roles must alternate); fix or drop that row"),
])
def test_a_model_folder_that_would_fail_at_the_first_batch_is_one_line(saved_tiny, tmp_path, capfd, edit, flags,
                                                                       message):
    m = edited(saved_tiny, tmp_path, edit)
    chat = write_lines(tmp_path / "chat.jsonl", [json.dumps(r) for r in CHAT])
    out = tmp_path / "run"
    flags = [chat if f == "CHAT" else f for f in flags]
    code, err = outcome(RUN + ["--model", m, "--output_dir", str(out), *flags], capfd)
    assert code == 2 and one_line(err) and last(err).startswith("error: " + message.format(m=m)), err
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--lora_targets", "query_key_value,dens_h_to_4h"], "--lora_targets query_key_value,dens_h_to_4h: dens_h_to_4h "
                                                         "names no linear layer of the model; its linear layers are "
                                                         "named dense, dense_4h_to_h, dense_h_to_4h, lm_head, "
                                                         "query_key_value"),
    (["--lora_r", "100000"], "--lora_r 100000 is beyond the width of "),
])
def test_lora_flags_that_name_nothing_or_too_much_are_one_line(tmp_path, capfd, flags, message):
    out = tmp_path / "run"
    code, err = outcome(RUN + ["--lora_r", "2", *flags, "--output_dir", str(out)], capfd)
    assert code == 2 and one_line(err) and last(err).startswith("error: " + message), err
    assert not out.exists()


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter") / "run"
    tr_dpo.main(RUN + ["--lora_r", "2", "--output_dir", str(out)])
    return out / "policy"


def cut_config(folder):
    path = os.path.join(folder, "adapter_config.json")
    text = open(path).read()
    open(path, "w").write(text[:len(text) // 2])


def drop_weights(folder):
    for name in os.listdir(folder):
        if name.startswith("adapter_model"):
            os.remove(os.path.join(folder, name))


@pytest.mark.parametrize("edit, message", [
    (cut_config, "{m}/adapter_config.json: not valid JSON ("),
    (drop_weights, "--model {m}: cannot load the adapter ("),
    (lambda f: edit_json("adapter_config.json", lambda c: c.update(base_model_name_or_path=f))(f),
     "{m}/adapter_config.json: its base model {m} leads back to the adapter itself"),
    (edit_json("adapter_config.json", lambda c: c.update(base_model_name_or_path=None)),
     "{m}/adapter_config.json names no base model (base_model_name_or_path)"),
])
def test_a_broken_adapter_folder_is_one_line(adapter_run, tmp_path, capfd, edit, message):
    m = edited(adapter_run, tmp_path, edit)
    out = tmp_path / "run"
    code, err = outcome(RUN + ["--model", m, "--output_dir", str(out)], capfd)
    assert code == 2 and one_line(err) and last(err).startswith("error: " + message.format(m=m)), err
    assert not out.exists()


@pytest.mark.slow
def test_a_run_json_with_fields_of_another_type_is_named(data_run, tmp_path, capfd):
    data, run = data_run
    out = shutil.copytree(run, tmp_path / "run")
    path = os.path.join(out, "checkpoint", "run.json")
    rec = json.load(open(path))
    rec["flags"] = None
    json.dump(rec, open(path, "w"))
    code, err = outcome(RUN[:-2] + ["--max_steps", "3", "--resume", "--dataset", data, "--output_dir", str(out)],
                        capfd)
    assert (code, err) == (2, f"error: --resume: no complete checkpoint in {out} (checkpoint/: run.json of another "
                              f"format); start a new run (--overwrite)\n")


def test_a_dataset_folder_with_a_dangling_link_is_refused_up_front(tmp_path, capfd):
    folder = tmp_path / "ds" / "data"
    folder.mkdir(parents=True)
    write_lines(folder / "train.jsonl", [json.dumps(r) for r in GOOD])
    os.symlink(tmp_path / "nothing", folder / "extra.jsonl")
    out = tmp_path / "run"
    code, err = outcome(RUN + ["--dataset", str(tmp_path / "ds"), "--output_dir", str(out)], capfd)
    assert (code, err) == (2, f"error: --dataset {tmp_path}/ds: {folder}/extra.jsonl is a link to nothing; fix or "
                              f"remove it\n")
    assert not out.exists()


def test_a_huge_row_is_cut_before_it_is_tokenised(monkeypatch):
    from common import tokenize_rows
    from engineering.models import byte_tokenizer
    tok = byte_tokenizer()
    lengths, real = [], type(tok).__call__

    def spy(self, texts, **kw):
        lengths.extend(map(len, texts))
        return real(self, texts, **kw)
    monkeypatch.setattr(type(tok), "__call__", spy)
    row = {"prompt": "p" * 1000 + "END", "chosen": "c" * 10_000_000, "rejected": "r"}
    (ex,) = tokenize_rows(tok, [row], ("chosen", "rejected"), 16, 8)
    # 4 x 16 tokens x 13 characters (the longest token, <|endoftext|>) = 832 characters at most reach the tokenizer
    assert max(lengths) == 832
    assert ex["prompt"] == list(b"pppppEND") and ex["chosen"] == list(b"cccccccc")  # as if tokenised whole

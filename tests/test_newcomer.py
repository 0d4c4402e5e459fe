"""What a new user meets first: --help with every default, one line and exit code 2 for every bad input
(a flag, a malformed file, a finished run in --output_dir, a hub model or dataset that cannot be fetched), the summary
at the end of a run, and no deprecation warnings or extra progress bars. Offline: the hub tests give the child
process an empty Hugging Face cache and point the hub at a closed port, or a stub server, on this machine."""
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch

import evaluate
import sft
import tr_dpo
import tr_ipo
import tr_kto
from conftest import ENV, FAST, LOGPS_LINE, ROOT, metrics, torchrun
from engineering.cli import InputError, exit_on_bad_input
from engineering.hub import fetching
from engineering.models import load_model

SCRIPTS = [sft, tr_dpo, tr_ipo, tr_kto]
slow = pytest.mark.slow

# -----------------------------------------------------------------------------
# --help


def help_blocks(text):
    """{flag: its whole help text, wrapped lines joined} from argparse's --help output."""
    blocks, flag = {}, None
    for line in text.splitlines():
        m = re.match(r"  (-\w|--\w+)", line)
        if m:
            flag = m.group(1)
            blocks[flag] = line.strip()
        elif flag and line.startswith("      "):
            blocks[flag] += " " + line.strip()
        else:
            flag = None
    return blocks


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_default_and_keeps_the_commands(script, capsys):
    with pytest.raises(SystemExit) as e:
        script.get_args(["--help"])
    text = capsys.readouterr().out
    blocks = help_blocks(text)
    assert e.value.code == 0 and len(blocks) > 30
    assert [f for f, b in blocks.items() if "(default: " not in b] == ["-h"]  # every flag has help text and default
    for flag in ("--warmup_steps", "--weight_decay", "--max_grad_norm", "--epochs", "--seed", "--log_every"):
        assert not re.match(rf"{flag} \w+ \(default", blocks[flag])  # a help text before the default
    assert "--output_dir OUTPUT_DIR where metrics.jsonl" in blocks["--output_dir"]
    assert f"(default: out/{script.__name__})" in blocks["--output_dir"]
    assert re.search(r"--max_steps 0 .* \\\n {8}--", text)  # the docstring's commands keep their line breaks


@pytest.mark.parametrize("script", SCRIPTS + [evaluate])
def test_help_is_short_per_flag_and_keeps_every_line_continuation(script, capsys):
    """Each flag's help fits one ~120-character line (the long story is in docs/), and every command the docstring
    continues with a backslash is shown as written, not joined into one line."""
    with pytest.raises(SystemExit):
        script.get_args(["--help"])
    text = capsys.readouterr().out
    for flag, block in help_blocks(text).items():
        words = re.sub(r"^(-\w|--\w+)( [A-Z_]+| \{[^}]*\})?\s+", "", block)  # the flag and its metavar
        words = re.sub(r" \(default: .*\)$", "", words)
        assert len(words) <= 120, (flag, len(words), words)
    continued = [line for line in script.__doc__.splitlines() if line.endswith("\\")]
    assert continued and all(line in text.splitlines() for line in continued)


@pytest.mark.parametrize("script, heading, flags", [
    (tr_dpo, "TR-DPO", {"--beta": "0.05"}),
    (tr_ipo, "TR-IPO", {"--beta": "0.5", "--logps": "mean"}),
    (tr_kto, "TR-KTO", {"--beta": "0.1", "--desirable_weight": "1.0", "--undesirable_weight": "1.0"}),
])
def test_help_lists_the_method_flags_under_the_method(script, heading, flags, capsys):
    with pytest.raises(SystemExit):
        script.get_args(["--help"])
    section = help_blocks(capsys.readouterr().out.split(f"\n{heading}:\n")[1])
    assert all(section[f].endswith(f"(default: {default})") for f, default in flags.items())


@pytest.mark.parametrize("script, absent", [
    (sft, ("--ref_update", "--alpha", "--tau", "--ref_dtype", "--share_prompt", "--beta")),  # no reference in SFT
    (tr_kto, ("--share_prompt",)),  # one completion per prompt: nothing to share
])
def test_help_lists_only_the_flags_a_script_uses(script, absent, capsys):
    with pytest.raises(SystemExit):
        script.get_args(["--help"])
    blocks = help_blocks(capsys.readouterr().out)
    assert not [f for f in absent if f in blocks]
    with pytest.raises(InputError, match="unrecognized arguments: --tau 0"):
        sft.get_args(["--tau", "0"])  # refused, not silently ignored


def test_seed_and_threads_are_what_the_help_says(tmp_path):
    # --seed: rank r's torch RNG starts at seed + r (one process: rank 0) and the built-in model's initialisation
    # does not reseed it; --threads 0: one thread for a model of under 10M parameters (tiny: 0.13M) on a CPU,
    # restored afterwards
    from common import SequenceLogps
    from engineering.run import Run, launch
    seen, before = [], torch.get_num_threads()

    def train_loop(args, d):
        want = torch.Generator().manual_seed(7 + d.rank)
        model, _ = load_model(args.model, args.seed)  # initialised from --seed, in a forked RNG
        seen.append(torch.rand(3).tolist() == torch.rand(3, generator=want).tolist())
        Run(args, d, SequenceLogps(model), None, torch.optim.SGD(model.parameters()), None, 1)
        seen.append(torch.get_num_threads())
    launch(train_loop, tr_dpo.get_args, ["--seed", "7", "--output_dir", str(tmp_path / "out")])
    launch(train_loop, tr_dpo.get_args, ["--seed", "7", "--threads", "2", "--output_dir", str(tmp_path / "out")])
    assert seen == [True, 1, True, 2] and torch.get_num_threads() == before

def test_ci_runs_the_readme_test_line():
    """The README's two set-up lines (demo, tests) each start with the same venv step; .ci/run makes its own venv
    (in a temporary folder) and then runs the rest of the test line as written."""
    venv = "python3 -m venv .venv && . .venv/bin/activate && "
    readme = open(os.path.join(ROOT, "README.md")).read().splitlines()
    demo, tests = [line for line in readme if line.startswith(venv)]
    assert demo.endswith(" && python tr_dpo.py") and tests.endswith(" && python -m pytest -q")
    assert tests[len(venv):] in open(os.path.join(ROOT, ".ci", "run")).read().splitlines()

# -----------------------------------------------------------------------------
# bad input: one line on stderr, exit code 2, nothing written


def test_exit_on_bad_input(capsys):
    with pytest.raises(SystemExit) as e:
        with exit_on_bad_input():
            raise InputError("--alpha must be in (0, 1], got 2.0")
    assert (e.value.code, capsys.readouterr().err) == (2, "error: --alpha must be in (0, 1], got 2.0\n")
    with pytest.raises(KeyError):  # not a bad input: its traceback stays
        with exit_on_bad_input():
            raise KeyError("a bug")


def bad_input(script, argv, capfd):
    """Run script.main(argv) in this process; return (exit code, stdout, stderr) at the file-descriptor level, so
    that a library logging to stderr would show too."""
    with pytest.raises(SystemExit) as e:
        script.main(argv)
    out, err = capfd.readouterr()
    return e.value.code, out, err


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


GOOD_ROW = json.dumps({"prompt": "Q", "chosen": "a", "rejected": "b"})


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_reports_a_bad_flag_and_a_malformed_file_in_one_line(script, tmp_path, capfd):
    out = str(tmp_path / "out")
    assert bad_input(script, ["--lr", "abc", "--output_dir", out], capfd) == (
        2, "", "error: argument --lr: invalid float value: 'abc' (--help lists the flags)\n")
    bad = write_lines(tmp_path / "bad.jsonl", [GOOD_ROW] * 56 + ['{"prompt": "x", "chosen": '] + [GOOD_ROW] * 3)
    assert bad_input(script, ["--dataset", bad, "--eval_size", "2", "--output_dir", out], capfd) == (
        2, "", f"error: {bad}: line 57: not valid JSON (Expecting value); fix it or pass --skip_bad_rows\n")
    assert not os.path.exists(out)  # refused before anything was written


def test_bad_flags_and_rows_are_one_line_each(tmp_path, capfd):
    out = str(tmp_path / "out")
    no_rejected = json.dumps({"prompt": "Q", "chosen": "a"})
    missing = write_lines(tmp_path / "missing.jsonl", [GOOD_ROW, no_rejected] + [GOOD_ROW] * 4)
    for argv, message in [
        (["--bogus", "1"], "unrecognized arguments: --bogus 1 (--help lists the flags)"),
        (["--alpha", "2"], "argument --alpha: must be in (0, 1], got 2 (--help lists the flags)"),
        (["--batch_size", "12"], "--batch_size 12 must be divisible by world size 1 x --micro_batch_size 8"),
        (["--dataset", "nope.jsonl"], "unknown --dataset 'nope.jsonl': use toy, hh, hh:<subset>, tldr, a hub dataset "
                                      "id (org/name), or an existing .json/.jsonl/.jsonl.gz file or dataset folder"),
        (["--dataset", missing, "--eval_size", "2"],
         f"{missing}: row 2: missing field 'rejected' (fix the row, or pass --skip_bad_rows)"),
        (["--model", "tr-dpo-tests/no-such-model"],  # conftest sets HF_HUB_OFFLINE=1: the cache only
         "model 'tr-dpo-tests/no-such-model' is not in your Hugging Face cache, and HF_HUB_OFFLINE=1 forbids "
         "downloading it; pass a local folder as --model, or run once with network access and without HF_HUB_OFFLINE"),
    ]:
        assert bad_input(tr_dpo, argv + ["--output_dir", out], capfd) == (2, "", f"error: {message}\n"), argv
        assert not os.path.exists(out)


def test_a_folder_holding_a_run_is_not_overwritten(tmp_path, capfd):
    out = tmp_path / "run"
    (out / "policy").mkdir(parents=True)
    assert bad_input(tr_dpo, ["--output_dir", str(out)], capfd) == (
        2, "", f"error: {out} holds a run (policy/): pass --overwrite to replace it, or choose another --output_dir\n")
    (out / "checkpoint").mkdir()
    assert bad_input(sft, ["--output_dir", str(out)], capfd) == (
        2, "", f"error: {out} holds a run (policy/, checkpoint/): pass --overwrite to replace it, --resume to "
               f"continue it, or choose another --output_dir\n")
    assert sorted(os.listdir(out)) == ["checkpoint", "policy"]  # untouched


def test_fetching_offline_names_what_is_missing_and_the_fixes():
    with pytest.raises(InputError) as e:  # conftest sets HF_HUB_OFFLINE=1; an OSError is a cache miss
        with fetching("org/name", "dataset", "dataset 'org/name'", "a local .jsonl file as --dataset"):
            raise OSError("couldn't find them in the cached files")
    assert str(e.value) == ("dataset 'org/name' is not in your Hugging Face cache, and HF_HUB_OFFLINE=1 forbids "
                            "downloading it; pass a local .jsonl file as --dataset, or run once with network access "
                            "and without HF_HUB_OFFLINE")


def run(argv, env):
    """A script in a fresh process: (exit code, stdout, stderr, seconds)."""
    t0 = time.time()
    r = subprocess.run([sys.executable, *argv], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    return r.returncode, r.stdout, r.stderr, time.time() - t0


@slow
def test_command_line_errors_are_one_line_without_a_traceback(tmp_path):
    bad = write_lines(tmp_path / "bad.jsonl", [GOOD_ROW] * 56 + ['{"prompt": "x"} trailing'] + [GOOD_ROW] * 3)
    out = str(tmp_path / "out")
    assert run(["tr_kto.py", "--dataset", bad, "--output_dir", out], ENV)[:3] == (
        2, "", f"error: {bad}: line 57: not valid JSON (Extra data); fix it or pass --skip_bad_rows\n")
    assert run(["tr_ipo.py", "--tau", "0", "--output_dir", out], ENV)[:3] == (
        2, "", "error: argument --tau: must be an integer >= 1, got 0 (--help lists the flags)\n")
    assert not os.path.exists(out)


def closed_port():
    """A port on 127.0.0.1 that nothing listens on: a connection to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@slow
@pytest.mark.parametrize("hub", ["offline", "unreachable"])
def test_a_hub_model_or_dataset_that_cannot_be_fetched_is_one_line_within_seconds(hub, tmp_path):
    env = {**ENV, "HF_HOME": str(tmp_path / "empty_cache"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    if hub == "unreachable":  # online mode, the hub at a closed local port: never the network
        env = {k: v for k, v in env.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    out = str(tmp_path / "out")
    for flags, what, instead in [
        (["--model", "gpt2"], "model 'gpt2'", "a local folder as --model"),
        (["--dataset", "hh"], "dataset 'Anthropic/hh-rlhf' (--dataset hh)", "a local .jsonl file as --dataset"),
    ]:
        code, stdout, stderr, seconds = run(["tr_dpo.py", *flags, "--output_dir", out], env)
        if hub == "offline":
            assert stderr == (f"error: {what} is not in your Hugging Face cache, and HF_HUB_OFFLINE=1 forbids "
                              f"downloading it; pass {instead}, or run once with network access and without "
                              f"HF_HUB_OFFLINE\n")
        else:  # the middle is the HTTP library's own words for a refused connection
            assert re.fullmatch(rf"error: cannot reach the Hugging Face hub to fetch {re.escape(what)} \(.+\); pass "
                                rf"{re.escape(instead)}, or set HF_HUB_OFFLINE=1 if it is in your Hugging Face "
                                rf"cache\n", stderr)
        assert (code, stdout) == (2, "") and seconds < 30  # the hub libraries' retries took 55 s
    assert not os.path.exists(out)


@slow
def test_a_name_the_hub_does_not_know_is_one_line(tmp_path):
    class NotFound(http.server.BaseHTTPRequestHandler):  # a hub on 127.0.0.1 that knows no repository
        def do_GET(self):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {k: v for k, v in ENV.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", HF_HOME=str(tmp_path / "empty_cache"),
               HF_HUB_DISABLE_TELEMETRY="1")
    out = str(tmp_path / "out")
    try:
        for flag, instead in (("--model", "a local folder as --model"),
                              ("--dataset", "a local .jsonl file or dataset folder as --dataset")):
            code, stdout, stderr, _ = run(["tr_dpo.py", flag, "nobody/a-typo", "--output_dir", out], env)
            assert (code, stdout) == (2, "")  # the middle is the hub library's own words for the 404
            assert re.fullmatch(rf"error: cannot fetch {flag[2:]} 'nobody/a-typo' from the Hugging Face hub \([^\n]*404"
                                rf"[^\n]*\); check the name, or pass {re.escape(instead)}\n", stderr), stderr
    finally:
        server.shutdown()
    assert not os.path.exists(out)

# -----------------------------------------------------------------------------
# a run: the summary on stdout, a second run refused, --overwrite; no warnings or shard bars


def summary_lines(out, keys, ref_updates=None, last_update=None):
    """The summary's lines expected from out/metrics.jsonl (the time on the first line as a pattern)."""
    train, ev = metrics(out, "loss")[-1], metrics(out, "eval_loss")[-1]
    head = rf"done: step {train['step']}, \d+ s"
    if ref_updates is not None:
        head += rf", {ref_updates} reference update\(s\), the last after step {last_update}"
    fmt = lambda rec, prefix: ", ".join(f"{k} {rec[prefix + k]:.4g}" for k in keys if prefix + k in rec)  # noqa: E731
    lines = [head, f"train (last log interval): {fmt(train, '')}", f"eval: {fmt(ev, 'eval_')}"]
    return lines + ([f"eval vs initial reference: {fmt(ev, 'eval_init_')}"] if "eval_init_loss" in ev else [])


@slow
def test_a_run_ends_with_a_summary_and_is_not_overwritten(tmp_path, capfd):
    out = str(tmp_path / "run")
    flags = FAST + ["--max_steps", "5", "--tau", "2", "--eval_every", "5", "--output_dir", out]
    tr_dpo.main(flags)
    stdout = capfd.readouterr().out.splitlines()
    stdout = stdout[[i for i, line in enumerate(stdout) if line.startswith("done: ")][0]:]
    expected = summary_lines(out, ("loss", "reward_accuracy", "reward_margin", "logps_margin"), 2, 4)
    assert re.fullmatch(expected[0], stdout[0]) and stdout[1:-1] == expected[1:]
    assert len(expected) == 4  # eval_init_ logged
    assert stdout[-1].startswith(f"wrote {out}/policy/, {out}/reference/, {out}/metrics.jsonl")
    assert bad_input(tr_dpo, flags, capfd) == (
        2, "", f"error: {out} holds a run (policy/, reference/, metrics.jsonl, curves.png): pass --overwrite to "
               f"replace it, or choose another --output_dir\n")
    tr_dpo.main(flags + ["--overwrite", "--max_steps", "3"])
    assert [m["step"] for m in metrics(out, "loss")] == [1, 2, 3]  # a fresh metrics.jsonl


@slow
def test_sft_summary(tmp_path, capfd):
    out = str(tmp_path)
    sft.main(FAST + ["--max_steps", "2", "--output_dir", out])
    stdout = capfd.readouterr().out.splitlines()
    stdout = stdout[[i for i, line in enumerate(stdout) if line.startswith("done: ")][0]:]
    expected = summary_lines(out, ("loss",))
    assert re.fullmatch(expected[0], stdout[0]) and stdout[1:-1] == expected[1:]
    assert stdout[-1].startswith(f"wrote {out}/policy/, {out}/metrics.jsonl")


def test_gradient_checkpointing_without_a_deprecation_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model, _ = load_model("tiny", gradient_checkpointing=True)
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


@slow
def test_two_processes_print_no_deprecation_warning_or_shard_bars(tmp_path):
    r = torchrun("tr_dpo.py", *FAST, "--max_steps", "2", "--output_dir", str(tmp_path))
    assert "Warning" not in r.stderr and "Writing model shards" not in r.stderr, r.stderr[-2000:]
    lines = r.stdout.splitlines()  # rank 0 alone prints the model's log-probs line and the summary
    assert lines[0] == LOGPS_LINE and lines[1].startswith("done: step 2, ")

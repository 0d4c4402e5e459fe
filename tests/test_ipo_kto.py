"""tr_ipo.py and tr_kto.py: KTO's data and KL reference point by hand and against a naive computation, IPO's
--logps, the demos. (Resume and 1 process vs 2 for every script: test_train.py.)"""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import tr_ipo
import tr_kto
from common import SequenceLogps, collate_pairs, global_batch, sequence_logps, tokenize_rows
from conftest import FAST, metrics, naive_logp
from engineering.cli import DataError
from engineering.data import load_preferences, load_unpaired, unpair
from engineering.models import load_model
from tr_kto import class_balance_warning, estimate_kl, mismatched_pairs

slow = pytest.mark.slow

# -----------------------------------------------------------------------------
# KTO data


def test_unpair_and_local_unpaired_rows(tmp_path):
    rows = [{"prompt": "p0", "chosen": "a", "rejected": "b"}, {"prompt": "p1", "chosen": "c", "rejected": "d"}]
    # all chosen first, then all rejected, so neighbours (KTO's mismatched pairs) have different prompts
    assert unpair(rows) == [{"prompt": "p0", "completion": "a", "label": True},
                            {"prompt": "p1", "completion": "c", "label": True},
                            {"prompt": "p0", "completion": "b", "label": False},
                            {"prompt": "p1", "completion": "d", "label": False}]
    path = tmp_path / "fb.jsonl"
    good = [{"prompt": f"q{i}", "completion": f" r{i}", "label": i % 3 == 0} for i in range(6)]
    path.write_text("\n".join(map(json.dumps, good)))
    train, evals = load_unpaired(str(path), eval_size=2)
    assert train == good[:4] and evals == good[4:]
    # a label that is not a JSON bool is refused, naming the file, row and field (a string "no" would be truthy)
    for bad in ("yes", 1):
        path.write_text("\n".join(map(json.dumps, good[:1] + [{"prompt": "q", "completion": " r", "label": bad}] + good[1:])))
        with pytest.raises(DataError, match=r"fb.jsonl: row 2: field 'label' must be true or false"):
            load_unpaired(str(path), eval_size=2)
        assert load_unpaired(str(path), eval_size=2, skip_bad_rows=True)[0] == good[:4]
    path.write_text("\n".join(json.dumps({"prompt": "q", "completion": " r", "label": x}) for x in ("true", "false", "true")))
    with pytest.raises(DataError, match=r"row 1: field 'label' must be true or false \(a JSON bool\), got 'true'"):
        load_unpaired(str(path), eval_size=1)


def test_class_balance_warning():
    rows = lambda n_desirable, n_undesirable: [{"label": True}] * n_desirable + [{"label": False}] * n_undesirable  # noqa: E731
    assert class_balance_warning(rows(50, 50), 1.0, 1.0) is None            # 50/50 = 1
    assert class_balance_warning(rows(40, 50), 1.33, 1.0) is None           # 53.2/50 = 1.064
    assert class_balance_warning(rows(50, 40), 1.0, 1.0) is None            # 50/40 = 1.25
    w = class_balance_warning(rows(100, 50), 1.0, 1.0)                      # 100/50 = 2: suggest lambda_D = 50/100
    assert "= 2," in w and "--desirable_weight 0.5 gives 1" in w
    assert "= 0.8," in class_balance_warning(rows(40, 50), 1.0, 1.0)        # 40/50 = 0.8 < 1
    assert "= inf," in class_balance_warning(rows(10, 0), 1.0, 1.0)
    assert "both classes" in class_balance_warning(rows(0, 10), 1.0, 1.0)

# -----------------------------------------------------------------------------
# KTO's KL reference point


def test_mismatched_pairs_by_hand():
    ex = [{"prompt": [1], "completion": [10], "label": True},
          {"prompt": [2, 2], "completion": [20, 20], "label": False},
          {"prompt": [3, 3, 3], "completion": [30], "label": True}]
    # prompt i with completion i+1, the last with the first
    assert mismatched_pairs(ex, 16, 8) == [{"prompt": [1], "completion": [20, 20]},
                                           {"prompt": [2, 2], "completion": [30]},
                                           {"prompt": [3, 3, 3], "completion": [10]}]
    # a neighbour with the same prompt (a pair's chosen and rejected) is skipped: prompts A A B C give
    # A(0) + B's completion, A(1) + B's, B + C's, C + A(0)'s
    ex = [{"prompt": [1], "completion": [10]}, {"prompt": [1], "completion": [11]},
          {"prompt": [2], "completion": [20]}, {"prompt": [3], "completion": [30]}]
    assert [p["completion"] for p in mismatched_pairs(ex, 16, 8)] == [[20], [20], [30], [10]]
    assert [p["prompt"] for p in mismatched_pairs(ex, 16, 8)] == [[1], [1], [2], [3]]
    # a long prompt with another example's long completion is truncated again: 4 + 4 > 5 keeps the last 2 prompt
    # tokens [3, 4] and cuts the completion to 5 - 2 = 3 tokens
    ex = [{"prompt": [1, 2, 3, 4], "completion": [5]}, {"prompt": [6], "completion": [7, 8, 9, 10]}]
    assert mismatched_pairs(ex, 5, 2) == [{"prompt": [3, 4], "completion": [7, 8, 9]},
                                          {"prompt": [6], "completion": [5]}]


def kl_setup():
    """A tiny policy, a different tiny 'reference', and the mismatched pairs of four unpaired toy examples."""
    policy, tok = load_model("tiny", seed=0)
    ref, _ = load_model("tiny", seed=1)
    rows = unpair(load_preferences("toy", eval_size=2)[1])  # 2 pairs -> 4 examples
    ex = tokenize_rows(tok, rows, ("completion",), 64, 32)
    return policy.eval(), ref.eval(), tok, ex, mismatched_pairs(ex, 64, 32)


def test_kl_estimate_matches_naive():
    policy, ref, tok, ex, pairs = kl_setup()
    # example 0's prompt goes with example 1's completion: toy rows 0 and 1 are different puzzles
    assert pairs[0]["prompt"] == ex[0]["prompt"] and pairs[0]["completion"] == ex[1]["completion"]
    assert tok.decode(ex[0]["prompt"]) != tok.decode(ex[1]["prompt"])
    with torch.no_grad():
        want = sum(naive_logp(policy, p["prompt"], p["completion"]) - naive_logp(ref, p["prompt"], p["completion"])
                   for p in pairs) / len(pairs)
        # this rank's positions in two micro-batches of the pairs, in another order: the mean is over all four
        got = estimate_kl(SequenceLogps(policy), SequenceLogps(ref), pairs, [[2, 0], [3, 1]], 3, tok.pad_token_id,
                          torch.device("cpu"))
    assert abs(want) > 0.1  # two different models: the estimate is far from 0, so the comparison means something
    assert got.item() == pytest.approx(want, abs=1e-4)


class TableLM(torch.nn.Module):
    """A stand-in for SequenceLogps that needs no transformers, so a child process starts fast: log pi(y|x) is the
    sum over response tokens of a fixed per-token log-prob table (a different table per seed)."""

    def __init__(self, seed):
        super().__init__()
        self.table = F.log_softmax(torch.randn(64, generator=torch.Generator().manual_seed(seed)), 0)

    def forward(self, input_ids, attention_mask, labels, positions=None):
        keep = labels != -100
        return (self.table[labels.clamp(min=0)] * keep).sum(1), keep.sum(1)


TABLE_EXAMPLES = [{"prompt": [1 + i], "completion": [10 + i] * (1 + i % 3)} for i in range(5)]


def _kl_rank(rank, tmp):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2)
    pairs = mismatched_pairs(TABLE_EXAMPLES, 16, 8)
    mine = [[0, 1, 2]] if rank == 0 else [[3, 4]]  # unequal shares: 2 micro-batches of 2 on rank 0, 1 on rank 1
    kl = estimate_kl(TableLM(0), TableLM(1), pairs, mine, 2, 0, torch.device("cpu"))
    torch.save(kl, os.path.join(tmp, f"kl_{rank}.pt"))
    dist.destroy_process_group()


@slow
def test_kl_estimate_is_the_same_on_every_rank(tmp_path):
    mp.spawn(_kl_rank, args=(str(tmp_path),), nprocs=2, join=True)
    k0, k1 = (torch.load(tmp_path / f"kl_{r}.pt") for r in (0, 1))
    # naive: prompt i with completion i+1 (mod 5); the log-ratio of a completion is the sum of its tokens' table gaps
    gap = TableLM(0).table - TableLM(1).table
    ratios = [gap[TABLE_EXAMPLES[(i + 1) % 5]["completion"]].sum().item() for i in range(5)]
    want = sum(ratios) / 5
    assert abs(sum(ratios[:3]) / 3 - want) > 0.01 and abs(sum(ratios[3:]) / 2 - want) > 0.01  # local means differ
    assert k0.item() == k1.item()  # every rank holds the same z0
    assert k0.item() == pytest.approx(want, abs=1e-5) and abs(want) > 0.1  # the mean over BOTH ranks' pairs

# -----------------------------------------------------------------------------
# the demos


@slow
def test_ipo_demo_learns(tmp_path):
    out = str(tmp_path)
    tr_ipo.main(FAST + ["--max_steps", "40", "--ref_update", "none", "--lr", "3e-3", "--output_dir", out])
    train = metrics(out, "loss")
    assert [m["step"] for m in train] == list(range(1, 41))
    # step 1: policy == reference, h = 0, loss = 1/(4 beta^2) = 1 for the default beta 0.5
    assert train[0]["loss"] == pytest.approx(1.0, abs=1e-6)
    assert sum(m["loss"] for m in train[-10:]) / 10 < 0.9
    assert sum(m["reward_accuracy"] for m in train[-10:]) / 10 > 0.65
    # the eval record covers the 16 held-out pairs: prompt + response bytes of both sequences, each response + EOS
    _, held_out = load_preferences("toy", eval_size=16)
    assert metrics(out, "eval_loss")[-1]["eval_tokens"] == sum(
        2 * len(r["prompt"].encode()) + len(r["chosen"].encode()) + len(r["rejected"].encode()) + 2 for r in held_out)


@slow
@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_ipo_logps_flag_reaches_the_loss(tmp_path, mode):
    out = str(tmp_path)
    tr_ipo.main(FAST + ["--max_steps", "1", "--logps", mode, "--output_dir", out])
    # the same first global batch scored by the initial model, independently of the script
    model, tok = load_model("tiny", seed=0)
    train = tokenize_rows(tok, load_preferences("toy", 16)[0], ("chosen", "rejected"), 128, 64)
    batch = [train[j] for j in global_batch(0, len(train), 8, 0)]
    with torch.no_grad():
        logps, n = sequence_logps(model, **collate_pairs(batch, tok.pad_token_id))
    chosen = (logps / n if mode == "mean" else logps)[:8]
    assert metrics(out, "loss")[0]["logps_chosen"] == pytest.approx(chosen.mean().item(), abs=1e-4)


@slow
def test_kto_demo_learns_and_counts_classes(tmp_path):
    out = str(tmp_path)
    tr_kto.main(FAST + ["--max_steps", "60", "--eval_every", "20", "--ref_update", "none", "--lr", "3e-3",
                        "--output_dir", out])
    train = metrics(out, "loss")
    # step 1: policy == reference, so r = 0 and the KL estimate is exactly 0: every loss is 1 - sigmoid(0) = 0.5
    assert train[0]["loss"] == 0.5 and train[0]["kl"] == 0.0
    assert all(m["kl"] >= 0 for m in train)
    # class counts: the labels of each step's global batch, recomputed from the data order
    rows = unpair(load_preferences("toy", 16)[0])
    want = [sum(rows[j]["label"] for j in global_batch(s, len(rows), 8, 0)) for s in range(60)]
    assert [m["n_desirable"] for m in train] == want
    assert [m["n_undesirable"] for m in train] == [8 - w for w in want]
    # learning, on the fixed eval set, where at step 0 (policy == reference) the loss is 0.5 and the margin 0; its
    # pairs make eval_reward_margin = beta * mean(r_chosen - r_rejected), the policy's preference (measured: 0.08)
    ev = metrics(out, "eval_loss")
    assert [m["step"] for m in ev] == [20, 40, 60]
    assert ev[-1]["eval_reward_margin"] > 0.04 and all(m["eval_reward_margin"] > 0 for m in ev)
    assert ev[-1]["eval_loss"] < 0.495 and ev[-1]["eval_kl"] >= 0
    assert ev[-1]["eval_n_desirable"] == ev[-1]["eval_n_undesirable"] == 16


@slow
def test_kto_one_class_micro_batches_of_one(tmp_path, capsys):
    # 10 desirable rows and 2 undesirable ones at the end (held out): training sees one class only
    path = tmp_path / "fb.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"\n\nHuman: reverse {i}{i + 1}\n\nAssistant:",
                                          "completion": f" {i + 1}{i}", "label": i < 10}) for i in range(12)))
    out = str(tmp_path / "out")
    tr_kto.main(["--dataset", str(path), "--eval_size", "2", "--batch_size", "4", "--micro_batch_size", "1",
                 "--max_steps", "3", "--log_every", "1", "--output_dir", out])
    assert "= inf, outside [1, 4/3]" in capsys.readouterr().out
    train = metrics(out, "loss")
    assert [(m["n_desirable"], m["n_undesirable"]) for m in train] == [(4.0, 0.0)] * 3
    assert all(m["undesirable_reward"] == 0.0 for m in train)  # no examples: 0 by convention, not nan
    assert all(0 < m["loss"] < 1 for m in train)  # 0 < 1 - sigmoid(x) < 1 for finite x
    assert "NaN" not in open(os.path.join(out, "metrics.jsonl")).read()
    ev = metrics(out, "eval_loss")[-1]
    assert (ev["eval_n_desirable"], ev["eval_n_undesirable"]) == (0.0, 2.0) and ev["eval_desirable_reward"] == 0.0


def test_kto_refuses_a_batch_of_one(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        tr_kto.main(["--batch_size", "1", "--micro_batch_size", "1", "--output_dir", str(tmp_path)])
    assert (e.value.code, capsys.readouterr().err) == (
        2, "error: --batch_size must be >= 2: z0 pairs each prompt with another example's completion\n")
    assert not os.listdir(tmp_path)  # refused before anything was written

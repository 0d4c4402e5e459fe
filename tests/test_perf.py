"""The speed options change no numbers they should not: --share_prompt gives the plain forward's log-probs and
gradients, --group_by_length keeps the global-batch semantics, and bench.py runs and writes its JSON."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

import bench
import tr_dpo
from common import Dist, collate_pairs, global_batch, rank_micro_batches, sequence_logps, tokenize_rows
from conftest import ROOT, metrics
from engineering.cli import InputError, add_common_args, check_args
from engineering.models import byte_tokenizer, load_model
from engineering.speed import collate_shared_prompt, example_lengths, shared_prompt_logps

slow = pytest.mark.slow

# prompts of 2, 20 and 31 bytes, so the shared layout left-pads two of them; responses of 1 to 27 tokens
ROWS = [{"prompt": "\n\nHuman: sort 312\n\nAssistant:", "chosen": " 123", "rejected": " 12"},
        {"prompt": "hi", "chosen": " a much longer answer here", "rejected": ""},
        {"prompt": "a medium prompt, 20b", "chosen": "x", "rejected": " yy"}]


# -----------------------------------------------------------------------------
# --share_prompt: each prompt once, its KV cache reused for chosen and rejected


def test_collate_shared_prompt_literal():
    tok = byte_tokenizer()  # token id == byte value; EOS 256, pad 257
    ex = tokenize_rows(tok, [{"prompt": "ab", "chosen": "c", "rejected": "de"},
                             {"prompt": "xyz", "chosen": "", "rejected": "f"}], ("chosen", "rejected"), 16, 8)
    b = collate_shared_prompt(ex, tok.pad_token_id)
    assert b["prompt_ids"].tolist() == [[257, 97, 98], [120, 121, 122]]  # left-padded: prompts end together
    assert b["prompt_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    # rows [0, B) chosen, [B, 2B) rejected, right-padded
    assert b["response_ids"].tolist() == [[99, 256, 257], [256, 257, 257], [100, 101, 256], [102, 256, 257]]
    assert b["response_mask"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]
    # flat indices n * R + t of the response positions t whose next token is a response token
    assert b["positions"].tolist() == [0, 6, 7, 9]
    # bench.py counts the same tokens as in the plain layout, a prompt once per response: 2+2, 3+1, 2+3, 3+2 = 18
    plain, shared = bench.Count(), bench.Count()
    plain.add(collate_pairs(ex, tok.pad_token_id))
    shared.add(b)
    assert plain.tokens == shared.tokens == 18


def logps_and_grads(model, batch, fn):
    model.zero_grad(set_to_none=True)
    logps, n = fn(model, **batch)
    (logps * torch.linspace(1, 2, len(logps))).sum().backward()  # distinct weights: a row mix-up would show
    return logps.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_share_prompt_matches_plain_forward_fp32():
    model, tok = load_model("tiny", seed=0)
    model.train()
    ex = tokenize_rows(tok, ROWS, ("chosen", "rejected"), 64, 32)
    plain = logps_and_grads(model, collate_pairs(ex, tok.pad_token_id), sequence_logps)
    shared = logps_and_grads(model, collate_shared_prompt(ex, tok.pad_token_id), shared_prompt_logps)
    assert (shared[0] - plain[0]).abs().max().item() <= 1e-5
    assert shared[1].tolist() == plain[1].tolist() == [len(e[k]) for k in ("chosen", "rejected") for e in ex]
    assert shared[2].keys() == plain[2].keys()
    for k in plain[2]:
        torch.testing.assert_close(shared[2][k], plain[2][k], rtol=1e-4, atol=1e-5, msg=k)
    # the gradient reaches the prompt through its cached keys and values: bytes that occur only in prompts
    # ("H", "u", "A") get embedding gradients, and the same ones
    emb = "gpt_neox.embed_in.weight"
    for byte in b"HuA":
        assert plain[2][emb][byte].abs().sum() > 0
        torch.testing.assert_close(shared[2][emb][byte], plain[2][emb][byte], rtol=1e-4, atol=1e-6)


def test_share_prompt_without_positions_and_under_no_grad():
    model, tok = load_model("tiny", seed=1)
    ex = tokenize_rows(tok, ROWS, ("chosen", "rejected"), 64, 32)
    b = collate_shared_prompt(ex, tok.pad_token_id)
    with torch.no_grad():
        want, _ = shared_prompt_logps(model, **b)
        got, _ = shared_prompt_logps(model, **{k: v for k, v in b.items() if k != "positions"})
        plain, _ = sequence_logps(model, **{k: v for k, v in collate_pairs(ex, tok.pad_token_id).items()
                                            if k != "positions"})
    assert torch.equal(want, got)
    assert (want - plain).abs().max().item() <= 1e-5


def test_share_prompt_refuses_gradient_checkpointing():
    model, tok = load_model("tiny", seed=0, gradient_checkpointing=True)
    model.train()
    b = collate_shared_prompt(tokenize_rows(tok, ROWS, ("chosen", "rejected"), 64, 32), tok.pad_token_id)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        shared_prompt_logps(model, **b)
    args = add_common_args(argparse.ArgumentParser(), "run").parse_args(["--share_prompt", "--gradient_checkpointing"])
    with pytest.raises(InputError, match="exclude each other"):
        check_args(args, world_size=1)


@slow
def test_tr_dpo_share_prompt_same_run(tmp_path):
    """Two optimizer steps of tr_dpo.py with and without --share_prompt: the same log line, value for value."""
    runs = {}
    for name, extra in (("plain", []), ("shared", ["--share_prompt"])):
        out = str(tmp_path / name)
        tr_dpo.main(["--max_steps", "2", "--batch_size", "8", "--micro_batch_size", "4", "--eval_size", "8",
                     "--log_every", "1", "--eval_every", "0", "--ref_update", "soft", "--tau", "1",
                     "--lr", "3e-3", "--output_dir", out] + extra)
        runs[name] = metrics(out)
    plain, shared = runs["plain"], runs["shared"]
    assert [m["step"] for m in plain] == [m["step"] for m in shared] == [1, 2, 2]  # two steps, then the eval
    assert {"loss", "reward_margin", "logps_chosen", "grad_norm"} <= plain[1].keys() and "eval_loss" in plain[2]
    for a, b in zip(plain, shared):
        assert a.keys() == b.keys()
        for k in a.keys() - {"tokens_per_s", "s_per_step"}:  # the wall-clock measurements
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), k


# -----------------------------------------------------------------------------
# --group_by_length: sorted inside random chunks, still a function of the seed only


def padding(batches, lengths):
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_group_by_length_semantics():
    g = torch.Generator().manual_seed(0)
    n, bs = 1000, 16
    lengths = torch.randint(5, 500, (n,), generator=g)
    per_epoch = n // bs
    grouped = lambda s, seed=3: global_batch(s, n, bs, seed, lengths, group_batches=8)  # noqa: E731
    epoch = [grouped(s) for s in range(per_epoch)]
    # a function of (step, seed, lengths) only, and not the plain order
    assert epoch == [grouped(s) for s in range(per_epoch)]
    assert epoch != [grouped(s, seed=4) for s in range(per_epoch)]
    assert epoch != [global_batch(s, n, bs, 3) for s in range(per_epoch)]
    # each epoch: disjoint batches of bs distinct examples (the tail of n % bs is left out, as before)
    flat = [i for b in epoch for i in b]
    assert len(flat) == len(set(flat)) == per_epoch * bs
    # each grouped batch holds the examples of one chunk of the plain permutation, sorted longest first
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3 * 100003))[:per_epoch * bs].tolist()
    chunks = [set(perm[c:c + 8 * bs]) for c in range(0, len(perm), 8 * bs)]
    for b in epoch:
        assert any(set(b) <= c for c in chunks)
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    # the next epoch is a new order
    assert grouped(per_epoch) != epoch[0]
    # far less padding than the plain order
    plain = [global_batch(s, n, bs, 3) for s in range(per_epoch)]
    assert padding(epoch, lengths.tolist()) < padding(plain, lengths.tolist()) / 3
    # the world size only splits a global batch, contiguously: 1 rank and 2 ranks see the same micro-batches
    for b in epoch[:5]:
        one = rank_micro_batches(b, Dist(0, 0, 1, torch.device("cpu")), 4)
        two = [mb for r in range(2) for mb in rank_micro_batches(b, Dist(r, r, 2, torch.device("cpu")), 4)]
        assert one == two


def test_group_by_length_off_is_the_plain_order():
    # lengths=None must leave the plain permutation untouched (resumed runs and old results depend on it)
    for step in (0, 7, 13):
        perm = torch.randperm(100, generator=torch.Generator().manual_seed(5 * 100003 + step // 12))
        assert global_batch(step, 100, 8, 5) == perm[(step % 12) * 8:(step % 12 + 1) * 8].tolist()


def test_example_lengths():
    ex = [{"prompt": [1, 2], "chosen": [3], "rejected": [4, 5, 6]},
          {"prompt": [1], "completion": [2, 3], "label": True}]
    assert example_lengths(ex).tolist() == [5, 3]
    # with --share_prompt prompts and responses are padded apart: sort by prompt length, then response length
    assert example_lengths(ex, share_prompt=True).tolist() == [2 * 2**20 + 3, 1 * 2**20 + 2]


# -----------------------------------------------------------------------------
# bench.py: a smoke test (the benchmark itself does not run in CI)


@slow
@pytest.mark.parametrize("counts", ["0", "1,x", "1,", "65", "99999999999999999999"])
def test_bench_fsdp_procs_out_of_range_is_refused(counts):
    # the type alone decides, before any process starts: whole numbers from 1 to 64, each in range
    with pytest.raises(argparse.ArgumentTypeError, match="from 1 to 64"):
        bench.process_counts(counts)
    assert bench.process_counts("1,2,64") == [1, 2, 64]


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--model", "tiny", "--methods", "dpo",
                        "--configs", "plain,share_prompt,lora", "--steps", "2", "--warmup", "1", "--batch_size", "4",
                        "--micro_batch_size", "2", "--lengths", "24:8", "--repeats", "1", "--no_trl", "--threads", "1",
                        "--components", "update", "--out", str(out)],
                       capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {"settings", "runs", "summary", "components"} <= res.keys()
    runs = res["runs"]
    assert [(x["method"], x["config"]) for x in runs] == [("dpo", "plain"), ("dpo", "share_prompt"), ("dpo", "lora")]
    for x in runs:
        assert {"tokens_per_s", "ms_per_step", "cpu_ms_per_step", "peak_mem_mb", "padding_share", "steps_timed"} <= x.keys()
        assert x["steps_timed"] == len(x["cpu_ms_all"]) == 2 and x["tokens_per_s"] > 0 and 0 <= x["padding_share"] < 1
        # fixed lengths 24:8, 4 pairs per step, 8 sequences of 24 + 8 tokens: 256 tokens per step, as logged
        assert x["tokens_per_step"] == x["logged_tokens_per_step"] == [256, 256]
        assert x["tokens_per_s"] == pytest.approx(512 / sum(x["step_ms_all"]) * 1e3, rel=2e-2)
    for x in res["summary"]:  # tau 1: an update every step, timed by the update component
        update = res["components"]["update"]["ours_lora16" if x["config"] == "lora" else "ours_float32"]
        assert x["ref_update_share"] == pytest.approx(update["ms"] / x["ms_per_step"])
    assert "dpo | share_prompt" in r.stdout and "speed_vs_plain" in r.stdout and "cpu_vs_plain" in r.stdout


def test_bench_update_component():
    res = bench.bench_update({"model": "tiny", "k": 2})
    n = sum(p.numel() for p in load_model("tiny")[0].parameters())
    assert res["n_params"] == n
    # GB/s counts the bytes each pass must move per parameter: the fp32 lerp reads the policy (4) and reads and
    # writes the reference (4 + 4); with a bf16 reference 4 + 2 + 2; the plain fp32 copy reads 4 and writes 4
    per = {"ours_float32": 12, "ours_bfloat16": 8, "copy_float32": 8, "trl_float32": 12}
    assert {"ours_float32", "ours_bfloat16", "copy_float32"} <= res.keys()
    for name in per.keys() & res.keys():
        assert res[name]["gb_per_s"] == pytest.approx(n * per[name] / (res[name]["ms"] / 1e3) / 1e9), name
    assert res["gb_per_s"] == res["ours_float32"]["gb_per_s"]
    assert res["time_vs_copy"] == pytest.approx(res["ours_float32"]["ms"] / res["copy_float32"]["ms"])
    # --lora_r 16: a copy, 4 soft updates, 3 timed ones: rank 16 x 8 = 128 past tiny's full rank 64, where it stays
    assert res["ours_lora16"]["ref_rank_after"] == 64


def test_bench_logps_component():
    """The 'logps' component on one model: every path timed in one process (the model's own attribute set, the
    choice at load reported), one path's memory alone, and the table's ratios from those figures."""
    spec = {"model": "tiny", "micro_batch_size": 2, "P": 16, "R": 8, "steps": 2}
    timed = bench.bench_logps({**spec, "variant": "time"})
    assert timed["chosen_at_load"] == "head"
    for path in bench.LOGPS_PATHS:
        assert len(timed[path]["cpu_ms_all"]) == 2 and timed[path]["ms"] > 0
    memory = {path: {"peak_mb": 10.0 * (i + 1)} for i, path in enumerate(bench.LOGPS_PATHS)}  # given, for the table
    assert bench.bench_logps({**spec, "variant": "forward"})["peak_mb"] >= 0
    rows = bench.logps_table({"time": timed, **memory}).splitlines()
    assert rows[2].startswith("| head (chosen at load) |") and rows[2].endswith("| 1.00x | 10 | 1.00x |")
    cpu = timed["forward"]["cpu_ms"] / timed["head"]["cpu_ms"]
    assert rows[4] == (f"| forward | {timed['forward']['ms']:.0f} | {timed['forward']['cpu_ms']:.0f} | {cpu:.2f}x | "
                       f"30 | 3.00x |")


def test_bench_epoch_padding_by_hand(tmp_path):
    # byte tokenizer: one token per character, + EOS on each response. Rows A, B, A, B (+ one eval row held out):
    # A: prompt 4, chosen 1+1 = 2, rejected 2+1 = 3 -> sequences of 6 and 7; B: prompt 1, chosen 0+1, rejected 1+1
    # -> 2 and 3. One micro-batch of all 4 pairs:
    # plain: 8 rows padded to 7 = 56 slots, 6+7+2+3 twice = 36 real -> 20/56 padding
    # shared prompt: prompts 4 x 4 = 16 slots, 4+1+4+1 = 10 real; responses 8 x 3 = 24 slots, 2+1+2+1 + 3+2+3+2 = 16
    # real -> (40 - 26)/40. One batch per epoch, so grouping changes nothing.
    a, b = {"prompt": "aaaa", "chosen": "b", "rejected": "cc"}, {"prompt": "a", "chosen": "", "rejected": "c"}
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (a, b, a, b, a)))
    args = argparse.Namespace(seed=0, max_length=64, max_prompt_length=32, batch_size=4, micro_batch_size=4)
    pad = bench.epoch_padding(args, str(path))
    assert pad["plain"] == pytest.approx(20 / 56) and pad["group_by_length"] == pytest.approx(20 / 56)
    assert pad["share_prompt"] == pytest.approx(14 / 40) and pad["share_prompt+group_by_length"] == pytest.approx(14 / 40)


@slow
@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_bench_trl_trains_our_batches(tmp_path, method):
    # where TRL is installed (requirements-dev.txt): on variable lengths, TRL's timed steps must see exactly the
    # tokens and padded slots of our plain run's (same examples, order and micro-batches)
    pytest.importorskip("trl")
    args = argparse.Namespace(seed=0, n_examples=24, micro_batch_size=2)
    path = str(tmp_path / "d.jsonl")
    bench.write_data(args, [(10, 5, 8), (30, 3, 12), (4, 20, 2), (17, 9, 9)], path)
    spec = dict(model="tiny", batch_size=4, micro_batch_size=2, max_length=64, max_prompt_length=48, dtype="float32",
                tau=1, alpha=0.6, steps=3, warmup=1, seed=0, threads=1, kind="run", method=method, data=path)
    ours = bench.run_ours({**spec, "config": "plain"})
    trl = bench.Clock(False)
    bench.run_trl({**spec, "config": "trl"}, clock=trl)
    trl = trl.summary(spec["warmup"])
    assert ours["steps_timed"] == trl["steps_timed"] == 3 and min(ours["tokens_per_step"]) > 0
    # the replay is what the script ran: its own log counts the same tokens per step (KTO: without the z0 pairs)
    assert ours["logged_tokens_per_step"] == ours["example_tokens_per_step"]
    if method == "dpo":  # the same concatenated layout: equal tokens and padded slots at every step
        assert (ours["tokens_per_step"], ours["slots_per_step"]) == (trl["tokens_per_step"], trl["slots_per_step"])
    else:  # TRL's KTO pairs the KL completions within its micro-batch, ours over the global batch
        assert ours["tokens_per_step"] == pytest.approx(trl["tokens_per_step"], rel=0.1)

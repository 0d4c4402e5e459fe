"""evaluate.py: parsing, statistics and BLEU against hand-worked numbers, KL against a naive full-softmax computation,
resume, and end-to-end runs with tiny models. Offline, CPU."""
import json
import math
import os

import pytest
import torch

import evaluate as ev
from common import Dist
from conftest import naive_logp, torchrun
from engineering.cli import InputError
from engineering.data import load_preferences
from engineering.models import load_model

CPU = Dist(0, 0, 1, torch.device("cpu"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models run ~10x faster on one thread than on two when other jobs share the 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# -----------------------------------------------------------------------------
# judge-output parsing


@pytest.mark.parametrize("answer, verdict", [
    ("Comparison: B answers the question, A does not.\nPreferred: B", "B"),
    ("Comparison: A is clearer.\n**Preferred:** **A**", "A"),
    ('Comparison: same.\nPreferred: "A"', "A"),
    ("preferred: B.", "B"),
    ("Comparison: equally good.\nPreferred: Tie", "tie"),
    ("Comparison: A is better.\nMore helpful: A", None),   # not the asked format
    ("Preferred: A\nOn reflection... Preferred: B", None),  # contradictory
    ("Preferred: A\nPreferred: A", "A"),                    # repeated, consistent
    ('Preferred: <"A" or "B">', None),                      # the template echoed back
    ("Preferred: a response that is shorter", None),         # "a" is an article, not a verdict
    ("Preferred: Answer A", None),
    ("I prefer A.", None),
    ("", None),
    (None, None),                                            # a failed request
])
def test_parse_verdict(answer, verdict):
    assert ev.parse_verdict(answer) == verdict


def test_parse_ratings():
    good = "Coherence: 8\nCorrectness: 7/10\n**Level of detail**: 5\n- Helpfulness: 6.5\nHarmlessness: 10"
    assert ev.parse_ratings(good) == {"coherence": 8, "correctness": 7, "level of detail": 5, "helpfulness": 6.5, "harmlessness": 10}
    assert ev.parse_ratings(good.replace("Harmlessness: 10", "")) is None            # a criterion missing
    assert ev.parse_ratings(good.replace("Coherence: 8", "Coherence: 11")) is None    # out of range
    assert ev.parse_ratings(good.replace("Coherence: 8", "Coherence: 0")) is None
    assert ev.parse_ratings(good + "\nCoherence: 3") is None                          # rated twice, differently
    assert ev.parse_ratings("All good, 9 out of 10.") is None
    assert ev.parse_ratings(None) is None

# -----------------------------------------------------------------------------
# statistics, by hand


def test_mean_ci_by_hand():
    # [1, 2, 3, 4]: mean 2.5; sample variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3; se = sqrt(5/3 / 4) = 0.6454972
    # half-width 1.96 * 0.6454972 = 1.2651745
    m, ci = ev.mean_ci([1, 2, 3, 4])
    assert (m, ci) == pytest.approx((2.5, 1.2651745), abs=1e-6)
    assert ev.mean_ci([5.0])[0] == 5.0 and math.isnan(ev.mean_ci([5.0])[1])
    assert all(math.isnan(x) for x in ev.mean_ci([]))


def test_win_rate_both_orders_by_hand():
    # prompt 0 won in both orders, prompt 1 split (position bias), prompt 2 lost twice: 6 judgements, W 3 T 0 L 3
    # rate = (3 + 0/2) / 6 = 0.5. Per-prompt means 1, 0.5, 0: sd = sqrt((0.25 + 0 + 0.25) / 2) = 0.5,
    # se = 0.5 / sqrt(3) = 0.2886751, half-width 1.96 * se = 0.5658033
    w = ev.win_rate([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    assert (w["wins"], w["ties"], w["losses"], w["invalid"], w["judgements"], w["n"]) == (3, 0, 3, 0, 6, 3)
    assert (w["rate"], w["ci"]) == pytest.approx((0.5, 0.5658033), abs=1e-6)


def test_win_rate_with_ties_and_invalid_by_hand():
    # judgements: W W | W L | T T | L invalid -> W 3, T 2, L 2, invalid 1 of 8; rate = (3 + 2/2) / 7 = 4/7
    # clusters (sum S, count m): (2,2) (1,2) (1,2) (0,1); S - rate*m = 6/7, -1/7, -1/7, -4/7
    # squares sum (36 + 1 + 1 + 16) / 49 = 54/49; times k/(k-1) = 4/3 -> 72/49; sqrt = 1.2121831; / 7 valid = 0.1731690
    # half-width 1.96 * 0.1731690 = 0.3394113
    w = ev.win_rate([[1.0, 1.0], [1.0, 0.0], [0.5, 0.5], [0.0, None]])
    assert (w["wins"], w["ties"], w["losses"], w["invalid"], w["judgements"]) == (3, 2, 2, 1, 8)
    assert w["wins"] + w["ties"] + w["losses"] + w["invalid"] == w["judgements"]
    assert (w["rate"], w["ci"]) == pytest.approx((4 / 7, 0.3394113), abs=1e-6)
    allbad = ev.win_rate([[None, None]])
    assert allbad["invalid"] == 2 and math.isnan(allbad["rate"])  # an invalid answer is never a win


def test_bleu_distinct_by_hand():
    # hyp 1 2 3 4 vs ref 1 2 3 5: p1 = 3/4; p2 = (2+1)/(3+1) = 3/4; p3 = (1+1)/(2+1) = 2/3; p4 = (0+1)/(1+1) = 1/2
    # equal lengths: brevity penalty 1; BLEU = (3/4 * 3/4 * 2/3 * 1/2) ** (1/4) = 0.1875 ** 0.25 = 0.6580370
    assert ev.bleu([1, 2, 3, 4], [[1, 2, 3, 5]]) == pytest.approx(0.6580370, abs=1e-6)
    # hyp 1 2 vs ref 1 2 3 4: p1 = 1, p2 = (1+1)/(1+1) = 1, p3 = p4 = (0+1)/(0+1) = 1; BP = exp(1 - 4/2) = 0.3678794
    assert ev.bleu([1, 2], [[1, 2, 3, 4]]) == pytest.approx(math.exp(-1), abs=1e-9)
    # clipping: hyp 7 7 7 vs ref 7 8 9: unigram matches min(3, 1) = 1 -> p1 = 1/3; p2 = (0+1)/(2+1); p3 = (0+1)/(1+1);
    # p4 = (0+1)/(0+1) = 1 -> (1/3 * 1/3 * 1/2 * 1) ** (1/4) = (1/18) ** 0.25 = 0.4855194
    assert ev.bleu([7, 7, 7], [[7, 8, 9]]) == pytest.approx((1 / 18) ** 0.25, abs=1e-9)
    assert ev.bleu([1, 2], [[3, 4]]) == 0.0  # no unigram in common
    assert ev.self_bleu([[1, 2, 3], [1, 2, 3], [1, 2, 3]]) == pytest.approx(1.0)
    # self-BLEU of two: mean of BLEU(a, [b]) and BLEU(b, [a]); the pair above gives 0.6580370 both ways
    assert ev.self_bleu([[1, 2, 3, 4], [1, 2, 3, 5]]) == pytest.approx(0.6580370, abs=1e-6)
    # the one-pass clipping of self_bleu equals BLEU of each sequence against all the others, n-gram repeats included
    rng = __import__("random").Random(0)
    seqs = [[rng.randrange(4) for _ in range(rng.randrange(1, 9))] for _ in range(12)]
    naive = sum(ev.bleu(s, seqs[:i] + seqs[i + 1:]) for i, s in enumerate(seqs)) / len(seqs)
    assert ev.self_bleu(seqs) == pytest.approx(naive, abs=1e-12) and 0.1 < naive < 0.9
    # unigrams: 1 2 1 | 1 3 -> 5 in all, 3 distinct (1, 2, 3); bigrams (1,2) (2,1) | (1,3) -> 3 of 3
    assert ev.distinct_n([[1, 2, 1], [1, 3]], 1) == pytest.approx(3 / 5)
    assert ev.distinct_n([[1, 2, 1], [1, 3]], 2) == pytest.approx(1.0)
    assert math.isnan(ev.distinct_n([[1], [2]], 2))


def test_gold_judge_by_hand():
    p = "\n\nHuman: reverse 123\n\nAssistant:"  # answer 321
    responses = [" 321", " 324", " 999", " 32", " 3a1"]
    # gold scores: exact 1; 2 of 3 digits right; well-formed but every digit wrong 0; too short 0; not digits 0
    crit = ev.gold_criteria([p] * 5, responses)
    assert crit["gold score"] == pytest.approx([1, 2 / 3, 0, 0, 0])
    assert crit["gold accuracy"] == [1, 0, 0, 0, 0]
    assert crit["invalid output"] == [0, 0, 0, 1, 1]  # " 999" scores 0 but is not malformed
    # against " 324" (2/3): exact wins, equal ties, lower loses; the same verdict in both orders
    assert ev.gold_pairwise([p] * 3, [" 321", " 324", " 32"], [" 324"] * 3) == [[1.0, 1.0], [0.5, 0.5], [0.0, 0.0]]

def test_plot_or_message(tmp_path, capsys):
    rows = [{"model": m, "n": 1, "win_rate": ev.win_rate([[s, s]]), "kl": ev.summarise([kl])} for m, s, kl in (("a", 1.0, 1.0), ("b", 0.0, 2.0))]
    table = ev.write_report(rows, str(tmp_path), "sft")
    assert table.splitlines()[2].startswith("| a | 100.0 | 2 / 0 / 0 / 0 | 1 | 1.00 |")
    try:
        import matplotlib  # noqa: F401 - optional, not in requirements.txt
    except ImportError:
        assert "matplotlib is not installed" in capsys.readouterr().out and not (tmp_path / "winrate_vs_kl.png").exists()
    else:
        assert (tmp_path / "winrate_vs_kl.png").stat().st_size > 1000

# -----------------------------------------------------------------------------
# generation, KL, resume


@torch.no_grad()
def test_left_padding_and_kl_match_naive():
    policy, tok = load_model("tiny", seed=0)
    ref, _ = load_model("tiny", seed=1)
    policy.eval(), ref.eval()
    prompts = ["\n\nHuman: sort 3\n\nAssistant:", "\n\nHuman: reverse 123456\n\nAssistant:", "\n\nHuman: hi\n\nAssistant:"]
    p_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    # greedy in one left-padded batch = greedy one at a time
    batched = ev.sample(policy, tok, p_ids, 6, greedy=True)
    assert batched == [ev.sample(policy, tok, [p], 6, greedy=True)[0] for p in p_ids]
    torch.manual_seed(0)
    r_ids = ev.sample(policy, tok, p_ids, 6)
    r_ids[0] = r_ids[0][:2] + [tok.eos_token_id]  # responses of different lengths, one ending in EOS
    mean, ci, ratios = ev.kl_estimate(policy, ref, tok.pad_token_id, p_ids, r_ids, batch_size=3)
    naive = [naive_logp(policy, p, r) - naive_logp(ref, p, r) for p, r in zip(p_ids, r_ids)]
    # per-sample log-probs are about -5.5 per token (log of 258 choices), their ratios a few hundredths
    assert ev.response_logps(policy, tok.pad_token_id, p_ids, r_ids, 3) == pytest.approx([naive_logp(policy, p, r) for p, r in zip(p_ids, r_ids)], abs=1e-4)
    assert ratios == pytest.approx(naive, abs=1e-5)
    assert mean == pytest.approx(sum(naive) / 3, abs=1e-5) and ci > 0 and min(map(abs, naive)) > 1e-3


def test_resume_generates_only_missing_prompts(tmp_path, monkeypatch):
    args = ev.get_args(["--models", "tiny", "--greedy", "--max_new_tokens", "4", "--batch_size", "4", "--judge", "none"])
    model, tok = load_model("tiny")
    model.eval()
    prompts = [r["prompt"] for r in load_preferences("toy", 6)[1]]
    path = str(tmp_path / "g.jsonl")
    full = ev.generate(model, tok, prompts, path, args, CPU)
    assert [r["index"] for r in full] == list(range(6))
    with open(path) as f:
        lines = f.readlines()
    # an interrupted run: rows 0, 2 and 4 were written, then the process died in the middle of a line
    with open(path + ".part0", "w") as f:
        f.writelines(lines[i] for i in (0, 2, 4))
        f.write(lines[5][:20])
    os.remove(path)
    seen = []
    real = ev.sample
    monkeypatch.setattr(ev, "sample", lambda m, t, ids, *a, **k: seen.append([t.decode(p) for p in ids]) or real(m, t, ids, *a, **k))
    again = ev.generate(model, tok, prompts, path, args, CPU)
    assert [len(b) for b in seen] == [3]  # one batch holding the 3 missing prompts
    assert [p.endswith(prompts[i]) for p, i in zip(seen[0], (1, 3, 5))] == [True] * 3
    assert again == full  # greedy: the regenerated rows equal the uninterrupted run's
    assert not os.path.exists(path + ".part0") and len(ev.read_jsonl(path)) == 6
    seen.clear()
    assert ev.generate(model, tok, prompts, path, args, CPU) == full and seen == []  # complete: nothing generated
    # other settings, or another model, never reuse these rows
    with pytest.raises(InputError, match="another model, with other settings"):
        ev.generate(model, tok, prompts, path, ev.get_args(["--models", "tiny", "--max_new_tokens", "4"]), CPU)
    with pytest.raises(InputError, match="another model, with other settings"):
        ev.generate(load_model("tiny", seed=1)[0], tok, prompts, path, args, CPU)

@pytest.mark.parametrize("flags, message", [
    (["--models", "tiny", "small", "--labels", "x", "x"], "--models/--labels: x names two models"),
    (["--models", "tiny", "small", "--labels", "a/b", "a_b"], "--models/--labels: a_b names two models"),  # 1 file
    (["--models", "tiny", "tiny"], "--models/--labels: tiny names two models"),  # no --labels: the names
    (["--models", "tiny", "--baseline", "tiny"], "tiny names two models (or a model and --baseline)"),
    (["--models", "/nope/policy"], "--models '/nope/policy': not a built-in name, an existing folder"),
    (["--reference", "/nope"], "--reference '/nope': not a built-in name"),
    (["--judge", "local", "--judge_model", "/nope"], "--judge_model '/nope': not a built-in name"),
    (["--reward_model", "/nope"], "--reward_model '/nope': not a built-in name"),
    (["--dataset", "/nope.jsonl"], "unknown --dataset '/nope.jsonl'"),
    (["--top_p", "0"], "argument --top_p: must be in (0, 1], got 0"),
    (["--top_p", "1.5"], "argument --top_p: must be in (0, 1], got 1.5"),
    (["--temperature", "0"], "argument --temperature: must be a positive number, got 0"),
    (["--max_new_tokens", "0"], "argument --max_new_tokens: must be an integer >= 1, got 0"),
    (["--max_prompt_length", "0"], "argument --max_prompt_length: must be an integer >= 1, got 0"),  # 0: all of it
    (["--n_prompts", "0"], "argument --n_prompts: must be an integer >= 1, got 0"),
    (["--n_prompts", "1000", "--dataset", "ROWS40"], "40 rows leave nothing to train on after --n_prompts 1000"),
    (["--n_prompts", "1000000000"], "--n_prompts must be <= 100000 with --dataset toy"),  # toy prompts are generated
    (["--labels", "chosen"], "--models/--labels: 'chosen' names the dataset's preferred responses"),
    (["--models", "chosen"], "--models/--labels: 'chosen' names the dataset's preferred responses"),
])
def test_bad_input_is_one_line_before_anything_is_written(tmp_path, capsys, flags, message):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Q{i}", "chosen": " a", "rejected": " b"}) + "\n" for i in range(40)))
    out = tmp_path / "eval"
    argv = ["--models", "tiny", "--judge", "none", "--output_dir", str(out)]
    with pytest.raises(SystemExit) as e:
        ev.main(argv + [str(rows) if f == "ROWS40" else f for f in flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not out.exists()


def test_pairwise_orders_map_to_the_policy():
    """A judge that prefers whichever summary says "good": the policy must win where it says it, in both orders."""
    class Fake:
        name = "fake"

        def __call__(self, texts):
            for i, t in enumerate(texts):
                a = t.split("Summary A:\n")[1].split("\n\nSummary B:")[0]
                yield i, "Comparison: one is good.\nPreferred: " + ("A" if "good" in a else "B")
    scores, answers = ev.judge_pairwise(Fake(), "summary", ["POST: p1", "POST: p2", "POST: p3"], ["good", "bad", "good"],
                                        ["bad", "good", "good"], os.devnull)
    # p1: policy good -> wins as A and as B; p2: baseline good -> loses both; p3: both good -> "A" both times, a split
    assert scores == [[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]] and len(answers) == 6


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A 'trained' policy (tiny, seed 1) saved like tr_dpo.py's policy/, and a reward model with the same body."""
    from transformers import GPTNeoXForSequenceClassification
    root = tmp_path_factory.mktemp("models")
    model, tok = load_model("tiny", seed=1)
    model.save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    torch.manual_seed(0)
    rm = GPTNeoXForSequenceClassification.from_pretrained(root / "policy", num_labels=1)
    rm.save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    return str(root / "policy"), str(root / "rm")


@pytest.mark.slow
def test_end_to_end_tiny_local_judge(tiny_dirs, tmp_path):
    policy_dir, rm_dir = tiny_dirs
    n, out = 3, str(tmp_path / "eval")
    res = ev.main(["--models", policy_dir, "--labels", "policy", "--baseline", "tiny", "--dataset", "toy",
                   "--n_prompts", str(n), "--max_new_tokens", "5", "--judge", "local", "--judge_model", "tiny",
                   "--judge_max_new_tokens", "6", "--reward_model", rm_dir, "--output_dir", out])
    for f in ("generations/policy.jsonl", "generations/tiny.jsonl", "judgements/policy.jsonl", "judgements/tiny.jsonl",
              "judge_cache.jsonl", "summary.json", "results.md"):
        assert os.path.exists(os.path.join(out, f)), f
    pol, base = res["models"]
    assert (pol["model"], base["model"]) == ("policy", "tiny") and "win_rate" not in base
    w = pol["win_rate"]
    # both orders judged: 2 judgements per prompt; a random judge never writes "Preferred: A|B", so all invalid
    assert w["judgements"] == 2 * n == w["wins"] + w["ties"] + w["losses"] + w["invalid"]
    assert w["invalid"] == 2 * n and math.isnan(w["rate"])
    assert pol["ratings_invalid"] == n and base["ratings_invalid"] == n
    details = ev.read_jsonl(os.path.join(out, "judgements", "policy.jsonl"))
    assert len(details) == n and all(len(d["pairwise_answers"]) == 2 and d["scores"] == [None, None] for d in details)
    # judge cache: one answer per distinct request, 2n pairwise + n ratings per model (random bytes often decode to
    # the same replacement characters, so texts repeat)
    texts = {ev.PAIRWISE["dialogue"].format(prompt=d["prompt"].strip(), a=a.strip(), b=b.strip())
             for d in details for a, b in ((d["response"], d["baseline"]), (d["baseline"], d["response"]))}
    texts |= {ev.RATING.format(prompt=d["prompt"].strip(), response=d[k].strip(), **ev.RATING_WORDS["dialogue"])
              for d in details for k in ("response", "baseline")}
    assert len(ev.read_jsonl(os.path.join(out, "judge_cache.jsonl"))) == len(texts) >= n + 1
    # KL to the baseline (the reference by default), recomputed naively from the saved samples
    gens = ev.read_jsonl(os.path.join(out, "generations", "policy.jsonl"))
    policy, _ = load_model(policy_dir)
    ref, tok = load_model("tiny", seed=0)
    with torch.no_grad():
        naive = [naive_logp(policy, g["prompt_ids"], g["response_ids"]) - naive_logp(ref, g["prompt_ids"], g["response_ids"]) for g in gens]
    assert pol["kl"]["mean"] == pytest.approx(sum(naive) / n, abs=1e-4) and pol["kl"]["n"] == n
    assert base["kl"]["mean"] == pytest.approx(0.0, abs=1e-5)  # the reference against itself
    assert pol["length"]["mean"] == pytest.approx(sum(g["length"] for g in gens) / n)
    # the reward model, batched with padding, equals one prompt at a time
    rm, rtok = ev.load_reward_model(rm_dir, "cpu")
    one = [ev.reward_scores(rm, rtok, [g["prompt"]], [g["response"]])[0] for g in gens]
    assert pol["reward"]["mean"] == pytest.approx(sum(one) / n, abs=1e-5)
    # the table: one row per model, the W / T / L / invalid cell, toy gold columns, no all-empty columns
    md = open(os.path.join(out, "results.md")).read()
    assert "| policy | — | 0 / 0 / 0 / 6 | 3 |" in md and "invalid output" in md and "reward" in md
    assert md.count("\n| policy |") == 1 and md.count("\n| tiny |") == 1
    assert json.load(open(os.path.join(out, "summary.json")))["models"][0]["win_rate"]["invalid"] == 2 * n


def test_a_reward_model_without_its_head_is_refused(tiny_dirs, tmp_path, capsys):
    """A causal LM folder (its score head would be random) and an empty folder are refused before any generation;
    a config that names a score head its files lack, when the weights are loaded."""
    import shutil
    policy_dir, _ = tiny_dirs
    (tmp_path / "empty").mkdir()
    headless = tmp_path / "headless"  # the policy's files, its config renamed to a reward model's
    shutil.copytree(policy_dir, headless)
    config = json.load(open(headless / "config.json"))
    json.dump({**config, "architectures": ["GPTNeoXForSequenceClassification"]}, open(headless / "config.json", "w"))
    for rm, message, written in [
            (policy_dir, f"--reward_model {policy_dir} is a GPTNeoXForCausalLM, not a sequence-classification reward "
                         f"model: its score head would be random", False),
            (str(tmp_path / "empty"), f"--reward_model {tmp_path / 'empty'}: no readable model config (", False),
            (str(headless), f"--reward_model {headless}: 1 weight(s) are not in its files (e.g. score.weight)", True)]:
        out = tmp_path / "eval"
        with pytest.raises(SystemExit) as e:
            ev.main(["--models", "tiny", "--judge", "none", "--n_prompts", "2", "--max_new_tokens", "2",
                     "--reward_model", rm, "--output_dir", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("error:") == 1 and message in err.splitlines()[-1], err
        assert err.count("\n") == 1 or written  # a run that generated shows its progress bars first
        assert out.exists() == written  # the headless one is found at load time: the generations are kept
        shutil.rmtree(out, ignore_errors=True)


def hand_made_generations(out, n, responses):
    """A finished generations file for `n` toy prompts, so main() judges these responses and generates nothing."""
    model, tok = load_model("tiny")
    key = ev.generation_key(model, ev.get_args(["--models", "tiny"]))  # what main() computes for 'tiny', defaults
    rows = load_preferences("toy", n)[1]
    os.makedirs(os.path.join(out, "generations"), exist_ok=True)
    with open(os.path.join(out, "generations", "policy.jsonl"), "w") as f:
        for i, (row, r) in enumerate(zip(rows, responses)):
            ids = tok(r, add_special_tokens=False)["input_ids"]
            f.write(json.dumps({"index": i, "prompt": row["prompt"], "response": r, "prompt_ids": [1],
                                "response_ids": ids + [tok.eos_token_id], "length": len(ids), "logp": -1.0, "key": key}) + "\n")
    return rows


@pytest.mark.slow
def test_end_to_end_gold_judge_by_hand(tmp_path):
    out = str(tmp_path / "eval")
    rows = load_preferences("toy", 4)[1]
    answers = [r["chosen"] for r in rows]  # toy "chosen" is always the exact answer
    wrong = answers[1].strip()
    wrong = " " + ("1" if wrong[0] != "1" else "2") + wrong[1:]  # one digit off: well-formed, gold score < 1
    hand_made_generations(out, 4, [answers[0], wrong, " abc", answers[3]])
    res = ev.main(["--models", "tiny", "--labels", "policy", "--n_prompts", "4", "--judge", "gold", "--output_dir", out])
    pol, chosen = res["models"]
    # vs chosen (exact): exact -> tie, one digit off -> loss, malformed -> loss, exact -> tie; both orders agree
    # W 0, T 4, L 4 of 8 judgements; rate = (0 + 4/2) / 8 = 25%; per-prompt means .5 0 0 .5 -> sample variance
    # 4 * 0.25^2 / 3 = 1/12, sd 0.2886751, se 0.2886751 / sqrt(4) = 0.1443376, half-width 1.96 * se = 0.2829016
    w = pol["win_rate"]
    assert (w["wins"], w["ties"], w["losses"], w["invalid"]) == (0, 4, 4, 0)
    assert (w["rate"], w["ci"]) == pytest.approx((0.25, 0.2829016), abs=1e-6)
    assert pol["criteria"]["gold accuracy"]["mean"] == 0.5 and pol["criteria"]["invalid output"]["mean"] == 0.25
    assert chosen["criteria"]["gold accuracy"]["mean"] == 1.0 and "kl" not in pol  # baseline chosen: no reference
    assert "| policy | 25.0 ± 28.3 | 0 / 4 / 4 / 0 | 4 |" in res["table"]
    assert [r["response"] for r in ev.read_jsonl(os.path.join(out, "generations", "policy.jsonl"))][2] == " abc"  # not regenerated


@pytest.mark.slow
def test_torchrun_shards_generation(tmp_path):
    """Two CPU ranks (gloo) generate what one process generates (greedy), merged by rank 0."""
    common = ["--models", "tiny", "--labels", "policy", "--judge", "none", "--greedy", "--n_prompts", "5",
              "--max_new_tokens", "4", "--batch_size", "2"]
    torchrun("evaluate.py", *common, "--output_dir", str(tmp_path / "two"))
    ev.main([*common, "--output_dir", str(tmp_path / "one")])
    two = ev.read_jsonl(str(tmp_path / "two" / "generations" / "policy.jsonl"))
    one = ev.read_jsonl(str(tmp_path / "one" / "generations" / "policy.jsonl"))
    assert [r["index"] for r in two] == list(range(5)) and not list((tmp_path / "two" / "generations").glob("*.part*"))
    assert [r["response_ids"] for r in two] == [r["response_ids"] for r in one]


def test_chat_prompts_rendered_by_each_models_template(tmp_path):
    """A chat-format set: a model continues each prompt as its own chat template renders it (chat.render_chat,
    ending with the assistant header); the judge and the "chosen" baseline read the turns as plain text."""
    from test_chat import SMOLLM2_TEMPLATE, SYSTEM
    model, tok = load_model("tiny")
    tok.chat_template = SMOLLM2_TEMPLATE
    model.save_pretrained(tmp_path / "chat_model")
    tok.save_pretrained(tmp_path / "chat_model")
    out = str(tmp_path / "eval")
    ev.main(["--models", str(tmp_path / "chat_model"), "--labels", "policy", "--baseline", "chosen", "--dataset",
             os.path.join(os.path.dirname(__file__), "fixtures", "chat.jsonl"), "--n_prompts", "2", "--judge", "none",
             "--max_new_tokens", "2", "--output_dir", out])
    generated = ev.read_jsonl(os.path.join(out, "generations", "policy.jsonl"))
    assert [g["prompt"] for g in generated] == [  # the last two rows of fixtures/chat.jsonl
        SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        SYSTEM + "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"]
    judged = ev.read_jsonl(os.path.join(out, "judgements", "policy.jsonl"))
    assert [(j["prompt"], j["baseline"]) for j in judged] == [
        ("User: Hi", "Assistant: Hello!\n\nUser: Name a colour.\n\nAssistant: Blue."),  # a multi-turn response
        ("User: Capital of France?", "Paris.")]  # one assistant message: its content, as a generated response

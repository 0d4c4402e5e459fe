"""evaluate.py: parsing, statistics and BLEU against hand-worked numbers, KL against a naive full-softmax computation,
resume, the HTTP judge against a stub server, and end-to-end runs with tiny models. Offline, CPU."""
import json
import math
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import evaluate as ev
from common import Dist
from conftest import naive_logp, torchrun
from engineering.cli import InputError
from engineering.data import load_preferences
from engineering.models import load_model

SECRET = "sk-test-0123456789abcdef-SECRET"
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

# -----------------------------------------------------------------------------
# the HTTP judge against a stub server on 127.0.0.1


class Stub(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def reply(self, code, body):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body if isinstance(body, bytes) else json.dumps(body).encode())

    def chat(self, content):
        self.reply(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})

    def do_POST(self):
        s = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text, route = body["messages"][0]["content"], self.path.split("/")[1]
        if route == "status":  # /status/<code>/v1: that HTTP status for everything
            return self.reply(int(self.path.split("/")[2]), {"error": {"message": "as asked"}})
        if route == "notjson":
            return self.reply(200, b"<html>gateway</html>")
        if route == "probeonly":  # the probe (one token) passes; every judgement fails
            return self.chat("A") if body["max_tokens"] == 1 else self.reply(500, {"error": "down"})
        if route in ("echo401", "echo200"):  # the Authorization header echoed where a 200-character cut falls
            pad = b'{"error": "' + b"x" * (190 - len('{"error": "') - len("Bearer ")) + b"Bearer "
            return self.reply(401 if route == "echo401" else 200, pad + self.headers["Authorization"][7:].encode()
                              + b'"}')
        case = (re.search(r"CASE:(\w+)", text) or [None, "judge"])[1]
        with s.lock:
            s.calls[case] = s.calls.get(case, 0) + 1
            s.active += 1
            s.max_active = max(s.max_active, s.active)
            call = s.calls[case]
        try:
            if case == "judge":  # main(): always "A", so the policy wins as A and loses as B
                self.chat("Comparison: fine.\nPreferred: A" if "Response A:" in text else
                          "Coherence: 7\nCorrectness: 6\nLevel of detail: 5\nHelpfulness: 4\nHarmlessness: 9")
            elif case == "normal":
                self.chat("Comparison: B is right.\nPreferred: B")
            elif case == "malformed":
                self.chat("Both responses have merits.")
            elif case == "notjson":
                self.reply(200, b"<html>gateway</html>")
            elif case == "ratelimit":
                self.reply(429, {"error": "slow down"}) if call == 1 else self.chat("Preferred: A")
            elif case == "slow":  # the first request outlives the client's timeout
                time.sleep(1.0 if call == 1 else 0)
                self.chat("Preferred: B")
            elif case == "alwaysslow":
                time.sleep(0.6)
                self.chat("Preferred: B")
            elif case == "echo401":  # a careless server that echoes the Authorization header
                self.reply(401, {"error": f"bad key {self.headers['Authorization']}"})
            elif case == "echo200":
                self.chat(f"Preferred: A (you sent {self.headers['Authorization']})")
            elif case == "busy":
                time.sleep(0.1)
                self.chat("Preferred: A")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)
        finally:
            with s.lock:
                s.active -= 1


@pytest.fixture
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    server.daemon_threads = True
    server.lock, server.calls, server.active, server.max_active = threading.Lock(), {}, 0, 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("STUB_KEY", SECRET)
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)  # 127.0.0.1 must not go through a proxy


def all_text(root):
    out = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), errors="replace") as fh:
                out.append(fh.read())
    return "\n".join(out)


def test_api_judge_against_stub(stub, secret_env, tmp_path, capsys):
    judge = ev.ApiJudge(f"http://127.0.0.1:{stub.server_port}/v1", "stub-model", "STUB_KEY",
                        timeout=0.3, retries=2, backoff=0.01, concurrency=4)
    cases = ["normal", "malformed", "notjson", "ratelimit", "slow", "alwaysslow", "echo401", "echo200"]
    cache = str(tmp_path / "cache.jsonl")
    answers = dict(zip(cases, ev.ask(judge, [f"CASE:{c}" for c in cases], cache)))
    assert ev.parse_verdict(answers["normal"]) == "B"
    assert answers["malformed"] == "Both responses have merits." and ev.parse_verdict(answers["malformed"]) is None
    assert answers["notjson"] is None and stub.calls["notjson"] == 1  # a malformed reply is not retried
    assert ev.parse_verdict(answers["ratelimit"]) == "A" and stub.calls["ratelimit"] == 2  # 429, then retried
    assert ev.parse_verdict(answers["slow"]) == "B" and stub.calls["slow"] == 2  # timed out, then retried
    assert answers["alwaysslow"] is None and stub.calls["alwaysslow"] == 3  # 1 try + 2 retries, then invalid
    assert answers["echo401"] is None and stub.calls["echo401"] == 1  # a client error is not retried
    assert ev.parse_verdict(answers["echo200"]) == "A" and "[API key]" in answers["echo200"]
    errors = "\n".join(judge.errors)
    assert "HTTP 401" in errors and "timed out" in errors and "malformed reply" in errors
    # the key reaches the server but no answer, error message, cache file or console line
    out = capsys.readouterr()
    for text in (errors, json.dumps(answers), out.out, out.err, all_text(tmp_path)):
        assert SECRET not in text
    # the cache holds the successful answers only; a rerun asks just the failed requests again
    assert len(ev.read_jsonl(cache)) == 5
    before = dict(stub.calls)
    ev.ask(judge, [f"CASE:{c}" for c in ("normal", "echo401")], cache)
    assert stub.calls["normal"] == before["normal"] and stub.calls["echo401"] == before["echo401"] + 1


def test_api_key_that_cannot_be_sent_is_refused_without_showing_it(monkeypatch):
    monkeypatch.setenv("STUB_KEY", SECRET[:10] + "\n" + SECRET[10:])  # http.client would echo it in its error
    with pytest.raises(InputError) as e:
        ev.ApiJudge("http://127.0.0.1:9/v1", "m", "STUB_KEY")
    assert "STUB_KEY" in str(e.value) and SECRET[:10] not in str(e.value) and SECRET[10:] not in str(e.value)


def test_the_key_is_scrubbed_before_a_body_is_cut(stub, secret_env):
    """A server that echoes the Authorization header where the message is cut at 200 characters: neither the error
    path nor the malformed-reply path shows any 8 characters of the key."""
    for route in ("echo401", "echo200"):
        judge = ev.ApiJudge(f"http://127.0.0.1:{stub.server_port}/{route}/v1", "m", "STUB_KEY", retries=0)
        answer, error = judge.ask("hello")
        assert answer is None and "[API key]" in error, error
        assert not any(SECRET[i:i + 8] in error for i in range(len(SECRET) - 7)), error


@pytest.mark.parametrize("route, message", [
    ("status/401", "the judge API at --api_base {base} refused the key in $STUB_KEY (HTTP 401: "),
    ("status/403", "refused the key in $STUB_KEY (HTTP 403: "),
    ("status/404", "--judge_model stub-model: not found at --api_base {base} (HTTP 404: "),
    ("status/500", "the judge API at --api_base {base} did not answer a test request (HTTP 500: "),
    ("status/400", "did not answer a test request (HTTP 400: "),
    ("notjson", "does not answer like an OpenAI-compatible chat-completions API (malformed reply"),
    ("closed", "cannot reach --api_base {base} (URLError: "),
])
def test_the_probe_says_which_judge_setting_is_wrong(stub, secret_env, route, message):
    port = closed_port() if route == "closed" else stub.server_port
    base = f"http://127.0.0.1:{port}/{route}/v1"
    judge = ev.ApiJudge(base, "stub-model", "STUB_KEY", retries=1, backoff=0.01)
    with pytest.raises(InputError) as e:
        judge.probe()
    assert message.format(base=base) in str(e.value) and SECRET not in str(e.value)


def closed_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    (["--api_retries=-1"], "argument --api_retries: must be an integer >= 0, got -1"),
    (["--api_concurrency", "0"], "argument --api_concurrency: must be an integer >= 1, got 0"),
    (["--api_timeout", "0"], "argument --api_timeout: must be a positive number, got 0"),
    (["--api_backoff=-1"], "argument --api_backoff: must be a finite number >= 0, got -1"),
    (["--judge", "api", "--judge_model", "m", "--api_key_env", "UNSET_KEY_18"],
     "--judge api reads the key from $UNSET_KEY_18, which is not set"),
    (["--judge", "api", "--judge_model", "m", "--api_key_env", "SPACE_KEY_18"],
     "$SPACE_KEY_18 holds a character an HTTP header cannot carry"),
    (["--judge", "api", "--judge_model", "m", "--api_key_env", "STUB_KEY", "--api_base", "127.0.0.1:9/v1"],
     "--api_base 127.0.0.1:9/v1: not an http:// or https:// URL"),
    (["--n_prompts", "1000", "--dataset", "ROWS40"], "40 rows leave nothing to train on after --n_prompts 1000"),
])
def test_bad_input_is_one_line_before_anything_is_written(tmp_path, secret_env, monkeypatch, capsys, flags, message):
    monkeypatch.setenv("SPACE_KEY_18", "sk-has space")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Q{i}", "chosen": " a", "rejected": " b"}) + "\n" for i in range(40)))
    out = tmp_path / "eval"
    argv = ["--models", "tiny", "--judge", "none", "--output_dir", str(out)]
    with pytest.raises(SystemExit) as e:
        ev.main(argv + [str(rows) if f == "ROWS40" else f for f in flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not out.exists()


def test_a_wrong_key_is_found_before_generation(stub, secret_env, tmp_path, capsys):
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as e:
        ev.main(["--models", "tiny", "--judge", "api", "--judge_model", "m", "--api_key_env", "STUB_KEY",
                 "--api_base", f"http://127.0.0.1:{stub.server_port}/status/401/v1", "--output_dir", str(out)])
    assert e.value.code == 2 and "refused the key in $STUB_KEY" in capsys.readouterr().err
    assert not out.exists()  # nothing generated


@pytest.mark.slow
def test_a_run_where_every_judgement_failed_exits_non_zero(stub, secret_env, tmp_path):
    out = str(tmp_path / "eval")
    with pytest.raises(SystemExit) as e:
        ev.main(["--models", "tiny", "--labels", "policy", "--n_prompts", "2", "--max_new_tokens", "2",
                 "--skip_criteria", "--judge", "api", "--judge_model", "m", "--api_key_env", "STUB_KEY",
                 "--api_retries", "0", "--api_base", f"http://127.0.0.1:{stub.server_port}/probeonly/v1",
                 "--output_dir", out])
    assert str(e.value).startswith("error: all 4 judge requests failed, so every judgement above is invalid "
                                   "(the first: HTTP 500: ")  # 2 prompts x 2 orders; SystemExit(str): exit code 1
    report = json.load(open(os.path.join(out, "summary.json")))  # written first
    assert report["models"][0]["win_rate"]["invalid"] == 4


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


def test_api_judge_concurrency_limit(stub, secret_env):
    judge = ev.ApiJudge(f"http://127.0.0.1:{stub.server_port}/v1", "stub-model", "STUB_KEY", concurrency=2)
    answers = dict(judge([f"CASE:busy {i}" for i in range(8)]))
    assert sorted(answers) == list(range(8)) and set(answers.values()) == {"Preferred: A"}
    assert stub.max_active == 2  # 8 slow requests, never more than 2 in flight

# -----------------------------------------------------------------------------
# end to end


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
def test_end_to_end_api_judge_cancels_position_bias(stub, secret_env, tmp_path, capsys):
    out = str(tmp_path / "eval")
    hand_made_generations(out, 3, [" 1", " 2", " 3"])
    res = ev.main(["--models", "tiny", "--labels", "policy", "--n_prompts", "3", "--judge", "api",
                   "--judge_model", "stub", "--api_base", f"http://127.0.0.1:{stub.server_port}/v1",
                   "--api_key_env", "STUB_KEY", "--output_dir", out])
    pol, chosen = res["models"]
    # the stub always answers "A": the policy wins every first judgement and loses every second -> 50%, CI 0
    w = pol["win_rate"]
    assert (w["wins"], w["ties"], w["losses"], w["invalid"], w["rate"], w["ci"]) == (3, 0, 3, 0, 0.5, 0.0)
    assert pol["criteria"]["coherence"] == {"mean": 7.0, "ci": 0.0, "n": 3}
    assert chosen["criteria"]["harmlessness"]["mean"] == 9.0 and pol["ratings_invalid"] == 0
    assert stub.calls["judge"] == 1 + 2 * 3 + 3 + 3  # the probe, both orders of 3 prompts, 3 + 3 ratings
    out_text = capsys.readouterr()
    assert SECRET not in all_text(out) + out_text.out + out_text.err + json.dumps(res)
    # rerun: every answer comes from the cache, the server is not asked again
    ev.main(["--models", "tiny", "--labels", "policy", "--n_prompts", "3", "--judge", "api", "--judge_model", "stub",
             "--api_base", f"http://127.0.0.1:{stub.server_port}/v1", "--api_key_env", "STUB_KEY", "--output_dir", out])
    assert stub.calls["judge"] == 14  # the probe again; every answer from the cache


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

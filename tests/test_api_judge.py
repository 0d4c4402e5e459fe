"""engineering/api_judge.py (evaluate.py --judge api) against a local OpenAI-compatible server that misbehaves: it
redirects to another host, trickles its reply, never ends it, rate-limits with Retry-After, echoes the key in
encoded forms, answers with no body or with HTML. Plus a property test of the key scrub. Offline, seconds."""
import base64
import json
import os
import re
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import given, settings, strategies as st

import evaluate as ev
from test_evaluate import hand_made_generations
from engineering.api_judge import ApiJudge, key_pattern
from engineering.cli import InputError

SECRET = "sk-test/0123+4567=abcdef_SECRET"  # '/', '+' and '=' change under JSON, URL and base64 encoding


class Stub(BaseHTTPRequestHandler):
    """/v1: the answer CASE:<name> in the prompt asks for; /<route>/v1: that misbehaviour for every request."""
    def log_message(self, *a):
        pass

    def reply(self, code, body, headers=()):
        body = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        for k, v in (("Content-Type", "application/json"), ("Content-Length", str(len(body))), *headers):
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def chat(self, content):
        self.reply(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})

    def do_POST(self):
        s, key = self.server, self.headers.get("Authorization", "")[len("Bearer "):]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text, route = body["messages"][0]["content"], self.path.split("/")[1]
        with s.lock:
            s.log.append((route, time.monotonic(), self.headers.get("Authorization")))
        try:
            if route == "status":  # /status/<code>/v1: that HTTP status for everything
                return self.reply(int(self.path.split("/")[2]), {"error": {"message": "as asked"}})
            if route == "redirect":  # to the same path on another server (another port: another origin)
                return self.reply(302, b"", [("Location", f"http://127.0.0.1:{s.elsewhere}{self.path}")])
            if route == "echo":  # /echo/<form>/v1: a 401 that shows the key in that form
                return self.reply(401, ECHO[self.path.split("/")[2]](key).encode(), [("Content-Type", "text/plain")])
            if route in ("echo401", "echo200"):  # the key echoed where a 200-character cut falls
                pad = b'{"error": "' + b"x" * (190 - len('{"error": "') - len("Bearer ")) + b"Bearer "
                return self.reply(401 if route == "echo401" else 200, pad + key.encode() + b'"}')
            if route == "probeonly":  # the probe (one token) passes; every judgement fails
                return self.chat("A") if body["max_tokens"] == 1 else self.reply(500, {"error": "down"})
            if route == "empty":
                return self.reply(200, b"")
            if route == "html":
                return self.reply(200, b"<html>gateway</html>", [("Content-Type", "text/html")])
            if route == "nochoices":
                return self.reply(200, {"id": "x", "object": "chat.completion"})
            if route == "gzip":
                return self.reply(200, b"\x1f\x8b" + b"\0" * 20, [("Content-Encoding", "gzip")])
            if route == "slowheaders":  # a status line, then headers that do not end for 10 s, a byte every 0.2 s
                self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                for _ in range(50):
                    self.wfile.write(b"A")
                    self.wfile.flush()
                    time.sleep(0.2)
                s.finished += 1  # the client waited for all of it: no deadline on the whole request
                return None
            if route in ("trickle", "tricklelength", "endless"):  # headers at once, then a body that never ends
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                if route == "tricklelength":  # the body's end announced (else: when the connection closes)
                    self.send_header("Content-Length", "100000")
                self.end_headers()
                self.wfile.write(b'{"choices": [{"message": {"content": "')
                for _ in range(50 if route != "endless" else 1000):  # 10 s of trickle, or 64 MB
                    self.wfile.write(b"A" * 65536 if route == "endless" else b"A")
                    self.wfile.flush()
                    time.sleep(0 if route == "endless" else 0.2)
                s.finished += 1  # the client read all of it: no deadline, or no cap
                return None
            case = (re.search(r"CASE:(\w+)", text) or [None, "judge"])[1]
            with s.lock:
                s.calls[case] = s.calls.get(case, 0) + 1
                s.active += 1
                s.max_active = max(s.max_active, s.active)
                call = s.calls[case]
            try:
                return self.answer(case, call, text, key)
            finally:
                with s.lock:
                    s.active -= 1
        except (BrokenPipeError, ConnectionResetError):
            return None  # the client gave up (timeouts, the cap)

    def answer(self, case, call, text, key):
        if case == "judge":  # main(): always "A", so the policy wins as A and loses as B
            self.chat("Comparison: fine.\nPreferred: A" if "Response A:" in text else
                      "Coherence: 7\nCorrectness: 6\nLevel of detail: 5\nHelpfulness: 4\nHarmlessness: 9")
        elif case == "normal":
            self.chat("Comparison: B is right.\nPreferred: B")
        elif case == "malformed":
            self.chat("Both responses have merits.")
        elif case == "notjson":
            self.reply(200, b"<html>gateway</html>")
        elif case == "ratelimit":  # 429 asking for 1 s, then an answer
            self.reply(429, {"error": "slow down"}, [("Retry-After", "1")]) if call == 1 else self.chat("Preferred: A")
        elif case == "slow":  # the first request outlives the client's timeout
            time.sleep(1.0 if call == 1 else 0)
            self.chat("Preferred: B")
        elif case == "alwaysslow":
            time.sleep(0.6)
            self.chat("Preferred: B")
        elif case == "echo401":  # a careless server that echoes the key
            self.reply(401, {"error": f"bad key {key}"})
        elif case == "echo200":
            self.chat(f"Preferred: A (you sent {key})")
        elif case == "busy":  # long enough that two requests overlap even on a loaded machine
            time.sleep(0.5)
            self.chat("Preferred: A")


def b64_basic(prefix):
    return lambda key: "Authorization: Basic " + base64.b64encode(f"{prefix}:{key}".encode()).decode()


ECHO = {"raw": lambda k: f"bad key {k}",
        "json": lambda k: json.dumps({"error": f"bad key {k}"}).replace("/", "\\/"),  # PHP's json_encode escapes '/'
        "unicode": lambda k: '{"key": "' + "".join(f"\\u{ord(c):04x}" for c in k) + '"}',
        "url": lambda k: "https://x.test/?key=" + urllib.parse.quote(k, safe=""),
        "urllower": lambda k: "key=" + "".join(f"%{ord(c):02x}" for c in k),
        "mixed": lambda k: "key=" + "".join(urllib.parse.quote(c, safe="") if i % 2 else c for i, c in enumerate(k)),
        "basic0": b64_basic("u"), "basic1": b64_basic("us"), "basic2": b64_basic("use"),  # the 3 base64 alignments
        "b64url": lambda k: base64.urlsafe_b64encode(f"x:{k}".encode()).decode()}


def serve(handler=Stub):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.lock, server.calls, server.active, server.max_active, server.log = threading.Lock(), {}, 0, 0, []
    server.finished = 0  # slow or endless replies sent to their end
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@pytest.fixture
def stub():
    """The misbehaving server, and `elsewhere`, another server on another port its redirects point to."""
    server, elsewhere = serve(), serve()
    server.elsewhere, server.other = elsewhere.server_port, elsewhere
    yield server
    for s in (server, elsewhere):
        s.shutdown()
        s.server_close()


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("STUB_KEY", SECRET)
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)  # 127.0.0.1 must not go through a proxy


def judge(stub, route="", **kw):
    return ApiJudge(f"http://127.0.0.1:{stub.server_port}/{route}v1", "stub-model", "STUB_KEY", **kw)


def shows_key(text):
    """Whether any 8 characters of the key show in `text`."""
    return any(SECRET[i:i + 8] in text for i in range(len(SECRET) - 7))


def all_text(root):
    out = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), errors="replace") as fh:
                out.append(fh.read())
    return "\n".join(out)


def run_main(argv, capsys):
    """main(argv) expected to stop on bad input: (exit code, stderr)."""
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    return e.value.code, capsys.readouterr().err

# -----------------------------------------------------------------------------
# what comes back, and what is made of it


def test_api_judge_against_stub(stub, secret_env, tmp_path, capsys):
    j = judge(stub, timeout=0.3, retries=2, concurrency=4)
    cases = ["normal", "malformed", "notjson", "ratelimit", "slow", "alwaysslow", "echo401", "echo200"]
    cache = str(tmp_path / "cache.jsonl")
    answers = dict(zip(cases, ev.ask(j, [f"CASE:{c}" for c in cases], cache)))
    assert ev.parse_verdict(answers["normal"]) == "B"
    assert answers["malformed"] == "Both responses have merits." and ev.parse_verdict(answers["malformed"]) is None
    assert answers["notjson"] is None and stub.calls["notjson"] == 1  # a malformed reply is not retried
    assert ev.parse_verdict(answers["ratelimit"]) == "A" and stub.calls["ratelimit"] == 2  # 429, then retried
    assert ev.parse_verdict(answers["slow"]) == "B" and stub.calls["slow"] == 2  # timed out, then retried
    assert answers["alwaysslow"] is None and stub.calls["alwaysslow"] == 3  # 1 try + 2 retries, then invalid
    assert answers["echo401"] is None and stub.calls["echo401"] == 1  # a client error is not retried
    assert ev.parse_verdict(answers["echo200"]) == "A" and "[API key]" in answers["echo200"]
    errors = "\n".join(j.errors)
    assert "HTTP 401" in errors and "timed out" in errors and "malformed reply" in errors
    # the key reaches the server but no answer, error message, cache file or console line
    out = capsys.readouterr()
    for text in (errors, json.dumps(answers), out.out, out.err, all_text(tmp_path)):
        assert not shows_key(text)
    # the cache holds the successful answers only; a rerun asks just the failed requests again
    assert len(ev.read_jsonl(cache)) == 5
    before = dict(stub.calls)
    ev.ask(j, [f"CASE:{c}" for c in ("normal", "echo401")], cache)
    assert stub.calls["normal"] == before["normal"] and stub.calls["echo401"] == before["echo401"] + 1


def test_retry_after_is_honoured(stub, secret_env):
    """429 with Retry-After: 1, then an answer. openai's own first back-off is at most 0.5 s, so a second request
    a second or more after the first is the server's delay honoured."""
    answer, error = judge(stub, retries=1).ask("CASE:ratelimit")
    assert error is None and ev.parse_verdict(answer) == "A"
    (_, t1, _), (_, t2, _) = stub.log
    assert t2 - t1 >= 1.0


@pytest.mark.parametrize("route, message", [
    ("empty/", "malformed reply (JSONDecodeError("),  # a 200 with no body
    ("html/", "malformed reply (JSONDecodeError("),
    ("nochoices/", "malformed reply (KeyError('choices'))"),
    ("gzip/", "the reply is compressed (gzip) though the judge asked for none"),
    ("endless/", "the reply runs past 8 MiB; cut off"),
    ("trickle/", "timed out (--api_timeout 0.5 s, after the retries)"),
    ("tricklelength/", "timed out (--api_timeout 0.5 s, after the retries)"),
    ("slowheaders/", "timed out (--api_timeout 0.5 s, after the retries)"),
])
def test_a_reply_that_is_no_chat_completion_is_an_error_never_a_judgement(stub, secret_env, route, message):
    """A bodiless, HTML or choice-less 200, a compressed or endless body, headers or a body sent a byte every 0.2 s
    (each wait shorter than the timeout, so only a deadline on the whole request ends it): an error, counted
    invalid."""
    j = judge(stub, route, timeout=0.5, retries=1)
    answers = dict(j(["Compare A and B."]))
    assert answers == {0: None} and j.answered == 0 and message in j.errors[0], j.errors
    retried = route in ("trickle/", "tricklelength/", "slowheaders/")  # a timeout is retried; a reply refused as it is read would come back the same
    assert len(stub.log) == 1 + retried and stub.finished == 0  # the client hung up, not the server


@pytest.mark.parametrize("form", sorted(ECHO))
def test_the_key_echoed_in_any_encoding_is_scrubbed(stub, secret_env, form):
    answer, error = judge(stub, f"echo/{form}/", retries=0).ask("hello")
    assert answer is None and error.startswith("HTTP 401: ") and "[API key]" in error, error
    assert not shows_key(error) and ECHO[form](SECRET)[-12:] not in error, error


def test_the_key_is_scrubbed_before_a_body_is_cut(stub, secret_env):
    """A server that echoes the key where the message is cut at 200 characters: neither the error path nor the
    malformed-reply path shows any 8 characters of it."""
    for route in ("echo401/", "echo200/"):
        answer, error = judge(stub, route, retries=0).ask("hello")
        assert answer is None and "[API key]" in error and not shows_key(error), error


def test_api_judge_concurrency_limit(stub, secret_env):
    answers = dict(judge(stub, concurrency=2)([f"CASE:busy {i}" for i in range(8)]))
    assert sorted(answers) == list(range(8)) and set(answers.values()) == {"Preferred: A"}
    assert stub.max_active == 2  # 8 slow requests, never more than 2 in flight

# -----------------------------------------------------------------------------
# the key stays with the host of --api_base


def test_a_redirect_is_not_followed_and_the_key_never_leaves(stub, secret_env, tmp_path, capsys):
    out = tmp_path / "eval"
    code, err = run_main(["--models", "tiny", "--judge", "api", "--judge_model", "m", "--api_key_env", "STUB_KEY",
                          "--api_base", f"http://127.0.0.1:{stub.server_port}/redirect/v1", "--output_dir", str(out)],
                         capsys)
    assert code == 2 and err.count("\n") == 1 and "HTTP 302, a redirect to http://127.0.0.1:" in err, err
    assert "not followed" in err and not shows_key(err) and not out.exists()
    assert stub.other.log == []  # nothing, key or not, reached the other server
    # a redirect met by a judgement (after the probe) is a failed request, not a judgement
    j = judge(stub, "redirect/")
    assert dict(j(["x"])) == {0: None} and j.answered == 0 and stub.other.log == []


@pytest.mark.parametrize("base, message", [
    ("http://user:{quoted}@127.0.0.1:9/v1", "--api_base http://127.0.0.1:9/v1: a user name or password in the URL"),
    ("http://{quoted}@127.0.0.1:9/v1", "--api_base http://127.0.0.1:9/v1: a user name or password in the URL"),
    ("http://user:{key}@127.0.0.1:9/v1", "--api_base is not a valid URL (Port could not be cast to integer value as"),
    ("http://{key}@127.0.0.1:9/v1", "--api_base http://127.0.0.1:9/v1 holds the API key"),  # its '/' ends the host
    ("http://user:hunter2xyz@127.0.0.1:9/v1", "--api_base http://127.0.0.1:9/v1: a user name or password in the URL"),
    ("http://127.0.0.1:9/v1?api-key={key}", "--api_base http://127.0.0.1:9/v1?...: a query or fragment is refused"),
    ("http://127.0.0.1:9/v1#{key}", "a query or fragment is refused"),
    ("http://127.0.0.1:9/{key}/v1", "--api_base http://127.0.0.1:9/[API key]/v1 holds the API key"),
    ("http://127.0.0.1:9/{quoted}/v1", "holds the API key"),
    ("http://[::1", "--api_base is not a valid URL (Invalid IPv6 URL)"),
    ("http://127.0.0.1:99999/v1", "--api_base is not a valid URL (Port out of range 0-65535)"),
    ("127.0.0.1:9/v1", "--api_base 127.0.0.1:9/v1: not an http:// or https:// URL"),
    ("file:///etc/passwd", "not an http:// or https:// URL"),
    ("http:///v1", "not an http:// or https:// URL"),  # no host
])
def test_a_credential_in_api_base_is_refused_without_showing_it(secret_env, tmp_path, capsys, base, message):
    out = tmp_path / "eval"
    base = base.format(key=SECRET, quoted=urllib.parse.quote(SECRET, safe=""))
    code, err = run_main(["--models", "tiny", "--judge", "api", "--judge_model", "m", "--api_key_env", "STUB_KEY",
                          "--api_base", base, "--output_dir", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err and not shows_key(err), err
    assert SECRET[:7] not in err and "hunter2" not in err and not out.exists()


@pytest.mark.parametrize("value, message", [
    (SECRET[:10] + "\n" + SECRET[10:], "holds a character an HTTP header cannot carry"),  # http would echo it
    ("qzx7k", "holds 5 characters, fewer than 8"),  # could not be scrubbed without eating the judge's words
])
def test_a_key_that_cannot_be_sent_or_scrubbed_is_refused_without_showing_it(monkeypatch, value, message):
    monkeypatch.setenv("STUB_KEY", value)
    with pytest.raises(InputError) as e:
        ApiJudge("http://127.0.0.1:9/v1", "m", "STUB_KEY")
    assert "$STUB_KEY" in str(e.value) and message in str(e.value) and value[:5] not in str(e.value)


def test_a_missing_openai_package_is_one_line(secret_env, tmp_path, capsys, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "openai", None)  # what `import openai` meets when it is not installed
    out = tmp_path / "eval"
    code, err = run_main(["--models", "tiny", "--judge", "api", "--judge_model", "m", "--api_key_env", "STUB_KEY",
                          "--output_dir", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and "--judge api needs the openai package" in err
    assert "pip install -U openai" in err and not out.exists()

# -----------------------------------------------------------------------------
# the probe and the flags


@pytest.mark.parametrize("route, message", [
    ("status/401/", "the judge API at --api_base {base} refused the key in $STUB_KEY (HTTP 401: "),
    ("status/403/", "refused the key in $STUB_KEY (HTTP 403: "),
    ("status/404/", "--judge_model stub-model: not found at --api_base {base} (HTTP 404: "),
    ("status/500/", "the judge API at --api_base {base} did not answer a test request (HTTP 500: "),
    ("status/400/", "did not answer a test request (HTTP 400: "),
    ("html/", "does not answer like an OpenAI-compatible chat-completions API (malformed reply"),
    ("endless/", "does not answer like an OpenAI-compatible chat-completions API (the reply runs past 8 MiB"),
    ("slowheaders/", "cannot reach --api_base {base}, or it did not answer in time (timed out (--api_timeout 0.5 s"),
    ("closed", "cannot reach --api_base {base}, or it did not answer in time (ConnectError: "),
])
def test_the_probe_says_which_judge_setting_is_wrong(stub, secret_env, route, message):
    port = closed_port() if route == "closed" else stub.server_port
    base = f"http://127.0.0.1:{port}/{route.rstrip('/') + '/' if route != 'closed' else ''}v1"
    with pytest.raises(InputError) as e:
        ApiJudge(base, "stub-model", "STUB_KEY", timeout=0.5, retries=1).probe()
    assert message.format(base=base) in str(e.value) and not shows_key(str(e.value)), str(e.value)


def closed_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("flags, message", [
    (["--api_timeout", "1e300"], "argument --api_timeout: must be a number of seconds in (0, 3600], got 1e300"),
    (["--api_timeout", "nan"], "argument --api_timeout: must be a number of seconds in (0, 3600], got nan"),
    (["--api_timeout", "0"], "argument --api_timeout: must be a number of seconds in (0, 3600], got 0"),
    (["--api_retries", "1000000000"], "argument --api_retries: must be an integer in [0, 100], got 1000000000"),
    (["--api_retries=-1"], "argument --api_retries: must be an integer in [0, 100], got -1"),
    (["--api_concurrency", "0"], "argument --api_concurrency: must be an integer in [1, 256], got 0"),
    (["--api_concurrency", "100000"], "argument --api_concurrency: must be an integer in [1, 256], got 100000"),
    (["--api_backoff", "2"], "unrecognized arguments: --api_backoff 2"),  # openai's back-off, or Retry-After
    (["--judge", "api", "--judge_model", "m", "--api_key_env", "UNSET_KEY_26"],
     "--judge api reads the key from $UNSET_KEY_26, which is not set"),
])
def test_judge_flags_are_one_line(secret_env, tmp_path, capsys, flags, message):
    out = tmp_path / "eval"
    code, err = run_main(["--models", "tiny", "--output_dir", str(out), *flags], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists()

# -----------------------------------------------------------------------------
# the scrub, over keys and the forms a server may echo them in


def encodings(key, prefix):
    raw = key.encode()
    yield key
    yield json.dumps(key)[1:-1]
    yield json.dumps(key)[1:-1].replace("/", "\\/")
    yield "".join(f"\\u{ord(c):04x}" for c in key)
    yield "".join(f"\\u{ord(c):04X}" for c in key)
    yield urllib.parse.quote(key, safe="")
    yield urllib.parse.quote(key, safe="").lower()
    yield urllib.parse.quote_plus(key)
    yield "".join(f"%{ord(c):02x}" for c in key)
    yield "".join(f"&#{ord(c)};" for c in key)
    for alphabet in (base64.b64encode, base64.urlsafe_b64encode):
        yield alphabet(prefix.encode() + raw).decode()
        yield alphabet(prefix.encode() + raw + b"\n").decode()


@settings(max_examples=200, deadline=None)
@given(key=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=8, max_size=64),
       prefix=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=7),
       before=st.text(max_size=20), after=st.text(max_size=20))
def test_scrub_removes_every_encoding_of_any_key(key, prefix, before, after):
    pattern = key_pattern(key)
    for form in encodings(key, prefix):
        text = before + form + after
        scrubbed = pattern.sub("[API key]", text)
        assert "[API key]" in scrubbed and form not in scrubbed and key not in scrubbed, (form, scrubbed)


@settings(max_examples=200, deadline=None)
@given(key=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=8, max_size=64),
       text=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=200))
def test_scrub_leaves_text_without_the_key_alone(key, text):
    """The judge's answers pass through the scrub: where the key is not in them, not one character may change."""
    if not any(form in text for form in encodings(key, "")):
        assert key_pattern(key).sub("[API key]", text) == text

# -----------------------------------------------------------------------------
# whole runs


def test_a_wrong_key_is_found_before_generation(stub, secret_env, tmp_path, capsys):
    out = tmp_path / "eval"
    code, err = run_main(["--models", "tiny", "--judge", "api", "--judge_model", "m", "--api_key_env", "STUB_KEY",
                          "--api_base", f"http://127.0.0.1:{stub.server_port}/status/401/v1", "--output_dir", str(out)],
                         capsys)
    assert code == 2 and "refused the key in $STUB_KEY" in err
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


@pytest.mark.slow
def test_end_to_end_api_judge_cancels_position_bias(stub, secret_env, tmp_path, capsys):
    out = str(tmp_path / "eval")
    hand_made_generations(out, 3, [" 1", " 2", " 3"])
    argv = ["--models", "tiny", "--labels", "policy", "--n_prompts", "3", "--judge", "api", "--judge_model", "stub",
            "--api_base", f"http://127.0.0.1:{stub.server_port}/v1", "--api_key_env", "STUB_KEY", "--output_dir", out]
    res = ev.main(argv)
    pol, chosen = res["models"]
    # the stub always answers "A": the policy wins every first judgement and loses every second -> 50%, CI 0
    w = pol["win_rate"]
    assert (w["wins"], w["ties"], w["losses"], w["invalid"], w["rate"], w["ci"]) == (3, 0, 3, 0, 0.5, 0.0)
    assert pol["criteria"]["coherence"] == {"mean": 7.0, "ci": 0.0, "n": 3}
    assert chosen["criteria"]["harmlessness"]["mean"] == 9.0 and pol["ratings_invalid"] == 0
    assert stub.calls["judge"] == 1 + 2 * 3 + 3 + 3  # the probe, both orders of 3 prompts, 3 + 3 ratings
    out_text = capsys.readouterr()
    assert not shows_key(all_text(out) + out_text.out + out_text.err + json.dumps(res))
    # rerun: every answer comes from the cache, the server is not asked again
    ev.main(argv)
    assert stub.calls["judge"] == 14  # the probe again; every answer from the cache

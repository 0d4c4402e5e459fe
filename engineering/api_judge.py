"""
The API judge of evaluate.py (--judge api): an OpenAI-compatible chat-completions server reached through the `openai`
package (optional: pip install openai), and what keeps the key with that server.

- The key is read from an environment variable and sent in the Authorization header to the host of --api_base only:
  redirects are not followed (a 3xx is an error naming where it pointed), and an --api_base holding a user name,
  password, query string or the key itself is refused before anything is sent.
- Every answer and message that comes back is scrubbed of the key in any form a server may echo it in (raw,
  JSON-escaped, URL-encoded, an HTML entity, any mix of those, or inside base64 as in a Basic header), before it is
  cut for a message, so no part of it reaches the console, a log or a file.
- openai retries 408, 409, 429, 5xx, dropped connections and timeouts, --api_retries times at most, waiting the
  server's Retry-After (up to 2 minutes) or its own back-off (0.5 s doubling to 8 s). --api_timeout bounds each
  request as a whole: a watchdog shuts its connection down when it runs past, whatever it waits for (a server that
  sends its headers or body a byte at a time included); for that, every request opens its own connection. A reply
  is read as it is sent (Accept-Encoding: identity, a compressed one refused) and cut off past MAX_REPLY bytes.
- A reply that is not the JSON of a chat completion with a text answer (bodiless, HTML, no choices) is an error,
  counted invalid, never a judgement.
"""
import base64
import json
import os
import re
import socket
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor, as_completed

from tqdm import tqdm

from engineering.cli import InputError, first_line, need, ranged

MIN_KEY = 8  # a shorter key could be scrubbed out of the judge's own words ("A", "7")
MAX_REPLY = 8 << 20  # bytes; a chat completion of --judge_max_new_tokens tokens is a few KB

# the judge flags' ranges: an hour per request, a hundred retries, 256 requests in flight are past any real need
timeout_s = ranged(float, lambda x: 0 < x <= 3600, "a number of seconds in (0, 3600]")
retries = ranged(int, lambda x: 0 <= x <= 100, "an integer in [0, 100]")
concurrency = ranged(int, lambda x: 1 <= x <= 256, "an integer in [1, 256]")


class BadReply(Exception):
    """A reply refused while it is read (too long, compressed): not retried, since it would come back the same."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


def import_client():
    """(openai, httpx2), or InputError naming the install."""
    try:
        import httpx2
        import openai
    except ImportError as e:
        raise InputError(f"--judge api needs the openai package, 3.63 or later ({first_line(e)}): "
                         f"pip install -U openai") from None
    return openai, httpx2


def api_key(key_env):
    """The judge's API key from $key_env ('' for a server without one); InputError, the key not shown, when the
    variable is unset, holds a character an HTTP header cannot carry, or is too short to scrub safely."""
    need(key_env in os.environ, f"--judge api reads the key from ${key_env}, which is not set (set it; empty for a "
                                f"server without a key)")
    key = os.environ[key_env].strip()
    need(all(32 < ord(c) < 127 for c in key),
         f"${key_env} holds a character an HTTP header cannot carry (space, control, non-ASCII)")
    need(not 0 < len(key) < MIN_KEY, f"${key_env} holds {len(key)} characters, fewer than {MIN_KEY}: a key that short "
                                     f"could not be told from the judge's words when it is scrubbed from them; set it "
                                     f"empty for a server without a key")
    return key


def key_pattern(key):
    """A regex for the key as a server may echo it: each character raw, backslash-escaped (JSON's \\/), as \\u00XX,
    %XX (either case) or an HTML entity, in any mix; or the key inside base64 (a Basic header), at each of the three
    alignments a prefix can give it, in the standard or the URL-safe alphabet."""
    def char(c):
        o = ord(c)
        return "(?:" + "|".join([re.escape(c), r"\\" + re.escape(c), f"%{o:02x}", rf"\\u{o:04x}", f"&#0*{o};",
                                 f"&#x0*{o:x};"]) + ")"
    forms, raw = ["".join(map(char, key))], key.encode()
    for shift in range(3):  # base64 maps 3 bytes to 4 characters: the characters that depend on the key alone
        enc = base64.b64encode(b"\0" * shift + raw).decode()
        core = enc[-(-8 * shift // 6):8 * (shift + len(raw)) // 6]
        forms += [re.escape(core), re.escape(core.translate(str.maketrans("+/", "-_")))]
    return re.compile("|".join(forms), re.IGNORECASE)


def shown_url(url):
    """--api_base as a message may show it: without what lies between the scheme and the last '@' (a user name or
    password, even one holding a '/') and from the first '?' or '#' on (a query, a fragment)."""
    return re.sub(r"^(\w[\w+.-]*://)?.*@", lambda m: m[1] or "", re.split(r"[?#]", url, maxsplit=1)[0])


def check_api_base(url, key):
    """InputError unless `url` is an http(s) URL with a host and nothing that could be a credential (a user name or
    password, a query such as ?api-key=, the key in any form): what a message or results.md shows of it is safe."""
    pattern = key_pattern(key) if key else None
    safe = pattern.sub("[API key]", shown_url(url)) if pattern else shown_url(url)
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - a port that is not a number in [0, 65535] raises here
    except ValueError as e:
        reason = re.sub(r"'.*'", "...", first_line(e))  # urllib quotes the part it refused, which may be a secret
        raise InputError(f"--api_base is not a valid URL ({reason})") from None
    need(parts.scheme in ("http", "https") and parts.hostname, f"--api_base {safe}: not an http:// or https:// URL")
    need("@" not in parts.netloc, f"--api_base {safe}: a user name or password in the URL would be sent and shown; "
                                  f"the judge sends the key, from the variable --api_key_env names, in a header")
    need(not parts.query and not parts.fragment,
         f"--api_base {safe}?...: a query or fragment is refused (it can hold a credential, such as api-key=); give "
         f"the server's URL only")
    need(not (pattern and pattern.search(url)), f"--api_base {safe} holds the API key; give the server's URL only "
                                                f"(the key is sent in a header)")
    _, httpx2 = import_client()
    try:
        httpx2.URL(url)
    except Exception as e:  # noqa: BLE001 - httpx2's InvalidURL and friends: a host or path it cannot send to
        raise InputError(f"--api_base {safe}: not a URL the HTTP client accepts ({type(e).__name__})") from None


class ApiJudge:
    """Calling it with a list of texts yields (index, answer) as answers arrive; answer None = the request failed,
    its scrubbed message kept in .errors. probe() tries the settings with one cheap request before any generation."""

    def __init__(self, base_url, model, key_env="OPENAI_API_KEY", timeout=60.0, retries=5, concurrency=8,
                 max_tokens=256):
        openai, httpx2 = import_client()
        self.key, self.key_env = api_key(key_env), key_env
        check_api_base(base_url, self.key)
        self.pattern = key_pattern(self.key) if self.key else None
        self.base, self.model, self.timeout, self.concurrency = base_url, model, timeout, concurrency
        self.max_tokens, self.name = max_tokens, f"api:{base_url}:{model}:{max_tokens}"
        self.errors, self.answered = [], 0  # the failed requests' messages; how many got an answer
        self.openai, self.httpx2 = openai, httpx2
        # no idle connection is kept, so that every request opens its own, which its watchdog can shut down
        http = openai.DefaultHttpxClient(timeout=timeout, follow_redirects=False,
                                         limits=httpx2.Limits(max_keepalive_connections=0),
                                         headers={"Accept-Encoding": "identity"},
                                         event_hooks={"request": [self.start], "response": [self.guard]})
        # openai needs some key; a keyless server ignores the placeholder its docs use (vLLM: "EMPTY")
        self.client = openai.OpenAI(api_key=self.key or "EMPTY", base_url=base_url, max_retries=retries,
                                    timeout=timeout, http_client=http)

    # -------------------------------------------------------------------------
    # the reply's limits, as httpx2 event hooks: a watchdog for each attempt, the body read through capped()

    def start(self, request):
        watchdog = Watchdog(self.timeout)
        request.extensions.update(trace=watchdog.trace, judge_watchdog=watchdog)

    def guard(self, response):
        watchdog = response.request.extensions["judge_watchdog"]
        encoding = response.headers.get("content-encoding", "identity").lower()
        if encoding != "identity":
            watchdog.done()
            raise BadReply(f"the reply is compressed ({encoding}) though the judge asked for none",
                           response.status_code)
        response.stream = capped(response, watchdog, self.httpx2)

    # -------------------------------------------------------------------------

    def scrub(self, text):
        return self.pattern.sub("[API key]", text) if self.pattern else text

    def ask(self, text, max_tokens=None):
        """(answer, None) or (None, error message), both scrubbed of the key here, the one way out."""
        answer, error, _ = self.request(text, max_tokens or self.max_tokens)
        return (self.scrub(answer), None) if error is None else (None, self.scrub(error))

    def request(self, text, max_tokens):
        """(answer, error, HTTP status or None) of one chat completion, retried by openai as the module says. A body
        in a message is scrubbed of the key before it is cut to 200 characters, so no part of the key shows."""
        openai = self.openai
        try:
            raw = self.client.chat.completions.with_raw_response.create(
                model=self.model, messages=[{"role": "user", "content": text}], temperature=0, max_tokens=max_tokens)
        except openai.APIStatusError as e:
            r, error = e.response, f"HTTP {e.status_code}: {self.scrub(e.response.text)[:200]}"
            if r.is_redirect:
                error = (f"HTTP {e.status_code}, a redirect to {self.scrub(r.headers.get('location', '?'))[:200]}: not "
                         f"followed, so that the key goes to the host of --api_base only; give the final URL as "
                         f"--api_base")
            return None, error, e.status_code
        except openai.APIConnectionError as e:  # APITimeoutError included
            if isinstance(e, openai.APITimeoutError) or getattr(e.request.extensions.get("judge_watchdog"), "cut", 0):
                return None, f"timed out (--api_timeout {self.timeout:g} s, after the retries)", None
            return None, f"{type(e.__cause__ or e).__name__}: {self.scrub(first_line(e.__cause__ or e))}", None
        except BadReply as e:
            return None, str(e), e.status
        except openai.OpenAIError as e:  # anything else the client refuses: a failed request, not a traceback
            return None, f"{type(e).__name__}: {self.scrub(first_line(e))}", None
        body = raw.http_response.text
        try:
            answer = json.loads(body)["choices"][0]["message"]["content"]
            if not isinstance(answer, str):
                raise TypeError("content is not a string")
            return answer, None, 200
        except (ValueError, KeyError, IndexError, TypeError) as e:
            return None, f"malformed reply ({e!r}): {self.scrub(body)[:200] or '(no body)'}", 200

    def probe(self):
        """One chat completion of one token before any generation: the key, --judge_model and --api_base work, or
        InputError saying which does not."""
        _, error, status = self.request("Reply with the letter A.", 1)
        if error is None:
            return
        error, base = self.scrub(error), self.scrub(self.base)
        where = f"the judge API at --api_base {base}"
        need(status not in (401, 403), f"{where} refused the key in ${self.key_env} ({error})")
        need(status != 404, f"--judge_model {self.model}: not found at --api_base {base} ({error}); check the model "
                            f"id and the URL")
        need(status is not None, f"cannot reach --api_base {base}, or it did not answer in time ({error})")
        need(status != 200, f"{where} does not answer like an OpenAI-compatible chat-completions API ({error})")
        raise InputError(f"{where} did not answer a test request ({error}); check --judge_model and --api_base, or "
                         f"try again later")

    def __call__(self, texts):
        with ThreadPoolExecutor(self.concurrency) as pool:  # at most `concurrency` requests in flight
            futures = {pool.submit(self.ask, t): i for i, t in enumerate(texts)}
            for fut in as_completed(futures):
                answer, error = fut.result()
                if error:
                    self.errors.append(error)
                    tqdm.write(f"judge request failed, counted invalid: {error}")
                else:
                    self.answered += 1
                yield futures[fut], answer


class Watchdog:
    """The deadline of one request: `timeout` seconds after it starts, its connection is shut down, whatever it is
    waiting for (the connection, headers or a body sent a byte at a time), and the reader wakes with an error.
    httpcore2's trace extension hands over each socket the request opens."""

    def __init__(self, timeout):
        self.sockets, self.cut, self.lock = [], False, threading.Lock()
        self.timer = threading.Timer(timeout, self.fire)
        self.timer.daemon = True
        self.timer.start()

    def trace(self, name, info):
        if name in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            with self.lock:
                self.sockets.append(info["return_value"].get_extra_info("socket"))
            if self.cut:  # the deadline passed while it connected
                self.fire()

    def fire(self):
        with self.lock:
            self.cut = True
            for sock in self.sockets:
                try:  # the socket's own shutdown, under TLS too: a read blocked in another thread returns
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass  # closed already

    def done(self):
        self.timer.cancel()


def capped(response, watchdog, httpx2):
    """The response's body as httpx2 reads it, cut off past MAX_REPLY bytes (BadReply) or, when the watchdog shut the
    connection, a ReadTimeout (which openai retries); the watchdog is stopped once the body is closed."""
    stream = response.stream

    class Capped(httpx2.SyncByteStream):
        def __iter__(self):
            size = 0
            for chunk in stream:
                size += len(chunk)
                if size > MAX_REPLY:
                    raise BadReply(f"the reply runs past {MAX_REPLY >> 20} MiB; cut off", response.status_code)
                yield chunk
            if watchdog.cut:  # a body that ends when the connection does looks whole when the watchdog shut it
                raise httpx2.ReadTimeout("the reply took longer than --api_timeout")

        def close(self):
            watchdog.done()
            stream.close()
    return Capped()

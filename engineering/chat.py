"""
Chat-format preference data: conversational rows turned into the same (prompt text, response text) rows that the
text layouts give, so that tokenisation, truncation and the -100 prompt mask stay where they are, in common.py
(tokenize_rows, build_sequence). Nothing here tokenises or masks.

Layouts (each message {"role": str, "content": str}; a row is conversational when any field is a list):
- explicit prompt: {"prompt": [messages], "chosen": [messages], "rejected": [messages]}, each response starting
  with an assistant turn. KTO's unpaired rows are the same with one response:
  {"prompt": [messages], "completion": [messages], "label": true/false}.
- implicit prompt: {"chosen": [conversation], "rejected": [conversation]} (trl-lib/ultrafeedback_binarized): the
  prompt is the turns the two conversations share, by split_chat.
- HuggingFaceH4/ultrafeedback_binarized (splits train_prefs/test_prefs): implicit, plus "prompt" as a STRING (its
  first user turn again). The string is ignored and the prompt taken from the conversations, so the H4 and trl-lib
  copies of UltraFeedback give the same rows.
chat_row() checks a row and brings it to the explicit layout (no tokenizer needed, so a bad row is caught before
the model loads); render_chat() turns an explicit row into text with the tokenizer's own chat template:

    prompt   = apply_chat_template(prompt_messages, add_generation_prompt=True)
    response = apply_chat_template(prompt_messages + response_messages), with that prompt cut off its front

so the boundary falls right after the template's assistant header (SmolLM2: "<|im_start|>assistant\\n"), exactly
where a chat front end starts generating. A template that does not render the prompt as a prefix of the whole
conversation has no such boundary and is refused.

Conventions (pinned by test_chat.py):
- EOS. The template ends every assistant turn with its own end-of-turn token (SmolLM2, Qwen: "<|im_end|>";
  Llama 3: "<|eot_id|>"), which is what the model emits to stop in a chat. So a chat row's responses get no
  extra EOS (text rows get one appended); the template's text after that token (ChatML's "\\n") is part of the
  response and trained like the rest. Rendered text is tokenised with add_special_tokens=False, as text rows are:
  a template that writes its own BOS ("<|begin_of_text|>") gets it exactly once.
- A response of several turns (a multi-turn explicit response, or conversations that diverge before the last
  turn) is trained on all of its text, the user turns inside it included, as HH's text responses are.
- No template. A tokenizer without a chat template (the byte tokenizer of the built-in --model tiny and small)
  is refused with a one-line DataError naming the fix, not given a plain fallback format: a model would then be
  aligned in a format of our choosing that no chat front end uses, and a template is one attribute away
  (tokenizer.chat_template = "...") for anyone who wants one.
- Only "role" and "content" reach the template: a JSON file read through Arrow gives every message the union of
  the keys seen in the file, with None where a message had none.
- Errors are DataError naming the field and, inside a message list, the message (1-based); check_rows adds the
  file and the row, as for text rows.
"""
import os

from engineering.cli import DataError, first_line

# -----------------------------------------------------------------------------
# checking a row and splitting off the prompt (no tokenizer)


def is_chat(row):
    """True for a conversational row: one of its text fields holds a list (of messages)."""
    fields = ("prompt", "chosen", "rejected", "completion")
    return isinstance(row, dict) and any(isinstance(row.get(f), list) for f in fields)


def check_messages(messages, field):
    """The messages of `field` as a new list of {"role", "content"}; DataError names what is wrong."""
    if not isinstance(messages, list):
        raise DataError(f"field {field!r} must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise DataError(f"field {field!r} is an empty list of messages")
    out = []
    for j, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise DataError(f'field {field!r}: message {j} is a {type(m).__name__}, not a {{"role", "content"}} object')
        for k in ("role", "content"):
            if m.get(k) is None:
                raise DataError(f"field {field!r}: message {j} has no {k!r}")
            if not isinstance(m[k], str):
                raise DataError(f"field {field!r}: message {j}: {k!r} must be a string, got {type(m[k]).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def split_chat(chosen, rejected):
    """Split two full conversations (checked message lists) into (prompt, chosen_response, rejected_response).

    split_hh's rule on turns: HH's prompt ends at the last "\\n\\nAssistant:" the two texts share, so here the
    prompt ends just before the last assistant turn that starts within the shared turns. When the conversations
    differ first at an assistant turn (the usual case: only the last answer differs) the prompt is every turn
    before it. When they differ earlier, at a user turn say, or one stops where the other goes on, the prompt
    stops before the last assistant turn they share, and both responses carry the rest of their conversation
    from there, that shared assistant turn included.
    """
    n = 0  # leading turns shared, equal in role and content
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    # both go on with an assistant turn: its header is shared, as HH's "\n\nAssistant:" would be
    both_answer = n < min(len(chosen), len(rejected)) and chosen[n]["role"] == rejected[n]["role"] == "assistant"
    end = n if both_answer else max((i for i in range(n) if chosen[i]["role"] == "assistant"), default=0)
    if end == 0:
        raise DataError("no prompt: chosen and rejected share no turns before an assistant turn")
    return chosen[:end], chosen[end:], rejected[end:]


def chat_row(row, fields):
    """A conversational row as {field: value for field in fields} in the explicit layout: the prompt and every
    response a checked list of messages, the implicit prompt split off by split_chat. Fields that are not text
    (KTO's label) are passed through unchecked, for check_rows. `fields` is ("prompt", "chosen", "rejected"),
    ("prompt", "completion", "label") or ("prompt", "completion")."""
    responses = [f for f in fields if f not in ("prompt", "label")]
    # implicit prompt: none given, or H4's string, which repeats the first user turn and is not needed
    implicit = len(responses) == 2 and (row.get("prompt") is None or isinstance(row["prompt"], str))
    checked = {}
    for f in (responses if implicit else ["prompt", *responses]):
        if row.get(f) is None:
            raise DataError(f"missing field {f!r}")
        checked[f] = check_messages(row[f], f)
    if implicit:
        checked = dict(zip(("prompt", *responses), split_chat(*checked.values())))
    for f in responses:  # split_chat's responses always do
        if checked[f][0]["role"] != "assistant":
            raise DataError(f"field {f!r}: message 1 has role {checked[f][0]['role']!r}; "
                            f"a response starts with an assistant turn")
    return {f: checked.get(f, row.get(f)) for f in fields}

# -----------------------------------------------------------------------------
# rendering with the tokenizer's chat template


NO_TEMPLATE = ("chat-format rows need a tokenizer with a chat template and this one has none (the built-in "
               "--model tiny and small have none): use a model that has one, e.g. --model smollm2, or text rows")


def render_chat(tokenizer, row, keys):
    """{"prompt": text, key: text for key in keys} from an explicit-layout row (chat_row), rendered with the
    tokenizer's chat template: the prompt ends with the generation prompt (the assistant header), each response
    is the rest of the rendered conversation and ends with the template's end-of-turn text (no EOS appended)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(NO_TEMPLATE)
    def render(messages, **kw):  # a template may raise ("roles must alternate"): name the row, not a traceback
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, **kw)
        except Exception as e:  # noqa: BLE001 - jinja's TemplateError, a template's raise_exception, a TypeError
            first = row["prompt"][0]["content"][:40]
            raise DataError(f"the chat template fails on the row whose prompt begins {first!r} ({type(e).__name__}: "
                            f"{first_line(e)}); fix or drop that row, or use a model whose template takes it") from None
    prompt = render(row["prompt"], add_generation_prompt=True)
    out = {"prompt": prompt}
    for k in keys:
        full = render(row["prompt"] + row[k])
        if not full.startswith(prompt):
            i = len(os.path.commonprefix([prompt, full]))
            raise DataError(f"the chat template renders the prompt (with add_generation_prompt=True) as "
                            f"{prompt[i:i + 30]!r}... where prompt + {k} has {full[i:i + 30]!r}..., so there is no "
                            f"prompt/response boundary; use a model whose template renders the prompt as the start "
                            f"of the conversation")
        out[k] = full[len(prompt):]
    return out


def render_rows(tokenizer, rows, keys):
    """Rows for common.tokenize_rows: a chat-format row rendered as text by render_chat and marked "eos": False (the
    template's end-of-turn token ends each response already); a text row as it is."""
    return [{**r, **render_chat(tokenizer, r, keys), "eos": False} if is_chat(r) else r for r in rows]

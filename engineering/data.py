"""
Data loading: Anthropic HH and TL;DR from the hub, other hub datasets (org/name) and local dataset folders laid out
like them, local .json/.jsonl/.jsonl.gz files, and the toy task, each as validated rows: {"prompt", "chosen",
"rejected"} pairs, {"prompt", "completion", "label"} examples (KTO) or {"prompt", "completion"} demonstrations (SFT).
A field holds text, or in a chat-format row a list of messages {"role", "content"} (chat.py: the explicit and
implicit prompt layouts; tokenize_rows renders them with the tokenizer's chat template).

Every row is checked before training starts, and a bad one stops the run naming the file, the row and the field
(or is skipped and counted under --skip_bad_rows). A reader needs this file to train on their own data or to see
what a hub set is turned into; the prompt boundary of HH dialogues itself is common.split_hh, that of two
conversations chat.split_chat.
"""
import gzip
import hashlib
import os
from contextlib import nullcontext

from common import split_hh
from engineering.chat import chat_row, is_chat
from engineering import jsonio
from engineering.cli import DataError, InputError, first_line
from engineering.hub import fetching
from engineering.toy import toy_preferences, toy_sft_rows

PAIRED, UNPAIRED, HH = ("prompt", "chosen", "rejected"), ("prompt", "completion", "label"), ("chosen", "rejected")


def check_rows(rows, source, fields, skip_bad_rows, hh_fields=None):
    """Validate rows (dicts) in order; return the good ones as dicts of `fields`.

    A row must have every field as a string, with a non-empty prompt (responses may be empty). HH-style rows
    holding only `hh_fields` = (chosen, rejected) full dialogues are split with split_hh. A chat-format row (a
    field holds a list) is checked by chat.chat_row instead and comes out in the explicit layout, its fields lists
    of messages. A bad row raises DataError naming the source, the row (1-based) and the field, unless
    skip_bad_rows, then it is counted.
    """
    good, bad = [], 0
    for i, row in enumerate(rows, 1):
        try:
            if not isinstance(row, dict):
                raise DataError(f"is a {type(row).__name__}, not a JSON object")
            chat = is_chat(row)
            if chat:  # message lists checked, an implicit prompt split off
                row = chat_row(row, fields)
            elif hh_fields and "prompt" not in row and all(f in row for f in hh_fields):
                for f in hh_fields:
                    if not isinstance(row[f], str):
                        raise DataError(f"field {f!r} must be a string, got {type(row[f]).__name__}")
                prompt, c, r = split_hh(row[hh_fields[0]], row[hh_fields[1]])
                row = {"prompt": prompt, "chosen": c, "rejected": r}
            for f in fields:
                if f not in row or row[f] is None:
                    raise DataError(f"missing field {f!r}")
                if f == "label" and not isinstance(row[f], bool):  # "false" as a string would count as True
                    raise DataError(f"field 'label' must be true or false (a JSON bool), got {row[f]!r}")
                if f != "label" and not chat and not isinstance(row[f], str):
                    raise DataError(f"field {f!r} must be a string, got {type(row[f]).__name__}")
            if not chat and not row["prompt"].strip():
                raise DataError("field 'prompt' is empty")
            good.append({f: row[f] for f in fields})
        except DataError as e:
            if not skip_bad_rows:
                raise DataError(f"{source}: row {i}: {e} (fix the row, or pass --skip_bad_rows)") from None
            bad += 1
    if bad:
        print(f"{source}: skipped {bad} bad row(s) of {len(rows)}")
    return good


def read_json_rows(path, skip_bad_rows=False):
    """Rows of a local .json (one list, or JSON lines), .jsonl or .jsonl.gz file, exactly as written.

    Read with the json module, not `datasets`: Arrow wants one type per column, and where rows disagree (a string
    in one row, a number in another) it keeps the column as JSON text and decodes every value, so the string
    "5." comes back as the number 5.0 and the wrong row is blamed. A line that is not JSON is named (and skipped
    under skip_bad_rows), and so is one jsonio.parse refuses (nested too deeply, a lone surrogate); lines are split
    on "\n" only.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read ({e})") from None
    if path.endswith(".json") and text.lstrip().startswith("["):
        try:
            rows = jsonio.parse(text)
        except ValueError as e:
            raise DataError(f"{path}: {e}") from None
        return rows
    rows, bad = [], 0
    for n, line in jsonio.lines(text):
        try:
            rows.append(jsonio.parse(line))
        except ValueError as e:
            if not skip_bad_rows:
                raise DataError(f"{path}: line {n}: {e}; fix it or pass --skip_bad_rows") from None
            bad += 1
    if bad:
        print(f"{path}: skipped {bad} unparseable line(s)")
    if not rows and not bad:
        raise DataError(f"{path}: no rows")
    return rows


def read_dataset(name):
    """(train rows, test rows or None) of a hub dataset id (org/name) or a local folder laid out like one (data files
    named by split, e.g. data/train-00000-of-00001.parquet, or a README.md naming them), both through
    datasets.load_dataset. The splits: train_prefs and test_prefs where the set has them
    (HuggingFaceH4/ultrafeedback_binarized), else train and test; no test split gives None."""
    import datasets
    datasets.disable_progress_bars()
    hub = fetching(name, "dataset", f"dataset {name!r}", "a local .jsonl file or dataset folder as --dataset")
    try:
        with nullcontext() if os.path.isdir(name) else hub:
            splits = datasets.load_dataset(name)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - an empty folder, a corrupt parquet, ...: the folder is unusable as data
        raise DataError(f"{name}: cannot be read as a dataset ({type(e).__name__}: {first_line(e)})") from None
    train, test = ("train_prefs", "test_prefs") if "train_prefs" in splits else ("train", "test")
    if train not in splits:
        raise DataError(f"{name}: no split named train_prefs or train (it has {', '.join(splits)})")
    return splits[train].to_list(), splits[test].to_list() if test in splits else None


def read_rows(name, skip_bad_rows=False):
    """(train rows, test rows or None) of a local file (no test split) or of read_dataset."""
    return (read_json_rows(name, skip_bad_rows), None) if os.path.isfile(name) else read_dataset(name)


def fingerprint(name):
    """A sha256 of what a local --dataset holds (the file, or every file of the folder by name and bytes; hidden ones
    skipped), or None for the built-in sets and hub ids, which their name (and --seed, for toy) fixes. A checkpoint
    records it, so that --resume refuses data edited since."""
    if not os.path.exists(name):
        return None
    files = [name]
    if os.path.isdir(name):
        files = []
        for d, dirs, fs in os.walk(name):
            dirs[:] = sorted(x for x in dirs if not x.startswith("."))  # not .git, .cache
            files += [os.path.join(d, f) for f in sorted(fs) if not f.startswith(".")]
    h = hashlib.sha256()
    for path in files:
        h.update(os.path.relpath(path, name).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def is_builtin(name):
    return name in ("toy", "hh", "tldr") or name.startswith("hh:")


def checked_splits(name, rows, test, fields, eval_size, skip_bad_rows, hh_fields=None, size_flag="--eval_size"):
    """(train_rows, eval_rows), each checked by check_rows: eval is the first eval_size rows of the test split, or
    when there is none (test None) the last eval_size rows, held out (size_flag names eval_size in a message)."""
    check = lambda rows, source=name: check_rows(rows, source, fields, skip_bad_rows, hh_fields)  # noqa: E731
    if test is not None:
        return check(rows), check(test[:eval_size], f"{name} (test split)")
    rows = check(rows)
    if len(rows) <= eval_size:
        raise DataError(f"{name}: {len(rows)} rows leave nothing to train on after {size_flag} {eval_size} held out "
                        f"(the last rows of a file are its eval split); lower it")
    return rows[:-eval_size], rows[-eval_size:]


def load_preferences(name, eval_size=64, seed=0, skip_bad_rows=False, size_flag="--eval_size"):
    """(train_rows, eval_rows) of {"prompt", "chosen", "rejected"} for 'toy', 'hh[:subset]', 'tldr', a hub id, a
    dataset folder or a file.

    Sets with a test split use its first eval_size rows; local files and toy hold out their last eval_size rows.
    Everything is validated before it is returned, so a bad row stops the run before any output is written.
    """
    if name == "toy":
        rows, test = toy_preferences(2048 + eval_size, seed), None
    elif is_builtin(name):
        import datasets
        repo, sub = (("CarperAI/openai_summarize_comparisons", None) if name == "tldr"
                     else ("Anthropic/hh-rlhf", name[3:] or None))
        with fetching(repo, "dataset", f"dataset {repo!r} (--dataset {name})", "a local .jsonl file as --dataset"):
            rows, test = (datasets.load_dataset(repo, data_dir=sub, split=s).to_list() for s in ("train", "test"))
    else:
        rows, test = read_rows(name, skip_bad_rows)
    return checked_splits(name, rows, test, PAIRED, eval_size, skip_bad_rows, HH, size_flag)


def unpair(rows):
    """Preference pairs -> unpaired examples {"prompt", "completion", "label"}: every chosen response is desirable
    (True), every rejected one undesirable (False). All chosen come first, then all rejected, in row order, so
    neighbours in the list have different prompts (KTO's mismatched pairs shift by one)."""
    return [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for k in ("chosen", "rejected") for r in rows]


def load_unpaired(name, eval_size=64, seed=0, skip_bad_rows=False):
    """(train_rows, eval_rows) of {"prompt", "completion", "label": bool} for KTO.

    A file, folder or hub set with a "completion" field in any row is read as unpaired rows and validated like
    the paired sets (a bad row stops the run naming file, row and field; label must be a JSON true/false). Anything
    else is read as pairs and unpaired, so eval_size counts pairs there (2 * eval_size examples).
    """
    if is_builtin(name):
        train, evals = load_preferences(name, eval_size, seed, skip_bad_rows)
    else:
        rows, test = read_rows(name, skip_bad_rows)
        if any(isinstance(r, dict) and "completion" in r for r in rows):
            return checked_splits(name, rows, test, UNPAIRED, eval_size, skip_bad_rows)
        train, evals = checked_splits(name, rows, test, PAIRED, eval_size, skip_bad_rows, HH)
    return unpair(train), unpair(evals)


def load_sft(name, eval_size=64, seed=0, skip_bad_rows=False):
    """(train_rows, eval_rows) of {"prompt", "completion"} for SFT: the preferred responses.

    'toy': toy_sft_rows (imperfect on purpose). 'tldr': the reference summaries of CarperAI/openai_summarize_tldr
    ({"prompt", "label"} rows). 'hh[:subset]': the chosen dialogues. A file, folder or hub set holds {"prompt",
    "completion"} rows (of KTO-style rows only the desirable ones), {"prompt", "label": "<text>"} rows (TL;DR
    style) or preference pairs, of which the chosen response is used; chat-format rows too. Sets with a test
    split use its first eval_size rows, the others hold out their last eval_size rows.
    """
    chosen = lambda splits: tuple([{"prompt": r["prompt"], "completion": r["chosen"]} for r in rs] for rs in splits)  # noqa: E731
    if name == "toy":
        rows, test = toy_sft_rows(8192 + eval_size, seed), None
    elif name == "tldr":
        import datasets
        with fetching("CarperAI/openai_summarize_tldr", "dataset", "dataset 'CarperAI/openai_summarize_tldr' "
                      "(--dataset tldr)", "a local .jsonl file as --dataset"):
            rows, test = (datasets.load_dataset("CarperAI/openai_summarize_tldr", split=s).to_list()
                          for s in ("train", "test"))
    elif is_builtin(name):  # hh, hh:<subset>
        return chosen(load_preferences(name, eval_size, seed, skip_bad_rows))
    else:
        rows, test = read_rows(name, skip_bad_rows)
    if not any(isinstance(r, dict) and ("completion" in r or isinstance(r.get("label"), str)) for r in rows):
        return chosen(checked_splits(name, rows, test, PAIRED, eval_size, skip_bad_rows, HH))  # preference pairs

    def demonstrations(rows):  # KTO rows: the desirable ones; TL;DR's "label" is the reference summary (text)
        return [{"prompt": r.get("prompt"), "completion": r["label"]} if isinstance(r, dict) and isinstance(r.get("label"), str)
                else r for r in rows if not (isinstance(r, dict) and r.get("label") is False)]
    return checked_splits(name, demonstrations(rows), None if test is None else demonstrations(test),
                          ("prompt", "completion"), eval_size, skip_bad_rows)

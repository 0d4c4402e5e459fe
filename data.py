"""
Data loading: Anthropic HH and TL;DR from the hub, local .json/.jsonl/.jsonl.gz files, and the toy task, each as
validated rows of text: {"prompt", "chosen", "rejected"} pairs, {"prompt", "completion", "label"} examples (KTO)
or {"prompt", "completion"} demonstrations (SFT).

Every row is checked before training starts, and a bad one stops the run naming the file, the row and the field
(or is skipped and counted under --skip_bad_rows). A reader needs this file to train on their own data or to see
what a hub set is turned into; the prompt boundary of HH dialogues itself is common.split_hh.
"""
import gzip
import json
import os

from common import DataError, split_hh
from toy import toy_preferences, toy_sft_rows


def check_rows(rows, source, fields, skip_bad_rows, hh_fields=None):
    """Validate rows (dicts) in order; return the good ones as dicts of `fields`.

    A row must have every field as a string, with a non-empty prompt (responses may be empty). HH-style rows
    holding only `hh_fields` = (chosen, rejected) full dialogues are split with split_hh. A bad row raises
    DataError naming the source, the row (1-based) and the field, unless skip_bad_rows, then it is counted.
    """
    good, bad = [], 0
    for i, row in enumerate(rows, 1):
        try:
            if not isinstance(row, dict):
                raise DataError(f"is a {type(row).__name__}, not a JSON object")
            if hh_fields and "prompt" not in row and all(f in row for f in hh_fields):
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
                if f != "label" and not isinstance(row[f], str):
                    raise DataError(f"field {f!r} must be a string, got {type(row[f]).__name__}")
            if not row["prompt"].strip():
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
    """Rows of a local .json (a list), .jsonl or .jsonl.gz file, loaded with `datasets` like the hub sets.

    When `datasets` cannot parse the file we read it again line by line to name the bad line (and skip it
    under skip_bad_rows), since Arrow's error does not say which row broke.
    """
    import datasets
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset("json", data_files=path, split="train").to_list()
    except Exception as err:  # noqa: BLE001 - any parse failure is re-diagnosed below
        arrow_error = err
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read ({e})") from None
    if path.endswith(".json"):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        return rows if isinstance(rows, list) else [rows]
    rows, bad = [], 0
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if not skip_bad_rows:
                raise DataError(f"{path}: line {n}: not valid JSON ({e.msg}); fix it or pass --skip_bad_rows") from None
            bad += 1
    if bad:
        print(f"{path}: skipped {bad} unparseable line(s)")
    if not rows and not bad:
        raise DataError(f"{path}: no rows ({arrow_error})")
    return rows


def load_preferences(name, eval_size=64, seed=0, skip_bad_rows=False):
    """(train_rows, eval_rows) of {"prompt", "chosen", "rejected"} for 'toy', 'hh[:subset]', 'tldr' or a path.

    Hub sets use their own test split (first eval_size rows); local files and toy hold out their last
    eval_size rows. Everything is validated before it is returned, so a bad row stops the run before any
    output is written.
    """
    fields, hh = ("prompt", "chosen", "rejected"), ("chosen", "rejected")
    if name == "toy":
        rows = toy_preferences(2048 + eval_size, seed)
    elif name == "hh" or name.startswith("hh:") or name == "tldr":
        import datasets
        repo, sub = (("CarperAI/openai_summarize_comparisons", None) if name == "tldr"
                     else ("Anthropic/hh-rlhf", name[3:] or None))
        load = lambda split: datasets.load_dataset(repo, data_dir=sub, split=split).to_list()  # noqa: E731
        return (check_rows(load("train"), name, fields, skip_bad_rows, hh),
                check_rows(load("test")[:eval_size], name, fields, skip_bad_rows, hh))
    else:
        rows = check_rows(read_json_rows(name, skip_bad_rows), name, fields, skip_bad_rows, hh)
    if len(rows) <= eval_size:
        raise DataError(f"{name}: {len(rows)} rows leave nothing to train on after --eval_size {eval_size}; lower it")
    return rows[:-eval_size], rows[-eval_size:]


def unpair(rows):
    """Preference pairs -> unpaired examples {"prompt", "completion", "label"}: every chosen response is desirable
    (True), every rejected one undesirable (False). All chosen come first, then all rejected, in row order, so
    neighbours in the list have different prompts (KTO's mismatched pairs shift by one)."""
    return [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for k in ("chosen", "rejected") for r in rows]


def load_unpaired(name, eval_size=64, seed=0, skip_bad_rows=False):
    """(train_rows, eval_rows) of {"prompt", "completion", "label": bool} for KTO.

    A local file with a "completion" field in any row is read as unpaired rows and validated like the paired
    sets (a bad row stops the run naming file, row and field; label must be a JSON true/false); its last
    eval_size rows are held out. Anything else is loaded with load_preferences and unpaired, so eval_size
    counts pairs there (2 * eval_size examples).
    """
    if os.path.isfile(name):
        rows = read_json_rows(name, skip_bad_rows)
        if any(isinstance(r, dict) and "completion" in r for r in rows):
            rows = check_rows(rows, name, ("prompt", "completion", "label"), skip_bad_rows)
            if len(rows) <= eval_size:
                raise DataError(f"{name}: {len(rows)} rows leave nothing to train on after --eval_size {eval_size}; lower it")
            return rows[:-eval_size], rows[-eval_size:]
    train, evals = load_preferences(name, eval_size, seed, skip_bad_rows)
    return unpair(train), unpair(evals)


def load_sft(name, eval_size=64, seed=0, skip_bad_rows=False):
    """(train_rows, eval_rows) of {"prompt", "completion"} for SFT: the preferred responses.

    'toy': toy_sft_rows (imperfect on purpose). 'tldr': the reference summaries of CarperAI/openai_summarize_tldr
    ({"prompt", "label"} rows). 'hh[:subset]': the chosen dialogues. A local file holds {"prompt", "completion"}
    rows (of KTO-style rows only the desirable ones), {"prompt", "label": "<text>"} rows (TL;DR style) or
    preference pairs, of which the chosen response is used. Local and toy sets hold out their last eval_size
    rows, hub sets use the first eval_size test rows.
    """
    fields = ("prompt", "completion")
    label_to_completion = lambda rows: [  # noqa: E731 - TL;DR's "label" is the reference summary (text)
        {"prompt": r.get("prompt"), "completion": r["label"]} if isinstance(r, dict) and isinstance(r.get("label"), str)
        else r for r in rows]
    if name == "toy":
        rows = toy_sft_rows(8192 + eval_size, seed)
    elif name == "tldr":
        import datasets
        load = lambda split: label_to_completion(  # noqa: E731
            datasets.load_dataset("CarperAI/openai_summarize_tldr", split=split).to_list())
        return (check_rows(load("train"), name, fields, skip_bad_rows),
                check_rows(load("test")[:eval_size], name, fields, skip_bad_rows))
    else:
        rows = read_json_rows(name, skip_bad_rows) if os.path.isfile(name) else []
        if not any(isinstance(r, dict) and ("completion" in r or isinstance(r.get("label"), str)) for r in rows):
            # preference pairs: hh, hh:<subset> or a local file of pairs
            train, evals = load_preferences(name, eval_size, seed, skip_bad_rows)
            return tuple([{"prompt": r["prompt"], "completion": r["chosen"]} for r in rs] for rs in (train, evals))
        rows = [r for r in rows if not (isinstance(r, dict) and r.get("label") is False)]  # KTO rows: desirable only
        rows = check_rows(label_to_completion(rows), name, fields, skip_bad_rows)
    if len(rows) <= eval_size:
        raise DataError(f"{name}: {len(rows)} rows leave nothing to train on after --eval_size {eval_size}; lower it")
    return rows[:-eval_size], rows[-eval_size:]

"""
The one JSON reader of the project: data files, checkpoint records (run.json), adapter configs, metrics.jsonl.

json.loads alone lets three things through that fail later with a traceback: nesting deep enough to overflow the
parser (RecursionError), a number of more than 4300 digits (Python's int limit, a ValueError that is not a
JSONDecodeError), and a lone UTF-16 surrogate ("\\ud800"), valid JSON but not a character, which the tokenizer
rejects at the first batch. parse() refuses all three as a ValueError naming what is wrong; lines() splits JSON
lines on "\\n" only (str.splitlines also splits inside a string holding U+2028 or U+0085, which JSON allows raw).
"""
import json
import re

SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")  # the escape of a UTF-16 surrogate, paired or lone


def parse(text):
    """json.loads(text), or a ValueError with a one-line reason."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        where = f", line {e.lineno}" if "\n" in text else ""  # a whole file; a JSON line is named by its caller
        raise ValueError(f"not valid JSON ({e.msg}{where})") from None
    except RecursionError:
        raise ValueError("nested too deeply to be read") from None
    except ValueError as e:  # int("9" * 5000): Python's limit on the digits of an integer
        raise ValueError(f"not readable as JSON ({str(e).splitlines()[0][:200]})") from None
    if SURROGATE.search(text):  # a pair decodes to one character; a lone one stays a surrogate
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("holds a lone UTF-16 surrogate (e.g. \\ud800), which is not a character") from None
    return value


def lines(text):
    """The non-blank lines of a JSON-lines text with their 1-based line numbers, split on "\\n" only."""
    return [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def read(path):
    """parse() of a UTF-8 file; OSError and UnicodeDecodeError as they come."""
    with open(path, encoding="utf-8") as f:
        return parse(f.read())

"""
The command line's error plumbing: InputError (a mistake in what the user gave), exit_on_bad_input (which turns it
into one `error:` line on stderr and exit code 2 instead of a traceback), the checks on the flags that name paths,
hub ids and earlier runs (check_paths), and the scripts' ArgumentParser (--help shows each flag's default; a bad
flag is an InputError too). A reader needs this file only to change how a bad flag, file or row is reported; the
flags themselves and the checks on their values are common.add_common_args / validate_args and each script's own.
"""
import argparse
import os
import sys
from contextlib import contextmanager


class InputError(ValueError):
    """A mistake in what the user gave: a flag, a file or a row (DataError), a model or dataset that cannot be
    fetched. exit_on_bad_input turns it into one line on stderr and exit code 2."""


class DataError(InputError):
    """A bad file or row; the message names the file, the row and the field (engineering/data.py)."""


def need(ok, msg):
    """An InputError with `msg` unless `ok`; the message says what to change."""
    if not ok:
        raise InputError(msg)


def check_paths(model, dataset, output_dir, resume, overwrite):
    """The flags that name things outside the run (common.validate_args calls this): --model and --dataset are a
    built-in name, an existing path or a hub id, and a run already in output_dir is resumed or replaced only when
    asked (--resume, --overwrite)."""
    need(os.path.isdir(model) or (not model.startswith((".", "/")) and model.count("/") <= 1),
         f"--model {model!r}: not a built-in name, an existing folder or a hub id (org/name)")
    d = dataset
    hub_id = not d.startswith((".", "/")) and d.count("/") == 1 and not d.endswith((".json", ".jsonl", ".gz"))
    need(d in ("toy", "hh", "tldr") or d.startswith("hh:") or os.path.exists(d) or hub_id,
         f"unknown --dataset {d!r}: use toy, hh, hh:<subset>, tldr, a hub dataset id (org/name), or an existing "
         f".json/.jsonl/.jsonl.gz file or dataset folder")
    has = lambda sub: os.path.isdir(os.path.join(output_dir, sub))  # noqa: E731
    need(not resume or has("checkpoint"),
         f"--resume: no checkpoint in {output_dir}; drop --resume or point --output_dir at a run with --save_every")
    previous = [sub + "/" for sub in ("policy", "checkpoint") if has(sub)]
    need(not previous or resume or overwrite,
         f"{output_dir} holds a run ({', '.join(previous)}): pass --overwrite to replace it, "
         + ("--resume to continue it, " if has("checkpoint") else "") + "or choose another --output_dir")


@contextmanager
def exit_on_bad_input():
    """Every script's main() runs inside this: an InputError ends the run with its message as one line and exit
    code 2 (argparse's code for a bad command line), with no traceback, since the user, not the code, has to change
    something. Any other error keeps its traceback."""
    try:
        yield
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help: each flag's default after its help text, and the script's docstring with its line breaks."""


class ArgumentParser(argparse.ArgumentParser):
    """The scripts' parser: HelpFormatter, and a bad command line (an unknown flag, a value of the wrong type) is
    an InputError like every other bad input, instead of argparse's usage block."""

    def __init__(self, description):
        super().__init__(description=description, formatter_class=HelpFormatter)

    def error(self, message):
        raise InputError(f"{message} (--help lists the flags)")

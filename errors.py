"""User errors: how every entry point reports bad input, flags, models and checkpoints.

    if __name__ == "__main__":
        errors.run(main, "train.py")  # main(argv); a user error: "train.py: <message>" on stderr, exit 2

A user error is a ValueError or an OSError whose message names what is wrong (file:line: field, --flag,
tensor, checkpoint), or a chat template's refusal (jinja2.TemplateError). The library rooms (data/,
model/) import nothing above them (DESIGN.md's layout; the two data/ command lines import this module
inside their main() only), so they signal bad input as they always have: ValueError (data's BadRecord,
model/config.py, model/hf.py, the tokenizer, the benchmark reader) and FileNotFoundError, each with its
file and field in the message. The top-level modules (flags.py,
checkpoint.py, train.py, eval.py) raise `UserError`, a ValueError, for what a user asked that cannot be
done (a flag out of its range, a resume that would be another run), and parse their command lines with
`ArgumentParser`, whose syntax errors (`--lr abc`, an unknown flag) are UserErrors too. `run` prints any
of them as one line, `prog: message`, and exits with status 2, without a traceback; `--debug` on the
command line or NANOREASON_DEBUG=1 shows the traceback instead. A run that cannot go on (train.py's
non-finite loss, a FloatingPointError whose message names the last good checkpoint) is reported the same
way with exit status 1. Anything else (a bug) keeps its traceback; Ctrl-C prints `prog: interrupted` and
exits 130.

Flag ranges are one table per entry point, {dest: rule}, checked by `check_ranges` once the flags are known,
a rule being "> 0", ">= 1", "< 1", "[0, 1]", "(0, 1]", "[0, 1)" (every element of a list flag is checked):
    --lr -1.0: out of range, must be > 0
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn

import jinja2

DEBUG_HELP = "on an error, show the Python traceback (also NANOREASON_DEBUG=1)"
EXIT_USER_ERROR = 2


class UserError(ValueError):
    """What the user asked for cannot be done; the message names the flag, file or checkpoint and says why."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose command-line errors (an unknown flag, a value of the wrong type, a missing
    required flag) are UserErrors, so that `run` answers them with one line instead of the usage text."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")


USER_ERRORS = (ValueError, OSError, jinja2.TemplateError)


def one_line(error: BaseException) -> str:
    """The error's message on one line (a multi-line message's lines joined by "; ")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def debugging(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get("NANOREASON_DEBUG", "") not in ("", "0")


def run(main: Callable[[list[str]], object], prog: str, argv: Sequence[str] | None = None) -> None:
    """main(argv) with user errors reported as `prog: message` on stderr and exit status 2 (see above)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        main(argv)
    except (*USER_ERRORS, FloatingPointError) as e:
        if debugging(argv):
            raise
        print(f"{prog}: {one_line(e)}", file=sys.stderr)
        raise SystemExit(1 if isinstance(e, FloatingPointError) else EXIT_USER_ERROR) from None
    except KeyboardInterrupt:
        if debugging(argv):
            traceback.print_exc()
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


_RULE = re.compile(r"(?P<op>>=|>|<)\s*(?P<bound>\S+)"
                   r"|(?P<open>[\[(])\s*(?P<lo>[^,\s]+),\s*(?P<hi>[^\s\])]+)\s*(?P<close>[\])])")


def within(value: float, rule: str) -> bool:
    """value satisfies rule ("> 0", ">= 1", "< 1", "[0, 1]", "(0, 1]", "[0, 1)", "(0, 1)"); NaN never does."""
    m = _RULE.fullmatch(rule)
    if m is None:
        raise ValueError(f"not a range rule: {rule!r}")
    if isinstance(value, float) and math.isnan(value):
        return False
    if m["op"]:
        bound = float(m["bound"])
        return {">": value > bound, ">=": value >= bound, "<": value < bound}[m["op"]]
    lo, hi = float(m["lo"]), float(m["hi"])
    return ((lo <= value) if m["open"] == "[" else (lo < value)) and \
        ((value <= hi) if m["close"] == "]" else (value < hi))


def check_ranges(values: Mapping[str, object], rules: Mapping[str, str]) -> None:
    """Raise UserError naming the first flag whose value (None: unset, not checked) breaks its rule."""
    for dest, rule in rules.items():
        value = values.get(dest)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and not within(v, rule):
                raise UserError(f"--{dest.replace('_', '-')} {v!r}: out of range, must be {rule}")

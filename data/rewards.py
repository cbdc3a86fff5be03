"""The verifiable math reward: is the completion's final boxed answer equal to the gold answer?

    math_reward(completion, gold) = 1.0  if verify(parse(gold), parse(a))  else 0.0
        a = the last \\boxed{...} (or \\fbox{...}) of the answer text, braces balanced
        answer text = what follows the last </think> when the completion has one, else the whole completion;
                      a <think> left open (no </think> after it) is a truncated answer: 0.0
    parse / verify are math-verify's (HF Math-Verify), so "0.5", "\\frac{1}{2}" and "1/2" are the same answer.

Rules (the convention of R1-style evaluations: the answer follows </think>, and it is the last \\boxed{}):
- Only a boxed answer counts. There is no fallback to math-verify's own extraction of unboxed text
  ("the answer is 5", which Open-R1's lighteval metric also accepts): no balanced \\boxed{} after the
  thinking scores 0.0.
- The gold may be a str, an int, a float (AMC stores 27.0; it means 27) or a list meaning "any of these"
  (OlympiadBench's final_answer). Unescaped `$` are dropped from gold and answer alike and each is parsed
  as `\\boxed{...}`, the form math-verify extracts best.
- Never raises: any input that is not a completion string with a boxed answer and a usable gold gives 0.0.

Time limit. math-verify's own timeouts bound each stage (the answer's parse, each gold's parse, each of the
<= 4 comparisons per gold) to `timeout_s` whole seconds, so one call takes at most about
timeout_s * (1 + 5 * number of golds) seconds. Those timeouts use SIGALRM, which Python only allows in the
main thread; called from any other thread, math_reward sends the check to a helper Python process of that
thread's own (started on first use, about a second), which runs it in its main thread under the same
limits, and is killed and replaced if it ever overruns that bound. Worker *processes* (multiprocessing,
DataLoader workers) call in their own main thread and need no helper. SIGALRM is process-wide: an alarm the
caller set before calling math_reward in the main thread is cancelled by math-verify.

Cost. An answer and golds that are all plain integers ("-12", "007") are compared as integers, which is
what math-verify concludes for them, without its ~1 ms LaTeX parse. Otherwise parsed answers and verdicts
are memoised (LRU), so the repeated answers of RL sampling are cheap; a timed-out check is memoised as 0.0.
"""

import json
import logging
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from functools import lru_cache
from pathlib import Path

from math_verify import LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException  # a BaseException: `except Exception` does not catch it

TIMEOUT_S = 5  # seconds per math-verify stage (signal.alarm takes whole seconds)
logger = logging.getLogger(__name__)

_EXTRACTION = [LatexExtractionConfig(boxed_match_priority=0)]
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
_INTEGER = re.compile(r"(-?)0*([0-9]+)")
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` / `\\fbox{...}` in `text`, or None (none there, its braces never
    close, or `text` is not a str). Escaped braces `\\{` `\\}` are content, not nesting."""
    if not isinstance(text, str):
        return None
    opens = [match.end() for match in _BOX_OPEN.finditer(text)]
    if not opens:
        return None
    depth, i, start = 1, opens[-1], opens[-1]
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2  # skip the escaped character
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


def answer_text(completion: str) -> str | None:
    """What follows the last `</think>` (the whole completion when it has none); None when a `<think>` is
    left open, i.e. the thinking was truncated, or when `completion` is not a str."""
    if not isinstance(completion, str):
        return None
    cut = completion.rfind(_THINK_CLOSE)
    answer = completion if cut < 0 else completion[cut + len(_THINK_CLOSE) :]
    return None if _THINK_OPEN in answer else answer


def _gold_answers(gold) -> tuple[str, ...]:
    """The gold as a tuple of answer strings: a list/tuple means any of its items; a float that is a whole
    number is written as an int (27.0 -> "27"); unusable items (None, bool, nan, empty text, other types)
    are dropped."""
    items = gold if isinstance(gold, (list, tuple)) else [gold]
    answers = []
    for item in items:
        if isinstance(item, bool):
            continue
        if isinstance(item, int):
            answers.append(str(item))
        elif isinstance(item, float) and math.isfinite(item):
            answers.append(str(int(item)) if item.is_integer() else repr(item))
        elif isinstance(item, str) and _strip_dollars(item):
            answers.append(_strip_dollars(item))
    return tuple(answers)


def _strip_dollars(latex: str) -> str:
    return _UNESCAPED_DOLLAR.sub("", latex).strip()


def _integer_verdict(answer: str, golds: tuple[str, ...]) -> float | None:
    """1.0 / 0.0 when the answer and every gold are plain integers, else None (math-verify decides)."""
    canonical = []
    for text in (answer, *golds):
        match = _INTEGER.fullmatch(_strip_dollars(text))
        if match is None:
            return None
        sign, digits = match.groups()
        canonical.append(digits if digits == "0" else sign + digits)  # -0 == 0, 007 == 7
    return 1.0 if canonical[0] in canonical[1:] else 0.0


@lru_cache(maxsize=1 << 16)
def _parse_boxed(latex: str, timeout_s: int) -> tuple:
    """math-verify's parse of `\\boxed{latex}`: (sympy expression, string) or () when it cannot parse it."""
    return tuple(parse("\\boxed{" + latex + "}", extraction_config=_EXTRACTION, parsing_timeout=timeout_s))


@lru_cache(maxsize=1 << 16)
def _equivalent(answer: str, golds: tuple[str, ...], timeout_s: int) -> float:
    """1.0 when math-verify finds the boxed answer equal to one of the golds. Main thread only (SIGALRM)."""
    predicted = _parse_boxed(_strip_dollars(answer), timeout_s)
    gold_parsed = [g for gold in golds for g in _parse_boxed(gold, timeout_s)]
    if not predicted or not gold_parsed:
        return 0.0
    return 1.0 if verify(gold_parsed, list(predicted), timeout_seconds=timeout_s) else 0.0


def math_reward(completion: str, gold, *, timeout_s: int = TIMEOUT_S) -> float:
    """1.0 when the last boxed answer after the thinking of `completion` equals `gold` (a str, int, float,
    or a list of these meaning "any of"), else 0.0. Never raises; time-limited (see the module docstring)."""
    try:
        answer = extract_boxed(answer_text(completion))
        golds = _gold_answers(gold)
        if answer is None or not answer.strip() or not golds:
            return 0.0
        as_integers = _integer_verdict(answer, golds)
        if as_integers is not None:
            return as_integers
        timeout_s = max(1, math.ceil(timeout_s))
        if threading.current_thread() is threading.main_thread() or os.name != "posix":
            return _equivalent(answer, golds, timeout_s)
        return _thread_verifier().equivalent(answer, golds, timeout_s)
    except (Exception, TimeoutException):
        return 0.0


# --- off the main thread: a helper process per thread, whose main thread can take SIGALRM ---------------

_REPO_ROOT = str(Path(__file__).resolve().parents[1])
_STARTUP_LIMIT_S = 60.0  # importing sympy + math-verify on a busy 2-core machine
_thread_local = threading.local()


def _thread_verifier() -> "_VerifierProcess":
    verifier = getattr(_thread_local, "verifier", None)
    if verifier is None or not verifier.alive():
        verifier = _thread_local.verifier = _VerifierProcess()
    return verifier


class _VerifierProcess:
    """A `python -c '...data.rewards._serve()'` child: reads JSON lines [answer, golds, timeout_s], writes
    1 or 0 per line. Killed when a check overruns math-verify's bound (the next call then starts a fresh
    one) or when the thread that owns it ends; it exits by itself when its stdin closes."""

    def __init__(self):
        code = f"import sys; sys.path.insert(0, {_REPO_ROOT!r}); from data.rewards import _serve; _serve()"
        self.process = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        if self._read_line(_STARTUP_LIMIT_S) != b"ready":
            self.close()
            logger.warning("math_reward: the math-verify helper process did not start; scoring 0.0")
            raise RuntimeError("math-verify helper process did not start")

    def alive(self) -> bool:
        return self.process.poll() is None

    def equivalent(self, answer: str, golds: tuple[str, ...], timeout_s: int) -> float:
        self.process.stdin.write((json.dumps([answer, list(golds), timeout_s]) + "\n").encode())
        reply = self._read_line(timeout_s * (1 + 5 * len(golds)) + 1.0)
        if reply is None:  # overran math-verify's own limits (stuck outside Python code): give up on it
            logger.warning("math_reward: the math-verify helper overran its time limit; killed, scoring 0.0")
            self.close()
            return 0.0
        return 1.0 if reply == b"1" else 0.0

    def _read_line(self, limit_s: float) -> bytes | None:
        """One line from the helper's stdout, or None when none arrives within limit_s or it exited."""
        line = b""
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + limit_s
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 1)  # a reply is a few bytes: reading one at a time never over-reads
            if not chunk:
                return None
            line += chunk
        return line.strip()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            pipe.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _serve() -> None:
    """The helper process's loop. Its stdout carries only the replies (stray prints go to stderr)."""
    replies = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    replies.write(b"ready\n")
    for line in sys.stdin.buffer:
        try:
            answer, golds, timeout_s = json.loads(line)
            verdict = _equivalent(answer, tuple(golds), int(timeout_s))
        except (Exception, TimeoutException):
            verdict = 0.0
        replies.write(b"1\n" if verdict else b"0\n")

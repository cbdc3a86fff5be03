"""Length rules: which tokenized examples are kept, cut or dropped, in tokens; prompt = the tokens before the
first loss token, completion = the rest.

    rules = LengthRules(max_len=19800, max_prompt_len=800, rule="redi")
    ids, mask, outcome = rules.apply(ids, mask, measured=(prompt_len, response_len))

length_rule "truncate" (the default):
  max_prompt_len  a longer prompt: the example is dropped
  max_len         prompt + completion longer than this, by `truncation`:
    "drop"        the example is dropped
    "keep_end"    the start of the completion is cut: the prompt and the completion's last
                  max_len - len(prompt) tokens stay, so the answer and EOS survive; never the prompt is cut
                  (dropped when the prompt alone has max_len tokens or more)
    "keep_start"  the first max_len tokens stay (the completion's end and EOS are lost)
length_rule "redi" (the REDI authors' pair data: the P800_R19000 filter of their
data_preprocess/study_length_distribution.py, then their DPO trainer's cuts), R = max_len - max_prompt_len:
  - dropped_prompt_too_long: the prompt messages rendered alone, without the generation prompt, have more
    than max_prompt_len - 1 tokens (their prompt_len: those tokens + 1);
  - dropped_too_long: a completion's messages rendered alone as a conversation (so a template's default
    system turn and the assistant header count too) have more than R - 1 tokens (their response_len:
    those tokens + 1, for the EOS);
  - truncated: the prompt keeps its last max_prompt_len tokens (tokenize_row's prompt[-max_prompt_length:];
    with Qwen2.5-Math's template a prompt is 2 tokens longer than its measure, so one that measures 799 or
    800 loses its first 1 or 2 tokens), then prompt + completion their last max_len tokens
    (concatenated_forward's keep_end; never reached with that template at REDI's 800 / 19,800).
A pair is dropped as a unit when either side is dropped; each side is truncated on its own (data/datasets.py
counts the outcomes). Text documents have no prompt: keep_end keeps their last max_len tokens (and so does
"redi").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TRUNCATIONS = ("drop", "keep_end", "keep_start")
LENGTH_RULES = ("truncate", "redi")
OUTCOMES = ("dropped_prompt_too_long", "dropped_too_long", "truncated")  # besides "kept", in this order


@dataclass(frozen=True)
class LengthRules:
    """The length rules (see the module docstring): `rule` "truncate" or "redi"."""

    max_len: int | None = None
    max_prompt_len: int | None = None
    truncation: str = "drop"
    rule: str = "truncate"

    def __post_init__(self):
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"truncation={self.truncation!r}: expected one of {TRUNCATIONS}")
        if self.rule not in LENGTH_RULES:
            raise ValueError(f"length_rule={self.rule!r}: expected one of {LENGTH_RULES}")
        for name in ("max_len", "max_prompt_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r}: expected a positive number of tokens or None")

    def apply(self, ids: np.ndarray, mask: np.ndarray,
              measured: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, str]:
        """(ids, mask, outcome), outcome one of "kept", "truncated", "dropped_prompt_too_long",
        "dropped_too_long". `measured`: (prompt, response) as REDI's filter counts them, for rule "redi"
        (None for a text document)."""
        loss = np.flatnonzero(mask)
        prompt_len = int(loss[0]) if loss.size else len(ids)
        if self.rule == "redi":
            return self._apply_redi(ids, mask, prompt_len, measured)
        if self.max_prompt_len is not None and prompt_len > self.max_prompt_len:
            return ids, mask, "dropped_prompt_too_long"
        if self.max_len is None or len(ids) <= self.max_len:
            return ids, mask, "kept"
        if self.truncation == "drop" or prompt_len >= self.max_len:
            return ids, mask, "dropped_too_long"
        if self.truncation == "keep_start":
            keep = slice(0, self.max_len)
            return ids[keep], mask[keep], "truncated"
        cut = len(ids) - self.max_len  # keep_end: the first `cut` completion tokens go
        keep = np.r_[0:prompt_len, prompt_len + cut:len(ids)]
        return ids[keep], mask[keep], "truncated"

    def _apply_redi(self, ids: np.ndarray, mask: np.ndarray, prompt_len: int,
                    measured: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray, str]:
        """Rule "redi": drop by REDI's measures (prompt > P, response > L - P), then keep the prompt's last
        P tokens and the sequence's last L tokens."""
        if measured is not None:
            prompt_measure, response_measure = measured
            if self.max_prompt_len is not None and prompt_measure > self.max_prompt_len:
                return ids, mask, "dropped_prompt_too_long"
            if self.max_len is not None and response_measure > self.max_len - (self.max_prompt_len or 0):
                return ids, mask, "dropped_too_long"
        outcome = "kept"
        if self.max_prompt_len is not None and prompt_len > self.max_prompt_len:
            cut = prompt_len - self.max_prompt_len
            ids, mask, outcome = ids[cut:], mask[cut:], "truncated"
        if self.max_len is not None and len(ids) > self.max_len:
            ids, mask, outcome = ids[-self.max_len:], mask[-self.max_len:], "truncated"
        return ids, mask, outcome

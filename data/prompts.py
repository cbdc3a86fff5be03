"""The one place a prompt or a completion text is built: readers, eval.py, GRPO and in-training evaluation.

    ids  = problem_prompt(tok, "What is 2 + 3?", suffix=BOXED_INSTRUCTION, think_prefix=True)
    text = completion_text(tok, gen.tokens[i], gen.finished[i], stop_ids(tok), think_prefix=True)

A problem's prompt is the chat template applied to one user message, the problem text followed by "\\n" +
suffix when there is one, then the generation prompt, then THINK_PREFIX with think_prefix (REDI's models
begin their turn with it; data/tokenizer.py defines it, as the templates place it). The suffix is
BOXED_INSTRUCTION for the five math benchmarks (MATH-500 & co., as REDI and DeepSeek evaluate them), however
they are given, and none for other data files such as the synthetic task's: data.benchmarks.prompt_suffix.

The text that is graded (math_reward) is the completion's tokens decoded, the final stop token dropped,
and THINK_PREFIX put back in front when the prompt ended with it, so that the answer is what follows
"</think>" whichever side of the prompt boundary the "<think>\\n" was.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from data.tokenizer import THINK_PREFIX, Tokenizer

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def user_message(problem: str, suffix: str = "") -> str:
    """The user turn of a problem: the problem, then "\\n" + suffix when there is one."""
    return f"{problem}\n{suffix}" if suffix else problem


def problem_prompt(tok: Tokenizer, problem: str, *, suffix: str = "", think_prefix: bool = False,
                   **template_kwargs) -> list[int]:
    """The token ids sampling starts from: [user: user_message(problem, suffix)] + generation prompt (+
    THINK_PREFIX)."""
    messages = [{"role": "user", "content": user_message(problem, suffix)}]
    return tok.encode_prompt(messages, think_prefix=think_prefix, **template_kwargs)


def completion_text(tok: Tokenizer, tokens: Sequence[int], finished: bool, stop: Sequence[int],
                    think_prefix: bool) -> str:
    """What math_reward grades: the decoded completion, its final stop token dropped, THINK_PREFIX in front
    when the prompt ended with it."""
    if finished and tokens and tokens[-1] in stop:
        tokens = tokens[:-1]
    return (THINK_PREFIX if think_prefix else "") + tok.decode(tokens)


def stop_ids(tok: Tokenizer, model_dir: str | os.PathLike | None = None) -> list[int]:
    """The ids that end a completion: tok.eos_id, the template's end-of-turn token (tok.stop_ids), and
    generation_config.json's eos_token_id (an int or a list) when `model_dir` has one."""
    ids = [tok.eos_id, *tok.stop_ids]
    config = Path(model_dir) / "generation_config.json" if model_dir is not None else None
    if config is not None and config.is_file():
        try:
            eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token_id")
        except (ValueError, AttributeError) as e:
            raise ValueError(f"{config}: not a JSON object with eos_token_id ({e})") from None
        ids += eos if isinstance(eos, list) else [] if eos is None else [eos]
    return list(dict.fromkeys(int(i) for i in ids))

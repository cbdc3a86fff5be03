"""Record schemas: what an SFT, a preference-pair and an RL record hold, checked field by field.

  SFT    {"messages": [{"role", "content"}, ...]}                   OpenR1 style; each assistant turn has loss
         {"prompt": str | messages, "completion": str | messages}   a string prompt is one user message, a
                                                                    string completion one assistant message
         {"text": str}, a bare JSON string, a .txt file             mid-training text: every token has loss
  pairs  {"prompt": str | messages, "chosen": ..., "rejected": ...} chosen/rejected: a string (one assistant
         message) or messages; a list that repeats the prompt messages first has them removed; without a
         prompt, the messages chosen and rejected begin with alike are the prompt
  RL     {"problem": str, "answer": str | number}                   ("prompt" works for "problem")

Each function takes a parsed record and `where` (file:line, data/files.py) and returns the example, or raises
BadRecord naming where and the field: a missing or mistyped field, no assistant message or an empty one (an
SFT completion, a chosen or rejected side), an empty RL problem or answer.
"""

from __future__ import annotations

from typing import Any

from data.files import BadRecord
from data.prompts import user_message

FIELDS = ("messages", "prompt", "completion", "text", "chosen", "rejected", "problem", "answer")  # read
_TEXT_FIELDS = ("content", "reasoning_content", "thinking", "reasoning")  # what an assistant message says


def sft_example(record, where: str) -> tuple[str, Any]:  # noqa: ANN001 (a parsed record)
    """("text", str) or ("chat", messages) from an SFT record."""
    if isinstance(record, str):
        text = record
    elif not isinstance(record, dict):
        raise BadRecord(f"{where}: expected a JSON object or a string, got {_kind(record)}")
    elif record.get("messages") is not None:
        messages = _messages(record["messages"], where, "messages", None)
        return "chat", _require_assistant(messages, where, "messages")
    elif record.get("prompt") is not None or record.get("completion") is not None:
        prompt = _messages(record.get("prompt"), where, "prompt", "user")
        completion = _messages(record.get("completion"), where, "completion", "assistant")
        return "chat", _require_assistant(prompt + completion, where, "completion")
    elif "text" in record:
        text = record["text"]
        if not isinstance(text, str):
            raise BadRecord(f"{where}: field 'text': expected a string, got {_kind(text)}")
    else:
        raise BadRecord(f"{where}: no 'messages', 'prompt'/'completion' or 'text' field "
                        f"(keys: {sorted(record)})")
    if not text:
        raise BadRecord(f"{where}: field 'text': empty")
    return "text", text


def pair_example(record, where: str) -> tuple[list[dict], list[dict], list[dict]]:  # noqa: ANN001
    """(prompt messages, chosen messages, rejected messages) from a pair record."""
    if not isinstance(record, dict):
        raise BadRecord(f"{where}: expected a JSON object, got {_kind(record)}")
    for name in ("chosen", "rejected"):
        if record.get(name) is None:
            raise BadRecord(f"{where}: field '{name}': missing (keys: {sorted(record)})")
    if record.get("prompt") is None:  # the prompt is what the two conversations begin with alike
        chosen = _messages(record["chosen"], where, "chosen", None)
        rejected = _messages(record["rejected"], where, "rejected", None)
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            raise BadRecord(f"{where}: field 'prompt': missing, and chosen and rejected share no message")
        prompt, sides = chosen[:shared], {"chosen": chosen[shared:], "rejected": rejected[shared:]}
    else:
        prompt = _messages(record["prompt"], where, "prompt", "user")
        sides = {}
        for name in ("chosen", "rejected"):
            side = _messages(record[name], where, name, "assistant")
            repeats_prompt = side[:len(prompt)] == prompt and len(side) > len(prompt)
            sides[name] = side[len(prompt):] if repeats_prompt else side
    for name, side in sides.items():
        _require_assistant(side, where, name)
    return prompt, sides["chosen"], sides["rejected"]


def rl_problem(record, where: str, prompt_suffix: str = "") -> tuple[str, list[dict], str]:  # noqa: ANN001
    """(problem text, prompt messages, answer text) from an RL record. A string problem becomes one user
    message, data.prompts.user_message(problem, prompt_suffix); a message-list prompt is used as is (the
    problem text is its last user message)."""
    if not isinstance(record, dict):
        raise BadRecord(f"{where}: expected a JSON object, got {_kind(record)}")
    name = "problem" if record.get("problem") is not None else "prompt"
    value = record.get(name)
    if isinstance(value, str):
        if not value.strip():
            raise BadRecord(f"{where}: field '{name}': empty")
        problem, messages = value, [{"role": "user", "content": user_message(value, prompt_suffix)}]
    elif isinstance(value, list):
        messages = _messages(value, where, name, None)
        users = [m["content"] for m in messages if m["role"] == "user"]
        problem = users[-1] if users else messages[-1]["content"]
    else:
        raise BadRecord(f"{where}: field 'problem': expected a string, got {_kind(value)} (keys: "
                        f"{sorted(record)})")
    answer = record.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or str(answer).strip() == "":
        raise BadRecord(f"{where}: field 'answer': expected a non-empty string or number, got {answer!r}")
    return problem, messages, str(answer)


def _kind(value) -> str:  # noqa: ANN001
    return "null" if value is None else type(value).__name__


def _messages(value, where: str, name: str, string_role: str | None) -> list[dict]:  # noqa: ANN001
    """A message list from field `name`: a list of {"role": str, "content": str}, or (when string_role is
    given) a string, which becomes one message of that role. None values are dropped, as transformers does."""
    if isinstance(value, str) and string_role is not None:
        return [{"role": string_role, "content": value}]
    if not isinstance(value, list) or not value:
        expected = ("a string or " if string_role else "") + "a non-empty list of messages"
        raise BadRecord(f"{where}: field '{name}': expected {expected}, got {_kind(value)}")
    messages = []
    for k, message in enumerate(value):
        if not isinstance(message, dict):
            raise BadRecord(f"{where}: field '{name}[{k}]': expected a message {{role, content}}, "
                            f"got {_kind(message)}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise BadRecord(f"{where}: field '{name}[{k}].{key}': expected a string, "
                                f"got {_kind(message.get(key))}")
        messages.append({k: v for k, v in message.items() if v is not None})
    return messages


def _require_assistant(messages: list[dict], where: str, name: str) -> list[dict]:
    """messages with an assistant message, none of them empty (an empty one teaches nothing but EOS: refused,
    as an empty RL answer is)."""
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord(f"{where}: field '{name}': no assistant message (nothing would carry loss)")
    for m in messages:
        if m["role"] == "assistant" and not any(str(m.get(k) or "").strip() for k in _TEXT_FIELDS):
            raise BadRecord(f"{where}: field '{name}': an empty assistant message")
    return messages

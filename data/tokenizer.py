"""Tokenizer: a Hugging Face `tokenizer.json` run by `tokenizers`, its chat template rendered with jinja2 as
transformers renders it, and the loss mask of a conversation.

    tok = Tokenizer.from_pretrained("path/to/Qwen3")                 # tokenizer.json + tokenizer_config.json
    tok = Tokenizer.from_pretrained(path, chat_template="t.jinja")  # another chat template (saved with it)
    tok.apply_chat_template(messages, add_generation_prompt=True)    # == transformers' apply_chat_template
    ids, mask = tok.encode_chat(messages, think_prefix=True)         # mask[i]: token i carries loss
    prompt_ids = tok.encode_prompt(messages[:-1], think_prefix=True) # what sampling starts from

Rendering follows transformers 5 exactly: an ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks,
loop controls, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII, `{% generation %}` blocks;
the template sees the messages (keys whose value is None dropped, the reasoning under `reasoning_content`,
`thinking` and `reasoning` alike), `tools`, `documents`, `add_generation_prompt`, the named special tokens
(bos/eos/unk/sep/pad/cls/mask) and the caller's keyword arguments (e.g. `enable_thinking`). The text is then
encoded without added special tokens. `chat_template.jinja` takes priority over `tokenizer_config.json`.

The loss mask of `encode_chat` (exactly the tokens the model must learn to generate):
  - the full conversation F is rendered once and encoded: the sequence is F's tokens, the same ids as
    apply_chat_template (with think_prefix, after the edits below);
  - assistant message i starts where F stops agreeing with the rendering of messages[:i] followed by the
    generation prompt: the generation prompt is prompt, what the model would write after it is completion
    (prefix rendering of messages[:i], not of messages[:i+1]: templates such as Qwen3's rewrite earlier
    assistant turns, dropping their reasoning, so the text of turn i depends on what follows it);
  - it ends after the first end-of-turn text at or after its start: what the template writes between an
    assistant message's content and the next message, cut after its first special token (`<|im_end|>` for
    ChatML), found once by rendering a probe conversation. The EOS carries loss; what follows it (ChatML's
    "\\n") does not, unless whole_turn: then the span runs on over the rest of what the template writes
    after an assistant's content (`turn_close`, "<|im_end|>\\n" for ChatML) where the text continues with
    it, so the whole rendered turn carries loss (as TRL's trainers, which REDI used, train it). An
    assistant message whose content holds the end-of-turn text is an error;
  - every assistant message carries loss, each up to its own end of turn;
  - a token belongs to a span when its first character does (a token straddling the prompt/completion
    boundary is prompt);
  - think_prefix: each assistant turn opens with "<think>\\n", which belongs to the prompt (sampling starts
    after it; REDI's authors trained it instead, as the first completion tokens): nothing changes where
    the prompt already ends with it; a turn whose text begins with "<think>\\n" keeps it; one that begins
    with "<think>" and spaces gets them replaced by "<think>\\n"; any other turn gets "<think>\\n"
    inserted before it.
Where a span cannot be located the error names the message.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# What a reasoning model's turn opens with; think_prefix puts it at the end of the prompt (data/prompts.py
# builds prompts with it, and puts it back in front of a completion's text).
THINK_PREFIX = "<think>\n"
# The files that make a tokenizer directory: read, and copied by save_pretrained, when present.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
)
# The named special tokens transformers passes to a chat template (`tokenizer.special_tokens_map`).
SPECIAL_TOKEN_NAMES = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # the names transformers aliases
_PROBE_USER, _PROBE_ASSISTANT = "PROBE-USER-7f3a", "PROBE-ASSISTANT-7f3a"

_THINK_OPEN = re.compile(r"<think>[ \t]*")  # an opening tag to normalise to THINK_PREFIX


class Tokenizer:
    """A tokenizer directory's files, held in memory (so that the object pickles to worker processes and
    save_pretrained needs no source directory). Build it with `Tokenizer.from_pretrained(path)`."""

    def __init__(self, files: dict[str, bytes], source: str = "<memory>"):
        from tokenizers import Tokenizer as Backend

        if "tokenizer.json" not in files:
            raise FileNotFoundError(f"{source}: no tokenizer.json (the only format read)")
        self.files, self.source = dict(files), source
        try:
            self.backend = Backend.from_str(files["tokenizer.json"].decode("utf-8"))
        except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception for a bad file)
            raise ValueError(f"{source}/tokenizer.json: not a tokenizer the tokenizers library reads "
                             f"({type(e).__name__}: {e})") from None
        config = _json_file(files, "tokenizer_config.json", source)
        special_map = _json_file(files, "special_tokens_map.json", source)
        self.special_tokens = {}  # name -> text, as the template sees them
        for name in SPECIAL_TOKEN_NAMES:
            text = _token_text(config.get(name, special_map.get(name)))
            if text is not None:
                self.special_tokens[name] = text
        self.templates = _chat_templates(config, files.get("chat_template.jinja"))
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        if "eos_token" not in self.special_tokens:
            raise ValueError(f"{source}: tokenizer_config.json names no eos_token")
        self.eos_id = self._id_of("eos_token")
        self.pad_id = self._id_of("pad_token") if "pad_token" in self.special_tokens else self.eos_id
        self.bos_id = self._id_of("bos_token") if "bos_token" in self.special_tokens else None
        # ids an embedding must cover: 1 + the largest id (vocabulary and added tokens)
        self.vocab_size = max(self.backend.get_vocab(with_added_tokens=True).values()) + 1
        self._compiled: dict[str, jinja2.Template] = {}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike,
                        chat_template: str | os.PathLike | None = None) -> Tokenizer:
        """Read a directory holding tokenizer.json and tokenizer_config.json (or chat_template.jinja); a hub
        name ("owner/name") is fetched with huggingface_hub when it is installed. `chat_template`: a .jinja
        file used instead of the directory's template; it becomes this tokenizer's chat_template.jinja, so
        save_pretrained (the HF export) writes it and what loads the export renders with it too."""
        directory = Path(path)
        if not directory.is_dir():
            directory = _fetch_from_hub(str(path))
        present = [name for name in TOKENIZER_FILES if (directory / name).is_file()]
        files = {name: (directory / name).read_bytes() for name in present}
        source = str(directory)
        if chat_template is not None:
            template = Path(chat_template)
            if not template.is_file():
                raise FileNotFoundError(f"{template}: no such chat template file")
            files["chat_template.jinja"] = template.read_bytes()
            source += f" (chat template {template})"
        return cls(files, source=source)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the files this tokenizer was read from into `directory` (transformers loads them too)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            tmp = out / f".{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, out / name)

    def __reduce__(self):
        return (Tokenizer, (self.files, self.source))

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"

    def _id_of(self, name: str) -> int:
        text = self.special_tokens[name]
        token_id = self.backend.token_to_id(text)
        if token_id is None:
            raise ValueError(f"{self.source}: {name} {text!r} is not a token of tokenizer.json")
        return token_id

    # ---- plain text -------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """The tokens of `text` alone: no BOS/EOS from a post-processor (a chat template writes its own)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`, special tokens kept by default (as transformers' decode)."""
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self.clean_up_spaces else text

    # ---- chat template ----------------------------------------------------------------------------------

    def template_for(self, tools=None) -> str:
        """The chat template: "tool_use" when tools are given and there is one, else "default"."""
        if not self.templates:
            raise ValueError(f"{self.source}: no chat_template (tokenizer_config.json, chat_template.jinja)")
        if tools is not None and "tool_use" in self.templates:
            return self.templates["tool_use"]
        if "default" in self.templates:
            return self.templates["default"]
        raise ValueError(f"{self.source}: chat templates {sorted(self.templates)} and none is 'default'")

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False, tools=None,
               documents=None, **template_kwargs) -> str:
        """The chat template's text for `messages`, as transformers renders it."""
        if not messages:
            raise ValueError("cannot apply the chat template to an empty conversation")
        source = self.template_for(tools)
        template = self._compiled.get(source)
        if template is None:
            template = self._compiled[source] = _jinja_environment().from_string(source)
        return template.render(messages=_template_messages(messages), tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt,
                               **{**self.special_tokens, **template_kwargs})

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                            tokenize: bool = True, tools=None, documents=None, **template_kwargs):
        """str when tokenize=False, list[int] when True: the same as transformers' apply_chat_template."""
        text = self.render(messages, add_generation_prompt, tools, documents, **template_kwargs)
        return self.encode(text) if tokenize else text

    def encode_prompt(self, messages: Sequence[dict], *, think_prefix: bool = False,
                      **template_kwargs) -> list[int]:
        """The prompt sampling starts from: `messages` with the generation prompt, then "<think>\\n" when
        think_prefix (unless the generation prompt already ends with it)."""
        text = self.render(messages, add_generation_prompt=True, **template_kwargs)
        if think_prefix and not text.endswith(THINK_PREFIX):
            text += THINK_PREFIX
        return self.encode(text)

    def encode_chat(self, messages: Sequence[dict], *, think_prefix: bool = False, whole_turn: bool = False,
                    **template_kwargs) -> tuple[list[int], list[bool]]:
        """(ids, mask) of a whole conversation; mask[i] is True when token i is an assistant token that
        carries loss, its end-of-turn token (EOS) included (with whole_turn, the rest of the rendered turn
        too). The module docstring says how spans are found."""
        text, spans = self.chat_spans(messages, think_prefix=think_prefix, whole_turn=whole_turn,
                                      **template_kwargs)
        encoding = self.backend.encode(text, add_special_tokens=False)
        mask, k = [], 0
        for start, _ in encoding.offsets:
            while k < len(spans) and start >= spans[k][1]:
                k += 1
            mask.append(k < len(spans) and spans[k][0] <= start)
        return encoding.ids, mask

    def chat_spans(self, messages: Sequence[dict], *, think_prefix: bool = False, whole_turn: bool = False,
                   **template_kwargs) -> tuple[str, list[tuple[int, int]]]:
        """(the conversation's text, the [start, end) character spans that carry loss, one per assistant
        message, in order)."""
        full = self.render(messages, **template_kwargs)
        turn_end = self.turn_end
        rest_of_turn = self.turn_close[len(turn_end):] if whole_turn else ""
        assistant = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if not assistant:
            raise ValueError("no assistant message: nothing would carry loss")
        pieces, spans, shift, done = [], [], 0, 0  # the text with think prefixes, and its spans
        for i in assistant:
            where = f"assistant message {i}"
            if i == 0:
                raise ValueError(f"{where} is the first message: there is no prompt before it")
            content = messages[i].get("content")
            if isinstance(content, str) and turn_end in content:
                raise ValueError(f"{where}: its content holds the end-of-turn text {turn_end!r}")
            before = self.render(messages[:i], **template_kwargs)
            prompt = self.render(messages[:i], add_generation_prompt=True, **template_kwargs)
            if not (full.startswith(before) and prompt.startswith(before)) or len(before) < done:
                raise ValueError(f"cannot locate {where}: the template renders the messages before it "
                                 "differently when more messages follow")
            start = len(before)  # then as far as the generation prompt agrees with the conversation
            while start < len(prompt) and start < len(full) and prompt[start] == full[start]:
                start += 1
            end = full.find(turn_end, start)
            if end < 0:
                raise ValueError(f"cannot locate the end of {where}: no {turn_end!r} after it")
            end += len(turn_end)
            if rest_of_turn and full.startswith(rest_of_turn, end):
                end += len(rest_of_turn)
            pieces.append(full[done:start])
            if think_prefix and not full[:start].endswith(THINK_PREFIX):  # else the prompt holds it already
                opened = len(THINK_PREFIX) if full.startswith(THINK_PREFIX, start) else \
                    (m.end() - start if (m := _THINK_OPEN.match(full, start)) else 0)
                pieces.append(THINK_PREFIX)
                shift += len(THINK_PREFIX) - opened
                start += opened
            pieces.append(full[start:end])
            spans.append((start + shift, end + shift))
            done = end
        pieces.append(full[done:])
        return "".join(pieces), spans

    @cached_property
    def turn_close(self) -> str:
        """Everything the template writes after the content of a conversation's last (assistant) message,
        e.g. "<|im_end|>\\n" for ChatML: the end of a rendered turn."""
        probe = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ASSISTANT}]
        text = self.render(probe)
        at = text.rfind(_PROBE_ASSISTANT)
        if at < 0:
            raise ValueError(f"{self.source}: the chat template does not write an assistant's content as is")
        return text[at + len(_PROBE_ASSISTANT):]

    @cached_property
    def turn_end(self) -> str:
        """The text the template writes after an assistant message's content, up to and including its first
        special token: the end-of-turn (EOS) that carries loss, e.g. "<|im_end|>"."""
        after = self.turn_close
        encoding = self.backend.encode(after, add_special_tokens=False)
        special = {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
        for token_id, (_, end) in zip(encoding.ids, encoding.offsets, strict=True):
            if token_id in special:
                return after[:end]
        raise ValueError(f"{self.source}: the chat template writes no special token after an assistant "
                         f"message ({after!r}): the end of a turn cannot be marked")

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Token ids that end a completion: EOS and the template's end-of-turn token (they differ in e.g.
        Qwen2.5 base models, whose EOS is <|endoftext|> while ChatML turns end with <|im_end|>)."""
        end_of_turn = self.encode(self.turn_end)[-1] if self.templates else self.eos_id
        return tuple(dict.fromkeys((self.eos_id, end_of_turn)))


def _template_messages(messages: Sequence[dict]) -> list[dict]:
    """The messages as transformers hands them to a template: keys whose value is None dropped, a message's
    reasoning under every name templates read it by."""
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(f"a chat message must be a dict with 'role' and 'content', got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (transformers tracks assistant spans with it;
    we find them for every template, tagged or not)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _jinja_environment() -> ImmutableSandboxedEnvironment:
    """The environment transformers compiles chat templates in."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _chat_templates(config: dict, jinja_file: bytes | None) -> dict[str, str]:
    """name -> template: chat_template.jinja ("default") over tokenizer_config.json's `chat_template`, which
    is a string or a list of {"name", "template"}."""
    if jinja_file is not None:
        return {"default": jinja_file.decode("utf-8")}
    value = config.get("chat_template")
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        return {entry["name"]: entry["template"] for entry in value}
    return {}


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json stores it: a string, or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _json_file(files: dict[str, bytes], name: str, source: str) -> dict:
    if name not in files:
        return {}
    try:
        value = json.loads(files[name])
    except ValueError as e:
        raise ValueError(f"{source}/{name}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{source}/{name}: expected a JSON object")
    return value


def _clean_up_spaces(text: str) -> str:
    """transformers' clean_up_tokenization (used when the config sets clean_up_tokenization_spaces)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def _fetch_from_hub(name: str) -> Path:
    """A hub repository's tokenizer files, through huggingface_hub (never used by the tests)."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise FileNotFoundError(f"{name}: no such tokenizer directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{name}: not a directory, and no huggingface_hub to fetch it") from None
    try:
        return Path(snapshot_download(name, allow_patterns=list(TOKENIZER_FILES)))
    except Exception as e:  # noqa: BLE001 (offline, unknown repository, gated, ...: the hub's many errors)
        raise FileNotFoundError(f"{name}: not a tokenizer directory, and the hub download failed "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


"""data/tokenizer.py: chat-template parity with transformers (the real Qwen3 tokenizer and a tiny ChatML one
built here), loss masks, the think prefix, special ids, save/pickle round trips, errors."""

import json
import pickle
from pathlib import Path

import pytest
from conftest import QWEN3_TOKENIZER, require

from data.tokenizer import Tokenizer

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CORPUS = [
    "The answer is 42. Let me think step by step: 3 + 4 = 7, so x = 7.",
    "Solve $x^2 = 4$ and $\\frac{1}{2} + \\sqrt{3}$. Café, naïve, 数学, ∑ é.",
    "user assistant system hello world problem solution trace reasoning",
]


def make_tiny_tokenizer(directory: Path, *, eos: str = "<|im_end|>", template: str | None = CHATML,
                        jinja_file: str | None = None) -> Path:
    """A byte-level BPE tokenizer (any text encodes) with ChatML specials, written as transformers would:
    tokenizer.json + tokenizer_config.json (+ chat_template.jinja)."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Backend

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
    )
    backend.train_from_iterator(CORPUS * 4, trainer)
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    config = {"eos_token": eos, "pad_token": "<|endoftext|>", "bos_token": None,
              "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    if template is not None:
        config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja_file is not None:
        (directory / "chat_template.jinja").write_text(jinja_file)
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_pretrained(make_tiny_tokenizer(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def qwen3() -> Tokenizer:
    return Tokenizer.from_pretrained(require(QWEN3_TOKENIZER))


@pytest.fixture(scope="module")
def qwen3_hf():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(require(QWEN3_TOKENIZER))


def spans(tok: Tokenizer, ids: list[int], mask: list[bool]) -> list[str]:
    """The decoded text of each run of loss tokens."""
    runs, current = [], []
    for token, on in zip(ids, mask, strict=True):
        if on:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(run) for run in runs]


LATEX = "Find $\\int_0^1 x^2\\,dx$ and $\\frac{a}{b}$ where a≥b — café, 数学, ü, 🙂."
TRACE = ("<think>\nWe have $\\int_0^1 x^2 dx = \\frac{1}{3}$ (数学).\n</think>\n\n"
         "The answer is $\\boxed{\\frac{1}{3}}$.")
SINGLE = [{"role": "user", "content": LATEX}, {"role": "assistant", "content": TRACE}]
MULTI = [
    {"role": "system", "content": "You are a careful mathematician. Réponds en français."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nfirst reasoning\n</think>\n\nIt is 4."},
    {"role": "user", "content": LATEX},
    {"role": "assistant", "content": TRACE},
]
REASONING_FIELD = [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": "final", "reasoning_content": "because ü"}]
NO_THINK = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "plain answer"}]
CONVERSATIONS = {"single": SINGLE, "multi": MULTI, "reasoning_field": REASONING_FIELD, "no_think": NO_THINK}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_qwen3_template_parity(qwen3, qwen3_hf, name):
    """Text and ids equal transformers' for every option combination, and for each prefix of the chat."""
    messages = CONVERSATIONS[name]
    for kwargs in ({}, {"enable_thinking": True}, {"enable_thinking": False}):
        for end in range(1, len(messages) + 1):
            for generation_prompt in (False, True):
                chat = messages[:end]
                options = dict(add_generation_prompt=generation_prompt, **kwargs)
                ours = qwen3.apply_chat_template(chat, tokenize=False, **options)
                assert ours == qwen3_hf.apply_chat_template(chat, tokenize=False, **options), (options, end)
                ours = qwen3.apply_chat_template(chat, **options)
                assert ours == qwen3_hf.apply_chat_template(chat, **options)["input_ids"], (options, end)


def test_qwen3_encode_decode_and_ids(qwen3, qwen3_hf):
    for text in (LATEX, TRACE, "  leading spaces\n\n\ttabs", "e\u0301 (NFC) ℵ₀ <|im_end|> inside", ""):
        assert qwen3.encode(text) == qwen3_hf.encode(text, add_special_tokens=False)
        ids = qwen3.encode(text)
        assert qwen3.decode(ids) == qwen3_hf.decode(ids)
    assert (qwen3.eos_id, qwen3.pad_id) == (qwen3_hf.eos_token_id, qwen3_hf.pad_token_id) == (151645, 151643)
    assert qwen3.vocab_size == len(qwen3_hf)
    assert qwen3.turn_end == "<|im_end|>" and qwen3.stop_ids == (151645,)


def test_qwen3_masks_single_turn(qwen3, qwen3_hf):
    ids, mask = qwen3.encode_chat(SINGLE)
    assert ids == qwen3_hf.apply_chat_template(SINGLE)["input_ids"]  # the mask never changes the sequence
    assert spans(qwen3, ids, mask) == [TRACE + "<|im_end|>"]  # the whole completion and EOS, not the "\n"
    assert not mask[-1] and qwen3.decode(ids[-1:]) == "\n" and ids[-2] == qwen3.eos_id and mask[-2]
    # enable_thinking=False: the generation prompt holds "<think>\n\n</think>\n\n"; here the trace has
    # reasoning, so the rendered turn leaves the generation prompt after "<think>\n"
    ids, mask = qwen3.encode_chat(SINGLE, enable_thinking=False)
    assert spans(qwen3, ids, mask) == [TRACE.removeprefix("<think>\n") + "<|im_end|>"]
    ids, mask = qwen3.encode_chat(NO_THINK, enable_thinking=False)
    assert spans(qwen3, ids, mask) == ["plain answer<|im_end|>"]
    ids, mask = qwen3.encode_chat(NO_THINK)  # Qwen3 writes an empty think block for the last turn
    assert spans(qwen3, ids, mask) == ["<think>\n\n</think>\n\nplain answer<|im_end|>"]


def test_qwen3_masks_multi_turn(qwen3, qwen3_hf):
    """Qwen3 drops the reasoning of assistant turns before the last user message: rendering prefixes of the
    conversation cannot find turn 1, yet every assistant turn carries loss, exactly its text + EOS."""
    ids, mask = qwen3.encode_chat(MULTI)
    assert ids == qwen3_hf.apply_chat_template(MULTI)["input_ids"]
    assert "first reasoning" not in qwen3.decode(ids)
    assert spans(qwen3, ids, mask) == ["It is 4.<|im_end|>", TRACE + "<|im_end|>"]
    ids, mask = qwen3.encode_chat(REASONING_FIELD)
    assert spans(qwen3, ids, mask) == ["<think>\nbecause ü\n</think>\n\nfinal<|im_end|>"]


def test_qwen3_think_prefix(qwen3):
    """REDI: the prompt ends with "<think>\\n", the loss starts after it, and encode_prompt is exactly the
    sequence's prefix before the first loss token."""
    ids, mask = qwen3.encode_chat(SINGLE, think_prefix=True)
    first = mask.index(True)
    prompt = qwen3.encode_prompt(SINGLE[:1], think_prefix=True)
    assert ids[:first] == prompt and qwen3.decode(prompt).endswith("<|im_start|>assistant\n<think>\n")
    assert spans(qwen3, ids, mask) == [TRACE.removeprefix("<think>\n") + "<|im_end|>"]
    assert ids == qwen3.encode_chat(SINGLE)[0]  # the trace already opened with "<think>\n": nothing inserted
    # multi-turn: each assistant turn opens with the prefix; the earlier one (reasoning dropped) gets it
    ids, mask = qwen3.encode_chat(MULTI, think_prefix=True)
    assert spans(qwen3, ids, mask) == ["It is 4.<|im_end|>", TRACE.removeprefix("<think>\n") + "<|im_end|>"]
    assert qwen3.decode(ids).count("<|im_start|>assistant\n<think>\n") == 2


def test_tiny_template_parity_and_masks(tiny, tmp_path):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(make_tiny_tokenizer(tmp_path / "tok"))
    for chat in (SINGLE, MULTI, NO_THINK):
        for generation_prompt in (False, True):
            assert tiny.apply_chat_template(chat, add_generation_prompt=generation_prompt) == \
                hf.apply_chat_template(chat, add_generation_prompt=generation_prompt)["input_ids"]
    ids, mask = tiny.encode_chat(MULTI)
    assert spans(tiny, ids, mask) == ["<think>\nfirst reasoning\n</think>\n\nIt is 4.<|im_end|>",
                                      TRACE + "<|im_end|>"]
    assert (tiny.eos_id, tiny.pad_id) == (hf.eos_token_id, hf.pad_token_id)
    assert tiny.vocab_size == len(hf)


def test_tiny_think_prefix_inserted_or_normalised(tiny):
    for content, completion in (("plain answer", "plain answer"), ("<think>  x</think> y", "x</think> y"),
                                ("<think>\nx</think> y", "x</think> y")):
        chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": content}]
        ids, mask = tiny.encode_chat(chat, think_prefix=True)
        assert spans(tiny, ids, mask) == [completion + "<|im_end|>"]
        assert ids[:mask.index(True)] == tiny.encode_prompt(chat[:1], think_prefix=True)
        assert tiny.decode(ids) == \
            f"<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\n{completion}<|im_end|>\n"


def test_errors_name_the_message(tiny, tmp_path):
    with pytest.raises(ValueError, match="assistant message 1: its content holds the end-of-turn"):
        tiny.encode_chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a<|im_end|>b"}])
    with pytest.raises(ValueError, match="no assistant message"):
        tiny.encode_chat([{"role": "user", "content": "q"}])
    with pytest.raises(ValueError, match="assistant message 0 is the first message"):
        tiny.encode_chat([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}])
    # a template that rewrites earlier turns depending on what follows cannot be located: an error, not a
    # wrong mask
    shifty = CHATML.replace("message['content']", "(message['content'] if loop.last else 'x')")
    tok = Tokenizer.from_pretrained(make_tiny_tokenizer(tmp_path / "shifty", template=shifty))
    with pytest.raises(ValueError, match="cannot locate assistant message 1"):
        tok.encode_chat(MULTI[1:])
    plain = CHATML.replace("'<|im_end|>'", "'.'")
    tok = Tokenizer.from_pretrained(make_tiny_tokenizer(tmp_path / "plain", template=plain))
    with pytest.raises(ValueError, match="no special token after an assistant"):
        tok.encode_chat(SINGLE)
    raising = "{{ raise_exception('roles must alternate') }}"
    tok = Tokenizer.from_pretrained(make_tiny_tokenizer(tmp_path / "raising", template=raising))
    with pytest.raises(Exception, match="roles must alternate"):
        tok.apply_chat_template(SINGLE)


def test_template_environment_and_sources(tmp_path):
    """chat_template.jinja wins over tokenizer_config.json; tojson keeps non-ASCII; strftime_now, loop
    controls and {% generation %} work; an eos other than the end-of-turn token makes both stop ids."""
    template = ("{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{{ m | tojson }}"
                "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}<|im_end|>"
                "{% endif %}{% endfor %}{{ strftime_now('%Y')[:0] }}")
    directory = make_tiny_tokenizer(tmp_path / "t", eos="<|endoftext|>", jinja_file=template)
    tok = Tokenizer.from_pretrained(directory)
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "é"},
            {"role": "assistant", "content": "a"}]
    assert tok.apply_chat_template(chat, tokenize=False) == \
        '{"role": "user", "content": "é"}{"role": "assistant", "content": "a"}a<|im_end|>'
    assert tok.stop_ids == (tok.backend.token_to_id("<|endoftext|>"), tok.backend.token_to_id("<|im_end|>"))


def test_save_and_pickle_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "saved")
    saved = sorted(p.name for p in (tmp_path / "saved").iterdir())
    assert saved == ["tokenizer.json", "tokenizer_config.json"]
    for other in (Tokenizer.from_pretrained(tmp_path / "saved"), pickle.loads(pickle.dumps(tiny))):
        assert other.encode_chat(MULTI, think_prefix=True) == tiny.encode_chat(MULTI, think_prefix=True)
        assert (other.eos_id, other.pad_id, other.vocab_size) == (tiny.eos_id, tiny.pad_id, tiny.vocab_size)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)

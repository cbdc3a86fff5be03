"""`--recipe redi` / `redi-sft` reproduce the REDI authors' training data token for token: one OpenR1-style
row (tests/fixtures/openr1_redi_pair.jsonl) goes through data.recipes.openr1 -> the readers (train.load_data
with the recipes' settings) -> the packed batch, with the real Qwen3 tokenizer (../shared/tokenizers/qwen3)
and Qwen2.5-Math's chat template (data/chat_templates/qwen2.5-math.jinja, which the authors trained with).

The expected ids below were derived by following the authors' code (Tim-Siu/reinforcement-distillation),
step by step, with transformers' tokenizer on the same tokenizer.json:
  selection  experiments_trl/data_preprocess/clean_base_shuffled_dpo.py: LandMV = bool(llama) and
             bool(math_verify_reparsed); chosen = first True, rejected = first False. Generation 0's Llama
             verdict is null, so bool(None) makes it the rejected one (generation 2, also wrong, is not).
  prompt     trl/trl/trainer/dpo2_trainer.py _prepare_dataset: maybe_extract_prompt -> [user];
             maybe_apply_chat_template (trl/trl/data_utils.py): prompt = the template on [user] with the
             generation prompt; completion = template(prompt + [assistant])[len(prompt):].
  ids        dpo2_trainer.tokenize_row: prompt and completion encoded apart (add_special_tokens=False),
             completion + [eos_token_id], prompt[-max_prompt_length:].
  loss, |y|  dpo2_trainer.concatenated_forward: loss mask = the completion's attention mask (every
             completion token, EOS included); get_batch_loss_metrics: |y| = chosen_attention_mask.sum().
  SFT        trl/trl/trainer/sft_trainer.py: the whole conversation encoded, EOS appended unless last;
             open_r1_sft.py's DataCollatorForCompletionOnlyLM (response template
             "<|im_start|>assistant\\n"): no loss through the last response template, none on pad-id labels
             (its base class, transformers' DataCollatorForLanguageModeling).
  lengths    data_preprocess/study_length_distribution.py (the P800_R19000 filter): prompt_len = the
             template on [user] without the generation prompt, encoded, + 1; response_len = the template on
             [assistant] alone, encoded, + 1.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import QWEN3_TOKENIZER, ROOT, require

import flags
import train
from data.datasets import load_pairs
from data.length_rules import LengthRules
from data.packing import collate
from data.recipes.openr1 import build
from data.tokenizer import Tokenizer
from losses import sequence_lengths

FIXTURE = Path(__file__).parent / "fixtures" / "openr1_redi_pair.jsonl"
TEMPLATE = ROOT / "data" / "chat_templates" / "qwen2.5-math.jinja"
IM_START, IM_END, ENDOFTEXT, NL = 151644, 151645, 151643, 198

# The prompt: the template's default system turn (Qwen2.5-Math's, as the record has no system message), the
# user turn, the generation prompt "<|im_start|>assistant\n" -- where the authors' prompt ends.
SYSTEM_TURN = [IM_START, 8948, NL,  # <|im_start|> system \n
               5501, 2874, 3019, 553, 3019, 11, 323, 2182, 697, 1590, 4226, 2878, 1124, 79075, 46391,
               # Please reason step by step, and put your final answer within \boxed{}.
               IM_END, NL]
USER_TURN = [IM_START, 872, NL,  # <|im_start|> user \n
             10061, 400, 87, 3, 26553, 400, 17, 87, 488, 220, 18, 284, 220, 16, 16, 12947,
             7379, 400, 87, 12947,
             # Let $x$ satisfy $2x + 3 = 11$. Find $x$.
             IM_END, NL]
GENERATION_PROMPT = [IM_START, 77091, NL]  # <|im_start|> assistant \n
PROMPT = SYSTEM_TURN + USER_TURN + GENERATION_PROMPT  # 48 tokens

# The completions: the rendered turn content<|im_end|>\n (point 1 of the issue: "\n" included), encoded on
# its own; "<think>\n" is its first tokens (point 2: trained, not prompt). The EOS is appended after them.
CHOSEN_TURN = [151667, NL,  # <think> \n
               3136, 2144, 220, 18, 25, 220, 17, 87, 284, 220, 23, 11, 773, 856, 284, 220, 19, 624,
               # Subtract 3: 2x = 8, so x = 4.\n
               151668, 271,  # </think> \n\n
               785, 4226, 374, 57960, 79075, 90, 19, 92, 12947,  # The answer is $\boxed{4}$.
               IM_END, NL]
# Generation 0 begins with a newline: encoded apart from the prompt it is its own "\n" (198); encoded with
# the prompt, "assistant\n" + "\n" would merge into one "\n\n" (271) straddling the boundary.
REJECTED_TURN = [NL, 151667, NL,  # \n <think> \n
                 17, 87, 284, 220, 16, 16, 488, 220, 18, 284, 220, 16, 19, 11, 773, 856, 284, 220, 22, 624,
                 # 2x = 11 + 3 = 14, so x = 7.\n
                 151668, 271,  # </think> \n\n
                 785, 4226, 374, 57960, 79075, 90, 22, 92, 12947,  # The answer is $\boxed{7}$.
                 IM_END, NL]
MEASURES = (46, 57, 59)  # study_length_distribution.py's prompt_len, chosen_len, rejected_len for this row


@pytest.fixture(scope="module")
def qwen3() -> Tokenizer:
    return Tokenizer.from_pretrained(require(QWEN3_TOKENIZER), chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def qwen25_math_specials(qwen3) -> Tokenizer:
    """The Qwen3 tokenizer.json with Qwen2.5-Math-1.5B's special-token settings: eos_token = pad_token =
    <|endoftext|>, as Qwen2.5 base models' tokenizer_config.json sets them."""
    config = json.loads(qwen3.files["tokenizer_config.json"])
    config.update(eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return Tokenizer({**qwen3.files, "tokenizer_config.json": json.dumps(config).encode()})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("redi")
    counts = build(FIXTURE, out)
    assert (counts["positives"], counts["pairs"]) == (1, 1)
    return out


def recipe_data(name: str, path: Path, tok: Tokenizer, cache: Path, **changes):
    """What train.py loads for `--recipe name --data path` (+ flags)."""
    args = flags.resolve({"recipe": name, "data": str(path), **changes})
    return train.load_data(args, tok, cache)


def test_redi_pair_token_for_token(qwen3, data, tmp_path):
    pair = json.loads((data / "pairs.jsonl").read_text())
    row = json.loads(FIXTURE.read_text())
    assert (pair["chosen"], pair["rejected"]) == (row["generations"][1], row["generations"][0])  # bool(None)
    ds = recipe_data("redi", data / "pairs.jsonl", qwen3, tmp_path)
    (c_ids, c_mask), (r_ids, r_mask) = ds[0]
    chosen, rejected = CHOSEN_TURN + [IM_END], REJECTED_TURN + [IM_END]  # Qwen3's eos_token is <|im_end|>
    assert c_ids.tolist() == PROMPT + chosen and r_ids.tolist() == PROMPT + rejected
    assert c_mask.tolist() == [False] * 48 + [True] * 34 and r_mask.tolist() == [False] * 48 + [True] * 37
    assert ds.stats["kept"] == 1 and ds.stats["truncated"] == 0  # 46 <= 800, 57 and 59 <= 19,000

    batch = collate(ds, [0])  # chosen and rejected side by side, one forward
    assert batch.tokens.tolist() == PROMPT + chosen + PROMPT + rejected
    assert batch.cu_seqlens.tolist() == [0, 82, 167] and batch.positions[82] == 0
    targets = batch.targets.tolist()  # token t predicts t+1 where t+1 carries loss
    assert targets[:47] == [-100] * 47 and targets[47:81] == chosen and targets[81] == -100
    assert targets[82:129] == [-100] * 47 and targets[129:166] == rejected and targets[166] == -100
    lens = sequence_lengths(batch.targets != -100, batch.seq_id, 2)
    assert lens.tolist() == [34, 37]  # |y|: the completion tokens, "\n" and EOS included


def test_redi_pair_with_qwen25_math_specials(qwen25_math_specials, data, tmp_path):
    """With Qwen2.5-Math's EOS (<|endoftext|>, which is also its pad): appended after "<|im_end|>\\n", with
    loss (the pair trainer's loss mask is the attention mask, never a comparison with the pad id)."""
    (c_ids, c_mask), (r_ids, r_mask) = recipe_data("redi", data / "pairs.jsonl", qwen25_math_specials,
                                                   tmp_path)[0]
    assert c_ids.tolist() == PROMPT + CHOSEN_TURN + [ENDOFTEXT] and c_mask[-1] and c_mask.sum() == 34
    assert r_ids.tolist() == PROMPT + REJECTED_TURN + [ENDOFTEXT] and r_mask[-1] and r_mask.sum() == 37


def test_redi_sft_token_for_token(qwen3, qwen25_math_specials, data, tmp_path):
    """Stage 1 encodes the conversation whole (the same ids here: "\\n" then <think> is a token boundary) and
    appends EOS; TRL's collator takes the loss off pad-id labels: Qwen3's EOS (<|im_end|>, pad <|endoftext|>)
    keeps it, Qwen2.5-Math's (EOS = pad = <|endoftext|>) loses it."""
    ids, mask = recipe_data("redi-sft", data / "sft.jsonl", qwen3, tmp_path / "a")[0]
    assert ids.tolist() == PROMPT + CHOSEN_TURN + [IM_END]
    assert mask.tolist() == [False] * 48 + [True] * 34
    ids, mask = recipe_data("redi-sft", data / "sft.jsonl", qwen25_math_specials, tmp_path / "b")[0]
    assert ids.tolist() == PROMPT + CHOSEN_TURN + [ENDOFTEXT]
    assert mask.tolist() == [False] * 48 + [True] * 33 + [False]


def test_our_alternatives(qwen3, data, tmp_path):
    """--completion-end im_end --think-prefix (the choices before): "<think>\\n" in the prompt, the loss
    stopping at <|im_end|> (its "\\n" in the sequence without loss, no EOS), prompt and completion encoded
    together (so the rejected side's leading "\\n" merges into the prompt's); --missing-verdict unverified
    picks generation 2 as the rejected one."""
    (c_ids, c_mask), (r_ids, r_mask) = recipe_data("redi", data / "pairs.jsonl", qwen3, tmp_path / "a",
                                                   completion_end="im_end")[0]
    assert c_ids.tolist() == PROMPT + CHOSEN_TURN
    assert c_mask.tolist() == [False] * 48 + [True] * 32 + [False]  # through <|im_end|>, not its "\n"
    assert r_ids.tolist() == PROMPT[:-1] + [271] + REJECTED_TURN[1:]  # "\n\n": one token across the boundary
    assert r_mask.tolist() == [False] * 48 + [True] * 34 + [False]  # ... and it is prompt
    (c_ids, c_mask), _ = recipe_data("redi", data / "pairs.jsonl", qwen3, tmp_path / "b",
                                     completion_end="im_end", think_prefix=True)[0]
    assert c_ids.tolist() == PROMPT + CHOSEN_TURN
    assert c_mask.tolist() == [False] * 50 + [True] * 30 + [False]  # "<think>\n" is prompt
    unverified = tmp_path / "unverified"
    build(FIXTURE, unverified, missing="unverified")
    pair = json.loads((unverified / "pairs.jsonl").read_text())
    assert pair["rejected"] == json.loads(FIXTURE.read_text())["generations"][2]


@pytest.mark.parametrize("max_prompt_len, max_len, outcome, cut", [
    (46, 46 + 59, "truncated", 2),   # kept: the prompt measures 46; its 48 tokens keep their last 46
    (48, 48 + 59, "kept", 0),
    (45, 1000, "dropped_prompt_too_long", None),   # 46 > 45
    (46, 46 + 58, "dropped_too_long", None),       # the rejected side measures 59 > 58: the pair goes
])
def test_redi_length_rule(qwen3, data, tmp_path, max_prompt_len, max_len, outcome, cut):
    """REDI's P/R filter with small bounds, on the lengths their study_length_distribution.py measures."""
    path = data / "pairs.jsonl"
    options = dict(max_prompt_len=max_prompt_len, max_len=max_len, length_rule="redi", completion_end="eos")
    if outcome.startswith("dropped"):
        with pytest.raises(ValueError, match=f"{outcome} 1"):
            load_pairs(path, qwen3, **options)
        return
    ds = load_pairs(path, qwen3, **options)
    assert ds.stats[outcome] == 1
    (c_ids, _), (r_ids, _) = ds[0]  # tokenize_row: prompt_input_ids[-max_prompt_length:]
    assert c_ids.tolist() == PROMPT[cut:] + CHOSEN_TURN + [IM_END]
    assert r_ids.tolist() == PROMPT[cut:] + REJECTED_TURN + [IM_END]


def test_redi_rule_keeps_the_end_of_a_long_sequence():
    """After the filter, prompt + completion keep their last max_len tokens (concatenated_forward's keep_end),
    the prompt its last max_prompt_len; a measure over the bound drops."""
    rules = LengthRules(max_len=5, max_prompt_len=3, rule="redi")
    ids, mask = np.arange(9), np.array([False] * 4 + [True] * 5)
    kept, kept_mask, outcome = rules.apply(ids, mask, measured=(3, 2))
    assert outcome == "truncated" and kept.tolist() == [4, 5, 6, 7, 8] and kept_mask.all()
    assert rules.apply(ids, mask, measured=(4, 2))[2] == "dropped_prompt_too_long"
    assert rules.apply(ids, mask, measured=(3, 3))[2] == "dropped_too_long"  # R = 5 - 3
    with pytest.raises(ValueError, match="length_rule='drop'"):
        LengthRules(rule="drop")


def test_chat_template_is_saved_with_the_tokenizer(qwen3, tmp_path):
    """--chat-template travels with the export: what loads it (eval.py, transformers) renders the same."""
    qwen3.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_bytes() == TEMPLATE.read_bytes()
    messages = [{"role": "user", "content": "hi"}]
    again = Tokenizer.from_pretrained(tmp_path)
    assert again.apply_chat_template(messages, add_generation_prompt=True) == SYSTEM_TURN + [
        IM_START, 872, NL, 6023, IM_END, NL] + GENERATION_PROMPT  # ... user \n hi <|im_end|> \n ...
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False) == again.render(messages, True)
    with pytest.raises(FileNotFoundError, match="no such chat template"):
        Tokenizer.from_pretrained(QWEN3_TOKENIZER, chat_template=tmp_path / "none.jinja")


def test_whole_turn_spans(qwen3):
    """whole_turn: each assistant turn's span runs on over the template's "\\n" after <|im_end|>; the ids are
    the same as without it (and as apply_chat_template)."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": "bye"}]
    assert qwen3.turn_close == "<|im_end|>\n" and qwen3.turn_end == "<|im_end|>"
    ids, mask = qwen3.encode_chat(messages)
    whole_ids, whole_mask = qwen3.encode_chat(messages, whole_turn=True)
    assert whole_ids == ids == qwen3.apply_chat_template(messages)
    added = [i for i, (a, b) in enumerate(zip(mask, whole_mask, strict=True)) if a != b]
    assert [ids[i] for i in added] == [NL, NL] and all(ids[i - 1] == IM_END and mask[i - 1] for i in added)

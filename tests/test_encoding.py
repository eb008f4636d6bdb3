"""The one encoding: layout, truncation, chat rendering, errors, the spec in manifests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from rlhf import checkpoint, encoding
from rlhf.encoding import EncodingError, EncodingSpec, Message
from rlhf.tokenizer import load_tokenizer, save_tokenizer


@pytest.fixture(scope="module")
def byte_tok(family_models: Callable[[str], Path]) -> PreTrainedTokenizerBase:
    return load_tokenizer(family_models("byte") / "policy")


@pytest.fixture(scope="module")
def bpe_tok(family_models: Callable[[str], Path]) -> PreTrainedTokenizerBase:
    return load_tokenizer(family_models("bpe") / "policy")


RAW = EncodingSpec()
CHAT = EncodingSpec(chat_template=True)


def test_pair_layout_on_the_byte_family(byte_tok: PreTrainedTokenizerBase) -> None:
    batch = encoding.encode_pairs(byte_tok, RAW, ["ab", "c"], ["xyz", "w"])
    # Row 0: BOS a b | x y z EOS; row 1: BOS c | w EOS, then right padding.
    assert batch.input_ids.tolist() == [
        [257, 97, 98, 120, 121, 122, 258],
        [257, 99, 119, 258, 256, 256, 256],
    ]
    assert batch.attention_mask.tolist() == [[1] * 7, [1, 1, 1, 1, 0, 0, 0]]
    assert batch.response_mask.tolist() == [[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0]]


def test_truncation_sides_and_response_eos(byte_tok: PreTrainedTokenizerBase) -> None:
    left = EncodingSpec(max_prompt_tokens=3, max_response_tokens=3)
    # Left truncation keeps BOS and the end of a long prompt; the response keeps its start
    # and is always closed with EOS.
    assert encoding.encode_pairs(byte_tok, left, ["abcdef"], ["uvwxyz"]).input_ids.tolist() == [
        [257, 101, 102, 117, 118, 258]
    ]
    right = EncodingSpec(max_prompt_tokens=3, max_response_tokens=3, truncation_side="right")
    assert encoding.prompt_ids(byte_tok, right, "abcdef") == [257, 97, 98]
    no_eos = EncodingSpec(max_response_tokens=2, append_eos=False)
    assert encoding.response_ids(byte_tok, no_eos, "uvw") == [117, 118]
    assert len(encoding.prompt_ids(byte_tok, left, "abcdef", truncate=False)) == 7


def test_a_chat_prompt_is_the_templated_conversation(bpe_tok: PreTrainedTokenizerBase) -> None:
    conversation = [Message("system", "Be brief."), Message("user", "Où est la gare ?")]
    want = bpe_tok.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in conversation],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    assert encoding.prompt_ids(bpe_tok, CHAT, conversation) == list(want)
    # Plain text under a chat spec is one user turn.
    assert encoding.prompt_ids(bpe_tok, CHAT, "Hi") == encoding.prompt_ids(
        bpe_tok, CHAT, [Message("user", "Hi")]
    )
    rendered = encoding.render_prompt(bpe_tok, CHAT, "Hi")
    assert rendered.endswith("<|im_start|>assistant\n") and rendered.count("<|begin_of_text|>") == 1
    # The response follows the generation prompt and ends the turn with EOS (<|im_end|>).
    batch = encoding.encode_pairs(bpe_tok, CHAT, [conversation], ["À côté du café."])
    response = batch.input_ids[0][batch.response_mask[0].bool()].tolist()
    assert response[-1] == bpe_tok.eos_token_id
    assert bpe_tok.decode(response[:-1]) == "À côté du café."


def test_left_truncation_of_a_chat_prompt_keeps_the_generation_prompt(
    bpe_tok: PreTrainedTokenizerBase,
) -> None:
    spec = EncodingSpec(chat_template=True, max_prompt_tokens=12)
    full = encoding.prompt_ids(bpe_tok, spec, "a long question " * 20, truncate=False)
    cut = encoding.prompt_ids(bpe_tok, spec, "a long question " * 20)
    assert len(full) > 12 and len(cut) == 12
    assert cut[:2] == full[:2]  # BOS, <|im_start|>
    assert cut[2:] == full[-10:]
    assert bpe_tok.decode(cut[-4:]).endswith("assistant\n")


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ([], "at least one message"),
        (
            [Message("user", "hi"), Message("bot", "hello")],
            r"messages\[1\].role: unknown role 'bot'",
        ),
        ([Message("system", "  ")], r"messages\[0\].content must not be empty"),
    ],
)
def test_bad_conversations_are_named(
    bpe_tok: PreTrainedTokenizerBase, prompt: list[Message], match: str
) -> None:
    with pytest.raises(EncodingError, match=match):
        encoding.prompt_ids(bpe_tok, CHAT, prompt)


def test_conversations_need_a_chat_template(
    byte_tok: PreTrainedTokenizerBase, bpe_tok: PreTrainedTokenizerBase
) -> None:
    with pytest.raises(EncodingError, match="plain prompts"):
        encoding.prompt_ids(bpe_tok, RAW, [Message("user", "hi")])
    with pytest.raises(EncodingError, match="tokenizer has none"):
        encoding.prompt_ids(byte_tok, CHAT, "hi")


def test_pad_equal_to_eos_keeps_the_eos_in_masks(family_models: Callable[[str], Path]) -> None:
    tok = load_tokenizer(family_models("bpe-pad-eos") / "policy")
    assert tok.pad_token_id == tok.eos_token_id
    batch = encoding.encode_pairs(tok, CHAT, ["a", "a longer prompt"], ["b", "c"])
    eos = tok.eos_token_id
    # Row 0 is padded with EOS ids; its own closing EOS is real, the padding is not.
    length = int(batch.attention_mask[0].sum())
    assert batch.input_ids[0, length - 1] == eos and batch.response_mask[0, length - 1] == 1
    assert (batch.input_ids[0, length:] == eos).all() and batch.attention_mask[
        0, length:
    ].sum() == 0


def test_spec_round_trips_and_is_read_back_from_a_manifest(
    bpe_tok: PreTrainedTokenizerBase, family_models: Callable[[str], Path], tmp_path: Path
) -> None:
    spec = EncodingSpec(chat_template=True, max_prompt_tokens=7, max_response_tokens=9)
    assert EncodingSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown settings"):
        EncodingSpec.from_dict({**spec.to_dict(), "bos": False})
    with pytest.raises(ValueError, match="truncation_side"):
        EncodingSpec(truncation_side="middle")
    # A directory without a manifest: the default for its tokenizer.
    policy = family_models("bpe") / "policy"
    assert encoding.spec_for_model(policy, bpe_tok) == EncodingSpec(chat_template=True)
    # A published checkpoint: the manifest's.
    manifest = checkpoint.publish(tmp_path, "policy", policy, round_type="sft",
                                  encoding=spec.to_dict())  # fmt: skip
    assert encoding.spec_for_model(tmp_path / "policy" / manifest.version, bpe_tok) == spec


def test_pretraining_text_is_never_templated(bpe_tok: PreTrainedTokenizerBase) -> None:
    ids, mask = encoding.encode_texts(bpe_tok, ["the river", "a"], max_tokens=4)
    assert ids[0, 0] == bpe_tok.bos_token_id
    assert bpe_tok.convert_tokens_to_ids("<|im_start|>") not in ids.tolist()[0]
    assert mask.dtype == torch.long and mask[1].sum() < mask[0].sum()


def test_saved_tokenizer_keeps_the_template(
    bpe_tok: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    save_tokenizer(bpe_tok, tmp_path)
    assert not (tmp_path / "chat_template.jinja").exists()
    assert load_tokenizer(tmp_path).chat_template == bpe_tok.chat_template

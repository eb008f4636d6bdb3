"""The BPE family's tokenizer behaves like a real chat model's: any text round trips,
multi-byte tokens and characters split across tokens, distinct specials, a chat template."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerBase

from rlhf.tokenizer import CHAT_TEMPLATE, bpe_tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def bpe(family_models: Callable[[str], Path]) -> PreTrainedTokenizerBase:
    return load_tokenizer(family_models("bpe") / "policy")


TEXTS = [
    "The river runs past the old mill.",
    "Grüße aus München, où est la gare ?",
    "你好，世界！こんにちは 안녕하세요 Привет",
    "emoji 😀👋🌍 and ❤️, math √2 ≈ 1.414",
    "\t tabs\r\nand  double  spaces\n\n",
    "unseen: ŋ ʒ ð Ꮎ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.mark.parametrize("text", TEXTS)
def test_known_and_unseen_text_round_trips(bpe: PreTrainedTokenizerBase, text: str) -> None:
    ids = bpe(text, add_special_tokens=False)["input_ids"]
    assert bpe.unk_token_id not in ids
    assert max(ids) < len(bpe)
    assert bpe.decode(ids) == text


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=40))
def test_any_text_round_trips_to_its_nfc_form(text: str) -> None:
    tok = _cached()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)


_TOK: list[PreTrainedTokenizerBase] = []


def _cached() -> PreTrainedTokenizerBase:
    if not _TOK:
        _TOK.append(bpe_tokenizer())
    return _TOK[0]


def test_merges_make_multibyte_tokens_and_split_other_characters(
    bpe: PreTrainedTokenizerBase,
) -> None:
    # "ü" (2 bytes) and "你" (3 bytes) are single tokens after training on data/chat.txt ...
    for char in ("ü", "你"):
        ids = bpe(char, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and len(char.encode()) > 1
    # ... while a rarer character's bytes are spread over several tokens, none of which
    # decodes to a character on its own: detokenisation must hold bytes back.
    ids = bpe("世", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    assert all("\ufffd" in bpe.decode([i]) for i in ids)
    assert bpe.decode(ids) == "世"
    assert len(bpe) > 512


def test_special_tokens_are_distinct_and_bos_comes_first(bpe: PreTrainedTokenizerBase) -> None:
    assert (bpe.bos_token, bpe.eos_token, bpe.pad_token) == (
        "<|begin_of_text|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    assert len({bpe.bos_token_id, bpe.eos_token_id, bpe.pad_token_id}) == 3
    ids = bpe("hello")["input_ids"]
    assert ids[0] == bpe.bos_token_id and bpe.eos_token_id not in ids
    assert bpe.decode(ids, skip_special_tokens=True) == "hello"


def test_chat_template_renders_roles_and_lives_in_tokenizer_config(
    bpe: PreTrainedTokenizerBase, family_models: Callable[[str], Path]
) -> None:
    config = json.loads((family_models("bpe") / "policy" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    text = bpe.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|begin_of_text|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = bpe(text, add_special_tokens=False)["input_ids"]
    assert ids.count(bpe.bos_token_id) == 1
    assert ids.count(bpe.convert_tokens_to_ids("<|im_start|>")) == 5
    assert ids.count(bpe.eos_token_id) == 4

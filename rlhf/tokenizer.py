"""Tokenizers of the two model families, built locally with nothing downloaded.

    byte_tokenizer() -> PreTrainedTokenizerFast
        Token id == byte value (0..255), then <|pad|>, <|bos|>, <|eos|>. No merges, no chat
        template: the fast, transparent family of the demo and most tests.
    bpe_tokenizer(corpus=CORPUS, vocab_size=1024) -> PreTrainedTokenizerFast
        A byte-level BPE trained with `tokenizers` on text in the repository (English,
        German, French, Spanish, Russian, Greek, Chinese, Japanese, Korean, Arabic, Hindi,
        emoji), deterministic for a given corpus. It behaves like a real chat model's
        (Qwen2.5-Instruct's, with Llama-3's BOS): merges that span the bytes of one character
        (and characters whose bytes stay split across tokens), NFC normalisation and a GPT-4
        style pre-tokenizer, BOS added by the post-processor, distinct BOS / EOS / PAD, and a
        ChatML chat template in tokenizer_config.json with system, user and assistant roles.
        EOS is `<|im_end|>`, the end of a turn, so a reply ends where the template closes it.
    load_tokenizer(path) -> PreTrainedTokenizerBase
        AutoTokenizer, with PAD set to EOS where a model ships none (Llama-3 does).
    save_tokenizer(tok, out)   save_pretrained with the chat template in tokenizer_config.json

Every byte is in both alphabets, so any text encodes; it decodes back exactly (the BPE
family: back to its NFC form, as Qwen2's tokenizer does).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

DATA = Path(__file__).resolve().parents[1] / "data"
CORPUS = (DATA / "pretrain.txt", DATA / "chat.txt")

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
# Qwen2.5-Instruct's PAD, EOS and turn opener, Llama-3's BOS. transformers loads a "qwen2"
# directory's tokenizer as Qwen2Tokenizer, which takes <|endoftext|> as its unknown token:
# it must be in the vocabulary, or loading would append it past the model's embedding.
BPE_PAD, BPE_BOS, BPE_EOS, BPE_TURN = (
    "<|endoftext|>",
    "<|begin_of_text|>",
    "<|im_end|>",
    "<|im_start|>",
)

# Qwen2's / GPT-4's pre-tokenizer split: words with their leading space, single digits,
# punctuation runs, newlines. Letters of any script stay together, so merges can form
# multi-byte tokens.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML, as Qwen2 ships it, with Llama-3's BOS in front. Rendered text already holds the
# special tokens, so it is tokenised with add_special_tokens=False (transformers' convention).
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what the ByteLevel model uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def byte_tokenizer(model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: token id == byte value (0..255), then pad, bos, eos.

    It has no merges, so it needs no training data; it is saved as a normal tokenizer.json
    that AutoTokenizer loads like any real model's. Like Llama's tokenizer it prepends BOS
    when `add_special_tokens=True`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([PAD, BOS, EOS])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=model_max_length,
    )


def _lines(paths: Iterable[Path]) -> list[str]:
    return [line for p in paths for line in p.read_text(encoding="utf-8").splitlines() if line]


def bpe_tokenizer(
    corpus: Iterable[Path] = CORPUS, vocab_size: int = 1024, model_max_length: int = 4096
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `corpus`, with a ChatML chat template (see module doc)."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    # NFC, as Qwen2's tokenizer (and transformers' Qwen2Tokenizer) normalises.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BPE_PAD, BPE_BOS, BPE_TURN, BPE_EOS],
        # All 256 bytes, merged or not: any text encodes, nothing is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_lines(corpus), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BPE_BOS} $A",
        pair=f"{BPE_BOS} $A $B",
        special_tokens=[(BPE_BOS, tok.token_to_id(BPE_BOS))],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BPE_BOS,
        eos_token=BPE_EOS,
        pad_token=BPE_PAD,
        additional_special_tokens=[BPE_TURN],
        model_max_length=model_max_length,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(tok: PreTrainedTokenizerBase, out: str | Path) -> None:
    """save_pretrained, with the chat template inside tokenizer_config.json, where Hugging Face
    chat models keep it (transformers 5 would write a separate chat_template.jinja)."""
    tok.save_pretrained(str(out), save_jinja_files=False)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """AutoTokenizer, with a pad token guaranteed (real models often ship without one)."""
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok

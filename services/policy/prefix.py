"""Prompt KV kept after prefill and reused by later prompts that start the same way.

Chat traffic repeats itself at the front: a system prompt, a template, a conversation that
grows by one turn, the same prompt sampled again. After a prompt's prefill its keys and values
are copied out of the slot into an entry here; a later prompt whose first tokens equal an
entry's gets them copied into its own slot and prefills only the rest. When all but its last
token are cached, that token simply joins the decode batch of the step (``NativeEngine``), so
a repeated prompt costs one decode row instead of a prefill.

Matching is token-exact on the longest cached prefix, as SGLang's radix cache (vLLM hashes
blocks of 16 tokens and reuses whole blocks): every prefix of an entry is indexed by a running
hash of its tokens, and a hit is checked token by token, so a hash collision can only cost a
miss. A match shorter than ``min_tokens`` is not used: recomputing a few tokens in the packed
prefill is cheaper than attending over a partly cached slot on its own. Keys and values depend
only on the tokens before them, so a reused prefix holds what prefilling it would compute
(up to float rounding of a different batch shape).

Memory is bounded by ``max_tokens`` summed over the entries (the least recently used go
first); the cache belongs to one model version and is freed with its KV slots.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from services.policy.kvbatch import SlotCache


def prefix_hashes(tokens: Sequence[int]) -> list[int]:
    """``hashes[i]`` identifies ``tokens[: i + 1]`` (a running hash: one step per token)."""
    out = []
    h = 0
    for token in tokens:
        h = hash((h, token))
        out.append(h)
    return out


@dataclass(eq=False)
class _Entry:
    tokens: tuple[int, ...]
    hashes: list[int]
    kv: Tensor  # (layers, kv_heads, len(tokens), 2 * head_dim)


class PrefixCache:
    """Cached prompt prefixes of one ``SlotCache`` (see the module docstring)."""

    def __init__(self, cache: SlotCache, max_tokens: int, min_tokens: int = 16) -> None:
        self.cache = cache
        self.max_tokens = max_tokens
        self.min_tokens = max(1, min_tokens)
        self.tokens = 0  # held, summed over entries
        self._entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()
        self._index: dict[int, int] = {}  # prefix hash -> entry id (the newest holding it)
        self._ids = itertools.count()

    @property
    def nbytes(self) -> int:
        return sum(e.kv.numel() * e.kv.element_size() for e in self._entries.values())

    def fill(self, slot: int, prompt: Sequence[int]) -> int:
        """Copies the longest cached prefix of ``prompt`` (at most all but its last token, at
        least ``min_tokens``) into the empty ``slot``; returns its length (0: none)."""
        if len(prompt) <= self.min_tokens or not self._entries:
            return 0
        hashes = prefix_hashes(prompt[:-1])
        for length in range(len(hashes), self.min_tokens - 1, -1):
            key = self._index.get(hashes[length - 1])
            if key is None:
                continue
            entry = self._entries[key]
            if entry.tokens[:length] != tuple(prompt[:length]):
                continue  # a hash collision: never reuse what does not match
            self._entries.move_to_end(key)
            self.cache.load_prefix(slot, entry.kv, length)
            return length
        return 0

    def store(self, slot: int, prompt: Sequence[int]) -> None:
        """Keeps the prompt's keys and values, which ``slot`` holds right after its prefill."""
        if len(prompt) <= self.min_tokens or len(prompt) > self.max_tokens:
            return
        hashes = prefix_hashes(prompt)
        key = self._index.get(hashes[-1])
        if key is not None and self._entries[key].tokens == tuple(prompt):
            self._entries.move_to_end(key)
            return
        key = next(self._ids)
        self._entries[key] = _Entry(
            tuple(prompt), hashes, self.cache.save_prefix(slot, len(prompt))
        )
        for h in hashes:
            self._index[h] = key
        self.tokens += len(prompt)
        while self.tokens > self.max_tokens:
            self._evict()

    def _evict(self) -> None:
        key, entry = self._entries.popitem(last=False)
        self.tokens -= len(entry.tokens)
        for h in entry.hashes:
            if self._index.get(h) == key:
                del self._index[h]

    def clear(self) -> None:
        self._entries.clear()
        self._index.clear()
        self.tokens = 0

"""Rows of sequences decoding together over one KV cache (the engine's batch state).

Rows are left-padded to a common length: ``mask`` marks real tokens, and each row's position
ids count only its real tokens, so a row computes exactly what it would compute alone. Rows
join (new requests after their prefill) and leave (finished, cancelled) between steps;
columns that became padding in every row are trimmed away.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from rlhf.models import pad

Row = TypeVar("Row")
KV = list[tuple[torch.Tensor, torch.Tensor]]


class KVBatch(Generic[Row]):
    def __init__(self, model: PreTrainedModel, rows: list[Row], kv: KV, mask: torch.Tensor) -> None:
        self.model = model
        self.rows = rows
        self.kv = kv  # per layer (keys, values), each (B, heads, T, head_dim)
        self.mask = mask  # (B, T), 1 where the cache holds a real token

    @classmethod
    def prefill(
        cls,
        model: PreTrainedModel,
        prompts: Sequence[Sequence[int]],
        repeats: Sequence[int],
        rows: list[Row],
        pad_id: int,
    ) -> tuple[KVBatch[Row], torch.Tensor]:
        """Runs the prompts once and gives prompt i ``repeats[i]`` rows (its n samples).

        Returns the batch and the next-token logits of every row, (sum(repeats), V) float32.
        """
        device = next(model.parameters()).device
        ids, mask = pad(prompts, pad_id, side="left")
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        r = torch.tensor(list(repeats), device=device)
        kv = [(k.repeat_interleave(r, dim=0), v.repeat_interleave(r, dim=0)) for k, v in _kv(cache)]
        logits = out.logits[:, -1, :].float().repeat_interleave(r, dim=0)
        return cls(model, rows, kv, mask.to(device).repeat_interleave(r, dim=0)), logits

    def decode(self, last_tokens: Sequence[int]) -> torch.Tensor:
        """Feeds each row its last token; returns the next-token logits, (B, V) float32."""
        device = self.mask.device
        last = torch.tensor(list(last_tokens), dtype=torch.long, device=device)
        positions = self.mask.sum(dim=1, keepdim=True)
        mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        cache = DynamicCache(ddp_cache_data=self.kv)
        out = self.model(
            input_ids=last[:, None],
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.kv = _kv(cache)
        self.mask = mask
        return out.logits[:, -1, :].float()

    def select(self, keep: Sequence[int]) -> None:
        """Keeps only the rows at ``keep`` (in that order)."""
        idx = torch.tensor(list(keep), dtype=torch.long, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask = self.mask.index_select(0, idx)
        # Columns that are padding in every remaining row are dead weight in every later step.
        start = int(self.mask.any(dim=0).long().argmax()) if keep else 0
        self.mask = self.mask[:, start:]
        self.kv = [
            (k.index_select(0, idx)[:, :, start:], v.index_select(0, idx)[:, :, start:])
            for k, v in self.kv
        ]

    def join(self, other: KVBatch[Row]) -> None:
        """Appends ``other``'s rows, left-padding the shorter cache to the longer one."""
        width = max(self.mask.shape[1], other.mask.shape[1])

        def left_pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        self.rows += other.rows
        self.mask = torch.cat([left_pad(self.mask, 1), left_pad(other.mask, 1)])
        self.kv = [
            (
                torch.cat([left_pad(k1, 2), left_pad(k2, 2)]),
                torch.cat([left_pad(v1, 2), left_pad(v2, 2)]),
            )
            for (k1, v1), (k2, v2) in zip(self.kv, other.kv, strict=True)
        ]


def _kv(cache: DynamicCache) -> KV:
    out = []
    for layer in cache.layers:
        # Sliding-window and linear-attention layers keep a different state that left-padding
        # and joining rows would corrupt; such models need another engine.
        if type(layer) is not DynamicLayer or layer.keys is None or layer.values is None:
            raise TypeError(
                f"the engine supports full-attention KV caches only, not {type(layer).__name__}"
            )
        out.append((layer.keys, layer.values))
    return out

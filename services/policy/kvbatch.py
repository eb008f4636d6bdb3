"""KV memory preallocated per slot, written in place, and the packed forward pass over it.

A ``SlotCache`` holds, per layer, keys and values for ``slots`` sequences of up to
``capacity`` tokens each: (layers, slots, kv_heads, capacity, head_dim), allocated once. A
sequence owns one slot from admission to its end; each forward pass writes the new tokens'
keys and values into their slots at their positions (one ``index_copy_`` per layer for all of
them), so nothing proportional to the cache is copied or allocated per token, and a finished
sequence frees its slot for the next one without moving anybody else's. An attention bias per
slot (0 at the positions it holds, -inf beyond) is kept up to date the same way.

One forward pass (``SlotCache.forward``) runs a *packed* batch: the last token of every decoding
sequence plus chunks of prompts being prefilled, all in one row of tokens with their own
position ids, so no token is padding. The model's attention layers call ``slot_attention``
(registered with transformers' ``AttentionInterface``): it writes the step's keys and values
into the slots, then

* decoding tokens attend, in one batched call, over the slots ``[0, hi)`` up to the longest
  length, each masked by its slot's bias (the attention reads the cache where it lies);
* whole prompts of equal length attend causally to themselves in one batched call (they are
  packed side by side for it); a chunk continuing a longer prompt attends over its own slot
  (its earlier chunks included).

A request's ``n`` samples share one prefill: the prompt runs once, then its keys and values are
copied into the other samples' slots (once per request, proportional to the prompt).

Works with any transformers model whose attention goes through ``AttentionInterface`` with
full (not sliding-window) attention: Llama, Qwen2/3, Mistral without a window, ...
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from services.policy.lean import LeanDecoder

ATTENTION = "rlhf_slots"


@dataclass
class Chunk:
    """Prompt tokens ``[start, start + len(tokens))`` of the sequence in ``slot``."""

    slot: int
    start: int
    tokens: Sequence[int]


@dataclass
class _Step:
    """What ``slot_attention`` needs to know about one packed forward pass."""

    cache: SlotCache
    rows: Tensor  # (T * kv_heads,) where each packed token's keys and values go (flat cache)
    decode_count: int  # the first decode_count packed tokens are decoding sequences
    decode_slots: Tensor  # (D,) their slots
    hi: int  # decode attention spans slots [0, hi) ...
    span: int  # ... and positions [0, span)
    dense: bool  # the decoding slots are exactly 0..hi-1, in order: no query scatter
    bias: Tensor | None  # (hi * kv_heads, 1, span) of the cache's bias, for the decode rows
    # Whole prompts next: (packed offset, how many, length), each group side by side.
    prompts: list[tuple[int, int, int]]
    tails: list[tuple[int, int, int, int]]  # then later chunks: (slot, offset, start, length)


def slot_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    rlhf_step: _Step | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention over the slot cache; plain SDPA for any other call."""
    if rlhf_step is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    # (1, heads, T, hd) -> (T, heads, hd) and back to (1, T, heads, hd).
    kv = torch.stack([key[0].transpose(0, 1), value[0].transpose(0, 1)], dim=1)
    out = attend(rlhf_step, layer, query[0].transpose(0, 1), kv, scaling)
    return out[None], None


def attend(step: _Step, layer: int, q: Tensor, kv: Tensor, scaling: float | None) -> Tensor:
    """Writes the packed tokens' keys and values into their slots, then attends.

    ``q``: (T, heads, hd) and ``kv``: (T, 2, kv_heads, hd), the keys and values, for the
    step's packed tokens; returns (T, heads, hd).
    """
    cache = step.cache
    heads, kv_heads, hd = q.shape[1], kv.shape[2], q.shape[2]
    gqa = heads != kv_heads
    scale = scaling if scaling is not None else hd**-0.5
    # Every packed token's key and value to its own slot and position: rows of the cache seen
    # as (slots * kv_heads * capacity, key | value).
    cache.rows[layer].index_copy_(0, step.rows, kv.transpose(1, 2).reshape(-1, 2 * hd))
    outs = []
    d = step.decode_count
    if d:
        qd = q[:d]
        if not step.dense:
            full = qd.new_zeros(step.hi, heads, hd)
            full[step.decode_slots] = qd
            qd = full
        # One query per slot: batched matmuls over the cache where it lies (cheaper than
        # SDPA's kernels at this shape), one batch entry per (slot, key/value head), the
        # grouped query heads of a key/value head as its rows.
        # (slot, head) pairs as one batch dimension of the layer's cache, read where it lies:
        # keys transposed (batch, hd, span), values (batch, span, hd).
        batch, span, pair = step.hi * kv_heads, step.span, cache.capacity * 2 * hd
        base = layer * cache.slots * kv_heads * pair
        keys_t = cache.kv.as_strided((batch, hd, span), (pair, 1, 2 * hd), base)
        values = cache.kv.as_strided((batch, span, hd), (pair, 2 * hd, 1), base + hd)
        assert step.bias is not None  # set whenever a slot decodes
        scores = torch.baddbmm(step.bias, qd.reshape(batch, -1, hd), keys_t, alpha=scale)
        out = torch.bmm(torch.softmax(scores, dim=-1), values).view(step.hi, heads, hd)
        outs.append(out if step.dense else out[step.decode_slots])  # (D, heads, hd)
    for offset, count, length in step.prompts:
        # ``count`` whole prompts of ``length`` tokens, side by side: their own keys and values.
        end = offset + count * length
        qg, kg, vg = (
            x[offset:end].view(count, length, -1, hd).transpose(1, 2)
            for x in (q, kv[:, 0], kv[:, 1])
        )
        out = torch.nn.functional.scaled_dot_product_attention(
            qg, kg, vg, is_causal=True, scale=scaling, enable_gqa=gqa
        )
        outs.append(out.transpose(1, 2).reshape(count * length, heads, hd))
    for slot, offset, start, length in step.tails:
        # A later chunk of a long prompt: over its slot, its earlier chunks included.
        qc = q[offset : offset + length].transpose(0, 1)[None]
        kc = cache.k[layer, slot : slot + 1, :, : start + length]
        vc = cache.v[layer, slot : slot + 1, :, : start + length]
        rows = torch.arange(start, start + length, device=q.device)[:, None]
        mask = torch.arange(start + length, device=q.device)[None, :] <= rows
        out = torch.nn.functional.scaled_dot_product_attention(
            qc, kc, vc, attn_mask=mask, scale=scaling, enable_gqa=gqa
        )
        outs.append(out[0].transpose(0, 1))  # (L, heads, hd)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


AttentionInterface.register(ATTENTION, slot_attention)


def check_supported(model: PreTrainedModel) -> None:
    """Raises TypeError for models whose attention the slot cache would compute wrongly."""
    config = model.config
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise TypeError("the native engine needs full attention; this model uses a sliding window")
    layer_types = getattr(config, "layer_types", None) or ()
    if any(t != "full_attention" for t in layer_types):
        raise TypeError(f"the native engine needs full attention in every layer, got {layer_types}")
    if not getattr(model, "_supports_attention_backend", False):
        raise TypeError(f"{type(model).__name__} does not take a custom attention backend")


class SlotCache:
    """Preallocated per-slot KV memory of one model (see the module docstring)."""

    def __init__(self, model: PreTrainedModel, slots: int, capacity: int) -> None:
        check_supported(model)
        config = model.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        param = next(model.parameters())
        # A token's key and value side by side: (layers, slots, kv_heads, capacity, 2 * hd).
        # Zeros, not empty: a masked-out position is still multiplied by a zero weight, and
        # uninitialised memory may hold NaN.
        shape = (config.num_hidden_layers, slots, kv_heads, capacity, 2 * head_dim)
        self.kv = torch.zeros(shape, dtype=param.dtype, device=param.device)
        self.k, self.v = self.kv[..., :head_dim], self.kv[..., head_dim:]
        # Per layer, the same memory as rows of one key and value each.
        self.rows = [layer.view(-1, 2 * head_dim) for layer in self.kv]
        self.kv_heads = kv_heads
        # Decode attention bias per (slot, key/value head): 0 at the positions the slot holds,
        # -inf beyond; position 0 always open, so a slot that does not decode in a step (free,
        # or prefilling) attends to something finite, and its thrown-away output is not NaN.
        self.bias = torch.full(
            (slots * kv_heads, 1, capacity), float("-inf"), dtype=param.dtype, device=param.device
        )
        self.bias[:, :, 0] = 0
        self._heads = torch.arange(kv_heads, device=param.device)
        self.model = model
        self.slots = slots
        self.capacity = capacity
        self.device = param.device
        self.lengths = [0] * slots  # tokens held per slot
        self._free = list(range(slots))
        # Llama-family decoders run a lean forward of their own; others go through transformers'
        # forward with ``slot_attention`` (other callers of the model still get plain SDPA).
        self.lean = LeanDecoder.of(model, capacity)
        if self.lean is None and model.config._attn_implementation != ATTENTION:
            model.set_attn_implementation(ATTENTION)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """The lowest free slot (keeps the decode span ``[0, hi)`` short)."""
        self._free.sort()
        slot = self._free.pop(0)
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0
        self.bias[slot * self.kv_heads : (slot + 1) * self.kv_heads, :, 1:] = float("-inf")
        self._free.append(slot)

    def copy_prefix(self, source: int, targets: Sequence[int], length: int) -> None:
        """Gives ``targets`` the first ``length`` positions of ``source`` (a prompt's n samples)."""
        if not targets:
            return
        idx = torch.tensor(list(targets), device=self.device)
        self.kv[:, idx, :, :length] = self.kv[:, source : source + 1, :, :length]
        bias = self.bias.view(self.slots, self.kv_heads, self.capacity)
        bias[idx, :, :length] = 0
        for t in targets:
            self.lengths[t] = length

    def save_prefix(self, slot: int, length: int) -> Tensor:
        """A copy of the first ``length`` positions of ``slot``: (layers, kv_heads, length, 2hd)."""
        return self.kv[:, slot, :, :length].clone()

    def load_prefix(self, slot: int, kv: Tensor, length: int) -> None:
        """Gives the empty ``slot`` the first ``length`` positions of a ``save_prefix`` copy."""
        self.kv[:, slot, :, :length] = kv[:, :, :length]
        bias = self.bias.view(self.slots, self.kv_heads, self.capacity)
        bias[slot, :, :length] = 0
        self.lengths[slot] = length

    def forward(
        self, decode_slots: Sequence[int], last_tokens: Sequence[int], chunks: Sequence[Chunk]
    ) -> Tensor:
        """One packed pass: each decoding slot's last token, then the prompt chunks.

        Returns float32 next-token logits for every decoding slot (in order), then one row for
        every chunk (the logits after its last token; only a prompt's final chunk uses them).
        """
        device = self.device
        d = len(decode_slots)
        lengths = self.lengths
        positions = [lengths[s] for s in decode_slots]
        if d and max(positions) >= self.capacity:
            full = decode_slots[positions.index(max(positions))]
            raise ValueError(f"slot {full} is full ({self.capacity} tokens)")
        ids = list(last_tokens)
        pos = list(positions)
        owner = list(decode_slots)  # each packed token's slot
        # Whole prompts packed by length (equal lengths side by side attend in one call), then
        # the later chunks of long prompts; logits come back in the callers' order.
        order = sorted(
            range(len(chunks)), key=lambda i: (chunks[i].start > 0, len(chunks[i].tokens))
        )
        prompts: list[tuple[int, int, int]] = []
        tails = []
        last = [0] * len(chunks)
        for i in order:
            chunk = chunks[i]
            length = len(chunk.tokens)
            offset = len(ids)
            if chunk.start:
                tails.append((chunk.slot, offset, chunk.start, length))
            elif prompts and prompts[-1][2] == length:
                prompts[-1] = (prompts[-1][0], prompts[-1][1] + 1, length)
            else:
                prompts.append((offset, 1, length))
            ids.extend(chunk.tokens)
            pos.extend(range(chunk.start, chunk.start + length))
            owner.extend([chunk.slot] * length)
            last[i] = len(ids) - 1
        t = len(ids)
        kv_heads, capacity = self.kv_heads, self.capacity
        # Where each token's key and value go, as rows of the flat cache: computed here for a
        # few tokens, on the device for many (a prefill).
        few = t * kv_heads <= 512
        rows_list = []
        if few:
            heads = range(kv_heads)
            rows_list = [
                (o * kv_heads + h) * capacity + p
                for o, p in zip(owner, pos, strict=True)
                for h in heads
            ]
        # One host-to-device copy for every index of the step.
        packed = torch.tensor(
            ids + pos + owner + list(range(d)) + last + rows_list, dtype=torch.long, device=device
        )
        ids_t, pos_t, owner_t = packed[:t], packed[t : 2 * t], packed[2 * t : 3 * t]
        keep_end = 3 * t + d + len(chunks)
        # No chunk: the logits of every packed token are wanted (no selection).
        keep_t = packed[3 * t : keep_end] if chunks else None
        if few:
            rows = packed[keep_end:]
        else:
            rows = ((owner_t[:, None] * kv_heads + self._heads) * capacity + pos_t[:, None]).view(
                -1
            )
        # The new positions are open to the decode attention from now on (this step included).
        self.bias.view(-1).index_fill_(0, rows, 0)
        hi = max(decode_slots) + 1 if d else 0
        span = max(positions) + 1 if d else 0
        bias = None
        if d:
            bias = self.bias.as_strided((hi * kv_heads, 1, span), (capacity, capacity, 1))
        step = _Step(
            cache=self,
            rows=rows,
            decode_count=d,
            decode_slots=owner_t[:d],
            hi=hi,
            span=span,
            dense=list(decode_slots) == list(range(hi)),
            bias=bias,
            prompts=prompts,
            tails=tails,
        )
        if self.lean is not None:
            logits = self.lean.forward(ids_t, pos_t, keep_t, functools.partial(attend, step))
        else:
            logits = self.model(
                input_ids=ids_t[None],
                position_ids=pos_t[None],
                # A 4D mask is taken as already built: transformers makes none of its own.
                attention_mask=_NO_MASK.to(device),
                use_cache=False,
                logits_to_keep=keep_t if keep_t is not None else 0,  # 0: all
                rlhf_step=step,
            ).logits[0]
        for s in decode_slots:
            lengths[s] += 1
        for chunk in chunks:
            lengths[chunk.slot] = chunk.start + len(chunk.tokens)
        return logits.float()


_NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)

"""KV memory preallocated per slot, written in place, and the packed forward pass over it.

A ``SlotCache`` holds, per layer, keys and values for ``slots`` sequences of up to
``capacity`` tokens each: (layers, slots, kv_heads, capacity, head_dim), allocated once. A
sequence owns one slot from admission to its end; each forward pass writes the new tokens'
keys and values into their slots at their positions (``index_put_``), so nothing proportional
to the cache is copied or allocated per token, and a finished sequence frees its slot for the
next one without moving anybody else's.

One forward pass (``SlotCache.forward``) runs a *packed* batch: the last token of every decoding
sequence plus chunks of prompts being prefilled, all in one row of tokens with their own
position ids, so no token is padding. The model's attention layers call ``slot_attention``
(registered with transformers' ``AttentionInterface``): it writes the step's keys and values
into the slots, then

* decoding tokens attend, in one batched call, over the slots ``[0, hi)`` up to the longest
  length, each masked to its own length (the attention reads the cache where it lies);
* each prompt chunk attends causally over its own slot (its earlier chunks included).

A request's ``n`` samples share one prefill: the prompt runs once, then its keys and values are
copied into the other samples' slots (once per request, proportional to the prompt).

Works with any transformers model whose attention goes through ``AttentionInterface`` with
full (not sliding-window) attention: Llama, Qwen2/3, Mistral without a window, ...
"""

from __future__ import annotations

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
    decode_count: int  # the first decode_count packed tokens are decoding sequences
    decode_slots: Tensor  # (D,) their slots
    decode_rows: Tensor  # (D * kv_heads,) where their keys and values go in the flat cache
    hi: int  # decode attention spans slots [0, hi) ...
    span: int  # ... and positions [0, span)
    dense: bool  # the decoding slots are exactly 0..hi-1, in order: no query scatter
    decode_bias: Tensor | None  # (hi * kv_heads, 1, span): 0 where a slot attends, -inf elsewhere
    chunks: list[tuple[int, int, int, int]]  # (slot, packed offset, cache start, length)


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
    out = attend(
        rlhf_step,
        layer,
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        scaling,
    )
    return out[None], None


def attend(
    step: _Step, layer: int, q: Tensor, k: Tensor, v: Tensor, scaling: float | None
) -> Tensor:
    """Writes the packed tokens' keys and values into their slots, then attends.

    ``q``: (T, heads, hd), ``k``/``v``: (T, kv_heads, hd) for the step's packed tokens;
    returns (T, heads, hd).
    """
    cache = step.cache
    keys, values = cache.k[layer], cache.v[layer]
    gqa = q.shape[1] != k.shape[1]
    d = step.decode_count
    outs = []
    if d:
        # Each decoding sequence's new key and value go to its own slot and position: rows of
        # the cache seen as (slots * kv_heads * capacity, head_dim).
        hd = k.shape[-1]
        cache.k_rows[layer].index_copy_(0, step.decode_rows, k[:d].reshape(-1, hd))
        cache.v_rows[layer].index_copy_(0, step.decode_rows, v[:d].reshape(-1, hd))
    for slot, offset, start, length in step.chunks:
        keys[slot, :, start : start + length] = k[offset : offset + length].transpose(0, 1)
        values[slot, :, start : start + length] = v[offset : offset + length].transpose(0, 1)
    if d:
        qd = q[:d]
        if not step.dense:
            full = qd.new_zeros(step.hi, qd.shape[1], qd.shape[2])
            full[step.decode_slots] = qd
            qd = full
        # One query per slot: batched matmuls over the cache where it lies (cheaper than
        # SDPA's kernels at this shape), one batch entry per (slot, key/value head), the
        # grouped query heads of a key/value head as its rows.
        kv_heads, hd = keys.shape[1], qd.shape[2]
        batch = step.hi * kv_heads
        scores = torch.baddbmm(
            step.decode_bias,  # type: ignore[arg-type]
            qd.reshape(batch, -1, hd),
            keys[: step.hi, :, : step.span].reshape(batch, step.span, hd).transpose(1, 2),
            alpha=scaling if scaling is not None else hd**-0.5,
        )
        probs = torch.softmax(scores, dim=-1)
        out = torch.bmm(probs, values[: step.hi, :, : step.span].reshape(batch, step.span, hd))
        out = out.view(step.hi, -1, hd)
        outs.append(out if step.dense else out[step.decode_slots])  # (D, heads, hd)
    for slot, offset, start, length in step.chunks:
        qc = q[offset : offset + length].transpose(0, 1)[None]
        kc = keys[slot : slot + 1, :, : start + length]
        vc = values[slot : slot + 1, :, : start + length]
        mask = None
        if start:
            rows = torch.arange(start, start + length, device=q.device)[:, None]
            mask = torch.arange(start + length, device=q.device)[None, :] <= rows
        out = torch.nn.functional.scaled_dot_product_attention(
            qc, kc, vc, attn_mask=mask, is_causal=not start, scale=scaling, enable_gqa=gqa
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
        shape = (config.num_hidden_layers, slots, kv_heads, capacity, head_dim)
        # Zeros, not empty: a masked-out position is still multiplied by a zero weight, and
        # uninitialised memory may hold NaN.
        self.k = torch.zeros(shape, dtype=param.dtype, device=param.device)
        self.v = torch.zeros(shape, dtype=param.dtype, device=param.device)
        # Per layer, the same memory as rows of one key or value each.
        self.k_rows = [layer.view(-1, head_dim) for layer in self.k]
        self.v_rows = [layer.view(-1, head_dim) for layer in self.v]
        self.kv_heads = kv_heads
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
        return self.k.numel() * self.k.element_size() * 2

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
        self._free.append(slot)

    def copy_prefix(self, source: int, targets: Sequence[int], length: int) -> None:
        """Gives ``targets`` the first ``length`` positions of ``source`` (a prompt's n samples)."""
        if not targets:
            return
        idx = torch.tensor(list(targets), device=self.device)
        self.k[:, idx, :, :length] = self.k[:, source : source + 1, :, :length]
        self.v[:, idx, :, :length] = self.v[:, source : source + 1, :, :length]
        for t in targets:
            self.lengths[t] = length

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
        ids = list(last_tokens)
        pos = list(positions)
        plan = []
        keep = list(range(d))
        for chunk in chunks:
            length = len(chunk.tokens)
            plan.append((chunk.slot, len(ids), chunk.start, length))
            ids.extend(chunk.tokens)
            pos.extend(range(chunk.start, chunk.start + length))
            keep.append(len(ids) - 1)
        if d and max(positions) >= self.capacity:
            full = decode_slots[positions.index(max(positions))]
            raise ValueError(f"slot {full} is full ({self.capacity} tokens)")
        hi = max(decode_slots) + 1 if d else 0
        span = max(positions) + 1 if d else 0
        kv_heads = self.kv_heads
        # One host-to-device copy for every index of the step.
        rows = [
            (s * kv_heads + h) * self.capacity + p
            for s, p in zip(decode_slots, positions, strict=True)
            for h in range(kv_heads)
        ]
        # Slots in [0, hi) that do not decode this step (free, or prefilling) attend to
        # position 0 only: their output is thrown away, but it must not be NaN.
        reach = [0] * hi
        for s, p in zip(decode_slots, positions, strict=True):
            reach[s] = p
        packed = torch.tensor(
            ids + pos + keep + list(decode_slots) + rows + reach, dtype=torch.long
        ).to(device)
        t = len(ids)
        ids_t, pos_t = packed[:t], packed[t : 2 * t]
        keep_t = packed[2 * t : 2 * t + len(keep)]
        at = 2 * t + len(keep)
        slots_t = packed[at : at + d]
        rows_t = packed[at + d : at + d + len(rows)]
        bias = None
        if d:
            reach_t = packed[at + d + len(rows) :]
            visible = torch.arange(span, device=device)[None, :] <= reach_t[:, None]
            bias = torch.zeros(visible.shape, dtype=self.k.dtype, device=device)
            bias = bias.masked_fill_(~visible, float("-inf"))
            bias = bias.repeat_interleave(kv_heads, dim=0)[:, None, :]  # (hi * kv_heads, 1, span)
        step = _Step(
            cache=self,
            decode_count=d,
            decode_slots=slots_t,
            decode_rows=rows_t,
            hi=hi,
            span=span,
            dense=list(decode_slots) == list(range(hi)),
            decode_bias=bias,
            chunks=plan,
        )
        if self.lean is not None:
            logits = self.lean.forward(
                ids_t, pos_t, keep_t, lambda layer, q, k, v, sc: attend(step, layer, q, k, v, sc)
            )
        else:
            logits = self.model(
                input_ids=ids_t[None],
                position_ids=pos_t[None],
                # A 4D mask is taken as already built: transformers makes none of its own.
                attention_mask=_NO_MASK.to(device),
                use_cache=False,
                logits_to_keep=keep_t,
                rlhf_step=step,
            ).logits[0]
        for s in decode_slots:
            lengths[s] += 1
        for chunk in chunks:
            lengths[chunk.slot] = chunk.start + len(chunk.tokens)
        return logits.float()


_NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)

"""A lean forward pass for Llama-family decoders (Llama, Mistral, Qwen2), on their own weights.

transformers' forward is written for every use (training, caches, hooks, output records); for
one packed decode step of a small model on CPU its Python overhead costs as much as the
arithmetic. This runs the same computation with the fewest operations: the q/k/v and the
gate/up projections fused (the modules' weights become views into the fused tensors, so
nothing is stored twice and transformers' own forward still works), fused RMSNorm, the
residual adds done by the matmuls, RoPE on queries and keys at once from a table the model's
own rotary module computed (every rope scaling type), and attention over the slot cache.
Models it does not recognise exactly return None from ``LeanDecoder.of`` and keep
transformers' forward (with ``slot_attention``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

SUPPORTED = ("llama", "mistral", "qwen2")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


class Attention(Protocol):
    """Attention of layer ``layer`` over the packed queries ``q`` (T, heads, hd) with their
    keys and values ``kv`` (T, 2, kv_heads, hd); returns (T, heads, hd)."""

    def __call__(self, layer: int, q: Tensor, kv: Tensor, scaling: float) -> Tensor: ...


@dataclass
class _Layer:
    """One decoder layer's weights; each matrix is (in, out): ``x @ matrix``."""

    norm1: Tensor
    qkv: Tensor
    qkv_bias: Tensor | None
    o: Tensor
    o_bias: Tensor | None
    norm2: Tensor
    gate_up: Tensor
    down: Tensor


def _fuse(linears: list[nn.Linear], transposed: bool) -> tuple[Tensor, Tensor | None]:
    """One (in, out) matrix (and bias) for several linears (or one); the modules' weights
    then view into it, so nothing is stored twice and transformers' forward still works.

    ``transposed``: the matrix is stored (in, out), which MKL multiplies ~1.4x faster than
    transformers' (out, in) at a few rows (CPU); else it is a transposed view of (out, in).
    """
    weight = torch.cat([m.weight.data for m in linears])
    biases = [m.bias.data for m in linears if m.bias is not None]
    bias = torch.cat(biases) if biases else None
    matrix = weight.t().contiguous() if transposed else weight.t()
    row = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight.data = matrix[:, row : row + rows].t()
        if m.bias is not None and bias is not None:
            m.bias.data = bias[row : row + rows]
        row += rows
    return matrix, bias


class LeanDecoder:
    def __init__(self, model: PreTrainedModel, max_positions: int) -> None:
        config = model.config
        decoder = model.model
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.scaling = self.head_dim**-0.5
        transposed = decoder.embed_tokens.weight.device.type == "cpu"
        # The output embedding, (hidden, vocab); a tied input embedding views into it.
        head = model.get_output_embeddings()
        assert isinstance(head, nn.Linear)  # checked by of()
        self.lm_head, _ = _fuse([head], transposed)
        self.embed = decoder.embed_tokens.weight
        self.norm = decoder.norm.weight
        self.layers = []
        for layer in decoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv, qkv_bias = _fuse([attn.q_proj, attn.k_proj, attn.v_proj], transposed)
            o, o_bias = _fuse([attn.o_proj], transposed)
            gate_up, _ = _fuse([mlp.gate_proj, mlp.up_proj], transposed)
            down, _ = _fuse([mlp.down_proj], transposed)
            self.layers.append(
                _Layer(
                    layer.input_layernorm.weight, qkv, qkv_bias, o, o_bias,
                    layer.post_attention_layernorm.weight, gate_up, down,
                )
            )  # fmt: skip
        self.rotary = decoder.rotary_emb
        half = self.head_dim // 2
        device = self.embed.device
        # rotate_half(x) * sin == x[perm] * signed_sin: one gather instead of a negation and a cat.
        self._perm = torch.cat([torch.arange(half, self.head_dim), torch.arange(half)]).to(device)
        self._sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(device)
        # RoPE types whose frequencies never change get a table of every position, computed
        # once by the model's own rotary module; the others (dynamic, longrope) ask it per step.
        self._table: Tensor | None = None  # (positions, 2, head_dim): cos, signed sin
        if getattr(self.rotary, "rope_type", "default") in STATIC_ROPE:
            positions = torch.arange(max_positions, device=device)[None]
            cos, sin = self.rotary(self.embed[:1][None], positions)
            self._table = torch.stack([cos[0], sin[0] * self._sign], dim=1)

    @classmethod
    def of(cls, model: PreTrainedModel, max_positions: int) -> LeanDecoder | None:
        """The lean forward for ``model``, or None when it is not a plain Llama-family one."""
        config = model.config
        inner = getattr(model, "model", None)
        plain = (
            config.model_type in SUPPORTED
            and getattr(config, "hidden_act", "") == "silu"
            and not getattr(config, "mlp_bias", False)
            and inner is not None
            and isinstance(model.get_output_embeddings(), nn.Linear)
            and all(
                type(layer.self_attn).__name__.endswith("Attention")
                and not hasattr(layer.self_attn, "q_norm")
                and type(layer.input_layernorm).__name__.endswith("RMSNorm")
                for layer in inner.layers
            )
        )
        return cls(model, max_positions) if plain else None

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, signed sin) at ``positions``, each (T, 1, head_dim)."""
        if self._table is not None:
            both = self._table.index_select(0, positions)
            return both[:, :1], both[:, 1:]
        cos, sin = self.rotary(self.embed[:1][None], positions[None])
        return cos[0][:, None], (sin[0] * self._sign)[:, None]

    def forward(
        self, ids: Tensor, positions: Tensor, keep: Tensor | None, attention: Attention
    ) -> Tensor:
        """Next-token logits at the packed positions ``keep`` (None: all): (len(keep), vocab)."""
        x = F.embedding(ids, self.embed)  # (T, hidden)
        cos, sin = self.rope(positions)
        tokens, width = x.shape
        heads, kv_heads, hd = self.heads, self.kv_heads, self.head_dim
        q_size, kv_size = heads * hd, kv_heads * hd
        for index, layer in enumerate(self.layers):
            h = torch.rms_norm(x, (width,), layer.norm1, self.eps)
            if layer.qkv_bias is None:
                qkv = torch.mm(h, layer.qkv)
            else:
                qkv = torch.addmm(layer.qkv_bias, h, layer.qkv)
            # RoPE on the queries and keys at once, in place: x * cos + rotate_half(x) * sin.
            qk = qkv[:, : q_size + kv_size].view(tokens, heads + kv_heads, hd)
            torch.addcmul(qk * cos, qk.index_select(-1, self._perm), sin, out=qk)
            kv = qkv[:, q_size:].view(tokens, 2, kv_heads, hd)
            q = qkv[:, :q_size].view(tokens, heads, hd)
            out = attention(index, q, kv, self.scaling)
            if layer.o_bias is not None:
                x = x + layer.o_bias
            x = torch.addmm(x, out.reshape(tokens, q_size), layer.o)  # the residual added in
            h = torch.rms_norm(x, (width,), layer.norm2, self.eps)
            gate, up = torch.mm(h, layer.gate_up).chunk(2, dim=-1)
            x = torch.addmm(x, F.silu(gate).mul_(up), layer.down)
        if keep is not None:
            x = x.index_select(0, keep)
        x = torch.rms_norm(x, (width,), self.norm, self.eps)
        return torch.mm(x, self.lm_head)

"""A lean forward pass for Llama-family decoders (Llama, Mistral, Qwen2), on their own weights.

transformers' forward is written for every use (training, caches, hooks, output records); for
one packed decode step of a small model on CPU its Python overhead costs as much as the
arithmetic. This runs the same computation with the fewest operations: the q/k/v and the
gate/up projections fused (the modules' weights become views into the fused tensors, so
nothing is stored twice and transformers' own forward still works), fused RMSNorm, RoPE from
the model's own rotary module (every rope scaling type), and attention over the slot cache.
Models it does not recognise exactly return None from ``LeanDecoder.of`` and keep
transformers' forward (with ``slot_attention``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

SUPPORTED = ("llama", "mistral", "qwen2")
Attention = Callable[[int, Tensor, Tensor, Tensor, float], Tensor]


@dataclass
class _Layer:
    norm1: Tensor
    qkv: Tensor
    qkv_bias: Tensor | None
    o: Tensor
    o_bias: Tensor | None
    norm2: Tensor
    gate_up: Tensor
    down: Tensor


def _fuse(linears: list[nn.Linear]) -> tuple[Tensor, Tensor | None]:
    """One weight (and bias) for several linears; the modules then view into it."""
    weight = torch.cat([m.weight.data for m in linears])
    bias = None
    if linears[0].bias is not None:
        bias = torch.cat([m.bias.data for m in linears])  # type: ignore[union-attr]
    row = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight.data = weight[row : row + rows]
        if bias is not None:
            m.bias.data = bias[row : row + rows]  # type: ignore[union-attr]
        row += rows
    return weight, bias


class LeanDecoder:
    def __init__(self, model: PreTrainedModel) -> None:
        config = model.config
        decoder = model.model
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.scaling = self.head_dim**-0.5
        self.embed = decoder.embed_tokens.weight
        self.rotary = decoder.rotary_emb
        self.norm = decoder.norm.weight
        self.lm_head = model.get_output_embeddings().weight
        self.layers = []
        for layer in decoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv, qkv_bias = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
            gate_up, _ = _fuse([mlp.gate_proj, mlp.up_proj])
            self.layers.append(
                _Layer(
                    layer.input_layernorm.weight, qkv, qkv_bias, attn.o_proj.weight,
                    attn.o_proj.bias, layer.post_attention_layernorm.weight, gate_up,
                    mlp.down_proj.weight,
                )
            )  # fmt: skip

    @classmethod
    def of(cls, model: PreTrainedModel) -> LeanDecoder | None:
        """The lean forward for ``model``, or None when it is not a plain Llama-family one."""
        config = model.config
        inner = getattr(model, "model", None)
        plain = (
            config.model_type in SUPPORTED
            and getattr(config, "hidden_act", "") == "silu"
            and not getattr(config, "mlp_bias", False)
            and inner is not None
            and all(
                type(layer.self_attn).__name__.endswith("Attention")
                and not hasattr(layer.self_attn, "q_norm")
                and type(layer.input_layernorm).__name__.endswith("RMSNorm")
                for layer in inner.layers
            )
        )
        return cls(model) if plain else None

    def forward(self, ids: Tensor, positions: Tensor, keep: Tensor, attention: Attention) -> Tensor:
        """Next-token logits at the packed positions ``keep``: (len(keep), vocab)."""
        x = F.embedding(ids, self.embed)  # (T, hidden)
        cos, sin = self.rotary(x[None], positions[None])
        cos, sin = cos[0, :, None], sin[0, :, None]  # (T, 1, hd)
        width = x.shape[-1]
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for index, layer in enumerate(self.layers):
            h = F.rms_norm(x, (width,), layer.norm1, self.eps)
            qkv = F.linear(h, layer.qkv, layer.qkv_bias)
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q = _rope(q.view(-1, self.heads, self.head_dim), cos, sin)
            k = _rope(k.view(-1, self.kv_heads, self.head_dim), cos, sin)
            out = attention(index, q, k, v.view(-1, self.kv_heads, self.head_dim), self.scaling)
            x = x + F.linear(out.reshape(-1, q_size), layer.o, layer.o_bias)
            h = F.rms_norm(x, (width,), layer.norm2, self.eps)
            gate, up = F.linear(h, layer.gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.down)
        x = F.rms_norm(x.index_select(0, keep), (width,), self.norm, self.eps)
        return F.linear(x, self.lm_head)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin

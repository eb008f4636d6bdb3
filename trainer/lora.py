"""LoRA (peft) for SFT and PPO-ptx rounds: train small adapters, publish merged weights.

With ``lora.enabled`` a round trains low-rank adapters (rank ``lora.rank``, scale
``alpha / rank``) on the linear layers named in ``lora.target_modules`` and freezes the rest:

* **the reference is the base**: a PPO-ptx round's policy is the lineage's SFT reference
  with adapters; the KL penalty, the KL gate and the win rate read that same model with its
  adapters disabled (``AdaptersOff``), so the reference costs no memory at all. The adapters
  carry the lineage's progress across rounds and restarts (``trainer.state``).
* **the value network** is its own copy of the reward model's trunk with adapters and a
  trainable head (the frozen RM is a separate copy). Sharing the RM's trunk would need the
  trunk twice in one forward pass (value head with adapters, reward head without); sharing
  the policy's trunk would tie the value loss to the policy's weights. Neither is done.
* **published checkpoints are merged weights** (``merged_state``: W + alpha/rank * B A, the
  same as peft's ``merge_and_unload``), in the same format as full fine-tuning, so the
  servers and hot swap are unchanged. The model itself is never merged in place: merging and
  unmerging in fp32 would drift the frozen base, i.e. the reference.
* an SFT round starts fresh adapters on the lineage reference; its merged output is the next
  lineage's reference (``trainer.registry``).
* the EMA of the weights (``ppo.ema_decay``) is not kept: an average of the factors B and A
  is not an average of the weights B A, so LoRA needs ``ppo.ema_decay`` 0 (config check).
* RM rounds train every weight (the RM gets no adapters).

A PPO-ptx round whose latest policy is not its reference plus saved adapters (e.g. the
previous round trained without LoRA) puts fresh adapters on that policy and loads the
reference as a separate frozen copy, and says so in the log.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn

from rlhf.config import option

ADAPTER = "default"


@dataclass(frozen=True)
class LoRAConfig:
    enabled: bool = option(
        False, "train LoRA adapters in SFT and PPO-ptx rounds instead of every weight"
    )
    rank: int = option(16, "rank r of each adapter")
    alpha: float = option(32.0, "adapter scale numerator: the update is alpha / rank * B A")
    target_modules: tuple[str, ...] = option(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        "names of the linear layers that get adapters (Llama / Qwen2 names)",
    )

    def __post_init__(self) -> None:
        if self.rank <= 0 or self.alpha <= 0:
            raise ValueError("lora.rank and lora.alpha must be > 0")
        if not self.target_modules:
            raise ValueError("lora.target_modules must name at least one layer")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def peft_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,  # type: ignore[arg-type]  # peft accepts a float
            lora_dropout=0.0,  # rollouts' log-probs must be the ones PPO's ratio starts from
            target_modules=list(self.target_modules),
            bias="none",
        )


def add_adapters(model: nn.Module, cfg: LoRAConfig, seed: int = 0) -> Any:
    """``model`` with fresh adapters (B = 0, so it computes exactly what it did) and every
    other weight frozen. A's random initialisation comes from ``seed`` alone: every rank of a
    job (and a job of any size) starts from the same adapters."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, cfg.peft_config())  # type: ignore[arg-type]


def is_adapter_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def adapter_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The adapter tensors of a (gathered) state dict of a model with adapters."""
    return {k: v for k, v in state.items() if is_adapter_key(k)}


def load_adapters(model: nn.Module, adapters: Mapping[str, Tensor]) -> None:
    """Loads saved adapter tensors into a model that has adapters (before sharding)."""
    own = model.state_dict()
    missing = [k for k in adapters if k not in own]
    if missing:
        raise ValueError(f"saved adapters do not fit this model: {missing[:3]}")
    with torch.no_grad():
        for key, value in adapters.items():
            own[key].copy_(value)


def merged_state(state: Mapping[str, Tensor], cfg: LoRAConfig) -> dict[str, Tensor]:
    """The plain model's state dict from a (gathered) state dict of ``add_adapters``'s
    model: adapter-free names, W + alpha/rank * B A in each adapted layer."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if is_adapter_key(key):
            continue
        name = key.removeprefix("base_model.model.")
        if ".base_layer." in key:
            layer, param = key.rsplit(".base_layer.", 1)
            if param == "weight":
                a = state[f"{layer}.lora_A.{ADAPTER}.weight"].float()
                b = state[f"{layer}.lora_B.{ADAPTER}.weight"].float()
                value = (value.float() + cfg.scaling * (b @ a)).to(value.dtype)
            name = name.replace(".base_layer.", ".")
        out[name] = value
    return out


def base_model(model: Any) -> Any:
    """The model under the adapters (what save_pretrained of merged weights is called on)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


class AdaptersOff:
    """A model with adapters, seen with them disabled: the frozen base, used where the
    rounds use a reference policy (forward passes, sampling, evaluation)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.model.disable_adapter():
            return self.model(*args, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.device  # type: ignore[no-any-return]

    @property
    def generation_config(self) -> Any:
        return self.model.generation_config

    @property
    def config(self) -> Any:
        return self.model.config

    def eval(self) -> AdaptersOff:
        return self

    def requires_grad_(self, requires_grad: bool = True) -> AdaptersOff:
        return self  # the base is frozen already; the adapters are the policy's

"""Model building and loading for every process: the policy server, the reward server and the
trainer.

One code path serves the test models and any Hugging Face causal-LM directory (or hub id):

    build_tiny(out_dir, seed=0, size="tiny", tokenizer="byte") -> Path
        A deterministic policy from a config plus a tokenizer that needs no download, written
        as a normal HF directory (model.safetensors, config.json, tokenizer files). Two
        families (`rlhf.tokenizer`): "byte", a Llama over a byte-level tokenizer (fast, the
        demo's default), and "bpe", a Qwen2-shaped model (grouped-query attention, RoPE,
        head_dim >= 32) over a locally trained byte-level BPE with a ChatML chat template,
        which behaves like a real chat model.
    load_policy(path, device="cpu", dtype=None) -> (model, tokenizer)
        AutoModelForCausalLM + AutoTokenizer, eval mode; bf16 on CUDA, fp32 on CPU by default.
        The trainer passes dtype=torch.float32 (master weights; compute under `autocast`).
    RewardModel(trunk, bias=0.0)
        LM trunk (AutoModel, no unembedding) + scalar head on the last non-pad token.
        forward(input_ids, attention_mask) -> (B,) normalised reward = raw + bias
        raw(input_ids, attention_mask) -> (B,);  per_token(...) -> (B, T) head at every position
        save(dir, tokenizer, dtype=None);  bias is a saved buffer set after training so
        demonstrations average 0.
    load_reward_model(path, device="cpu", dtype=None) -> (RewardModel, tokenizer)
    reward_model_from_policy(policy_dir, device="cpu", dtype=None) -> (RewardModel, tokenizer)
        The paper initialises the RM from the SFT model; the head starts at zero weight.
    score(rm, tok, spec, prompts, responses) -> (B,) normalised rewards on CPU, one pass,
        encoded by `rlhf.encoding` as in training.
    save_policy(model, tok, out_dir, dtype=None)   save_pretrained, optionally cast (a copy)
    autocast(device) -> context manager: bf16 autocast on CUDA, nothing on CPU (training).

Text to token ids: `rlhf.encoding` (one encoding for serving, scoring and training).

`rlhf model init --out DIR [--seed N] [--size tiny|small|0.5b] [--tokenizer byte|bpe]` writes
DIR/policy and DIR/reward (the reward model initialised from that policy); `rlhf model info
PATH` prints what a directory holds, with the encoding it is served with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rlhf import encoding
from rlhf.config import option, parse_config
from rlhf.encoding import EncodingSpec, Prompt
from rlhf.tokenizer import bpe_tokenizer, byte_tokenizer, load_tokenizer, save_tokenizer

REWARD_HEAD_FILE = "reward_head.safetensors"
REWARD_META_FILE = "reward_model.json"
FAMILIES = ("byte", "bpe")

# Sizes for `build_tiny`: "tiny" for tests and the demo, "small" for CPU benchmarks, "0.5b" for
# GPU benchmarks (Qwen2-0.5B's trunk shape; the small vocabularies keep the embedding small).
# The byte family is a Llama with full multi-head attention at tiny size; the BPE family is a
# Qwen2 with grouped-query attention (fewer KV heads than heads) and head_dim >= 32 at every size.
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "byte": {
        "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4),
        "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8),
        "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2),
    },
    "bpe": {
        "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=32),
        "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=32),
        "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, head_dim=64),
    },
}  # fmt: skip
SIZE_NAMES = tuple(SIZES["byte"])


# --------------------------------------------------------------------------- policy


def _new_model(family: str, size: str, tok: PreTrainedTokenizerBase) -> PreTrainedModel:
    special = dict(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    if family == "byte":
        return LlamaForCausalLM(
            LlamaConfig(max_position_embeddings=2048, **special, **SIZES[family][size])
        )
    config = Qwen2Config(
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        use_sliding_window=False,  # the serving engine needs full-attention KV caches
        **special,
        **SIZES[family][size],
    )
    return Qwen2ForCausalLM(config)


def build_tiny(
    out_dir: str | Path, seed: int = 0, size: str = "tiny", tokenizer: str = "byte"
) -> Path:
    """Writes a randomly initialised (seeded, deterministic) policy and its tokenizer."""
    if tokenizer not in FAMILIES:
        raise ValueError(f"tokenizer must be one of {', '.join(FAMILIES)}, got {tokenizer!r}")
    if size not in SIZES[tokenizer]:
        raise ValueError(f"size must be one of {', '.join(SIZE_NAMES)}, got {size!r}")
    out = Path(out_dir)
    tok = byte_tokenizer() if tokenizer == "byte" else bpe_tokenizer()
    # Seed a private generator state so building a model does not disturb the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _new_model(tokenizer, size, tok)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    save_tokenizer(tok, out)
    return out


def save_policy(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    state_dict: dict[str, Tensor] | None = None,
) -> Path:
    """save_pretrained of the model (cast to `dtype` on the way out, the model itself is left
    as it is: the trainer keeps fp32 master weights) and its tokenizer. `state_dict`: the
    weights to write instead of the model's own (gathered from shards, LoRA merged)."""
    out = Path(out_dir)
    _save_cast(model, out, dtype, state_dict)
    save_tokenizer(tok, out)
    return out


def _save_cast(
    model: PreTrainedModel,
    out: Path,
    dtype: torch.dtype | None,
    state: dict[str, Tensor] | None = None,
) -> None:
    if state is None and (dtype is None or dtype == model.dtype):
        model.save_pretrained(out)
        return
    state = model.state_dict() if state is None else state
    if dtype is not None:
        state = {k: v.detach().to(dtype) if v.is_floating_point() else v
                 for k, v in state.items()}  # fmt: skip
    model.save_pretrained(out, state_dict=state)
    if dtype is None:
        return
    # save_pretrained writes the model's own dtype; config.json must say what the weights are.
    config = json.loads((out / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def default_dtype(device: str | torch.device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_policy(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Any HF causal-LM directory or hub id -> (model in eval mode on `device`, tokenizer)."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or default_dtype(device))
    tok = load_tokenizer(path)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    # transformers' decorated `to` confuses type checkers; this is nn.Module.to.
    return model.to(device).eval(), tok  # type: ignore[arg-type]


# --------------------------------------------------------------------------- reward model


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last non-pad position per row; works for left and right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=1)


class RewardModel(nn.Module):
    """r(x, y): the LM trunk (no unembedding) and a linear head read at the last non-pad token.

    `bias` is a buffer (saved with the model) added to the raw score so that labeler
    demonstrations average 0 (PAPER.md, reward normalisation before RL). The head stays in fp32
    whatever the trunk's dtype, so rewards are comparable across devices.
    """

    bias: Tensor

    def __init__(self, trunk: PreTrainedModel, bias: float = 0.0) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(trunk.config.hidden_size, 1, dtype=torch.float32)
        # A zero head makes every reward 0 at init: no arbitrary preference before training.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("bias", torch.tensor(float(bias), dtype=torch.float32))

    def per_token(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Raw head output at every position, (B, T) fp32 (PPO's value model reads this)."""
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # Autocast would run the head in bf16 too; rewards are compared at the 1e-3 level.
        with torch.autocast(hidden.device.type, enabled=False):
            return self.head(hidden.float()).squeeze(-1)

    def raw(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Unnormalised reward at the last non-pad token, (B,)."""
        scores = self.per_token(input_ids, attention_mask)
        idx = last_token_index(attention_mask)
        return scores.gather(1, idx[:, None]).squeeze(1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.raw(input_ids, attention_mask) + self.bias

    def save(
        self,
        out_dir: str | Path,
        tokenizer: PreTrainedTokenizerBase | None = None,
        dtype: torch.dtype | None = None,
        state_dict: dict[str, Tensor] | None = None,
    ) -> Path:
        """The trunk as a HF directory (cast to `dtype` if given), the fp32 head, the bias.
        `state_dict`: this module's weights to write instead of its own (gathered shards)."""
        out = Path(out_dir)
        state = state_dict if state_dict is not None else self.state_dict()
        trunk = {k.removeprefix("trunk."): v for k, v in state.items() if k.startswith("trunk.")}
        _save_cast(self.trunk, out, dtype, trunk if state_dict is not None else None)
        if tokenizer is not None:
            save_tokenizer(tokenizer, out)
        head = {
            "head.weight": state["head.weight"].detach().float().cpu().contiguous(),
            "head.bias": state["head.bias"].detach().float().cpu().contiguous(),
            "bias": state["bias"].detach().float().cpu().reshape(1).contiguous(),
        }
        save_file(head, str(out / REWARD_HEAD_FILE))
        meta = {"kind": "reward_model", "head_file": REWARD_HEAD_FILE, "bias": float(head["bias"])}
        (out / REWARD_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return out


def is_reward_model_dir(path: str | Path) -> bool:
    return (Path(path) / REWARD_META_FILE).is_file()


def load_reward_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[RewardModel, PreTrainedTokenizerBase]:
    """A directory written by `RewardModel.save` -> (reward model in eval mode, tokenizer)."""
    path = Path(path)
    if not is_reward_model_dir(path):
        raise ValueError(f"{path} is not a reward model directory (no {REWARD_META_FILE})")
    trunk = AutoModel.from_pretrained(str(path), dtype=dtype or default_dtype(device))
    model = RewardModel(trunk)
    head = load_file(str(path / REWARD_HEAD_FILE))
    with torch.no_grad():
        model.head.weight.copy_(head["head.weight"])
        model.head.bias.copy_(head["head.bias"])
        model.bias.copy_(head["bias"].reshape(()))
    return model.to(device).eval(), load_tokenizer(path)


def reward_model_from_policy(
    policy_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[RewardModel, PreTrainedTokenizerBase]:
    """The RM initialised from a (SFT) policy's trunk, as in the paper; zero head, zero bias."""
    trunk = AutoModel.from_pretrained(str(policy_dir), dtype=dtype or default_dtype(device))
    return RewardModel(trunk).to(device).eval(), load_tokenizer(policy_dir)


# --------------------------------------------------------------------------- compute


def autocast(device: str | torch.device) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast on CUDA (weights stay fp32 for the optimizer); a no-op on CPU."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def score(
    model: RewardModel,
    tok: PreTrainedTokenizerBase,
    spec: EncodingSpec,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
) -> Tensor:
    """Normalised rewards (B,) on CPU for (prompt, response) texts, one forward pass."""
    device = model.head.weight.device
    batch = encoding.encode_pairs(tok, spec, prompts, responses).to(device)
    with autocast(device):
        return model(batch.input_ids, batch.attention_mask).float().cpu()


# --------------------------------------------------------------------------- CLI


@dataclasses.dataclass(frozen=True)
class InitConfig:
    out: str = option("models/tiny", "directory to write <out>/policy and <out>/reward into")
    seed: int = option(0, "seed for the random initialisation (same seed, same weights)")
    size: str = option("tiny", f"model size: {', '.join(SIZE_NAMES)}")
    tokenizer: str = option(
        "byte",
        "model family: byte (Llama, byte-level tokenizer, no chat template) or bpe (Qwen2 "
        "with grouped-query attention, a BPE tokenizer trained on data/, a ChatML template)",
    )

    def __post_init__(self) -> None:
        if self.size not in SIZE_NAMES:
            raise ValueError(f"--size must be one of {', '.join(SIZE_NAMES)}, got {self.size!r}")
        if self.tokenizer not in FAMILIES:
            raise ValueError(
                f"--tokenizer must be one of {', '.join(FAMILIES)}, got {self.tokenizer!r}"
            )


@dataclasses.dataclass(frozen=True)
class InfoConfig:
    path: str = option("models/tiny/policy", "model directory to describe")


def init_models(cfg: InitConfig) -> tuple[Path, Path]:
    """Writes <out>/policy (build_tiny) and <out>/reward (RM initialised from that policy)."""
    policy = build_tiny(
        Path(cfg.out) / "policy", seed=cfg.seed, size=cfg.size, tokenizer=cfg.tokenizer
    )
    rm, tok = reward_model_from_policy(policy)
    reward = rm.save(Path(cfg.out) / "reward", tok)
    return policy, reward


def describe(path: str | Path) -> dict[str, object]:
    """What `rlhf model info` prints: kind, architecture, size, vocabulary, manifest if any."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    info: dict[str, object] = {
        "path": str(path),
        "kind": "reward_model" if is_reward_model_dir(path) else "policy",
        "architectures": config.get("architectures"),
        "model_type": config.get("model_type"),
        "hidden_size": config.get("hidden_size"),
        "num_hidden_layers": config.get("num_hidden_layers"),
        "vocab_size": config.get("vocab_size"),
    }
    from safetensors import safe_open

    params = 0
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 - safe_open handles are not iterable
                params += _numel(st, key)
    info["parameters"] = params
    info["dtype"] = config.get("dtype") or config.get("torch_dtype")
    if is_reward_model_dir(path):
        info["bias"] = json.loads((path / REWARD_META_FILE).read_text()).get("bias")
    tok = load_tokenizer(path)
    info["tokenizer"] = {
        "vocabulary": len(tok),
        "bos": tok.bos_token,
        "eos": tok.eos_token,
        "pad": tok.pad_token,
        "chat_template": encoding.has_chat_template(tok),
    }
    manifest = path / "manifest.json"
    recorded = json.loads(manifest.read_text()) if manifest.is_file() else None
    # What a server loading this directory encodes with: the manifest's, else the default.
    info["encoding"] = encoding.spec_for_model(path, tok).to_dict()
    info["encoding_source"] = (
        "manifest" if recorded and recorded.get("encoding") is not None else "default"
    )
    if recorded is not None:
        info["manifest"] = recorded
    return info


def _numel(handle: object, key: str) -> int:
    n = 1
    for d in handle.get_slice(key).get_shape():  # type: ignore[attr-defined]
        n *= d
    return n


def main(argv: list[str]) -> int:
    usage = "usage: rlhf model {init,seed,info} [options]   (rlhf model init --help)"
    if not argv or argv[0] not in ("init", "seed", "info"):
        print(usage, file=sys.stderr)
        return 2
    if argv[0] == "seed":
        from rlhf import seed

        seed_cfg = parse_config(
            seed.SeedConfig,
            argv[1:],
            prog="rlhf model seed",
            description="Publish a base policy and reward model as the registry's first "
            "versions and announce them (idempotent: run it again after a failure).",
            env_prefix="RLHF_MODEL_",
        )
        return seed.main(seed_cfg)
    if argv[0] == "init":
        cfg = parse_config(
            InitConfig,
            argv[1:],
            prog="rlhf model init",
            description="Build the default policy and reward model from a config (no download).",
            env_prefix="RLHF_MODEL_",
        )
        policy, reward = init_models(cfg)
        print(json.dumps({"policy": str(policy), "reward": str(reward)}))
        return 0
    rest = argv[1:]
    if rest and not rest[0].startswith("-"):
        rest = ["--path", rest[0], *rest[1:]]
    info_cfg = parse_config(
        InfoConfig,
        rest,
        prog="rlhf model info",
        description="Describe a model directory (policy, reward model, checkpoint).",
        env_prefix="RLHF_MODEL_",
    )
    print(json.dumps(describe(info_cfg.path), indent=2))
    return 0

"""Model loading for every process: the policy server, the reward server and the trainer.

One code path serves the tiny test model and any Hugging Face causal-LM directory (or hub id):

    build_tiny(out_dir, seed=0, size="tiny") -> Path
        A deterministic policy from a config (Llama architecture) plus a byte-level tokenizer
        that needs no download, written as a normal HF directory (model.safetensors,
        config.json, tokenizer.json, tokenizer_config.json).
    load_policy(path, device="cpu", dtype=None) -> (model, tokenizer)
        AutoModelForCausalLM + AutoTokenizer, eval mode; bf16 on CUDA, fp32 on CPU by default.
    RewardModel(trunk, bias=0.0)
        LM trunk (AutoModel, no unembedding) + scalar head on the last non-pad token.
        forward(input_ids, attention_mask) -> (B,) normalised reward = raw + bias
        raw(input_ids, attention_mask) -> (B,);  per_token(...) -> (B, T) head at every position
        save(dir);  bias is a saved buffer set after training so demonstrations average 0.
    load_reward_model(path, device="cpu", dtype=None) -> (RewardModel, tokenizer)
    reward_model_from_policy(policy_dir, device="cpu", dtype=None) -> (RewardModel, tokenizer)
        The paper initialises the RM from the SFT model; the head starts at zero weight.
    encode_pairs(tokenizer, prompts, responses, ...) -> PairBatch
        prompt tokens (with the tokenizer's own special prefix, e.g. BOS) + response tokens + EOS,
        right-padded; `response_mask` marks the response tokens. Used by RM and policy scoring.
    encode_prompts(tokenizer, prompts, max_prompt_tokens) -> (input_ids, attention_mask)
        left-padded, for generation.
    encode_texts(tokenizer, texts, max_tokens) -> (input_ids, attention_mask)
        right-padded plain text (pretraining examples for the ptx loss).
    join_pairs(prompt_ids, response_ids, pad_id) -> PairBatch   the same, already tokenised
    pad(seqs, pad_id, side) -> (input_ids, attention_mask)
    score(rm, tokenizer, prompts, responses) -> (B,) normalised rewards on CPU, one pass
    load_tokenizer(path) -> tokenizer (pad token set to EOS where a model ships none)
    autocast(device) -> context manager: bf16 autocast on CUDA, nothing on CPU (training).

`rlhf model init --out DIR [--seed N] [--size tiny|small|0.5b]` writes DIR/policy and
DIR/reward (the reward model initialised from that policy); `rlhf model info PATH` prints
what a directory holds.
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
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from rlhf.config import option, parse_config

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
REWARD_HEAD_FILE = "reward_head.safetensors"
REWARD_META_FILE = "reward_model.json"

# Sizes for `build_tiny`: "tiny" for tests and the demo, "small" for CPU benchmarks, "0.5b" for
# GPU benchmarks (Qwen2-0.5B's trunk shape; the byte vocabulary keeps the embedding small).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4),
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=8),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2),
}  # fmt: skip


# --------------------------------------------------------------------------- tokenizer


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

    It has no merges, so it needs no training data and no download; it is saved as a normal
    tokenizer.json that AutoTokenizer loads like any real model's. Like Llama's tokenizer it
    prepends BOS when `add_special_tokens=True`.
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


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """AutoTokenizer, with a pad token guaranteed (real models often ship without one)."""
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# --------------------------------------------------------------------------- policy


def build_tiny(out_dir: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    """Writes a randomly initialised (seeded, deterministic) Llama policy + byte tokenizer."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    out = Path(out_dir)
    tok = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
        **SIZES[size],
    )
    # Seed a private generator state so building a model does not disturb the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


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

    def save(self, out_dir: str | Path, tokenizer: PreTrainedTokenizerBase | None = None) -> Path:
        out = Path(out_dir)
        self.trunk.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        head = {
            "head.weight": self.head.weight.detach().float().cpu().contiguous(),
            "head.bias": self.head.bias.detach().float().cpu().contiguous(),
            "bias": self.bias.detach().float().cpu().reshape(1).contiguous(),
        }
        save_file(head, str(out / REWARD_HEAD_FILE))
        meta = {"kind": "reward_model", "head_file": REWARD_HEAD_FILE, "bias": float(self.bias)}
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


# --------------------------------------------------------------------------- encoding


def pad(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[Tensor, Tensor]:
    """Token lists -> (input_ids, attention_mask) as long tensors, padded on `side`."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, span] = torch.tensor(list(s), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


@dataclasses.dataclass(frozen=True)
class PairBatch:
    """Right-padded prompt+response sequences. `response_mask` is 1 on response tokens
    (including the closing EOS), so token t's log-prob is read from logits at t-1."""

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor

    def to(self, device: str | torch.device) -> PairBatch:
        return PairBatch(*(t.to(device) for t in dataclasses.astuple(self)))


def prompt_tokens(tok: PreTrainedTokenizerBase, prompt: str, max_tokens: int) -> list[int]:
    """Prompt ids with the tokenizer's own prefix (BOS); a long prompt keeps its prefix and
    its END (the text nearest the response matters most)."""
    ids = list(tok(prompt, add_special_tokens=True)["input_ids"])
    if len(ids) <= max_tokens:
        return ids
    special = set(tok.all_special_ids)
    n_prefix = next((i for i, t in enumerate(ids) if t not in special), len(ids))
    return ids[:n_prefix] + ids[len(ids) - (max_tokens - n_prefix) :]


def response_tokens(tok: PreTrainedTokenizerBase, response: str, max_tokens: int) -> list[int]:
    """Response ids, truncated to `max_tokens - 1`, then EOS (an ended response)."""
    ids = tok(response, add_special_tokens=False)["input_ids"][: max_tokens - 1]
    return [*ids, tok.eos_token_id]


def join_pairs(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
) -> PairBatch:
    """Already-tokenised (prompt, response) pairs -> right-padded PairBatch."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    ids, mask = pad([[*p, *r] for p, r in zip(prompts, responses, strict=True)], pad_id)
    resp, _ = pad([[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses, strict=True)], 0)
    return PairBatch(ids, mask, resp)


def encode_pairs(
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_prompt_tokens: int = 256,
    max_response_tokens: int = 256,
) -> PairBatch:
    """(prompt, response) texts -> PairBatch: prompt tokens + response tokens + EOS."""
    return join_pairs(
        [prompt_tokens(tok, p, max_prompt_tokens) for p in prompts],
        [response_tokens(tok, r, max_response_tokens) for r in responses],
        tok.pad_token_id,
    )


def encode_prompts(
    tok: PreTrainedTokenizerBase, prompts: Sequence[str], max_prompt_tokens: int = 256
) -> tuple[Tensor, Tensor]:
    """Prompts -> left-padded (input_ids, attention_mask) for `model.generate`."""
    return pad(
        [prompt_tokens(tok, p, max_prompt_tokens) for p in prompts], tok.pad_token_id, "left"
    )


def encode_texts(
    tok: PreTrainedTokenizerBase, texts: Sequence[str], max_tokens: int = 256
) -> tuple[Tensor, Tensor]:
    """Plain texts (e.g. pretraining examples) -> right-padded (input_ids, attention_mask),
    each with the tokenizer's prefix and cut to its first `max_tokens` tokens."""
    ids = [list(tok(t, add_special_tokens=True)["input_ids"])[:max_tokens] for t in texts]
    return pad(ids, tok.pad_token_id)


def autocast(device: str | torch.device) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast on CUDA (weights stay fp32 for the optimizer); a no-op on CPU."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def score(
    model: RewardModel,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_prompt_tokens: int = 256,
    max_response_tokens: int = 256,
) -> Tensor:
    """Normalised rewards (B,) on CPU for (prompt, response) texts, one forward pass."""
    device = model.head.weight.device
    batch = encode_pairs(tok, prompts, responses, max_prompt_tokens, max_response_tokens)
    return model(batch.input_ids.to(device), batch.attention_mask.to(device)).float().cpu()


# --------------------------------------------------------------------------- CLI


@dataclasses.dataclass(frozen=True)
class InitConfig:
    out: str = option("models/tiny", "directory to write <out>/policy and <out>/reward into")
    seed: int = option(0, "seed for the random initialisation (same seed, same weights)")
    size: str = option("tiny", f"model size: {', '.join(SIZES)}")

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"--size must be one of {', '.join(SIZES)}, got {self.size!r}")


@dataclasses.dataclass(frozen=True)
class InfoConfig:
    path: str = option("models/tiny/policy", "model directory to describe")


@dataclasses.dataclass(frozen=True)
class SeedConfig:
    registry: str = option("registry", "checkpoint registry to seed")
    base: str = option(
        "models/tiny", "directory holding policy/ and reward/ (from `rlhf model init`)"
    )
    bootstrap_servers: str = option(
        "", "Kafka to announce the versions on (empty: servers find them in the registry)"
    )


def init_models(cfg: InitConfig) -> tuple[Path, Path]:
    """Writes <out>/policy (build_tiny) and <out>/reward (RM initialised from that policy)."""
    policy = build_tiny(Path(cfg.out) / "policy", seed=cfg.seed, size=cfg.size)
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
    if is_reward_model_dir(path):
        info["bias"] = json.loads((path / REWARD_META_FILE).read_text()).get("bias")
    manifest = path / "manifest.json"
    if manifest.is_file():
        info["manifest"] = json.loads(manifest.read_text())
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
        from rlhf import bus, lifecycle

        seed_cfg = parse_config(
            SeedConfig,
            argv[1:],
            prog="rlhf model seed",
            description="Publish a base policy and reward model as the registry's first versions.",
            env_prefix="RLHF_MODEL_",
        )
        producer = (
            bus.Producer(seed_cfg.bootstrap_servers, client_id="rlhf-seed")
            if seed_cfg.bootstrap_servers
            else None
        )
        try:
            seeded = lifecycle.seed_registry(Path(seed_cfg.registry), Path(seed_cfg.base), producer)
        finally:
            if producer is not None:
                producer.close()
        print(json.dumps({m.role: m.version for m in seeded}))
        return 0
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

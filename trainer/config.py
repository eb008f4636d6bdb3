"""The online trainer's configuration: one frozen dataclass, parsed once by ``rlhf train``.

Defaults follow the InstructGPT paper (``PAPER.md``) wherever the paper fixes a value
(beta 0.02, gamma_ptx 27.8, 8x pretraining examples per episode, clip 0.2, GAE gamma 1,
Adam betas (0.9, 0.95), EMA 0.992, 200 prompts per user, cosine decay to 10%). Batch sizes,
learning rates and epoch counts default to values that suit the tiny CPU model of the demo;
the paper's values for a 1.3B model are given in each field's help.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from rlhf.config import option, section
from rlhf.encoding import EncodingSpec, has_chat_template
from rlhf.streams import StreamsConfig
from trainer.distributed import DistributedConfig
from trainer.lora import LoRAConfig
from trainer.plan import MemoryConfig

_DEVICES = ("auto", "cpu", "cuda")


def _positive(**values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def _fraction(**values: float) -> None:
    for name, value in values.items():
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {value}")


def _betas(name: str, betas: tuple[float, ...]) -> None:
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"{name} must be two numbers in [0, 1), got {betas}")


@dataclass(frozen=True)
class SFTConfig:
    lr: float = option(1e-3, "peak learning rate (paper, 1.3B: 9.65e-6)")
    lr_final_ratio: float = option(0.1, "cosine decay ends at this fraction of lr (paper: 10%)")
    epochs: int = option(4, "passes over each round's new demonstrations (paper: 16)")
    batch_size: int = option(16, "demonstrations per optimizer step")
    ptx_coef: float = option(0.0, "weight of a pretraining LM loss mixed into SFT steps (0: off)")
    adam_betas: tuple[float, ...] = option((0.9, 0.95), "Adam beta1, beta2 (paper: 0.9, 0.95)")
    weight_decay: float = option(0.0, "AdamW weight decay")

    def __post_init__(self) -> None:
        _positive(lr=self.lr, epochs=self.epochs, batch_size=self.batch_size)
        _fraction(lr_final_ratio=self.lr_final_ratio)
        _betas("sft.adam_betas", self.adam_betas)
        if self.ptx_coef < 0:
            raise ValueError("sft.ptx_coef must be >= 0")


@dataclass(frozen=True)
class RMConfig:
    lr: float = option(1e-3, "peak learning rate, cosine schedule (paper, 6B: 9e-6)")
    lr_final_ratio: float = option(0.1, "cosine decay ends at this fraction of lr")
    epochs: int = option(
        3, "passes over each round's new comparisons (paper: 1; a tiny model needs more)"
    )
    batch_prompts: int = option(
        8,
        "ranked prompts per optimizer step, all C(K,2) pairs of one prompt in one element (paper: 64)",
    )
    adam_betas: tuple[float, ...] = option((0.9, 0.95), "Adam beta1, beta2")
    weight_decay: float = option(0.0, "AdamW weight decay")
    fit_bias: bool = option(
        True, "after training, shift the bias so demonstrations score mean 0 (paper)"
    )

    def __post_init__(self) -> None:
        _positive(lr=self.lr, epochs=self.epochs, batch_prompts=self.batch_prompts)
        _fraction(lr_final_ratio=self.lr_final_ratio)
        _betas("rm.adam_betas", self.adam_betas)


@dataclass(frozen=True)
class PPOConfig:
    episodes: int = option(64, "rollouts (prompt, response) per PPO round (paper: batch 512)")
    minibatch_size: int = option(16, "episodes per PPO minibatch (paper: 64)")
    inner_epochs: int = option(1, "passes over each rollout batch (paper: 1)")
    iterations: int = option(4, "rollout+update iterations per round")
    lr: float = option(3e-4, "constant learning rate after warm-up")
    warmup_iters: int = option(
        10, "linear warm-up length in optimizer steps (paper: 10 iterations)"
    )
    adam_betas: tuple[float, ...] = option((0.9, 0.95), "Adam beta1, beta2")
    beta: float = option(0.02, "per-token KL penalty to the SFT reference (paper: 0.02, fixed)")
    adaptive_kl: bool = option(
        False, "adapt beta towards kl_target (Ziegler et al.); the paper keeps it fixed"
    )
    kl_target: float = option(6.0, "target KL (nats per episode) of the adaptive controller")
    kl_horizon: int = option(10000, "horizon (episodes) of the adaptive controller")
    gamma_ptx: float = option(
        27.8, "pretraining loss coefficient gamma of PPO-ptx (paper: 27.8; 0 is plain PPO)"
    )
    ptx_ratio: int = option(8, "pretraining examples per RL episode (paper: 8)")
    clip: float = option(0.2, "PPO clip range for the policy ratio (paper: 0.2)")
    value_clip: float = option(0.2, "clip range of the value function update")
    vf_coef: float = option(0.5, "weight of the value loss")
    gae_lambda: float = option(0.95, "GAE lambda (paper does not state it; 0.95 is common)")
    gae_gamma: float = option(1.0, "GAE discount (paper: 1, no discount)")
    ema_decay: float = option(
        0.992, "EMA of policy weights, published instead of raw weights (paper: 0.992; 0: off)"
    )
    temperature: float = option(
        1.0,
        "sampling temperature of rollouts (paper: 1); PPO's log-probs, the KL penalty and the "
        "evaluation use the same temperature, so training stays on-policy",
    )
    missing_eos_penalty: float = option(
        0.0,
        "subtracted from the RM score of a rollout cut by max_new_tokens (no EOS; the RM only "
        "ever learnt from ended responses); 0: off (the paper does not say)",
    )
    max_new_tokens: int = option(
        32, "response length limit of rollouts (at most encoding.max_response_tokens)"
    )
    ptx_seq_len: int = option(64, "tokens per pretraining example")

    def __post_init__(self) -> None:
        _positive(
            episodes=self.episodes,
            minibatch_size=self.minibatch_size,
            inner_epochs=self.inner_epochs,
            iterations=self.iterations,
            lr=self.lr,
            clip=self.clip,
            temperature=self.temperature,
            max_new_tokens=self.max_new_tokens,
            ptx_seq_len=self.ptx_seq_len,
        )
        _betas("ppo.adam_betas", self.adam_betas)
        _fraction(gae_lambda=self.gae_lambda, gae_gamma=self.gae_gamma, ema_decay=self.ema_decay)
        if min(self.beta, self.gamma_ptx, self.ptx_ratio, self.warmup_iters,
               self.missing_eos_penalty) < 0:  # fmt: skip
            raise ValueError(
                "ppo.beta, ppo.gamma_ptx, ppo.ptx_ratio, ppo.warmup_iters and "
                "ppo.missing_eos_penalty must be >= 0"
            )
        if self.minibatch_size > self.episodes:
            raise ValueError("ppo.minibatch_size must be <= ppo.episodes")


@dataclass(frozen=True)
class EncodingConfig:
    """The one encoding of every SFT, RM and PPO-ptx example and gate (``rlhf.encoding``),
    written into each published checkpoint's manifest so servers encode as training did."""

    chat_template: str = option(
        "auto",
        "render prompts and conversations with the model's chat template: auto (when its "
        "tokenizer has one), on, off",
    )
    max_prompt_tokens: int = option(64, "longest prompt in tokens after rendering")
    max_response_tokens: int = option(128, "longest response in tokens, EOS included")
    truncation_side: str = option(
        "left", "a longer prompt loses its beginning (left: keeps the end) or its end (right)"
    )

    def __post_init__(self) -> None:
        if self.chat_template not in ("auto", "on", "off"):
            raise ValueError(
                f"encoding.chat_template must be auto, on or off, got {self.chat_template!r}"
            )
        # EncodingSpec validates the rest, with the same names.
        self.spec(chat_template=False)

    def spec(self, *, chat_template: bool) -> EncodingSpec:
        return EncodingSpec(
            chat_template=chat_template,
            max_prompt_tokens=self.max_prompt_tokens,
            max_response_tokens=self.max_response_tokens,
            truncation_side=self.truncation_side,
        )

    def resolve(self, tok: PreTrainedTokenizerBase) -> EncodingSpec:
        """The spec for a model with tokenizer ``tok`` (``auto`` follows its chat template)."""
        chat = has_chat_template(tok)
        if self.chat_template == "on" and not chat:
            raise ValueError("encoding.chat_template is on but the model's tokenizer has none")
        return self.spec(
            chat_template=chat if self.chat_template == "auto" else self.chat_template == "on"
        )


@dataclass(frozen=True)
class DataConfig:
    user_prompt_cap: int = option(200, "distinct prompts kept per user id (paper: 200)")
    near_dup_prefix_chars: int = option(
        64,
        "prompts sharing this many leading characters (case and spacing folded) are near-duplicates; 0 turns the check off",
    )
    max_per_prompt: int = option(
        16,
        "demonstrations, and comparisons, kept per prompt (near-duplicate key); more are "
        "dropped as prompt_cap (a flood on one popular prompt)",
    )
    max_demonstrations: int = option(
        20000,
        "bound of the pending train demonstrations (more wait in Kafka) and of each "
        "evaluation buffer",
    )
    max_comparisons: int = option(
        20000, "bound of the pending train comparisons and of each evaluation buffer"
    )
    max_prompts: int = option(
        20000, "bound of the pending served prompts and of the PPO prompt pool per split"
    )
    dedupe_window: int = option(
        200000, "event ids (and labelled contents) remembered for dedupe: the most recent ones"
    )
    user_window: int = option(
        100000, "users whose prompt count (user_prompt_cap) is remembered: the most recent ones"
    )
    prompt_window: int = option(
        200000,
        "prompt keys remembered for near-duplicates and max_per_prompt: the most recent ones",
    )
    poll_timeout_s: float = option(0.5, "longest wait of one Kafka poll")
    poll_max_records: int = option(500, "records per Kafka poll")
    session_timeout_s: float = option(
        45.0,
        "Kafka group session timeout: how long a killed trainer keeps its partitions before a "
        "restarted one gets them (the broker allows 6..1800 s by default)",
    )
    replay_on_start: bool = option(
        True,
        "on start, re-read each topic up to the resume offsets to rebuild evaluation buffers, dedupe and per-user state (nothing re-read is trained on)",
    )

    def __post_init__(self) -> None:
        _positive(
            user_prompt_cap=self.user_prompt_cap,
            max_per_prompt=self.max_per_prompt,
            dedupe_window=self.dedupe_window,
            user_window=self.user_window,
            prompt_window=self.prompt_window,
            max_demonstrations=self.max_demonstrations,
            max_comparisons=self.max_comparisons,
            max_prompts=self.max_prompts,
            poll_timeout_s=self.poll_timeout_s,
            poll_max_records=self.poll_max_records,
            session_timeout_s=self.session_timeout_s,
        )
        if self.near_dup_prefix_chars < 0:
            raise ValueError("data.near_dup_prefix_chars must be >= 0")


@dataclass(frozen=True)
class GatesConfig:
    enabled: bool = option(True, "evaluate and gate every round before publishing")
    rm_accuracy_margin: float = option(
        0.02,
        "a new RM may be at most this much less accurate on val comparisons than the previous one",
    )
    reward_tolerance: float = option(
        0.0, "the policy's mean RM reward on val prompts may drop at most this much"
    )
    kl_budget: float = option(
        10.0, "largest allowed mean KL (nats per response) of the policy to its SFT reference"
    )
    ptx_tolerance: float = option(
        0.05,
        "pretraining loss may rise at most this fraction over the previous policy's (alignment tax)",
    )
    sft_tolerance: float = option(
        0.05, "SFT rounds: val demonstration loss may rise at most this fraction"
    )
    min_val_comparisons: int = option(
        8,
        "RM gate needs at least this many val comparisons, otherwise the accuracy gate is skipped",
    )
    min_val_prompts: int = option(
        8,
        "policy gate needs at least this many val prompts, otherwise the reward/KL gates are skipped",
    )
    min_win_rate: float = option(
        0.5,
        "PPO-ptx rounds: the candidate must beat the lineage's SFT reference on at least this "
        "share of val prompts (one sample each, judged by the current RM, ties count half); 0: off",
    )
    eval_prompts: int = option(64, "val prompts used to evaluate a policy")
    eval_ptx_examples: int = option(
        32, "held-out pretraining examples used for the pretraining loss"
    )

    def __post_init__(self) -> None:
        _fraction(rm_accuracy_margin=self.rm_accuracy_margin, min_win_rate=self.min_win_rate)
        _positive(
            kl_budget=self.kl_budget,
            eval_prompts=self.eval_prompts,
            eval_ptx_examples=self.eval_ptx_examples,
        )
        if min(self.reward_tolerance, self.ptx_tolerance, self.sft_tolerance) < 0:
            raise ValueError("gate tolerances must be >= 0")


@dataclass(frozen=True)
class ScheduleConfig:
    sft_min_new: int = option(64, "new train demonstrations that start an SFT round")
    rm_min_new: int = option(64, "new train comparisons that start an RM round")
    ppo_min_new: int = option(64, "new train prompts that start a PPO-ptx round")
    interval_s: float = option(
        600.0,
        "a round of any type with at least one new record starts after this long without rounds",
    )
    ppo_needs_rm: bool = option(
        True, "PPO-ptx rounds wait until a reward model was trained from feedback"
    )
    max_rounds: int = option(
        0, "stop after this many rounds (passing or not); 0 runs until SIGTERM"
    )
    park_after_failures: int = option(
        3,
        "records in this many rounds held back by gates are parked: taken out of training "
        "(labelled ones written to <topic>.parked); 0 never parks",
    )
    error_backoff_s: float = option(
        10.0, "a round that failed with an error waits this long before its type runs again"
    )
    error_backoff_max_s: float = option(
        600.0, "the wait doubles with each error in a row, up to this"
    )

    def __post_init__(self) -> None:
        _positive(
            sft_min_new=self.sft_min_new,
            rm_min_new=self.rm_min_new,
            ppo_min_new=self.ppo_min_new,
            interval_s=self.interval_s,
            error_backoff_s=self.error_backoff_s,
            error_backoff_max_s=self.error_backoff_max_s,
        )
        if self.max_rounds < 0 or self.park_after_failures < 0:
            raise ValueError("schedule.max_rounds and schedule.park_after_failures must be >= 0")


@dataclass(frozen=True)
class TrainerConfig:
    bootstrap_servers: str = option("localhost:9092", "Kafka bootstrap servers")
    group_id: str = option("rlhf-trainer", "Kafka consumer group of the trainer")
    client_id: str = option("rlhf-trainer", "Kafka client id")
    auto_promote: bool = option(
        True,
        "follow each PUBLISHED model event with PROMOTED, so servers switch to a version that "
        "passed the gates at once; false leaves promotion to operators (rlhf admin)",
    )
    registry: Path = option(Path("registry"), "checkpoint registry directory")
    base_model: Path = option(
        Path("models/tiny"),
        "model directory (from `rlhf model init`) used when the registry has no policy or RM yet",
    )
    pretrain_corpus: Path = option(
        Path("data/pretrain.txt"),
        "pretraining text (.txt, or .jsonl with a 'text' field) for PPO-ptx and the alignment-tax gate",
    )
    ptx_holdout_fraction: float = option(
        0.1, "tail fraction of the corpus kept out of training for the pretraining-loss gate"
    )
    device: str = option(
        "auto", "auto | cpu | cuda (fp32 master weights and optimizer state, bf16 autocast on cuda)"
    )
    publish_dtype: str = option(
        "auto",
        "dtype of published weights: auto (bfloat16 on cuda, float32 on cpu), float32, bfloat16",
    )
    torch_threads: int = option(0, "torch CPU threads (0: torch default)")
    seed: int = option(0, "seed of all samplers and initialisations")
    metrics_port: int = option(9400, "port of the /metrics endpoint (0: no endpoint)")
    progress: str = option("auto", "progress bars: auto (when stderr is a terminal) | on | off")
    log_level: str = option("INFO", "logging level")
    encoding: EncodingConfig = section(
        EncodingConfig, "how examples become token ids (recorded in every manifest)"
    )
    streams: StreamsConfig = section(
        StreamsConfig, "topic names and splits, the same in every component", shared=True
    )
    sft: SFTConfig = section(SFTConfig, "supervised fine-tuning rounds")
    rm: RMConfig = section(RMConfig, "reward model rounds")
    ppo: PPOConfig = section(PPOConfig, "PPO-ptx rounds")
    data: DataConfig = section(DataConfig, "consumers and training buffers")
    gates: GatesConfig = section(GatesConfig, "evaluation gates before publishing")
    schedule: ScheduleConfig = section(ScheduleConfig, "when rounds start")
    distributed: DistributedConfig = section(
        DistributedConfig, "torchrun jobs: FSDP2 sharding of the models (trainer.distributed)"
    )
    memory: MemoryConfig = section(
        MemoryConfig, "memory levers and the memory plan a round must fit (trainer.plan)"
    )
    lora: LoRAConfig = section(
        LoRAConfig, "LoRA adapters for SFT and PPO-ptx rounds (trainer.lora)"
    )

    def __post_init__(self) -> None:
        if self.device not in _DEVICES:
            raise ValueError(f"device must be one of {_DEVICES}, got {self.device!r}")
        if self.progress not in ("auto", "on", "off"):
            raise ValueError(f"progress must be auto, on or off, got {self.progress!r}")
        if not 0 < self.ptx_holdout_fraction < 1:
            raise ValueError("ptx_holdout_fraction must be in (0, 1)")
        if self.torch_threads < 0 or not 0 <= self.metrics_port < 65536:
            raise ValueError("torch_threads must be >= 0 and metrics_port a port number")
        if self.publish_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(
                f"publish_dtype must be auto, float32 or bfloat16, got {self.publish_dtype!r}"
            )
        if self.lora.enabled and self.ppo.ema_decay > 0:
            raise ValueError(
                "lora.enabled needs ppo.ema_decay 0: an average of the LoRA factors is not an "
                "average of the weights (set --ppo.ema-decay 0)"
            )
        if self.ppo.max_new_tokens > self.encoding.max_response_tokens:
            raise ValueError(
                f"ppo.max_new_tokens ({self.ppo.max_new_tokens}) must be at most "
                f"encoding.max_response_tokens ({self.encoding.max_response_tokens})"
            )

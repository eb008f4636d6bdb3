"""What every round type shares: its context, the candidate it returns, and small helpers.

A round function (``run_sft_round``, ``run_rm_round``, ``run_ppo_round``) takes a
``RoundContext`` and its data as plain lists, trains one model and returns a ``Candidate``:
the model's ``save`` function, its metrics and the gate's verdict. It touches no Kafka, no
registry writes and no Prometheus metrics, and holds no process-global state (its random
numbers come from generators seeded per round), so the same function can later run on every
rank of a distributed job while rank 0 alone publishes (``trainer.rounds``).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm import tqdm

from rlhf.encoding import EncodingSpec, Prompt
from trainer import evaluate
from trainer import registry as registry_lib
from trainer.config import TrainerConfig
from trainer.corpus import PretrainCorpus
from trainer.data import Demonstration
from trainer.distributed import Dist, DistributedConfig
from trainer.gates import GateResult, PolicyEval

B = TypeVar("B")


class RoundAborted(Exception):
    """The trainer is stopping; the round's work is dropped (nothing was published)."""


@dataclass(frozen=True)
class Candidate:
    """A trained model, evaluated and gated, ready for the publish protocol."""

    role: str  # registry role: policy | reward
    # Writes the model files into a directory. Every rank calls it (gathering a sharded
    # model is a collective); rank 0 passes the directory, the others None.
    save: Callable[[Path | None], None]
    metrics: dict[str, float]  # the manifest's eval metrics
    gate: GateResult
    trained_ids: tuple[str, ...]  # event ids of the pending records it trained on
    kind: str  # the data kind it consumed: demonstrations | comparisons | prompts
    parent: str | None  # the version it was trained from (None: a base model)
    reference: str | None  # its lineage's KL reference; None: it starts a lineage itself
    # Writes the trainer state that the next round of its lineage continues from
    # (``trainer.state``); None when the round type carries none. Called like ``save``.
    save_state: Callable[[Path | None], None] | None = None


@dataclass
class RoundContext:
    """Everything a round needs besides its data; ``phases`` collects seconds per phase."""

    cfg: TrainerConfig
    corpus: PretrainCorpus
    device: str
    round_type: str
    # The one encoding of every example and gate (recorded in the manifest it publishes).
    spec: EncodingSpec
    # What the published weights are cast to; training keeps fp32 master weights.
    publish_dtype: torch.dtype
    round_index: int = 0  # rounds run before this one by this process (seeds the RNGs)
    stop: threading.Event = field(default_factory=threading.Event)
    phases: dict[str, float] = field(default_factory=dict)
    # This process's place in a torchrun job (world size 1 for a plain process).
    dist: Dist = field(default_factory=lambda: Dist(DistributedConfig()))

    # ------------------------------------------------------------------ models

    def place(self, model: Any, *, trainable: bool) -> Any:
        """A loaded model on this rank's device: sharded with FSDP2 when distributed,
        recomputing activations with ``memory.activation_checkpointing``."""
        if trainable and self.cfg.memory.activation_checkpointing:
            checkpoint_layers(model)
        return self.dist.shard(model, trainable=trainable)

    @property
    def load_device(self) -> str:
        """Where a model is loaded before ``place``: host memory when it will be sharded
        (FSDP2 moves one layer at a time to the device), else the device itself."""
        return "cpu" if self.dist.sharded else self.device

    def load_policy(self, path: Path, *, trainable: bool) -> tuple[Any, Any]:
        policy, tok = registry_lib.load_policy(path, self.load_device)
        if not trainable:
            policy.requires_grad_(False)
        return self.place(policy, trainable=trainable), tok

    def micro_batches(self, counts: Sequence[float]) -> list[tuple[list[int], float]]:
        """This rank's micro-batches of a global batch whose rows count ``counts`` towards
        its loss's mean (tokens, or prompts): (rows, weight). Summed over micro-batches and
        ranks, weight x micro-batch mean is the global batch's mean (FSDP2 averages over
        ranks, ``Dist.grad_scale``). An empty share is row 0 at weight 0."""
        total = float(sum(counts)) or 1.0
        out = []
        for rows in self.dist.micro_batches(len(counts), self.cfg.memory.grad_accumulation):
            if len(rows) == 0:
                out.append(([0], 0.0))
            else:
                share = sum(counts[i] for i in rows) / total
                out.append((list(rows), self.dist.grad_scale * share))
        return out

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.monotonic() - start

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise RoundAborted()

    def progress(self, total: int, desc: str) -> tqdm:
        show = {"on": True, "off": False}.get(self.cfg.progress, sys.stderr.isatty())
        return tqdm(total=total, desc=desc, disable=not show, leave=False)

    def policy_eval(
        self,
        policy: Any,
        reference: Any,
        rm: Any,
        tok: Any,
        *,
        prompts: Sequence[Prompt],
        demos: Sequence[Demonstration],
    ) -> tuple[PolicyEval, evaluate.Samples | None]:
        """The policy on held-out data: the numbers the policy gate compares, and the samples
        (when an RM scored them) for the win rate."""
        try:
            return self._policy_eval(policy, reference, rm, tok, prompts=prompts, demos=demos)
        finally:
            self.dist.reshard(policy, reference, *([rm] if rm is not None else []))

    def _policy_eval(
        self,
        policy: Any,
        reference: Any,
        rm: Any,
        tok: Any,
        *,
        prompts: Sequence[Prompt],
        demos: Sequence[Demonstration],
    ) -> tuple[PolicyEval, evaluate.Samples | None]:
        g, p = self.cfg.gates, self.cfg.ppo
        return evaluate.policy_eval(
            policy,
            reference,
            rm,
            tok,
            self.spec,
            prompts=prompts,
            ptx_texts=self.corpus.holdout_examples(g.eval_ptx_examples),
            demos=demos,
            max_new_tokens=p.max_new_tokens,
            temperature=p.temperature,
            ptx_tokens=p.ptx_seq_len,
            seed=self.cfg.seed,
            all_done=self.dist.all_done,
        )


def take(batch: B, rows: Sequence[int]) -> B:
    """Rows of a batch of tensors (a dataclass or a tuple of tensors)."""
    idx = torch.tensor(list(rows), dtype=torch.long)
    if isinstance(batch, tuple):
        return type(batch)(t[idx] for t in batch)  # type: ignore[return-value]
    fields = dataclasses.astuple(batch)  # type: ignore[call-overload]
    return type(batch)(*(t[idx.to(t.device)] for t in fields))


def checkpoint_layers(model: torch.nn.Module) -> None:
    """Activation checkpointing of every decoder layer (recomputed in the backward pass);
    the composable form keeps parameter names, so checkpoints load unchanged."""
    from torch.distributed._composable import checkpoint

    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            checkpoint(module)


def optimizer(
    params: Iterable[torch.nn.Parameter],
    lr: float,
    betas: Sequence[float],
    weight_decay: float = 0.0,
) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        list(params), lr=lr, betas=(betas[0], betas[1]), weight_decay=weight_decay
    )


def cosine_schedule(total_steps: int, final_ratio: float) -> Callable[[int], float]:
    """LR multiplier: cosine from 1 to ``final_ratio`` over ``total_steps`` (paper: to 10%)."""

    def factor(step: int) -> float:
        progress = min(1.0, step / max(1, total_steps))
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def prefixed(prefix: str, ev: PolicyEval) -> dict[str, float]:
    """A policy evaluation as manifest metrics (missing values left out)."""
    values = {
        "mean_reward": ev.mean_reward,
        "kl": ev.kl,
        "ptx_loss": ev.ptx_loss,
        "sft_loss": ev.sft_loss,
    }
    if ev.win is not None:
        values |= {
            "win_rate": ev.win.rate,
            "win_rate_low": ev.win.low,
            "win_rate_high": ev.win.high,
        }
    return {prefix + k: float(v) for k, v in values.items() if v is not None}

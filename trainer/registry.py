"""Which published models a round starts from, and the model event that announces a version.

Lineages. PPO's KL penalty and gate measure against a *fixed* reference (PAPER.md: the SFT
model), so drift is bounded from where the lineage started, not from the last round:

* an SFT (or initial, ``rlhf model seed``) policy starts a lineage and is its own reference;
* a PPO-ptx round continues the latest policy and keeps its lineage's reference;
* an SFT round continues the latest lineage's *reference*, never a PPO output (fine-tuning a
  PPO policy on demonstrations and calling it the new reference would let drift accumulate
  unbounded); its output starts a new lineage on purpose.

Every manifest names its lineage's reference (``Manifest.reference``). RM rounds continue
the latest trained reward model; the first one starts from the reference policy's trunk
(the paper) or else the initial RM. Initial models are the registry's "init" versions or the
output of ``rlhf model init`` in ``base_model`` (``<base>/policy``, ``<base>/reward``).

Precision. Models are loaded for training in fp32 whatever their published dtype
(``MASTER``): the optimizer updates fp32 master weights and keeps fp32 state, and compute runs
under bf16 autocast on CUDA (``models.autocast``). An Adam step at lr 1e-5 is about 1e-5 per
weight, far below bf16's resolution (2^-8 relative, ~1e-4 at a typical weight of 0.02), so
bf16 weights would not move. What is published is cast to ``publish_dtype`` on the way out.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import torch

from rlhf import bus, checkpoint, lifecycle, models
from rlhf.encoding import EncodingSpec
from rlhf.topics import Topic
from rlhf.v1 import events_pb2
from trainer.config import TrainerConfig

POLICY, REWARD = "policy", "reward"
MASTER = torch.float32
_PUBLISH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_EVENTS = uuid.UUID("3c1f6b1e-94a2-4a53-8f51-0d6f8a7e2c40")


def policy_dir(registry: Path, base: Path) -> Path:
    """The latest policy: where PPO-ptx rounds continue from."""
    return checkpoint.latest(registry, POLICY) or base / POLICY


def reference_of(registry: Path, policy: Path, base: Path) -> Path:
    """The fixed KL reference of ``policy``'s lineage (a registry version or a base model)."""
    if not (policy / checkpoint.MANIFEST).is_file():
        return policy  # a base model outside the registry starts its own lineage
    manifest = checkpoint.read_manifest(policy)
    if manifest.round_type in ("sft", "init"):
        return policy
    if manifest.reference:
        named = registry / POLICY / manifest.reference
        return named if named.is_dir() else Path(manifest.reference)
    # A manifest from before references were recorded: the SFT (or init) policy it descends from.
    versions = checkpoint.list_versions(registry, POLICY)
    older = versions[: versions.index(manifest.version)] if manifest.version in versions else []
    for version in reversed(older):
        path = registry / POLICY / version
        if checkpoint.read_manifest(path).round_type in ("sft", "init"):
            return path
    return base / POLICY


def reference_dir(registry: Path, base: Path) -> Path:
    """The reference of the latest lineage: where SFT rounds continue from, what PPO's KL
    penalty, the KL gate and the win rate measure against."""
    return reference_of(registry, policy_dir(registry, base), base)


def reference_name(registry: Path, reference: Path) -> str:
    """How a manifest names a reference: its version, or the path of a base model."""
    if reference.parent == registry / POLICY:
        return reference.name
    return str(reference.resolve())


def trained_rm(registry: Path) -> Path | None:
    """The latest reward model an RM round trained from feedback (not an initial one)."""
    for version in reversed(checkpoint.list_versions(registry, REWARD)):
        path = registry / REWARD / version
        if checkpoint.read_manifest(path).round_type == "rm":
            return path
    return None


def encoding_spec(cfg: TrainerConfig) -> EncodingSpec:
    """The trainer's one encoding: ``cfg.encoding`` resolved against the tokenizer of the
    policy rounds continue from (``auto`` follows its chat template)."""
    return cfg.encoding.resolve(models.load_tokenizer(policy_dir(cfg.registry, cfg.base_model)))


def publish_dtype(setting: str, device: str) -> torch.dtype:
    """``auto``: bf16 on CUDA (half the bytes to store and load; servers run bf16 there
    anyway), fp32 on CPU."""
    if setting == "auto":
        return models.default_dtype(device)
    return _PUBLISH_DTYPES[setting]


def load_policy(path: Path, device: str) -> tuple[Any, Any]:
    """A policy to train (or to train against): fp32 master weights on ``device``."""
    return models.load_policy(path, device, MASTER)


def load_rm(registry: Path, base: Path, device: str) -> tuple[models.RewardModel, Any]:
    """The RM a round starts from (fp32 master weights): the latest trained one; before any,
    the paper's initialisation from the SFT policy's trunk; without an SFT policy, the
    initial RM."""
    trained = trained_rm(registry)
    if trained is not None:
        return models.load_reward_model(trained, device, MASTER)
    reference = reference_dir(registry, base)
    if (reference / checkpoint.MANIFEST).is_file() and checkpoint.read_manifest(
        reference
    ).round_type == "sft":
        return models.reward_model_from_policy(reference, device, MASTER)
    initial = checkpoint.latest(registry, REWARD) or base / REWARD
    return models.load_reward_model(initial, device, MASTER)


def announcements(
    manifest: checkpoint.Manifest, path: Path, *, auto_promote: bool
) -> list[events_pb2.ModelEvent]:
    """PUBLISHED (and PROMOTED when auto-promoting) for a new version.

    Event ids derive from the version, so re-announcing after a restart repeats the same
    events, which followers apply once: a restart never re-promotes a rolled-back version.
    """
    events = lifecycle.published_events(
        manifest, path.resolve(), auto_promote=auto_promote, actor="trainer"
    )
    for event in events:
        kind = events_pb2.ModelEventKind.Name(event.kind)
        event.event_id = uuid.uuid5(_EVENTS, f"{kind}:{manifest.version}").hex
        event.created_at_ms = manifest.created_at_ms
    return events


def announced_event_ids(
    bootstrap_servers: str, topic: Topic, *, client_id: str, timeout_s: float = 60.0
) -> set[str]:
    """Ids of the events on the models topic, read to its end (it is small and compacted)."""
    consumer = bus.Consumer(
        bootstrap_servers, [topic], group_id=f"{client_id}-models-{uuid.uuid4().hex[:8]}",
        client_id=client_id,
    )  # fmt: skip
    ids: set[str] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ids |= {r.value.event_id for r in consumer.poll(timeout_s=0.5)}  # type: ignore[attr-defined]
            positions = consumer.positions()
            ends = consumer.end_offsets() if positions else {}
            if positions and all(positions.get(k, 0) >= end for k, end in ends.items()):
                return ids
    finally:
        consumer.close()
    raise TimeoutError(f"could not read {topic.name} to its end in {timeout_s}s")

"""PPO-ptx trainer state, carried across rounds and restarts beside the checkpoint.

A PPO-ptx round publishes the policy that serves (the EMA of the weights when
``ppo.ema_decay`` > 0, else the raw weights). What the next round needs to continue exactly
where this one stopped is kept beside it, under the same version name:

    <registry>/trainer_state/<policy version>/
        state.json      lineage reference, KL coefficient beta, optimizer steps taken
        policy/         the raw policy weights (only when the published weights are an EMA)
        value/          the value network (a reward model; initialised from the RM)
        optimizer.pt    AdamW state of the policy and value parameters, by parameter name
                        (``torch.distributed.checkpoint``'s full optimizer state dict: any
                        world size loads it, whatever world size wrote it)
    with LoRA (``trainer.lora``) instead of policy/ and value/:
        policy_adapters.pt  the policy's adapters (its base is the lineage reference)
        value_adapters.pt   the value network's adapters, head and bias (its base: the RM
                            named ``value_base`` in state.json)
        manifest.json   sha256 of every file (``rlhf.checkpoint``)

It is written with ``rlhf.checkpoint.publish`` (staging directory, fsync, rename), *before*
the policy version itself, so a published PPO policy always has its state complete, and a
state whose policy was never published (a crash in between) is an orphan that
``remove_orphans`` deletes on start. A state that fails its checksums is ignored with a
warning: the round then starts fresh from the published weights, as a new lineage's first
PPO round does. Only the latest policy's state is kept.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from rlhf import checkpoint

log = logging.getLogger(__name__)

ROLE = "trainer_state"
STATE_FILE = "state.json"
POLICY_DIR = "policy"
VALUE_DIR = "value"
OPTIMIZER_FILE = "optimizer.pt"
POLICY_ADAPTERS = "policy_adapters.pt"
VALUE_ADAPTERS = "value_adapters.pt"


@dataclasses.dataclass(frozen=True)
class SavedState:
    """A verified trainer state on disk."""

    path: Path
    reference: str  # the lineage's KL reference (as manifests name it)
    beta: float  # KL coefficient (changes only with the adaptive controller)
    steps: int  # optimizer steps taken in this lineage (the warm-up counts these)
    lora: bool = False  # adapters (``trainer.lora``) rather than whole weights
    value_base: str = ""  # with LoRA: the reward model the value adapters sit on

    @property
    def raw_policy(self) -> Path | None:
        path = self.path / POLICY_DIR
        return path if path.is_dir() else None

    @property
    def value(self) -> Path:
        return self.path / VALUE_DIR

    @property
    def optimizer(self) -> Path:
        return self.path / OPTIMIZER_FILE


def write_info(
    out: Path, *, reference: str, beta: float, steps: int, lora: bool = False,
    value_base: str = "",
) -> None:  # fmt: skip
    info = {"reference": reference, "beta": beta, "steps": steps, "lora": lora,
            "value_base": value_base}  # fmt: skip
    (out / STATE_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def load(registry: Path, policy_version: str) -> SavedState | None:
    """The verified state beside ``policy_version``, or None (none, or damaged: logged)."""
    path = registry / ROLE / policy_version
    if not path.is_dir():
        return None
    try:
        checkpoint.verify(path)
        info = json.loads((path / STATE_FILE).read_text())
        return SavedState(
            path, str(info["reference"]), float(info["beta"]), int(info["steps"]),
            lora=bool(info.get("lora", False)), value_base=str(info.get("value_base", "")),
        )  # fmt: skip
    except (checkpoint.CheckpointError, OSError, ValueError, KeyError) as exc:
        log.warning("ignoring the trainer state of %s (%s): starting fresh", policy_version, exc)
        return None


def publish(registry: Path, staged: Path, policy_version: str, round_type: str) -> None:
    """Moves a staged state into place under the name the policy is about to get."""
    checkpoint.publish(registry, ROLE, staged, round_type=round_type, version=policy_version)


def _remove(registry: Path, path: Path) -> None:
    # Rename first (atomic): a crash mid-delete leaves a staging directory, never a state
    # that lists but is incomplete; start-up removes staging directories.
    doomed = registry / f"{checkpoint.STAGING_PREFIX}{uuid.uuid4().hex}"
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def prune(registry: Path, keep: str) -> None:
    """Deletes every state but ``keep``'s (only the latest policy's state is ever read)."""
    for version in checkpoint.list_versions(registry, ROLE):
        if version != keep:
            _remove(registry, registry / ROLE / version)


def remove_orphans(registry: Path, policy_versions: set[str]) -> list[str]:
    """Deletes states whose policy was never published (a crash between the two renames)."""
    orphans = [v for v in checkpoint.list_versions(registry, ROLE) if v not in policy_versions]
    for version in orphans:
        _remove(registry, registry / ROLE / version)
    return orphans

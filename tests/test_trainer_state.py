"""The PPO trainer state beside a checkpoint: published atomically under the policy's version,
verified on load (a damaged one is ignored, never half-used), orphans and old states removed."""

from __future__ import annotations

from pathlib import Path

from rlhf import checkpoint
from trainer import state as state_lib


def publish_state(registry: Path, version: str, beta: float = 0.02) -> Path:
    with checkpoint.staging(registry) as tmp:
        (tmp / state_lib.VALUE_DIR).mkdir()
        (tmp / state_lib.VALUE_DIR / "model.safetensors").write_bytes(b"value weights")
        (tmp / state_lib.OPTIMIZER_FILE).write_bytes(b"adam moments")
        state_lib.write_info(tmp, reference="policy-000001-aaaaaaaa", beta=beta, steps=7)
        state_lib.publish(registry, tmp, version, "ppo")
    return registry / state_lib.ROLE / version


def test_a_state_loads_back_and_a_damaged_one_is_ignored(tmp_path, caplog):
    path = publish_state(tmp_path, "policy-000002-bbbbbbbb", beta=0.03)
    saved = state_lib.load(tmp_path, "policy-000002-bbbbbbbb")
    assert saved is not None and (saved.reference, saved.beta, saved.steps) == (
        "policy-000001-aaaaaaaa", 0.03, 7,
    )  # fmt: skip
    assert saved.raw_policy is None and saved.optimizer.read_bytes() == b"adam moments"
    assert state_lib.load(tmp_path, "policy-000009-cccccccc") is None  # none: start fresh
    # One flipped byte: the whole state is refused (with a warning), never partly used.
    (path / state_lib.OPTIMIZER_FILE).write_bytes(b"adam momentz")
    assert state_lib.load(tmp_path, "policy-000002-bbbbbbbb") is None
    assert "ignoring the trainer state" in caplog.text


def test_only_the_latest_policys_state_is_kept_and_orphans_go(tmp_path):
    for version in ("policy-000002-bbbbbbbb", "policy-000003-cccccccc", "policy-000004-dddddddd"):
        publish_state(tmp_path, version)
    state_lib.prune(tmp_path, keep="policy-000003-cccccccc")
    assert checkpoint.list_versions(tmp_path, state_lib.ROLE) == ["policy-000003-cccccccc"]
    # A state whose policy was never published (a crash between the two renames).
    publish_state(tmp_path, "policy-000004-dddddddd")
    removed = state_lib.remove_orphans(tmp_path, {"policy-000003-cccccccc"})
    assert removed == ["policy-000004-dddddddd"]
    assert checkpoint.list_versions(tmp_path, state_lib.ROLE) == ["policy-000003-cccccccc"]
    assert not list(tmp_path.glob(f"{checkpoint.STAGING_PREFIX}*"))

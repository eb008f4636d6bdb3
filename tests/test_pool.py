"""ModelPool: versions load beside the current one, leases keep them, bad checkpoints are rejected."""

from __future__ import annotations

import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from rlhf import checkpoint
from rlhf.lifecycle import Kind, ModelState, model_event
from rlhf.pool import ModelPool
from rlhf.v1 import events_pb2

POLICY = events_pb2.MODEL_ROLE_POLICY


def publish(registry: Path, payload: bytes) -> str:
    with checkpoint.staging(registry) as tmp:
        (tmp / "weights.bin").write_bytes(payload)
        manifest = checkpoint.publish(registry, "policy", tmp, round_type="sft", parent=None,
                                      metrics={}, offsets={})  # fmt: skip
    return manifest.version


def announce(state: ModelState, registry: Path, version: str) -> None:
    state.apply(model_event(Kind.MODEL_EVENT_KIND_PUBLISHED, POLICY, version,
                            path=str(registry / "policy" / version)))  # fmt: skip
    state.apply(model_event(Kind.MODEL_EVENT_KIND_PROMOTED, POLICY, version))


def make_pool(
    released: list[bytes], rejected: list[str], metrics: CollectorRegistry
) -> ModelPool[bytes]:
    def warm_up(model: bytes) -> None:
        if model.startswith(b"broken"):
            raise ValueError("warm-up produced NaN")

    return ModelPool(
        load=lambda path: (path / "weights.bin").read_bytes(),
        warm_up=warm_up,
        release=released.append,
        registry=metrics,
        component="pooltest",
        on_reject=lambda v, why: rejected.append(v),
    )


def test_swap_keeps_leased_versions_until_their_last_request(tmp_path):
    released: list[bytes] = []
    rejected: list[str] = []
    metrics = CollectorRegistry()
    pool = make_pool(released, rejected, metrics)
    state = ModelState(POLICY)

    v1 = publish(tmp_path, b"one")
    announce(state, tmp_path, v1)
    pool.reconcile(state)
    assert pool.wait_resident(v1, 10)
    assert pool.choose("u") == v1

    with pool.lease(v1) as model:
        assert model == b"one"
        v2 = publish(tmp_path, b"two")
        announce(state, tmp_path, v2)
        pool.reconcile(state)
        assert pool.wait_resident(v2, 10)
        assert pool.choose("u") == v2, "new requests go to the new version once it is loaded"
        assert pool.resident() == sorted([v1, v2]), "the old one stays while a request holds it"
        assert released == []
    assert pool.resident() == [v2] and released == [b"one"]
    assert metrics.get_sample_value("rlhf_pooltest_swaps_total", {"outcome": "loaded"}) == 2
    assert metrics.get_sample_value("rlhf_pooltest_model_info", {"version": v2}) == 1
    assert metrics.get_sample_value("rlhf_pooltest_model_info", {"version": v1}) == 0
    # Per-version request counts, for comparing a canary with the promoted version.
    assert metrics.get_sample_value("rlhf_pooltest_version_requests_total", {"version": v1}) == 1
    assert metrics.get_sample_value("rlhf_pooltest_version_requests_total", {"version": v2}) is None


def test_corrupt_or_failing_versions_are_rejected_and_serving_goes_on(tmp_path):
    released: list[bytes] = []
    rejected: list[str] = []
    metrics = CollectorRegistry()
    pool = make_pool(released, rejected, metrics)
    state = ModelState(POLICY)
    good = publish(tmp_path, b"good")
    announce(state, tmp_path, good)
    pool.reconcile(state)
    assert pool.wait_resident(good, 10)

    corrupt = publish(tmp_path, b"fine weights")
    weights = tmp_path / "policy" / corrupt / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[0] ^= 0xFF  # one flipped byte
    weights.chmod(0o644)
    weights.write_bytes(bytes(data))
    announce(state, tmp_path, corrupt)
    started = time.monotonic()
    pool.reconcile(state)
    assert not pool.wait_resident(corrupt, 60)
    assert time.monotonic() - started < 30, (
        "wait_resident returns on a rejection, not at its timeout"
    )

    broken = publish(tmp_path, b"broken weights")
    announce(state, tmp_path, broken)
    pool.reconcile(state)
    assert not pool.wait_resident(broken, 10)

    assert rejected == [corrupt, broken]
    assert "checksum" in pool.rejected()[corrupt].lower() or "sha256" in pool.rejected()[corrupt]
    assert "warm-up produced NaN" in pool.rejected()[broken]
    assert pool.choose("u") == good and pool.resident() == [good]
    assert metrics.get_sample_value("rlhf_pooltest_swaps_total", {"outcome": "rejected"}) == 2

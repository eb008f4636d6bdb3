"""Loading policy versions and keeping track of the ones in memory.

A request resolves its ``LoadedPolicy`` once, when it starts, and keeps that object to the
end, so changing the serving version never touches requests in flight.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry, Gauge

from rlhf import checkpoint
from rlhf.models import load_policy
from services.policy.config import ModelConfig
from services.policy.engine import LoadedPolicy

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_dir(config: ModelConfig) -> Path:
    if config.path:
        return Path(config.path)
    found = checkpoint.latest(config.registry, "policy")
    if found is None:
        raise FileNotFoundError(f"no policy version in registry {config.registry}")
    return found


def load(config: ModelConfig) -> LoadedPolicy:
    """Loads the configured policy (verifying a checkpoint's checksums) and warms it up."""
    path = model_dir(config)
    version = config.version or path.name
    if (path / checkpoint.MANIFEST).is_file():
        version = config.version or checkpoint.verify(path).version
    device = resolve_device(config.device)
    model, tokenizer = load_policy(path, device, _DTYPES.get(config.dtype))
    policy = LoadedPolicy.of(model, tokenizer, version)
    # A real forward pass before the first request: fails fast on a broken checkpoint and
    # pays one-time costs (allocator, kernels) before anyone is waiting.
    with torch.inference_mode():
        ids = torch.tensor([[tokenizer.bos_token_id or 0]], device=device)
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    log.info(
        "loaded policy %s from %s on %s (%s)", version, path, device, next(model.parameters()).dtype
    )
    return policy


class ResidentPolicies:
    """The versions in memory and the one new requests get (``rlhf_policy_model_info``)."""

    def __init__(self, serving: LoadedPolicy, registry: CollectorRegistry) -> None:
        self._lock = threading.Lock()
        self._versions: dict[str, LoadedPolicy] = {serving.version: serving}
        self._serving = serving
        self._info = Gauge(
            "rlhf_policy_model_info",
            "1 for the policy version serving new requests, 0 for other resident versions",
            ["version"],
            registry=registry,
        )
        self._info.labels(serving.version).set(1)

    def serving(self) -> LoadedPolicy:
        return self._serving

    def get(self, version: str) -> LoadedPolicy | None:
        with self._lock:
            return self._versions.get(version)

    def versions(self) -> list[str]:
        with self._lock:
            return sorted(self._versions)

    def add(self, policy: LoadedPolicy, *, serve: bool) -> None:
        with self._lock:
            self._versions[policy.version] = policy
            self._info.labels(policy.version).set(0)
            if serve:
                self._info.labels(self._serving.version).set(0)
                self._serving = policy
                self._info.labels(policy.version).set(1)

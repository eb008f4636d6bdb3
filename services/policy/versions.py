"""Loading one policy version for the server's model pool (``services/serving.py``).

A request resolves its ``LoadedPolicy`` once, when it starts, and keeps that object to the
end, so changing the serving version never touches requests in flight.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from rlhf.models import load_policy
from services.policy.engine import LoadedPolicy
from services.serving import ModelConfig, version_of

log = logging.getLogger(__name__)


def load(path: Path, config: ModelConfig) -> LoadedPolicy:
    """Loads the policy in ``path`` on the configured device and dtype (checksums are the
    pool's job, before this runs)."""
    device, dtype = config.placement()
    model, tokenizer = load_policy(path, device, dtype)
    version = version_of(path, config.version if config.path else "")
    log.info(
        "loaded policy %s from %s on %s (%s)", version, path, device, next(model.parameters()).dtype
    )
    return LoadedPolicy.of(model, tokenizer, version)


def warm_up(policy: LoadedPolicy) -> None:
    """A real forward pass before the version takes requests: fails on a broken checkpoint
    (non-finite logits) and pays one-time costs (allocator, kernels) before anyone waits."""
    with torch.inference_mode():
        ids = torch.tensor([[policy.tokenizer.bos_token_id or 0]], device=policy.device)
        logits = policy.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    if not torch.isfinite(logits).all():
        raise ValueError(f"policy {policy.version}: warm-up forward pass gave non-finite logits")

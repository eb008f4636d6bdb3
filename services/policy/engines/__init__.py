"""Implementations of the ``GenerationEngine`` protocol (``services/policy/engine.py``)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from transformers import AutoConfig, GenerationConfig, PreTrainedTokenizerBase

from rlhf.tokenizer import load_tokenizer
from services.policy.config import PolicyServerConfig
from services.policy.engine import GenerationEngine


def make_engine(config: PolicyServerConfig, registry: CollectorRegistry) -> GenerationEngine:
    """The engine ``--engine.kind`` names, sized from the server's config."""
    engine = config.engine
    if engine.kind == "vllm":
        from services.policy.engines.vllm import VLLMEngine

        return VLLMEngine(
            registry,
            config.vllm,
            max_queue=engine.max_queue,
            max_batch_size=engine.max_batch_size,
            max_seq_len=config.seq_len,
            dtype=config.model.dtype,
        )
    settings: dict[str, Any] = {
        "max_batch_size": engine.max_batch_size, "max_queue": engine.max_queue,
        "max_step_tokens": engine.max_step_tokens, "max_seq_len": config.seq_len,
        "device": config.model.device, "dtype": config.model.dtype,
        "prefix_cache_tokens": engine.prefix_cache_tokens,
    }  # fmt: skip
    if engine.worker_process:
        from services.policy.engines.worker import WorkerEngine

        return WorkerEngine(registry, torch_threads=engine.torch_threads, **settings)
    from services.policy.engines.native import NativeEngine

    return NativeEngine(registry, **settings)


def version_metadata(
    path: str | Path,
) -> tuple[PreTrainedTokenizerBase, frozenset[int], int | None]:
    """What the server process needs of a version whose weights live in another process: its
    tokenizer, its end-of-sequence ids and its context length (None: not stated)."""
    tokenizer = load_tokenizer(path)
    eos = set()
    with contextlib.suppress(OSError, ValueError):
        ids = GenerationConfig.from_pretrained(str(path)).eos_token_id
        eos |= set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    positions = getattr(AutoConfig.from_pretrained(str(path)), "max_position_embeddings", None)
    return tokenizer, frozenset(eos), positions

"""Implementations of the ``GenerationEngine`` protocol (``services/policy/engine.py``)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from transformers import AutoConfig, GenerationConfig, PreTrainedTokenizerBase

from rlhf.tokenizer import load_tokenizer
from services.policy.config import EngineConfig, PolicyServerConfig, parse_cpus
from services.policy.engine import GenerationEngine

log = logging.getLogger(__name__)


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
            cpus=parse_cpus(engine.cpus),
        )
    settings: dict[str, Any] = {
        "max_batch_size": engine.max_batch_size, "max_queue": engine.max_queue,
        "max_step_tokens": engine.max_step_tokens, "max_seq_len": config.seq_len,
        "device": config.model.device, "dtype": config.model.dtype,
        "prefix_cache_tokens": engine.prefix_cache_tokens,
    }  # fmt: skip
    if engine.worker_process:
        from services.policy.engines.worker import WorkerEngine

        return WorkerEngine(
            registry, torch_threads=engine.torch_threads, cpus=parse_cpus(engine.cpus), **settings
        )
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


def cpu_list(cpus: Iterable[int]) -> str:
    """``cpus`` as a list like ``2-7,12`` (the form ``--engine.cpus`` and vLLM take)."""
    ordered, parts = sorted(cpus), []
    start = 0
    for i, cpu in enumerate(ordered):
        if i + 1 == len(ordered) or ordered[i + 1] != cpu + 1:
            first = ordered[start]
            parts.append(str(first) if first == cpu else f"{first}-{cpu}")
            start = i + 1
    return ",".join(parts)


def place_server(engine: EngineConfig) -> None:
    """Pins the server process's threads for ``--engine.cpus``: to the engine's CPUs when the
    native engine runs in this process, else to the CPUs the engine leaves free (its worker
    process or vLLM's OpenMP threads pin themselves). Threads started later keep the CPUs of
    the thread that started them, so this runs first thing. ValueError if a CPU is not
    available to this process."""
    cpus = parse_cpus(engine.cpus)
    if not cpus:
        return
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("engine.cpus needs Linux (sched_setaffinity)")
    allowed = os.sched_getaffinity(0)
    if not cpus <= allowed:
        raise ValueError(
            f"engine.cpus: CPUs {cpu_list(cpus - allowed)} are not available to this process "
            f"(it may use {cpu_list(allowed)})"
        )
    own = cpus if engine.kind == "native" and not engine.worker_process else allowed - cpus
    if not own:
        log.warning("engine.cpus names every CPU: the server's own threads share them")
        return
    pin_threads(own)
    log.info("engine on CPUs %s, the server's own threads on %s", cpu_list(cpus), cpu_list(own))


def pin_threads(cpus: Iterable[int]) -> None:
    """Every thread of this process onto ``cpus`` (Linux: an affinity is per thread)."""
    for thread in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(thread), cpus)

"""Shared fixtures: a real Kafka broker (Apache Kafka 4.x, KRaft) on free localhost ports, and
the tiny models of both families (byte-level Llama; BPE Qwen2 with GQA and a chat template)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from rlhf import bus
from rlhf.kafka_local import LocalKafka, free_port

# Two cores are shared by the broker, the servers under test and the test process itself;
# one torch thread per process is faster and steadier here than two.
torch.set_num_threads(int(os.environ.get("RLHF_TEST_TORCH_THREADS", "1")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests run where torch sees a GPU; vLLM tests with ``make test-vllm`` (which builds
    vLLM's environment and sets RLHF_VLLM_TESTS=1). Elsewhere they are deselected, and reported
    so."""
    skip = set()
    if not torch.cuda.is_available():
        skip.add("gpu")
    if os.environ.get("RLHF_VLLM_TESTS") != "1":
        skip.add("vllm")
    gone = [item for item in items if skip & set(item.keywords)]
    if gone:
        config.hook.pytest_deselected(items=gone)
        items[:] = [item for item in items if not skip & set(item.keywords)]


def start_broker(data_dir: Path) -> LocalKafka:
    broker = LocalKafka(data_dir, port=free_port(), controller_port=free_port())
    broker.start()
    bus.ensure_topics(broker.bootstrap_servers)
    return broker


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    """One broker for the whole session, with the system's topics created."""
    broker = start_broker(tmp_path_factory.mktemp("kafka"))
    yield broker
    broker.stop()


@pytest.fixture
def private_kafka(tmp_path: Path) -> Iterator[LocalKafka]:
    """A broker of the test's own, for tests that stop, kill or restart it."""
    broker = start_broker(tmp_path / "kafka")
    yield broker
    broker.stop()


FAMILIES = ("byte", "bpe")


def make_pad_eos(model_dir: Path) -> None:
    """Turns a model directory into one whose PAD is its EOS (Qwen2.5 base models, and
    Llama-3 once a loader pads with EOS): tokenizer and model configs say so."""
    import json

    config_file = model_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["pad_token"] = config["eos_token"]
    config_file.write_text(json.dumps(config, indent=2))
    for name in ("config.json", "generation_config.json"):
        path = model_dir / name
        if path.is_file():
            data = json.loads(path.read_text())
            data["pad_token_id"] = data.get("eos_token_id")
            path.write_text(json.dumps(data, indent=2))


@pytest.fixture(scope="session")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``rlhf model init --tokenizer FAMILY`` (tiny, seed 0), built once per session: a
    directory with policy/ and reward/. "bpe-pad-eos" is the BPE family with PAD == EOS.
    Tests that change files must copy it first."""
    from rlhf import models

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            out = tmp_path_factory.mktemp(f"models-{family}")
            tokenizer = family.removesuffix("-pad-eos")
            models.init_models(models.InitConfig(out=str(out), tokenizer=tokenizer))
            if family.endswith("-pad-eos"):
                for role in ("policy", "reward"):
                    make_pad_eos(out / role)
            built[family] = out
        return built[family]

    return get

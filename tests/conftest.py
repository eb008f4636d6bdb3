"""Shared fixtures: a real Kafka broker (Apache Kafka 4.x, KRaft) on free localhost ports."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rlhf import bus
from rlhf.kafka_local import LocalKafka, free_port

# Two cores are shared by the broker, the servers under test and the test process itself;
# one torch thread per process is faster and steadier here than two.
torch.set_num_threads(int(os.environ.get("RLHF_TEST_TORCH_THREADS", "1")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests run where torch sees a GPU; elsewhere they are deselected, and reported so."""
    if torch.cuda.is_available():
        return
    gpu = [item for item in items if "gpu" in item.keywords]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if "gpu" not in item.keywords]


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

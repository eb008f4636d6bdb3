"""``rlhf train`` killed with SIGKILL at chosen points resumes exactly: every demonstration
ends up in exactly one published checkpoint, none twice, none skipped; SIGTERM exits cleanly
and ``/metrics`` is served meanwhile."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

from kafka import KafkaAdminClient

from rlhf import bus, checkpoint, models
from rlhf.kafka_local import free_port
from rlhf.v1 import events_pb2
from trainer.reader import StreamTopics

ROOT = Path(__file__).resolve().parents[1]


class Trainer:
    """``python -m rlhf train`` in a subprocess, its log lines readable as they come."""

    def __init__(self, args: list[str]) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rlhf", "train", *args],
            cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)

    def wait_for(self, text: str, timeout_s: float = 120.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1.0)
            except queue.Empty:
                assert self.proc.poll() is None, "trainer exited:\n" + "".join(self.log[-30:])
                continue
            self.log.append(line)
            if text in line:
                return line
        raise AssertionError(f"no {text!r} in the trainer's log:\n" + "".join(self.log[-30:]))

    def kill(self, sig: int = signal.SIGKILL) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


def produce_demos(kafka, topics: StreamTopics, n: int, start: int) -> None:
    producer = bus.Producer(kafka.bootstrap_servers, client_id="test-resume")
    for i in range(start, start + n):
        event = events_pb2.DemonstrationEvent(
            event_id=f"demo-{i}", prompt=f"{i:04d} tell me about the sea", response="waves and boats",
            user_id=f"u{i % 5}", split=events_pb2.SPLIT_TRAIN,
        )  # fmt: skip
        producer.send(topics.demonstrations, event, key=event.user_id)
    producer.close()


def test_sigkill_at_any_point_then_restart_trains_each_record_exactly_once(kafka, tmp_path):
    models.init_models(models.InitConfig(out=str(tmp_path / "base")))
    prefix = f"resume-{uuid.uuid4().hex[:6]}."
    topics = StreamTopics.with_prefix(prefix)
    bus.ensure_topics(kafka.bootstrap_servers, [*topics.inputs(), topics.models])
    registry = tmp_path / "registry"
    port = free_port()
    args = [
        "--bootstrap-servers", kafka.bootstrap_servers, "--streams.topic-prefix", prefix, "--group-id", prefix,
        "--registry", str(registry), "--base-model", str(tmp_path / "base"), "--device", "cpu",
        "--torch-threads", "1", "--metrics-port", str(port), "--progress", "off",
        "--schedule.sft-min-new", "16", "--sft.epochs", "8", "--sft.batch-size", "4",
        "--data.poll-timeout-s", "0.2", "--data.session-timeout-s", "6",
    ]  # fmt: skip
    produce_demos(kafka, topics, 32, start=0)

    # 1. Killed in the middle of the first round: nothing published.
    first = Trainer(args)
    first.wait_for("sft round started")
    first.kill()
    assert checkpoint.list_versions(registry, "policy") == []

    # 2. Killed as soon as the checkpoint is published (before or around event and commit).
    second = Trainer(args)
    second.wait_for("published policy-")
    second.kill()
    versions = checkpoint.list_versions(registry, "policy")
    assert len(versions) == 1
    assert checkpoint.verify(registry / "policy" / versions[0]).metrics["examples"] == 32

    # 3. New data after the restart: one more round with exactly the new records.
    produce_demos(kafka, topics, 16, start=32)
    third = Trainer(args)
    third.wait_for("sft round published in")
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'rlhf_trainer_rounds_total{outcome="published",type="sft"} 1.0' in metrics
    assert "rlhf_trainer_consumer_lag" in metrics
    assert third.kill(signal.SIGTERM) == 0

    manifests = [
        checkpoint.verify(registry / "policy" / v)
        for v in checkpoint.list_versions(registry, "policy")
    ]
    assert [m.metrics["examples"] for m in manifests] == [32, 16]
    assert manifests[1].parent == manifests[0].version
    latest = manifests[-1].partition_offsets()
    assert sum(o for (t, _), o in latest.items() if t == topics.demonstrations.name) == 48
    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    try:
        group = admin.list_group_offsets(prefix).get(prefix, {})
    finally:
        admin.close()
    assert {(tp.topic, tp.partition): om.offset for tp, om in group.items()} == latest

    # Every version was announced (published, then promoted) exactly once, restarts included.
    consumer = bus.Consumer(kafka.bootstrap_servers, [topics.models], group_id=uuid.uuid4().hex,
                            client_id="test-resume")  # fmt: skip
    events: list[events_pb2.ModelEvent] = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len(events) < 2 * len(manifests):
        events += [r.value for r in consumer.poll(timeout_s=0.5)]  # type: ignore[misc]
    events += [r.value for r in consumer.poll(timeout_s=1.0)]  # type: ignore[misc]
    consumer.close()
    kinds = ("MODEL_EVENT_KIND_PUBLISHED", "MODEL_EVENT_KIND_PROMOTED")
    announced = sorted((e.version, events_pb2.ModelEventKind.Name(e.kind)) for e in events)
    assert announced == sorted((m.version, kind) for m in manifests for kind in kinds)

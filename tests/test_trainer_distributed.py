"""The trainer over two processes (torchrun, gloo, FSDP2 on CPU) against a real broker.

1. SFT, RM and PPO-ptx rounds over two ranks (with gradient accumulation 2) publish
   checkpoints that load like any other, and the round losses and the published weights
   match a one-process run on the same records: within 1e-4 relative for the losses and 1e-4
   absolute for every weight (fp32 on CPU; the two runs differ only in summation order).
2. SIGKILL of one rank in the middle of a (LoRA) round takes the job down; torchrun restarts
   it and the restarted job publishes every record in exactly one checkpoint, announces it
   once, then commits; its rank 0 is the one member of the trainer's consumer group.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from kafka import KafkaAdminClient
from safetensors.torch import load_file

from rlhf import bus, checkpoint, models
from rlhf.v1 import events_pb2
from trainer.reader import StreamTopics

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "pretrain.txt"
TRAIN, VAL = events_pb2.SPLIT_TRAIN, events_pb2.SPLIT_VALIDATION


class Job:
    """``rlhf train`` in a subprocess (one process, or torchrun over ``nproc``), its log
    lines readable as they come."""

    def __init__(self, args: list[str], nproc: int = 1, max_restarts: int = 0) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
        }
        launcher = [sys.executable, "-m", "rlhf"]
        if nproc > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
                        "-m", "rlhf"]  # fmt: skip
        self.proc = subprocess.Popen(
            [*launcher, "train", *args], cwd=ROOT, env=env, stderr=subprocess.STDOUT,
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, text: str, timeout_s: float = 300.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1.0)
            except queue.Empty:
                assert self.proc.poll() is None, "job exited:\n" + "".join(self.log[-40:])
                continue
            self.log.append(line)
            if text in line:
                return line
        raise AssertionError(f"no {text!r} in the job's log:\n" + "".join(self.log[-40:]))

    def wait(self, timeout_s: float = 600.0) -> int:
        code = self.proc.wait(timeout=timeout_s)
        while not self.lines.empty():
            self.log.append(self.lines.get())
        return code

    def worker(self, rank: int) -> int:
        """The pid of torchrun's worker of ``rank`` (read from its environment)."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for child in (
                Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            ):
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                if f"RANK={rank}".encode() in environ:
                    return int(child)
            time.sleep(0.5)
        raise AssertionError(f"no worker of rank {rank}")


def produce(kafka, topics: StreamTopics, *, demos: int = 0, comparisons: int = 0,
            prompts: int = 0, start: int = 0) -> None:  # fmt: skip
    """The same records, whatever the topics (``start`` numbers them), all from one user:
    one partition per topic, so two trainers read them in the same order."""
    producer = bus.Producer(kafka.bootstrap_servers, client_id="test-distributed")
    for i in range(start, start + demos):
        split = VAL if i % 4 == 3 else TRAIN
        demo = events_pb2.DemonstrationEvent(
            event_id=f"demo-{i}", prompt=f"{i:03d} tell me about the river", response=f"it runs {i % 7} miles to the sea",
            user_id="u0", split=split,  # type: ignore[arg-type]
        )  # fmt: skip
        producer.send(topics.demonstrations, demo, key=demo.user_id)
    for i in range(comparisons):
        split = VAL if i % 4 == 3 else TRAIN
        texts = ("blue sky", "a", f"green grass and {i} trees")
        cmp = events_pb2.ComparisonEvent(
            event_id=f"cmp-{i}", prompt=f"{i:03d} name a colour", user_id="u0", labeler_id="l1",
            responses=[events_pb2.RankedResponse(text=t, rank=r) for t, r in zip(texts, (1, 3, 2), strict=True)],
            split=split,  # type: ignore[arg-type]
        )  # fmt: skip
        producer.send(topics.comparisons, cmp, key=cmp.user_id)
    for i in range(prompts):
        split = VAL if i % 4 == 3 else TRAIN
        served = events_pb2.ServedGeneration(event_id=f"gen-{i}", prompt=f"{i:03d} say something kind",
                                             user_id="u0", split=split)  # type: ignore[arg-type]  # fmt: skip
        producer.send(topics.prompts, served, key=served.user_id)
    producer.close()


def trainer_args(kafka, tmp: Path, base: Path, prefix: str, *extra: str) -> list[str]:
    return [
        "--bootstrap-servers", kafka.bootstrap_servers, "--streams.topic-prefix", prefix, "--group-id", prefix,
        "--registry", str(tmp / "registry"), "--base-model", str(base), "--pretrain-corpus", str(CORPUS),
        "--device", "cpu", "--torch-threads", "1", "--metrics-port", "0", "--progress", "off",
        "--data.poll-timeout-s", "0.2", "--data.session-timeout-s", "6",
        *extra,
    ]  # fmt: skip


def new_topics(kafka, name: str) -> tuple[str, StreamTopics]:
    prefix = f"{name}-{uuid.uuid4().hex[:6]}."
    topics = StreamTopics.with_prefix(prefix)
    bus.ensure_topics(kafka.bootstrap_servers, [*topics.inputs(), topics.models])
    return prefix, topics


def published(registry: Path) -> list[checkpoint.Manifest]:
    out = []
    for role in ("policy", "reward"):
        out += [
            checkpoint.verify(registry / role / v) for v in checkpoint.list_versions(registry, role)
        ]
    return sorted(out, key=lambda m: m.created_at_ms)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


ROUNDS = [
    "--gates.enabled", "false", "--schedule.ppo-needs-rm", "true", "--schedule.max-rounds", "3",
    "--schedule.sft-min-new", "12", "--schedule.rm-min-new", "12", "--schedule.ppo-min-new", "12",
    "--sft.epochs", "1", "--sft.batch-size", "6", "--sft.ptx-coef", "0.5",
    "--rm.epochs", "1", "--rm.batch-prompts", "6",
    "--ppo.episodes", "6", "--ppo.minibatch-size", "3", "--ppo.iterations", "1", "--ppo.max-new-tokens", "6",
    "--ppo.ptx-ratio", "1", "--ppo.gamma-ptx", "1.0", "--ppo.ema-decay", "0.9", "--ppo.warmup-iters", "0",
    "--gates.eval-prompts", "4", "--gates.eval-ptx-examples", "4",
]  # fmt: skip


def test_two_ranks_train_and_publish_what_one_process_does(kafka, tmp_path):
    base = tmp_path / "base"
    models.init_models(models.InitConfig(out=str(base)))
    runs = {}
    for name, nproc, extra in (("one", 1, []), ("two", 2, ["--memory.grad-accumulation", "2"])):
        prefix, topics = new_topics(kafka, name)
        produce(kafka, topics, demos=16, comparisons=16, prompts=16)
        job = Job(trainer_args(kafka, tmp_path / name, base, prefix, *ROUNDS, *extra), nproc=nproc)
        assert job.wait() == 0, "".join(line for line in job.log if "kafka" not in line)[-6000:]
        runs[name] = published(tmp_path / name / "registry")
        if nproc == 2:
            assert any("rank 1 of 2" in line for line in job.log)
    one, two = runs["one"], runs["two"]
    assert [m.round_type for m in two] == ["sft", "rm", "ppo"] == [m.round_type for m in one]
    for a, b in zip(one, two, strict=True):
        same = {k.split(".", 1)[1]: v for k, v in a.offsets.items()}
        assert same == {k.split(".", 1)[1]: v for k, v in b.offsets.items()}  # same records
        for key in ("sft_loss", "rm_loss", "train_accuracy", "train_policy_loss",
                    "train_value_loss", "train_ptx_loss", "train_kl", "train_mean_reward"):  # fmt: skip
            if key in a.metrics:
                assert b.metrics[key] == pytest.approx(a.metrics[key], rel=1e-4, abs=1e-6), key
        role = "reward" if a.round_type == "rm" else "policy"
        wa = weights(tmp_path / "one" / "registry" / role / a.version)
        wb = weights(tmp_path / "two" / "registry" / role / b.version)
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.allclose(wa[key], wb[key], atol=1e-4, rtol=0), (a.round_type, key)
        # Trained: the weights moved from where the round started.
        start = {"sft": base / "policy", "rm": base / "reward",
                 "ppo": tmp_path / "two" / "registry" / "policy" / two[0].version}[a.round_type]  # fmt: skip
        assert any(not torch.equal(weights(start)[k], wb[k]) for k in wb)
    # What the servers load: the same loaders, from the two-rank run's registry.
    models.load_policy(tmp_path / "two" / "registry" / "policy" / two[-1].version, "cpu")
    models.load_reward_model(tmp_path / "two" / "registry" / "reward" / two[1].version, "cpu")


def test_sigkill_of_one_rank_restarts_the_job_and_publishes_each_record_once(kafka, tmp_path):
    base = tmp_path / "base"
    models.init_models(models.InitConfig(out=str(base)))
    prefix, topics = new_topics(kafka, "kill")
    produce(kafka, topics, demos=31)  # 24 train, 7 validation; the last one trains
    registry = tmp_path / "registry"
    # LoRA on: adapters sharded with their layers, merged weights gathered to rank 0.
    args = trainer_args(kafka, tmp_path, base, prefix, "--schedule.sft-min-new", "24",
                        "--sft.epochs", "3", "--sft.batch-size", "4", "--gates.enabled", "false",
                        "--lora.enabled", "true", "--lora.rank", "4", "--ppo.ema-decay", "0")  # fmt: skip
    job = Job(args, nproc=2, max_restarts=1)
    job.wait_for("sft round started")
    os.kill(job.worker(1), signal.SIGKILL)  # mid-round: nothing can be published
    job.wait_for("published policy-")  # by the restarted workers
    # Restarted: each attempt's ranks said where they run.
    assert sum("rank 1 of 2 on" in line for line in job.log) == 2, "".join(job.log[-60:])
    # Rank 0 alone reads Kafka: one member in the trainer's consumer group (the killed
    # attempt's consumer leaves it within the session timeout).
    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    try:
        deadline = time.monotonic() + 60
        while len(members := admin.describe_groups([prefix])[prefix]["members"]) != 1:
            assert time.monotonic() < deadline, members
            time.sleep(0.5)
    finally:
        admin.close()
    job.proc.send_signal(signal.SIGTERM)
    job.wait(timeout_s=120)

    manifests = published(registry)
    assert len(manifests) == 1 and manifests[0].metrics["examples"] == 24
    merged = weights(registry / "policy" / manifests[0].version)
    assert merged.keys() == weights(base / "policy").keys()  # merged: no adapter tensors
    models.load_policy(registry / "policy" / manifests[0].version, "cpu")
    demos_topic = topics.demonstrations.name
    offsets = manifests[0].partition_offsets()
    assert sum(o for (t, _), o in offsets.items() if t == demos_topic) == 31
    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    try:
        group = admin.list_group_offsets(prefix).get(prefix, {})
    finally:
        admin.close()
    assert {(tp.topic, tp.partition): om.offset for tp, om in group.items()} == offsets
    # Announced once (published, then promoted), the killed attempt's round not at all.
    from tests.test_trainer_rounds import model_events

    announced = sorted((e.version, events_pb2.ModelEventKind.Name(e.kind))
                       for e in model_events(kafka, topics, want=2))  # fmt: skip
    version = manifests[0].version
    assert announced == [(version, "MODEL_EVENT_KIND_PROMOTED"),
                         (version, "MODEL_EVENT_KIND_PUBLISHED")]  # fmt: skip

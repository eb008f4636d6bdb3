"""``rlhf train``: the online trainer process.

Builds everything explicitly — config, metrics registry and ``/metrics`` endpoint, Kafka
producer and consumer, corpus, trainer — then runs rounds until SIGTERM (or
``schedule.max_rounds``). On start it resumes from the registry: the consumer starts at the
offsets of the latest checkpoint manifest (re-reading the history below them when
``data.replay_on_start``), whatever the group committed; with an empty registry it starts
from the models of ``rlhf model init`` in ``base_model`` and the beginning of the topics.

SIGTERM stops between steps: a round in progress is dropped (nothing of it was published or
committed), so a stop never takes longer than one optimizer step or one generation batch.

Under ``torchrun`` (``trainer.distributed``) every process runs this: rank 0 does all of the
above and broadcasts the pretraining corpus and each round's records; the other ranks open
no Kafka client and no metrics port, and run the rounds they are given (``rounds.follow``).

``rlhf train plan ...`` prints the memory plan instead (``trainer.plan_cli``).
"""

from __future__ import annotations

import logging
import random
import signal
import threading
from collections.abc import Mapping
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from rlhf import bus, checkpoint
from rlhf.config import parse_config
from rlhf.topics import Topic
from trainer import registry as registry_lib
from trainer import state as state_lib
from trainer.config import TrainerConfig
from trainer.corpus import PretrainCorpus
from trainer.data import Offsets, TrainingData
from trainer.distributed import Dist
from trainer.metrics import TrainerMetrics
from trainer.reader import StreamReader, StreamTopics
from trainer.registry import POLICY, REWARD
from trainer.rounds import Trainer, follow

log = logging.getLogger("rlhf.trainer")


def resume_offsets(registry: Path) -> Offsets:
    """Where to continue reading: the offsets in the latest checkpoint manifests.

    Each publish records the trainer's resume offsets for all partitions and they only grow,
    so the per-partition maximum over the roles' latest manifests is the latest state.
    """
    out: Offsets = {}
    for role in (POLICY, REWARD):
        path = checkpoint.latest(registry, role)
        if path is None:
            continue
        for key, offset in checkpoint.read_manifest(path).partition_offsets().items():
            out[key] = max(out.get(key, 0), offset)
    return out


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but torch sees no CUDA device")
    return device


def check_models(cfg: TrainerConfig) -> None:
    needs_base = checkpoint.latest(cfg.registry, POLICY) is None or (
        checkpoint.latest(cfg.registry, REWARD) is None
    )
    base = cfg.base_model
    if needs_base and not (base / "policy").is_dir():
        raise FileNotFoundError(
            f"the registry {cfg.registry} has no models yet and {base}/policy does not exist; "
            f"create the initial models with `rlhf model init --out {base}`"
        )


def run(
    cfg: TrainerConfig,
    *,
    registry: CollectorRegistry | None = None,
    stop: threading.Event | None = None,
    serve_metrics: bool = True,
) -> Trainer | None:
    """Runs the trainer until ``stop`` is set (or max_rounds); returns it for inspection (on
    rank 0; the other ranks of a torchrun job return None)."""
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    dist = Dist.start(cfg.distributed, resolve_device(cfg.device))
    try:
        if not dist.is_main:
            corpus: PretrainCorpus = dist.broadcast(None)
            rounds = follow(cfg, dist, corpus, dist.device, stop or threading.Event())
            log.info("rank %d stops after %d rounds", dist.rank, rounds)
            return None
        return _run_main(cfg, dist, registry=registry, stop=stop, serve_metrics=serve_metrics)
    finally:
        dist.close()


def _run_main(
    cfg: TrainerConfig,
    dist: Dist,
    *,
    registry: CollectorRegistry | None,
    stop: threading.Event | None,
    serve_metrics: bool,
) -> Trainer:
    device = dist.device
    check_models(cfg)
    stale = checkpoint.remove_stale_staging(cfg.registry)
    if stale:
        log.info("removed %d unfinished checkpoint(s) left by a crash", len(stale))
    orphans = state_lib.remove_orphans(
        cfg.registry, set(checkpoint.list_versions(cfg.registry, POLICY))
    )
    if orphans:
        log.info("removed the trainer state of %s: its policy was never published", orphans)
    resume = resume_offsets(cfg.registry)
    prom = registry if registry is not None else CollectorRegistry()
    metrics = TrainerMetrics(prom)
    if serve_metrics and cfg.metrics_port:
        start_http_server(cfg.metrics_port, registry=prom)
    stream_topics = StreamTopics.of(cfg.streams.topics)
    parked = [stream_topics.parked(kind) for kind in ("demonstrations", "comparisons")]
    topics = [*stream_topics.inputs(), stream_topics.models, *parked]
    if not wait_for_kafka(cfg.bootstrap_servers, topics, prom, stop):
        raise StoppedEarly("stopped while waiting for Kafka")
    # The bus registers the same metric names for producers and consumers; the consumer's
    # (records read, dead letters) are the ones a trainer operator watches.
    producer = bus.Producer(cfg.bootstrap_servers, client_id=cfg.client_id)
    consumer = bus.Consumer(
        cfg.bootstrap_servers,
        stream_topics.inputs(),
        group_id=cfg.group_id,
        client_id=cfg.client_id,
        registry=prom,
        dead_letter=producer,
        start_offsets=StreamReader.start_offsets(stream_topics, resume, cfg.data.replay_on_start),
        # Rounds do not poll; a long one must not cost the trainer its partitions.
        max_poll_interval_ms=3_600_000,
        session_timeout_ms=int(cfg.data.session_timeout_s * 1000),
        heartbeat_interval_ms=int(cfg.data.session_timeout_s * 1000 / 3),
    )
    log.info("resuming from %s", _describe(resume) or "the beginning of the topics")
    spec = registry_lib.encoding_spec(cfg)
    log.info("encoding examples with %s", spec)
    data = TrainingData(cfg.data, conversations=spec.chat_template)
    reader = StreamReader(consumer, data, stream_topics, resume, cfg.data, metrics)
    corpus = PretrainCorpus(cfg.pretrain_corpus, cfg.ptx_holdout_fraction)
    if dist.world > 1:
        dist.broadcast(corpus)
    trainer = Trainer(
        cfg,
        reader=reader,
        producer=producer,
        metrics=metrics,
        stream_topics=stream_topics,
        corpus=corpus,
        device=device,
        stop=stop,
        spec=spec,
        dist=dist,
    )
    try:
        announced = registry_lib.announced_event_ids(
            cfg.bootstrap_servers, stream_topics.models, client_id=cfg.client_id
        )
        trainer.resume_from(resume, announced)
        trainer.run()
    finally:
        consumer.close()
        producer.close()
    return trainer


class StoppedEarly(Exception):
    """Asked to stop before the trainer could start."""


def wait_for_kafka(
    bootstrap_servers: str,
    topics: list[Topic],
    prom: CollectorRegistry,
    stop: threading.Event | None,
) -> bool:
    """Creates the topics, retrying with backoff while Kafka is unreachable (the trainer can
    start before the broker); ``rlhf_trainer_waiting_for_kafka`` is 1 meanwhile. False when
    stopped first."""
    waiting = Gauge("rlhf_trainer_waiting_for_kafka", "1 while start-up waits for Kafka",
                    registry=prom)  # fmt: skip
    stop = stop or threading.Event()
    backoff = 0.5
    while True:
        try:
            bus.ensure_topics(bootstrap_servers, topics, timeout_s=10.0)
            waiting.set(0)
            return True
        except (bus.KafkaUnavailable, bus.KafkaError) as exc:
            waiting.set(1)
            log.warning("Kafka not ready (%s); retrying in %.1f s", exc, backoff)
        if stop.wait(backoff):
            return False
        backoff = min(10.0, backoff * 2)


def _describe(offsets: Mapping[tuple[str, int], int]) -> str:
    return ", ".join(f"{t}[{p}]@{o}" for (t, p), o in sorted(offsets.items()))


def main(argv: list[str]) -> int:
    if argv and argv[0] == "plan":
        from trainer.plan_cli import main as plan_main

        return plan_main(argv[1:])
    cfg = parse_config(
        TrainerConfig,
        argv,
        prog="rlhf train",
        description="Run the online trainer: SFT, K-way reward model and PPO-ptx rounds from Kafka.",
        env_prefix="RLHF_TRAIN_",
    )
    logging.basicConfig(
        level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        run(cfg, stop=stop)
    except StoppedEarly as exc:
        log.info("%s", exc)
    except (FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    return 0

"""Rounds: when to train, what each round does, and the publish order that makes it safe.

The loop (``Trainer.run``) reads Kafka into the buffers and starts a round when one is due:
SFT when ``schedule.sft_min_new`` new train demonstrations arrived, RM for comparisons,
PPO-ptx for prompts (once a reward model was trained), or any of them with new data after
``schedule.interval_s``. Rounds run one at a time in the loop's thread, so they never overlap.

A round trains a candidate from the latest published model, evaluates the candidate and the
published model on the same held-out data, and gates (``trainer.gates``). On a pass, in
this order:

1. the checkpoint is published, immutable and atomic, with the Kafka offsets a restart must
   resume from in its manifest (``rlhf.checkpoint.publish``);
2. a ``PUBLISHED`` model event (then ``PROMOTED``, with ``auto_promote``) goes to
   ``rlhf.models`` and is acked;
3. the consumer group's offsets are committed.

A crash between any two steps is safe: a restarted trainer resumes from the latest
manifest's offsets (not the group's), sends the events of each role's latest version that
are missing on the models topic (never repeating one), and commits those offsets once it
has re-read its history. Records in a published checkpoint are never trained again, even if the
event or the commit failed (both are retried before the next round). A failed gate, an
error or a SIGTERM in the middle of a round publishes and commits nothing: the round's
records stay pending, and the round type waits for more data or ``interval_s``.

What a round does: ``trainer.sft_round``, ``trainer.rm_round``, ``trainer.ppo_round`` (each
returns a ``trainer.round.Candidate``). Which models a round starts from: ``trainer.registry``.

Under torchrun (``trainer.distributed``) rank 0 runs this loop; at the start of a round it
broadcasts a ``RoundOrder`` (the round type and a snapshot of the records it trains and
evaluates on), and the other ranks (``follow``) run the same round function on it. Rank 0
broadcasts the gates' verdict; on a pass every rank takes part in gathering the weights
(``Candidate.save``), which rank 0 alone writes, announces and commits. Between rounds rank
0 sends a heartbeat order at least every ``distributed.heartbeat_s``, and a stop order when
its loop ends. An error in a round is not survivable there (the ranks' collectives would
no longer pair up): it ends the process, torchrun takes the job down, and the restarted job
resumes from the manifest as after any crash.

Before a round starts, the memory plan (``trainer.plan``) must say it fits the device;
otherwise it is refused (like a failed gate: it waits for new data) with an error naming the
option that would make it fit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kafka.errors import KafkaError

from rlhf import bus, checkpoint
from rlhf.encoding import EncodingSpec, Prompt
from trainer import plan as plan_lib
from trainer import registry as registry_lib
from trainer import state as state_lib
from trainer.config import TrainerConfig
from trainer.corpus import PretrainCorpus
from trainer.data import Comparison, Demonstration
from trainer.distributed import Dist, DistributedConfig
from trainer.gates import GateResult
from trainer.metrics import TrainerMetrics
from trainer.ppo_round import run_ppo_round
from trainer.reader import StreamReader, StreamTopics
from trainer.registry import POLICY, REWARD
from trainer.rm_round import run_rm_round
from trainer.round import Candidate, RoundAborted, RoundContext
from trainer.sft_round import run_sft_round

log = logging.getLogger(__name__)

# Round type -> the data kind it trains on, and back.
ROUND_KINDS = {"sft": "demonstrations", "rm": "comparisons", "ppo": "prompts"}
_ROUND_OF = {kind: round_type for round_type, kind in ROUND_KINDS.items()}


@dataclass(frozen=True)
class RoundInputs:
    """The records a round trains and evaluates on, as rank 0's buffers held them."""

    demos: list[Demonstration] = field(default_factory=list)
    val_demos: list[Demonstration] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    val_comparisons: list[Comparison] = field(default_factory=list)
    test_comparisons: list[Comparison] = field(default_factory=list)
    bias_demos: list[Demonstration] = field(default_factory=list)
    pool: Sequence[Prompt] = field(default_factory=list)
    val_prompts: Sequence[Prompt] = field(default_factory=list)
    new_prompts: tuple[str, ...] = ()  # the served prompts a PPO-ptx round accounts for


@dataclass(frozen=True)
class RoundOrder:
    """What rank 0 broadcasts: run a round (``kind``), keep waiting (``heartbeat``) or stop."""

    kind: str  # sft | rm | ppo | heartbeat | stop
    index: int = 0
    spec: EncodingSpec | None = None
    inputs: RoundInputs | None = None


def train_round(ctx: RoundContext, inputs: RoundInputs) -> Candidate:
    """The round function of ``ctx.round_type`` on ``inputs`` (on every rank)."""
    if ctx.round_type == "sft":
        return run_sft_round(ctx, inputs.demos, inputs.val_demos)
    if ctx.round_type == "rm":
        return run_rm_round(ctx, inputs.comparisons, val=inputs.val_comparisons,
                            test=inputs.test_comparisons, bias_demos=inputs.bias_demos)  # fmt: skip
    if ctx.round_type == "ppo":
        return run_ppo_round(ctx, inputs.pool, val_prompts=inputs.val_prompts,
                             trained_ids=inputs.new_prompts)  # fmt: skip
    raise ValueError(f"unknown round type {ctx.round_type!r}")


@dataclass
class RoundResult:
    round_type: str
    outcome: str  # published | gate_failed | aborted | error
    version: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    gate: GateResult | None = None
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase


class Trainer:
    def __init__(
        self,
        cfg: TrainerConfig,
        *,
        reader: StreamReader,
        producer: bus.Producer,
        metrics: TrainerMetrics,
        stream_topics: StreamTopics,
        corpus: PretrainCorpus,
        device: str,
        stop: threading.Event | None = None,
        spec: EncodingSpec | None = None,
        dist: Dist | None = None,
    ) -> None:
        self.cfg = cfg
        self.dist = dist or Dist(DistributedConfig(), device=device)
        self.reader = reader
        self.data = reader.data
        self.producer = producer
        self.metrics = metrics
        self.topics = stream_topics
        self.corpus = corpus
        self.device = device
        self.stop = stop or threading.Event()
        self.rounds_run = 0
        self._last_round = time.monotonic()
        # Offsets of a published checkpoint whose event or commit has not gone through yet.
        self._unannounced: dict[tuple[str, int], int] | None = None
        self._announced: set[str] = set()
        # Round type -> how much new data it had when it last failed a gate.
        self._held: dict[str, int] = {}
        # One encoding for every step and gate of this trainer, recorded in each manifest.
        self.spec = spec or registry_lib.encoding_spec(cfg)
        self.publish_dtype = registry_lib.publish_dtype(cfg.publish_dtype, device)
        # Round type -> (errors in a row, monotonic time before which it does not run again).
        self._errors: dict[str, tuple[int, float]] = {}
        self._last_heartbeat = time.monotonic()
        # A round dropped half-way: the other ranks are not waiting for an order any more.
        self._aborted = False

    # ------------------------------------------------------------------ registry

    @property
    def registry(self) -> Path:
        return self.cfg.registry

    def resume_from(self, offsets: dict[tuple[str, int], int], announced: set[str]) -> None:
        """After a restart: ``announced`` are the model event ids already on the topic. The
        latest versions' missing events are sent and the manifest's offsets committed (the
        previous process may have died between publishing and committing)."""
        self._announced = set(announced)
        if offsets:
            self._unannounced = dict(offsets)

    def announce_latest(self) -> None:
        """Sends each role's latest version's events that are not on the models topic yet.

        Events already there are never repeated: a PROMOTED sent again after an operator's
        rollback would undo the rollback (compaction keeps the later copy of a key)."""
        for role in (POLICY, REWARD):
            path = checkpoint.latest(self.registry, role)
            if path is None:
                continue
            manifest = checkpoint.read_manifest(path)
            for event in registry_lib.announcements(
                manifest, path, auto_promote=self.cfg.auto_promote
            ):
                if event.event_id not in self._announced:
                    self.producer.send_sync(self.topics.models, event, key=event.event_id)
                    self._announced.add(event.event_id)

    # ------------------------------------------------------------------ loop

    def due(self) -> str | None:
        """The round to run now, if any (SFT before RM before PPO-ptx)."""
        s = self.cfg.schedule
        now = time.monotonic()
        new = {kind: self._new_data(kind) for kind in ROUND_KINDS}
        if s.ppo_needs_rm and registry_lib.trained_rm(self.registry) is None:
            new["ppo"] = 0
        for kind in ROUND_KINDS:  # a type that failed with an error waits out its backoff
            if now < self._errors.get(kind, (0, 0.0))[1]:
                new[kind] = 0
        thresholds = {"sft": s.sft_min_new, "rm": s.rm_min_new, "ppo": s.ppo_min_new}
        for kind, threshold in thresholds.items():
            # A full pending list starts a round whatever the threshold: reading waits for it.
            enough = new[kind] >= threshold or (new[kind] > 0 and self.data.full(ROUND_KINDS[kind]))
            # After a failed round, the same data alone does not start it again: new data or
            # the interval does (otherwise a failing gate would retrain in a tight loop).
            if enough and new[kind] > self._held.get(kind, -1):
                return kind
        if now - self._last_round >= s.interval_s:
            return next((kind for kind, n in new.items() if n > 0), None)
        return None

    def _new_data(self, round_type: str) -> int:
        if round_type == "ppo":
            return self.data.new_prompts
        return len(self.data.pending(ROUND_KINDS[round_type]))

    def run(self) -> None:
        """Reads and trains until ``stop`` is set or ``schedule.max_rounds`` rounds ran."""
        self._loop()
        if self.dist.world > 1 and not self._aborted:
            self.dist.broadcast(RoundOrder("stop"))

    def _loop(self) -> None:
        last_gauges = 0.0
        while not self.stop.is_set():
            self._heartbeat()
            read = self.reader.poll()
            if time.monotonic() - last_gauges > 5.0:
                self.update_gauges()
                last_gauges = time.monotonic()
            kind = None
            if self.reader.caught_up():
                if not self._try_announce():
                    self.stop.wait(1.0)
                    continue
                kind = self.due()
            if kind is None:
                if not read:  # e.g. every partition paused: poll does not wait then
                    self.stop.wait(self.cfg.data.poll_timeout_s)
                continue
            self.run_round(kind)
            self.rounds_run += 1
            self._last_heartbeat = time.monotonic()
            if self.cfg.schedule.max_rounds and self.rounds_run >= self.cfg.schedule.max_rounds:
                break

    def _heartbeat(self) -> None:
        since = time.monotonic() - self._last_heartbeat
        if self.dist.world > 1 and since >= self.dist.cfg.heartbeat_s:
            self.dist.broadcast(RoundOrder("heartbeat"))
            self._last_heartbeat = time.monotonic()

    def update_gauges(self) -> None:
        for topic, lag in self.reader.lag().items():
            self.metrics.consumer_lag.labels(topic=topic).set(lag)
        for (kind, split), n in self.data.counts().items():
            self.metrics.buffered.labels(kind=kind, split=split).set(n)

    # ------------------------------------------------------------------ one round

    def run_round(self, round_type: str) -> RoundResult:
        started = time.monotonic()
        result = RoundResult(round_type, "error")
        ctx = RoundContext(
            self.cfg, self.corpus, self.device, round_type, self.spec, self.publish_dtype,
            self.rounds_run, self.stop, dist=self.dist,
        )  # fmt: skip
        try:
            self.check_memory(round_type)
        except plan_lib.DoesNotFit as exc:
            log.error("%s round refused: %s", round_type, exc)
            self._held[round_type] = self._new_data(round_type)
            self._last_round = time.monotonic()
            self.metrics.rounds.labels(type=round_type, outcome="refused").inc()
            return RoundResult(round_type, "refused")
        log.info("%s round started", round_type)
        try:
            inputs = self._inputs(round_type)
            if self.dist.world > 1:
                self.dist.broadcast(RoundOrder(round_type, self.rounds_run, self.spec, inputs))
            candidate = train_round(ctx, inputs)
            passed = self.dist.broadcast(candidate.gate.passed)
            result.metrics, result.gate = candidate.metrics, candidate.gate
            self.metrics.record_round(round_type, candidate.metrics)
            if not passed:
                result.outcome = "gate_failed"
                self._held[round_type] = self._new_data(round_type)
                for failure in candidate.gate.failures:
                    self.metrics.gate_failures.labels(type=round_type, gate=failure.gate).inc()
                log.warning(
                    "%s round held back by gates: %s", round_type, candidate.gate.describe()
                )
                self._park_failed(candidate)
            else:
                with ctx.phase("publish"):
                    result.version = self._publish(round_type, candidate)
                    result.outcome = "published"
                    self._held.pop(round_type, None)
                    self._try_announce()
            self._errors.pop(round_type, None)
        except RoundAborted:
            result.outcome = "aborted"
            self._aborted = True
            log.info("%s round aborted: the trainer is stopping", round_type)
        except Exception as exc:
            self._back_off(round_type, exc)
            if self.dist.world > 1:
                raise  # the other ranks cannot carry on: the job stops and restarts
        finally:
            self._last_round = time.monotonic()
        result.phases = ctx.phases
        for phase, spent in ctx.phases.items():
            self.metrics.phase_seconds.labels(type=round_type, phase=phase).inc(spent)
        duration = time.monotonic() - started
        if result.outcome != "aborted":
            self.metrics.rounds.labels(type=round_type, outcome=result.outcome).inc()
            self.metrics.round_duration.labels(type=round_type).observe(duration)
        log.info("%s round %s in %.1fs %s", round_type, result.outcome, duration,
                 {k: round(v, 4) for k, v in result.metrics.items()})  # fmt: skip
        return result

    def _back_off(self, round_type: str, exc: Exception) -> None:
        """A round that failed with an error (a full or read-only registry, a broken model...)
        does not run again at once: it waits ``error_backoff_s``, doubling per error in a row.
        The first error of a streak logs its traceback, later ones one line."""
        s = self.cfg.schedule
        errors = self._errors.get(round_type, (0, 0.0))[0] + 1
        wait = min(s.error_backoff_max_s, s.error_backoff_s * 2 ** (errors - 1))
        self._errors[round_type] = (errors, time.monotonic() + wait)
        if errors == 1:
            log.exception("%s round failed; its next try is in %.0fs", round_type, wait)
        else:
            log.error("%s round failed again (%d in a row): %s: %s; next try in %.0fs",
                      round_type, errors, type(exc).__name__, exc, wait)  # fmt: skip

    def _park_failed(self, candidate: Candidate) -> None:
        """Records that were in ``park_after_failures`` failed rounds leave training: labelled
        ones are written to ``<topic>.parked`` first (nothing is lost), prompts expire."""
        kind = candidate.kind
        doomed = self.data.round_failed(
            kind, candidate.trained_ids, self.cfg.schedule.park_after_failures
        )
        if not doomed:
            return
        try:
            if kind != "prompts":
                topic = self.topics.parked(kind)
                for record in doomed:
                    self.producer.send(topic, record.event, key=record.user_id)  # type: ignore[union-attr]
                self.producer.flush(timeout_s=30)
        except (bus.PublishError, KafkaError) as exc:
            log.warning("could not park %d %s, they stay pending: %s", len(doomed), kind, exc)
            return
        self.data.park(kind, [r.event_id for r in doomed])
        self.metrics.parked.labels(kind=kind).inc(len(doomed))
        self._held.pop(_ROUND_OF[kind], None)
        log.warning("parked %d %s after %d rounds held back by gates", len(doomed), kind,
                    self.cfg.schedule.park_after_failures)  # fmt: skip

    def _inputs(self, round_type: str) -> RoundInputs:
        """A snapshot of the buffers for a round of ``round_type``."""
        data = self.data
        if round_type == "sft":
            return RoundInputs(
                demos=list(data.pending_demonstrations), val_demos=list(data.demonstrations["val"])
            )
        if round_type == "rm":
            return RoundInputs(
                comparisons=list(data.pending_comparisons),
                val_comparisons=list(data.comparisons["val"]),
                test_comparisons=list(data.comparisons["test"]),
                bias_demos=[*data.demonstrations["train"], *data.demonstrations["val"]],
            )
        if round_type == "ppo":
            val = [p.prompt for p in list(data.prompts["val"])[-self.cfg.gates.eval_prompts :]]
            return RoundInputs(
                pool=[p.prompt for p in data.prompts["train"]], val_prompts=val,
                new_prompts=tuple(p.event_id for p in data.pending_prompts),
            )  # fmt: skip
        raise ValueError(f"unknown round type {round_type!r}")

    def check_memory(self, round_type: str) -> plan_lib.Plan | None:
        """The memory plan of the round on this job's devices; raises ``DoesNotFit``."""
        return plan_lib.check_round(self.cfg, round_type, self.dist)

    # ------------------------------------------------------------------ publish protocol

    def _publish(self, round_type: str, candidate: Candidate) -> str:
        """Trainer state, checkpoint, then model event, then commit: the order that makes
        restarts exact. The state goes first under the name the checkpoint will get, so a
        published policy always has its state; a crash in between leaves an orphan state
        that the next start deletes."""
        offsets = self.reader.resume_offsets(candidate.trained_ids)
        version = checkpoint.next_version(self.registry, candidate.role)
        # The other ranks call save_state(None) and save(None) in this order (``follow``).
        if candidate.save_state is not None:
            with checkpoint.staging(self.registry) as tmp:
                candidate.save_state(tmp)
                state_lib.publish(self.registry, tmp, version, round_type)
        with checkpoint.staging(self.registry) as tmp:
            candidate.save(tmp)
            manifest = checkpoint.publish(
                self.registry,
                candidate.role,
                tmp,
                round_type=round_type,
                parent=candidate.parent,
                metrics=candidate.metrics,
                offsets=offsets,
                version=version,
                reference=candidate.reference or version,
                encoding=self.spec.to_dict(),
            )
        if candidate.role == POLICY:
            state_lib.prune(self.registry, keep=version)
        # From here on the records are in a published model: never train them again, even if
        # the event or the commit below fails (they are retried before the next round).
        self.data.mark_trained(candidate.kind, candidate.trained_ids)
        self._unannounced = offsets
        log.info("published %s (%s round)", manifest.version, round_type)
        self.metrics.checkpoints.labels(role=candidate.role).inc()
        self.metrics.last_checkpoint.labels(role=candidate.role).set(manifest.created_at_ms / 1000)
        return manifest.version

    def _try_announce(self) -> bool:
        try:
            self._announce()
            return True
        except (bus.PublishError, KafkaError) as exc:
            log.warning("model event or offset commit failed, will retry: %s", exc)
            return False

    def _announce(self) -> None:
        """Model events of the latest versions, then the commit of the latest offsets."""
        if self._unannounced is None:
            return
        self.announce_latest()
        self.reader.commit(self._unannounced)
        self._unannounced = None


def follow(cfg: TrainerConfig, dist: Dist, corpus: PretrainCorpus, device: str,
           stop: threading.Event) -> int:  # fmt: skip
    """A rank other than 0: runs the rounds rank 0 orders until it says stop. Returns the
    number of rounds run."""
    publish_dtype = registry_lib.publish_dtype(cfg.publish_dtype, device)
    rounds = 0
    while True:
        order: RoundOrder = dist.broadcast(None)
        if order.kind == "stop":
            return rounds
        if order.kind == "heartbeat":
            continue
        assert order.spec is not None and order.inputs is not None
        ctx = RoundContext(cfg, corpus, device, order.kind, order.spec, publish_dtype,
                           order.index, stop, dist=dist)  # fmt: skip
        try:
            candidate = train_round(ctx, order.inputs)
        except RoundAborted:
            return rounds
        if dist.broadcast(None):
            if candidate.save_state is not None:
                candidate.save_state(None)
            candidate.save(None)
        rounds += 1

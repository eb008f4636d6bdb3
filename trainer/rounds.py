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

Which models a round starts from: ``trainer.registry``.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from kafka.errors import KafkaError
from tqdm import tqdm

from rlhf import bus, checkpoint, models
from trainer import evaluate, losses, ppo
from trainer import registry as registry_lib
from trainer import rm as rm_steps
from trainer import sft as sft_steps
from trainer.config import TrainerConfig
from trainer.corpus import PretrainCorpus
from trainer.data import StreamReader, StreamTopics
from trainer.gates import GateResult, PolicyEval, policy_gate, rm_gate
from trainer.metrics import TrainerMetrics
from trainer.registry import POLICY, REWARD

log = logging.getLogger(__name__)


class RoundAborted(Exception):
    """The trainer is stopping; the round's work is dropped (nothing was published)."""


@dataclass
class RoundResult:
    round_type: str
    outcome: str  # published | gate_failed | aborted | error
    version: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    gate: GateResult | None = None
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase


@dataclass(frozen=True)
class Candidate:
    """A trained model ready for publishing, with its manifest metrics."""

    role: str
    save: Callable[[Path], None]
    metrics: dict[str, float]
    trained_ids: tuple[str, ...]
    kind: str  # the data kind it consumed


def cosine_schedule(total_steps: int, final_ratio: float) -> Callable[[int], float]:
    """LR multiplier: cosine from 1 to ``final_ratio`` over ``total_steps`` (paper: to 10%)."""

    def factor(step: int) -> float:
        progress = min(1.0, step / max(1, total_steps))
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


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
    ) -> None:
        self.cfg = cfg
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
        self._lengths = evaluate.Lengths(cfg.ppo.max_prompt_len, cfg.ppo.max_new_tokens)
        self._kl_ctl: losses.FixedKLController | losses.AdaptiveKLController = (
            losses.AdaptiveKLController(cfg.ppo.beta, cfg.ppo.kl_target, cfg.ppo.kl_horizon)
            if cfg.ppo.adaptive_kl
            else losses.FixedKLController(cfg.ppo.beta)
        )

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
        new = {kind: self._new_data(kind) for kind in ("sft", "rm", "ppo")}
        if s.ppo_needs_rm and registry_lib.trained_rm(self.registry) is None:
            new["ppo"] = 0
        thresholds = {"sft": s.sft_min_new, "rm": s.rm_min_new, "ppo": s.ppo_min_new}
        for kind, threshold in thresholds.items():
            # After a failed round, the same data alone does not start it again: new data or
            # the interval does (otherwise a failing gate would retrain in a tight loop).
            if new[kind] >= threshold and new[kind] > self._held.get(kind, -1):
                return kind
        if time.monotonic() - self._last_round >= s.interval_s:
            return next((kind for kind, n in new.items() if n > 0), None)
        return None

    def _new_data(self, round_type: str) -> int:
        if round_type == "sft":
            return len(self.data.pending_demonstrations)
        if round_type == "rm":
            return len(self.data.pending_comparisons)
        return self.data.new_prompts

    def run(self) -> None:
        """Reads and trains until ``stop`` is set or ``schedule.max_rounds`` rounds ran."""
        last_gauges = 0.0
        while not self.stop.is_set():
            self.reader.poll()
            if time.monotonic() - last_gauges > 5.0:
                self.update_gauges()
                last_gauges = time.monotonic()
            if not self.reader.caught_up():
                continue
            if not self._try_announce():
                self.stop.wait(1.0)
                continue
            kind = self.due()
            if kind is None:
                continue
            self.run_round(kind)
            self.rounds_run += 1
            if self.cfg.schedule.max_rounds and self.rounds_run >= self.cfg.schedule.max_rounds:
                break

    def update_gauges(self) -> None:
        for topic, lag in self.reader.lag().items():
            self.metrics.consumer_lag.labels(topic=topic).set(lag)
        for (kind, split), n in self.data.counts().items():
            self.metrics.buffered.labels(kind=kind, split=split).set(n)

    # ------------------------------------------------------------------ one round

    def run_round(self, round_type: str) -> RoundResult:
        started = time.monotonic()
        result = RoundResult(round_type, "error")
        log.info("%s round started", round_type)
        try:
            candidate, result.gate = {"sft": self._sft, "rm": self._rm, "ppo": self._ppo}[
                round_type
            ](result)
            result.metrics = candidate.metrics
            if not result.gate.passed:
                result.outcome = "gate_failed"
                self._held[round_type] = self._new_data(round_type)
                for failure in result.gate.failures:
                    self.metrics.gate_failures.labels(type=round_type, gate=failure.gate).inc()
                log.warning("%s round held back by gates: %s", round_type, result.gate.describe())
            else:
                with self._phase(result, "publish"):
                    result.version = self._publish(round_type, candidate)
                    result.outcome = "published"
                    self._held.pop(round_type, None)
                    self._try_announce()
        except RoundAborted:
            result.outcome = "aborted"
            log.info("%s round aborted: the trainer is stopping", round_type)
        except Exception:
            log.exception("%s round failed", round_type)
        finally:
            self._last_round = time.monotonic()
        duration = time.monotonic() - started
        if result.outcome != "aborted":
            self.metrics.rounds.labels(type=round_type, outcome=result.outcome).inc()
            self.metrics.round_duration.labels(type=round_type).observe(duration)
        log.info("%s round %s in %.1fs %s", round_type, result.outcome, duration,
                 {k: round(v, 4) for k, v in result.metrics.items()})  # fmt: skip
        return result

    def _publish(self, round_type: str, candidate: Candidate) -> str:
        """Checkpoint, then model event, then commit: the order that makes restarts exact."""
        offsets = self.reader.resume_offsets(candidate.trained_ids)
        parent = checkpoint.latest(self.registry, candidate.role)
        with checkpoint.staging(self.registry) as tmp:
            candidate.save(tmp)
            manifest = checkpoint.publish(
                self.registry,
                candidate.role,
                tmp,
                round_type=round_type,
                parent=parent.name if parent else None,
                metrics=candidate.metrics,
                offsets=offsets,
            )
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

    # ------------------------------------------------------------------ helpers

    @contextmanager
    def _phase(self, result: RoundResult, phase: str) -> Any:
        start = time.monotonic()
        try:
            yield
        finally:
            spent = time.monotonic() - start
            result.phases[phase] = result.phases.get(phase, 0.0) + spent
            self.metrics.phase_seconds.labels(type=result.round_type, phase=phase).inc(spent)

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise RoundAborted()

    def _progress(self, total: int, desc: str) -> tqdm:
        show = {"on": True, "off": False}.get(self.cfg.progress, sys.stderr.isatty())
        return tqdm(total=total, desc=desc, disable=not show, leave=False)

    def _optimizer(self, params: Iterable[torch.nn.Parameter], lr: float, betas: Sequence[float],
                   weight_decay: float = 0.0) -> torch.optim.AdamW:  # fmt: skip
        return torch.optim.AdamW(
            list(params), lr=lr, betas=(betas[0], betas[1]), weight_decay=weight_decay
        )

    def _val_prompts(self) -> list[str]:
        return [p.prompt for p in list(self.data.prompts["val"])[-self.cfg.gates.eval_prompts :]]

    def _policy_eval(
        self, policy: Any, reference: Any, rm: Any, tok: Any, *, demos: bool
    ) -> tuple[PolicyEval, Any]:
        g = self.cfg.gates
        return evaluate.policy_eval(
            policy,
            reference,
            rm,
            tok,
            prompts=self._val_prompts(),
            ptx_texts=self.corpus.holdout_examples(g.eval_ptx_examples),
            demos=list(self.data.demonstrations["val"]) if demos else [],
            lengths=self._lengths,
            max_new_tokens=self.cfg.ppo.max_new_tokens,
            temperature=self.cfg.ppo.temperature,
            ptx_tokens=self.cfg.ppo.ptx_seq_len,
            seed=self.cfg.seed,
        )

    # ------------------------------------------------------------------ SFT

    def _sft(self, result: RoundResult) -> tuple[Candidate, GateResult]:
        c = self.cfg.sft
        demos = list(self.data.pending_demonstrations)
        policy, tok = models.load_policy(
            registry_lib.policy_dir(self.cfg.registry, self.cfg.base_model), self.device
        )
        with self._phase(result, "evaluation"):
            before, _ = self._policy_eval(policy, policy, None, tok, demos=True)
        steps = c.epochs * math.ceil(len(demos) / c.batch_size)
        optimizer = self._optimizer(policy.parameters(), c.lr, c.adam_betas, c.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, cosine_schedule(steps, c.lr_final_ratio)
        )
        rng = random.Random(f"{self.cfg.seed}:sft:{demos[0].event_id if demos else ''}")
        total = 0.0
        with self._phase(result, "training"), self._progress(steps, "sft") as bar:
            for _ in range(c.epochs):
                order = rng.sample(demos, len(demos))
                for chunk in _chunks(order, c.batch_size):
                    self._check_stop()
                    batch = models.encode_pairs(tok, [d.prompt for d in chunk], [d.response for d in chunk],
                                                self._lengths.max_prompt_tokens, c.max_len)  # fmt: skip
                    ptx = None
                    if c.ptx_coef > 0:
                        ptx = models.encode_texts(
                            tok, self.corpus.sample(len(chunk), rng), self.cfg.ppo.ptx_seq_len
                        )
                    stats = sft_steps.sft_step(
                        policy, optimizer, batch, ptx=ptx, ptx_coef=c.ptx_coef
                    )
                    schedule.step()
                    total += stats.loss
                    bar.update()
        with self._phase(result, "evaluation"):
            after, _ = self._policy_eval(policy, policy, None, tok, demos=True)
        metrics = {"sft_loss": total / max(1, steps), "examples": float(len(demos))}
        metrics |= _prefixed("val_", after)
        self.metrics.set_losses("sft", {"sft": metrics["sft_loss"]})
        if after.ptx_loss is not None:
            self.metrics.ptx_loss.set(after.ptx_loss)
        gate = (
            policy_gate(self.cfg.gates, "sft", after, before)
            if self.cfg.gates.enabled
            else GateResult()
        )

        def save(out: Path) -> None:
            policy.save_pretrained(out)
            tok.save_pretrained(out)

        return Candidate(
            POLICY, save, metrics, tuple(d.event_id for d in demos), "demonstrations"
        ), gate

    # ------------------------------------------------------------------ RM

    def _rm(self, result: RoundResult) -> tuple[Candidate, GateResult]:
        c = self.cfg.rm
        comparisons = list(self.data.pending_comparisons)
        rm, tok = registry_lib.load_rm(self.cfg.registry, self.cfg.base_model, self.device)
        val = list(self.data.comparisons["val"])
        lengths = evaluate.Lengths(self._lengths.max_prompt_tokens, c.max_len)
        with self._phase(result, "evaluation"):
            before = evaluate.rm_accuracy(rm, tok, val, lengths)
        steps = c.epochs * math.ceil(len(comparisons) / c.batch_prompts)
        rm.requires_grad_(True)
        optimizer = self._optimizer(rm.parameters(), c.lr, c.adam_betas, c.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, cosine_schedule(steps, c.lr_final_ratio)
        )
        rng = random.Random(f"{self.cfg.seed}:rm:{comparisons[0].event_id if comparisons else ''}")
        total = acc = 0.0
        with self._phase(result, "training"), self._progress(steps, "rm") as bar:
            for _ in range(c.epochs):
                for chunk in _chunks(rng.sample(comparisons, len(comparisons)), c.batch_prompts):
                    self._check_stop()
                    batch = rm_steps.encode_rankings(tok, [x.prompt for x in chunk], [list(x.responses) for x in chunk],
                                                     [list(x.ranks) for x in chunk], lengths.max_prompt_tokens, c.max_len)  # fmt: skip
                    stats = rm_steps.rm_step(rm, optimizer, batch)
                    schedule.step()
                    total += stats.loss
                    acc += stats.accuracy
                    bar.update()
        demos = list(self.data.demonstrations["train"]) + list(self.data.demonstrations["val"])
        if c.fit_bias and demos:
            rm_steps.fit_bias(rm, tok, [d.prompt for d in demos], [d.response for d in demos],
                              max_prompt_tokens=lengths.max_prompt_tokens, max_response_tokens=c.max_len)  # fmt: skip
        with self._phase(result, "evaluation"):
            after = evaluate.rm_accuracy(rm, tok, val, lengths)
            test = evaluate.rm_accuracy(rm, tok, list(self.data.comparisons["test"]), lengths)
        metrics = {
            "rm_loss": total / max(1, steps),
            "train_accuracy": acc / max(1, steps),
            "examples": float(len(comparisons)),
            "bias": float(rm.bias),
        }
        if after.accuracy is not None:
            metrics["val_accuracy"] = after.accuracy
            self.metrics.rm_accuracy.labels(split="val").set(after.accuracy)
        if test.accuracy is not None:
            metrics["test_accuracy"] = test.accuracy
            self.metrics.rm_accuracy.labels(split="test").set(test.accuracy)
        self.metrics.set_losses("rm", {"rm": metrics["rm_loss"]})
        gate = rm_gate(self.cfg.gates, after, before) if self.cfg.gates.enabled else GateResult()
        rm.eval()

        def save(out: Path) -> None:
            rm.save(out, tok)

        return Candidate(
            REWARD, save, metrics, tuple(x.event_id for x in comparisons), "comparisons"
        ), gate

    # ------------------------------------------------------------------ PPO-ptx

    def _ppo(self, result: RoundResult) -> tuple[Candidate, GateResult]:
        c = self.cfg.ppo
        policy, tok = models.load_policy(
            registry_lib.policy_dir(self.cfg.registry, self.cfg.base_model), self.device
        )
        reference, _ = models.load_policy(
            registry_lib.reference_dir(self.cfg.registry, self.cfg.base_model), self.device
        )
        rm, _ = registry_lib.load_rm(self.cfg.registry, self.cfg.base_model, self.device)
        reference.requires_grad_(False)
        rm.requires_grad_(False)
        with self._phase(result, "evaluation"):
            before, _ = self._policy_eval(policy, reference, rm, tok, demos=False)
        value = ppo.value_model_from_rm(rm)
        ema = copy.deepcopy(policy) if c.ema_decay > 0 else None
        optimizer = self._optimizer([*policy.parameters(), *value.parameters()], c.lr, c.adam_betas)
        warmup = max(1, c.warmup_iters)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup)
        )
        pool = [p.prompt for p in self.data.prompts["train"]]
        rng = random.Random(f"{self.cfg.seed}:ppo:{self.rounds_run}:{len(pool)}")
        generator = torch.Generator().manual_seed(rng.randrange(2**31))
        steps_per_iter = c.inner_epochs * math.ceil(c.episodes / c.minibatch_size)
        sums: dict[str, float] = {}
        n_steps = 0
        with self._progress(c.iterations * steps_per_iter, "ppo") as bar:
            for _ in range(c.iterations):
                self._check_stop()
                prompts = [rng.choice(pool) for _ in range(c.episodes)]
                with self._phase(result, "generation"):
                    ro = ppo.rollout(policy, reference, value, rm, tok, prompts, beta=self._kl_ctl.value,
                                     max_new_tokens=c.max_new_tokens, max_prompt_tokens=c.max_prompt_len,
                                     temperature=c.temperature, gamma=c.gae_gamma, lam=c.gae_lambda)  # fmt: skip
                with self._phase(result, "training"):
                    for _ in range(c.inner_epochs):
                        for mb in ro.minibatches(c.minibatch_size, generator):
                            self._check_stop()
                            ptx = None
                            if c.gamma_ptx > 0 and c.ptx_ratio > 0:
                                texts = self.corpus.sample(c.ptx_ratio * len(mb), rng)
                                ptx = models.encode_texts(tok, texts, c.ptx_seq_len)
                            stats = ppo.ppo_step(policy, value, optimizer, mb, ptx=ptx, gamma_ptx=c.gamma_ptx,
                                                 clip=c.clip, value_clip=c.value_clip, vf_coef=c.vf_coef)  # fmt: skip
                            schedule.step()
                            if ema is not None:
                                ppo.ema_update(ema, policy, c.ema_decay)
                            for name in (
                                "policy_loss",
                                "value_loss",
                                "ptx_loss",
                                "kl",
                                "clip_frac",
                                "entropy",
                                "mean_reward",
                            ):
                                sums[name] = sums.get(name, 0.0) + getattr(stats, name)
                            n_steps += 1
                            bar.update()
                self._kl_ctl.update(float(ro.kl.mean()), len(ro))
        published = ema if ema is not None else policy
        published.eval()
        with self._phase(result, "evaluation"):
            after, _ = self._policy_eval(published, reference, rm, tok, demos=False)
        means = {k: v / max(1, n_steps) for k, v in sums.items()}
        metrics = {f"train_{k}": v for k, v in means.items()} | _prefixed("val_", after)
        metrics["beta"] = float(self._kl_ctl.value)
        metrics["episodes"] = float(c.iterations * c.episodes)
        self._ppo_gauges(means, after)
        gate = (
            policy_gate(self.cfg.gates, "ppo", after, before)
            if self.cfg.gates.enabled
            else GateResult()
        )

        def save(out: Path) -> None:
            published.save_pretrained(out)
            tok.save_pretrained(out)

        return Candidate(POLICY, save, metrics, (), "prompts"), gate

    def _ppo_gauges(self, means: dict[str, float], after: PolicyEval) -> None:
        m = self.metrics
        m.set_losses("ppo", {"policy": means.get("policy_loss", 0.0), "value": means.get("value_loss", 0.0),
                             "ptx": means.get("ptx_loss", 0.0)})  # fmt: skip
        m.clip_fraction.set(means.get("clip_frac", 0.0))
        m.entropy.set(means.get("entropy", 0.0))
        m.value_loss.set(means.get("value_loss", 0.0))
        m.ptx_loss.set(means.get("ptx_loss", 0.0))
        m.kl_beta.set(self._kl_ctl.value)
        if after.mean_reward is not None:
            m.mean_reward.set(after.mean_reward)
        if after.kl is not None:
            m.kl.set(after.kl)


def _prefixed(prefix: str, ev: PolicyEval) -> dict[str, float]:
    values = {
        "mean_reward": ev.mean_reward,
        "kl": ev.kl,
        "ptx_loss": ev.ptx_loss,
        "sft_loss": ev.sft_loss,
    }
    return {prefix + k: float(v) for k, v in values.items() if v is not None}

"""``rlhf demo``: the whole loop on one machine, on the tiny model.

Starts a real Kafka broker, builds the tiny default models, seeds the checkpoint registry
with them, and runs the policy server, reward server, feedback gateway and online trainer as
separate processes (the same commands a deployment runs). Then a simulated labeler client —
the hidden-preference simulator of the trainer's learning test — asks the policy server for
K samples per prompt over gRPC, ranks them and submits the ranking to the feedback gateway,
and now and then writes a demonstration. A live summary shows versions published and
promoted, the trainer's eval metrics, requests served, feedback accepted, and the hidden
property's rate in the responses of each policy version: the policy improves across
hot-swapped versions. Ctrl-C (or ``--duration``) stops everything cleanly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from rlhf import bus, checkpoint, models
from rlhf.config import option, parse_config
from rlhf.kafka_local import LocalKafka, free_port
from rlhf.lifecycle import ModelFollower, ModelState
from rlhf.seed import seed_registry
from rlhf.v1 import feedback_pb2_grpc, inference_pb2, inference_pb2_grpc
from trainer.simulator import (
    Candidate,
    HiddenPreference,
    SimulatedLabeler,
    corpus_sentences,
    make_prompts,
)

log = logging.getLogger("rlhf.demo")
ROOT = Path(__file__).resolve().parents[1]
# API keys of the demo's feedback gateway: two for people at the labeling workbench, one for
# the simulated labeler client.
WORKBENCH_KEYS = ("labeler-key-1", "labeler-key-2")
CLIENT_KEY = "demo-client-key"
GATEWAY_KEYS = "; ".join(f"{key} feedback" for key in (*WORKBENCH_KEYS, CLIENT_KEY))


@dataclass(frozen=True)
class DemoConfig:
    duration_s: float = option(0.0, "stop after this many seconds (0: run until Ctrl-C)")
    workdir: Path = option(Path(".rlhf/demo"), "Kafka data, registry, models and logs")
    fresh: bool = option(True, "start from an empty work directory (false: resume the last run)")
    k: int = option(4, "responses a labeler ranks per prompt (paper: 4..9)")
    noise: float = option(0.1, "share of a labeler's pairs that go against the hidden preference")
    users: int = option(40, "simulated end users (their ids decide train/val/test)")
    demonstration_every: int = option(3, "write a demonstration every N rankings")
    max_new_tokens: int = option(24, "response length the labeler client asks for")
    summary_every_s: float = option(5.0, "seconds between live summaries")
    seed: int = option(0, "seed of the models and the simulated labelers")
    require_new_version: bool = option(
        False, "exit with status 1 unless a trained policy version was promoted and served"
    )

    def __post_init__(self) -> None:
        if not 2 <= self.k <= 9:
            raise ValueError(f"k must be in 2..9, got {self.k}")
        if self.duration_s < 0:
            raise ValueError("duration_s must be >= 0")


class Process:
    """A component started as ``python -m rlhf ...`` with its log in the work directory."""

    def __init__(self, name: str, args: list[str], logs: Path) -> None:
        self.name = name
        self.log_path = logs / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rlhf", *args], cwd=ROOT, env=env, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip

    def check(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace").splitlines()[-25:]
            raise RuntimeError(
                f"{self.name} exited with {self.proc.returncode}:\n" + "\n".join(tail)
            )

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def wait_serving(target: str, service: str, proc: Process, timeout_s: float = 180.0) -> None:
    """Waits until the server's standard health check says SERVING for ``service``."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            proc.check()
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise TimeoutError(f"{proc.name} not serving after {timeout_s:.0f}s; see {proc.log_path}")


def scrape(port: int, metric: str) -> float:
    """Sum of a metric's samples on a process's /metrics endpoint (0 when unreachable)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return 0.0
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == metric:
                total += sample.value
    return total


# Eval metrics of a version worth a glance: (manifest key, label).
_SHOWN_METRICS = (
    ("val_win_rate", "win rate vs SFT"),
    ("val_mean_reward", "val reward"),
    ("val_kl", "KL"),
    ("val_ptx_loss", "ptx loss"),
    ("val_sft_loss", "val SFT loss"),
)


class Summary:
    """What the demo has seen: versions and their metrics, and the property per version."""

    def __init__(self, preference: HiddenPreference) -> None:
        self.preference = preference
        self.lock = threading.Lock()
        self.events: list[str] = []
        self.policy_state: ModelState | None = None
        self.metrics: dict[str, dict[str, float]] = {}
        self.by_version: dict[str, list[float]] = defaultdict(list)
        self.rankings = 0
        self.demonstrations = 0
        self.errors = 0

    def on_change(self, state: ModelState) -> None:
        with self.lock:
            for version, info in state.versions.items():
                self.metrics.setdefault(version, info.metrics)
            if state.role == 1:
                self.policy_state = state

    def served(self, version: str, texts: list[str]) -> None:
        with self.lock:
            self.by_version[version].extend(self.preference.score(t) for t in texts)

    def render(self, requests: float, accepted: float, rounds: float) -> str:
        with self.lock:
            state = self.policy_state
            lines = [
                f"-- {time.strftime('%H:%M:%S')}  requests served {requests:.0f}  feedback accepted "
                f"{accepted:.0f} (rankings {self.rankings}, demos {self.demonstrations})  "
                f"trainer rounds {rounds:.0f}  client errors {self.errors}"
            ]
            rms = sorted(v for v in self.metrics if v.startswith("reward-"))
            trained_rms = [v for v in rms if "val_accuracy" in self.metrics[v]]
            if state is not None:
                rm = (
                    f"RM {trained_rms[-1]} val accuracy "
                    f"{self.metrics[trained_rms[-1]]['val_accuracy']:.3f}"
                    if trained_rms
                    else "RM not trained yet"
                )
                lines.append(
                    f"   policy versions published {len(state.versions)}, promoted "
                    f"{state.promoted}; reward versions {len(rms)}, {rm}"
                )
            # The first version and the latest few: the trend, not the whole history.
            shown = sorted(self.by_version)
            if len(shown) > 7:
                shown = [shown[0], *shown[-6:]]
            for version in shown:
                scores = self.by_version[version]
                m = self.metrics.get(version, {})
                details = ", ".join(
                    f"{label} {m[key]:.3g}" for key, label in _SHOWN_METRICS if key in m
                )
                if "val_win_rate_low" in m:  # the interval of the win rate, just after it
                    interval = f" (95% {m['val_win_rate_low']:.2f}-{m['val_win_rate_high']:.2f})"
                    details = details.replace(", ", interval + ", ", 1)
                elif "val_sft_loss" in m:  # an SFT version is the reference of its lineage
                    details = "SFT reference, " + details
                lines.append(
                    f"   {version}: '{self.preference.target}' rate "
                    f"{sum(scores) / len(scores):.3f} over {len(scores)} responses"
                    + (f"  [{details}]" if details else "")
                )
            return "\n".join(lines)

    def report(self, initial: str) -> dict[str, object]:
        with self.lock:
            state = self.policy_state
            rates = {v: sum(s) / len(s) for v, s in self.by_version.items() if s}
            return {
                "initial_version": initial,
                "policy_versions": sorted(state.versions) if state else [],
                "promoted": state.promoted if state else None,
                "served_versions": sorted(rates),
                "property_rate_by_version": rates,
                "win_rate_vs_sft_by_version": {
                    v: m["val_win_rate"] for v, m in self.metrics.items() if "val_win_rate" in m
                },
                "rankings": self.rankings,
                "demonstrations": self.demonstrations,
                "client_errors": self.errors,
            }


def run(cfg: DemoConfig) -> int:
    work = cfg.workdir.resolve()
    if cfg.fresh and work.exists():
        shutil.rmtree(work)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    registry = work / "registry"
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    print(f"starting Kafka (data in {work / 'kafka'}) ...", flush=True)
    kafka = LocalKafka(work / "kafka", port=free_port(), controller_port=free_port())
    kafka.start()
    procs: list[Process] = []
    follower: ModelFollower | None = None
    producer: bus.Producer | None = None
    summary = Summary(HiddenPreference())
    initial = ""
    try:
        bs = kafka.bootstrap_servers
        bus.ensure_topics(bs)
        producer = bus.Producer(bs, client_id="rlhf-demo")
        base = work / "base"
        if not (base / "policy").exists():
            print("building the tiny default models ...", flush=True)
            models.init_models(models.InitConfig(out=str(base), seed=cfg.seed))
        seed_registry(registry, base, producer, actor="demo")
        initial = checkpoint.list_versions(registry, "policy")[0]

        ports = {
            n: (free_port(), free_port(), free_port()) for n in ("policy", "reward", "feedback")
        }
        trainer_metrics = free_port()
        common = ["--runtime.host", "127.0.0.1", "--runtime.metrics-host", "127.0.0.1"]
        common += ["--runtime.http-host", "127.0.0.1"]
        print("starting policy, reward and feedback servers and the trainer ...", flush=True)
        procs.append(Process("policy", [
            "serve", "policy", "--model.registry", str(registry), "--follow.bootstrap-servers", bs,
            "--publish.bootstrap-servers", bs, "--runtime.port", str(ports["policy"][0]),
            "--runtime.metrics-port", str(ports["policy"][1]), "--runtime.http-port",
            str(ports["policy"][2]), *common,
        ], logs))  # fmt: skip
        procs.append(Process("reward", [
            "serve", "reward", "--model.registry", str(registry), "--follow.bootstrap-servers", bs,
            "--runtime.port", str(ports["reward"][0]), "--runtime.metrics-port", str(ports["reward"][1]),
            "--runtime.http-port", str(ports["reward"][2]), *common,
        ], logs))  # fmt: skip
        # The workbench queues half of the simulated labeler's tasks for a second labeler (a
        # person at the page, who then sees their agreement with it), least certain first.
        procs.append(Process("feedback", [
            "serve", "feedback", "--kafka.bootstrap-servers", bs, "--runtime.port",
            str(ports["feedback"][0]), "--runtime.metrics-port", str(ports["feedback"][1]),
            "--runtime.http-port", str(ports["feedback"][2]), "--runtime.api-keys", GATEWAY_KEYS,
            "--workbench.policy-target", f"127.0.0.1:{ports['policy'][0]}",
            "--workbench.reward-target", f"127.0.0.1:{ports['reward'][0]}",
            "--workbench.order", "uncertainty", "--workbench.overlap", "0.5",
            "--workbench.max-new-tokens", str(cfg.max_new_tokens), *common,
        ], logs))  # fmt: skip
        procs.append(Process("trainer", [
            "train", "--bootstrap-servers", bs, "--registry", str(registry), "--base-model", str(base),
            "--metrics-port", str(trainer_metrics), "--progress", "off", "--seed", str(cfg.seed),
            "--config", str(ROOT / "services" / "demo_trainer.yaml"),
        ], logs))  # fmt: skip
        for name, service in (("policy", "rlhf.v1.InferenceService"),
                              ("reward", "rlhf.v1.RewardService"),
                              ("feedback", "rlhf.v1.FeedbackService")):  # fmt: skip
            proc = next(p for p in procs if p.name == name)
            wait_serving(f"127.0.0.1:{ports[name][0]}", service, proc)
        print(f"all up; logs in {logs}. Labelers at work (Ctrl-C stops).", flush=True)
        print(
            f"HTTP: OpenAI/TGI http://127.0.0.1:{ports['policy'][2]}/v1 (model 'policy'), "
            f"scoring http://127.0.0.1:{ports['reward'][2]}/v1/score, "
            f"feedback http://127.0.0.1:{ports['feedback'][2]}/v1/feedback/comparisons",
            flush=True,
        )
        print(
            f"Labeling workbench: http://127.0.0.1:{ports['feedback'][2]}/workbench/ "
            f"(sign in with API key {' or '.join(WORKBENCH_KEYS)})",
            flush=True,
        )

        follower = ModelFollower(
            bootstrap_servers=bs, registry_dir=None, on_change=summary.on_change
        )
        follower.start()
        deadline = time.monotonic() + cfg.duration_s if cfg.duration_s else float("inf")
        labeler = threading.Thread(
            target=label_loop,
            args=(cfg, ports["policy"][0], ports["feedback"][0], summary, stop),
            daemon=True,
        )
        labeler.start()
        next_summary = time.monotonic() + cfg.summary_every_s
        while not stop.is_set() and time.monotonic() < deadline:
            for p in procs:
                p.check()
            if time.monotonic() >= next_summary:
                next_summary += cfg.summary_every_s
                print(summary.render(
                    scrape(ports["policy"][1], "rlhf_policy_requests_total"),
                    scrape(ports["feedback"][1], "rlhf_feedback_events_accepted_total"),
                    scrape(trainer_metrics, "rlhf_trainer_rounds_total"),
                ), flush=True)  # fmt: skip
            stop.wait(0.5)
        stop.set()
        labeler.join(timeout=120)
    finally:
        stop.set()
        print("stopping ...", flush=True)
        for p in reversed(procs):
            p.stop()
        if follower is not None:
            follower.stop()
        if producer is not None:
            producer.close()
        kafka.stop()
    report = summary.report(initial)
    print(json.dumps({"demo": report}))
    if cfg.require_new_version:
        served = report["served_versions"]
        assert isinstance(served, list)
        trained = [v for v in served if v != initial]
        if not trained or report["promoted"] == initial:
            print("error: no trained policy version was promoted and served", file=sys.stderr)
            return 1
    return 0


def label_loop(
    cfg: DemoConfig, policy_port: int, feedback_port: int, summary: Summary, stop: threading.Event
) -> None:
    """The simulated labeler client: sample K, rank, submit; sometimes demonstrate."""
    sentences = corpus_sentences(ROOT / "data" / "pretrain.txt")
    labeler = SimulatedLabeler("demo-labeler", noise=cfg.noise, seed=cfg.seed)
    with (
        grpc.insecure_channel(f"127.0.0.1:{policy_port}") as pc,
        grpc.insecure_channel(f"127.0.0.1:{feedback_port}") as fc,
    ):
        policy = inference_pb2_grpc.InferenceServiceStub(pc)
        feedback = feedback_pb2_grpc.FeedbackServiceStub(fc)
        auth = [("authorization", f"Bearer {CLIENT_KEY}")]
        i = 0
        while not stop.is_set():
            (prompt,) = make_prompts(sentences, 1, seed=cfg.seed + i, start=i)
            user = f"user-{i % cfg.users}"
            i += 1

            def sample(text: str, k: int, user: str = user) -> list[Candidate]:
                reply = policy.Generate(
                    inference_pb2.GenerateRequest(
                        prompt=text, n=k, user_id=user,
                        parameters=inference_pb2.GenerationParameters(
                            do_sample=True, temperature=1.0, max_new_tokens=cfg.max_new_tokens,
                        ),
                    ),
                    timeout=120,
                )  # fmt: skip
                summary.served(reply.model_version, [s.text for s in reply.samples])
                return [Candidate(s.text, s.generation_id) for s in reply.samples]

            try:
                ranking = labeler.rank(prompt, user, sample, cfg.k)
                if ranking is not None:
                    feedback.SubmitComparison(ranking.to_request(), metadata=auth, timeout=30)
                    with summary.lock:
                        summary.rankings += 1
                if i % cfg.demonstration_every == 0:
                    drafts = [
                        s for s in (sentences[(i * 7 + j) % len(sentences)] for j in range(4))
                    ]
                    demo = labeler.demonstrate(prompt, user, drafts)
                    feedback.SubmitDemonstration(demo.to_request(), metadata=auth, timeout=30)
                    with summary.lock:
                        summary.demonstrations += 1
            except grpc.RpcError as exc:
                with summary.lock:
                    summary.errors += 1
                log.warning("labeler call failed: %s %s", exc.code().name, exc.details())
                stop.wait(1.0)


def main(argv: list[str]) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    cfg = parse_config(DemoConfig, argv, prog="rlhf demo", description=__doc__ or "",
                       env_prefix="RLHF_DEMO_")  # fmt: skip
    return run(cfg)

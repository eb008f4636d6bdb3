"""The native engine in a process of its own (``--engine.worker-process true``).

A Python process runs one thread at a time. In one process the server's event loop (gRPC,
HTTP, chat templates, tokenisation, Kafka records) and the engine's step loop take turns:
every torch call of the engine hands the interpreter lock to the event loop, and the engine
waits until the event loop gives it back. On a small model on CPU those waits cost as much as
the steps themselves. Here the engine (its models, KV memory and step loop: ``native.py``,
unchanged) runs in a child process, and the server process keeps everything else.

The two talk over a socket pair with ``multiprocessing.connection`` messages:

* down: ``submit`` (the checked request; the child makes its own ``Generation``), ``cancel``,
  and calls answered by a reply (``load``, ``warm_up``, ``unload``, ``stats``, ``wait_idle``,
  ``metrics``, ``stop``);
* up: each step's token events and the requests it admitted to a slot (the server side
  counts those still waiting, for ``max_queue``) in one message (the engine's ``deliver``
  hook), and the replies.

The server process loads the version's tokenizer itself (templates and tokenisation stay on
its side); the child loads the weights. The engine's metrics live in the child; the server's
registry reads them from it on every scrape. A child that dies fails its requests with reason
"stopped"; a child whose server dies exits (its end of the pipe closes).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from transformers import PreTrainedTokenizerBase

from services.policy.engine import (
    EngineStats,
    EngineStopped,
    Generation,
    GenerationFailed,
    QueueFull,
    TokenEvent,
    deliver_all,
)
from services.policy.engines import version_metadata
from services.policy.engines.native import new_generation
from services.policy.sampling import SamplingParams

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[3]
CALL_TIMEOUT_S = 600.0  # a load of a large model from a slow disk


@dataclass(frozen=True, eq=False)
class WorkerPolicy:
    """A model version whose weights live in the worker process; its tokenizer lives here."""

    version: str
    tokenizer: PreTrainedTokenizerBase
    eos_token_ids: frozenset[int]
    max_context: int | None


class _Reply:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False
        self.value: Any = None


class WorkerEngine:
    """``GenerationEngine`` whose native engine runs in a child process (module docstring)."""

    kind = "native"

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        max_batch_size: int = 32,
        max_queue: int = 256,
        max_step_tokens: int = 2048,
        max_seq_len: int = 2048,
        device: str = "auto",
        dtype: str = "auto",
        prefix_cache_tokens: int = 0,
        torch_threads: int = 0,
        cpus: frozenset[int] = frozenset(),
    ) -> None:
        if max_step_tokens <= max_batch_size:
            raise ValueError("max_step_tokens must exceed max_batch_size (room for prefill)")
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_seq_len = max_seq_len
        settings = {
            "max_batch_size": max_batch_size, "max_queue": max_queue,
            "max_step_tokens": max_step_tokens, "max_seq_len": max_seq_len, "device": device,
            "dtype": dtype, "prefix_cache_tokens": prefix_cache_tokens,
        }  # fmt: skip
        here, there = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "services.policy.engines.worker", str(there.fileno()),
                json.dumps(
                    {"engine": settings, "torch_threads": torch_threads, "cpus": sorted(cpus)}
                ),
            ],
            pass_fds=[there.fileno()],
            env=env,
        )  # fmt: skip
        there.close()
        self._conn = Connection(here.detach())
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        # Requests not finished: id -> [generation, samples still going].
        self._gens: dict[int, list[Any]] = {}
        self._waiting: set[int] = set()  # submitted, not yet given a slot by the worker
        self._queue_changed = threading.Condition(self._lock)
        self._replies: dict[int, _Reply] = {}
        self._stopping = False
        self._gone = False
        self._reader = threading.Thread(target=self._read, name="engine-worker-reader", daemon=True)
        self._reader.start()
        registry.register(_ChildMetrics(self))

    # ------------------------------------------------------------------ versions

    def load(self, path: Path, version: str) -> WorkerPolicy:
        tokenizer, eos, positions = version_metadata(path)
        self._call("load", str(path), version)
        return WorkerPolicy(version, tokenizer, eos, positions)

    def warm_up(self, policy: WorkerPolicy) -> None:
        self._call("warm_up", policy.version)

    def unload(self, policy: WorkerPolicy) -> None:
        if not self._gone:
            self._call("unload", policy.version)

    # ------------------------------------------------------------------ server side

    def submit(
        self,
        policy: WorkerPolicy,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        n: int = 1,
        deadline: float | None = None,
        *,
        stream: bool = False,
        token_texts: bool = False,
    ) -> Generation:
        gen = new_generation(
            self.max_batch_size, self.max_seq_len, policy, prompt_ids, params, n, deadline,
            stream, token_texts,
        )  # fmt: skip
        with self._lock:
            if self._stopping or self._gone:
                raise EngineStopped("the engine is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (max_queue)")
            rid = next(self._ids)
            self._gens[rid] = [gen, n]
            self._waiting.add(rid)
            self._queue_changed.notify_all()
        gen.on_cancel = lambda: self._cancel(rid)
        try:
            self._send(
                "submit", rid, policy.version, gen.prompt_ids, params, n, deadline, stream,
                token_texts, gen.submitted_at,
            )  # fmt: skip
        except OSError as exc:  # the worker is gone; the reader is about to notice
            with self._lock:
                self._gens.pop(rid, None)
                self._waiting.discard(rid)
            raise EngineStopped("the engine's worker process has exited") from exc
        return gen

    def _cancel(self, rid: int) -> None:
        with self._lock:
            self._gens.pop(rid, None)  # nobody listens any more
            self._waiting.discard(rid)
        with contextlib.suppress(OSError):
            self._send("cancel", rid)

    def stats(self) -> EngineStats:
        if self._gone:
            return EngineStats(kind=self.kind, waiting=0, running=0, versions=())
        stats: EngineStats = self._call("stats")
        return stats

    def running_sequences(self) -> int:
        return self.stats().running

    def wait_queued(self, count: int, timeout_s: float) -> bool:
        """Blocks until at least ``count`` requests wait for a batch slot (True) or the timeout."""
        with self._queue_changed:
            return self._queue_changed.wait_for(lambda: len(self._waiting) >= count, timeout_s)

    def wait_idle(self, timeout_s: float) -> bool:
        return self._gone or bool(self._call("wait_idle", timeout_s, timeout=timeout_s + 30))

    def stop(self, timeout_s: float = 30.0) -> None:
        with self._lock:
            self._stopping = True
        if not self._gone:
            with contextlib.suppress(OSError, RuntimeError, TimeoutError):
                self._call("stop", timeout_s, timeout=timeout_s + 30)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(10)
        self._conn.close()
        self._fail_all("the server is shutting down")

    # ------------------------------------------------------------------ the pipe

    def _send(self, *message: Any) -> None:
        with self._send_lock:
            self._conn.send(message)

    def _call(self, op: str, *args: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
        reply = _Reply()
        with self._lock:
            if self._gone:
                raise RuntimeError("the engine's worker process has exited")
            call_id = next(self._ids)
            self._replies[call_id] = reply
        try:
            self._send("call", call_id, op, args)
            if not reply.done.wait(timeout):
                raise TimeoutError(f"the engine's worker process did not answer {op} in {timeout}s")
        finally:
            with self._lock:
                self._replies.pop(call_id, None)
        if not reply.ok:
            raise RuntimeError(f"{op} failed in the engine's worker process: {reply.value}")
        return reply.value

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "events":  # ("events", [(id, events)], admitted ids)
                if message[2]:
                    with self._lock:
                        self._waiting.difference_update(message[2])
                self._dispatch(message[1])
            else:  # ("reply", call id, ok, value)
                with self._lock:
                    reply = self._replies.get(message[1])
                if reply is not None:
                    reply.ok, reply.value = message[2], message[3]
                    reply.done.set()
        with self._lock:
            self._gone = True
            replies = list(self._replies.values())
        for reply in replies:
            reply.value = "the process exited"
            reply.done.set()
        if not self._stopping:
            log.error("the engine's worker process exited with %s", self.process.poll())
        self._fail_all("the engine's worker process exited")

    def _dispatch(self, batch: list[tuple[int, list[TokenEvent | GenerationFailed]]]) -> None:
        events: dict[Generation, list[TokenEvent | GenerationFailed]] = {}
        with self._lock:
            for rid, items in batch:
                entry = self._gens.get(rid)
                if entry is None:
                    continue  # cancelled here while the child was still stepping
                events[entry[0]] = items
                entry[1] = samples_left(entry[1], items)
                if entry[1] <= 0:
                    del self._gens[rid]
                    self._waiting.discard(rid)  # a deadline or a failure while queued
        deliver_all(events)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            gens = [entry[0] for entry in self._gens.values()]
            self._gens.clear()
            self._waiting.clear()
        deliver_all({gen: [GenerationFailed("stopped", message)] for gen in gens})


def samples_left(left: int, items: Sequence[TokenEvent | GenerationFailed]) -> int:
    """A request's samples still going after these events of it (a failure ends them all)."""
    for item in items:
        if isinstance(item, GenerationFailed):
            return 0
        if item.done is not None:
            left -= 1
    return left


class _ChildMetrics(Collector):
    """The worker's engine metrics, read from it on every scrape."""

    def __init__(self, engine: WorkerEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            yield from self.engine._call("metrics", timeout=10)


# ---------------------------------------------------------------------- the worker process


class _Worker:
    def __init__(self, conn: Connection, settings: dict[str, Any]) -> None:
        from services.policy.engines.native import NativeEngine

        self.conn = conn
        self.registry = CollectorRegistry()
        self.engine = NativeEngine(self.registry, deliver=self._deliver, **settings)
        self.policies: dict[str, Any] = {}  # version -> LoadedPolicy
        # Requests not finished: generation -> [request id, samples still going], and back.
        self.requests: dict[Generation, list[int]] = {}
        self.by_id: dict[int, Generation] = {}
        self.send_lock = threading.Lock()
        self.lock = threading.Lock()

    def send(self, message: tuple) -> None:
        with self.send_lock:
            self.conn.send(message)

    def _deliver(
        self,
        outbox: dict[Generation, list[TokenEvent | GenerationFailed]],
        admitted: list[Generation],
    ) -> None:
        """A step's events and admissions, up in one message (each message wakes the server)."""
        batch = []
        with self.lock:
            ids = [self.requests[gen][0] for gen in admitted if gen in self.requests]
            for gen, items in outbox.items():
                entry = self.requests.get(gen)
                if entry is None:
                    continue  # cancelled: the server no longer listens
                batch.append((entry[0], items))
                entry[1] = samples_left(entry[1], items)
                if entry[1] <= 0:
                    del self.requests[gen], self.by_id[entry[0]]
        if batch or ids:
            self.send(("events", batch, ids))

    def serve(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break  # the server is gone
            kind = message[0]
            if kind == "submit":
                self._submit(*message[1:])
            elif kind == "cancel":
                with self.lock:
                    gen = self.by_id.pop(message[1], None)
                    if gen is not None:
                        del self.requests[gen]
                if gen is not None:
                    gen.cancel()
            # ("call", call id, op, args)
            elif message[2] == "stop":
                self._call(*message[1:])
                break
            elif message[2] in ("load", "warm_up", "wait_idle"):
                # Slow calls get a thread: requests keep flowing meanwhile (a swap's load).
                threading.Thread(target=self._call, args=message[1:], daemon=True).start()
            else:
                self._call(*message[1:])
        self.engine.stop()

    def _submit(
        self,
        rid: int,
        version: str,
        prompt_ids: list[int],
        params: SamplingParams,
        n: int,
        deadline: float | None,
        stream: bool,
        token_texts: bool,
        submitted_at: float,
    ) -> None:
        policy = self.policies.get(version)
        if policy is None:
            failure = GenerationFailed("internal", f"version {version} is not loaded")
            self.send(("events", [(rid, [failure])], []))
            return
        gen = Generation(
            policy, prompt_ids, params, n, deadline, None, stream=stream, token_texts=token_texts
        )
        gen.submitted_at = submitted_at  # the same monotonic clock in both processes
        with self.lock:
            self.requests[gen] = [rid, n]
            self.by_id[rid] = gen
        try:
            self.engine.enqueue(gen)
        except (QueueFull, EngineStopped) as exc:
            with self.lock:
                del self.requests[gen], self.by_id[rid]
            reason = "stopped" if isinstance(exc, EngineStopped) else "internal"
            self.send(("events", [(rid, [GenerationFailed(reason, str(exc))])], []))

    def _call(self, call_id: int, op: str, args: tuple) -> None:
        try:
            value = getattr(self, f"op_{op}")(*args)
            ok = True
        except Exception as exc:  # the server raises it for the caller
            log.exception("%s failed", op)
            value, ok = f"{type(exc).__name__}: {exc}", False
        with contextlib.suppress(OSError):
            self.send(("reply", call_id, ok, value))

    def op_load(self, path: str, version: str) -> None:
        self.policies[version] = self.engine.load(Path(path), version)

    def op_warm_up(self, version: str) -> None:
        self.engine.warm_up(self.policies[version])

    def op_unload(self, version: str) -> None:
        policy = self.policies.pop(version, None)
        if policy is not None:
            self.engine.unload(policy)  # its memory goes with its last request

    def op_stats(self) -> EngineStats:
        return self.engine.stats()

    def op_wait_idle(self, timeout_s: float) -> bool:
        return self.engine.wait_idle(timeout_s)

    def op_metrics(self) -> list[Metric]:
        return list(self.registry.collect())

    def op_stop(self, timeout_s: float) -> None:
        self.engine.stop(timeout_s)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    fd, settings = int(args[0]), json.loads(args[1])
    # The server decides when this process ends (its stop, or its end of the pipe closing): a
    # Ctrl-C or a SIGTERM sent to the whole process group must not cut its requests short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    cpus = set(settings["cpus"])
    # The CPUs this process was started on (the server's own) less the engine's.
    rest = os.sched_getaffinity(0) - cpus if cpus else set()
    if cpus:
        # Before torch starts a thread: every thread started from here computes on these CPUs.
        os.sched_setaffinity(0, cpus)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s engine-worker %(name)s: %(message)s"
    )
    import torch

    if settings["torch_threads"]:
        torch.set_num_threads(settings["torch_threads"])
    worker = _Worker(Connection(fd), settings["engine"])
    if rest:
        # The engine's thread keeps its CPUs to itself: this one reads the pipe, and woken
        # there by every request it would take the CPU from a step each time. The threads of
        # its calls (load, warm-up) start here and run where it runs.
        os.sched_setaffinity(0, rest)
    worker.serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The vLLM engine: each model version is a vLLM OpenAI-compatible server process.

vLLM pins its own torch and transformers, so it runs from its own environment
(``scripts/vllm_env.sh`` builds and caches one; ``--vllm.python`` points at any other, such as
a GPU image's). ``load`` starts ``python -m vllm.entrypoints.openai.api_server`` for the
version's directory on a free localhost port and waits for it; ``warm_up`` sends a real
completion; ``unload`` stops the process. Each server runs under ``vllm_guard.py``, which also
stops it when the process that started it is gone, however that ended: no vLLM process is left
behind by a crash or a kill. A hot swap is therefore the pool's usual one: the new
version's process starts beside the old one, is verified and warmed up, takes new requests,
and the old process stops after its last request. On a GPU both processes hold memory during
the swap: each takes ``--vllm.gpu-memory-utilization`` of it (weights + KV cache), so the
default 0.45 leaves room for two.

Requests go to ``/v1/completions`` over kept-alive connections, as token ids (our tokenizer,
so prompt lengths, limits and the token ids in Kafka records are ours), streamed when the
client streams, with ``return_token_ids`` and the sampled token's logprob. Texts are made here from the token ids by the same ``SampleText`` as the
native engine's, so stop strings, the UTF-8 rule and token texts behave identically.
Everything else stays ours: generation ids, Kafka records, versions and routing, auth,
metrics. Field mapping (GenerationParameters -> vLLM):

    do_sample=false        temperature 0 (greedy)      temperature   temperature
    top_p                  top_p                       top_k         top_k (0 = off)
    repetition_penalty     repetition_penalty (prompt and output tokens, as transformers)
    max_new_tokens         max_tokens                  stop          stop, include_stop_str_in_output
    seed                   seed (vLLM seeds sample i with seed + i)
    n                      n (greedy: vLLM refuses n > 1, so one greedy sample is run and given
                           to all n, which is what n greedy samples are)
                                                       logprobs      logprobs=0: the sampled token's
                                                       logprob, raw (before temperature and penalty),
                                                       vLLM's default logprobs_mode, as ours

What vLLM cannot give: the same samples as the native engine for the same seed (its own RNG);
deadlines inside the engine (the request is aborted by closing its stream when the deadline
passes); an admission queue we can bound exactly (vLLM queues internally: ``max_queue`` here
bounds requests in flight); per-version KV numbers in ``stats()`` (vLLM's own /metrics has them).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
from prometheus_client import CollectorRegistry
from transformers import PreTrainedTokenizerBase

from rlhf.kafka_local import free_port
from services.policy.config import VLLMConfig
from services.policy.engine import (
    EngineMetrics,
    EngineStats,
    EngineStopped,
    FinishReason,
    Generation,
    GenerationFailed,
    QueueFull,
    SampleText,
    TokenEvent,
)
from services.policy.engines import cpu_list, version_metadata
from services.policy.sampling import SamplingParams

log = logging.getLogger(__name__)
GUARD = Path(__file__).with_name("vllm_guard.py")

ROOT = Path(__file__).resolve().parents[3]
ENV_SCRIPT = ROOT / "scripts" / "vllm_env.sh"


def vllm_python(configured: str = "", build: bool = True) -> Path | None:
    """The python of vLLM's environment: configured, else scripts/vllm_env.sh's (built on first
    use when ``build``; None when it is not built and ``build`` is False)."""
    if configured:
        return Path(configured)
    args = [str(ENV_SCRIPT)] + ([] if build else ["--check"])
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        if build:
            raise RuntimeError(f"building vLLM's environment failed: {proc.stderr[-2000:]}")
        return None
    return Path(proc.stdout.strip().splitlines()[-1]) / "bin" / "python"


@dataclass(frozen=True, eq=False)
class VLLMPolicy:
    """A model version served by its own vLLM process."""

    version: str
    tokenizer: PreTrainedTokenizerBase
    eos_token_ids: frozenset[int]
    max_context: int | None
    url: str
    process: subprocess.Popen  # vllm_guard.py, which runs the server (see there)
    log_path: Path
    lifeline: BinaryIO  # write end of the guard's pipe: closes when this process ends, however

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""


def request_body(policy: VLLMPolicy, gen: Generation) -> dict[str, Any]:
    """The /v1/completions body for one request (see the module's field mapping)."""
    p: SamplingParams = gen.params
    body: dict[str, Any] = {
        "model": policy.version,
        "prompt": gen.prompt_ids,
        # vLLM refuses n > 1 with greedy decoding: one greedy sample stands for all n.
        "n": gen.n if p.do_sample else 1,
        "max_tokens": p.max_new_tokens,
        "temperature": p.temperature if p.do_sample else 0.0,
        "top_p": p.top_p,
        "top_k": p.top_k if p.top_k > 0 else -1,
        "repetition_penalty": p.repetition_penalty,
        "stop": list(p.stop),
        "include_stop_str_in_output": True,
        "logprobs": 0,
        "return_token_ids": True,
        "skip_special_tokens": True,
        "stream": True,
    }
    if p.seed is not None:
        body["seed"] = p.seed
    return body


class VLLMEngine:
    """``GenerationEngine`` over vLLM server processes (see module doc)."""

    kind = "vllm"

    def __init__(
        self,
        registry: CollectorRegistry,
        config: VLLMConfig,
        *,
        max_queue: int = 256,
        max_batch_size: int = 32,
        max_seq_len: int = 2048,
        dtype: str = "auto",
        cpus: frozenset[int] = frozenset(),
    ) -> None:
        if cpus and len(cpus) < config.tensor_parallel_size:
            raise ValueError(
                f"engine.cpus names {len(cpus)} CPUs for {config.tensor_parallel_size} "
                "tensor-parallel ranks: each rank needs one at least"
            )
        self.config = config
        self.cpus = cpus
        self.max_queue = max_queue
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.dtype = dtype
        self.metrics = EngineMetrics(registry)
        self._lock = threading.Condition()
        self._running: dict[Generation, asyncio.Task[None]] = {}
        self._policies: dict[str, VLLMPolicy] = {}
        self._starting: set[VLLMPolicy] = set()
        self._stopping = False
        self._python: Path | None = None
        # Pooled HTTP connections to the vLLM servers, one session per event loop that submits.
        self._sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}

    # ------------------------------------------------------------------ versions

    def command(self, path: Path, version: str, port: int) -> list[str]:
        cfg = self.config
        if self._python is None:
            self._python = vllm_python(cfg.python)
        return [
            str(self._python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(path), "--served-model-name", version,
            "--host", "127.0.0.1", "--port", str(port),
            "--dtype", self.dtype, "--max-model-len", str(self.max_seq_len),
            "--max-num-seqs", str(cfg.max_num_seqs or self.max_batch_size),
            "--gpu-memory-utilization", str(cfg.gpu_memory_utilization),
            "--tensor-parallel-size", str(cfg.tensor_parallel_size),
            # The model directory's generation_config.json must not change our parameters.
            "--generation-config", "vllm",
            "--disable-uvicorn-access-log",  # a log line per request costs the server time
            *cfg.extra_args,
        ]  # fmt: skip

    def _environment(self) -> dict[str, str]:
        import torch

        env = dict(os.environ)
        if not torch.cuda.is_available():
            # The CPU build: its KV cache size, and tcmalloc + Intel OpenMP preloaded per its docs.
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.config.cpu_kv_cache_gb))
            if self.cpus:  # --engine.cpus, split evenly between tensor-parallel ranks
                ranks, ordered = self.config.tensor_parallel_size, sorted(self.cpus)
                share = len(ordered) // ranks
                env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
                    cpu_list(ordered[r * share : (r + 1) * share]) for r in range(ranks)
                )
            else:
                env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            if self.config.threads:
                env["OMP_NUM_THREADS"] = str(self.config.threads)
            assert self._python is not None
            preload = [
                p
                for p in (
                    Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"),
                    self._python.parent.parent / "lib" / "libiomp5.so",
                )
                if p.exists()
            ]
            if preload:
                env["LD_PRELOAD"] = ":".join(str(p) for p in preload)
        return env

    def load(self, path: Path, version: str) -> VLLMPolicy:
        """Starts the version's vLLM process and waits until it serves (or fails to)."""
        path = Path(path).resolve()
        port = free_port()
        cmd = self.command(path, version, port)
        tokenizer, eos, positions = version_metadata(path)
        log_path = Path(tempfile.mkstemp(prefix=f"vllm-{version}-", suffix=".log")[1])
        process, held = start_guarded(cmd, log_path, self._environment())
        policy = VLLMPolicy(
            version, tokenizer, eos, min(positions or self.max_seq_len, self.max_seq_len),
            f"http://127.0.0.1:{port}", process, log_path, held,
        )  # fmt: skip
        log.info("starting vLLM for %s on port %d (log: %s)", version, port, log_path)
        with self._lock:
            self._starting.add(policy)  # stop() ends it too, even before it serves
        try:
            self._wait_serving(policy)
        except BaseException:
            self._terminate(policy)
            raise
        finally:
            with self._lock:
                self._starting.discard(policy)
        with self._lock:
            if self._stopping:
                self._terminate(policy)
                raise RuntimeError("the engine stopped while the version was starting")
            self._policies[version] = policy
        return policy

    def _wait_serving(self, policy: VLLMPolicy) -> None:
        deadline = time.monotonic() + self.config.start_timeout_s
        while time.monotonic() < deadline and not self._stopping:
            if policy.process.poll() is not None:
                raise RuntimeError(
                    f"vLLM for {policy.version} exited with {policy.process.returncode}:\n"
                    f"{policy.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{policy.url}/v1/models", timeout=5) as reply:
                    served = [m["id"] for m in json.load(reply)["data"]]
                if policy.version not in served:
                    raise RuntimeError(f"vLLM serves {served}, not {policy.version}")
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        if self._stopping:
            raise RuntimeError("the engine stopped while the version was starting")
        raise TimeoutError(
            f"vLLM for {policy.version} did not serve within {self.config.start_timeout_s}s"
        )

    def warm_up(self, policy: VLLMPolicy) -> None:
        """A real two-token completion; a broken checkpoint gives non-finite logprobs."""
        body = {
            "model": policy.version,
            "prompt": [policy.tokenizer.bos_token_id or 0],
            "max_tokens": 2,
            "temperature": 0.0,
            "logprobs": 0,
            "ignore_eos": True,
        }
        request = urllib.request.Request(
            f"{policy.url}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as reply:
            choice = json.load(reply)["choices"][0]
        logprobs = choice["logprobs"]["token_logprobs"]
        if len(logprobs) != 2 or not all(x is not None and math.isfinite(x) for x in logprobs):
            raise ValueError(f"policy {policy.version}: warm-up gave logprobs {logprobs}")

    def unload(self, policy: VLLMPolicy) -> None:
        with self._lock:
            if self._policies.get(policy.version) is policy:
                del self._policies[policy.version]
        self._terminate(policy)

    @staticmethod
    def _terminate(policy: VLLMPolicy) -> None:
        """Stops the version's vLLM processes: SIGTERM to the guard, which ends the server's
        process group (SIGKILL after its grace period) and exits when the server has."""
        if policy.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                policy.process.send_signal(signal.SIGTERM)
            try:
                policy.process.wait(30)
            except subprocess.TimeoutExpired:  # the guard is stuck: end everything here
                servers = _children(policy.process.pid)  # each leads its process group
                policy.process.kill()
                for pid in servers:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
                policy.process.wait(10)
        policy.lifeline.close()
        log.info("stopped vLLM for %s", policy.version)

    # ------------------------------------------------------------------ requests

    def submit(
        self,
        policy: VLLMPolicy,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        n: int = 1,
        deadline: float | None = None,
        *,
        stream: bool = False,
        token_texts: bool = False,
    ) -> Generation:
        if not 1 <= n <= self.max_batch_size:
            raise ValueError(f"n must be in 1..{self.max_batch_size}, got {n}")
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        limit = policy.max_context or self.max_seq_len
        if len(prompt_ids) + params.max_new_tokens > limit:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                f"exceeds the engine's {limit} tokens per sequence"
            )
        loop = asyncio.get_running_loop()
        gen = Generation(
            policy, prompt_ids, params, n, deadline, loop, stream=stream, token_texts=token_texts
        )
        with self._lock:
            if self._stopping:
                raise EngineStopped("the engine is shutting down")
            if len(self._running) >= self.max_queue + self.max_batch_size:
                raise QueueFull(f"{len(self._running)} requests are in flight")
            task = loop.create_task(self._run(gen))
            self._running[gen] = task
        gen.on_cancel = functools.partial(_cancel, task)
        self.metrics.prompt_tokens.observe(len(prompt_ids))
        self.metrics.running.set(len(self._running))
        return gen

    async def _run(self, gen: Generation) -> None:
        policy: VLLMPolicy = gen.policy
        try:
            timeout = None if gen.deadline is None else max(0.0, gen.deadline - time.monotonic())
            async with asyncio.timeout(timeout):
                await self._stream(policy, gen)
        except asyncio.CancelledError:
            if gen.cancelled:
                self.metrics.aborted.labels("cancelled").inc()
            else:
                self._fail(gen, "stopped", "the server is shutting down")
        except TimeoutError:
            self._fail(gen, "deadline", "deadline exceeded during generation")
        except (aiohttp.ClientError, ConnectionError) as exc:
            log.warning("vLLM for %s: %s", policy.version, exc)
            self._fail(gen, "stopped", f"the model server of {policy.version} is unavailable")
        except Exception:
            log.exception("vLLM request failed")
            self._fail(gen, "internal", "generation failed inside the engine")
        finally:
            with self._lock:
                self._running.pop(gen, None)
                self._lock.notify_all()
            self.metrics.running.set(len(self._running))

    async def _stream(self, policy: VLLMPolicy, gen: Generation) -> None:
        """One request to vLLM: streamed when the client streams, else one JSON reply (a
        chunk per token costs our event loop more than the tokens cost vLLM)."""
        samples = [SampleText.of(gen, i) for i in range(gen.n)]
        finished: set[int] = set()
        body = request_body(policy, gen)
        body["stream"] = gen.stream
        async with self._session().post(f"{policy.url}/v1/completions", json=body) as reply:
            if reply.status != 200:
                text = await reply.text()
                raise RuntimeError(f"vLLM answered {reply.status}: {text[:500]}")
            if not gen.stream:
                self._take(gen, samples, finished, (await reply.json()).get("choices", []))
            else:
                async for raw in reply.content:
                    line = raw.decode().strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    self._take(gen, samples, finished, json.loads(data).get("choices", []))
                    if len(finished) == gen.n:
                        break  # leaving the stream early aborts whatever vLLM still runs
        if len(finished) < gen.n:
            raise RuntimeError(f"vLLM ended the stream with {gen.n - len(finished)} samples open")

    def _session(self) -> aiohttp.ClientSession:
        """This event loop's session: its connections to the vLLM servers are kept open between
        requests (a new connection per request costs both servers more than a short completion
        does). They idle at most 3 s, under uvicorn's 5 s keep-alive, so a connection is never
        reused just as vLLM closes it; a stream left early closes its connection, which is how
        vLLM learns to abort the request."""
        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=3.0)
            session = self._sessions[loop] = aiohttp.ClientSession(connector=connector)
        return session

    def _take(
        self,
        gen: Generation,
        samples: list[SampleText],
        finished: set[int],
        choices: list[dict[str, Any]],
    ) -> None:
        """Feeds vLLM's tokens through our own text rules and hands the events over."""
        events: list[TokenEvent | GenerationFailed] = []
        now = time.perf_counter()
        eos = gen.policy.eos_token_ids
        if not gen.params.do_sample:  # greedy: the one sample vLLM ran, n times over
            choices = [dict(c, index=i) for c in choices for i in range(gen.n)]
        for choice in choices:
            index = int(choice["index"])
            if index in finished:
                continue
            sample = samples[index]
            token_ids = choice.get("token_ids") or []
            logprobs = (choice.get("logprobs") or {}).get("token_logprobs") or []
            for i, token in enumerate(token_ids):
                self.metrics.first_token(gen, now)
                logprob = float(logprobs[i]) if i < len(logprobs) else float("nan")
                delta, reason = sample.push(token, logprob, token in eos)
                last = i == len(token_ids) - 1
                if reason is None and last and choice.get("finish_reason"):
                    reason = _finish_reason(choice, sample)
                done = None
                if reason is not None:
                    done = sample.done(reason)
                    finished.add(index)
                    self.metrics.sample_done(gen, done, now)
                if gen.stream or done is not None:
                    events.append(TokenEvent(index, token, delta, logprob, done))
                if done is not None:
                    break
            self.metrics.generated.inc(len(token_ids))
        if events:
            gen.deliver(events)

    def _fail(self, gen: Generation, reason: str, message: str) -> None:
        if gen.failed:
            return
        gen.failed = True
        self.metrics.aborted.labels(reason).inc()
        gen.deliver([GenerationFailed(reason, message)])

    # ------------------------------------------------------------------ engine

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                kind=self.kind,
                waiting=0,
                running=sum(g.n for g in self._running),
                versions=tuple(sorted(self._policies)),
            )

    def wait_idle(self, timeout_s: float) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: not self._running, timeout_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        with self._lock:
            self._stopping = True
            running = list(self._running.items())
        for gen, task in running:
            self._fail(gen, "stopped", "the server is shutting down")
            with contextlib.suppress(RuntimeError):  # its loop may be closed already
                task.get_loop().call_soon_threadsafe(task.cancel)
        with self._lock:
            policies = list(self._policies.values()) + list(self._starting)
            self._policies.clear()
        for policy in policies:
            self._terminate(policy)
        sessions, self._sessions = self._sessions, {}
        for loop, session in sessions.items():
            _close_session(loop, session)


def _close_session(loop: asyncio.AbstractEventLoop, session: aiohttp.ClientSession) -> None:
    """Closes ``session`` on its own loop: waited for from another thread, scheduled from the
    loop's own; nothing to do once the loop has stopped (its connections go with it)."""
    if loop.is_closed() or not loop.is_running():
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
        if running is loop:
            loop.create_task(session.close())
            return
        future = asyncio.run_coroutine_threadsafe(session.close(), loop)
        with contextlib.suppress(Exception):
            future.result(timeout=5)


def start_guarded(
    command: list[str], log_path: Path, env: dict[str, str]
) -> tuple[subprocess.Popen, BinaryIO]:
    """Starts ``command`` (whose first word is a Python) under ``vllm_guard.py``; returns the
    guard's process and the write end of its pipe. The guard ends the command's process group
    when sent SIGTERM, and by itself when this process is gone however it ended (the write end,
    held only here, closes): no vLLM process is ever orphaned."""
    watch, lifeline = os.pipe()
    try:
        with log_path.open("wb") as out:
            process = subprocess.Popen(
                [command[0], str(GUARD), str(watch), *command],
                stdout=out, stderr=subprocess.STDOUT, env=env,
                pass_fds=(watch,), start_new_session=True,
            )  # fmt: skip
    except BaseException:
        os.close(lifeline)
        raise
    finally:
        os.close(watch)
    return process, os.fdopen(lifeline, "wb", buffering=0)


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux's /proc)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()


def _finish_reason(choice: dict[str, Any], sample: SampleText) -> FinishReason:
    """vLLM's reason for a sample our own rules did not end (they normally agree)."""
    if choice.get("finish_reason") == "length":
        return FinishReason.LENGTH
    stop = choice.get("stop_reason")
    if isinstance(stop, str) and stop:
        at = sample.text.find(stop)
        if at >= 0:
            sample.text = sample.text[: at + len(stop)]
        return FinishReason.STOP_SEQUENCE
    if sample.token_ids and sample.token_ids[-1] in sample.gen.policy.eos_token_ids:
        return FinishReason.EOS_TOKEN
    return FinishReason.LENGTH

"""Serving benchmark: the policy server's engines against their peers, on the same model, the
same 32 prompts (each served 3 times per run; every peer continues the token ids the policy
server makes of them, its chat template included) and the same settings, in one run.

    PYTHONPATH=. python bench/bench_serving.py                       # tiny + small, CPU, BPE family
    PYTHONPATH=. python bench/bench_serving.py --sizes small --no-vllm
    PYTHONPATH=. python bench/bench_serving.py --sizes 0.5b --device cuda --dtype bfloat16

Peers, for each model size and for greedy and sampled requests (temperature 0.8, top_p 0.95):

* ``engine cN``: ``rlhf serve policy`` (the native engine in a process of its own, the
  default) over gRPC, N concurrent clients in a closed loop (each sends its next
  request when the previous one returned), N = 1, 8, 32;
* ``in-process c32``: the same with the native engine in the server's process
  (``--engine.worker-process false``);
* ``http c32``: the same server process through its OpenAI door (``POST /v1/completions``,
  ``serving_http.py``), and the per-request cost of HTTP over gRPC (``http_vs_grpc``);
* ``static bN``: ``model.generate`` in this process on left-padded batches of N prompts;
* ``hf-continuous``: transformers' continuous batching (``generate_batch``), all prompts at once;
* ``vllm-engine c32``: ``rlhf serve policy --engine.kind vllm`` over gRPC (our server in front
  of a vLLM process), and ``vllm c32``: vLLM's own OpenAI server alone, over HTTP, token-id
  prompts. vLLM's environment is built on first use (``scripts/vllm_env.sh``); its CPU build
  needs head_dim >= 32, so sizes with smaller heads skip it (the reason is printed).

Every process runs one torch/OpenMP thread (``--threads``): on a small shared machine, threads
waiting on a descheduled sibling make runs incomparable. ``--engine-cpus`` (off by default)
gives each peer's model the same dedicated CPUs: the engine's worker process and vLLM's OpenMP
threads through ``--engine.cpus``, and this process while it runs ``model.generate`` itself;
the load generators, the servers' own threads and vLLM's API process then run on the other
CPUs (the engine in the server's process stays unpinned: it shares its process with the
server's threads). Throughput and latency come from unary requests; time to first token (TTFT)
from a second, streamed run of the same requests (the static baseline's TTFT is its batch
generating one token). Each figure is the median of ``--rounds`` rounds, the peers interleaved
within each round; each ratio is the median over rounds of the two peers' ratio within one
round (the machine's speed drifts more over minutes than over seconds). The table prints
tokens/s, p50 and p99 request latency and TTFT, for the native engine's rows how many decode
rows its forward passes averaged (``rows``, from the server's ``rlhf_policy_batch_size``
histogram: how full the clients kept its batch; a static batch always has its N), and the
ratios the goal is stated in (engine c32 against static b32 and against vLLM's server). On
CUDA it also reports the memory-bandwidth bound of single-stream decoding. The last line
printed is one JSON object: {"bench": "serving", ...}.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import torch
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serving_http import http_overhead, http_run  # noqa: E402
from serving_peers import (  # noqa: E402
    Run,
    Settings,
    grpc_run,
    hf_continuous_run,
    openai_run,
    percentile,
    static_run,
)

from rlhf import encoding  # noqa: E402
from rlhf.kafka_local import free_port  # noqa: E402
from rlhf.models import build_tiny, load_policy  # noqa: E402
from services.demo import scrape  # noqa: E402
from services.policy.config import parse_cpus  # noqa: E402
from services.policy.engines import cpu_list, pin_threads  # noqa: E402

# Peak memory bandwidth (GB/s) by device name, for the decode roofline.
BANDWIDTH_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "L4": 300.0}


def prompts(count: int) -> list[str]:
    topics = ["the sea", "a red fox", "compilers", "bread", "the moon", "old maps", "rain", "chess"]
    return [
        f"Request {i}: write a few words about {topics[i % len(topics)]}." for i in range(count)
    ]


def start_server(
    model_path: Path,
    port: int,
    args: argparse.Namespace,
    kind: str,
    http_port: int = -1,
    worker_process: bool = False,
    engine_cpus: str = "",
    metrics_port: int = -1,
) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "rlhf", "serve", "policy", "--engine.kind", kind,
        "--model.path", str(model_path), "--model.device", args.device, "--model.dtype", args.dtype,
        "--runtime.host", "127.0.0.1", "--runtime.port", str(port),
        "--runtime.metrics-host", "127.0.0.1", "--runtime.metrics-port", str(metrics_port),
        "--engine.max-batch-size", "32", "--engine.torch-threads", str(args.threads),
        "--limits.max-new-tokens", str(max(args.max_new_tokens, 64)),
        "--limits.max-input-tokens", "448",
        "--vllm.threads", str(args.threads),
        "--runtime.http-host", "127.0.0.1", "--runtime.http-port", str(http_port),
        "--engine.worker-process", str(worker_process).lower(), "--engine.cpus", engine_cpus,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(port: int, process: subprocess.Popen, timeout_s: float) -> None:
    """Until the server answers a one-token request (its model is loaded and warm)."""
    from rlhf.v1 import inference_pb2, inference_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the policy server exited with {process.returncode}")
            try:
                request = inference_pb2.GenerateRequest(
                    prompt="warm up",
                    parameters=inference_pb2.GenerationParameters(max_new_tokens=4),
                )
                stub.Generate(request, timeout=30)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(120)
    except subprocess.TimeoutExpired:
        process.kill()


def placement(spec: str, threads: int) -> tuple[list[int], list[int], str]:
    """(CPUs the models compute on, CPUs for everything else, why nothing is pinned) for
    ``--engine-cpus``: ``auto`` takes the last ``threads`` CPUs this process may use."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if spec == "auto":
        if len(allowed) <= threads:
            return [], [], f"{len(allowed)} CPUs: none left for the clients beside the model's"
        return allowed[-threads:], allowed[:-threads], ""
    engine = sorted(parse_cpus(spec))
    if not engine:
        return [], [], "--engine-cpus ''"
    rest = [cpu for cpu in allowed if cpu not in engine]
    if not set(engine) <= set(allowed) or not rest:
        raise SystemExit(f"--engine-cpus {spec}: this process may use CPUs {cpu_list(allowed)}")
    return engine, rest, ""


def pin(cpus: list[int]) -> None:
    """Every thread of this process onto ``cpus`` (nothing when empty)."""
    if cpus:
        pin_threads(cpus)


def batch_rows(metrics_port: int) -> tuple[float, float]:
    """(sum, count) of the server's ``rlhf_policy_batch_size`` histogram: decode rows per
    forward pass of its native engine (0s when its /metrics cannot be read)."""
    return (
        scrape(metrics_port, "rlhf_policy_batch_size_sum"),
        scrape(metrics_port, "rlhf_policy_batch_size_count"),
    )


def with_rows(
    metrics_port: int, run: Callable[[Settings, bool], Run]
) -> Callable[[Settings, bool], Run]:
    """``run``, its Run also carrying the engine's mean decode rows per step while it ran:
    how full the engine kept its batch (static batching's is its batch size). The server has
    stepped before (its readiness check), so a count of 0 means the scrape failed."""

    def measured(s: Settings, stream: bool) -> Run:
        rows_before, steps_before = batch_rows(metrics_port)
        result = run(s, stream)
        rows, steps = batch_rows(metrics_port)
        if steps_before and steps > steps_before:
            result.rows = (rows - rows_before) / (steps - steps_before)
        return result

    return measured


def _grpc(port: int, texts: list[str], c: int, s: Settings, stream: bool) -> Run:
    return grpc_run(port, texts, c, s, stream)


@contextlib.contextmanager
def computing(engine_cpus: list[int], rest: list[int]) -> Iterator[None]:
    """This process on the models' CPUs while it runs a model itself, then back."""
    pin(engine_cpus)
    try:
        yield
    finally:
        pin(rest)


def _static(
    model, tok, ids: list[list[int]], batch: int, cpus: tuple[list[int], list[int]], s: Settings,
    _stream: bool,
) -> Run:  # fmt: skip
    with computing(*cpus):
        return static_run(model, tok, ids, batch, s)


def summarise(runs: list[Run]) -> dict[str, float]:
    """Medians over rounds of tokens/s and of each round's latency and TTFT percentiles."""

    def med(f: Callable[[Run], float]) -> float:
        return round(statistics.median(f(r) for r in runs), 4)

    out = {
        "tokens_per_s": round(statistics.median(r.tokens_per_s for r in runs), 1),
        "p50_s": med(lambda r: percentile(r.latencies, 50)),
        "p99_s": med(lambda r: percentile(r.latencies, 99)),
    }
    if all(r.rows is not None for r in runs):
        out["rows"] = round(statistics.median(r.rows or 0.0 for r in runs), 1)
    if all(r.ttfts for r in runs):
        out["ttft_p50_s"] = med(lambda r: percentile(r.ttfts, 50))
        out["ttft_p99_s"] = med(lambda r: percentile(r.ttfts, 99))
    return out


def paired(rounds: dict[str, list[Run]], a: str, b: str) -> float:
    """The median over rounds of peer a's tokens/s over peer b's in the same round."""
    ratios = [x.tokens_per_s / y.tokens_per_s for x, y in zip(rounds[a], rounds[b], strict=True)]
    return round(statistics.median(ratios), 2)


def vllm_reason(model_path: Path, args: argparse.Namespace) -> str:
    """Why vLLM cannot run here (empty when it can)."""
    if args.no_vllm:
        return "--no-vllm"
    config = json.loads((model_path / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if args.device == "cpu" and head_dim < 32:
        return f"vLLM's CPU attention needs head_dim >= 32, this model has {head_dim}"
    from services.policy.engines.vllm import vllm_python

    try:
        vllm_python(build=True)
    except RuntimeError as exc:
        return f"vLLM's environment could not be built: {exc}"
    return ""


def bench_size(size: str, args: argparse.Namespace, tmp: Path) -> dict:
    model_path = build_tiny(tmp / size, seed=0, size=size, tokenizer=args.tokenizer)
    model, tok = load_policy(
        model_path,
        torch.device(args.device),
        None if args.dtype == "auto" else getattr(torch, args.dtype),
    )
    # The same prompts several times over: the servers reach a steady state, and the static
    # baseline runs as many full batches.
    texts = prompts(args.prompts) * args.passes
    # The token ids the policy server makes of each prompt (its chat template, when the model
    # has one): every peer continues exactly the same tokens.
    spec = encoding.spec_for_model(model_path, tok)
    ids = [encoding.prompt_ids(tok, spec, t) for t in texts]
    levels = [int(c) for c in args.concurrency.split(",")]
    top = max(levels)
    servers: dict[str, tuple[int, subprocess.Popen]] = {}
    metrics: dict[str, int] = {}  # the native engine's servers: their /metrics ports
    vllm_alone = None
    skipped = vllm_reason(model_path, args)
    engine_cpus, rest, _ = placement(args.engine_cpus, args.threads)
    try:
        native_http = free_port()
        # The native engine in its own process (the rows "engine"), and in the server's.
        for kind in ["native", "in-process"] + ([] if skipped else ["vllm"]):
            port = free_port()
            http = native_http if kind == "native" else -1
            if kind != "vllm":
                metrics[kind] = free_port()
            servers[kind] = (
                port,
                start_server(
                    model_path, port, args, "vllm" if kind == "vllm" else "native", http,
                    worker_process=kind == "native",
                    # The in-process engine shares its process with the server's threads.
                    engine_cpus=cpu_list(engine_cpus) if kind != "in-process" else "",
                    metrics_port=metrics.get(kind, -1),
                ),
            )  # fmt: skip
        pin(rest)  # the clients, and vLLM's API process started next
        if not skipped:
            from services.policy.config import VLLMConfig
            from services.policy.engines.vllm import VLLMEngine

            alone_engine = VLLMEngine(
                CollectorRegistry(),
                VLLMConfig(threads=args.threads),
                max_seq_len=512,
                dtype=args.dtype,
                cpus=frozenset(engine_cpus),
            )
            vllm_alone = alone_engine.load(model_path, "bench")
            alone_engine.warm_up(vllm_alone)
        for port, process in servers.values():
            wait_ready(port, process, 900)
        peers: dict[str, Callable[[Settings, bool], Run]] = {}
        native = servers["native"][0]
        rows = functools.partial(with_rows, metrics["native"])
        for c in levels:
            peers[f"engine c{c}"] = rows(functools.partial(_grpc, native, texts, c))
        peers[f"http c{top}"] = rows(functools.partial(http_run, native_http, texts, top))
        peers[f"in-process c{top}"] = with_rows(
            metrics["in-process"], functools.partial(_grpc, servers["in-process"][0], texts, top)
        )
        for b in levels:
            peers[f"static b{b}"] = functools.partial(
                _static, model, tok, ids, b, (engine_cpus, rest)
            )
        if not skipped:
            vport = servers["vllm"][0]
            peers[f"vllm-engine c{top}"] = lambda s, st: grpc_run(vport, texts, top, s, st)
            url = vllm_alone.url  # type: ignore[union-attr]
            peers[f"vllm c{top}"] = lambda s, st: openai_run(url, "bench", ids, top, s, st)
        result: dict = {
            "size": size,
            "weights_mb": round(
                sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1
            ),
        }
        for mode in ("greedy", "sampled"):
            settings = Settings(args.max_new_tokens, sampled=mode == "sampled")
            for run in peers.values():  # warm-up, not counted
                run(Settings(4, settings.sampled), False)
            rounds: dict[str, list[Run]] = {name: [] for name in peers}
            ttft: dict[str, list[Run]] = {name: [] for name in peers}
            for _ in range(args.rounds):
                for name, run in peers.items():
                    rounds[name].append(run(settings, False))
                    if not name.startswith("static"):
                        ttft[name].append(run(settings, True))
            table = {}
            for name in peers:
                row = summarise(rounds[name])
                if ttft[name]:
                    streamed = summarise(ttft[name])
                    row["ttft_p50_s"], row["ttft_p99_s"] = (
                        streamed["ttft_p50_s"],
                        streamed["ttft_p99_s"],
                    )
                elif rounds[name][0].ttfts:
                    row |= {
                        k: v for k, v in summarise(rounds[name]).items() if k.startswith("ttft")
                    }
                table[name] = row
            if not args.no_hf_cb:
                fresh, _ = load_policy(model_path, torch.device(args.device))
                # One pass over the prompts: at its speed on CPU three would take minutes.
                once = ids[: args.prompts]
                with computing(engine_cpus, rest):
                    continuous = hf_continuous_run(fresh, tok, once, settings)
                table["hf-continuous"] = summarise([continuous])
            engine = table[f"engine c{top}"]["tokens_per_s"]
            pair = functools.partial(paired, rounds)
            ratios = {f"engine_c{top}_vs_static_b{top}": pair(f"engine c{top}", f"static b{top}")}
            if not skipped:
                ratios[f"engine_c{top}_vs_vllm_c{top}"] = pair(f"engine c{top}", f"vllm c{top}")
                ratios[f"vllm_engine_vs_vllm_c{top}"] = pair(f"vllm-engine c{top}", f"vllm c{top}")
            for name in ("in-process", "http"):
                ratios[f"{name.replace('-', '_')}_c{top}_vs_engine_c{top}"] = pair(
                    f"{name} c{top}", f"engine c{top}"
                )
            if "hf-continuous" in table:
                ratios[f"engine_c{top}_vs_hf_continuous"] = round(
                    engine / table["hf-continuous"]["tokens_per_s"], 2
                )
            result[mode] = {"table": table, "ratios": ratios}
            print_table(size, mode, table, ratios, skipped)
        result["http_vs_grpc"] = http_overhead(native, native_http)
        print(f"\n{size}: HTTP vs gRPC per request {result['http_vs_grpc']}", flush=True)
        if skipped:
            result["vllm_skipped"] = skipped
        if args.device.startswith("cuda"):
            result |= roofline(model, result)
        return result
    finally:
        for _, process in servers.values():
            stop(process)
        if vllm_alone is not None:
            alone_engine.unload(vllm_alone)


def print_table(size: str, mode: str, table: dict, ratios: dict, skipped: str) -> None:
    print(f"\n{size} / {mode}: tokens/s, request latency and time to first token (s)", flush=True)
    print(
        f"  {'peer':<18}{'tok/s':>10}{'p50':>9}{'p99':>9}{'ttft p50':>10}{'ttft p99':>10}"
        f"{'rows':>7}"
    )
    for name, row in table.items():
        cells = [row.get(k, float("nan")) for k in ("p50_s", "p99_s", "ttft_p50_s", "ttft_p99_s")]
        print(
            f"  {name:<18}{row['tokens_per_s']:>10.0f}"
            + "".join(f"{c:>9.3f} " for c in cells)
            + f"{row.get('rows', float('nan')):>6.1f}"
        )
    if skipped:
        print(f"  vLLM skipped: {skipped}")
    print("  ratios: " + ", ".join(f"{k} {v}x" for k, v in ratios.items()), flush=True)


def roofline(model: torch.nn.Module, result: dict) -> dict:
    name = torch.cuda.get_device_name()
    bandwidth = next((bw for key, bw in BANDWIDTH_GBS.items() if key in name), None)
    if not bandwidth:
        return {"device": name}
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bound = bandwidth * 1e9 / weight_bytes
    c1 = result["greedy"]["table"].get("engine c1", {}).get("tokens_per_s", 0.0)
    return {
        "device": name, "bandwidth_gbs": bandwidth,
        "single_stream_bound_tokens_per_s": round(bound, 1),
        "c1_fraction_of_bound": round(c1 / bound, 3),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", default="tiny,small", help="rlhf.models sizes: tiny, small, 0.5b"
    )
    parser.add_argument(
        "--tokenizer",
        default="bpe",
        choices=["bpe", "byte"],
        help="model family: bpe (Qwen2, grouped-query, head_dim 32: vLLM runs at every size) "
        "or byte (Llama; head_dim 16 at tiny, too small for vLLM's CPU attention)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per process")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=32, help="distinct prompts")
    parser.add_argument(
        "--passes", type=int, default=3, help="each run serves the prompts this many times over"
    )
    parser.add_argument(
        "--concurrency", default="1,8,32", help="client concurrency = static batch sizes"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--engine-cpus",
        default="",
        help="CPUs every peer's model computes on, e.g. 3 or 2-3 (auto: the last --threads "
        "CPUs, when CPUs are left for the clients; default '': nothing pinned)",
    )
    parser.add_argument("--no-vllm", action="store_true", help="skip vLLM (engine and server)")
    parser.add_argument(
        "--no-hf-cb", action="store_true", help="skip transformers' continuous batching"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report: dict = {"bench": "serving", "device": args.device, "threads": args.threads,
                    "family": args.tokenizer,
                    "max_new_tokens": args.max_new_tokens, "prompts": args.prompts, "passes": args.passes}  # fmt: skip
    engine_cpus, rest, unpinned = placement(args.engine_cpus, args.threads)
    report["engine_cpus"] = cpu_list(engine_cpus) if engine_cpus else f"not pinned: {unpinned}"
    print(f"models compute on CPUs {report['engine_cpus']}, clients on {cpu_list(rest) or '-'}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            report[size] = bench_size(size, args, Path(tmp))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

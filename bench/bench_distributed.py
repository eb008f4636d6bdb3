"""Distributed trainer benchmark: PPO-ptx episodes/s and RM comparisons/s of the trainer's own
round functions over 1 and 2 processes (torchrun, FSDP2; gloo on CPU, NCCL on CUDA),
measured in one run and printed as ratios.

    PYTHONPATH=. python bench/bench_distributed.py [--size small|tiny] [--device cpu|cuda]

Each process count runs the same rounds on the same records: an RM round (K = 4 rankings)
and a PPO-ptx round (rollouts, then PPO-ptx steps). The rates count only the rounds'
training (RM) and generation + training (PPO-ptx) phases, not model loading or the gates'
evaluations. On CPU every process gets the same torch threads (``--threads``, 1 by
default), so the ratio is what a second rank on its own core buys: data parallelism against
FSDP2's collectives (every forward pass gathers each layer's shards, every backward pass
reduce-scatters its gradients, and a rollout does that for every generated token). One
thread per process also keeps torch's thread pools from spinning against each other on a
machine shared with other work. The process counts run alternately ``--repeats`` times and
each keeps its best rate (the run least disturbed by other load). The last line printed is
one JSON object {"bench": "distributed", ...}.

The default model is ``small`` (4.3 M parameters): on ``tiny`` a step's compute is so small
that the collectives' latency decides, and a second process only costs time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(args: argparse.Namespace) -> None:
    """One rank (run by torchrun): both rounds, rates printed by rank 0."""
    import torch

    from rlhf import models
    from trainer.config import GatesConfig, PPOConfig, RMConfig, TrainerConfig
    from trainer.corpus import PretrainCorpus
    from trainer.data import Comparison, Source
    from trainer.distributed import Dist
    from trainer.ppo_round import run_ppo_round
    from trainer.rm_round import run_rm_round
    from trainer.round import RoundContext
    from trainer.simulator import corpus_sentences, make_prompts

    torch.set_num_threads(args.threads)
    cfg = TrainerConfig(
        registry=Path(args.work) / "registry", base_model=Path(args.work) / "base",
        device=args.device, progress="off", gates=GatesConfig(enabled=False),
        rm=RMConfig(epochs=1, batch_prompts=args.rm_batch, fit_bias=False),
        ppo=PPOConfig(episodes=args.episodes, minibatch_size=args.episodes // 2, iterations=args.iterations,
                      max_new_tokens=args.new_tokens, ptx_ratio=2, ema_decay=0.0, warmup_iters=0),
    )  # fmt: skip
    dist = Dist.start(cfg.distributed, args.device)
    tok = models.load_tokenizer(cfg.base_model / "policy")
    spec = cfg.encoding.resolve(tok)
    corpus = PretrainCorpus(ROOT / "data" / "pretrain.txt")
    prompts = make_prompts(corpus_sentences(ROOT / "data" / "pretrain.txt"), 64, seed=1)
    comparisons = [
        Comparison(f"c{i}", prompts[i % len(prompts)], tuple(f"answer {j} to {i}" * (j + 1) for j in range(4)),
                   (1, 2, 3, 4), "u", "l", "train", Source("t", 0, i))
        for i in range(args.comparisons)
    ]  # fmt: skip
    out: dict[str, float] = {}
    for kind in ("rm", "ppo"):
        ctx = RoundContext(cfg, corpus, dist.device, kind, spec, torch.float32, dist=dist)
        if kind == "rm":
            run_rm_round(ctx, comparisons, val=[], test=[], bias_demos=[])
            out["rm_comparisons_per_s"] = len(comparisons) / ctx.phases["training"]
        else:
            run_ppo_round(ctx, prompts, val_prompts=prompts[:2])
            spent = ctx.phases["generation"] + ctx.phases["training"]
            out["ppo_episodes_per_s"] = args.episodes * args.iterations / spent
    if dist.is_main:
        print("RATES " + json.dumps(out), flush=True)
    dist.close()


def run(nproc: int, args: argparse.Namespace, work: Path) -> dict[str, float]:
    threads = args.threads
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           __file__, "--worker", "--work", str(work), "--threads", str(threads), "--device", args.device,
           "--episodes", str(args.episodes), "--iterations", str(args.iterations),
           "--new-tokens", str(args.new_tokens), "--comparisons", str(args.comparisons),
           "--rm-batch", str(args.rm_batch)]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    rates = [line for line in done.stdout.splitlines() if line.startswith("RATES ")]
    if done.returncode != 0 or not rates:
        raise SystemExit(f"{nproc} process(es) failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    print(
        f"  {nproc} process(es), {threads} thread(s) each: {time.monotonic() - started:.0f}s wall"
    )
    return json.loads(rates[-1].removeprefix("RATES "))  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=("small", "tiny"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each process count")
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--comparisons", type=int, default=64)
    parser.add_argument("--rm-batch", type=int, default=16)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", default="", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.worker:
        worker(args)
        return 0
    from rlhf import models

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models.init_models(models.InitConfig(out=str(work / "base"), size=args.size))
        print(f"distributed trainer, {args.size} model on {args.device}: {args.episodes} episodes x "
              f"{args.iterations} PPO-ptx iterations, {args.comparisons} K=4 comparisons")  # fmt: skip
        best: dict[int, dict[str, float]] = {1: {}, 2: {}}
        for _ in range(args.repeats):
            for nproc in (1, 2):
                rates = run(nproc, args, work)
                best[nproc] = {k: max(v, best[nproc].get(k, 0.0)) for k, v in rates.items()}
        one, two = best[1], best[2]
    result = {"bench": "distributed", "size": args.size, "device": args.device,
              "threads_per_process": args.threads, "repeats": args.repeats}  # fmt: skip
    for key in ("ppo_episodes_per_s", "rm_comparisons_per_s"):
        ratio = two[key] / one[key]
        print(f"  {key}: 1 process {one[key]:.2f}, 2 processes {two[key]:.2f} (x{ratio:.2f})")
        result[key] = {"1": round(one[key], 3), "2": round(two[key], 3), "ratio": round(ratio, 3)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

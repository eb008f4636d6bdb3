"""One SFT, one RM and one PPO-ptx round of the trainer on one model: times, peak memory,
what was published.

    PYTHONPATH=. python scripts/gpu_rounds.py --size 0.5b --tokenizer bpe --device cuda
    PYTHONPATH=. python scripts/gpu_rounds.py --size tiny --tokenizer bpe --device cpu  # smoke

The trainer's own round functions (``trainer/sft_round.py``, ``rm_round.py``,
``ppo_round.py``) with its own loading (fp32 master weights, bf16 autocast on CUDA), encoding
(the chat template of the BPE family) and publishing (``publish_dtype``: bf16 on CUDA) run
on data built from ``data/`` without Kafka: conversations whose responses a simulated
labeler ranks by a hidden preference (``trainer/simulator.py``). Each round's candidate is
published into a fresh registry the way the trainer publishes it, so the next round
continues from it. Gates are evaluated and reported, not enforced (random weights).

Prints one JSON line per round ({"round": ..., "seconds": ..., "peak_memory_gib": ...}) and
a last JSON line {"check": "gpu_rounds", ...}.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf import checkpoint, models  # noqa: E402
from rlhf.chat import Message, Prompt  # noqa: E402
from trainer import registry as registry_lib  # noqa: E402
from trainer import state as state_lib  # noqa: E402
from trainer.config import (  # noqa: E402
    EncodingConfig,
    GatesConfig,
    PPOConfig,
    RMConfig,
    SFTConfig,
    TrainerConfig,
)
from trainer.corpus import PretrainCorpus  # noqa: E402
from trainer.data import Comparison, Demonstration, Source  # noqa: E402
from trainer.ppo_round import run_ppo_round  # noqa: E402
from trainer.rm_round import run_rm_round  # noqa: E402
from trainer.round import Candidate, RoundContext  # noqa: E402
from trainer.sft_round import run_sft_round  # noqa: E402
from trainer.simulator import HiddenPreference, corpus_sentences, dense_ranks  # noqa: E402

CORPUS = ROOT / "data" / "pretrain.txt"
K = 4


def conversations(sentences: list[str], n: int, seed: int) -> list[Prompt]:
    rng = random.Random(seed)
    return [
        (Message("system", "Answer in one sentence."),
         Message("user", f"{i:04d} {rng.choice(sentences)} What do you think?"))
        for i in range(n)
    ]  # fmt: skip


def build_data(n: int, seed: int) -> dict[str, list]:
    sentences = corpus_sentences(CORPUS)
    rng = random.Random(seed)
    prefer = HiddenPreference()
    src = Source("synthetic", 0, 0)
    prompts = conversations(sentences, 3 * n, seed)
    demos = [Demonstration(f"d{i}", p, rng.choice(sentences), f"u{i}", "train", src)
             for i, p in enumerate(prompts[:n])]  # fmt: skip
    comparisons = []
    for i, p in enumerate(prompts[n : 2 * n]):
        responses = tuple(rng.sample(sentences, K))
        ranks = tuple(dense_ranks([prefer.score(r) for r in responses]))
        comparisons.append(
            Comparison(f"c{i}", p, responses, ranks, f"u{i}", "labeler", "train", src)
        )
    return {"demos": demos, "comparisons": comparisons, "prompts": prompts[2 * n :]}


def publish(registry: Path, round_type: str, candidate: Candidate, spec: dict) -> str:
    """The trainer's publish order (``trainer.rounds``): state, then the checkpoint."""
    version = checkpoint.next_version(registry, candidate.role)
    if candidate.save_state is not None:
        with checkpoint.staging(registry) as tmp:
            candidate.save_state(tmp)
            state_lib.publish(registry, tmp, version, round_type)
    with checkpoint.staging(registry) as tmp:
        candidate.save(tmp)
        checkpoint.publish(
            registry, candidate.role, tmp, round_type=round_type, parent=candidate.parent,
            metrics=candidate.metrics, version=version,
            reference=candidate.reference or version, encoding=spec,
        )  # fmt: skip
    return version


def weights_dtype(path: Path) -> str:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return str(f.get_slice(next(iter(f.keys()))).get_dtype())


def peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="0.5b", choices=models.SIZE_NAMES)
    parser.add_argument("--tokenizer", default="bpe", choices=models.FAMILIES)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--examples", type=int, default=64, help="demonstrations, comparisons")
    parser.add_argument("--episodes", type=int, default=32, help="PPO episodes per iteration")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"check": "gpu_rounds", "error": "torch sees no CUDA device"}))
        return 1
    torch.manual_seed(0)
    summary: dict = {"check": "gpu_rounds", "size": args.size, "tokenizer": args.tokenizer,
                     "device": args.device}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        base, registry = Path(tmp) / "base", Path(tmp) / "registry"
        start = time.perf_counter()
        models.init_models(
            models.InitConfig(out=str(base), size=args.size, tokenizer=args.tokenizer)
        )
        summary["build_seconds"] = round(time.perf_counter() - start, 2)
        cfg = TrainerConfig(
            registry=registry, base_model=base, pretrain_corpus=CORPUS, device=args.device,
            progress="off", encoding=EncodingConfig(max_prompt_tokens=64, max_response_tokens=64),
            sft=SFTConfig(lr=1e-5, epochs=1, batch_size=16),
            rm=RMConfig(lr=1e-5, epochs=1, batch_prompts=8),
            ppo=PPOConfig(lr=1e-6, episodes=args.episodes, minibatch_size=8, iterations=2,
                          max_new_tokens=32, ema_decay=0.992, gamma_ptx=27.8, ptx_ratio=8),
            gates=GatesConfig(eval_prompts=16, eval_ptx_examples=16),
        )  # fmt: skip
        spec = registry_lib.encoding_spec(cfg)
        summary["encoding"] = spec.to_dict()
        publish_dtype = registry_lib.publish_dtype(cfg.publish_dtype, args.device)
        corpus = PretrainCorpus(CORPUS, cfg.ptx_holdout_fraction)
        data = build_data(args.examples, cfg.seed)
        val = data["prompts"][: cfg.gates.eval_prompts]
        rounds = {
            "sft": lambda ctx: run_sft_round(ctx, data["demos"], data["demos"][:8]),
            "rm": lambda ctx: run_rm_round(
                ctx, data["comparisons"], val=data["comparisons"][:8], test=[],
                bias_demos=data["demos"],
            ),
            "ppo": lambda ctx: run_ppo_round(ctx, data["prompts"], val_prompts=val),
        }  # fmt: skip
        for index, (round_type, run) in enumerate(rounds.items()):
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            ctx = RoundContext(cfg, corpus, args.device, round_type, spec, publish_dtype, index)
            start = time.perf_counter()
            candidate = run(ctx)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            version = publish(registry, round_type, candidate, spec.to_dict())
            line = {
                "round": round_type,
                "seconds": round(seconds, 2),
                "phases": {k: round(v, 2) for k, v in ctx.phases.items()},
                "peak_memory_gib": round(peak_memory_gib(args.device), 2),
                "published": version,
                "published_dtype": weights_dtype(registry / candidate.role / version),
                "gate": candidate.gate.describe(),
                "metrics": {k: round(v, 4) for k, v in candidate.metrics.items()},
            }
            print(json.dumps(line), flush=True)
            summary[f"{round_type}_seconds"] = line["seconds"]
            summary[f"{round_type}_peak_memory_gib"] = line["peak_memory_gib"]
            summary[f"{round_type}_published_dtype"] = line["published_dtype"]
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Trainer benchmark: RM comparisons/s (K-way, side by side with TRL's RewardTrainer on the same
pairs and model), PPO-ptx episodes/s, and where a PPO iteration spends its time.

    PYTHONPATH=. python bench/bench_trainer.py [--size tiny|small] [--device cpu|cuda] [--no-trl]

TRL is installed for this benchmark only, into its own virtualenv under ~/.cache/rlhf (it sees
the main environment's torch and transformers through a .pth file and adds trl, accelerate and
datasets next to them); the main environment is never touched. The TRL side runs in a
subprocess of that venv. The last line printed is one JSON object {"bench": "trainer", ...}.

What is compared: the same K=4 rankings. Ours forwards each of the K responses once per
prompt and trains on all C(K,2)=6 pairs of the prompt in one batch element (PAPER.md); TRL
takes the 6 pairs as 6 (chosen, rejected) rows and forwards 12 sequences. Both use the same
initial weights (a Llama trunk with a scalar head on the last token), AdamW, fp32 on CPU,
and the same pairs per optimizer step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf import encoding, models  # noqa: E402
from trainer import ppo  # noqa: E402
from trainer import rm as rm_steps  # noqa: E402
from trainer.corpus import PretrainCorpus  # noqa: E402
from trainer.simulator import HiddenPreference, corpus_sentences, dense_ranks, make_prompts  # noqa: E402

K = 4
# Raw prompts (the byte family has no chat template), 64 prompt and 128 response tokens.
SPEC = encoding.EncodingSpec(max_prompt_tokens=64, max_response_tokens=128)
TRL_REQUIREMENTS = ["trl==1.16.0"]

_TRL_SCRIPT = r"""
import json, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from trl import RewardConfig, RewardTrainer

spec = json.load(open(sys.argv[1]))
torch.set_num_threads(spec["threads"])
tok = AutoTokenizer.from_pretrained(spec["model"])
model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1)
model.config.pad_token_id = tok.pad_token_id
ds = Dataset.from_list(spec["pairs"])
stamps = []

class Clock(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        stamps.append(time.perf_counter())

args = RewardConfig(output_dir=spec["out"], per_device_train_batch_size=spec["pairs_per_step"],
                    max_steps=spec["steps"], learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.95,
                    logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=spec["device"] == "cpu",
                    dataloader_num_workers=0, max_length=spec["max_length"], seed=0, bf16=False)
trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
trainer.train()
timed = len(stamps) - 1
print(json.dumps({"pairs_per_s": spec["pairs_per_step"] * timed / (stamps[-1] - stamps[0]), "steps": len(stamps)}))
"""


def trl_python() -> Path:
    """The benchmark's own venv with TRL (created on first use, reused afterwards)."""
    key = hashlib.sha256((sys.executable + " ".join(TRL_REQUIREMENTS)).encode()).hexdigest()[:12]
    venv = Path(os.environ.get("RLHF_CACHE", Path.home() / ".cache" / "rlhf")) / f"bench-trl-{key}"
    python = venv / "bin" / "python"
    if (venv / ".complete").is_file():
        return python
    print(f"installing {' '.join(TRL_REQUIREMENTS)} into {venv} (first run only)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                          check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    main_site = next(p for p in sys.path if p.endswith("site-packages"))
    # The main environment's torch/transformers are visible, so pip adds only TRL's own deps.
    Path(site, "rlhf-main-env.pth").write_text(main_site + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    *TRL_REQUIREMENTS], check=True)  # fmt: skip
    (venv / ".complete").touch()
    return python


def make_rankings(n: int, seed: int = 0) -> list[tuple[str, list[str], list[int]]]:
    """``n`` prompts with K corpus-sentence responses each, ranked by the hidden preference."""
    sentences = corpus_sentences(ROOT / "data" / "pretrain.txt")
    rng = random.Random(seed)
    pref = HiddenPreference()
    out = []
    for prompt in make_prompts(sentences, n, seed):
        responses = rng.sample(sentences, K)
        ranks = dense_ranks([pref.score(r) for r in responses])
        if len(set(ranks)) > 1:
            out.append((prompt, responses, ranks))
    return out


def pairs_of(rankings: list[tuple[str, list[str], list[int]]]) -> list[dict[str, str]]:
    """The same rankings as TRL's (chosen, rejected) rows: every untied pair."""
    rows = []
    for prompt, responses, ranks in rankings:
        for i in range(len(responses)):
            for j in range(len(responses)):
                if ranks[i] < ranks[j]:
                    rows.append(
                        {"chosen": f"{prompt}{responses[i]}", "rejected": f"{prompt}{responses[j]}"}
                    )
    return rows


def bench_rm(
    policy_dir: Path, rankings: list, prompts_per_step: int, steps: int, device: str
) -> dict:
    rm, tok = models.reward_model_from_policy(policy_dir, device)
    rm.requires_grad_(True)
    optimizer = torch.optim.AdamW(rm.parameters(), lr=1e-3, betas=(0.9, 0.95))
    batches = [
        rankings[i : i + prompts_per_step] for i in range(0, len(rankings), prompts_per_step)
    ]
    encoded = [
        rm_steps.encode_rankings(tok, SPEC, [p for p, _, _ in b], [r for _, r, _ in b], [k for _, _, k in b])
        for b in batches
    ]  # fmt: skip
    pairs = 0
    rm_steps.rm_step(rm, optimizer, encoded[0])  # warm-up
    start = time.perf_counter()
    for i in range(steps):
        stats = rm_steps.rm_step(rm, optimizer, encoded[(i + 1) % len(encoded)])
        pairs += stats.pairs
    elapsed = time.perf_counter() - start
    rankings_done = steps * prompts_per_step
    return {"rm_rankings_per_s": rankings_done / elapsed, "rm_pairs_per_s": pairs / elapsed,
            "rm_pairs_per_step": pairs / steps}  # fmt: skip


def bench_trl(
    policy_dir: Path, rankings: list, pairs_per_step: int, steps: int, device: str
) -> dict:
    python = trl_python()
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"model": str(policy_dir), "pairs": pairs_of(rankings), "pairs_per_step": pairs_per_step,
                "steps": steps + 1, "out": tmp, "device": device, "max_length": 192,
                "threads": torch.get_num_threads()}  # fmt: skip
        Path(tmp, "spec.json").write_text(json.dumps(spec))
        Path(tmp, "trl_bench.py").write_text(_TRL_SCRIPT)
        done = subprocess.run([str(python), str(Path(tmp, "trl_bench.py")), str(Path(tmp, "spec.json"))],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"TRL benchmark failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def bench_ppo(policy_dir: Path, reward_dir: Path, episodes: int, minibatch: int, iterations: int,
              gamma_ptx: float, device: str) -> dict:  # fmt: skip
    policy, tok = models.load_policy(policy_dir, device)
    reference, _ = models.load_policy(policy_dir, device)
    rm, _ = models.load_reward_model(reward_dir, device)
    value = ppo.value_model_from_rm(rm)
    optimizer = torch.optim.AdamW(
        [*policy.parameters(), *value.parameters()], lr=1e-4, betas=(0.9, 0.95)
    )
    corpus = PretrainCorpus(ROOT / "data" / "pretrain.txt")
    prompts = make_prompts(corpus_sentences(ROOT / "data" / "pretrain.txt"), episodes, seed=3)
    rng = random.Random(0)
    times = {"generation": 0.0, "scoring": 0.0, "training": 0.0}
    for it in range(iterations + 1):  # iteration 0 warms up and is not counted
        t0 = time.perf_counter()
        ids, mask = encoding.encode_prompts(tok, SPEC, prompts)
        ppo.sample(policy, ids, mask, max_new_tokens=32, eos=ppo.eos_ids(policy, tok))
        t1 = time.perf_counter()
        ro = ppo.rollout(
            policy, reference, value, rm, tok, SPEC, prompts, beta=0.02, max_new_tokens=32
        )
        t2 = time.perf_counter()
        for mb in ro.minibatches(minibatch):
            ptx = encoding.encode_texts(tok, corpus.sample(8 * len(mb), rng), 64)
            ppo.ppo_step(policy, value, optimizer, mb, ptx=ptx, gamma_ptx=gamma_ptx)
        t3 = time.perf_counter()
        if it:
            # rollout() samples and then scores; the bare sample call measures the first part.
            times["generation"] += t1 - t0
            times["scoring"] += max(0.0, (t2 - t1) - (t1 - t0))
            times["training"] += t3 - t2
    total = sum(times.values())
    return {
        "ppo_episodes_per_s": iterations * episodes / total,
        "ppo_seconds_per_iteration": total / iterations,
        "ppo_time_share": {k: round(v / total, 3) for k, v in times.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="tiny", choices=sorted(models.SIZES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rm-steps", type=int, default=30)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--ppo-episodes", type=int, default=64)
    parser.add_argument("--ppo-iterations", type=int, default=3)
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL side (no install)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result: dict[str, object] = {"bench": "trainer", "size": args.size, "device": args.device,
                                 "threads": args.threads, "k": K}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        policy_dir, reward_dir = models.init_models(
            models.InitConfig(out=str(base), size=args.size)
        )
        rankings = make_rankings(args.prompts_per_step * (args.rm_steps + 1))
        ours = bench_rm(policy_dir, rankings, args.prompts_per_step, args.rm_steps, args.device)
        result.update({k: round(v, 2) for k, v in ours.items()})
        print(f"RM (K-way, ours): {ours['rm_pairs_per_s']:.1f} pairs/s", file=sys.stderr)
        if not args.no_trl:
            trl = bench_trl(
                policy_dir, rankings, round(ours["rm_pairs_per_step"]), args.rm_steps, args.device
            )
            result["trl_pairs_per_s"] = round(trl["pairs_per_s"], 2)
            result["rm_speedup_vs_trl"] = round(ours["rm_pairs_per_s"] / trl["pairs_per_s"], 2)
            print(f"RM (TRL RewardTrainer): {trl['pairs_per_s']:.1f} pairs/s", file=sys.stderr)
        result.update(bench_ppo(policy_dir, reward_dir, args.ppo_episodes, 16, args.ppo_iterations,
                                27.8, args.device))  # fmt: skip
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

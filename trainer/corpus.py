"""The pretraining corpus of PPO-ptx (and of the pretraining-loss gate).

A ``.txt`` file gives one example per non-empty line; a ``.jsonl`` file one example per
record's ``"text"``. The last ``holdout_fraction`` of the examples is kept out of training:
it measures the "alignment tax" (does the policy's pretraining loss regress?).
"""

from __future__ import annotations

import json
import random
from pathlib import Path


class PretrainCorpus:
    def __init__(self, path: str | Path, holdout_fraction: float = 0.1) -> None:
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            examples = [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
        else:
            examples = [line.strip() for line in text.splitlines() if line.strip()]
        if len(examples) < 2:
            raise ValueError(f"{path}: a pretraining corpus needs at least 2 examples")
        n_holdout = max(1, int(len(examples) * holdout_fraction))
        self.train = examples[:-n_holdout]
        self.holdout = examples[-n_holdout:]

    def sample(self, n: int, rng: random.Random) -> list[str]:
        """``n`` training examples drawn with replacement (8 per RL episode in the paper)."""
        return [rng.choice(self.train) for _ in range(n)]

    def holdout_examples(self, n: int) -> list[str]:
        """The first ``n`` held-out examples: the same set every time, so losses compare."""
        return self.holdout[:n]

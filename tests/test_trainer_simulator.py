"""Simulated labelers: the hidden preference, calibrated label noise, and both output paths
(Kafka events for the trainer's test, gateway requests for the demo client)."""

from __future__ import annotations

import random
import uuid

import pytest

from rlhf.v1 import events_pb2
from trainer.simulator import (
    Candidate,
    HiddenPreference,
    SimulatedLabeler,
    dense_ranks,
    noisy_ranks,
)


def test_hidden_preference_is_the_rate_of_target_bytes():
    pref = HiddenPreference("e")
    assert pref.score("eeee") == 1.0
    assert pref.score("tree") == 0.5
    assert pref.score("") == 0.0
    assert pref.mean(["ee", "xx"]) == 0.5


def test_dense_ranks_share_ranks_on_ties():
    assert dense_ranks([0.1, 0.5, 0.5, 0.0]) == [2, 1, 1, 3]


@pytest.mark.parametrize("noise", [0.0, 0.1, 0.27])
def test_label_noise_flips_the_requested_fraction_of_pairs(noise):
    rng = random.Random(0)
    flipped = pairs = 0
    for _ in range(3000):
        scores = [rng.random() for _ in range(4)]
        ranks = noisy_ranks(scores, noise, rng)
        for i in range(4):
            for j in range(4):
                if scores[i] > scores[j]:
                    pairs += 1
                    flipped += ranks[i] > ranks[j]
    assert abs(flipped / pairs - noise) < 0.015


def test_labeler_ranks_distinct_samples_and_writes_events_and_requests():
    labeler = SimulatedLabeler("lab-1", HiddenPreference("e"))

    def sample(prompt: str, k: int) -> list[Candidate]:
        texts = ["eee", "xex", "xxx", "eee"][:k]  # a repeated text is ranked once
        return [Candidate(t, generation_id=uuid.uuid4().hex, model_version="v1") for t in texts]

    ranking = labeler.rank("a prompt", "user-1", sample, 4)
    assert ranking is not None
    assert [c.text for c in ranking.candidates] == ["eee", "xex", "xxx"]
    assert ranking.ranks == (1, 2, 3)
    event = ranking.to_event(events_pb2.SPLIT_TEST)
    assert [r.rank for r in event.responses] == [1, 2, 3]
    assert event.split == events_pb2.SPLIT_TEST and event.event_id
    request = ranking.to_request()
    assert [r.generation_id for r in request.responses] == [
        c.generation_id for c in ranking.candidates
    ]
    assert list(request.ranks) == [1, 2, 3]
    # Nothing to order: all samples score the same.
    assert labeler.rank("p", "u", lambda _p, k: [Candidate("ab"), Candidate("cd")], 2) is None


def test_demonstrations_are_the_drafts_richest_in_the_property():
    demo = SimulatedLabeler("writer").demonstrate("p", "u", ["xyz", "see the tree", "a cat"])
    assert demo.response == "see the tree"
    assert demo.to_event(events_pb2.SPLIT_TRAIN).response == "see the tree"
    assert demo.to_request().idempotency_key == demo.idempotency_key

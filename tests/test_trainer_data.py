"""The trainer's data rules: dedupe, per-user cap, near-duplicates, splits, resume offsets,
and the same rules applied to records read from a real Kafka broker."""

from __future__ import annotations

import time
import uuid

from prometheus_client import CollectorRegistry

from rlhf import bus
from rlhf.v1 import events_pb2
from trainer.config import DataConfig
from trainer.data import Source, StreamReader, StreamTopics, TrainingData, near_dup_key
from trainer.metrics import TrainerMetrics

TRAIN, VAL, TEST = events_pb2.SPLIT_TRAIN, events_pb2.SPLIT_VALIDATION, events_pb2.SPLIT_TEST


def demo(i: int, *, prompt: str | None = None, user: str = "u1", split: int = TRAIN,
         event_id: str | None = None) -> events_pb2.DemonstrationEvent:  # fmt: skip
    return events_pb2.DemonstrationEvent(
        event_id=event_id or f"d{i}", prompt=prompt or f"{i:04d} prompt", response=f"response {i}",
        user_id=user, split=split,  # type: ignore[arg-type]
    )  # fmt: skip


def comparison(
    i: int, ranks: tuple[int, ...] = (1, 2), split: int = TRAIN
) -> events_pb2.ComparisonEvent:
    return events_pb2.ComparisonEvent(
        event_id=f"c{i}", prompt=f"{i:04d} compare", user_id="u1", split=split,  # type: ignore[arg-type]
        responses=[events_pb2.RankedResponse(text=f"r{j}", rank=r) for j, r in enumerate(ranks)],
    )  # fmt: skip


def src(offset: int, topic: str = "rlhf.demonstrations", partition: int = 0) -> Source:
    return Source(topic, partition, offset)


def test_duplicate_event_ids_count_once():
    data = TrainingData(DataConfig())
    assert data.add("demonstrations", demo(1), src(0)) == "accepted"
    assert data.add("demonstrations", demo(1), src(1)) == "duplicate"
    assert len(data.pending_demonstrations) == 1


def test_per_user_cap_counts_distinct_prompts_across_kinds():
    data = TrainingData(DataConfig(user_prompt_cap=3))
    outcomes = [data.add("demonstrations", demo(i, user="alice"), src(i)) for i in range(4)]
    assert outcomes == ["accepted"] * 3 + ["user_cap"]
    # The same prompt again (another kind) is not a new prompt for the cap.
    again = events_pb2.ServedGeneration(
        event_id="p0", prompt="0000 prompt", user_id="alice", split=TRAIN
    )
    assert data.add("prompts", again, src(0, "rlhf.prompts")) == "accepted"
    assert data.add("demonstrations", demo(9, user="bob"), src(9)) == "accepted"


def test_near_duplicate_prompts_are_dropped_within_a_kind():
    data = TrainingData(DataConfig(near_dup_prefix_chars=20))
    base = "Tell me a long story about the river and the mill"
    assert data.add("demonstrations", demo(1, prompt=base), src(0)) == "accepted"
    # Same first 20 characters once case and spacing are folded.
    near = "tell  me a LONG story about something else entirely"
    assert data.add("demonstrations", demo(2, prompt=near), src(1)) == "near_duplicate"
    assert data.add("demonstrations", demo(3, prompt="A different prompt"), src(2)) == "accepted"
    assert near_dup_key(base, 20) == near_dup_key(near, 20)
    # Off: only exact (folded) duplicates share a key.
    assert near_dup_key(base, 0) != near_dup_key(near, 0)


def test_splits_stay_apart_and_unsplit_events_are_rejected():
    data = TrainingData(DataConfig())
    assert data.add("demonstrations", demo(1, split=TRAIN), src(0)) == "accepted"
    assert data.add("demonstrations", demo(2, split=VAL), src(1)) == "accepted"
    assert data.add("demonstrations", demo(3, split=TEST), src(2)) == "accepted"
    assert (
        data.add("demonstrations", demo(4, split=events_pb2.SPLIT_UNSPECIFIED), src(3))
        == "no_split"
    )
    assert [d.event_id for d in data.pending_demonstrations] == ["d1"]
    assert [d.event_id for d in data.demonstrations["val"]] == ["d2"]
    assert [d.event_id for d in data.demonstrations["test"]] == ["d3"]
    assert [p.event_id for p in data.prompts["train"]] == ["d1"]
    assert [p.event_id for p in data.prompts["test"]] == ["d3"]


def test_comparisons_need_a_strict_preference_and_2_to_9_responses():
    data = TrainingData(DataConfig())
    assert data.add("comparisons", comparison(1, (1, 2, 2)), src(0, "c")) == "accepted"
    assert data.add("comparisons", comparison(2, (1, 1)), src(1, "c")) == "invalid"
    assert data.add("comparisons", comparison(3, (1,)), src(2, "c")) == "invalid"
    assert data.add("comparisons", comparison(4, tuple(range(1, 11))), src(3, "c")) == "invalid"
    assert data.pending_comparisons[0].ranks == (1, 2, 2)


def test_history_rebuilds_state_but_is_never_pending():
    data = TrainingData(DataConfig())
    assert data.add("demonstrations", demo(1), src(0), history=True) == "accepted"
    assert data.add("demonstrations", demo(2, split=VAL), src(1), history=True) == "accepted"
    assert data.pending_demonstrations == [] and data.new_prompts == 0
    assert len(data.demonstrations["val"]) == 1 and len(data.prompts["train"]) == 1
    # Dedupe state came back too: a redelivery after restart is a duplicate.
    assert data.add("demonstrations", demo(1), src(5)) == "duplicate"


def test_resume_offsets_stop_at_the_oldest_untrained_record():
    data = TrainingData(DataConfig())
    for i in range(3):
        data.add("demonstrations", demo(i), src(10 + i))
    data.add("comparisons", comparison(1), src(4, "rlhf.comparisons"))
    positions = {("rlhf.demonstrations", 0): 13, ("rlhf.comparisons", 0): 5, ("rlhf.prompts", 0): 7}
    floor = {("rlhf.demonstrations", 0): 10, ("rlhf.prompts", 1): 3}
    assert data.resume_offsets(positions, floor) == {
        ("rlhf.demonstrations", 0): 10,
        ("rlhf.comparisons", 0): 4,
        ("rlhf.prompts", 0): 7,
        ("rlhf.prompts", 1): 3,
    }
    # About to publish the demonstrations: the restart point moves past them.
    after = data.resume_offsets(positions, floor, trained=["d0", "d1", "d2"])
    assert after[("rlhf.demonstrations", 0)] == 13
    data.mark_trained("demonstrations", ["d0", "d1", "d2"])
    assert data.resume_offsets(positions, floor) == after


def test_full_pending_buffers_stop_reading():
    data = TrainingData(DataConfig(max_demonstrations=2))
    data.add("demonstrations", demo(1), src(0))
    assert not data.full()
    data.add("demonstrations", demo(2), src(1))
    assert data.full()


def test_reader_applies_the_rules_to_a_real_stream_and_replays_history(kafka):
    prefix = f"data-{uuid.uuid4().hex[:6]}."
    topics = StreamTopics.with_prefix(prefix)
    bus.ensure_topics(kafka.bootstrap_servers, list(topics.inputs()))
    producer = bus.Producer(kafka.bootstrap_servers, client_id="test-data")
    events = [
        demo(0),
        demo(0),
        demo(1, split=VAL),
        demo(2, split=events_pb2.SPLIT_UNSPECIFIED),
        demo(3),
    ]
    for e in events:
        producer.send_sync(topics.demonstrations, e, key="u1")  # one partition: a fixed order
    producer.close()

    def read(resume: dict, want: int) -> tuple[StreamReader, TrainingData, CollectorRegistry]:
        registry = CollectorRegistry()
        data = TrainingData(DataConfig(poll_timeout_s=0.2))
        consumer = bus.Consumer(
            kafka.bootstrap_servers, topics.inputs(), group_id=f"g-{uuid.uuid4().hex[:6]}",
            client_id="test-data", start_offsets=StreamReader.start_offsets(topics, resume, True),
        )  # fmt: skip
        reader = StreamReader(
            consumer, data, topics, resume, DataConfig(), TrainerMetrics(registry)
        )
        deadline = time.monotonic() + 30
        seen = 0
        while seen < want and time.monotonic() < deadline:
            seen += reader.poll()
        return reader, data, registry

    reader, data, registry = read({}, len(events))
    assert [d.event_id for d in data.pending_demonstrations] == ["d0", "d3"]
    assert [d.event_id for d in data.demonstrations["val"]] == ["d1"]
    count = registry.get_sample_value
    labels = {"topic": topics.demonstrations.name}
    assert count("rlhf_trainer_records_total", {**labels, "outcome": "duplicate"}) == 1
    assert count("rlhf_trainer_records_total", {**labels, "outcome": "no_split"}) == 1
    partition = next(r.source.partition for r in data.pending_demonstrations)
    key = (topics.demonstrations.name, partition)
    first_pending = data.pending_demonstrations[1].source.offset
    reader.data.mark_trained("demonstrations", ["d0"])
    resume = reader.resume_offsets()
    assert resume[key] == first_pending  # d3 is not trained yet: a restart reads it again
    reader.consumer.close()

    # A restart from those offsets: everything before is history, d3 is pending again.
    reader2, data2, _ = read(resume, len(events))
    assert [d.event_id for d in data2.pending_demonstrations] == ["d3"]
    assert [d.event_id for d in data2.demonstrations["val"]] == ["d1"]
    assert reader2.caught_up()
    reader2.consumer.close()

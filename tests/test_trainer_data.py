"""The trainer's data rules: dedupe, per-user cap, near-duplicates, splits, resume offsets,
and the same rules applied to records read from a real Kafka broker."""

from __future__ import annotations

import time
import uuid
from collections import Counter

from prometheus_client import CollectorRegistry

from rlhf import bus
from rlhf.chat import Message
from rlhf.split import split_for, split_for_user
from rlhf.v1 import events_pb2, inference_pb2
from trainer.config import DataConfig
from trainer.data import Source, TrainingData, near_dup_key
from trainer.metrics import TrainerMetrics
from trainer.reader import StreamReader, StreamTopics

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
    again = events_pb2.ComparisonEvent(
        event_id="c0", prompt="0000 prompt", user_id="alice", split=TRAIN,
        responses=[events_pb2.RankedResponse(text=t, rank=r) for t, r in (("a", 1), ("b", 2))],
    )  # fmt: skip
    assert data.add("comparisons", again, src(0, "rlhf.comparisons")) == "accepted"
    assert data.add("demonstrations", demo(9, user="bob"), src(9)) == "accepted"


def test_near_duplicates_leave_the_prompt_pool_but_labelled_records_stay():
    data = TrainingData(DataConfig(near_dup_prefix_chars=20))
    base = "Tell me a long story about the river and the mill"
    # Same first 20 characters once case and spacing are folded.
    near = "tell  me a LONG story about something else entirely"
    assert near_dup_key(base, 20) == near_dup_key(near, 20)
    assert near_dup_key(base, 0) != near_dup_key(near, 0)  # off: exact (folded) text only
    assert data.add("demonstrations", demo(1, prompt=base), src(0)) == "accepted"
    # A second demonstration of a near-identical prompt is labelled data: kept.
    assert data.add("demonstrations", demo(2, prompt=near), src(1)) == "accepted"
    assert [d.event_id for d in data.pending_demonstrations] == ["d1", "d2"]
    # The PPO prompt pool holds the prompt once; a served near-duplicate adds nothing.
    served = events_pb2.ServedGeneration(event_id="p1", prompt=near, user_id="u2", split=TRAIN)
    assert data.add("prompts", served, src(0, "rlhf.prompts")) == "near_duplicate"
    assert [p.event_id for p in data.prompts["train"]] == ["d1"]


def test_every_distinct_ranking_of_a_prompt_is_kept_up_to_the_per_prompt_cap():
    data = TrainingData(DataConfig(max_per_prompt=3))

    def ranking(i: int, labeler: str, ranks=(1, 2)) -> events_pb2.ComparisonEvent:
        return events_pb2.ComparisonEvent(
            event_id=f"c{i}", prompt="Name a colour.", user_id=f"u{i}", labeler_id=labeler,
            split=TRAIN, responses=[events_pb2.RankedResponse(text=t, rank=r)
                                    for t, r in zip(("Blue.", "Green."), ranks, strict=True)],
        )  # fmt: skip

    # Two labelers rank the same prompt the same way: both acked, both kept.
    assert data.add("comparisons", ranking(1, "ann"), src(0, "c")) == "accepted"
    assert data.add("comparisons", ranking(2, "bob"), src(1, "c")) == "accepted"
    # The same labeler sending the same ranking again (a new event id) says nothing new.
    assert data.add("comparisons", ranking(3, "ann"), src(2, "c")) == "duplicate"
    assert data.add("comparisons", ranking(4, "ann", (2, 1)), src(3, "c")) == "accepted"
    # A flood on one prompt is cut at the cap, and counted.
    assert data.add("comparisons", ranking(5, "cat"), src(4, "c")) == "prompt_cap"
    assert [c.event_id for c in data.pending_comparisons] == ["c1", "c2", "c4"]


def test_what_the_rules_remember_is_bounded_by_windows():
    data = TrainingData(DataConfig(dedupe_window=3, user_window=2, prompt_window=4,
                                   user_prompt_cap=1))  # fmt: skip
    for i in range(6):
        data.add("demonstrations", demo(i, user=f"user{i}"), src(i))
    assert len(data._seen) == 3 and len(data._contents) == 3
    assert len(data._user_prompts) == 2 and len(data._pool_keys) == 4
    # d5 is remembered, d0 was forgotten: a redelivery that old is taken again.
    assert data.add("demonstrations", demo(5, user="user5"), src(9)) == "duplicate"
    assert data.add("demonstrations", demo(0, user="user0"), src(10)) == "accepted"
    # The two most recent users are user5 and user0: user5's one prompt is remembered (cap 1:
    # a second is refused); user4 was forgotten and starts a new count.
    assert data.add("demonstrations", demo(20, user="user5"), src(11)) == "user_cap"
    assert data.add("demonstrations", demo(21, user="user4"), src(12)) == "accepted"


def test_anonymous_traffic_is_not_one_capped_user():
    # Served prompts without a user id: no user to cap (the old rule made them one user,
    # capped at 200 prompts for the whole service).
    data = TrainingData(DataConfig(user_prompt_cap=200))
    for i in range(300):
        served = events_pb2.ServedGeneration(event_id=f"p{i}", prompt=f"{i:04d} question",
                                             user_id="", split=TRAIN)  # fmt: skip
        assert data.add("prompts", served, src(i, "rlhf.prompts")) == "accepted"
    assert len(data.prompts["train"]) == 300 and len(data.pending_prompts) == 300


def test_records_in_too_many_failed_rounds_are_parked():
    data = TrainingData(DataConfig())
    for i in range(3):
        data.add("demonstrations", demo(i), src(i))
    assert data.round_failed("demonstrations", ["d0", "d1"], park_after=2) == []
    data.add("demonstrations", demo(3), src(3))
    doomed = data.round_failed("demonstrations", ["d0", "d1", "d2", "d3"], park_after=2)
    assert [d.event_id for d in doomed] == ["d0", "d1"]
    assert doomed[0].event.response == "response 0"  # the record itself, to write elsewhere
    data.park("demonstrations", ["d0", "d1"])
    assert [d.event_id for d in data.pending_demonstrations] == ["d2", "d3"]
    positions = {("rlhf.demonstrations", 0): 4}
    assert data.resume_offsets(positions, {})[("rlhf.demonstrations", 0)] == 2


def test_served_train_prompts_stay_pending_until_a_ppo_round_publishes():
    data = TrainingData(DataConfig())
    served = events_pb2.ServedGeneration(event_id="p0", prompt="0000 q", user_id="u", split=TRAIN)
    data.add("prompts", served, src(7, "rlhf.prompts"))
    data.add("demonstrations", demo(1), src(3))
    data.mark_trained("demonstrations", ["d1"])  # e.g. an SFT round published
    positions = {("rlhf.prompts", 0): 8, ("rlhf.demonstrations", 0): 4}
    # A restart must read the prompt again as new: a PPO round still has to use it.
    assert data.resume_offsets(positions, {}) == {
        ("rlhf.prompts", 0): 7,
        ("rlhf.demonstrations", 0): 4,
    }
    data.mark_trained("prompts", ["p0"])
    assert data.resume_offsets(positions, {})[("rlhf.prompts", 0)] == 8 and data.new_prompts == 0


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


def test_a_full_pending_list_is_full_for_its_kind_only():
    data = TrainingData(DataConfig(max_demonstrations=2))
    data.add("demonstrations", demo(1), src(0))
    assert not data.full("demonstrations")
    data.add("demonstrations", demo(2), src(1))
    assert data.full("demonstrations") and not data.full("comparisons")


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


def test_anonymous_prompts_are_split_by_prompt_not_as_one_user():
    prompts = [f"question number {i}" for i in range(2000)]
    splits = Counter(split_for("", p, 0.1, 0.1) for p in prompts)
    # Spread over the three splits at the fractions (one user id "" would be one split).
    assert 150 < splits[VAL] < 250 and 150 < splits[TEST] < 250
    # One prompt is always in one split, whatever its case and spacing.
    assert split_for("", "Question  Number 7", 0.1, 0.1) == split_for(
        "", "question number 7", 0.1, 0.1
    )
    # A named user keeps the user's split for every prompt.
    assert {split_for("user-1", p, 0.1, 0.1) for p in prompts[:50]} == {
        split_for_user("user-1", 0.1, 0.1)
    }


def test_conversations_are_prompts_when_the_encoding_has_a_chat_template():
    def chat(event_id: str, *turns: tuple[str, str]) -> events_pb2.DemonstrationEvent:
        return events_pb2.DemonstrationEvent(
            event_id=event_id, response="r", user_id="u1", split=TRAIN,
            messages=[inference_pb2.ChatMessage(role=r, content=c) for r, c in turns],
        )  # fmt: skip

    data = TrainingData(DataConfig())
    good = chat("m1", ("system", "Be brief."), ("user", "Où est la gare ?"))
    assert data.add("demonstrations", good, src(0)) == "accepted"
    prompt = data.pending_demonstrations[0].prompt
    assert prompt == (Message("system", "Be brief."), Message("user", "Où est la gare ?"))
    # The same conversation and response again says nothing new; the encoding's rules apply.
    assert data.add("demonstrations", chat("m2", *[(m.role, m.content) for m in prompt]), src(1)) == "duplicate"  # fmt: skip
    assert data.add("demonstrations", chat("m3", ("robot", "hi")), src(2)) == "invalid"
    assert data.add("demonstrations", chat("m4", ("user", " ")), src(3)) == "invalid"
    served = events_pb2.ServedGeneration(
        event_id="s1", user_id="u1", split=TRAIN, rendered_prompt="<|im_start|>user...",
        messages=[inference_pb2.ChatMessage(role="user", content="hello")],
    )  # fmt: skip
    assert data.add("prompts", served, src(0, "rlhf.prompts")) == "accepted"
    assert data.prompts["train"][-1].prompt == (Message("user", "hello"),)
    # A trainer whose encoding has no chat template cannot encode a conversation.
    plain = TrainingData(DataConfig(), conversations=False)
    assert plain.add("demonstrations", chat("m5", ("user", "hi")), src(4)) == "no_chat_template"
    assert plain.add("demonstrations", demo(5), src(5)) == "accepted"

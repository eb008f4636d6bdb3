"""The workbench's pure parts: inter-labeler agreement worked by hand, the labeling queue's
leases, overlap and bounds, and the flags the page offers. No broker needed."""

from __future__ import annotations

import math

from rlhf.v1 import events_pb2, inference_pb2
from services.feedback.validate import FLAGS
from services.feedback.workbench.ledger import Agreement, Ledger, pair_agreement
from services.feedback.workbench.routes import (
    FLAG_LABELS,
    FLAG_PREFIX,
    idempotency_key,
    task_of_key,
)
from services.feedback.workbench.tasks import (
    Response,
    TaskPool,
    distinct_responses,
    task_id_for,
    top_two_gap,
    wants_overlap,
)


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_pair_agreement_by_hand() -> None:
    # A: x > y > z > w.  B: x > (z = w) > y.
    # Pairs: xy agree, xz agree, xw agree, yz disagree (A: y>z, B: z>y), yw disagree,
    # zw tied by B: no comparison. 3 of 5.
    a = {"x": 1, "y": 2, "z": 3, "w": 4}
    b = {"x": 1, "y": 3, "z": 2, "w": 2}
    assert pair_agreement(a, b) == Agreement(agreed=3, compared=5)
    assert pair_agreement(a, b).ratio == 0.6
    # Only responses both ranked count; identical rankings agree on everything.
    assert pair_agreement(a, {"x": 2, "y": 1, "q": 3}) == Agreement(0, 1)
    assert pair_agreement(a, a) == Agreement(6, 6)
    assert pair_agreement({"x": 1, "y": 1}, {"x": 1, "y": 2}) == Agreement(0, 0)
    assert Agreement(0, 0).ratio is None


def comparison(event_id: str, labeler: str, ranks: dict[str, int], created_ms: int,
               prompt: str = "p") -> events_pb2.ComparisonEvent:  # fmt: skip
    return events_pb2.ComparisonEvent(
        event_id=event_id,
        created_at_ms=created_ms,
        prompt=prompt,
        labeler_id=labeler,
        responses=[events_pb2.RankedResponse(generation_id=g, rank=r) for g, r in ranks.items()],
    )


def test_ledger_counts_each_pair_of_labelers_once_dedupes_and_expires() -> None:
    clock = Clock()
    ledger = Ledger(window_days=1, max_prompts=100, clock=clock)
    now = int(clock.now * 1000)
    ledger.add_comparison(comparison("e1", "ann", {"x": 1, "y": 2, "z": 3}, now))
    ledger.add_comparison(comparison("e2", "ben", {"x": 1, "y": 3, "z": 2}, now))
    ledger.add_comparison(comparison("e2", "ben", {"x": 1, "y": 3, "z": 2}, now))  # a copy
    ledger.add_comparison(comparison("e3", "ann", {"x": 2, "y": 1}, now))
    ledger.add_comparison(comparison("e4", "cat", {"x": 2, "y": 1}, now))
    # e1-e2: xy, xz agree, yz not: 2 of 3. e3-e2: xy disagree: 0 of 1 (e3-e1: Ann with
    # herself, not counted). e4-e1: 0 of 1, e4-e2: 0 of 1, e4-e3: 1 of 1.
    assert ledger.agreement("ann") == Agreement(2 + 0 + 0 + 1, 3 + 1 + 1 + 1)
    assert ledger.agreement("ben") == Agreement(2 + 0 + 0, 3 + 1 + 1)
    assert ledger.agreement("cat") == Agreement(0 + 0 + 1, 3)
    assert ledger.agreement() == Agreement(3, 7)  # each pair of rankings once
    assert ledger.agreement("nobody") == Agreement(0, 0)
    # Another prompt is another comparison set; a day later everything above has expired.
    ledger.add_comparison(comparison("e5", "ann", {"x": 1, "y": 2}, now + 1000, prompt="q"))
    clock.now += 86_401
    ledger.add_comparison(comparison("e6", "ben", {"x": 1, "y": 2}, now + 86_401_000, prompt="q"))
    assert ledger.agreement() == Agreement(1, 1)
    assert ledger.agreement("cat") == Agreement(0, 0)
    clock.now += 86_401
    assert ledger.agreement() == Agreement(0, 0)


def test_today_counts_distinct_prompts_since_midnight() -> None:
    clock = Clock()
    ledger = Ledger(window_days=30, max_prompts=100, clock=clock)
    now = int(clock.now * 1000)
    midnight = now - 3_600_000
    ledger.add_comparison(comparison("c1", "ann", {"x": 1, "y": 2}, now - 60_000, prompt="p1"))
    ledger.add_comparison(comparison("c1", "ann", {"x": 1, "y": 2}, now - 60_000, prompt="p1"))
    ledger.add_comparison(comparison("c0", "ann", {"x": 1, "y": 2}, midnight - 1, prompt="p0"))
    ledger.add_demonstration(events_pb2.DemonstrationEvent(
        event_id="d1", created_at_ms=now, prompt="p1", labeler_id="ann", response="r"))  # fmt: skip
    ledger.add_demonstration(events_pb2.DemonstrationEvent(
        event_id="d2", created_at_ms=now, prompt="p2", labeler_id="ann", response="r"))  # fmt: skip
    today = ledger.today("ann", midnight)
    assert (today.tasks, today.rankings, today.demonstrations) == (2, 1, 2)
    assert ledger.today("ben", midnight).tasks == 0


def responses(*ids: str) -> list[Response]:
    return [Response(i, f"text of {i}", "policy-v1") for i in ids]


def pool(clock: Clock, **overrides: float) -> TaskPool:
    settings = {"min_k": 4, "overlap": 0.0, "lookback_s": 3600.0, "lease_s": 60.0, "max_tasks": 100}
    settings.update(overrides)
    return TaskPool(clock=clock, **settings)  # type: ignore[arg-type]


def test_leases_keep_a_slot_for_one_labeler_and_labels_close_tasks() -> None:
    clock = Clock()
    tasks = pool(clock)
    task = tasks.add_task(
        "p", "u", responses("a", "b", "c", "d"), int(clock.now * 1000), source="traffic"
    )
    assert task.needed == 1 and tasks.depth() == 1
    assert tasks.lease(task.task_id, "ann")
    assert tasks.candidates("ben") == [] and not tasks.lease(task.task_id, "ben")
    assert tasks.current("ann") is task
    clock.now += 61  # the lease ran out: Ben may have it
    assert tasks.current("ann") is None and tasks.lease(task.task_id, "ben")
    # A comparison that ranks any of its generations (any client) labels it.
    tasks.labeled("ben", generation_ids=["c", "zz"])
    assert tasks.depth() == 0 and tasks.candidates("ann") == []
    # Skipped tasks are never offered to that labeler again.
    other = tasks.add_task(
        "q", "u", responses("e", "f", "g", "h"), int(clock.now * 1000), source="traffic"
    )
    tasks.skip(other.task_id, "ann")
    assert tasks.candidates("ann") == [] and tasks.candidates("ben") == [other]
    # Too old for the lookback: not offered, not counted.
    clock.now += 3601
    assert tasks.candidates("ben") == [] and tasks.depth() == 0


def test_overlap_tasks_want_two_labelers_and_early_labels_are_kept() -> None:
    clock = Clock()
    tasks = pool(clock, overlap=1.0)
    # The comparison was read before its served generation (topics are read in no set order).
    tasks.labeled("ann", generation_ids=["b"])
    task = tasks.add_task(
        "p", "u", responses("a", "b", "c", "d"), int(clock.now * 1000), source="traffic"
    )
    assert task.needed == 2 and task.labelers == {"ann"}
    assert tasks.candidates("ann") == [] and tasks.candidates("ben") == [task]
    assert tasks.depth() == 1
    # The same responses are the same task.
    again = tasks.add_task("p", "u", responses("a", "b", "c", "d"), 0, source="generated")
    assert again is task and len(tasks) == 1
    share = sum(wants_overlap(task_id_for("p", [str(i)]), 0.25) for i in range(4000)) / 4000
    assert abs(share - 0.25) < 0.03


def test_served_traffic_becomes_tasks_or_prompts_to_generate_for() -> None:
    clock = Clock()
    tasks = pool(clock, max_tasks=3)
    now = int(clock.now * 1000)

    def served(prompt: str, *texts: str) -> events_pb2.ServedGeneration:
        return events_pb2.ServedGeneration(
            prompt=prompt, model_version="v1", user_id="u", created_at_ms=now,
            samples=[events_pb2.GeneratedSample(generation_id=f"{prompt}-{i}", text=t)
                     for i, t in enumerate(texts)],
        )  # fmt: skip

    # Empty and repeated texts cannot be ranked: 5 samples, 3 rankable -> not a task.
    tasks.add_generation(served("p1", "a", "", "a", "b", "c"), now)
    assert len(tasks) == 0
    tasks.add_generation(served("p2", "a", "b", "c", "d", "e"), now)
    assert len(tasks) == 1
    assert tasks.take_prompt() == ("p1", (), "u")
    assert tasks.take_prompt() is None  # each prompt once
    tasks.add_generation(served("p1", "x"), now)  # already generated for: not again
    assert tasks.take_prompt() is None
    for i in range(5):  # bounded: the oldest go first
        tasks.add_generation(served(f"q{i}", "a", "b", "c", "d"), now)
    assert len(tasks) == 3
    assert len(distinct_responses([(str(i), f"t{i}") for i in range(12)], "v")) == 9


def test_chat_traffic_becomes_tasks_with_their_conversation() -> None:
    clock = Clock()
    tasks = pool(clock)
    now = int(clock.now * 1000)
    chat = events_pb2.ServedGeneration(
        model_version="v1", user_id="u", created_at_ms=now,
        messages=[inference_pb2.ChatMessage(role="system", content="Be brief."),
                  inference_pb2.ChatMessage(role="user", content="Hi?")],
        samples=[events_pb2.GeneratedSample(generation_id=f"c{i}", text=f"hello {i}") for i in range(4)],
    )  # fmt: skip
    tasks.add_generation(chat, now)
    [task] = tasks.candidates("ann")
    assert task.prompt == "" and task.messages == (("system", "Be brief."), ("user", "Hi?"))
    # A conversation with one response waits for an on-demand generation, turns and all.
    single = events_pb2.ServedGeneration(
        model_version="v1", user_id="u2", created_at_ms=now,
        messages=[inference_pb2.ChatMessage(role="user", content="Why?")],
        samples=[events_pb2.GeneratedSample(generation_id="s0", text="because")],
    )  # fmt: skip
    tasks.add_generation(single, now)
    assert tasks.take_prompt() == ("", (("user", "Why?"),), "u2")


def test_top_two_gap_and_keys() -> None:
    assert top_two_gap([0.1, 0.7, 0.65, -2.0]) == 0.7 - 0.65
    assert math.isclose(top_two_gap([1.0, 1.0, 0.0]), 0.0)
    key = idempotency_key("abc123", "labeler-0f", "ranking")
    assert task_of_key(key) == "abc123"
    assert task_of_key("import:line-7") is None and task_of_key("a:b:c:d") is None


def test_the_page_offers_every_flag_the_schema_has() -> None:
    names = {events_pb2.ResponseFlag.Name(f).removeprefix(FLAG_PREFIX) for f in FLAGS}
    assert names == set(FLAG_LABELS)

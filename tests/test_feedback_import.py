"""``rlhf feedback import``: mixed good and bad JSONL lines in every supported format."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from rlhf import topics
from rlhf.kafka_local import LocalKafka
from services.feedback import importer
from services.feedback.config import GatewayConfig, KafkaConfig, ResolverConfig
from services.feedback.gateway import open_gateway
from tests.test_feedback_gateway import broker, first_per_event_id, read_events

__all__ = ["broker"]  # re-exported so that pytest finds the broker fixture in this module

Lines = tuple[list[str], int, Counter[str]]


def own_format(run: str) -> Lines:
    good = [
        {"comparison": {"prompt": f"{run} p1", "responses": [{"text": "a"}, {"text": "b"}, {"text": "c"}],
                        "ranks": [1, 2, 2], "labeler_id": "l", "user_id": "u1", "idempotency_key": f"{run}-1"}},
        {"demonstration": {"prompt": f"{run} p2", "response": "r", "labelerId": "l", "userId": "u2",
                           "idempotencyKey": f"{run}-2"}},
    ]  # fmt: skip
    bad = [
        "this is not json",
        json.dumps({"comparison": {"prompt": f"{run} p3", "responses": [{"text": "a"}, {"text": "b"}],
                                   "ranks": [1, 1], "labeler_id": "l", "user_id": "u", "idempotency_key": f"{run}-3"}}),
        json.dumps({"demonstration": {"prompt": f"{run} p4", "response": "r", "user_id": "u",
                                      "idempotency_key": f"{run}-4"}}),
        json.dumps({"comparison": {"prompt": f"{run} p5", "responses": [{"generation_id": f"{run}-gone"}, {"text": "b"}],
                                   "ranks": [1, 2], "labeler_id": "l", "user_id": "u", "idempotency_key": f"{run}-5"}}),
    ]  # fmt: skip
    reasons = Counter({"format": 1, "ranks": 1, "missing_field": 1, "unknown_generation": 1})
    return [json.dumps(g) for g in good] + bad, len(good), reasons


def hh_format(run: str) -> Lines:
    def transcript(question: str, answer: str) -> str:
        return f"\n\nHuman: {run} {question}\n\nAssistant: Let me see.\n\nHuman: And?\n\nAssistant: {answer}"

    good = [
        {
            "chosen": transcript("Sky color?", "Blue."),
            "rejected": transcript("Sky color?", "Green."),
        },
        {"chosen": transcript("2+2?", "4"), "rejected": transcript("2+2?", "5")},
        {"prompt": f"{run} Say hi", "chosen": "Hi!", "rejected": "Go away."},
    ]
    bad = [
        json.dumps(
            {"chosen": transcript("Same?", "Yes."), "rejected": transcript("Same?", "Yes.")}
        ),
        json.dumps({"chosen": f"{run} one thing", "rejected": f"{run} another"}),
        json.dumps({"chosen": transcript("Empty?", ""), "rejected": transcript("Empty?", "No.")}),
    ]
    reasons = Counter({"duplicate_response": 1, "format": 1, "empty_text": 1})
    return [json.dumps(g) for g in good] + bad, len(good), reasons


def ultrafeedback_format(run: str) -> Lines:
    def record(prompt: str, scores: list[object]) -> str:
        completions = [
            {"model": f"m{i}", "response": f"answer {i}", "overall_score": s}
            for i, s in enumerate(scores)
        ]
        return json.dumps({"instruction": f"{run} {prompt}", "completions": completions})

    good = [record("q1", [7, 3.5, 7, 9]), record("q2", [1, 2])]
    bad = [
        record("q3", [5, 5, 5]),
        record("q4", [5, "high"]),
        record("q5", list(range(10))),
        json.dumps({"instruction": f"{run} q6", "completions": "none"}),
    ]
    reasons = Counter({"ranks": 1, "format": 2, "k_range": 1})
    return good + bad, len(good), reasons


def chat_format(run: str) -> Lines:
    """Conversations in every format that takes them: preference pairs (TRL's conversational
    format, UltraFeedback-binarized), UltraFeedback, SFT transcripts and the own format."""

    def user(text: str) -> dict[str, str]:
        return {"role": "user", "content": f"{run} {text}"}

    def bot(text: str) -> dict[str, str]:
        return {"role": "assistant", "content": text}

    system = {"role": "system", "content": "Answer briefly."}
    good = [
        {"chosen": [system, user("Sky?"), bot("Blue.")], "rejected": [system, user("Sky?"), bot("Green.")]},
        {"prompt": [user("2+2?")], "chosen": [bot("4")], "rejected": [bot("5")]},
        {"prompt": f"{run} Café?", "chosen": [user("Café?"), bot("Oui.")],
         "rejected": [user("Café?"), bot("Non.")], "score_chosen": 8.0, "score_rejected": 3.0},
        {"prompt": [system, user("Pick one.")],
         "completions": [{"response": "x", "overall_score": 1}, {"response": "y", "overall_score": 2}]},
        {"messages": [user("Greet me."), bot("Hello!"), user("Again, in German."), bot("Grüß dich!")]},
        {"prompt": [user("Say done.")], "completion": [bot("Done.")]},
        {"comparison": {"messages": [user("Own format?")], "responses": [{"text": "a"}, {"text": "b"}],
                        "ranks": [2, 1], "labeler_id": "l", "user_id": "u", "idempotency_key": f"{run}-own"}},
    ]  # fmt: skip
    bad = [
        {"chosen": [{"role": "robot", "content": "hi"}, bot("A")],
         "rejected": [{"role": "robot", "content": "hi"}, bot("B")]},
        {"messages": [user("Fine."), {"role": "user", "content": "  "}, bot("x")]},
        {"prompt": [], "chosen": [bot("A")], "rejected": [bot("B")]},
        {"messages": [user("Who answers?"), user("Nobody.")]},
        {"chosen": [user("One?"), bot("A")], "rejected": [user("Another?"), bot("B")]},
        {"messages": ["hi", bot("x")]},
    ]  # fmt: skip
    reasons = Counter({"bad_role": 1, "empty_text": 2, "format": 3})
    return [json.dumps(r, ensure_ascii=False) for r in good + bad], len(good), reasons


@pytest.mark.parametrize("make", [own_format, hh_format, ultrafeedback_format, chat_format])
def test_import_counts_good_and_bad_lines(
    broker: LocalKafka, make: Callable[[str], Lines], tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    lines, good, reasons = make(run)
    config = GatewayConfig(
        kafka=KafkaConfig(bootstrap_servers=broker.bootstrap_servers),
        resolver=ResolverConfig(wait_s=0.3),
    )
    app = open_gateway(config, CollectorRegistry())
    assert app.wait_ready(60)
    try:
        errors = (tmp_path / "errors.jsonl").open("w")
        summary = asyncio.run(importer.import_lines(app.gateway, ["", *lines], errors=errors))
        errors.close()
        assert (summary.lines, summary.accepted, summary.duplicates) == (len(lines), good, 0)
        assert summary.rejected == reasons
        written = [
            json.loads(line) for line in (tmp_path / "errors.jsonl").read_text().splitlines()
        ]
        assert Counter(w["reason"] for w in written) == reasons
        assert all(w["message"] and w["text"] == lines[w["line"] - 2] for w in written)
        # Importing the same lines again stores nothing new.
        again = asyncio.run(importer.import_lines(app.gateway, lines))
        assert (again.accepted, again.duplicates, again.rejected) == (0, good, reasons)
    finally:
        app.close()
    if make is chat_format:
        # What was stored: the good lines only, conversations kept turn by turn.
        stored = first_per_event_id(
            read_events(broker.bootstrap_servers, [topics.COMPARISONS, topics.DEMONSTRATIONS])
        )
        mine = [
            r.value  # type: ignore[attr-defined]
            for r in stored.values()
            if any(run in m.content for m in r.value.messages) or run in r.value.prompt  # type: ignore[attr-defined]
        ]
        assert len(mine) == good
        assert all(e.messages and not e.prompt for e in mine)  # UltraFeedback-binarized too
        german = next(e for e in mine if e.messages and e.messages[-1].content.endswith("German."))
        assert [m.role for m in german.messages] == ["user", "assistant", "user"]
        assert german.response == "Grüß dich!" and not german.prompt


def test_import_command_reports_a_summary(
    broker: LocalKafka, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = uuid.uuid4().hex[:8]
    lines, good, _ = hh_format(run)
    path = tmp_path / "hh.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code = importer.main(
        ["import", str(path), "--kafka.bootstrap-servers", broker.bootstrap_servers]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert f"{len(lines)} lines: {good} stored, 0 already stored (duplicates), 3 rejected" in out
    assert "duplicate_response: 1 (first: line 4: responses[1]: same text as responses[0]" in out
    stored = first_per_event_id(read_events(broker.bootstrap_servers, [topics.COMPARISONS]))
    prompts = [r.value.prompt for r in stored.values() if run in r.value.prompt]  # type: ignore[attr-defined]
    assert len(prompts) == good
    assert importer.main(["import", str(tmp_path / "missing.jsonl")]) == 2

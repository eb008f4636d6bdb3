"""What labelers did: tasks per labeler today, and inter-labeler agreement.

Agreement is the paper's: on prompts (or conversations) that two labelers ranked, the share of comparisons on
which they agree. A ranking of K responses makes a comparison of every pair it orders; for
two rankings of one prompt, each pair of responses both of them order (the same generation
id, or the same text) is one comparison, agreed when both prefer the same response. A pair
that either labeler tied is no comparison (ties form no pair in training either). A labeler's
agreement counts the comparisons shared with every other labeler; the overall figure counts
each pair of labelers once.

Fed from ``rlhf.comparisons`` and ``rlhf.demonstrations`` (every feedback client, every
replica) and from the workbench's own acks; the first record of an event id counts, later
copies do not. Agreement covers comparisons created within ``window_days`` and expires
older ones; memory is bounded by ``max_prompts`` prompts of up to ``RANKINGS_PER_PROMPT``
rankings each.
"""

from __future__ import annotations

import hashlib
import heapq
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from rlhf.chat import prompt_of, prompt_text
from rlhf.v1 import events_pb2

RANKINGS_PER_PROMPT = 8
# How long a labeler's events are kept for the "today" count (any time zone's midnight).
DAY_RETENTION_MS = 48 * 3600 * 1000


@dataclass(frozen=True)
class Ranking:
    event_id: str
    labeler_id: str
    created_at_ms: int
    ranks: Mapping[str, int]  # response identity -> rank (1 best, ties equal)


@dataclass(frozen=True)
class Agreement:
    agreed: int
    compared: int

    @property
    def ratio(self) -> float | None:
        return self.agreed / self.compared if self.compared else None


@dataclass(frozen=True)
class Today:
    tasks: int  # distinct prompts labeled
    rankings: int
    demonstrations: int


def response_identity(response: events_pb2.RankedResponse) -> str:
    return f"id:{response.generation_id}" if response.generation_id else f"text:{response.text}"


def pair_agreement(a: Mapping[str, int], b: Mapping[str, int]) -> Agreement:
    """Comparisons two rankings share and on how many they agree (ties: no comparison)."""
    common = sorted(a.keys() & b.keys())
    agreed = compared = 0
    for i, x in enumerate(common):
        for y in common[i + 1 :]:
            da, db = a[x] - a[y], b[x] - b[y]
            if da and db:
                compared += 1
                agreed += (da > 0) == (db > 0)
    return Agreement(agreed, compared)


def _prompt_key(event: events_pb2.ComparisonEvent | events_pb2.DemonstrationEvent) -> str:
    """One prompt or conversation, one key."""
    text = prompt_text(prompt_of(event.prompt, event.messages))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class Ledger:
    def __init__(
        self, *, window_days: float, max_prompts: int, clock: Callable[[], float] = time.time
    ) -> None:
        self._window_ms = int(window_days * 86_400_000)
        self._max_prompts = max_prompts
        self._clock = clock
        self._lock = threading.Lock()
        self._by_prompt: OrderedDict[str, list[Ranking]] = OrderedDict()
        # (time, labeler a, labeler b, agreed, compared): one entry per pair of rankings,
        # subtracted again once older than the window.
        self._pairs: list[tuple[int, str, str, int, int]] = []
        self._per_labeler: dict[str, list[int]] = {}
        self._total = [0, 0]
        # labeler -> event id -> (created ms, kind, prompt key), the last DAY_RETENTION_MS.
        self._recent: dict[str, dict[str, tuple[int, str, str]]] = {}

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def add_comparison(self, event: events_pb2.ComparisonEvent) -> None:
        key = _prompt_key(event)
        self._note(event.labeler_id, event.event_id, event.created_at_ms, "ranking", key)
        if event.created_at_ms < self._now_ms() - self._window_ms:
            return
        ranking = Ranking(
            event.event_id,
            event.labeler_id,
            event.created_at_ms,
            {response_identity(r): r.rank for r in event.responses},
        )
        with self._lock:
            rankings = self._by_prompt.setdefault(key, [])
            self._by_prompt.move_to_end(key)
            if any(r.event_id == ranking.event_id for r in rankings):
                return
            for other in rankings:
                if other.labeler_id == ranking.labeler_id:
                    continue
                shared = pair_agreement(ranking.ranks, other.ranks)
                if shared.compared:
                    when = max(ranking.created_at_ms, other.created_at_ms)
                    a, b = ranking.labeler_id, other.labeler_id
                    entry = (when, a, b, shared.agreed, shared.compared)
                    heapq.heappush(self._pairs, entry)
                    self._count(entry, +1)
            rankings.append(ranking)
            del rankings[:-RANKINGS_PER_PROMPT]
            while len(self._by_prompt) > self._max_prompts:
                self._by_prompt.popitem(last=False)

    def add_demonstration(self, event: events_pb2.DemonstrationEvent) -> None:
        key = _prompt_key(event)
        self._note(event.labeler_id, event.event_id, event.created_at_ms, "demonstration", key)

    def _note(self, labeler: str, event_id: str, created_ms: int, kind: str, key: str) -> None:
        if created_ms < self._now_ms() - DAY_RETENTION_MS:
            return
        with self._lock:
            mine = self._recent.setdefault(labeler, {})
            mine.setdefault(event_id, (created_ms, kind, key))
            if len(mine) % 1024 == 0:  # labelers who never look are pruned here
                _prune(mine, self._now_ms())

    def _count(self, entry: tuple[int, str, str, int, int], sign: int) -> None:
        _, a, b, agreed, compared = entry
        for who in (a, b):
            mine = self._per_labeler.setdefault(who, [0, 0])
            mine[0] += sign * agreed
            mine[1] += sign * compared
        self._total[0] += sign * agreed
        self._total[1] += sign * compared

    def _expire(self) -> None:
        cutoff = self._now_ms() - self._window_ms
        while self._pairs and self._pairs[0][0] < cutoff:
            self._count(heapq.heappop(self._pairs), -1)

    def agreement(self, labeler: str | None = None) -> Agreement:
        """``labeler``'s agreement with every other labeler, or everyone's (None)."""
        with self._lock:
            self._expire()
            if labeler is None:
                return Agreement(*self._total)
            return Agreement(*self._per_labeler.get(labeler, (0, 0)))

    def today(self, labeler: str, since_ms: int) -> Today:
        """What ``labeler`` did since ``since_ms`` (the page's local midnight; at most
        DAY_RETENTION_MS ago)."""
        now = self._now_ms()
        with self._lock:
            mine = self._recent.get(labeler, {})
            _prune(mine, now)
            done = [v for v in mine.values() if v[0] >= since_ms]
        return Today(
            tasks=len({key for _, _, key in done}),
            rankings=sum(1 for _, kind, _ in done if kind == "ranking"),
            demonstrations=sum(1 for _, kind, _ in done if kind == "demonstration"),
        )


def _prune(events: dict[str, tuple[int, str, str]], now_ms: int) -> None:
    for event_id in [e for e, v in events.items() if v[0] < now_ms - DAY_RETENTION_MS]:
        del events[event_id]

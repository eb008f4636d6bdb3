"""The labeling queue: tasks built from served traffic, leased to one labeler at a time.

A task is one prompt (or chat conversation) with K = min_k..9 distinct responses the policy
server served for it in one request (their generation ids, texts and the version that produced
them), read from ``rlhf.prompts``. A served request with fewer distinct responses (an application asking for
one) leaves its prompt in a pool from which a task can be generated on demand (n = K from the
policy server, ``queue.py``); each such prompt is generated for at most once.

A task wants one label, or two for the ``overlap`` share of tasks (chosen by a hash of the
task id) so that inter-labeler agreement can be measured. A labeler never gets a task twice
(labeled or skipped); a task handed out is leased to its labeler for ``lease_s`` so that two
people do not work on the one slot at once. Labels come from the workbench's own submissions
and from every comparison on ``rlhf.comparisons`` that ranks a task's generations (any
feedback client), so a restarted gateway does not hand out work already done.

Thread-safe: the Kafka tail adds from its thread, HTTP handlers read on the event loop. Memory
is bounded by ``max_tasks`` (oldest first) for tasks, prompts and early labels alike.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlhf.chat import Message, prompt_of, prompt_text
from rlhf.v1 import events_pb2

MAX_K = 9
# Tasks a labeler skipped, remembered per labeler (oldest forgotten first).
MAX_SKIPS = 1000

# A conversation as (role, content) turns; empty for a plain prompt.
Turns = tuple[tuple[str, str], ...]


def ask_key(prompt: str, messages: Turns) -> str:
    """One text for a prompt or a conversation (task ids, the prompt pool, the ledger)."""
    return prompt_text(prompt_of(prompt, [Message(role, content) for role, content in messages]))


@dataclass(frozen=True)
class Response:
    generation_id: str
    text: str
    model_version: str


@dataclass
class Task:
    task_id: str
    prompt: str
    messages: Turns  # the conversation instead of ``prompt``, for chat traffic
    user_id: str
    responses: tuple[Response, ...]
    created_at_ms: int
    source: str  # "traffic" or "generated"
    needed: int  # labels wanted: 1, or 2 for an overlap task
    labelers: set[str] = field(default_factory=set)
    leases: dict[str, float] = field(default_factory=dict)  # labeler -> lease expiry (s)
    handed_at: dict[str, float] = field(default_factory=dict)  # labeler -> when handed (s)
    # Reward-model scores of the responses and the RM version, for the uncertainty order.
    rewards: tuple[float, ...] | None = None
    reward_version: str = ""
    unscorable: str = ""  # why the reward server refused the task (e.g. no chat template)

    @property
    def gap(self) -> float | None:
        """The reward model's top two rewards apart (small: the RM is unsure), when scored."""
        return top_two_gap(self.rewards) if self.rewards else None


def top_two_gap(rewards: Sequence[float]) -> float:
    first, second = sorted(rewards, reverse=True)[:2]
    return first - second


def task_id_for(prompt: str, generation_ids: Iterable[str]) -> str:
    digest = hashlib.sha256(prompt.encode("utf-8"))
    for gid in generation_ids:
        digest.update(b"\0" + gid.encode("utf-8"))
    return digest.hexdigest()[:24]


def wants_overlap(task_id: str, overlap: float) -> bool:
    """Whether a task is one of the ``overlap`` share that two labelers rank (by its hash)."""
    return int(task_id[:8], 16) < overlap * 0x1_0000_0000


def distinct_responses(
    samples: Iterable[tuple[str, str]], model_version: str
) -> tuple[Response, ...]:
    """Rankable responses of (generation id, text) samples: non-empty, distinct texts (the
    gateway refuses empty and repeated texts), at most nine."""
    kept: dict[str, Response] = {}
    for gid, text in samples:
        if gid and text.strip() and text not in kept:
            kept[text] = Response(gid, text, model_version)
    return tuple(kept.values())[:MAX_K]


@dataclass
class _Prompt:
    prompt: str
    messages: Turns
    user_id: str
    created_at_ms: int


class TaskPool:
    def __init__(
        self,
        *,
        min_k: int,
        overlap: float,
        lookback_s: float,
        lease_s: float,
        max_tasks: int,
        on_added: Callable[[str], None] = lambda _source: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``on_added(source)`` is called for every new task (a metric)."""
        self._min_k = min_k
        self._overlap = overlap
        self._lookback_ms = int(lookback_s * 1000)
        self._lease_s = lease_s
        self._max = max_tasks
        self._on_added = on_added
        self._clock = clock
        self._lock = threading.Lock()
        self._tasks: OrderedDict[str, Task] = OrderedDict()
        self._by_generation: dict[str, str] = {}
        self._prompts: OrderedDict[str, _Prompt] = OrderedDict()  # prompts without a task
        self._spent: OrderedDict[str, None] = OrderedDict()  # prompts generated for / with a task
        # Labels read before their task (the tail reads topics in no fixed order).
        self._early: OrderedDict[str, set[str]] = OrderedDict()
        self._skipped: dict[str, OrderedDict[str, None]] = {}

    # ------------------------------------------------------------------ filling the pool

    def add_generation(self, generation: events_pb2.ServedGeneration, timestamp_ms: int) -> None:
        """A served request from ``rlhf.prompts``: a task when it has min_k distinct
        responses, else its prompt waits for an on-demand generation."""
        created = generation.created_at_ms or timestamp_ms
        messages = tuple((m.role, m.content) for m in generation.messages)
        key = ask_key(generation.prompt, messages)
        if created < self._clock() * 1000 - self._lookback_ms or not key.strip():
            return
        responses = distinct_responses(
            ((s.generation_id, s.text) for s in generation.samples), generation.model_version
        )
        if len(responses) >= self._min_k:
            self.add_task(
                generation.prompt,
                generation.user_id,
                responses,
                created,
                source="traffic",
                messages=messages,
            )
            return
        with self._lock:
            if key in self._spent:
                return
            self._prompts[key] = _Prompt(generation.prompt, messages, generation.user_id, created)
            self._prompts.move_to_end(key)
            _bound(self._prompts, self._max)

    def add_task(
        self,
        prompt: str,
        user_id: str,
        responses: Sequence[Response],
        created_at_ms: int,
        *,
        source: str,
        messages: Turns = (),
    ) -> Task:
        """Adds (or finds) the task of these responses; the same responses are one task."""
        key = ask_key(prompt, messages)
        task_id = task_id_for(key, (r.generation_id for r in responses))
        with self._lock:
            existing = self._tasks.get(task_id)
            if existing is not None:
                return existing
            task = Task(
                task_id=task_id,
                prompt=prompt,
                messages=messages,
                user_id=user_id,
                responses=tuple(responses),
                created_at_ms=created_at_ms,
                source=source,
                needed=2 if wants_overlap(task_id, self._overlap) else 1,
            )
            for key in (task_id, *(r.generation_id for r in responses)):
                task.labelers |= self._early.pop(key, set())
            self._tasks[task_id] = task
            for r in responses:
                self._by_generation[r.generation_id] = task_id
            self._prompts.pop(key, None)
            self._spent[key] = None
            _bound(self._spent, self._max)
            while len(self._tasks) > self._max:
                _, old = self._tasks.popitem(last=False)
                for r in old.responses:
                    self._by_generation.pop(r.generation_id, None)
        self._on_added(source)
        return task

    def take_prompt(self) -> tuple[str, Turns, str] | None:
        """The newest served prompt without a task, as (prompt, messages, user id), for an
        on-demand generation; each prompt is handed out once."""
        cutoff = self._clock() * 1000 - self._lookback_ms
        with self._lock:
            while self._prompts:
                key, seen = self._prompts.popitem(last=True)
                self._spent[key] = None
                _bound(self._spent, self._max)
                if seen.created_at_ms >= cutoff:
                    return seen.prompt, seen.messages, seen.user_id
            return None

    # ------------------------------------------------------------------ labels

    def labeled(
        self, labeler: str, *, task_id: str = "", generation_ids: Iterable[str] = ()
    ) -> None:
        """``labeler`` labeled a task, named by id (a workbench submission, a demonstration)
        or by the generations a comparison ranked."""
        with self._lock:
            keys = [task_id] if task_id else list(generation_ids)
            for key in keys:
                found = self._tasks.get(key) or self._tasks.get(self._by_generation.get(key, ""))
                if found is not None:
                    found.labelers.add(labeler)
                    found.leases.pop(labeler, None)
                    return
            for key in keys[:1]:
                self._early.setdefault(key, set()).add(labeler)
                _bound(self._early, self._max)

    def skip(self, task_id: str, labeler: str) -> None:
        with self._lock:
            skipped = self._skipped.setdefault(labeler, OrderedDict())
            skipped[task_id] = None
            _bound(skipped, MAX_SKIPS)
            task = self._tasks.get(task_id)
            if task is not None:
                task.leases.pop(labeler, None)

    # ------------------------------------------------------------------ handing out

    def get(self, task_id: str) -> Task | None:
        with self._lock:
            return self._tasks.get(task_id)

    def _open_for(self, task: Task, labeler: str, now: float) -> bool:
        if labeler in task.labelers or task.task_id in self._skipped.get(labeler, ()):
            return False
        if task.created_at_ms < (now * 1000) - self._lookback_ms:
            return False
        others = sum(1 for who, until in task.leases.items() if who != labeler and until > now)
        return len(task.labelers) + others < task.needed

    def current(self, labeler: str) -> Task | None:
        """The task this labeler holds a live lease on, if still open for them."""
        now = self._clock()
        with self._lock:
            for task in reversed(self._tasks.values()):
                if task.leases.get(labeler, 0.0) > now and self._open_for(task, labeler, now):
                    return task
            return None

    def candidates(self, labeler: str) -> list[Task]:
        """Tasks open for ``labeler``, newest first."""
        now = self._clock()
        with self._lock:
            found = [t for t in self._tasks.values() if self._open_for(t, labeler, now)]
        found.sort(key=lambda t: t.created_at_ms, reverse=True)
        return found

    def lease(self, task_id: str, labeler: str) -> bool:
        """Leases the task to ``labeler``; False when it is no longer open for them."""
        now = self._clock()
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None or not self._open_for(task, labeler, now):
                return False
            for who in [w for w, until in task.leases.items() if until <= now]:
                del task.leases[who]
            task.leases[labeler] = now + self._lease_s
            task.handed_at.setdefault(labeler, now)
            return True

    def depth(self) -> int:
        """Labels still wanted, over tasks within the lookback (the operators' queue depth)."""
        cutoff = self._clock() * 1000 - self._lookback_ms
        with self._lock:
            return sum(
                max(0, t.needed - len(t.labelers))
                for t in self._tasks.values()
                if t.created_at_ms >= cutoff
            )

    def __len__(self) -> int:
        with self._lock:
            return len(self._tasks)


def _bound(items: OrderedDict[str, Any], limit: int) -> None:
    while len(items) > limit:
        items.popitem(last=False)

"""What the trainer learns from: the three Kafka streams' records, filtered into bounded buffers.

Records arrive from ``rlhf.demonstrations``, ``rlhf.comparisons`` and ``rlhf.prompts``
(``trainer.reader`` reads them). ``TrainingData`` applies the data rules to each one, in
arrival order, and loses no distinct piece of labelled data:

* **dedupe** by ``event_id`` (a redelivered or re-imported event counts once), and of a
  labelled record whose content equals an earlier one's from the same labeler (same prompt,
  responses and ranks, or same prompt and response);
* **split**: train records feed rounds, validation records feed the gates, test records are
  only scored; an event without a split is rejected (its user's split is unknown, and a
  held-out user must never reach training);
* **conversations**: a record may carry a conversation (``messages``) instead of a prompt;
  it is the record's prompt (``rlhf.chat``; its `role: content` lines stand for it in keys),
  checked by the rules its encoding applies, and rejected as ``no_chat_template`` when the
  trainer's encoding has no chat template;
* **per-user cap**: at most ``user_prompt_cap`` distinct prompts per user id (the paper's
  200), whatever the kind of record that carried them. **Anonymous** records (empty
  ``user_id``: served prompts of callers that name no user) have no user to cap; the policy
  server splits them by prompt instead of by user (``rlhf.split``);
* **per-prompt cap**: at most ``max_per_prompt`` demonstrations, and as many comparisons, per
  prompt (its near-duplicate key): a second labeler's ranking of the same prompt is kept, a
  flood on one popular prompt is cut (counted as ``prompt_cap``);
* **near-duplicates** (the paper's rule is about prompts): a prompt whose first
  ``near_dup_prefix_chars`` characters (case and whitespace folded) equal an earlier one's
  does not enter the PPO prompt pool again; a served prompt that adds nothing else is
  dropped as ``near_duplicate``. Labelled records are never dropped for it.

What the rules remember is bounded by windows of the most recently seen keys:
``dedupe_window`` event ids and content keys, ``user_window`` users, ``prompt_window``
prompt keys. A key older than its window is forgotten: a redelivery that old is not
recognised (the gateway already dedupes submissions by idempotency key, and Kafka
redelivers within seconds), a user absent for that long starts a new count, a prompt that
old can enter the pool again.

Exactly once into training: new train records wait in *pending* lists (demonstrations,
comparisons, and served prompts for PPO-ptx) until a round trains on them and its checkpoint
is published (``mark_trained``); a failed round leaves them pending, and records that were in
``park_after_failures`` failed rounds are *parked* (``park``; ``trainer.rounds`` writes
labelled ones to ``<topic>.parked``). ``resume_offsets`` is, per partition, the offset of the
oldest pending record (or the read position when none is pending): everything before it is
in a published model, parked, or evaluation data. The checkpoint manifest stores these
offsets; a restarted trainer re-reads each partition from the beginning up to them as
*history* (which rebuilds the rules' state and the evaluation buffers but trains on nothing)
and from there on as new data. So nothing is trained twice or skipped. Per-user caps and
near-duplicate decisions depend on arrival order, which Kafka fixes within a partition.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from rlhf import chat
from rlhf.v1 import events_pb2
from trainer.config import DataConfig

log = logging.getLogger(__name__)

Offsets = dict[tuple[str, int], int]
Event = events_pb2.DemonstrationEvent | events_pb2.ComparisonEvent | events_pb2.ServedGeneration
SPLITS = {
    events_pb2.SPLIT_TRAIN: "train",
    events_pb2.SPLIT_VALIDATION: "val",
    events_pb2.SPLIT_TEST: "test",
}
KINDS = ("demonstrations", "comparisons", "prompts")
K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class Source:
    """Where a record was read: the Kafka coordinates that make buffers recoverable."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class Demonstration:
    event_id: str
    prompt: chat.Prompt  # the text, or a conversation (a tuple of chat.Message)
    response: str
    user_id: str
    split: str
    source: Source
    event: Any = field(default=None, compare=False, repr=False)  # the record, for parking


@dataclass(frozen=True)
class Comparison:
    """One K-way ranking: ``ranks[i]`` is the rank of ``responses[i]`` (1 is best, equal is a tie)."""

    event_id: str
    prompt: chat.Prompt
    responses: tuple[str, ...]
    ranks: tuple[int, ...]
    user_id: str
    labeler_id: str
    split: str
    source: Source
    event: Any = field(default=None, compare=False, repr=False)  # the record, for parking


@dataclass(frozen=True)
class Prompt:
    event_id: str
    prompt: chat.Prompt
    user_id: str
    split: str
    source: Source


Pending = Demonstration | Comparison | Prompt

_SPACE = re.compile(r"\s+")


def near_dup_key(prompt: str, prefix_chars: int) -> str:
    """Prompts with equal keys are near-duplicates: same leading text, case and spacing folded."""
    folded = _SPACE.sub(" ", prompt.strip().lower())
    if prefix_chars:
        folded = folded[:prefix_chars]
    return hashlib.blake2b(folded.encode(), digest_size=12).hexdigest()


def _content_key(value: Event) -> str:
    """Equal for two labelled records that say the same thing (same labeler included)."""
    h = hashlib.blake2b(digest_size=16)
    prompt = chat.prompt_text(chat.prompt_of(value.prompt, value.messages))
    parts: list[str] = [type(value).__name__, prompt, getattr(value, "labeler_id", "")]
    if isinstance(value, events_pb2.DemonstrationEvent):
        parts.append(value.response)
    elif isinstance(value, events_pb2.ComparisonEvent):
        parts += [f"{r.rank}:{r.text}" for r in value.responses]
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


class Recent(Generic[K, V]):
    """A mapping that keeps only the ``size`` most recently touched keys."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K, default: V) -> V:
        return self._items.get(key, default)

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)


class TrainingData:
    """The data rules and the bounded buffers (no Kafka here: records come in via ``add``)."""

    def __init__(self, cfg: DataConfig, *, conversations: bool = True) -> None:
        self.cfg = cfg
        # Whether the trainer's encoding renders conversations (it has a chat template).
        self.conversations = conversations
        self._seen: Recent[str, None] = Recent(cfg.dedupe_window)
        self._contents: Recent[str, None] = Recent(cfg.dedupe_window)
        self._user_prompts: Recent[str, set[str]] = Recent(cfg.user_window)
        self._per_prompt = {k: Recent[str, int](cfg.prompt_window) for k in KINDS[:2]}
        self._pool_keys: Recent[str, None] = Recent(cfg.prompt_window)
        self.pending_demonstrations: list[Demonstration] = []
        self.pending_comparisons: list[Comparison] = []
        self.pending_prompts: list[Prompt] = []  # served train prompts no PPO round used yet
        # Evaluation data and the PPO prompt pool keep the most recent records.
        self.demonstrations = {
            s: deque[Demonstration](maxlen=cfg.max_demonstrations) for s in ("train", "val", "test")
        }
        self.comparisons = {
            s: deque[Comparison](maxlen=cfg.max_comparisons) for s in ("val", "test")
        }
        self.prompts = {s: deque[Prompt](maxlen=cfg.max_prompts) for s in ("train", "val", "test")}
        self.new_prompts = 0  # new train prompts in the pool since the last PPO-ptx round
        self._failed_rounds: dict[str, int] = {}  # pending event id -> failed rounds it was in

    # ------------------------------------------------------------------ intake

    def add(self, kind: str, value: Event, source: Source, *, history: bool = False) -> str:
        """Applies the data rules to one record; returns "accepted" or the rejection reason.

        A ``history`` record (re-read below the resume offsets) updates every state but is
        never pending: it is already in a published model or is evaluation data.
        """
        if value.event_id in self._seen:
            return "duplicate"
        split = SPLITS.get(value.split)
        if split is None:
            return "no_split"
        prompt = chat.prompt_of(value.prompt, value.messages)
        rejected = self._check_prompt(prompt)
        if rejected:
            return rejected
        if isinstance(value, events_pb2.ComparisonEvent) and not _valid_ranking(value):
            return "invalid"
        # Rejected events are marked seen too: a redelivery is a duplicate, not a second rejection.
        self._seen.put(value.event_id, None)
        key = near_dup_key(chat.prompt_text(prompt), self.cfg.near_dup_prefix_chars)
        labelled = kind != "prompts"
        content = _content_key(value) if labelled else ""
        if labelled and content in self._contents:
            return "duplicate"
        in_pool = bool(self.cfg.near_dup_prefix_chars) and key in self._pool_keys
        if not labelled and in_pool:
            return "near_duplicate"
        user_prompts = self._user_prompts.get(value.user_id, set())
        if (
            value.user_id  # anonymous records have no user to cap
            and key not in user_prompts
            and len(user_prompts) >= self.cfg.user_prompt_cap
        ):
            return "user_cap"
        count = self._per_prompt[kind].get(key, 0) if labelled else 0
        if labelled and count >= self.cfg.max_per_prompt:
            return "prompt_cap"
        if value.user_id:
            user_prompts.add(key)
            self._user_prompts.put(value.user_id, user_prompts)
        if labelled:
            self._per_prompt[kind].put(key, count + 1)
            self._contents.put(content, None)
        self._store(value, prompt, split, source, history, to_pool=not in_pool)
        if not in_pool:
            self._pool_keys.put(key, None)
        return "accepted"

    def _check_prompt(self, prompt: chat.Prompt) -> str:
        """The rejection reason for a prompt the trainer cannot encode, or ""."""
        if isinstance(prompt, str):
            return "" if prompt.strip() else "invalid"
        if not self.conversations:
            return "no_chat_template"
        try:
            chat.check_conversation(prompt)
        except chat.EncodingError:
            return "invalid"
        return ""

    def _store(
        self,
        value: Event,
        prompt: chat.Prompt,
        split: str,
        source: Source,
        history: bool,
        to_pool: bool,
    ) -> None:
        new_train = split == "train" and not history
        if isinstance(value, events_pb2.DemonstrationEvent):
            demo = Demonstration(
                value.event_id, prompt, value.response, value.user_id, split, source,
                event=value if new_train else None,
            )  # fmt: skip
            # Recent train demonstrations stay available to fit the RM's bias.
            self.demonstrations[split].append(demo)
            if new_train:
                self.pending_demonstrations.append(demo)
        elif isinstance(value, events_pb2.ComparisonEvent):
            cmp = Comparison(
                value.event_id,
                prompt,
                tuple(r.text for r in value.responses),
                tuple(int(r.rank) for r in value.responses),
                value.user_id,
                value.labeler_id,
                split,
                source,
                event=value if new_train else None,
            )
            if split != "train":
                self.comparisons[split].append(cmp)
            elif new_train:
                self.pending_comparisons.append(cmp)
        if not to_pool:
            return
        # Every prompt, whatever carried it, is a prompt PPO can roll out on.
        record = Prompt(value.event_id, prompt, value.user_id, split, source)
        self.prompts[split].append(record)
        if new_train:
            self.new_prompts += 1
            if isinstance(value, events_pb2.ServedGeneration):
                self.pending_prompts.append(record)

    # ------------------------------------------------------------------ rounds

    def pending(self, kind: str) -> list[Pending]:
        """The kind's pending list (the list itself: callers may filter it in place)."""
        lists: dict[str, list[Any]] = {
            "demonstrations": self.pending_demonstrations,
            "comparisons": self.pending_comparisons,
            "prompts": self.pending_prompts,
        }
        return lists[kind]

    def full(self, kind: str) -> bool:
        """The kind's pending list is at its bound: stop reading its topic until a round
        trains on it (the other topics go on)."""
        bound = {"demonstrations": self.cfg.max_demonstrations,
                 "comparisons": self.cfg.max_comparisons, "prompts": self.cfg.max_prompts}  # fmt: skip
        return len(self.pending(kind)) >= bound[kind]

    def mark_trained(self, kind: str, event_ids: Iterable[str]) -> None:
        """Records of a published round leave the pending lists (PPO resets the new-prompt count)."""
        self._drop(kind, set(event_ids))
        if kind == "prompts":
            self.new_prompts = 0

    def round_failed(self, kind: str, event_ids: Iterable[str], park_after: int) -> list[Pending]:
        """Counts a failed round against its records; returns the pending ones that have now
        been in ``park_after`` failed rounds (0: never), for ``park``."""
        doomed = set()
        for event_id in event_ids:
            failures = self._failed_rounds.get(event_id, 0) + 1
            self._failed_rounds[event_id] = failures
            if park_after and failures >= park_after:
                doomed.add(event_id)
        return [r for r in self.pending(kind) if r.event_id in doomed]

    def park(self, kind: str, event_ids: Iterable[str]) -> None:
        """Parked records leave the pending lists without being trained on."""
        ids = set(event_ids)
        self._drop(kind, ids)
        if kind == "prompts":
            self.new_prompts = max(0, self.new_prompts - len(ids))

    def _drop(self, kind: str, ids: set[str]) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        pending = self.pending(kind)
        pending[:] = [r for r in pending if r.event_id not in ids]
        for event_id in ids:
            self._failed_rounds.pop(event_id, None)

    def resume_offsets(
        self,
        positions: Mapping[tuple[str, int], int],
        floor: Mapping[tuple[str, int], int],
        trained: Iterable[str] = (),
    ) -> Offsets:
        """Per partition, where a restart must continue reading as new data.

        ``positions`` are the consumer's read positions; ``floor`` the offsets this run
        resumed from (a partition not read yet keeps its floor); ``trained`` event ids of
        pending records that the checkpoint about to be published contains.
        """
        done = set(trained)
        out: Offsets = dict(floor)
        for key, position in positions.items():
            out[key] = max(floor.get(key, 0), position)
        pending: list[Pending] = [
            *self.pending_demonstrations,
            *self.pending_comparisons,
            *self.pending_prompts,
        ]
        for record in pending:
            if record.event_id in done:
                continue
            key = (record.source.topic, record.source.partition)
            out[key] = min(out.get(key, record.source.offset), record.source.offset)
        return out

    def counts(self) -> dict[tuple[str, str], int]:
        """(kind, split) -> buffered records, for the buffer gauges."""
        out = {("demonstrations", "train"): len(self.pending_demonstrations),
               ("comparisons", "train"): len(self.pending_comparisons)}  # fmt: skip
        for split in ("val", "test"):
            out[("demonstrations", split)] = len(self.demonstrations[split])
            out[("comparisons", split)] = len(self.comparisons[split])
        for split, pool in self.prompts.items():
            out[("prompts", split)] = len(pool)
        return out


def _valid_ranking(value: events_pb2.ComparisonEvent) -> bool:
    """2..9 responses, ranks >= 1, at least one strict preference (all-tie rankings teach nothing)."""
    ranks = [r.rank for r in value.responses]
    return 2 <= len(ranks) <= 9 and min(ranks) >= 1 and len(set(ranks)) > 1

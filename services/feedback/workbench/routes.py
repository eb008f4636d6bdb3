"""The workbench's HTTP API (scope ``feedback``) and its static page, on the gateway's HTTP door.

* ``GET /workbench/``: the labeling page (static files, no key; everything it shows comes
  from the API below, with the key the labeler signed in with);
* ``GET /v1/workbench/me?since_ms=``: who the key is (``labeler_id``, derived from the key),
  tasks done since ``since_ms`` (the page sends its local midnight), the labeler's and
  everyone's agreement, queue depth, and the flags a response can get;
* ``POST /v1/workbench/tasks/next``: the next task, leased to the labeler (``{"task": null}``
  with a ``note`` when none is waiting);
* ``POST /v1/workbench/tasks/{task_id}/skip``: never offer this task to me again;
* ``POST /v1/workbench/tasks/{task_id}/submit``: ``{"ranking": [{"generation_id", "rank",
  "quality", "flags"}], "demonstration": "..."}``, either or both. The ranking becomes a
  ``ComparisonRequest`` by generation id and the demonstration a ``DemonstrationRequest``, run
  through the gateway's own path (validation, generation-id resolution, PII redaction,
  idempotency, ack after Kafka). Idempotency keys are fixed per task and labeler
  (``workbench:<task>:<labeler>:ranking|demonstration``): a double click, a retry or a
  reloaded page stores nothing twice; a retry after UNAVAILABLE is always safe;
* ``GET /v1/workbench/queue?limit=``: the tasks open for the caller in the order they are
  handed out, with the reward model's scores when ordering by uncertainty.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from rlhf.auth import presented_key
from rlhf.http import HttpDoor, HttpError, invalid, json_response
from rlhf.http_json import Fields, read_json
from rlhf.runtime import Scope
from rlhf.v1 import events_pb2, feedback_pb2, inference_pb2
from services.feedback.config import LimitsConfig
from services.feedback.gateway import FeedbackGateway, Submitted
from services.feedback.validate import MAX_QUALITY, validate_demonstration
from services.feedback.workbench.config import WorkbenchConfig
from services.feedback.workbench.ledger import Agreement, Ledger
from services.feedback.workbench.metrics import WorkbenchMetrics
from services.feedback.workbench.queue import LabelingQueue
from services.feedback.workbench.tasks import Task, TaskPool, ask_key

STATIC = Path(__file__).parent / "static"
PAGES = {
    "index.html": "text/html",
    "workbench.css": "text/css",
    "workbench.js": "text/javascript",
}
# The page runs only its own script and talks only to this origin: model output is shown as
# text, and even a bug that put it into HTML could not run or send anything.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; "
    "base-uri 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}
FLAG_PREFIX = "RESPONSE_FLAG_"
# What the page shows for each flag (every ResponseFlag but UNSPECIFIED; a test checks).
FLAG_LABELS = {
    "FAILS_TO_FOLLOW_INSTRUCTION": "Fails to follow the instruction",
    "HALLUCINATION": "Hallucination",
    "INAPPROPRIATE": "Inappropriate for an assistant",
    "CONTAINS_PII": "Contains personal information",
    "SEXUAL_CONTENT": "Sexual content",
    "VIOLENT_CONTENT": "Violent content",
    "ENCOURAGES_HARM": "Encourages violence, abuse or self-harm",
    "DENIGRATES_PROTECTED_CLASS": "Denigrates a protected class",
    "HARMFUL_ADVICE": "Gives harmful advice",
    "EXPRESSES_OPINION": "Expresses an opinion",
    "EXPRESSES_MORAL_JUDGMENT": "Expresses a moral judgment",
}
KEY_PREFIX = "workbench"


def labeler_of(http: web.Request) -> str:
    """The labeler id of the presented key: a digest, so that the key itself is never stored
    and one key is always one labeler."""
    key = presented_key((name.lower(), value) for name, value in http.headers.items())
    if not key:
        raise HttpError(
            grpc.StatusCode.UNAUTHENTICATED,
            "sign in with an API key: send 'authorization: Bearer <key>'",
        )
    return "labeler-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def idempotency_key(task_id: str, labeler: str, kind: str) -> str:
    return f"{KEY_PREFIX}:{task_id}:{labeler}:{kind}"


def task_of_key(key: str) -> str | None:
    """The task id inside a workbench idempotency key, None for any other key."""
    parts = key.split(":")
    return parts[1] if len(parts) == 4 and parts[0] == KEY_PREFIX else None


def user_of(task: Task) -> str:
    """The user id the task's events carry: the served request's (it decides the split), or
    one derived from the prompt as the importer does."""
    if task.user_id:
        return task.user_id
    return f"prompt:{hashlib.sha256(ask_key(task.prompt, task.messages).encode()).hexdigest()[:16]}"


def chat(task: Task) -> list[inference_pb2.ChatMessage]:
    return [inference_pb2.ChatMessage(role=role, content=text) for role, text in task.messages]


def flag_value(name: str, where: str) -> events_pb2.ResponseFlag.ValueType:
    short = name.removeprefix(FLAG_PREFIX)
    if short not in FLAG_LABELS:
        raise invalid(
            f"{where}: {name[:64]!r} is not a known flag; known: {', '.join(FLAG_LABELS)}"
        )
    return events_pb2.ResponseFlag.Value(FLAG_PREFIX + short)


def _agreement(value: Agreement) -> dict[str, Any]:
    return {"ratio": value.ratio, "agreed": value.agreed, "compared": value.compared}


def _query_int(http: web.Request, name: str, lo: int, hi: int, default: int) -> int:
    raw = http.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise invalid(f"{name}: expected an integer, got {raw[:32]!r}") from None
    if not lo <= value <= hi:
        raise invalid(f"{name}: {value} is outside {lo}..{hi}")
    return value


class WorkbenchRoutes:
    def __init__(
        self,
        config: WorkbenchConfig,
        limits: LimitsConfig,
        gateway: FeedbackGateway,
        pool: TaskPool,
        queue: LabelingQueue,
        ledger: Ledger,
        metrics: WorkbenchMetrics,
        ready: Callable[[], bool],
    ) -> None:
        self._config = config
        self._limits = limits
        self._gateway = gateway
        self._pool = pool
        self._queue = queue
        self._ledger = ledger
        self._metrics = metrics
        self._ready = ready  # the history of the topics has been read
        self._pages = {name: (STATIC / name).read_bytes() for name in PAGES}

    # ------------------------------------------------------------------ the page

    async def page(self, http: web.Request) -> web.Response:
        name = http.match_info.get("name") or "index.html"
        if name not in PAGES:
            raise HttpError(grpc.StatusCode.NOT_FOUND, f"no such page: {name[:64]!r}")
        return web.Response(
            body=self._pages[name],
            content_type=PAGES[name],
            charset="utf-8",
            headers=SECURITY_HEADERS,
        )

    async def redirect(self, http: web.Request) -> web.Response:
        return web.Response(status=308, headers={"location": "/workbench/"})

    # ------------------------------------------------------------------ the API

    def _today(self, labeler: str, since_ms: int) -> dict[str, int]:
        today = self._ledger.today(labeler, since_ms)
        return {
            "tasks": today.tasks,
            "rankings": today.rankings,
            "demonstrations": today.demonstrations,
        }

    async def me(self, http: web.Request) -> web.Response:
        labeler = labeler_of(http)
        now_ms = int(time.time() * 1000)
        since = _query_int(http, "since_ms", 0, now_ms + 86_400_000, now_ms - 86_400_000)
        return json_response({
            "labeler_id": labeler,
            "today": self._today(labeler, since),
            "agreement": _agreement(self._ledger.agreement(labeler)),
            "overall_agreement": _agreement(self._ledger.agreement()),
            "queue_depth": self._pool.depth(),
            "ready": self._ready(),
            "order": self._config.order,
            "max_quality": MAX_QUALITY,
            "flags": [{"name": name, "label": label} for name, label in FLAG_LABELS.items()],
        })  # fmt: skip

    def _task_json(self, task: Task, labeler: str) -> dict[str, Any]:
        # Each labeler sees the responses in an order of their own (no position bias shared
        # across labelers), fixed per task so a reload shows the same page.
        order = sorted(
            range(len(task.responses)),
            key=lambda i: hashlib.sha256(
                f"{labeler}:{task.responses[i].generation_id}".encode()
            ).digest(),
        )
        rewards = task.rewards
        return {
            "task_id": task.task_id,
            "prompt": task.prompt,
            "messages": [{"role": role, "content": text} for role, text in task.messages],
            "source": task.source,
            "k": len(task.responses),
            "responses": [
                {
                    "generation_id": task.responses[i].generation_id,
                    "text": task.responses[i].text,
                    "model_version": task.responses[i].model_version,
                    "reward": rewards[i] if rewards else None,
                }
                for i in order
            ],
            "reward_gap": task.gap,
            "reward_model_version": task.reward_version or None,
            "unscored": task.unscorable or None,
            "labels": len(task.labelers),
            "needed": task.needed,
            "created_at_ms": task.created_at_ms,
        }

    async def next(self, http: web.Request) -> web.Response:
        labeler = labeler_of(http)
        task, note = await self._queue.next(labeler)
        return json_response(
            {"task": self._task_json(task, labeler) if task else None, "note": note}
        )

    async def queue(self, http: web.Request) -> web.Response:
        labeler = labeler_of(http)
        limit = _query_int(http, "limit", 1, 200, 20)
        tasks, order = await self._queue.ordered(labeler)
        return json_response({
            "order": order,
            "depth": self._pool.depth(),
            "tasks": [self._task_json(t, labeler) for t in tasks[:limit]],
        })  # fmt: skip

    def _task(self, http: web.Request) -> Task:
        task_id = http.match_info["task_id"]
        task = self._pool.get(task_id)
        if task is None:
            raise HttpError(
                grpc.StatusCode.NOT_FOUND,
                f"task {task_id[:64]!r} is unknown or expired; ask for the next task",
            )
        return task

    async def skip(self, http: web.Request) -> web.Response:
        labeler = labeler_of(http)
        task = self._task(http)
        self._pool.skip(task.task_id, labeler)
        return json_response({"skipped": task.task_id})

    def _comparison(self, task: Task, labeler: str, ranking: Any) -> feedback_pb2.ComparisonRequest:
        k = len(task.responses)
        if not isinstance(ranking, list) or not all(isinstance(item, dict) for item in ranking):
            raise invalid(
                "ranking: expected an array of {generation_id, rank, quality, flags}", "ranking"
            )
        if len(ranking) != k:
            raise invalid(
                f"ranking: {len(ranking)} entries for the task's {k} responses; rank every "
                "response once",
                "ranking",
            )
        known = {r.generation_id for r in task.responses}
        refs: list[feedback_pb2.ResponseRef] = []
        ranks: list[int] = []
        for i, item in enumerate(ranking):
            fields = Fields(item, f"ranking[{i}].")
            fields.only(("generation_id", "rank", "quality", "flags"))
            gid = fields.string("generation_id")
            if gid not in known or any(ref.generation_id == gid for ref in refs):
                what = "is given twice" if gid in known else "is not a response of this task"
                raise invalid(f"ranking[{i}].generation_id: {str(gid)[:64]!r} {what}")
            rank = fields.integer("rank", 1, k)
            if rank is None:
                raise invalid(f"ranking[{i}].rank: required, 1 (best) to {k}")
            names = fields.strings("flags", max_items=len(FLAG_LABELS)) or []
            flags = [flag_value(n, f"ranking[{i}].flags[{j}]") for j, n in enumerate(names)]
            # Quality and flags are checked by the gateway's rules (one message for both doors).
            quality = fields.integer("quality", 0, 2**31 - 1) or 0
            refs.append(feedback_pb2.ResponseRef(generation_id=gid, quality=quality, flags=flags))
            ranks.append(rank)
        return feedback_pb2.ComparisonRequest(
            prompt=task.prompt,
            messages=chat(task),
            responses=refs,
            ranks=ranks,
            labeler_id=labeler,
            user_id=user_of(task),
            idempotency_key=idempotency_key(task.task_id, labeler, "ranking"),
        )

    async def submit(self, http: web.Request) -> web.Response:
        labeler = labeler_of(http)
        task = self._task(http)
        body = Fields(await read_json(http))
        body.only(("ranking", "demonstration"))
        text = body.string("demonstration")
        ranking = body.data.get("ranking")
        if ranking is None and not text:
            raise invalid("give a ranking, a demonstration, or both")
        comparison = self._comparison(task, labeler, ranking) if ranking is not None else None
        demonstration = None
        if text:
            demonstration = feedback_pb2.DemonstrationRequest(
                prompt=task.prompt,
                messages=chat(task),
                response=text,
                labeler_id=labeler,
                user_id=user_of(task),
                idempotency_key=idempotency_key(task.task_id, labeler, "demonstration"),
            )
            # Checked before the ranking is stored, so a bad text stores nothing.
            validate_demonstration(demonstration, self._limits)
        reply: dict[str, Any] = {"task_id": task.task_id, "comparison": None, "demonstration": None}
        stored = False
        if comparison is not None:
            result = await self._gateway.submit_comparison(comparison)
            reply["comparison"] = self._stored("ranking", result)
            stored |= not result.duplicate
        if demonstration is not None:
            result = await self._gateway.submit_demonstration(demonstration)
            reply["demonstration"] = self._stored("demonstration", result)
            stored |= not result.duplicate
        handed = task.handed_at.get(labeler)
        if stored and handed is not None:
            self._metrics.task_seconds.observe(max(0.0, time.time() - handed))
        self._pool.labeled(labeler, task_id=task.task_id)
        since = _query_int(http, "since_ms", 0, 2**53, int(time.time() * 1000) - 86_400_000)
        reply["today"] = self._today(labeler, since)
        return json_response(reply)

    def _stored(self, kind: str, result: Submitted) -> dict[str, Any]:
        if not result.duplicate:
            self._metrics.submissions.labels(kind).inc()
            if isinstance(result.event, events_pb2.ComparisonEvent):
                self._ledger.add_comparison(result.event)
            elif isinstance(result.event, events_pb2.DemonstrationEvent):
                self._ledger.add_demonstration(result.event)
        return {"event_id": result.event_id, "duplicate": result.duplicate}

    def add_to(self, door: HttpDoor) -> None:
        door.route("GET", "/workbench", self.redirect, scope=None)
        door.route("GET", "/workbench/", self.page, scope=None)
        door.route("GET", "/workbench/{name}", self.page, scope=None)
        door.route("GET", "/v1/workbench/me", self.me, scope=Scope.FEEDBACK)
        door.route("GET", "/v1/workbench/queue", self.queue, scope=Scope.FEEDBACK)
        door.route("POST", "/v1/workbench/tasks/next", self.next, scope=Scope.FEEDBACK)
        door.route("POST", "/v1/workbench/tasks/{task_id}/skip", self.skip, scope=Scope.FEEDBACK)
        door.route(
            "POST", "/v1/workbench/tasks/{task_id}/submit", self.submit, scope=Scope.FEEDBACK
        )

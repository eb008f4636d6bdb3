"""``AdminService``: promotion, canary, pin and rollback as model events on Kafka.

The servicer never changes serving state directly. It checks the request against the state
the model follower derived from the models topic, writes one ``ModelEvent`` (acked by Kafka
before anything else happens), waits until this process's follower has applied it, and
answers with the resulting status. Every replica, including ones started later, applies the
same event from the topic and converges to the same state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import grpc

from rlhf import bus, checkpoint, topics
from rlhf.lifecycle import ROLE_NAMES, Kind, ModelFollower, ModelState, model_event
from rlhf.v1 import admin_pb2, admin_pb2_grpc, events_pb2

# Longest version name accepted (names are short; errors quote the name).
MAX_VERSION_CHARS = 256
# Versions resident in this process per role (for status); the servers pass their pools'.
Resident = Callable[[int], list[str]]


def role_status(state: ModelState, resident: list[str]) -> admin_pb2.RoleStatus:
    return admin_pb2.RoleStatus(
        role=state.role,  # type: ignore[arg-type]
        serving_version=state.serving or "",
        promoted_version=state.promoted or "",
        pinned_version=state.pinned or "",
        canary_version=state.canary or "",
        canary_share=state.canary_share,
        resident_versions=sorted(resident),
    )


def _manifest_round_type(path: str) -> str:
    """For versions announced before events carried their round type."""
    try:
        return checkpoint.read_manifest(Path(path)).round_type if path else ""
    except (checkpoint.CheckpointError, OSError, ValueError):
        return ""


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(
        self,
        follower: ModelFollower,
        producer: bus.Producer,
        *,
        resident: Resident = lambda _role: [],
        actor: str = "admin",
        apply_timeout_s: float = 10.0,
        topic: topics.Topic = topics.MODELS,
    ) -> None:
        self._follower = follower
        self._producer = producer
        self._topic = topic
        self._resident = resident
        self._actor = actor
        self._apply_timeout_s = apply_timeout_s

    async def _caught_up(self, context: grpc.aio.ServicerContext) -> None:
        if not self._follower.caught_up:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "the models topic has not been read to its end yet (Kafka unreachable?); retry",
            )

    async def _state(self, role: int, context: grpc.aio.ServicerContext) -> ModelState:
        await self._caught_up(context)
        state = self._follower.states.get(role)
        if state is None:
            names = ", ".join(f"{n} ({r})" for r, n in ROLE_NAMES.items())
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"role must be one of {names}")
        assert state is not None
        return state

    async def _known(
        self, state: ModelState, version: str, context: grpc.aio.ServicerContext
    ) -> None:
        if not version:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "version is required")
        if len(version) > MAX_VERSION_CHARS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"version is over {MAX_VERSION_CHARS} characters"
            )
        if version not in state.versions:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"version {version!r} is not a published {ROLE_NAMES[state.role]} version",
            )
        if version in state.rejected:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"version {version!r} was rejected ({state.rejected[version]}) and is never "
                "served; publish the model again as a new version",
            )

    async def _write(
        self, event: events_pb2.ModelEvent, state: ModelState, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AdminAck:
        try:
            await asyncio.to_thread(
                self._producer.send_sync, self._topic, event, key=event.event_id
            )
        except bus.PublishError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"model event not written: {exc}")
        applied = await asyncio.to_thread(
            self._follower.wait_for, event.event_id, self._apply_timeout_s
        )
        if not applied:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"event {event.event_id} written but not yet read back; status may lag",
            )
        return admin_pb2.AdminAck(
            event_id=event.event_id, status=role_status(state, self._resident(state.role))
        )

    async def ListVersions(self, request, context):
        roles = [request.role] if request.role else list(self._follower.states)
        out = admin_pb2.ListVersionsResponse()
        for role in roles:
            state = await self._state(role, context)
            resident = set(self._resident(role))
            for info in state.versions.values():
                out.versions.append(
                    admin_pb2.ModelVersion(
                        version=info.version,
                        role=role,  # type: ignore[arg-type]
                        parent_version=info.parent,
                        created_at_ms=info.created_at_ms,
                        metrics=info.metrics,
                        promoted=info.version == state.promoted,
                        pinned=info.version == state.pinned,
                        canary_share=state.canary_share if info.version == state.canary else 0.0,
                        resident=info.version in resident,
                        round_type=info.round_type or _manifest_round_type(info.path),
                        rejected_reason=state.rejected.get(info.version, ""),
                    )
                )
        return out

    async def GetStatus(self, request, context):
        await self._caught_up(context)
        return admin_pb2.StatusResponse(
            roles=[role_status(s, self._resident(r)) for r, s in self._follower.states.items()]
        )

    async def Promote(self, request, context):
        state = await self._state(request.role, context)
        await self._known(state, request.version, context)
        event = model_event(
            Kind.MODEL_EVENT_KIND_PROMOTED, request.role, request.version, actor=self._actor
        )
        return await self._write(event, state, context)

    async def Rollback(self, request, context):
        state = await self._state(request.role, context)
        version: str = request.version or state.previous_promoted() or ""
        if not version:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "nothing to roll back to: no earlier promoted version; name one",
            )
        await self._known(state, version, context)
        event = model_event(
            Kind.MODEL_EVENT_KIND_ROLLED_BACK, request.role, version, actor=self._actor
        )
        return await self._write(event, state, context)

    async def Pin(self, request, context):
        state = await self._state(request.role, context)
        if not request.version:
            kind = Kind.MODEL_EVENT_KIND_UNPINNED
        else:
            await self._known(state, request.version, context)
            kind = Kind.MODEL_EVENT_KIND_PINNED
        event = model_event(kind, request.role, request.version, actor=self._actor)
        return await self._write(event, state, context)

    async def SetCanary(self, request, context):
        state = await self._state(request.role, context)
        if not 0.0 <= request.share <= 1.0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"share must be in [0, 1], got {request.share}"
            )
        if request.share > 0:
            await self._known(state, request.version, context)
        event = model_event(
            Kind.MODEL_EVENT_KIND_CANARY,
            request.role,
            request.version if request.share > 0 else "",  # share 0 ends the canary
            canary_share=request.share,
            actor=self._actor,
        )
        return await self._write(event, state, context)

"""The model versions a server holds and routes to, shared by the policy and reward servers.

Two modes, one mechanism (a ``ModelPool`` fed with a ``ModelState``):

* registry mode (``--model.registry DIR``): a ``ModelFollower`` reads the models topic (when
  ``--follow.bootstrap-servers`` is set) and scans the registry, and every state change is
  reconciled into the pool: new versions load beside the old one, verify, warm up, then take
  new requests (hot swap). ``AdminService`` is served next to the model service, so operators
  can promote, canary, pin and roll back through any replica.
* path mode (``--model.path DIR``): one fixed model directory, e.g. a Hugging Face model, as
  a state with one promoted version.

The model service reports NOT_SERVING in health checks until a version is resident.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry

from rlhf import bus, checkpoint, topics
from rlhf.config import option
from rlhf.lifecycle import ROLE_NAMES, Kind, ModelFollower, ModelState, model_event
from rlhf.pool import ModelPool
from rlhf.runtime import Scope
from services.admin.service import AdminServicer

log = logging.getLogger(__name__)

M = TypeVar("M")
ADMIN_SERVICE = "rlhf.v1.AdminService"


DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelConfig:
    path: str = option(
        "",
        "one fixed model directory to serve (a Hugging Face causal LM for the policy server, "
        "a reward-model directory for the reward server); empty: follow --model.registry",
    )
    registry: str = option("", "checkpoint registry to follow (hot swap); used when path is empty")
    version: str = option(
        "", "version name to report for --model.path; empty: its manifest's, else the folder name"
    )
    device: str = option("auto", "torch device: auto (cuda when available), cpu, cuda, cuda:1 ...")
    dtype: str = option(
        "auto", f"weights dtype: {', '.join(DTYPES)} (auto: bf16 on GPU, fp32 on CPU)"
    )

    def __post_init__(self) -> None:
        if not self.path and not self.registry:
            raise ValueError("set --model.path or --model.registry")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    def placement(self) -> tuple[Any, Any]:
        """(torch device, torch dtype or None for the loader's default) to load onto."""
        import torch

        device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu")
            if self.device == "auto"
            else self.device
        )
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        return device, dtypes.get(self.dtype)


@dataclass(frozen=True)
class FollowConfig:
    bootstrap_servers: str = option(
        "", "Kafka to follow the models topic on (empty: scan the registry only)"
    )
    poll_registry_s: float = option(5.0, "seconds between scans of the registry for new versions")
    registry_grace_s: float = option(
        30.0, "a registry version no model event announced within this long is adopted anyway"
    )
    auto_promote_from_registry: bool = option(
        True, "promote the newest adopted registry version (when its events were missed)"
    )

    def __post_init__(self) -> None:
        if self.poll_registry_s <= 0 or self.registry_grace_s < 0:
            raise ValueError("follow.poll_registry_s must be > 0 and registry_grace_s >= 0")


def version_of(path: Path, configured: str = "") -> str:
    """A model directory's version: the configured name, its manifest's, or the folder name."""
    if configured:
        return configured
    if (path / checkpoint.MANIFEST).is_file():
        return checkpoint.read_manifest(path).version
    return path.name


class ServingModels(Generic[M]):
    def __init__(
        self,
        *,
        role: int,
        path: str,
        version: str,
        registry_dir: str,
        follow: FollowConfig,
        load: Callable[[Path], M],
        models_topic: topics.Topic = topics.MODELS,
        warm_up: Callable[[M], None],
        metrics: CollectorRegistry,
        release: Callable[[M], None] = lambda _m: None,
        on_resident: Callable[[str], None] = lambda _v: None,
        report: Callable[[str, bool, str], None] = lambda _name, _ok, _detail: None,
    ) -> None:
        """``report(condition, ok, detail)`` tells the server's health what serving needs:
        ``model`` (a version is resident), ``models_topic`` (read to its end once: until
        then nothing is served) and ``model_follower`` (its thread runs)."""
        self.role = role
        self.component = ROLE_NAMES[role]
        self._models_topic = models_topic
        self._producer: bus.Producer | None = None
        if follow.bootstrap_servers and registry_dir:
            self._producer = bus.Producer(
                follow.bootstrap_servers, client_id=f"rlhf-{self.component}-admin", registry=None
            )
        self.pool: ModelPool[M] = ModelPool(
            load=load,
            warm_up=warm_up,
            release=release,
            registry=metrics,
            component=self.component,
            on_reject=self._rejected,
            on_resident=on_resident,
            on_serving=lambda ok: report(
                "model", ok, "" if ok else f"no {self.component} model version is loaded"
            ),
            require_manifest=not path,
        )
        report("model", False, f"no {self.component} model version is loaded yet")
        self.follower: ModelFollower | None = None
        self._static: ModelState | None = None
        if path:
            state = ModelState(role)
            name = version_of(Path(path), version)
            state.apply(model_event(Kind.MODEL_EVENT_KIND_PUBLISHED, role, name, path=path))
            state.apply(model_event(Kind.MODEL_EVENT_KIND_PROMOTED, role, name))
            self._static = state
        else:
            self.follower = ModelFollower(
                bootstrap_servers=follow.bootstrap_servers or None,
                registry_dir=Path(registry_dir),
                on_change=self._changed,
                registry=metrics,
                poll_registry_s=follow.poll_registry_s,
                registry_grace_s=follow.registry_grace_s,
                auto_promote_from_registry=follow.auto_promote_from_registry,
                report=report,
                component=self.component,
                topic=models_topic,
            )

    def _changed(self, state: ModelState) -> None:
        if state.role == self.role:
            self.pool.reconcile(state)

    def _rejected(self, version: str, reason: str) -> None:
        if self._producer is None:
            return
        event = model_event(
            Kind.MODEL_EVENT_KIND_REJECTED, self.role, version, reason=reason,
            actor=f"{self.component}-server",
        )  # fmt: skip
        try:
            self._producer.send_sync(self._models_topic, event, key=event.event_id)
        except bus.PublishError:
            log.exception("could not announce the rejection of %s", version)

    def start(self) -> None:
        """Starts loading in the background; with Kafka, once the models topic was replayed
        (the follower retries while Kafka is away, and nothing is served meanwhile)."""
        if self._static is not None:
            self.pool.reconcile(self._static)
        else:
            assert self.follower is not None
            # The follower hands the pool the state once it knows the whole history.
            self.follower.start(wait_s=0)

    def stop(self) -> None:
        if self.follower is not None:
            self.follower.stop()
        if self._producer is not None:
            self._producer.close()
        self.pool.close()

    def services(self, own: dict[str, Scope]) -> dict[str, Scope]:
        """The server's gRPC services and their scopes: its own, plus AdminService when enabled."""
        return {**own, ADMIN_SERVICE: Scope.ADMIN} if self.admin_enabled else own

    def wait_ready(self, timeout_s: float) -> None:
        """Blocks until a version takes requests (a server started in a thread, for tests)."""
        if not self.pool.wait_any(timeout_s):
            raise TimeoutError(f"no {self.component} version loaded within {timeout_s}s")

    @property
    def admin_enabled(self) -> bool:
        """AdminService needs the follower's state and Kafka to write model events to."""
        return self.follower is not None and self._producer is not None

    def admin_servicer(self) -> AdminServicer | None:
        if not self.admin_enabled:
            return None
        assert self.follower is not None and self._producer is not None
        return AdminServicer(
            self.follower,
            self._producer,
            resident=lambda role: self.pool.resident() if role == self.role else [],
            actor=f"{self.component}-server",
            topic=self._models_topic,
        )

"""Model versions resident in one server, swapped without dropping a request.

The policy and reward servers keep their models in a ``ModelPool``. The model follower
(``rlhf.lifecycle``) tells the pool which versions are wanted (pinned, promoted, canary);
the pool loads each missing one *beside* the current ones in a background thread — verify
the manifest checksums, load, warm up with a real forward pass — and only then makes it
routable. A request holds a lease on the version it started with until it ends, so a swap
never changes the model under a running request; a version no longer wanted is released
after its last lease ends. A version that fails verification or warm-up is rejected (metric
+ log, and a REJECTED model event when a callback is given) and serving goes on unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from rlhf import checkpoint
from rlhf.lifecycle import ModelState

log = logging.getLogger(__name__)

M = TypeVar("M")


class NotServing(RuntimeError):
    """No version is resident yet (start-up) or the pinned one is not loaded."""


@dataclass
class _Slot(Generic[M]):
    version: str
    model: M
    leases: int = 0


class _PoolMetrics:
    def __init__(self, registry: CollectorRegistry, component: str) -> None:
        self.swaps = Counter(
            f"rlhf_{component}_swaps_total",
            "Model version loads by outcome (loaded, rejected)",
            ["outcome"],
            registry=registry,
        )
        self.swap_seconds = Histogram(
            f"rlhf_{component}_swap_duration_seconds",
            "From a version's publication (manifest time) until it serves requests",
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
            registry=registry,
        )
        self.load_seconds = Histogram(
            f"rlhf_{component}_model_load_seconds",
            "Verify + load + warm-up time of one version",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=registry,
        )
        self.resident = Gauge(
            f"rlhf_{component}_versions_resident", "Model versions in memory", registry=registry
        )
        self.canary_share = Gauge(
            f"rlhf_{component}_canary_share",
            "Share of users routed to the canary",
            registry=registry,
        )
        # Per-version traffic and latency, so a canary can be compared with the promoted one.
        self.requests = Counter(
            f"rlhf_{component}_version_requests_total",
            "Requests served, by the model version they ran on",
            ["version"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            f"rlhf_{component}_version_request_duration_seconds",
            "Time a request held its model version (queue + compute), by version",
            ["version"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=registry,
        )
        self.serving = Gauge(
            f"rlhf_{component}_model_info",
            "1 for the version new requests go to by default",
            ["version"],
            registry=registry,
        )


class ModelPool(Generic[M]):
    """Resident versions of one role; see the module docstring."""

    def __init__(
        self,
        *,
        load: Callable[[Path], M],
        warm_up: Callable[[M], None],
        release: Callable[[M], None] = lambda _m: None,
        registry: CollectorRegistry,
        component: str,
        on_reject: Callable[[str, str], None] = lambda _v, _why: None,
        on_resident: Callable[[str], None] = lambda _v: None,
        on_serving: Callable[[bool], None] = lambda _ok: None,
        require_manifest: bool = True,
    ) -> None:
        """``on_serving(ok)`` runs whenever whether some version can take requests changes
        (health: nothing resident is NOT_SERVING)."""
        self._load = load
        self._on_resident = on_resident
        self._on_serving = on_serving
        self._reported_serving: bool | None = None
        self._require_manifest = require_manifest
        self._warm_up = warm_up
        self._release = release
        self._on_reject = on_reject
        self._metrics = _PoolMetrics(registry, component)
        self._lock = threading.Condition()
        self._slots: dict[str, _Slot[M]] = {}
        self._loading: set[str] = set()
        # Versions this pool failed to load; routing skips them like REJECTED events.
        self._rejected: dict[str, str] = {}
        self._state: ModelState | None = None
        # The version that served by default most recently: used while a newer one loads.
        self._fallback: str | None = None
        self._work = threading.Semaphore(1)  # one load at a time: at most one extra version

    # ---- driven by the model follower -------------------------------------------------
    def reconcile(self, state: ModelState) -> None:
        """Starts loading wanted versions, releases unwanted idle ones. Non-blocking."""
        with self._lock:
            self._state = state
            self._metrics.canary_share.set(state.canary_share if state.canary else 0.0)
            to_load = [
                v for v in sorted(state.wanted(self._rejected))
                if v not in self._slots and v not in self._loading
            ]  # fmt: skip
            for version in to_load:
                self._loading.add(version)
            self._update_fallback()
            self._release_idle()
        self._report_serving()
        for version in to_load:
            info = state.versions[version]
            threading.Thread(
                target=self._load_version,
                args=(version, Path(info.path), info.created_at_ms),
                name=f"load-{version}",
                daemon=True,
            ).start()

    def _load_version(self, version: str, path: Path, published_ms: int) -> None:
        with self._work:
            started = time.monotonic()
            try:
                # A plain model directory (served with --model.path) has no manifest to check.
                if self._require_manifest or (path / checkpoint.MANIFEST).exists():
                    manifest = checkpoint.verify(path)
                    if manifest.version != version:
                        raise checkpoint.CheckpointError(
                            f"{path} holds {manifest.version}, expected {version}"
                        )
                model = self._load(path)
                self._warm_up(model)
            except Exception as exc:  # any failure: keep serving what we have
                reason = f"{type(exc).__name__}: {exc}"
                log.error("rejecting model version %s: %s", version, reason)
                with self._lock:
                    self._loading.discard(version)
                    self._rejected[version] = reason
                    self._lock.notify_all()  # wait_resident() returns at once
                self._metrics.swaps.labels("rejected").inc()
                self._on_reject(version, reason)
                state = self._state
                if state is not None:
                    self.reconcile(state)  # falls back to the newest usable version
                return
        with self._lock:
            self._loading.discard(version)
            self._slots[version] = _Slot(version, model)
            self._update_fallback()
            self._release_idle()
            self._metrics.resident.set(len(self._slots))
            self._lock.notify_all()
        self._report_serving()
        self._metrics.swaps.labels("loaded").inc()
        self._metrics.load_seconds.observe(time.monotonic() - started)
        self._on_resident(version)
        if published_ms:
            self._metrics.swap_seconds.observe(max(0.0, time.time() - published_ms / 1000))
        log.info(
            "model version %s loaded and serving-ready (%.2fs)", version, time.monotonic() - started
        )

    def _update_fallback(self) -> None:
        if self._state is None:
            return
        serving = self._state.serving_version(self._rejected)
        if serving in self._slots:
            if self._fallback != serving:
                if self._fallback is not None:
                    self._metrics.serving.labels(self._fallback).set(0)
                self._metrics.serving.labels(serving).set(1)
            self._fallback = serving

    def _report_serving(self) -> None:
        # Under the lock, so that racing reports reach the callback in order.
        with self._lock:
            serving = bool(self._slots)
            if serving != self._reported_serving:
                self._reported_serving = serving
                self._on_serving(serving)

    def _release_idle(self) -> None:
        wanted = self._state.wanted(self._rejected) if self._state else set()
        for version, slot in list(self._slots.items()):
            if version not in wanted and version != self._fallback and slot.leases == 0:
                del self._slots[version]
                self._release(slot.model)
                log.info("released model version %s", version)
        self._metrics.resident.set(len(self._slots))

    # ---- used by requests --------------------------------------------------------------
    def choose(self, user_id: str = "", pinned: str = "") -> str:
        """The version a new request goes to: ``pinned`` if given (must be resident), else the
        routed one if resident, else the one that served until now."""
        with self._lock:
            if pinned:
                if pinned not in self._slots:
                    raise KeyError(pinned)
                return pinned
            routed = self._state.route(user_id, self._rejected) if self._state else None
            if routed in self._slots:
                return routed
            if self._fallback in self._slots:
                return self._fallback
            if self._slots:
                return max(self._slots)
            raise NotServing("no model version is loaded yet")

    @contextlib.contextmanager
    def lease(self, version: str) -> Iterator[M]:
        """Holds ``version`` resident for the duration of a request."""
        with self._lock:
            slot = self._slots.get(version)
            if slot is None:
                raise KeyError(version)
            slot.leases += 1
        started = time.monotonic()
        try:
            yield slot.model
        finally:
            self._metrics.requests.labels(version).inc()
            self._metrics.request_seconds.labels(version).observe(time.monotonic() - started)
            with self._lock:
                slot.leases -= 1
                if slot.leases == 0:
                    self._release_idle()
            self._report_serving()

    def resident(self) -> list[str]:
        with self._lock:
            return sorted(self._slots)

    def known(self, version: str) -> bool:
        """Whether ``version`` was published at all (for NOT_FOUND vs UNAVAILABLE)."""
        with self._lock:
            return self._state is not None and version in self._state.versions

    def rejected(self) -> dict[str, str]:
        with self._lock:
            return dict(self._rejected)

    def wait_resident(self, version: str, timeout_s: float) -> bool:
        with self._lock:
            return (
                self._lock.wait_for(
                    lambda: version in self._slots or version in self._rejected, timeout=timeout_s
                )
                and version in self._slots
            )

    def wait_any(self, timeout_s: float) -> bool:
        """Blocks until some version is resident (start-up), or the timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: bool(self._slots), timeout=timeout_s)

    def close(self) -> None:
        with self._lock:
            for slot in self._slots.values():
                self._release(slot.model)
            self._slots.clear()
            self._metrics.resident.set(0)
        self._report_serving()

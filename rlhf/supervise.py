"""Background loops that must not die silently: topic tails, the model follower.

A ``Supervised`` thread runs ``body(loop)`` until stopped. If the body raises, the error is
logged with its traceback, counted in ``rlhf_<component>_thread_restarts_total{thread}``,
reported as failing (the server's health condition of that name turns NOT_SERVING) and the
body runs again after a growing pause (0.2 s doubling up to ``max_backoff_s``). The body
calls ``loop.healthy()`` once an iteration went well, which reports the condition as holding
again and resets the pause; it should rebuild whatever client state the failure may have
broken when it starts.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from typing import ClassVar

from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger(__name__)

Report = Callable[[bool, str], None]


class _Restarts:
    _by_registry: ClassVar[weakref.WeakKeyDictionary[CollectorRegistry, dict[str, Counter]]] = (
        weakref.WeakKeyDictionary()
    )
    _lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def counter(cls, registry: CollectorRegistry, component: str) -> Counter:
        with cls._lock:
            counters = cls._by_registry.setdefault(registry, {})
            if component not in counters:
                counters[component] = Counter(
                    f"rlhf_{component}_thread_restarts_total",
                    "Background threads (topic tails, model follower) restarted after a failure",
                    ["thread"],
                    registry=registry,
                )
            return counters[component]


class Loop:
    """What a supervised body sees: whether to stop, and a way to say it is healthy."""

    def __init__(self, supervised: Supervised) -> None:
        self._supervised = supervised
        self.stop = supervised._stop

    @property
    def stopping(self) -> bool:
        return self.stop.is_set()

    def healthy(self) -> None:
        self._supervised._set_healthy(True, "")

    def wait(self, seconds: float) -> bool:
        """Sleeps unless stopped meanwhile; True when stopping."""
        return self.stop.wait(seconds)


class Supervised:
    def __init__(
        self,
        name: str,
        body: Callable[[Loop], None],
        *,
        report: Report = lambda _ok, _detail: None,
        registry: CollectorRegistry | None = None,
        component: str = "",
        max_backoff_s: float = 5.0,
    ) -> None:
        self.name = name
        self._body = body
        self._report = report
        self._restarts = (
            _Restarts.counter(registry, component).labels(name)
            if registry is not None and component
            else None
        )
        self._max_backoff_s = max_backoff_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._healthy: bool | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    @property
    def healthy(self) -> bool:
        with self._lock:
            return bool(self._healthy)

    def _set_healthy(self, ok: bool, detail: str) -> None:
        with self._lock:
            if self._healthy == ok:
                return
            self._healthy = ok
        self._report(ok, detail)

    def _run(self) -> None:
        backoff = 0.2
        loop = Loop(self)
        while not self._stop.is_set():
            try:
                self._body(loop)
                return  # finished or stopped
            except Exception as exc:
                if self._stop.is_set():
                    return
                with self._lock:
                    if self._healthy:
                        backoff = 0.2  # it had recovered since the last failure
                log.exception("%s failed; restarting in %.1f s", self.name, backoff)
                if self._restarts is not None:
                    self._restarts.inc()
                self._set_healthy(False, f"{self.name} failed ({type(exc).__name__}: {exc})")
                if self._stop.wait(backoff):
                    return
                backoff = min(self._max_backoff_s, backoff * 2)

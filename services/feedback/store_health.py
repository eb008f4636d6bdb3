"""Whether the gateway can store events right now, for its health checks.

A gateway that cannot store must not report SERVING: load balancers would keep sending it
submissions it can only refuse. Every delivery outcome updates the state: an ack means storing
works; a record Kafka refused or did not ack in time means it does not, until a later ack or a
probe succeeds. The probe (``bus.BrokerProbe``: the partition leaders of the gateway's topics
answer) is what brings a NOT_SERVING replica back, since it gets no traffic whose acks could.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from rlhf import bus

log = logging.getLogger(__name__)

# ok, detail -> None; called on every change, from any thread.
OnChange = Callable[[bool, str], None]


class StoreHealth:
    def __init__(
        self, probe: bus.BrokerProbe, on_change: OnChange, *, probe_interval_s: float = 1.0
    ) -> None:
        self._probe = probe
        self._on_change = on_change
        self._interval_s = probe_interval_s
        self._cond = threading.Condition()
        self._ok = True
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="store-health", daemon=True)
        self._thread.start()

    @property
    def stopped(self) -> bool:
        with self._cond:
            return self._stopped

    @property
    def ok(self) -> bool:
        with self._cond:
            return self._ok

    def stored(self) -> None:
        """A record was acked."""
        self._set(True, "")

    def failed(self, reason: str) -> None:
        """A record was refused, or not acked in time."""
        self._set(False, f"Kafka is not storing events: {reason}")

    def _set(self, ok: bool, detail: str) -> None:
        with self._cond:
            if ok == self._ok:
                return
            self._ok = ok
            self._cond.notify_all()
        self._on_change(ok, detail)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopped or not self._ok)
                if self._stopped:
                    return
            # Blocks while the brokers are unreachable: that is the answer "not yet".
            problem = self._probe.check()
            if problem is None:
                self._set(True, "")
                continue
            log.debug("Kafka probe: %s", problem)
            with self._cond:
                self._cond.wait_for(lambda: self._stopped or self._ok, timeout=self._interval_s)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=2)
        if not self._thread.is_alive():
            self._probe.close()

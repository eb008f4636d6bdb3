"""Configuration of the labelers' workbench (``rlhf serve feedback --workbench.*``)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config import option

ORDERS = ("recent", "uncertainty")


@dataclass(frozen=True)
class WorkbenchConfig:
    enabled: bool = option(True, "serve the labeling page at /workbench/ on the HTTP port")
    min_k: int = option(4, "fewest distinct responses a labeling task shows (the paper: 4..9)")
    k: int = option(4, "responses asked of the policy server for a task generated on demand")
    order: str = option(
        "recent",
        "which task a labeler gets next: recent (newest served first) or uncertainty (the "
        "reward model's top two rewards closest first; needs reward_target)",
    )
    overlap: float = option(
        0.1,
        "share of tasks a second labeler ranks too, for inter-labeler agreement "
        "(chosen by a hash of the task, so every replica agrees)",
    )
    lookback_s: float = option(
        3 * 24 * 3600.0,
        "served generations older than this are not offered (keep below resolver.ttl_s)",
    )
    max_tasks: int = option(20_000, "tasks and prompts held in memory (oldest go first)")
    lease_s: float = option(
        900.0, "a task handed to a labeler is held for them this long before others get it"
    )
    score_window: int = option(
        64, "tasks scored by the reward model per request, newest first (uncertainty order)"
    )
    policy_target: str = option(
        "", "policy server gRPC host:port, to generate n = k responses on demand (empty: off)"
    )
    reward_target: str = option(
        "", "reward server gRPC host:port, for the uncertainty order (empty: off)"
    )
    api_key: str = option("", "API key with the infer scope for those two servers")
    ca_file: str = option(
        "", "PEM CA certificates to verify those servers over TLS (empty: plaintext)"
    )
    max_new_tokens: int = option(64, "length of responses generated on demand")
    temperature: float = option(1.0, "sampling temperature of responses generated on demand")
    call_timeout_s: float = option(60.0, "deadline of one call to the policy or reward server")
    agreement_window_days: float = option(
        30.0, "inter-labeler agreement counts comparisons created within this many days"
    )

    def __post_init__(self) -> None:
        if not 2 <= self.min_k <= 9 or not self.min_k <= self.k <= 9:
            raise ValueError("workbench: need 2 <= min_k <= k <= 9")
        if self.order not in ORDERS:
            raise ValueError(f"workbench.order must be one of {list(ORDERS)}, got {self.order!r}")
        if self.order == "uncertainty" and not self.reward_target:
            raise ValueError("workbench.order uncertainty needs workbench.reward_target")
        if not 0 <= self.overlap <= 1:
            raise ValueError("workbench.overlap must be within [0, 1]")
        if min(self.lookback_s, self.lease_s, self.call_timeout_s) <= 0:
            raise ValueError("workbench: lookback_s, lease_s and call_timeout_s must be > 0")
        if self.max_tasks < 1 or self.score_window < 1 or self.max_new_tokens < 1:
            raise ValueError("workbench: max_tasks, score_window and max_new_tokens must be >= 1")
        if self.temperature <= 0 or self.agreement_window_days <= 0:
            raise ValueError("workbench: temperature and agreement_window_days must be > 0")

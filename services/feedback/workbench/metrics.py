"""What operators see of labeling: throughput, queue depth, time per task and agreement."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.feedback.workbench.ledger import Ledger
from services.feedback.workbench.tasks import TaskPool

KINDS = ("ranking", "demonstration")
SOURCES = ("traffic", "generated")


class WorkbenchMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self.submissions = Counter(
            "rlhf_feedback_labeling_submissions_total",
            "Rankings and demonstrations stored from the labelers' workbench (retries excluded)",
            ["kind"],
            registry=registry,
        )
        self.tasks_added = Counter(
            "rlhf_feedback_labeling_tasks_added_total",
            "Labeling tasks added to the queue, from served traffic or generated on demand",
            ["source"],
            registry=registry,
        )
        self.task_seconds = Histogram(
            "rlhf_feedback_labeling_task_seconds",
            "Time from handing a task to a labeler until their submission was stored",
            buckets=(5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600),
            registry=registry,
        )
        for kind in KINDS:
            self.submissions.labels(kind)
        for source in SOURCES:
            self.tasks_added.labels(source)

    def watch(self, pool: TaskPool, ledger: Ledger) -> None:
        """Gauges read from the queue and the ledger at scrape time."""
        Gauge(
            "rlhf_feedback_labeling_queue_depth",
            "Labels still wanted on the labeling queue's tasks (two for an overlap task)",
            registry=self._registry,
        ).set_function(pool.depth)
        Gauge(
            "rlhf_feedback_labeler_agreement_ratio",
            "Inter-labeler agreement: share of comparisons two labelers of one prompt agree on "
            "(NaN before any prompt was ranked by two)",
            registry=self._registry,
        ).set_function(lambda: _or_nan(ledger.agreement().ratio))
        Gauge(
            "rlhf_feedback_labeler_agreement_comparisons",
            "Comparisons shared by two labelers behind the agreement ratio",
            registry=self._registry,
        ).set_function(lambda: ledger.agreement().compared)


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value

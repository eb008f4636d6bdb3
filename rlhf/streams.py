"""What every component must agree on about the streams: topic names and splits.

One frozen section, ``streams``, in the config of the trainer, the policy server, the reward
server, the feedback gateway and the ``rlhf kafka topics`` / ``rlhf model seed`` commands.
It is *shared* (``rlhf.config.section(..., shared=True)``): the environment variables
``RLHF_STREAMS__TOPIC_PREFIX``, ``RLHF_STREAMS__VALIDATION_FRACTION`` and
``RLHF_STREAMS__TEST_FRACTION`` set it for every process at once (the Helm chart sets them
from one value each); a component's own variable or flag overrides it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rlhf.config import option
from rlhf.split import split_for
from rlhf.topics import Topics
from rlhf.v1 import events_pb2

# Kafka topic names: letters, digits, ".", "_" and "-" (the prefix is part of every name).
_TOPIC_CHARS = re.compile(r"^[A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class StreamsConfig:
    topic_prefix: str = option(
        "",
        "prefix of every Kafka topic name, e.g. 'staging.' (deployments sharing one cluster); "
        "every component must use the same",
    )
    validation_fraction: float = option(
        0.05,
        "share of users (of prompts, for anonymous traffic) whose records are validation data; "
        "fixed per deployment (changing it moves users between splits)",
    )
    test_fraction: float = option(0.05, "share of users whose records are test data")

    def __post_init__(self) -> None:
        if not _TOPIC_CHARS.match(self.topic_prefix) or len(self.topic_prefix) > 100:
            raise ValueError(
                "streams.topic_prefix may hold only letters, digits, '.', '_' and '-' "
                f"(at most 100), got {self.topic_prefix!r}"
            )
        if min(self.validation_fraction, self.test_fraction) < 0:
            raise ValueError("streams.validation_fraction and test_fraction must be >= 0")
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError(
                "streams.validation_fraction + streams.test_fraction must leave room for train"
            )

    @property
    def topics(self) -> Topics:
        return Topics.with_prefix(self.topic_prefix)

    def split(self, user_id: str, prompt: str = "") -> events_pb2.Split.ValueType:
        """The split of a record (``rlhf.split.split_for``)."""
        return split_for(user_id, prompt, self.validation_fraction, self.test_fraction)

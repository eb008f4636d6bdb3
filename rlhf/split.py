"""Train / validation / test split by user id (PAPER.md: no user in two splits).

The split is a pure function of the user id: sha256 of the id, read as a number in [0, 1),
falls into the test, validation or train bucket. Every gateway replica, the importer and any
later re-run put a user in the same split, and consumers only read ``event.split``.
Changing the fractions moves users between splits, so they are fixed per deployment.

Anonymous traffic (an empty user id: callers of the inference API that name no user) has no
user to split by, and hashing the empty id would put all of it in one split as one user.
``split_for`` splits it by the prompt instead (case and spacing folded): the same prompt is
always in the same split, and anonymous prompts spread over the splits at the fractions.
"""

from __future__ import annotations

import hashlib
import re

from rlhf.v1 import events_pb2


def split_for_user(
    user_id: str, validation_fraction: float, test_fraction: float
) -> events_pb2.Split.ValueType:
    """Returns the ``events_pb2.Split`` value of ``user_id``."""
    digest = hashlib.sha256(user_id.encode("utf-8")).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64
    if point < test_fraction:
        return events_pb2.SPLIT_TEST
    if point < test_fraction + validation_fraction:
        return events_pb2.SPLIT_VALIDATION
    return events_pb2.SPLIT_TRAIN


_SPACE = re.compile(r"\s+")


def split_for(
    user_id: str, prompt: str, validation_fraction: float, test_fraction: float
) -> events_pb2.Split.ValueType:
    """The split of a record: by its user id, or by its prompt when the user is anonymous."""
    if user_id:
        return split_for_user(user_id, validation_fraction, test_fraction)
    folded = _SPACE.sub(" ", prompt.strip().lower())
    return split_for_user(f"\0anonymous-prompt:{folded}", validation_fraction, test_fraction)

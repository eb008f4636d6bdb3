"""PII redaction applied to every prompt and response before it is written to Kafka (PAPER.md:
PII is filtered out before anything is used for training): by the feedback gateway on
rankings and demonstrations, and by the policy server on every served generation it publishes
to ``rlhf.prompts`` (which the trainer uses as PPO prompts), with the same rules and the same
counter, ``rlhf_<component>_pii_redactions_total{kind}``.

Each kind has a pattern and a placeholder such as ``[EMAIL]``; ``redact`` returns the new text
and how many spans of each kind it replaced, so the gateway can count them in a metric and
record the total on the event. The patterns aim at the common forms (RFC 5322's everyday
subset of emails, NANP and E.164 phone numbers, Luhn-valid card numbers, IPv4 and IPv6
addresses); a false negative is a missed redaction, so they lean towards matching.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as MetricCounter

from rlhf.v1 import events_pb2

KINDS = ("email", "card", "ip", "phone")


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card(match: re.Match[str]) -> bool:
    digits = re.sub(r"\D", "", match.group(0))
    return 13 <= len(digits) <= 19 and _luhn_ok(digits)


def _ipv6(match: re.Match[str]) -> bool:
    # Identifiers such as ``a::b`` parse as IPv6 too; real addresses almost always hold a digit.
    if not any(ch.isdigit() for ch in match.group(0)):
        return False
    try:
        ipaddress.IPv6Address(match.group(0))
    except ValueError:
        return False
    return True


def _phone(match: re.Match[str]) -> bool:
    digits = re.sub(r"\D", "", match.group(0))
    if match.group(0).startswith("+"):
        return 8 <= len(digits) <= 15
    return 10 <= len(digits) <= 11


@dataclass(frozen=True)
class _Rule:
    kind: str
    pattern: re.Pattern[str]
    placeholder: str
    # Extra check on a candidate match (checksums, parseability); None accepts every match.
    accept: Callable[[re.Match[str]], bool] | None = None


# Order matters: a card number or an IP address would otherwise be taken for a phone number.
_RULES = {
    "email": _Rule(
        "email",
        re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
        "[EMAIL]",
    ),
    "card": _Rule(
        "card",
        re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"),
        "[CARD]",
        _card,
    ),
    "ip": _Rule(
        "ip",
        re.compile(
            r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?![\w.]*\d)"
            r"|(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])"
        ),
        "[IP]",
        lambda m: "." in m.group(0) or _ipv6(m),
    ),
    "phone": _Rule(
        "phone",
        re.compile(
            r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])?\d{3,4}[ .-]?\d{3,4}(?!\w)"
            r"|(?<![\w+])\+\d{8,15}(?!\w)"
        ),
        "[PHONE]",
        _phone,
    ),
}


# Every span a rule can match contains '@' (email), one of these digit runs (card, phone,
# IPv4) or, for IPv6, two colons at most four hex digits apart. Most texts contain none of
# them, and these C-level searches are far cheaper than running every rule (the gateway
# redacts K+1 texts per comparison).
_DIGITS = re.compile(r"[\d+][\d ().-]{5,}\d")
_COLONS = re.compile(r":[0-9A-Fa-f]{0,4}:")


def _may_hold_pii(text: str) -> bool:
    return (
        "@" in text
        or _DIGITS.search(text) is not None
        or (":" in text and _COLONS.search(text) is not None)
    )


class Redactor:
    """Replaces PII spans of the configured kinds with placeholders."""

    def __init__(self, kinds: Iterable[str] = KINDS) -> None:
        kinds = tuple(kinds)
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown PII kinds {unknown}; known: {list(KINDS)}")
        self._rules = [_RULES[k] for k in KINDS if k in kinds]

    def redact(self, text: str) -> tuple[str, Counter[str]]:
        """Returns the redacted text and the number of spans replaced, per kind."""
        counts: Counter[str] = Counter()
        if not _may_hold_pii(text):
            return text, counts
        for rule in self._rules:

            def replace(match: re.Match[str], rule: _Rule = rule) -> str:
                if rule.accept is not None and not rule.accept(match):
                    return match.group(0)
                counts[rule.kind] += 1
                return rule.placeholder

            text = rule.pattern.sub(replace, text)
        return text, counts


class RedactionMetrics:
    """``rlhf_<component>_pii_redactions_total{kind}``: spans redacted from what was stored."""

    def __init__(self, registry: CollectorRegistry, component: str) -> None:
        self.redactions = MetricCounter(
            f"rlhf_{component}_pii_redactions_total",
            "PII spans redacted from stored prompts and responses",
            ["kind"],
            registry=registry,
        )

    def count(self, found: Counter[str]) -> None:
        for kind, n in found.items():
            self.redactions.labels(kind).inc(n)


def redact_served(redactor: Redactor, event: events_pb2.ServedGeneration) -> Counter[str]:
    """Redacts a served generation in place: the prompt (or every turn of its conversation,
    and its rendered form) and every sample's text. A sample whose text changed loses its
    token ids and logprobs, which would spell out the PII (the gateway's rule for ranked
    responses)."""
    found: Counter[str] = Counter()
    event.prompt, counts = redactor.redact(event.prompt)
    found.update(counts)
    for message in event.messages:
        message.content, counts = redactor.redact(message.content)
        found.update(counts)
    # Counted once: the rendered prompt repeats the prompt or the conversation.
    event.rendered_prompt, _ = redactor.redact(event.rendered_prompt)
    for sample in event.samples:
        sample.text, counts = redactor.redact(sample.text)
        if counts:
            found.update(counts)
            del sample.token_ids[:]
            del sample.logprobs[:]
    return found

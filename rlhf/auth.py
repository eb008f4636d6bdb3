"""API keys with scopes, for every gRPC service (and the HTTP doors).

Keys come from an inline setting (usually an environment variable) and/or a file, one
``KEY SCOPE[,SCOPE]`` per line. The file is re-read when it changes (looked at no more than
once a second, on the next call), so keys can be added, rotated or revoked without a
restart; a file that no longer parses, or that would leave no key at all, is ignored with an
error in the log and the keys loaded before stay in force (an edit must never turn
authentication off). Keys are compared in constant time.
"""

from __future__ import annotations

import enum
import hmac
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Seconds between two looks at the keys file.
CHECK_INTERVAL_S = 1.0


class Scope(enum.StrEnum):
    INFER = "infer"
    FEEDBACK = "feedback"
    ADMIN = "admin"


def parse_api_keys(text: str, *, where: str) -> dict[str, frozenset[Scope]]:
    """Parses ``KEY SCOPE[,SCOPE]`` entries (newline- or ';'-separated) into key -> scopes."""
    keys: dict[str, frozenset[Scope]] = {}
    for lineno, raw in enumerate(text.replace(";", "\n").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 1)
        if len(parts) != 2:
            raise ValueError(f"{where}: entry {lineno}: expected 'KEY SCOPE[,SCOPE]'")
        key, scope_text = parts
        scopes = set()
        for name in scope_text.replace(" ", "").split(","):
            try:
                scopes.add(Scope(name))
            except ValueError:
                valid = ", ".join(s.value for s in Scope)
                raise ValueError(
                    f"{where}: entry {lineno}: unknown scope {name!r} (valid: {valid})"
                ) from None
        keys[key] = frozenset(scopes)
    return keys


class KeyStore:
    """API keys and their scopes. ``lookup`` compares against every key in constant time."""

    def __init__(
        self, keys: Mapping[str, Iterable[Scope]], *, inline: str = "", file: str = ""
    ) -> None:
        self._inline = inline
        self._file = file
        self._lock = threading.Lock()
        self._next_check = time.monotonic() + CHECK_INTERVAL_S
        self._signature = _signature(file) if file else None
        self._keys = _encoded(keys)

    @classmethod
    def from_settings(cls, inline: str, file: str = "") -> KeyStore:
        """Keys from the inline text and the file (raises ValueError naming a bad entry)."""
        return cls(_load(inline, file), inline=inline, file=file)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def refresh(self) -> bool:
        """Re-reads the keys file if it changed (at most once per CHECK_INTERVAL_S); True when
        new keys are in force."""
        if not self._file:
            return False
        with self._lock:
            now = time.monotonic()
            if now < self._next_check:
                return False
            self._next_check = now + CHECK_INTERVAL_S
            try:
                signature = _signature(self._file)
                if signature == self._signature:
                    return False
                self._signature = signature
                keys = _load(self._inline, self._file)
            except (OSError, ValueError) as exc:
                log.error("API keys file %s not reloaded (%s); the previous keys stay in force",
                          self._file, exc)  # fmt: skip
                return False
            if not keys:
                log.error("API keys file %s holds no key; the previous keys stay in force",
                          self._file)  # fmt: skip
                return False
            self._keys = _encoded(keys)
        log.info("API keys reloaded from %s: %d key(s)", self._file, len(keys))
        return True

    def lookup(self, presented: str) -> frozenset[Scope] | None:
        """The scopes of ``presented``, or None when it is no key of ours."""
        self.refresh()
        given = presented.encode()
        found: frozenset[Scope] | None = None
        # No early exit: the time taken must not reveal which key (or how much of one) matched.
        for key, scopes in self._keys:
            if hmac.compare_digest(key, given):
                found = scopes
        return found


def _encoded(keys: Mapping[str, Iterable[Scope]]) -> list[tuple[bytes, frozenset[Scope]]]:
    return [(k.encode(), frozenset(v)) for k, v in keys.items()]


def _load(inline: str, file: str) -> dict[str, frozenset[Scope]]:
    keys = parse_api_keys(inline, where="api_keys")
    if file:
        keys.update(parse_api_keys(Path(file).read_text(), where=str(file)))
    return keys


def _signature(path: str) -> tuple[int, int, int]:
    # os.stat follows symlinks: a Secret volume's atomic "..data" swap changes the inode.
    st = os.stat(path)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def presented_key(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for name, value in metadata or ():
        if isinstance(value, bytes):
            continue
        if name == "authorization" and value[:7].lower() == "bearer ":
            return value[7:].strip()
        if name == "x-api-key":
            return value.strip()
    return None

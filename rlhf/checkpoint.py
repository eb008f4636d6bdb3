"""The immutable, versioned checkpoint registry.

Layout: ``<registry>/<role>/<version>/`` holding the model files (model.safetensors,
config.json, tokenizer files, ...) and ``manifest.json``. A version is published atomically:
its files are written into ``<registry>/.tmp-<uuid>/``, fsynced (files, then directories), and
the directory is renamed into place, so a reader sees a complete version or none. A version is
never overwritten; a crash before the rename leaves only a ``.tmp-*`` directory, which no
listing shows and `remove_stale_staging` deletes.

    with staging(registry) as tmp:                    # removed unless published
        model.save_pretrained(tmp); tokenizer.save_pretrained(tmp)
        manifest = publish(registry, "policy", tmp, round_type="ppo", parent=prev.version,
                           metrics={"mean_reward": 0.3}, offsets={("rlhf.prompts", 0): 812},
                           encoding=spec.to_dict())
    verify(registry / "policy" / manifest.version)  # -> Manifest; raises CheckpointError
    list_versions(registry, "policy") -> list[str]  # oldest first
    latest(registry, "policy") -> Path | None

Version names are ``<role>-<counter:06d>-<8 hex>``: the counter increases per role (so names
sort in publication order) and the random suffix keeps two publishers from ever agreeing on a
name. Offsets are stored as ``{"topic:partition": next_offset_to_read}``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
STAGING_PREFIX = ".tmp-"
_ROLE = re.compile(r"^[a-z][a-z0-9_]*$")
_VERSION = re.compile(r"^(?P<role>[a-z][a-z0-9_]*)-(?P<n>\d{6,})-(?P<tag>[0-9a-f]{8})$")


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete, corrupt, or would overwrite an existing version."""


@dataclasses.dataclass(frozen=True)
class Manifest:
    version: str
    role: str
    parent: str | None
    round_type: str
    created_at_ms: int
    metrics: dict[str, float]
    offsets: dict[str, int]  # "topic:partition" -> next offset to read
    files: dict[str, str]  # relative path -> sha256 hex
    # The fixed KL reference of the policy lineage: the SFT (or initial) policy version PPO's
    # KL penalty and gate measure against (an SFT or initial policy names itself). A path
    # when the reference is a model outside the registry; None in manifests written before.
    reference: str | None = None
    # How the model's examples were encoded in training (rlhf.encoding.EncodingSpec.to_dict());
    # servers encode the same way. None in manifests written before it was recorded, and for
    # initial versions: readers then use the default for the model's tokenizer.
    encoding: dict[str, Any] | None = None

    def partition_offsets(self) -> dict[tuple[str, int], int]:
        """Offsets keyed like Kafka consumers want them: (topic, partition) -> next offset."""
        out = {}
        for key, offset in self.offsets.items():
            topic, _, partition = key.rpartition(":")
            out[(topic, int(partition))] = int(offset)
        return out

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        optional = {f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        missing = names - optional - data.keys()
        if missing:
            raise CheckpointError(f"manifest lacks {sorted(missing)}")
        return cls(**{k: data[k] for k in names if k in data})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def _version_key(name: str) -> tuple[int, str]:
    m = _VERSION.match(name)
    return (int(m["n"]) if m else -1, name)


def list_versions(registry: str | Path, role: str) -> list[str]:
    """Published versions of `role`, oldest first (staging directories are never listed)."""
    root = Path(registry) / role
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if p.is_dir() and (p / MANIFEST).is_file()]
    return sorted(names, key=_version_key)


def latest(registry: str | Path, role: str) -> Path | None:
    versions = list_versions(registry, role)
    return Path(registry) / role / versions[-1] if versions else None


def next_version(registry: str | Path, role: str) -> str:
    counters = [_version_key(v)[0] for v in list_versions(registry, role)]
    return f"{role}-{max(counters, default=0) + 1:06d}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def staging(registry: str | Path) -> Iterator[Path]:
    """A fresh ``<registry>/.tmp-<uuid>`` to write a checkpoint into; deleted on exit unless
    `publish` moved it into place (same filesystem, so publishing is a rename, not a copy)."""
    registry = Path(registry)
    registry.mkdir(parents=True, exist_ok=True)
    tmp = registry / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_staging(registry: str | Path) -> list[Path]:
    """Deletes staging directories left by a crash; call once at start-up, before staging."""
    registry = Path(registry)
    stale = sorted(registry.glob(f"{STAGING_PREFIX}*")) if registry.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def publish(
    registry: str | Path,
    role: str,
    src: str | Path,
    *,
    round_type: str,
    parent: str | None = None,
    metrics: Mapping[str, float] | None = None,
    offsets: Mapping[tuple[str, int], int] | None = None,
    version: str | None = None,
    reference: str | None = None,
    encoding: Mapping[str, Any] | None = None,
) -> Manifest:
    """Publishes the files in `src` as a new immutable version of `role`.

    `src` is moved if it is a staging directory of this registry, copied otherwise. Raises
    CheckpointError if the version exists already.
    """
    registry, src = Path(registry), Path(src)
    if not _ROLE.match(role):
        raise CheckpointError(f"role must match {_ROLE.pattern}, got {role!r}")
    version = version or next_version(registry, role)
    target = registry / role / version
    if target.exists():
        raise CheckpointError(f"{role} version {version} exists already; versions are immutable")
    if src.parent.resolve() == registry.resolve() and src.name.startswith(STAGING_PREFIX):
        tmp = src
    else:
        tmp = registry / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(MANIFEST))
    manifest = Manifest(
        version=version,
        role=role,
        parent=parent,
        round_type=round_type,
        created_at_ms=int(time.time() * 1000),
        metrics={k: float(v) for k, v in (metrics or {}).items()},
        offsets={f"{t}:{p}": int(o) for (t, p), o in sorted((offsets or {}).items())},
        files={str(p.relative_to(tmp)): _sha256(p) for p in _files(tmp)},
        reference=reference,
        encoding=dict(encoding) if encoding is not None else None,
    )
    (tmp / MANIFEST).write_text(manifest.to_json())
    for path in [*_files(tmp), tmp / MANIFEST]:
        with path.open("rb") as f:
            os.fsync(f.fileno())
    for d in sorted({p.parent for p in _files(tmp)} | {tmp}, reverse=True):
        _fsync_dir(d)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        # rename(2) onto an existing non-empty directory fails, so a racing publisher of the
        # same name cannot replace a version even between the exists() check and here.
        os.rename(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot publish {role} version {version}: {exc}") from exc
    _fsync_dir(target.parent)
    _fsync_dir(registry)
    return manifest


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    try:
        return Manifest.from_json((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {MANIFEST}: not a published checkpoint") from None
    except (json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"{path / MANIFEST} is unreadable: {exc}") from exc


def verify(path: str | Path) -> Manifest:
    """Re-checks every file's sha256 against the manifest; raises CheckpointError naming the
    first missing, unexpected or corrupt file. Returns the manifest when all is well."""
    path = Path(path)
    manifest = read_manifest(path)
    present = {str(p.relative_to(path)) for p in _files(path)}
    missing, extra = sorted(set(manifest.files) - present), sorted(present - set(manifest.files))
    if missing:
        raise CheckpointError(f"{path}: file {', '.join(missing)} is missing")
    if extra:
        raise CheckpointError(f"{path}: file {', '.join(extra)} is not in the manifest")
    for name, digest in sorted(manifest.files.items()):
        if _sha256(path / name) != digest:
            raise CheckpointError(f"{path}: checksum mismatch in {name}")
    return manifest

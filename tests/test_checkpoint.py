"""The checkpoint registry: atomic publish, immutability, checksums, ordering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf import checkpoint
from rlhf.checkpoint import CheckpointError


def _write_model(d: Path, payload: bytes = b"weights") -> None:
    (d / "model.safetensors").write_bytes(payload)
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "sub").mkdir()
    (d / "sub" / "extra.bin").write_bytes(b"\x00\x01")


def _publish(registry: Path, role: str = "policy", **kw: object) -> checkpoint.Manifest:
    with checkpoint.staging(registry) as tmp:
        _write_model(tmp)
        return checkpoint.publish(registry, role, tmp, round_type="sft", **kw)  # type: ignore[arg-type]


def test_publish_writes_manifest_and_verifies(tmp_path: Path) -> None:
    m = _publish(
        tmp_path,
        parent="policy-000000-00000000",
        metrics={"val_loss": 1.5},
        offsets={("rlhf.demonstrations", 1): 40, ("rlhf.demonstrations", 0): 12},
    )
    path = tmp_path / "policy" / m.version
    assert checkpoint.verify(path) == m
    assert checkpoint.read_manifest(path) == m
    assert m.role == "policy" and m.round_type == "sft" and m.metrics == {"val_loss": 1.5}
    assert m.parent == "policy-000000-00000000" and m.created_at_ms > 0
    assert m.offsets == {"rlhf.demonstrations:0": 12, "rlhf.demonstrations:1": 40}
    assert m.partition_offsets() == {("rlhf.demonstrations", 0): 12, ("rlhf.demonstrations", 1): 40}
    assert set(m.files) == {"model.safetensors", "config.json", "sub/extra.bin"}
    # `printf weights | sha256sum`
    assert m.files["model.safetensors"] == (
        "9a129038d9a00aed0cf6a7ea059ca50a813449061ab87848cf1a13eafdf33b2c"
    )
    # The staging directory was moved into place: nothing else is left in the registry.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]


def test_versions_are_sortable_per_role_and_latest_is_newest(tmp_path: Path) -> None:
    assert checkpoint.latest(tmp_path, "policy") is None
    assert checkpoint.list_versions(tmp_path, "policy") == []
    names = [_publish(tmp_path).version for _ in range(3)]
    reward = _publish(tmp_path, role="reward").version
    assert [n.split("-")[1] for n in names] == ["000001", "000002", "000003"]
    assert reward.startswith("reward-000001-")
    assert checkpoint.list_versions(tmp_path, "policy") == names
    assert checkpoint.latest(tmp_path, "policy") == tmp_path / "policy" / names[-1]


def test_a_corrupted_byte_fails_verify_naming_the_file(tmp_path: Path) -> None:
    m = _publish(tmp_path)
    path = tmp_path / "policy" / m.version
    data = bytearray((path / "model.safetensors").read_bytes())
    data[3] ^= 0x01
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"checksum mismatch in model\.safetensors"):
        checkpoint.verify(path)


def test_missing_or_extra_files_fail_verify(tmp_path: Path) -> None:
    m = _publish(tmp_path)
    path = tmp_path / "policy" / m.version
    (path / "stray.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"stray\.txt is not in the manifest"):
        checkpoint.verify(path)
    (path / "stray.txt").unlink()
    (path / "sub" / "extra.bin").unlink()
    with pytest.raises(CheckpointError, match=r"sub/extra\.bin is missing"):
        checkpoint.verify(path)
    with pytest.raises(CheckpointError, match=r"no manifest\.json"):
        checkpoint.verify(tmp_path / "policy")


def test_crash_before_rename_leaves_no_visible_version(tmp_path: Path) -> None:
    good = _publish(tmp_path).version
    # A writer that dies after staging its files but before the rename.
    crashed = tmp_path / f"{checkpoint.STAGING_PREFIX}deadbeef"
    crashed.mkdir()
    _write_model(crashed, b"half-written")
    assert checkpoint.list_versions(tmp_path, "policy") == [good]
    assert checkpoint.latest(tmp_path, "policy") == tmp_path / "policy" / good
    assert checkpoint.remove_stale_staging(tmp_path) == [crashed]
    assert not crashed.exists()


def test_a_version_is_never_overwritten(tmp_path: Path) -> None:
    m = _publish(tmp_path, version="policy-000007-0123abcd")
    before = checkpoint.verify(tmp_path / "policy" / m.version)
    with pytest.raises(CheckpointError, match="exists already"):
        _publish(tmp_path, version="policy-000007-0123abcd")
    assert checkpoint.verify(tmp_path / "policy" / m.version) == before
    # The failed publish cleaned up its staging directory.
    assert [p.name for p in tmp_path.iterdir()] == ["policy"]
    # The next automatic name continues after the explicit one.
    assert _publish(tmp_path).version.startswith("policy-000008-")


def test_publish_copies_a_directory_outside_the_registry(tmp_path: Path) -> None:
    src = tmp_path / "out"
    src.mkdir()
    _write_model(src)
    (src / checkpoint.MANIFEST).write_text("{}")  # a stale manifest is not carried over
    m = checkpoint.publish(tmp_path / "reg", "reward", src, round_type="rm")
    assert checkpoint.verify(tmp_path / "reg" / "reward" / m.version) == m
    assert (src / "model.safetensors").is_file()  # the source is left untouched


def test_bad_role_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="role"):
        _publish(tmp_path, role="../evil")


def test_a_published_model_loads_like_any_model_directory(tmp_path: Path) -> None:
    from rlhf import models

    with checkpoint.staging(tmp_path) as tmp:
        models.build_tiny(tmp, seed=0)
        m = checkpoint.publish(tmp_path, "policy", tmp, round_type="init")
    path = checkpoint.latest(tmp_path, "policy")
    assert path is not None and checkpoint.verify(path) == m
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(m.files)
    model, tok = models.load_policy(path)
    assert tok.eos_token_id == 258 and not model.training
    assert models.describe(path)["manifest"] == json.loads((path / "manifest.json").read_text())


def test_manifest_records_the_encoding_and_reads_old_manifests_without_it(tmp_path: Path) -> None:
    spec = {"chat_template": True, "max_prompt_tokens": 32, "max_response_tokens": 16,
            "truncation_side": "left", "append_eos": True}  # fmt: skip
    m = _publish(tmp_path, encoding=spec)
    path = tmp_path / "policy" / m.version
    assert checkpoint.verify(path).encoding == spec
    assert json.loads((path / checkpoint.MANIFEST).read_text())["encoding"] == spec
    # A manifest written before the field existed still reads, with no recorded encoding.
    old = json.loads((path / checkpoint.MANIFEST).read_text())
    del old["encoding"]
    assert checkpoint.Manifest.from_json(json.dumps(old)).encoding is None
    del old["files"]
    with pytest.raises(CheckpointError, match="lacks"):
        checkpoint.Manifest.from_json(json.dumps(old))

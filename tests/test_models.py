"""The model loader for both families: build, load, generate, reward model load/save, CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from rlhf import checkpoint, encoding, models

FAMILIES = ("byte", "bpe")


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request: pytest.FixtureRequest, family_models: Callable[[str], Path]) -> Path:
    return family_models(request.param)


def test_byte_tokenizer_round_trips_any_text_through_autotokenizer(
    family_models: Callable[[str], Path],
) -> None:
    tok = AutoTokenizer.from_pretrained(str(family_models("byte") / "policy"))
    text = "héllo wörld ✓ \n\t tabs"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    # Token id == byte value: the tokenizer is exactly UTF-8.
    assert ids[1:] == list(text.encode("utf-8"))
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    assert len(tok) == 259


@pytest.mark.parametrize("family", FAMILIES)
def test_build_is_deterministic_per_seed(tmp_path: Path, family: str) -> None:
    def weights(name: str, seed: int) -> dict[str, torch.Tensor]:
        out = models.build_tiny(tmp_path / name, seed=seed, tokenizer=family)
        return load_file(str(out / "model.safetensors"))

    a, b, c = weights("a", 3), weights("b", 3), weights("c", 4)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "c" / "tokenizer.json"
    ).read_bytes()


def test_bpe_family_is_a_qwen2_with_grouped_query_attention(
    family_models: Callable[[str], Path],
) -> None:
    model, tok = models.load_policy(family_models("bpe") / "policy")
    config = model.config
    assert config.model_type == "qwen2"
    assert config.num_key_value_heads < config.num_attention_heads
    assert config.head_dim >= 32
    assert config.vocab_size == len(tok) and len(tok) > 512
    assert not getattr(config, "use_sliding_window", False)
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    assert model.generation_config.eos_token_id == tok.eos_token_id


def test_load_policy_cpu_defaults_and_generates(tiny: Path) -> None:
    model, tok = models.load_policy(tiny / "policy")
    assert not model.training
    assert model.dtype == torch.float32
    spec = encoding.spec_for_model(tiny / "policy", tok)
    ids, mask = encoding.encode_prompts(tok, spec, ["hi", "a longer prompt"])
    assert mask[0, 0] == 0 and mask[0, -1] == 1  # left-padded for generation
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=True)  # type: ignore[operator]
    assert out.shape[0] == 2 and out.shape[1] <= ids.shape[1] + 5
    assert torch.equal(out[:, : ids.shape[1]], ids)


def test_save_policy_casts_a_copy_and_leaves_master_weights_alone(
    tiny: Path, tmp_path: Path
) -> None:
    model, tok = models.load_policy(tiny / "policy", dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    models.save_policy(model, tok, tmp_path / "bf16", torch.bfloat16)
    assert model.dtype == torch.float32
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    saved = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    again, tok2 = models.load_policy(tmp_path / "bf16")  # CPU default: fp32
    assert again.dtype == torch.float32 and tok2.chat_template == tok.chat_template


def test_reward_model_save_load_round_trip_and_last_token(tiny: Path, tmp_path: Path) -> None:
    rm, tok = models.load_reward_model(tiny / "reward")
    spec = encoding.spec_for_model(tiny / "reward", tok)
    assert rm.head.weight.abs().sum() == 0  # a fresh RM has no preference
    torch.manual_seed(0)
    with torch.no_grad():
        rm.head.weight.normal_()
        rm.bias.fill_(0.25)
    batch = encoding.encode_pairs(tok, spec, ["ab", "c"], ["xyz", "w"])
    rewards = rm(batch.input_ids, batch.attention_mask)
    assert rewards.shape == (2,) and rewards.dtype == torch.float32
    # Padding does not change a reward: row 1 alone equals row 1 in the padded batch.
    alone = encoding.encode_pairs(tok, spec, ["c"], ["w"])
    assert torch.allclose(rm(alone.input_ids, alone.attention_mask)[0], rewards[1], atol=1e-5)
    # normalised = raw + bias
    assert torch.allclose(rewards, rm.raw(batch.input_ids, batch.attention_mask) + 0.25)
    # The same head read at every position agrees at the last token.
    per_tok = rm.per_token(batch.input_ids, batch.attention_mask)
    last = int(alone.attention_mask.sum()) - 1
    assert torch.allclose(per_tok[1, last] + 0.25, rewards[1], atol=1e-6)

    rm.save(tmp_path / "rm", tok)
    meta = json.loads((tmp_path / "rm" / models.REWARD_META_FILE).read_text())
    assert meta["bias"] == 0.25
    again, tok2 = models.load_reward_model(tmp_path / "rm")
    assert torch.allclose(again(batch.input_ids, batch.attention_mask), rewards, atol=1e-6)
    scored = models.score(again, tok2, spec, ["ab", "c"], ["xyz", "w"])
    assert torch.allclose(scored, rewards, atol=1e-6)


def test_reward_model_from_policy_shares_the_trunk_weights(tiny: Path) -> None:
    policy, _ = models.load_policy(tiny / "policy")
    rm, _ = models.reward_model_from_policy(tiny / "policy")
    trunk, lm = rm.trunk.state_dict(), policy.state_dict()
    assert torch.equal(trunk["embed_tokens.weight"], lm["model.embed_tokens.weight"])
    assert float(rm.bias) == 0.0


def test_load_reward_model_rejects_a_policy_dir(tiny: Path) -> None:
    with pytest.raises(ValueError, match="not a reward model"):
        models.load_reward_model(tiny / "policy")


def test_cli_init_and_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert models.main(["init", "--out", str(tmp_path / "m"), "--seed", "1"]) == 0
    assert (tmp_path / "m" / "policy" / "tokenizer.json").is_file()
    assert models.is_reward_model_dir(tmp_path / "m" / "reward")
    capsys.readouterr()
    assert models.main(["info", str(tmp_path / "m" / "reward")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "reward_model" and info["hidden_size"] == 64
    assert info["parameters"] > 100_000
    assert info["encoding"]["chat_template"] is False and info["encoding_source"] == "default"
    assert models.main(["bogus"]) == 2
    with pytest.raises(SystemExit):
        models.main(["init", "--size", "huge"])
    with pytest.raises(SystemExit):
        models.main(["init", "--tokenizer", "sentencepiece"])


def test_cli_init_bpe_writes_the_chat_template_into_tokenizer_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert models.main(["init", "--out", str(tmp_path / "m"), "--tokenizer", "bpe"]) == 0
    for role in ("policy", "reward"):
        config = json.loads((tmp_path / "m" / role / "tokenizer_config.json").read_text())
        assert "<|im_start|>" in config["chat_template"]
    capsys.readouterr()
    assert models.main(["info", str(tmp_path / "m" / "policy")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "qwen2"
    assert info["tokenizer"]["chat_template"] is True
    assert info["tokenizer"]["eos"] == "<|im_end|>"
    assert info["encoding"]["chat_template"] is True


def test_cli_info_shows_the_encoding_recorded_in_a_checkpoint(
    family_models: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A published version is served with the encoding in its manifest; `rlhf model info`
    shows that one, not the default for its tokenizer."""
    spec = {"chat_template": True, "max_prompt_tokens": 40, "max_response_tokens": 24,
            "truncation_side": "right", "append_eos": True}  # fmt: skip
    source = family_models("bpe") / "policy"
    version = checkpoint.publish(
        tmp_path, "policy", source, round_type="sft", parent=None, metrics={}, offsets={},
        encoding=spec,
    ).version  # fmt: skip
    capsys.readouterr()
    assert models.main(["info", str(tmp_path / "policy" / version)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["encoding"] == spec and info["encoding_source"] == "manifest"
    assert info["manifest"]["encoding"] == spec and info["manifest"]["version"] == version
    assert models.main(["info", str(source)]) == 0  # the same model without a manifest
    default = json.loads(capsys.readouterr().out)
    assert default["encoding_source"] == "default"
    assert default["encoding"]["max_prompt_tokens"] == 1024


@pytest.mark.gpu
def test_cuda_loads_bf16_and_scores(tiny: Path) -> None:
    model, tok = models.load_policy(tiny / "policy", device="cuda")
    assert model.dtype == torch.bfloat16
    rm, _ = models.load_reward_model(tiny / "reward", device="cuda")
    assert rm.trunk.dtype == torch.bfloat16 and rm.head.weight.dtype == torch.float32
    rewards = models.score(rm, tok, encoding.spec_for_model(tiny / "reward", tok), ["a"], ["b"])
    assert rewards.dtype == torch.float32 and rewards.device.type == "cpu"

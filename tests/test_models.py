"""The model loader: tiny model build, tokenizer round trip, policy and reward model load/save."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from rlhf import models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("models")
    models.init_models(models.InitConfig(out=str(out)))
    return out


def test_byte_tokenizer_round_trips_any_text_through_autotokenizer(tiny: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny / "policy"))
    text = "héllo wörld ✓ \n\t tabs"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    # Token id == byte value: the tokenizer is exactly UTF-8.
    assert ids[1:] == list(text.encode("utf-8"))
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    assert len(tok) == 259


def test_build_tiny_is_deterministic_per_seed(tmp_path: Path) -> None:
    a = load_file(str(models.build_tiny(tmp_path / "a", seed=3) / "model.safetensors"))
    b = load_file(str(models.build_tiny(tmp_path / "b", seed=3) / "model.safetensors"))
    c = load_file(str(models.build_tiny(tmp_path / "c", seed=4) / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_load_policy_cpu_defaults_and_generates(tiny: Path) -> None:
    model, tok = models.load_policy(tiny / "policy")
    assert not model.training
    assert model.dtype == torch.float32
    ids, mask = models.encode_prompts(tok, ["hi", "a longer prompt"])
    assert mask[0, 0] == 0 and mask[0, -1] == 1  # left-padded for generation
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=True)  # type: ignore[operator]
    assert out.shape == (2, ids.shape[1] + 5)
    assert torch.equal(out[:, : ids.shape[1]], ids)


def test_encode_pairs_layout(tiny: Path) -> None:
    tok = models.load_tokenizer(tiny / "policy")
    batch = models.encode_pairs(tok, ["ab", "c"], ["xyz", "w"])
    # Row 0: BOS a b | x y z EOS; row 1: BOS c | w EOS, then right padding.
    assert batch.input_ids.tolist() == [
        [257, 97, 98, 120, 121, 122, 258],
        [257, 99, 119, 258, 256, 256, 256],
    ]
    assert batch.attention_mask.tolist() == [[1] * 7, [1, 1, 1, 1, 0, 0, 0]]
    assert batch.response_mask.tolist() == [[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0]]
    # Truncation keeps BOS and the end of a long prompt, and always closes the response with EOS.
    b = models.encode_pairs(tok, ["abcdef"], ["uvwxyz"], max_prompt_tokens=3, max_response_tokens=3)
    assert b.input_ids.tolist() == [[257, 101, 102, 117, 118, 258]]


def test_reward_model_save_load_round_trip_and_last_token(tiny: Path, tmp_path: Path) -> None:
    rm, tok = models.load_reward_model(tiny / "reward")
    assert rm.head.weight.abs().sum() == 0  # a fresh RM has no preference
    torch.manual_seed(0)
    with torch.no_grad():
        rm.head.weight.normal_()
        rm.bias.fill_(0.25)
    batch = models.encode_pairs(tok, ["ab", "c"], ["xyz", "w"])
    rewards = rm(batch.input_ids, batch.attention_mask)
    assert rewards.shape == (2,) and rewards.dtype == torch.float32
    # Padding does not change a reward: row 1 alone equals row 1 in the padded batch.
    alone = models.encode_pairs(tok, ["c"], ["w"])
    assert torch.allclose(rm(alone.input_ids, alone.attention_mask)[0], rewards[1], atol=1e-5)
    # normalised = raw + bias
    assert torch.allclose(rewards, rm.raw(batch.input_ids, batch.attention_mask) + 0.25)
    # The same head read at every position agrees at the last token.
    per_tok = rm.per_token(batch.input_ids, batch.attention_mask)
    assert torch.allclose(per_tok[1, 3] + 0.25, rewards[1], atol=1e-6)

    rm.save(tmp_path / "rm", tok)
    meta = json.loads((tmp_path / "rm" / models.REWARD_META_FILE).read_text())
    assert meta["bias"] == 0.25
    again, _ = models.load_reward_model(tmp_path / "rm")
    assert torch.allclose(again(batch.input_ids, batch.attention_mask), rewards, atol=1e-6)
    assert torch.allclose(models.score(again, tok, ["ab", "c"], ["xyz", "w"]), rewards, atol=1e-6)


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
    assert models.main(["bogus"]) == 2
    with pytest.raises(SystemExit):
        models.main(["init", "--size", "huge"])


@pytest.mark.gpu
def test_cuda_loads_bf16_and_scores(tiny: Path) -> None:
    model, tok = models.load_policy(tiny / "policy", device="cuda")
    assert model.dtype == torch.bfloat16
    rm, _ = models.load_reward_model(tiny / "reward", device="cuda")
    assert rm.trunk.dtype == torch.bfloat16 and rm.head.weight.dtype == torch.float32
    rewards = models.score(rm, tok, ["a"], ["b"])
    assert rewards.dtype == torch.float32 and rewards.device.type == "cpu"

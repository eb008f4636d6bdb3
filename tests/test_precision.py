"""Mixed precision as the trainer runs it: fp32 master weights and optimizer state, bf16
compute under autocast. At a paper learning rate (1e-5) an update survives on fp32 master
weights and is lost on bf16 weights; the EMA moves exactly as computed in fp32."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from rlhf import encoding, models
from trainer import registry as registry_lib
from trainer.ppo import ema_update, ppo_step, rollout, value_model_from_rm
from trainer.rm import encode_rankings, rm_step
from trainer.sft import sft_step

PROMPTS = ["say hi", "count: 1 2", "name a colour", "what is up"]
RESPONSES = ["hi!", "3 4 5", "blue", "not much"]
SPEC = encoding.EncodingSpec(max_prompt_tokens=32, max_response_tokens=32)


def _moved(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    """Fraction of weights that changed."""
    changed = sum(int((a != b).sum()) for a, b in zip(before, after, strict=True))
    return changed / sum(b.numel() for b in before)


def test_a_1e_5_update_survives_on_fp32_master_weights_under_bf16_autocast(
    family_models: Callable[[str], Path],
) -> None:
    policy, tok = registry_lib.load_policy(family_models("byte") / "policy", "cpu")
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    batch = encoding.encode_pairs(tok, SPEC, PROMPTS, RESPONSES)
    bf16 = copy.deepcopy(policy).to(torch.bfloat16)
    start = [p.detach().clone() for p in policy.parameters()]
    ema = copy.deepcopy(policy)

    # The compute really is bf16: a matmul under the autocast the step runs in.
    seen: list[torch.dtype] = []
    hook = policy.lm_head.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sft_step(policy, optimizer, batch)
        sft_step(bf16, torch.optim.AdamW(bf16.parameters(), lr=1e-5), batch)
    hook.remove()
    assert seen == [torch.bfloat16]

    # Adam's first step moves every weight with a gradient by about lr: on fp32 master
    # weights nearly all of them move; on bf16 weights (resolution 2^-8 relative, ~1e-4 at a
    # typical weight of 0.02) most updates round back to the old value (measured: 16 % of
    # the weights moved, the ones closest to 0).
    after = [p.detach() for p in policy.parameters()]
    assert _moved(start, after) > 0.95
    assert _moved([p.to(torch.bfloat16) for p in start], list(bf16.parameters())) < 0.25
    moments = [optimizer.state[p]["exp_avg_sq"] for p in policy.parameters()]
    assert {m.dtype for m in moments} == {torch.float32}
    delta = torch.cat([(a - b).flatten() for a, b in zip(after, start, strict=True)])
    assert float(delta.abs().max()) < 2e-5 and float(delta.abs().median()) > 5e-6

    # EMA 0.992: moves 0.8 % of the way, ~1e-7 per weight, exactly as fp32 arithmetic says.
    ema_update(ema, policy, decay=0.992)
    for e, s, p in zip(ema.parameters(), start, policy.parameters(), strict=True):
        assert e.dtype == torch.float32
        assert torch.equal(e, s.lerp(p, 0.008))
    assert _moved(start, [e.detach() for e in ema.parameters()]) > 0.9
    # The same EMA on bf16 weights would not move at all.
    lost = [
        s.bfloat16().lerp(p.detach().bfloat16(), 0.008) for s, p in zip(start, after, strict=True)
    ]
    assert _moved([s.bfloat16() for s in start], lost) < 0.01


def test_the_trainer_publishes_the_configured_dtype() -> None:
    assert registry_lib.publish_dtype("auto", "cpu") == torch.float32
    assert registry_lib.publish_dtype("auto", "cuda") == torch.bfloat16
    assert registry_lib.publish_dtype("float32", "cuda") == torch.float32
    assert registry_lib.publish_dtype("bfloat16", "cpu") == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["byte", "bpe"])
def test_steps_on_cuda_keep_fp32_master_weights_and_compute_in_bf16(
    family_models: Callable[[str], Path], family: str
) -> None:
    """The trainer's own loading (no dtype forced here): fp32 weights, bf16 compute, and a
    lr-1e-5 step that moves the weights."""
    base = family_models(family)
    policy, tok = registry_lib.load_policy(base / "policy", "cuda")
    ref, _ = registry_lib.load_policy(base / "policy", "cuda")
    rm, _ = models.load_reward_model(base / "reward", "cuda", registry_lib.MASTER)
    spec = encoding.EncodingSpec.for_tokenizer(tok, max_prompt_tokens=32, max_response_tokens=32)
    assert {p.dtype for p in [*policy.parameters(), *rm.parameters()]} == {torch.float32}
    value = value_model_from_rm(rm)
    batch = encode_rankings(tok, spec, PROMPTS[:2], [["ok!!", "ok"], ["a", "b!"]], [[1, 2], [2, 1]])
    assert rm_step(rm, torch.optim.AdamW(rm.parameters(), lr=1e-5), batch).pairs == 2
    seen: list[torch.dtype] = []
    hook = policy.lm_head.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    start = [p.detach().clone() for p in policy.parameters()]
    sft = sft_step(
        policy,
        torch.optim.AdamW(policy.parameters(), lr=1e-5),
        encoding.encode_pairs(tok, spec, PROMPTS, RESPONSES),
    )
    hook.remove()
    assert sft.loss > 0 and seen == [torch.bfloat16]
    assert _moved(start, [p.detach() for p in policy.parameters()]) > 0.95
    ro = rollout(policy, ref, value, rm, tok, spec, PROMPTS, beta=0.02, max_new_tokens=8)
    stats = ppo_step(
        policy,
        value,
        torch.optim.AdamW([*policy.parameters(), *value.parameters()], lr=1e-5),
        ro,
        ptx=encoding.encode_texts(tok, ["pretraining text"], 16),
        gamma_ptx=1.0,
    )
    assert torch.isfinite(torch.tensor(stats.policy_loss)) and stats.ptx_loss > 0

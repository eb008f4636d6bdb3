"""Memory levers that change how a step is computed, not what it computes.

Activation checkpointing (``memory.activation_checkpointing``, ``trainer.round``'s
``checkpoint_layers``) keeps far fewer tensors for the backward pass (each decoder layer is
recomputed there), yet the loss and every gradient equal those of the plain model (fp32 on
CPU), and the parameter names, so the published checkpoint, are unchanged. (Gradient
accumulation is checked end to end in ``test_trainer_distributed.py``: two ranks with two
micro-batches each publish what one process does.)"""

from __future__ import annotations

import torch

from rlhf import models
from trainer.round import checkpoint_layers


def test_activation_checkpointing_saves_memory_not_accuracy(tmp_path):
    models.init_models(models.InitConfig(out=str(tmp_path)))
    plain, _ = models.load_policy(tmp_path / "policy", "cpu", torch.float32)
    ckpt, _ = models.load_policy(tmp_path / "policy", "cpu", torch.float32)
    checkpoint_layers(ckpt)
    assert ckpt.state_dict().keys() == plain.state_dict().keys()

    ids = torch.randint(3, 100, (3, 64), generator=torch.Generator().manual_seed(0))
    losses, kept = [], []
    for model in (plain, ckpt):
        model.train()
        saved = [0]  # bytes the forward pass keeps for the backward pass

        def pack(t: torch.Tensor, saved: list[int] = saved) -> torch.Tensor:
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        out.loss.backward()
        losses.append(out.loss.detach())
        kept.append(saved[0])
    assert kept[1] < kept[0] / 3, kept
    assert torch.equal(losses[0], losses[1])
    grads = dict(ckpt.named_parameters())
    for name, p in plain.named_parameters():
        assert p.grad is not None and grads[name].grad is not None, name
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-5, atol=1e-7)

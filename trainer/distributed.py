"""One trainer over many processes: ``torch.distributed`` with FSDP2, launched by ``torchrun``.

    torchrun --nproc-per-node N [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT] \\
        -m rlhf train [options]

Every process runs the same round functions on the same data; only rank 0 talks to Kafka,
publishes and commits (``trainer.rounds``). What each part of a round does across ranks:

* **data**: rank 0 snapshots the buffers into a ``RoundOrder`` and broadcasts it; every rank
  trains on exactly those records, with the same seeded random streams.
* **models**: the trainable ones (policy, value network) are sharded with FSDP2
  (``fully_shard`` per decoder layer, then the whole model): parameters, gradients and AdamW
  state are split across ranks. The frozen ones (reference, RM, the EMA copy) are sharded too
  (``distributed.shard_frozen``), their shards kept in host memory with
  ``distributed.offload_frozen`` (FSDP2's ``CPUOffloadPolicy``; CUDA only). On CUDA the
  sharded models gather bf16 parameters and reduce gradients in fp32
  (``MixedPrecisionPolicy``); the fp32 master weights stay sharded.
* **steps**: data parallel. Each global batch is split into rank slices (``rows``), each
  slice into ``memory.grad_accumulation`` micro-batches, and every micro-batch's loss is
  weighted by its share of the global batch (``weight``), so the gradient FSDP2 averages is
  the gradient of the one-process loss on the whole batch. A rank without rows still runs a
  zero-weight pass on one row (every rank must take part in each collective).
* **rollouts**: each rank samples its slice of the episodes; the random numbers of every
  decode step are drawn for the whole batch on every rank (``trainer.ppo.BatchSlice``), and
  the loop ends when every rank is done, so a response does not depend on the world size.
  The scored slices are then gathered: advantages are whitened over the whole batch.
* **evaluation** runs the whole held-out set on every rank (the gates see identical numbers).
* **publishing**: the full state dict is gathered to rank 0's host memory
  (``get_model_state_dict`` with ``full_state_dict`` and ``cpu_offload``) and written in the
  same immutable format as a one-process run.

One process (plain ``rlhf train``) is world size 1: nothing is sharded and every helper here
is the identity, unless ``distributed.fsdp`` is ``on`` (FSDP2 on one GPU, to measure it).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

from rlhf.config import option

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class DistributedConfig:
    """How a trainer launched by torchrun splits its models and work (ignored by one process
    unless ``fsdp`` is on)."""

    fsdp: str = option(
        "auto",
        "shard models with FSDP2: auto (when torchrun starts more than one process), on, off",
    )
    shard_frozen: bool = option(
        True,
        "shard the frozen models (reference, reward model, EMA) too; false keeps a full copy "
        "of each on every rank (no gathers in rollouts, more memory)",
    )
    offload_frozen: bool = option(
        False, "keep the frozen models' shards in host memory (FSDP2 CPU offload; CUDA only)"
    )
    backend: str = option("auto", "process group backend: auto (nccl on cuda, gloo on cpu)")
    timeout_s: float = option(
        1800.0, "a collective that waits longer fails and takes the job down (torchrun restarts it)"
    )
    heartbeat_s: float = option(
        30.0, "rank 0 tells the other ranks it is alive at least this often between rounds"
    )

    def __post_init__(self) -> None:
        if self.fsdp not in ("auto", "on", "off"):
            raise ValueError(f"distributed.fsdp must be auto, on or off, got {self.fsdp!r}")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(
                f"distributed.backend must be auto, nccl or gloo, got {self.backend!r}"
            )
        if self.timeout_s <= 0 or not 0 < self.heartbeat_s < self.timeout_s:
            raise ValueError("distributed.heartbeat_s must be > 0 and below distributed.timeout_s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _attempt_store(world: int, timeout: datetime.timedelta) -> dist.Store | None:
    """The store the process group meets in, fresh for each attempt of a torchrun job.

    torchrun's agent hosts one TCP store for the whole job (``TORCHELASTIC_USE_AGENT_STORE``)
    and restarts the worker group in it after a failure; the keys the killed attempt left
    there (each rank's gloo or NCCL address) would pair the new ranks with dead ones. So the
    keys of each attempt get their own prefix, the restart count, which every worker of one
    agent shares. Agents on several nodes may count restarts differently (a replaced node
    starts at 0): there, ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in torchrun's environment
    makes rank 0 host a new store per attempt instead (the Helm chart sets it), and this
    returns None (``env://``)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    agent = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
        timeout=timeout,
    )  # fmt: skip
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"rlhf/attempt-{attempt}/", agent)


def launched_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class Dist:
    """This process's place in the job, and the collectives the rounds use."""

    def __init__(
        self, cfg: DistributedConfig, *, rank: int = 0, world: int = 1, device: str = "cpu"
    ) -> None:
        self.cfg = cfg
        self.rank = rank
        self.world = world
        self.device = device
        self.sharded = world > 1 if cfg.fsdp == "auto" else cfg.fsdp == "on"
        if world > 1 and cfg.fsdp == "off":
            raise ValueError("distributed.fsdp=off needs one process (torchrun started several)")

    @classmethod
    def start(cls, cfg: DistributedConfig, device: str) -> Dist:
        """Joins the process group torchrun set up (``device`` is ``cpu`` or ``cuda``; on CUDA
        each process takes GPU ``LOCAL_RANK``). Without torchrun: world size 1."""
        world = launched_world_size()
        if device == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        if world == 1 and cfg.fsdp != "on":
            return cls(cfg, device=device)
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if "cuda" in device else "gloo")
        if not dist.is_initialized():
            # One process with fsdp=on and no torchrun: a group of one on a free local port.
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.setdefault("RANK", "0")
            timeout = datetime.timedelta(seconds=cfg.timeout_s)
            dist.init_process_group(
                backend,
                timeout=timeout,
                world_size=world,
                rank=int(os.environ["RANK"]),
                store=_attempt_store(world, timeout),
            )
        out = cls(cfg, rank=dist.get_rank(), world=dist.get_world_size(), device=device)
        log.info("rank %d of %d on %s (%s)", out.rank, out.world, device, backend)
        return out

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return dist.is_initialized()

    def close(self) -> None:
        if self.active:
            dist.destroy_process_group()

    # ------------------------------------------------------------------ collectives

    def broadcast(self, obj: T | None) -> T:
        """Rank 0's ``obj`` on every rank (pickled; rank 0 passes it, the others None)."""
        if self.world == 1:
            return obj  # type: ignore[return-value]
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._comm_device)
        return box[0]  # type: ignore[return-value]

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def all_done(self, done: bool) -> bool:
        """True when ``done`` is true on every rank (a loop of collectives ends together)."""
        if self.world == 1:
            return done
        flag = torch.tensor([1.0 if done else 0.0], device=self._comm_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over ranks."""
        if self.world == 1 or not values:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return t.tolist()

    @property
    def _comm_device(self) -> torch.device:
        return torch.device(self.device if "cuda" in self.device else "cpu")

    # ------------------------------------------------------------------ batches

    def rows(self, n: int) -> range:
        """This rank's contiguous share of ``n`` rows (sizes differ by at most one)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (1 if self.rank < extra else 0))

    def micro_batches(self, n: int, accumulation: int) -> list[range]:
        """This rank's rows of an ``n``-row global batch in ``accumulation`` micro-batches.

        Every rank gets the same number of ranges (some may be empty), so each takes part in
        the same number of forward/backward passes."""
        mine = self.rows(n)
        size = max(1, -(-len(mine) // accumulation))
        parts = [mine[i : i + size] for i in range(0, len(mine), size)]
        return (parts + [range(0)] * accumulation)[:accumulation]

    @property
    def grad_scale(self) -> float:
        """FSDP2 averages gradients over ranks; a rank's loss weights are scaled by this so
        the average is the sum of the weighted micro-batch losses."""
        return float(self.world) if self.sharded else 1.0

    # ------------------------------------------------------------------ models

    def shard(self, model: nn.Module, *, trainable: bool) -> nn.Module:
        """FSDP2 over ``model`` in place: each decoder layer, then the whole model (a reward
        model: its trunk, and its fp32 head on its own). Unsharded: moved to the device."""
        if not self.sharded or (not trainable and not self.cfg.shard_frozen):
            return model.to(self.device)
        cuda = "cuda" in self.device
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kwargs: dict[str, Any] = {"mp_policy": mp} if cuda else {}
        if not trainable and self.cfg.offload_frozen and cuda:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        if not trainable and not cuda and self.cfg.offload_frozen:
            log.info("distributed.offload_frozen has no effect on cpu")
        layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
        for layer in layers:
            fully_shard(layer, **kwargs)
        trunk = getattr(model, "trunk", None)
        if isinstance(trunk, nn.Module):
            # A reward model: its trunk and head are called on their own (per_token, raw),
            # so each is a root of its own; the head computes in fp32 (rlhf.models).
            fully_shard(trunk, **kwargs)
            head: nn.Module = getattr(model, "head")  # noqa: B009 - typed as a Module
            fully_shard(head, **{k: v for k, v in kwargs.items() if k != "mp_policy"})
            for name, buffer in model.named_buffers(recurse=False):
                setattr(model, name, buffer.to(self.device))
        else:
            fully_shard(model, **kwargs)
        if not trainable:
            model.requires_grad_(False)
        return model

    def reshard(self, *models: nn.Module) -> None:
        """Frees parameters a forward pass left gathered. FSDP2 keeps the root's gathered
        after a forward (expecting the backward pass); after one without gradients (an
        evaluation, a rollout) ``parameters()`` would then name the gathered copies (an
        optimizer built then would update nothing) and the next training pass would not
        reduce the root's gradients. So evaluations end, and steps start, with this (a
        no-op on sharded parameters; objects that are no modules are skipped)."""
        if not self.sharded:
            return
        for model in models:
            if not isinstance(model, nn.Module):
                continue
            for module in model.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    def full_state_dict(self, model: nn.Module) -> dict[str, Tensor] | None:
        """The whole model's state dict in host memory on rank 0 (None elsewhere). Every rank
        must call it (a collective when sharded)."""
        # A parameter shared by two modules (tied embeddings) is written once, under its
        # first name, as save_pretrained does for a whole model.
        seen: set[int] = set()
        tied = set()
        for name, param in model.named_parameters(remove_duplicate=False):
            if id(param) in seen:
                tied.add(name)
            seen.add(id(param))
        if not self.sharded:
            return {k: v.detach() for k, v in model.state_dict().items() if k not in tied}
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
        if not self.is_main:
            return None
        return {k: v for k, v in state.items() if k not in tied and isinstance(v, Tensor)}

    def optimizer_state(self, models: nn.Module, opt: torch.optim.Optimizer) -> Any:
        """The optimizer's full state (parameters named, not numbered) on rank 0, None
        elsewhere: one file that any world size can load (``load_optimizer_state``)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(models, opt, options=options)
        return state if self.is_main else None

    def load_optimizer_state(
        self, models: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        # Keys a scheduler added to the saved groups (initial_lr) that the new optimizer's
        # groups do not have yet would not map; the caller sets the learning rates anyway.
        keys = set(opt.param_groups[0]) | {"params"}
        groups = [{k: v for k, v in g.items() if k in keys} for g in state["param_groups"]]
        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(models, opt, {**state, "param_groups": groups}, options=options)


def local_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes this rank holds of ``tensors`` (a shard's local part for DTensors)."""
    total = 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def to_float(value: Tensor | float) -> float:
    """A scalar that may be a DTensor (a sharded model's grad norm) as a float."""
    if isinstance(value, DTensor):
        value = value.full_tensor()
    return float(value)


def clip_and_step(opt: torch.optim.Optimizer, max_grad_norm: float | None) -> float:
    """Clips the accumulated gradients (global norm, over every rank's shards), takes one
    optimizer step and clears the gradients. Returns the norm before clipping."""
    params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
    norm = (
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        if max_grad_norm and params
        else torch.tensor(0.0)
    )
    opt.step()
    opt.zero_grad(set_to_none=True)
    return to_float(norm)

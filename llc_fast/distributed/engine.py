"""The FSDP engine: one chain's loss and gradient on a shard group of an FSDP2-sharded model.

Every rank of the shard group reads the chain's batch from the same stream and takes its part
(``mesh.batch_part``); FSDP averages the gradient over the shard group, and the loss is averaged over
the shard group by an all-reduce, so every rank records the same loss. Gradients stay in FSDP's local
shards, where ``ShardedChainState.segments`` finds them.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from ..chains.engines import check_differentiable, checked_loss
from ..state.sharded import ShardedChainState
from .mesh import ChainMesh, batch_part


class FSDPEngine:
    name = "fsdp"
    batched = False

    def __init__(self, model: torch.nn.Module, state: ShardedChainState, loss_fn: Callable, mesh: ChainMesh,
                 batch_split: str):
        self.model, self.state, self.loss_fn, self.mesh, self.batch_split = model, state, loss_fn, mesh, batch_split

    def _part(self, batch):
        return batch_part(batch, self.mesh.shard_rank, self.mesh.shard_group_size, self.batch_split)

    def _group_mean(self, loss: torch.Tensor) -> torch.Tensor:
        """[1] float64 mean of the shard group's losses (every rank gets it)."""
        value = loss.detach().to(torch.float64).reshape(1)
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self.mesh.shard_group)
        return value / self.mesh.shard_group_size

    def agree(self, flag: bool) -> bool:
        """True on every rank of the shard group if it is True on any (e.g. a stop request)."""
        value = torch.tensor([float(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.mesh.shard_group)
        return bool(value.item())

    def loss_at_w_star(self, batch) -> float:
        with torch.no_grad():
            loss = checked_loss(self.loss_fn(self.model, self._part(batch)), "at w*")
            return float(self._group_mean(loss)[0])

    def loss_and_grad(self, num_rows: int, batches: list) -> tuple[torch.Tensor, None]:
        """The shard-group mean loss [1] of the chain's batch; the gradients are left in FSDP's local shards."""
        self.state.zero_grad()
        loss = checked_loss(self.loss_fn(self.model, self._part(batches[0])), "while sampling")
        check_differentiable(loss, "while sampling")
        loss.backward()
        return self._group_mean(loss), None

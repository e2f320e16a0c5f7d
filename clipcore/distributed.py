"""Several processes (one per GPU, or CPU shares) for the train and embed stages, through
torch.distributed: torchrun starts them, each joins the process group, works on its share of the
images and the batch, and the shares are gathered.

- Launch: a stage asked for `train.processes` > 1 re-runs itself under torchrun (torch's elastic
  launcher, `torch.distributed.run`), one process per device of this node. Several nodes: the
  rendezvous comes from torchrun's own `PET_*` environment variables (README, Scaling out).
- Each process reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK: LOCAL_RANK picks the GPU on its
  node, RANK 0 alone writes files. NCCL on CUDA, gloo on CPU.
- Training: every process draws the same global batches (the same seeded generator) and takes a
  contiguous share of each; embeddings are gathered with gradients and each process computes
  its share of the batch's loss, so the summed gradients equal one process's on that batch
  (open_clip's --local-loss --gather-with-grad).

With one process none of this runs: `World` helpers hand their input back untouched, so the
single-process path is the plain one, number for number.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as collectives
from torch.utils.data import Sampler

from clipcore.errors import ClipcoreError
from clipcore.features import resolve_device

T = TypeVar("T")


def relaunch(processes: int, module: str) -> bool:
    """Run `python -m module` as `processes` processes under torchrun and return True once they
    all finished; False when this process should do the work itself (one process asked for, or
    already started by torchrun or another launcher that sets WORLD_SIZE)."""
    if processes == 1 or "WORLD_SIZE" in os.environ:
        return False
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # One node (no multi-node variables set): --standalone, a private rendezvous on a free port,
    # so that two runs side by side (dvc queue -j 2) don't meet.
    one_node = not any(key in os.environ for key in ("PET_NNODES", "PET_RDZV_ENDPOINT"))
    args = [f"--nproc-per-node={processes}", *(["--standalone"] if one_node else []),
            "--local-ranks-filter=0",  # the console shows local rank 0: one progress bar
            "-m", module]
    # torchrun would give each process one CPU thread; share the cores out instead.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (cores or 1) // processes)))
    try:
        torchrun.run(torchrun.parse_args(args))
    except ChildFailedError as exc:
        raise ClipcoreError(f"{module}: {len(exc.failures)} of {processes} processes failed "
                            f"(the first error is above)") from None
    return True


@dataclass(frozen=True)
class World:
    """This process's place among a run's processes (one process: rank 0 of 1) and its device."""
    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes model files, checkpoints and metrics."""
        return self.rank == 0

    def shard_sizes(self, total: int) -> list[int]:
        """How many of `total` items each process takes: contiguous shares, sizes differing by
        at most one."""
        return [len(part) for part in np.array_split(np.arange(total), self.size)]

    def shard(self, items: Sequence[T]) -> Sequence[T]:
        """This process's contiguous share of `items`."""
        if self.size == 1:
            return items
        sizes = self.shard_sizes(len(items))
        start = sum(sizes[:self.rank])
        return items[start:start + sizes[self.rank]]

    def gather_shards(self, local: torch.Tensor, total: int) -> torch.Tensor:
        """All processes' `shard` results (rows for their items), in item order."""
        return self.gather(local, self.shard_sizes(total))

    def gather(self, local: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Every process's rows (process p holds sizes[p]) concatenated in rank order, on every
        process. Gradients flow back to the process that computed each row: the backward of this
        all-gather sums the gradients of every process's loss for the rows (a reduce-scatter)."""
        if self.size == 1:
            return local
        most = max(sizes)  # all-gather needs one shape: pad, gather, cut the padding out
        padded = torch.cat([local, local.new_zeros(most - len(local), *local.shape[1:])])
        gathered = collectives.all_gather_single_autograd(padded.contiguous(), 0, dist.group.WORLD)
        return torch.cat([gathered[p * most:p * most + n] for p, n in enumerate(sizes)])

    def gather_batch(self, embeddings: torch.Tensor, labels: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, slice | None]:
        """The whole batch's embeddings (with gradients) and labels from each process's share,
        and this process's rows in it (None with one process: all of them). Same-class
        positives need the whole batch's labels."""
        if self.size == 1:
            return embeddings, labels, None
        sizes = self.gather(labels.new_tensor([len(labels)]), [1] * self.size).tolist()
        start = sum(sizes[:self.rank])
        return (self.gather(embeddings, sizes), self.gather(labels, sizes),
                slice(start, start + sizes[self.rank]))

    def sum_gradients(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        """Sum each parameter's gradient over the processes, in one all-reduce. Each process's
        loss is its share of the batch loss, so the sum is the batch's gradient. (DDP's wrapper
        would average, and the temperature and text targets live outside the model's forward.)"""
        if self.size == 1:
            return
        for p in parameters:  # a process whose share was empty still joins the all-reduce
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in parameters]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for grad, summed in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(summed.view_as(grad))

    def sum(self, value: torch.Tensor) -> float:
        """A scalar summed over the processes (the batch loss from each process's share)."""
        if self.size == 1:
            return value.item()
        total = value.detach().clone()
        dist.all_reduce(total)
        return total.item()

    def seed_epoch(self, seed: int, epoch: int) -> None:
        """Several processes: torch's global RNG (dropout, augmentation) seeded from (seed,
        epoch, rank) at each epoch's start, so processes draw different masks and a resumed run
        draws what the uninterrupted one drew. Batch order comes from the run's generator,
        the same on every process."""
        if self.size > 1:
            torch.manual_seed(int(np.random.SeedSequence([seed, epoch, self.rank])
                                  .generate_state(1)[0]))

    def shard_batches(self, batches: Sampler[list[int]]) -> Sampler[list[int]]:
        """Each global batch of a batch sampler cut to this process's share."""
        return batches if self.size == 1 else _ShardedBatches(batches, self)


class _ShardedBatches(Sampler[list[int]]):
    def __init__(self, batches: Sampler[list[int]], world: World):
        self.batches, self.world = batches, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield list(self.world.shard(batch))


def join(device: str) -> World:
    """This process's World: with torchrun's WORLD_SIZE > 1, joins its process group (once) on
    the GPU numbered LOCAL_RANK on this node (NCCL) or on the CPU (gloo); otherwise the plain
    single process on train.device."""
    base = resolve_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return World(device=base)
    if base.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise ClipcoreError(f"train.processes: local rank {local_rank} has no GPU of its "
                                f"own, torch sees {torch.cuda.device_count()} on this node")
        base = torch.device("cuda", local_rank)
        torch.cuda.set_device(base)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if base.type == "cuda" else "gloo",
                                device_id=base if base.type == "cuda" else None)
        atexit.register(dist.destroy_process_group)
    return World(dist.get_rank(), dist.get_world_size(), base)

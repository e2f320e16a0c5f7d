"""Several processes (one per GPU, or CPU shares) for the train and embed stages, through
torch.distributed: torchrun starts them, each joins the process group, works on its share of the
images and the batch, and the shares are gathered.

- Launch: a stage asked for `train.processes` > 1 (or set up to join other nodes) re-runs itself
  under torchrun (torch's elastic launcher, `torch.distributed.run`), one process per device of
  this node. Several nodes: the rendezvous comes from torchrun's own `PET_*` environment
  variables (docs, Scaling out). What can be checked before the relaunch is checked first
  (train.device cuda without CUDA, more processes than GPUs): one line, not one per process.
- Each process reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK: LOCAL_RANK picks the GPU on its
  node, RANK 0 alone writes files and prints the device. NCCL on CUDA, gloo on CPU.
- Training: every process draws the same global batches (the same seeded generator) and takes a
  contiguous share of each; embeddings are gathered with gradients and each process computes
  its share of the batch's loss (open_clip's --local-loss --gather-with-grad). torch's
  DistributedDataParallel holds the parts training changes and reduces their gradients in
  buckets while backward runs; it averages over the processes, so each process's share is
  scaled by their count (`World.backward`) and the gradients equal one process's on the batch.
- Errors: each process leaves its one-line error in the relaunch's error folder (clipcore.stage);
  the launcher prints every process's line, the first failure's last, and the console shows
  local rank 0's output only (one set of progress bars).

With one process none of this runs: `World` helpers hand their input back untouched, so the
single-process path is the plain one, number for number.
"""
from __future__ import annotations

import atexit
import os
import sys
import inspect
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import _functional_collectives as collectives
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

from clipcore.errors import ClipcoreError
from clipcore.model.features import cpu_cores, device_note, resolve_device
from clipcore.params import TrainParams
from clipcore.stage import ERROR_FOLDER

T = TypeVar("T")

# torch < 2.13 (the GPU machine's 2.11) names these differently: feature-detect, never pin newer.
_GATHER_WITH_GRADIENTS = getattr(collectives, "all_gather_single_autograd", None) \
    or collectives.all_gather_tensor_autograd


def buffers_never_synced(ddp_init: Callable = DistributedDataParallel.__init__) -> dict:
    """DDP's keyword that turns off re-broadcasting buffers each forward, as this torch spells it
    (`forward_sync_buffers` from 2.13, `broadcast_buffers` before)."""
    keyword = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp_init)
               .parameters else "broadcast_buffers")
    return {keyword: False}


def relaunch(train: TrainParams, module: str) -> bool:
    """Run `python -m module` as train.processes processes (per node) under torchrun and return
    True once they all finished; False when this process should do the work itself (one process
    on one node, or already started by torchrun or another launcher that sets WORLD_SIZE)."""
    # Several nodes: torchrun's rendezvous variables are set (docs, Scaling out).
    one_node = not any(key in os.environ for key in ("PET_NNODES", "PET_RDZV_ENDPOINT"))
    if "WORLD_SIZE" in os.environ or (train.processes == 1 and one_node):
        return False
    _check_devices(train)
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # One node: --standalone, a private rendezvous on a free port, so that two runs side by
    # side (dvc queue -j 2) don't meet.
    args = [f"--nproc-per-node={train.processes}", *(["--standalone"] if one_node else []),
            "--local-ranks-filter=0",  # the console shows local rank 0: one progress bar
            "-m", module]
    # torchrun would give each process one CPU thread; share the cores out instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cpu_cores() // train.processes)))
    with tempfile.TemporaryDirectory(prefix="clipcore_errors_") as errors:
        os.environ[ERROR_FOLDER] = errors
        try:
            torchrun.run(torchrun.parse_args(args))
        except ChildFailedError as exc:
            raise ClipcoreError(_failures(module, len(exc.failures), train.processes,
                                          Path(errors))) from None
        finally:
            del os.environ[ERROR_FOLDER]
    return True


def _check_devices(train: TrainParams) -> None:
    """What would fail in every process alike, as one line before any process starts."""
    device = resolve_device(train.device)
    if device.type == "cuda" and train.processes > torch.cuda.device_count():
        raise ClipcoreError(f"train.processes is {train.processes} but torch sees "
                            f"{torch.cuda.device_count()} GPUs on this node (one process per "
                            f"GPU); lower train.processes or set train.device cpu")


def _failures(module: str, failed: int, processes: int, folder: Path) -> str:
    """Every failed process's error line on stderr, the first failure's last (as the message
    returned): the others' errors (a closed connection, mostly) follow from it."""
    lines: dict[str, list[str]] = {}  # line -> ranks that left it, the latest failure first
    for path in sorted(folder.glob("rank_*"), key=lambda p: p.stat().st_mtime_ns, reverse=True):
        lines.setdefault(path.read_text().strip(), []).append(path.name.split("_", 1)[1])
    summary = f"{module}: {failed} of {processes} processes failed"
    if not lines:
        return f"{summary} (the first error is above)"
    *later, (first, ranks) = lines.items()
    for line, others in later:
        print(f"error: rank {_listed(others)}: {line}", file=sys.stderr)
    return f"{summary}; the first, rank {_listed(ranks)}: {first}"


def _listed(ranks: list[str]) -> str:
    return ", ".join(sorted(ranks, key=int))


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
        gathered = _GATHER_WITH_GRADIENTS(padded.contiguous(), 0, dist.group.WORLD)
        return torch.cat([gathered[p * most:p * most + n] for p, n in enumerate(sizes)])

    def gather_batch(self, embeddings: torch.Tensor, labels: torch.Tensor, batch_size: int
                     ) -> tuple[torch.Tensor, torch.Tensor, slice | None]:
        """The whole batch's embeddings (with gradients) and labels from each process's share,
        and this process's rows in it (None with one process: all of them). Same-class
        positives need the whole batch's labels. `batch_size`: the whole batch's, known to
        every process from the batch plan, so the shares' sizes need no collective."""
        if self.size == 1:
            return embeddings, labels, None
        sizes = self.shard_sizes(batch_size)
        start = sum(sizes[:self.rank])
        return (self.gather(embeddings, sizes), self.gather(labels, sizes),
                slice(start, start + sizes[self.rank]))

    def trained(self, model: nn.Module, loss: nn.Module,
                frozen: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        """The training forward: images (or, frozen, their stored backbone features) to
        embeddings. Several processes: through DistributedDataParallel over the parts training
        changes (head, the loss's parameters: the CLIP loss's temperature and text targets or a
        classifier loss's class weights, the visual tower when it trains; never a frozen
        backbone, which DDP would broadcast for nothing). Keep the returned module while
        training: its gradient hooks go with it."""
        embed = model.embed_features if frozen else model
        if self.size == 1:
            return embed
        parts = _TrainedParts(model, loss, embed, frozen)
        return DistributedDataParallel(
            parts, device_ids=[self.device] if self.device.type == "cuda" else None,
            **buffers_never_synced())  # the buffers (feature statistics) never change

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of this process's share of the batch loss. DDP averages them over the
        processes (FACTS #616): scaled by the process count, the average is the sum of the
        shares, the gradient one process computes on the whole batch."""
        (loss if self.size == 1 else loss * self.size).backward()

    def sum(self, value: torch.Tensor) -> float:
        """A scalar summed over the processes (the batch loss from each process's share)."""
        if self.size == 1:
            return value.item()
        total = value.detach().clone()
        dist.all_reduce(total)
        return total.item()

    def seed_epoch(self, seed: int, epoch: int) -> None:
        """Several processes: torch's global RNG (dropout) seeded from (seed,
        epoch, rank) at each epoch's start, so processes draw different masks and a resumed run
        draws what the uninterrupted one drew. Batch order comes from the run's generator and
        each image's augmentation from its own seed (clipcore.train.sampling), the same on every
        process."""
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
            if len(batch) < self.world.size:  # train.batch_size >= processes: all images < that
                raise ClipcoreError(
                    f"train.processes: {self.world.size} processes need at least as many training "
                    f"images, the training set has {len(batch)}; lower train.processes")
            yield list(self.world.shard(batch))


class _TrainedParts(nn.Module):
    """What DDP wraps: the trained tensors as one module, whose forward is the model's (`embed`,
    kept as a plain attribute so that DDP doesn't take in the whole model)."""

    def __init__(self, model: nn.Module, loss: nn.Module,
                 embed: Callable[[torch.Tensor], torch.Tensor], frozen: bool):
        super().__init__()
        # The temperature trains only under the CLIP loss, among whose parameters it is.
        self.head, self.loss = model.head, loss
        if not frozen:
            self.visual = model.clip.visual
        self.__dict__["embed"] = embed

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.embed(inputs)


def join(device: str) -> World:
    """This process's World: with torchrun's WORLD_SIZE > 1, joins its process group (once) on
    the GPU numbered LOCAL_RANK on this node (NCCL) or on the CPU (gloo); otherwise the plain
    single process on train.device. Rank 0 prints the device (and why auto chose the CPU)."""
    base = resolve_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        print(f"device: {device_note(device, base)}")
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
    world = World(dist.get_rank(), dist.get_world_size(), base)
    if world.is_main:
        print(f"device: {device_note(device, base)}; {world.size} processes "
              f"({dist.get_backend()})")
    return world

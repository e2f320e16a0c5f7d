"""Decoded pixels kept for later passes: an image list through the validation transform once per
run, every later pass over it served from the stored tensors (embed.pixel_cache_gib).

Why: where the backbone trains, every model file in embed and every epoch's validation takes a
new pass through the image tower, over the same pixels each time (the validation transform draws
nothing). Decoding them once and keeping them makes those passes cost the tower alone.

Where: rows in the order of the list, the first ones in memory up to the bound (one bound for
all the lists of a cache), the rest in a file of the project's `repository/` folder mapped into
memory. The file is deleted as soon as it is mapped, so its space comes back when the stage
ends however it ends, and nothing is left behind (no DVC output, nothing for git). Not in the
system's temporary folder: that is often a RAM-backed tmpfs, which would defeat the bound.
Stored as the transform hands them over, whatever the dtype: the batches served are the
loader's, element for element, so every feature is the same as without the cache.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

GIB = 2**30
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (images, positions in the list)


class PixelCache:
    """Pixels of image lists (one transform: one model's, or one base's), decoded on the first
    pass over a list and kept for every later pass over the same list."""

    def __init__(self, memory_gib: float, folder: Path, *, pin_memory: bool = False):
        self.memory_left = int(memory_gib * GIB)
        self.memory_gib, self.folder, self.pin_memory = memory_gib, Path(folder), pin_memory
        self._stored: dict[tuple, _Rows] = {}

    def batches(self, paths: Sequence[Path], batch_size: int,
                decode: Callable[[], Batches]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`decode()`'s batches (the DataLoader over `paths`) on the first pass, stored as they
        pass; on later passes the same batches from the store, `decode` not called."""
        key = tuple(paths)
        if key in self._stored:
            rows = self._stored[key]
            for start in range(0, len(paths), batch_size):
                stop = min(start + batch_size, len(paths))
                yield rows.get(start, stop), torch.arange(start, stop)
            return
        rows = None
        for images, positions in decode():
            if rows is None:  # shape and dtype: the transform's
                rows = self._allocate(len(paths), images[0])
            rows.put(int(positions[0]), images)
            yield images, positions
        if rows is not None:  # a pass cut short (an error, Ctrl-C) stores nothing
            self._stored[key] = rows
            if rows.on_disk:
                print(f"embed.pixel_cache_gib {self.memory_gib:g}: {rows.on_disk} of {len(paths)} "
                      f"images' pixels kept on disk ({self.folder}/, deleted when the stage ends); "
                      f"raise it to keep them in memory")

    def _allocate(self, count: int, first: torch.Tensor) -> "_Rows":
        row_bytes = first.numel() * first.element_size()
        in_memory = min(count, self.memory_left // row_bytes)
        self.memory_left -= in_memory * row_bytes
        return _Rows(count, in_memory, first, self.folder, self.pin_memory)


class _Rows:
    """`count` rows shaped like `first`: the first `in_memory` in memory, the rest in a file."""

    def __init__(self, count: int, in_memory: int, first: torch.Tensor, folder: Path,
                 pin_memory: bool):
        shape, dtype = tuple(first.shape), first.dtype
        self.memory = torch.empty((in_memory, *shape), dtype=dtype, pin_memory=pin_memory)
        self.on_disk = count - in_memory
        self.disk = mapped_file(folder, (self.on_disk, *shape), dtype) if self.on_disk else None

    def put(self, start: int, images: torch.Tensor) -> None:
        split = max(0, min(len(images), len(self.memory) - start))
        self.memory[start:start + split] = images[:split]
        if split < len(images):
            begin = start + split - len(self.memory)
            self.disk[begin:begin + len(images) - split] = images[split:]

    def get(self, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop: a view where they lie in one part, else the two parts joined."""
        cut = len(self.memory)
        if stop <= cut:
            return self.memory[start:stop]
        if start >= cut:
            return self.disk[start - cut:stop - cut]
        return torch.cat([self.memory[start:], self.disk[:stop - cut]])


def mapped_file(folder: Path, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor backed by a new file in `folder`, the file's name deleted at once: the mapping
    keeps it until the tensor goes (or the process ends), and no name is left behind."""
    folder.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix="pixel_cache_", dir=folder)
    os.close(handle)
    try:
        return torch.from_file(name, shared=True, size=math.prod(shape), dtype=dtype).view(shape)
    finally:
        os.unlink(name)

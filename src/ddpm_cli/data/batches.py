"""Batches for training: a seeded permutation, flips and shifts per epoch, from images held
in memory or decoded from disk ahead of the step by DataLoader workers.

The order, the flips and the shifts are decided in the main process from (seed, epoch) alone, so
the two sources give the same bytes and a resumed run sees the same data. Each batch carries its
shifts, from which `reflected` makes the map a network trained with --shift is told. On CUDA,
images held in memory move to the GPU once, when they fit, and batches are gathered and flipped
there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from ddpm_cli.data.folders import InMemory, OnDisk
from ddpm_cli.device import to_device
from ddpm_cli.errors import DataError

SPLIT_SEED = 7_777_777  # added to a run's seed: which images it sets aside (split)


def split(
    n_images: int, k: int, seed: int, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices to train on, indices set aside), each ascending: k images chosen by a
    permutation seeded by the run's seed alone, so a resumed run sets aside the same ones.
    With class `labels`, an image is not set aside when it is the last of its class left
    to train on (a rare class is never taken out of training whole)."""
    order = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed + SPLIT_SEED))
    if labels is None:
        return order[k:].sort().values, order[:k].sort().values
    left = torch.bincount(labels).tolist()
    aside = []
    for i in order.tolist():
        if len(aside) == k:
            break
        if left[int(labels[i])] > 1:
            left[int(labels[i])] -= 1
            aside.append(i)
    held = torch.tensor(sorted(aside), dtype=torch.long)
    keep = torch.ones(n_images, dtype=torch.bool)
    keep[held] = False
    return keep.nonzero().flatten(), held


def _collate(items):
    """(images, every failure, the index of each image): OnDisk may have replaced an item that
    failed by a stand-in, whose label is the one to use."""
    failed = [f for _, fs, _ in items for f in fs]
    return torch.stack([x for x, _, _ in items]), failed, torch.tensor([j for _, _, j in items])


RESIDENT_SHARE = 0.25  # of the GPU's free memory that training images may take


class Batch(NamedTuple):
    """One batch: uint8 images (B, C, H, W), their class labels (B,) or None, and, where the
    images are shifted, each one's shift (B, 2: down, right, in pixels) or None."""

    images: torch.Tensor
    labels: torch.Tensor | None
    shifts: torch.Tensor | None


class Batches:
    """Seeded epoch-by-epoch batches of uint8 images, with random horizontal flips (and shifts,
    with `shift`), each with its images' class labels (None for unlabelled data).

    The position (epoch, index of the next batch in the epoch) is all the state there is:
    `indices(epoch, batch)` rebuilds the same order, so a resumed run sees the same data.
    """

    def __init__(
        self,
        images: InMemory | OnDisk,
        batch_size: int,
        seed: int,
        flip: bool,
        workers: int = 0,
        on_skip: Callable[[list[tuple[str, str]]], None] = lambda failed: None,
        shard: tuple[int, int] = (0, 1),
        device: torch.device | None = None,
        use: torch.Tensor | None = None,
        shift: int = 0,
    ):
        """`use`: the indices of the images to train on (the rest set aside, e.g. for the
        run's quality figure); None: all of them. `batch_size` images per process; with
        `shard` = (rank, world), the global batch of batch_size x world images is cut into
        world equal parts, and this process gets part `rank` (only its own images are
        decoded). With a CUDA `device`, images in memory that take at most RESIDENT_SHARE of
        its free memory are kept there. `shift`: translate each image by up to this many
        pixels each way, its border reflected (0: never)."""
        self.use = use
        self.n = len(images) if use is None else len(use)
        if isinstance(images, OnDisk) and use is not None:  # no held-out image stands in
            images = images.limited_to(use.tolist())
        if self.n == 0:
            raise DataError("no training images")
        self.images, self.local, self.seed, self.flip = images, batch_size, seed, flip
        self.shift = shift
        self.rank, self.world = shard
        self.batch_size = batch_size * self.world  # the global batch
        self.workers, self.on_skip = workers, on_skip
        self.per_epoch = max(1, math.ceil(self.n / self.batch_size))
        self.resident = None  # the images on the GPU, when they live there
        if isinstance(images, InMemory) and device is not None and device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if images.data.numel() <= RESIDENT_SHARE * free:
                self.resident = images.data.to(device)

    def epoch_order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The permutation (of image indices), the flip decisions and the shifts (n, 2: rows,
        columns) of one epoch, from (seed, epoch) alone."""
        # modulo 2**64, what a generator takes: --seed goes up to 2**63 - 1
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**64)
        n = self.n
        order = torch.randperm(n, generator=g)
        flips = torch.rand(n, generator=g) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
        shifts = torch.zeros((n, 2), dtype=torch.long)
        if self.shift:
            shifts = torch.randint(-self.shift, self.shift + 1, (n, 2), generator=g)
        return (order if self.use is None else self.use[order]), flips, shifts

    def indices(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image indices, flips and shifts of this process's part of batch `index` of `epoch`.
        The last batch of an epoch may be short in a single process; in a job it is filled from
        the start of the epoch's order, so that every process gets an equal part. A dataset
        smaller than the batch repeats within the batch."""
        plan = self.epoch_order(epoch)
        n = self.n
        if n < self.batch_size:  # tiny datasets: fill the batch by cycling the permutation
            reps = math.ceil(self.batch_size / n)
            plan = tuple(t.repeat(reps, *[1] * (t.ndim - 1)) for t in plan)
            index = 0
        start = index * self.batch_size
        batch = tuple(t[start : start + self.batch_size] for t in plan)
        if self.world > 1 and batch[0].numel() < self.batch_size:
            missing = self.batch_size - batch[0].numel()
            batch = tuple(torch.cat([b, t[:missing]]) for b, t in zip(batch, plan, strict=True))
        part = slice(self.rank * self.local, (self.rank + 1) * self.local)
        return tuple(t[part] for t in batch) if self.world > 1 else batch

    def positions(self, epoch: int, index: int) -> Iterator[tuple[int, int]]:
        """(epoch, batch index) from the given position on, for ever."""
        while True:
            yield epoch, index
            index += 1
            if index >= self.per_epoch:
                epoch, index = epoch + 1, 0

    def batch(self, epoch: int, index: int) -> torch.Tensor:
        """One batch's images, uint8 (B, C, H, W)."""
        return next(self.iterate(epoch, index)).images

    def iterate(self, epoch: int, index: int) -> Iterator[Batch]:
        """The batches from position (epoch, index) on, in order; on disk, `workers`
        processes decode ahead of the training step."""
        labels = self.images.labels
        plan = (self.indices(e, i) for e, i in self.positions(epoch, index))
        if self.resident is not None:
            for idx, fl, sh in plan:
                dev = self.resident.device
                x = self.resident[to_device(idx, dev)]
                yield self._batch(x, fl, sh, None if labels is None else labels[idx])
            return
        if isinstance(self.images, InMemory):
            for idx, fl, sh in plan:
                x = self.images.data[idx]
                yield self._batch(x, fl, sh, None if labels is None else labels[idx])
            return
        flips: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

        def index_lists():
            for idx, fl, sh in plan:
                flips.append((idx, fl, sh))
                yield idx.tolist()

        loader = torch.utils.data.DataLoader(
            self.images,
            batch_sampler=index_lists(),
            num_workers=self.workers,
            collate_fn=_collate,
            prefetch_factor=4 if self.workers else None,
            # the loader seeds its workers from this generator, not from the global RNG (which
            # dropout uses): creating a loader must not shift a resumed run's random numbers
            generator=torch.Generator().manual_seed(self.seed),
        )
        for x, failed, used in loader:  # used: the images decoded, stand-ins included
            if failed:
                self.on_skip(failed)
            _, fl, sh = flips.pop(0)
            yield self._batch(x, fl, sh, None if labels is None else labels[used])

    def _batch(self, x: torch.Tensor, fl: torch.Tensor, sh: torch.Tensor, labels) -> Batch:
        """The images `x` (on any device) with their flips `fl` (on the host) and, when the
        run shifts, their shifts `sh`."""
        x = _flip(x, to_device(fl, x.device), fl.any())
        if not self.shift:
            return Batch(x, labels, None)
        return Batch(_translate(x, to_device(sh, x.device)), labels, sh)


def reflected(shifts: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Where each image's shift filled it by reflection: (B, 1, height, width) float, 1 in the
    top sh[i, 0] rows (the bottom -sh[i, 0] for a shift up) and likewise in the columns, 0
    elsewhere; all 0 for no shift. What a network trained with --shift is told (its
    ModelConfig.augment map), so that its samples, drawn with an empty map, have no seams."""
    dev = shifts.device
    rows, cols = torch.arange(height, device=dev)[None], torch.arange(width, device=dev)[None]
    dy, dx = shifts[:, :1], shifts[:, 1:]
    row = (rows < dy) | (rows >= height + dy)  # (B, H)
    col = (cols < dx) | (cols >= width + dx)  # (B, W)
    return (row[:, :, None] | col[:, None, :]).float()[:, None]


def _translate(x: torch.Tensor, sh: torch.Tensor) -> torch.Tensor:
    """Image i moved down sh[i, 0] and right sh[i, 1] pixels (|shift| < size), the border
    reflected (the pixel at the edge not repeated): a gather, exact for uint8."""
    b, _, h, w = x.shape
    rows = _reflect(torch.arange(h, device=x.device)[None] - sh[:, :1], h)  # (B, H)
    cols = _reflect(torch.arange(w, device=x.device)[None] - sh[:, 1:], w)  # (B, W)
    out = x[torch.arange(b, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None]]
    return out.permute(0, 3, 1, 2).contiguous()  # (B, H, W, C) -> (B, C, H, W)


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    i = i.abs()
    return torch.where(i >= n, 2 * (n - 1) - i, i)


def _flip(x: torch.Tensor, fl: torch.Tensor, any_flip) -> torch.Tensor:
    """Images i with fl[i] mirrored left to right; `any_flip` is fl.any() read on the host
    (a selection, not masked indexing, so nothing waits for the GPU)."""
    if not any_flip:
        return x
    return torch.where(fl.view(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)

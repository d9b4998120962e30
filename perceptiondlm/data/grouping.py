"""Length grouping (offline form of spec §2.2): an epoch order in which consecutive batches hold examples of
similar length, deterministic per seed and epoch, and the padding fraction of a batch order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from perceptiondlm.errors import PerceptionDLMError


def length_grouped_indices(lengths: Sequence[int] | np.ndarray, batch_size: int, *, seed: int, epoch: int = 0,
                           world_size: int = 1, megabatch_mult: int = 50) -> list[int]:
    """A random permutation cut into megabatches of batch_size·world_size·megabatch_mult items, each sorted by
    length (longest first) and cut into groups of batch_size·world_size (one optimizer step over all ranks);
    the groups are then shuffled, a trailing partial group stays last so later groups keep their alignment."""
    if batch_size < 1 or world_size < 1 or megabatch_mult < 1:
        raise PerceptionDLMError("batch_size, world_size and megabatch_mult must be >= 1")
    lengths = np.asarray(lengths)
    rng = np.random.default_rng(np.random.SeedSequence([seed & (2**64 - 1), epoch]))
    perm = rng.permutation(len(lengths))
    step, mega = batch_size * world_size, batch_size * world_size * megabatch_mult
    groups = []
    for start in range(0, len(perm), mega):
        chunk = perm[start:start + mega]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]  # (≤ mega,) longest first
        groups += [chunk[i:i + step] for i in range(0, len(chunk), step)]
    tail = [groups.pop()] if groups and len(groups[-1]) < step else []
    order = rng.permutation(len(groups))
    return [int(i) for g in [*(groups[j] for j in order), *tail] for i in g]


def padding_fraction(lengths: Sequence[int] | np.ndarray, order: Sequence[int], batch_size: int) -> float:
    """Share of padding tokens when `order` is cut into consecutive batches of `batch_size` padded to their
    longest member: Σ (max·n − Σ len) / Σ max·n."""
    lengths = np.asarray(lengths)
    padded = pad = 0
    for start in range(0, len(order), batch_size):
        batch = lengths[np.asarray(order[start:start + batch_size])]
        padded += int(batch.max()) * len(batch)
        pad += int(batch.max()) * len(batch) - int(batch.sum())
    return pad / padded if padded else 0.0


class LengthGroupedSampler(Sampler[int]):
    """Sampler over `length_grouped_indices`; `lengths` may be a callable (e.g. `lambda: dataset.lengths`) so
    the lengths of the current epoch are read at each `__iter__`. Call `set_epoch` before each epoch."""

    def __init__(self, lengths: Sequence[int] | np.ndarray | Callable[[], Sequence[int]], batch_size: int, *,
                 seed: int = 0, world_size: int = 1, megabatch_mult: int = 50) -> None:
        self._lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.world_size, self.megabatch_mult, self.epoch = world_size, megabatch_mult, 0

    def lengths(self) -> Sequence[int]:
        return self._lengths() if callable(self._lengths) else self._lengths

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths())

    def __iter__(self) -> Iterator[int]:
        yield from length_grouped_indices(self.lengths(), self.batch_size, seed=self.seed, epoch=self.epoch,
                                          world_size=self.world_size, megabatch_mult=self.megabatch_mult)

"""Poisson subsampling: the sampling scheme that the privacy accountants analyse.

Each example joins each batch independently with probability ``sample_rate``, so batch sizes vary and
can be zero. Shuffling into fixed-size batches is a different mechanism whose privacy the PRV/RDP
accountants do not bound.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, Sampler

from pflat_lightning.privacy import secure_random


class PoissonBatchSampler(Sampler[List[int]]):
    """Yields ``num_batches`` batches of indices per epoch, each index included with ``sample_rate``.

    The draws of an epoch depend only on ``(seed, epoch)``, so an interrupted epoch can be replayed and
    fast-forwarded exactly. Under data parallelism each rank keeps the indices ``i`` with
    ``i % num_replicas == rank`` of the same global draw: the union over ranks is one Poisson batch of
    the whole dataset with the global expected batch size.

    With ``secure=True`` the masks come from the OS's CSPRNG
    (:func:`~pflat_lightning.privacy.secure_random.uniform`) and ``seed`` is ignored: nobody can regenerate
    which examples were in a batch. An interrupted epoch is then not replayed: the batches left after
    :meth:`fast_forward` are fresh draws, so a resumed run spends exactly the privacy of the uninterrupted
    one but does not see the same batches. Secure sampling runs in one process: the ranks of a data-parallel
    run would each need the same secret draw, which this sampler does not broadcast, so ``num_replicas > 1``
    is refused.

    Args:
        num_samples: dataset size ``N``.
        sample_rate: inclusion probability ``q`` in (0, 1].
        num_batches: batches per epoch; defaults to ``round(1 / q)`` (one expected pass over the data).
        seed: base seed of the draws.
        num_replicas: number of data-parallel ranks sharing the draw.
        rank: this process' rank.
        secure: draw the masks from the OS's CSPRNG instead of the seeded generator.

    Raises:
        ValueError: for a bad size, rate or rank, or ``secure=True`` with ``num_replicas > 1``.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        *,
        num_batches: Optional[int] = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        secure: bool = False,
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}.")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}.")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}.")
        if secure and num_replicas > 1:
            raise ValueError(
                f"secure=True (PrivacyConfig.secure_mode) with num_replicas={num_replicas}: secure Poisson sampling runs "
                "in one process only, since every rank would need the same secret draw and this sampler does not "
                "broadcast it. Train on one device, or set secure_mode=False (seeded, reproducible masks)."
            )
        self.secure = secure
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.num_batches = num_batches if num_batches is not None else max(1, round(1.0 / sample_rate))
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._skip = 0

    @property
    def sampler(self) -> "PoissonBatchSampler":
        # Lightning calls ``set_epoch`` on ``loader.batch_sampler.sampler``; there is no inner sampler.
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def fast_forward(self, batches: int) -> None:
        """Skip the first ``batches`` batches of the next pass (resuming inside an epoch)."""
        if not 0 <= batches <= self.num_batches:
            raise ValueError(f"batches must be in [0, {self.num_batches}], got {batches}.")
        self._skip = batches

    def __len__(self) -> int:
        return self.num_batches - self._skip

    def __iter__(self) -> Iterator[List[int]]:
        skip, self._skip = self._skip, 0
        if self.secure:  # nothing to replay: the remaining batches are fresh draws
            for _ in range(self.num_batches - skip):
                yield (secure_random.uniform(self.num_samples) < self.sample_rate).nonzero().flatten().tolist()
            return
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        for step in range(self.num_batches):
            mask = torch.rand(self.num_samples, generator=generator) < self.sample_rate
            if step < skip:
                continue
            indices = mask.nonzero().flatten()
            yield indices[indices % self.num_replicas == self.rank].tolist()


class PoissonDataLoader(DataLoader):
    """A ``DataLoader`` whose batches are Poisson samples of ``dataset`` (possibly empty).

    ``collate_fn`` must accept an empty list. The loader is resumable: its state is the seed and epoch;
    the position inside an epoch is restored by the training module from its privacy state. ``secure=True``
    draws the batches from the OS's CSPRNG, ignoring ``seed`` (see :class:`PoissonBatchSampler`);
    ``PrivacyConfig(secure_mode=True)`` requires it.

    Example::

        loader = PoissonDataLoader(dataset, expected_batch_size=256, collate_fn=collate, seed=0)
    """

    def __init__(
        self,
        dataset: Any,
        *,
        expected_batch_size: int,
        collate_fn: Any = None,
        seed: int = 0,
        num_batches: Optional[int] = None,
        num_replicas: int = 1,
        rank: int = 0,
        secure: bool = False,
        **kwargs: Any,
    ) -> None:
        size = len(dataset)
        if not 0 < expected_batch_size <= size:
            raise ValueError(
                f"expected_batch_size must be in [1, dataset size {size}], got {expected_batch_size}."
            )
        self.expected_batch_size = expected_batch_size
        batch_sampler = PoissonBatchSampler(
            size,
            expected_batch_size / size,
            num_batches=num_batches,
            seed=seed,
            num_replicas=num_replicas,
            rank=rank,
            secure=secure,
        )
        super().__init__(dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, **kwargs)

    @property
    def sample_rate(self) -> float:
        return self.batch_sampler.sample_rate

    @property
    def secure(self) -> bool:
        return self.batch_sampler.secure

    def state_dict(self) -> Dict[str, Any]:
        return {"seed": self.batch_sampler.seed, "epoch": self.batch_sampler.epoch}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.batch_sampler.seed = state_dict["seed"]
        self.batch_sampler.set_epoch(state_dict["epoch"])

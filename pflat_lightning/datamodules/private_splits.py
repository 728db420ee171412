"""What every pflat datamodule serves the same way: the private training split (Poisson-sampled under DP),
the held-out validation/test splits and the optional public split."""
from __future__ import annotations

from typing import List, Optional, Union

import datasets
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from pflat_lightning.privacy.sampling import PoissonDataLoader


class PrivateSplitsDataModule(LightningDataModule):
    """Loaders over ``train_dataset``, ``val_dataset``, ``test_dataset`` and ``public_dataset`` (built by the
    subclass' ``setup``), batched by its ``collate_fn``.

    Under ``poisson_sampling`` (set by the DP training module) ``train_dataloader()`` returns a
    :class:`~pflat_lightning.privacy.sampling.PoissonDataLoader` with ``batch_size`` as the expected size;
    under data parallelism it splits one global draw across ranks. Under ``secure_sampling`` (set by the DP
    training module from ``PrivacyConfig.secure_mode``) its draws come from the OS's CSPRNG and ignore
    ``seed``. Subclasses set ``batch_size``,
    ``eval_batch_size``, ``public_fraction``, ``poisson_sampling``, ``seed``, ``num_workers``.
    """

    train_dataset: Optional[datasets.Dataset] = None
    val_dataset: Optional[datasets.Dataset] = None
    test_dataset: Optional[datasets.Dataset] = None
    public_dataset: Optional[datasets.Dataset] = None
    secure_sampling: bool = False

    @property
    def num_train_examples(self) -> int:
        """Size of the (private) training split, the ``N`` of the sampling rate ``batch_size / N``."""
        return len(self._require(self.train_dataset, "train_dataset"))

    def train_dataloader(self) -> DataLoader:
        train = self._require(self.train_dataset, "train_dataset")
        if self.poisson_sampling:
            replicas, rank = (1, 0) if self.trainer is None else (self.trainer.world_size, self.trainer.global_rank)
            return PoissonDataLoader(
                train,
                expected_batch_size=self.batch_size,
                collate_fn=self.collate_fn,
                seed=self.seed,
                num_replicas=replicas,
                rank=rank,
                secure=self.secure_sampling,
                num_workers=self.num_workers,
            )
        return DataLoader(train, batch_size=self.batch_size, shuffle=True, collate_fn=self.collate_fn,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> Union[DataLoader, List[DataLoader]]:
        """The validation loader; an empty list (no validation) when there is no validation split."""
        return [] if self.val_dataset is None else self._loader(self.val_dataset, self.eval_batch_size)

    def test_dataloader(self) -> Union[DataLoader, List[DataLoader]]:
        """The test loader; an empty list (no test) when there is no test split."""
        return [] if self.test_dataset is None else self._loader(self.test_dataset, self.eval_batch_size)

    def public_dataloader(self, batch_size: Optional[int] = None, shuffle: bool = False) -> DataLoader:
        """The public split in training-format batches of ``batch_size`` (default ``eval_batch_size``);
        ``shuffle=True`` to train on it (a public teacher)."""
        if self.public_dataset is None:
            raise ValueError(
                f"There is no public split: public_fraction={self.public_fraction}; set it in (0, 1) and call setup()."
            )
        return self._loader(self.public_dataset, batch_size or self.eval_batch_size, shuffle)

    def _loader(self, data: datasets.Dataset, batch_size: int, shuffle: bool = False) -> DataLoader:
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, collate_fn=self.collate_fn,
                          num_workers=self.num_workers)

    @staticmethod
    def _require(data: Optional[datasets.Dataset], name: str) -> datasets.Dataset:
        if data is None:
            raise RuntimeError(f"{name} is not built yet: call setup() first.")
        return data

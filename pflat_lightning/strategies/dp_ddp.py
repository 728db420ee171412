"""Data-parallel DP-SGD on Lightning's DDP machinery.

Plain DDP breaks DP-SGD: it averages raw gradients during backward (before any per-example clipping) and
each rank of a DP optimizer would add its own noise. ``DPDDPStrategy`` keeps Lightning's process launch,
process group, collectives and checkpointing, and for a private module (one with a privacy ``engine``)
changes three things:

- no ``DistributedDataParallel`` wrapper: the engine all-reduces the clipped, once-noised gradient sum,
  one flat buffer of the trainable parameters' size per release (see ``pflat_lightning.privacy.engine``);
  the trainable parameters and buffers start equal on every rank (broadcast from rank 0);
- Poisson sampling over the whole dataset: every rank draws the same global Poisson batch and keeps its
  share, so the union is one Poisson sample with the global expected batch size and the accountant is
  the single-process one; Lightning's distributed-sampler injection is switched off for the run (it
  would replace the Poisson draws) and evaluation loaders are read in full by every rank;
- the accountant, the report and the callbacks see identical state on every rank.

A non-private module gets ordinary DDP. Registered names: ``"dp_ddp"`` (subprocess launch, for scripts,
torchrun and SLURM), ``"dp_ddp_spawn"``, ``"dp_ddp_fork"`` and ``"dp_ddp_notebook"`` (fork, for
notebooks).
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info

from pflat_lightning.checkpointing import AtomicCheckpointIO
from pflat_lightning.privacy.sampling import PoissonBatchSampler
from pflat_lightning.protocol import privacy_engine

START_METHODS = {"dp_ddp": "popen", "dp_ddp_spawn": "spawn", "dp_ddp_fork": "fork", "dp_ddp_notebook": "fork"}


class DPDDPStrategy(DDPStrategy):
    """DDP for DP-SGD: clipped sums all-reduced, noise added once, Poisson sampling over the whole dataset.

    Takes :class:`~lightning.pytorch.strategies.DDPStrategy`'s arguments (``process_group_backend``,
    ``timeout``, ``start_method``...); checkpoints are written atomically by default.

    Example::

        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="dp_ddp_spawn", max_epochs=3)
        trainer = pl.Trainer(strategy=DPDDPStrategy(process_group_backend="gloo", start_method="spawn"))
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("checkpoint_io", AtomicCheckpointIO())
        super().__init__(*args, **kwargs)

    def _private(self) -> bool:
        return privacy_engine(self.lightning_module) is not None

    def setup(self, trainer: pl.Trainer) -> None:
        if self._private() and trainer._accelerator_connector.use_distributed_sampler:
            # The Poisson loader draws each rank's share itself; a DistributedSampler would replace it.
            trainer._accelerator_connector.use_distributed_sampler = False
            rank_zero_info("DPDDPStrategy: Poisson sampling over the whole dataset, each rank keeps its share "
                           "(Lightning's distributed sampler is off for this run).")
        super().setup(trainer)

    def configure_ddp(self) -> None:
        if not self._private():
            super().configure_ddp()
            return
        # No DDP wrapper: gradients are synchronised by the DP optimizer after clipping.
        with torch.no_grad():
            for tensor in [p for p in self.model.parameters() if p.requires_grad] + list(self.model.buffers()):
                dist.broadcast(tensor, src=0)

    def process_dataloader(self, dataloader: object) -> object:
        sampler = getattr(dataloader, "batch_sampler", None)
        if isinstance(sampler, PoissonBatchSampler):
            sampler.num_replicas, sampler.rank = self.world_size, self.global_rank
        return super().process_dataloader(dataloader)

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, start_method in START_METHODS.items():
            strategy_registry.register(
                name, cls, description=f"DP-SGD data parallelism with start_method {start_method!r}",
                start_method=start_method,
            )

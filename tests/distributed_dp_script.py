"""Run by test_distributed_dp.py in its own process (multi-process runs must not share pytest's).

    python distributed_dp_script.py train MODEL OUT DEVICES STRATEGY [awp|private_bounds]
    python distributed_dp_script.py noise OUT
    python distributed_dp_script.py nan MODEL OUT
"""
import sys
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).parent))
from helpers import CloseProcessGroup, TokenDataModule  # noqa: E402

from pflat_lightning import PrefixConfig, PrefixTunedClassifier, PrivacyConfig  # noqa: E402
from pflat_lightning.callbacks import AdversarialWeightPerturbation  # noqa: E402
from pflat_lightning.privacy import PrivacyConfig as Config  # noqa: E402
from pflat_lightning.privacy.engine import DPSGDEngine  # noqa: E402

NOISE, CLIP = 1.3, 0.7


class RecordSteps(Callback):
    """Every rank saves its trainable parameters after every update, and its privacy state at the end."""

    def __init__(self, out):
        self.out, self.steps = out, []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.steps.append(torch.cat([p.detach().reshape(-1).clone() for p in pl_module.parameters() if p.requires_grad]))

    def on_train_end(self, trainer, pl_module):
        engine = pl_module.engine
        torch.save({"steps": self.steps, "history": engine.history, "epsilon": engine.epsilon(),
                    "updates": engine.updates, "sample_rate": engine.sample_rate, "delta": engine.delta,
                    "world_size": trainer.world_size, "group_bounds": engine.group_bounds},
                   Path(self.out, f"rank{trainer.global_rank}.pt"))


#: Group-wise clipping with bounds estimated privately on the training set (2 noisy histogram releases).
PRIVATE_BOUNDS = dict(clipping="group", group_bound_data="private", group_bound_noise=1.0, group_bound_batches=2)


def model(path, cls=PrefixTunedClassifier, **privacy_options):
    torch.manual_seed(0)
    privacy = PrivacyConfig(noise_multiplier=NOISE, target_epsilon=None, max_grad_norm=CLIP, target_delta=1e-3, seed=3,
                            **privacy_options)
    return cls(path, 2, prefix=PrefixConfig(num_virtual_tokens=2), privacy=privacy, max_physical_batch_size=5,
               optimizer=partial(torch.optim.SGD, lr=0.5))


def trainer(out, devices, strategy, callbacks):
    return pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=2, default_root_dir=out,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks)


def train(path, out, devices, strategy, variant=None):
    callbacks = [RecordSteps(out), CloseProcessGroup()]
    if variant == "awp":
        callbacks.append(AdversarialWeightPerturbation(gamma=0.1, until_fraction=1.0))
    module = model(path, **(PRIVATE_BOUNDS if variant == "private_bounds" else {}))
    trainer(out, int(devices), strategy, callbacks).fit(module, datamodule=TokenDataModule(size=48, batch_size=12))


class NaNOnRank1(PrefixTunedClassifier):
    def example_losses(self, batch):
        losses = super().example_losses(batch)
        if self.global_rank == 1 and self.global_step == 2:
            return losses * float("nan")
        return losses


def nan(path, out):
    trainer(out, 2, "dp_ddp_spawn", []).fit(model(path, NaNOnRank1), datamodule=TokenDataModule(size=48, batch_size=12))


def noise_worker(rank, out, steps):
    dist.init_process_group("gloo", init_method=f"file://{out}/process_group", rank=rank, world_size=2)
    torch.manual_seed(0)
    layer = torch.nn.Linear(100, 100)
    engine = DPSGDEngine(Config(noise_multiplier=NOISE, target_epsilon=None, max_grad_norm=CLIP, target_delta=1e-3, seed=5))
    engine.keep_released_gradient = True
    optimizer = engine.attach(layer, torch.optim.SGD(layer.parameters(), lr=0.0), dataset_size=500,
                              expected_batch_size=10, planned_steps=steps, distributed=True)
    released = []
    for _ in range(steps):
        x = torch.randn(5, 100)
        engine.backward(0.0 * layer(x).sum(dim=1))  # zero per-example gradients: the release is pure noise
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        released.append(torch.cat([g.reshape(-1) for g in engine.released_gradient]))
    torch.save({"released": torch.stack(released), "expected_batch_size": 10}, Path(out, f"noise{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "train":
        train(*sys.argv[2:7])
    elif mode == "noise":
        mp.spawn(noise_worker, args=(sys.argv[2], 10), nprocs=2)
    elif mode == "nan":
        nan(*sys.argv[2:4])

"""Run by test_callbacks_ddp.py in its own process: layer selection under a 2-process ddp_spawn run."""
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_config  # noqa: E402
from helpers import TokenDataModule  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from pflat_lightning import PrefixTunedClassifier, PrivacyConfig  # noqa: E402
from pflat_lightning.bundled import resolve_model  # noqa: E402
from pflat_lightning.callbacks import SharpnessLayerSelection  # noqa: E402


class Record(Callback):
    def __init__(self, out):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        selection = next(c for c in trainer.callbacks if isinstance(c, SharpnessLayerSelection))
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps({
            "selected": selection.selected, "active": pl_module.prefix.active_layers,
            "prefix0": pl_module.prefix.layers[0].weight.detach().flatten()[:8].tolist(),
        }))


def main(out: str, private: bool) -> None:
    cls, config = tiny_config("gpt2")
    torch.manual_seed(0)
    cls(config).save_pretrained(Path(out, "model"))
    AutoTokenizer.from_pretrained(resolve_model("bundled-minilm")).save_pretrained(Path(out, "model"))
    model = PrefixTunedClassifier(str(Path(out, "model")), 2, num_virtual_tokens=2, privacy=PrivacyConfig(enabled=private))
    # Each rank measures on a different validation batch: only the broadcast makes them agree.
    trainer = pl.Trainer(strategy="ddp_spawn_find_unused_parameters_true",  # pruned layers stop getting gradients
                         accelerator="cpu", devices=2, max_epochs=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=[SharpnessLayerSelection(keep_layers=1, at_epoch=1, data="validation", num_batches=1),
                                    Record(out)])
    trainer.fit(model, datamodule=TokenDataModule(poisson=False))


if __name__ == "__main__":
    main(sys.argv[1], private=len(sys.argv) > 2 and sys.argv[2] == "private")

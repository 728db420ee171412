"""Run by test_callbacks_ddp.py in its own process: the callbacks under a 2-process run.

    python ddp_selection_script.py OUT              # non-private, plain DDP: layer selection
    python ddp_selection_script.py OUT private      # DP under plain DDP: refused
    python ddp_selection_script.py OUT dp_ddp       # DP under dp_ddp: AWP, layer selection and a teacher
    python ddp_selection_script.py OUT dp_ddp_fresh # DP under dp_ddp: AWP on fresh private ascent gradients
"""
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_config  # noqa: E402
from helpers import CloseProcessGroup, TokenDataModule  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from pflat_lightning import PrefixConfig, PrefixTunedClassifier, PrivacyConfig  # noqa: E402
from pflat_lightning.bundled import resolve_model  # noqa: E402
from pflat_lightning.callbacks import (  # noqa: E402
    AdversarialWeightPerturbation,
    SharpnessLayerSelection,
    TeacherDistillation,
)


class SeedPerRank(Callback):
    """Different random streams on each rank (teacher initialisation, shuffling): only the library's
    synchronisation can make the ranks agree."""

    def setup(self, trainer, pl_module, stage):
        torch.manual_seed(trainer.global_rank)


class Record(Callback):
    def __init__(self, out):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        selection = next((c for c in trainer.callbacks if isinstance(c, SharpnessLayerSelection)), None)
        teacher = next((c for c in trainer.callbacks if isinstance(c, TeacherDistillation)), None)
        awp = next((c for c in trainer.callbacks if isinstance(c, AdversarialWeightPerturbation)), None)
        engine = pl_module.engine
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps({
            "selected": None if selection is None else selection.selected, "active": pl_module.prefix.active_layers,
            "prefix0": pl_module.prefix.layers[0].weight.detach().flatten()[:8].tolist(),
            "teacher": None if teacher is None else [v.flatten()[:8].tolist() for v in teacher.teacher_state.values()],
            "perturbed_steps": None if awp is None else awp.perturbed_steps,
            "privacy": None if engine is None else {
                "noise_multiplier": engine.noise_multiplier, "sample_rate": engine.sample_rate,
                "updates": engine.updates, "delta": engine.delta, "epsilon": engine.epsilon(),
                "dataset_size": engine.dataset_size},
        }))


def main(out: str, mode: str) -> None:
    cls, config = tiny_config("gpt2")
    torch.manual_seed(0)
    cls(config).save_pretrained(Path(out, "model"))
    AutoTokenizer.from_pretrained(resolve_model("bundled-minilm")).save_pretrained(Path(out, "model"))
    private = mode in ("private", "dp_ddp", "dp_ddp_fresh")
    model = PrefixTunedClassifier(str(Path(out, "model")), 2, prefix=PrefixConfig(num_virtual_tokens=2),
                                  privacy=PrivacyConfig(enabled=private))
    # Each rank measures on a different validation batch: only the broadcast makes them agree.
    callbacks = [SeedPerRank(), SharpnessLayerSelection(keep_layers=1, at_epoch=1, data="validation", num_batches=1), Record(out)]
    if mode == "dp_ddp_fresh":
        callbacks = [SeedPerRank(), AdversarialWeightPerturbation(gamma=0.05, direction="fresh_private",
                                                                 until_fraction=0.5), Record(out)]
        strategy = "dp_ddp_spawn"
    elif mode == "dp_ddp":
        callbacks += [AdversarialWeightPerturbation(gamma=0.05), TeacherDistillation("public", weight=0.1, teacher_epochs=1)]
        strategy = "dp_ddp_spawn"
    else:
        strategy = "ddp_spawn_find_unused_parameters_true"  # pruned layers stop getting gradients
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_epochs=2, default_root_dir=out, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks + [CloseProcessGroup()])
    trainer.fit(model, datamodule=TokenDataModule(poisson=private))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "nonprivate")

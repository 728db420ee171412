"""A fit shows no warning caused by the library's own design choices, and only those are silenced."""
import re
import warnings

from helpers import TokenDataModule, quiet_trainer
from pflat_lightning import PrefixConfig, PrefixTunedClassifier, PrivacyConfig

EVAL_MODE = "module(s) in eval mode at the start of training"
BACKWARD_HOOK = re.compile(r"(non-full|Full) backward hook")


def fit_warnings(tmp_path, module):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(tmp_path, max_epochs=1).fit(module, datamodule=TokenDataModule(size=16, batch_size=4))
    return [str(w.message) for w in caught]


def test_a_dp_fit_warns_neither_about_the_frozen_backbone_nor_about_opacus_hooks(tiny_model_dir, tmp_path):
    for mode in ("hooks", "ghost"):
        module = PrefixTunedClassifier(tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=2),
                                       privacy=PrivacyConfig(target_epsilon=8.0, grad_sample_mode=mode))
        messages = fit_warnings(tmp_path / mode, module)
        assert module.engine.updates == 4
        assert not [m for m in messages if EVAL_MODE in m or BACKWARD_HOOK.search(m)], messages
    assert not any("eval mode" in str(f[1]) for f in warnings.filters if f[1] is not None)  # nothing left behind


def test_a_trainable_module_in_eval_mode_is_still_warned_about(tiny_model_dir, tmp_path):
    module = PrefixTunedClassifier(tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=2),
                                   privacy=PrivacyConfig(enabled=False))
    module.model.prefix.eval()  # not the library's choice: the user's, and Lightning's warning must reach them
    assert any(EVAL_MODE in m for m in fit_warnings(tmp_path, module))

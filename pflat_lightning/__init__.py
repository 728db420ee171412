"""pflat-lightning: privacy-preserving prefix tuning of language models through flatness."""
from pflat_lightning.black_box.tuner import BlackBoxPromptTuner
from pflat_lightning.causal_lm import PrefixTunedCausalLM
from pflat_lightning.classifier import PrefixTunedClassifier
from pflat_lightning.module import DPPrefixModule
from pflat_lightning.prefix import PrefixEncoder
from pflat_lightning.prefix_model import PrefixCausalLM, PrefixModel
from pflat_lightning.privacy import PrivacyConfig

__all__ = [
    "BlackBoxPromptTuner",
    "DPPrefixModule",
    "PrefixCausalLM",
    "PrefixEncoder",
    "PrefixModel",
    "PrefixTunedCausalLM",
    "PrefixTunedClassifier",
    "PrivacyConfig",
]
__version__ = "0.1.0"

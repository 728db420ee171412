"""pflat-lightning: privacy-preserving prefix tuning of language models through flatness."""
from typing import TYPE_CHECKING

from pflat_lightning.causal_lm import PrefixTunedCausalLM
from pflat_lightning.classifier import PrefixTunedClassifier
from pflat_lightning.lazy import lazy_exports
from pflat_lightning.module import DPPrefixModule
from pflat_lightning.prefix import PrefixConfig, PrefixEncoder
from pflat_lightning.prefix_model import PrefixCausalLM, PrefixModel
from pflat_lightning.privacy import PrivacyConfig

if TYPE_CHECKING:
    from pflat_lightning.black_box.tuner import BlackBoxPromptTuner

# The black-box scorers, the attacks and the landscape are imported on first use: a DP fit needs none of them.
__getattr__, __dir__ = lazy_exports(__name__, {"BlackBoxPromptTuner": "pflat_lightning.black_box.tuner"},
                                    subpackages=("attacks", "black_box", "landscape"))

__all__ = [
    "BlackBoxPromptTuner",
    "DPPrefixModule",
    "PrefixCausalLM",
    "PrefixConfig",
    "PrefixEncoder",
    "PrefixModel",
    "PrefixTunedCausalLM",
    "PrefixTunedClassifier",
    "PrivacyConfig",
]
__version__ = "0.1.0"

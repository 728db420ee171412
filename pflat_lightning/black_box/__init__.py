"""The black-box setting: derivative-free DP prompt tuning of a model reachable only through a scorer."""
from pflat_lightning.black_box.scorers import HTTPScorer, HuggingFaceScorer, PromptScorer, ScorerInfo
from pflat_lightning.black_box.tuner import BlackBoxPromptTuner, ZerothOrderMechanism

__all__ = ["BlackBoxPromptTuner", "HTTPScorer", "HuggingFaceScorer", "PromptScorer", "ScorerInfo", "ZerothOrderMechanism"]

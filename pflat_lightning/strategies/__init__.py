"""Lightning strategies for DP training on several processes; importing registers their names."""
from lightning.pytorch.strategies import StrategyRegistry

from pflat_lightning.strategies.dp_ddp import START_METHODS, DPDDPStrategy

if not set(START_METHODS) & set(StrategyRegistry):
    DPDDPStrategy.register_strategies(StrategyRegistry)

__all__ = ["DPDDPStrategy", "START_METHODS"]

"""Privacy: configuration, DP-SGD engine, Poisson sampling, the ledger and the report."""
from pflat_lightning.privacy.config import PrivacyConfig
from pflat_lightning.privacy.engine import DPSGDEngine, epsilon_of
from pflat_lightning.privacy.ledger import LedgerEntry, PrivacyLedger
from pflat_lightning.privacy.report import build_report, write_report
from pflat_lightning.privacy.sampling import PoissonBatchSampler, PoissonDataLoader

__all__ = [
    "DPSGDEngine",
    "LedgerEntry",
    "PoissonBatchSampler",
    "PoissonDataLoader",
    "PrivacyConfig",
    "PrivacyLedger",
    "build_report",
    "epsilon_of",
    "write_report",
]

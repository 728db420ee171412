"""Privacy: configuration, DP-SGD engine, Poisson sampling, the ledger, the report and PrivateTraining (all of
it in a Lightning fit)."""
from pflat_lightning.privacy.config import PrivacyConfig
from pflat_lightning.privacy.engine import DPSGDEngine, epsilon_of
from pflat_lightning.privacy.ledger import LedgerEntry, PrivacyLedger
from pflat_lightning.privacy.report import build_report, write_report
from pflat_lightning.privacy.sampling import PoissonBatchSampler, PoissonDataLoader
from pflat_lightning.privacy.training import PrivateTraining

__all__ = [
    "DPSGDEngine",
    "LedgerEntry",
    "PoissonBatchSampler",
    "PoissonDataLoader",
    "PrivacyConfig",
    "PrivacyLedger",
    "PrivateTraining",
    "build_report",
    "epsilon_of",
    "write_report",
]

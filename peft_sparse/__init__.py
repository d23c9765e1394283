"""peft-sparse: sparse adapters for Hugging Face PEFT. Importing this package registers the tuner."""

from .registration import register

PEFT_TYPE = register()

from .calibration import SparseMaskCalibrationCallback, calibrate_masks  # noqa: E402
from .clustering import ClusterResult, cluster_experts  # noqa: E402
from .config import SparseAdapterConfig  # noqa: E402
from .layer import SparseAdapterLayer  # noqa: E402
from .library import ExpertLibrary, LibraryError  # noqa: E402
from .model import SparseAdapterModel  # noqa: E402
from .routing import ArrowConfig, create_arrow_model, load_arrow_model  # noqa: E402

__all__ = [
    "PEFT_TYPE",
    "ArrowConfig",
    "create_arrow_model",
    "load_arrow_model",
    "SparseMaskCalibrationCallback",
    "calibrate_masks",
    "ClusterResult",
    "cluster_experts",
    "ExpertLibrary",
    "LibraryError",
    "SparseAdapterConfig",
    "SparseAdapterLayer",
    "SparseAdapterModel",
]
__version__ = "0.1.0"

"""kvsvd: fast, measurable, reproducible SVD-based KV-cache compression."""

from .orth import ORTH_METHODS, orthonormalise
from .svd import (QR_METHODS, SVD_METHODS, full_svd, get_svd, lowrank_svd, optimal_error, rsvd,
                   truncation_error)
from .timing import StageTimer

__all__ = ["rsvd", "full_svd", "lowrank_svd", "get_svd", "SVD_METHODS", "QR_METHODS", "ORTH_METHODS",
           "orthonormalise", "StageTimer", "truncation_error", "optimal_error"]
__version__ = "0.1.0"

from . import attention  # noqa: F401  registers attn_implementation="kvsvd" with transformers
from .cache import LowRankCache
from .calibrate import calibrate
from .config import CompressionConfig
from .methods.transform import TransformConfig
from .models import load_model

__all__ += ["LowRankCache", "CompressionConfig", "TransformConfig", "calibrate", "load_model"]

"""8-bit routed experts: the method objects the MoE layers hang on (base.py, fp8.py, int8.py), the saved format
and the reading of 8-bit checkpoint tensors (checkpoint.py), and the offline conversion (convert.py)."""
from .base import ExpertsMethod, PerChannelExperts, QuantizationError, experts_method

__all__ = ["ExpertsMethod", "PerChannelExperts", "QuantizationError", "experts_method"]

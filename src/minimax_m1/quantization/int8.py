"""experts_int8: W8A16 experts (vLLM's `--quantization experts_int8` recipe for MiniMax-M1 on 8xH100).

Symmetric per-output-channel int8: scale_c = max|w_c| / 127, q = round(w / scale_c) (ties to even), so every
weight's error is at most scale_c / 2 = max|w_c| / 254. Activations stay in the model dtype; the products
accumulate in fp32: y_c = scale_c * sum_k x_k q_ck (int8 values are exact in bf16).
"""
from .base import PerChannelExperts


class Int8Experts(PerChannelExperts):
    name = "experts_int8"

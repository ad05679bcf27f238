"""Fused kernels of LLDif (Triton and C++/CUDA) with plain-PyTorch references, usable on any model.

    import lldif_kernels
    y = lldif_kernels.modulated_layer_norm(x, scale, shift, weight, bias)
    out = lldif_kernels.channel_attention(q, k, v, temperature)
    out = lldif_kernels.window_cross_attention(q, k, v, rel_pos_table, window_size)
    h = lldif_kernels.depthwise_conv3x3(x, weight, gate=True)
    with lldif_kernels.use_backend("reference"):
        ...
"""

from . import nn
from .dispatch import BACKENDS, BackendNotSupportedError, available_backends, use_backend
from .ops.channel_attention import channel_attention, channel_attention_qkv
from .ops.depthwise_conv3x3 import depthwise_conv3x3
from .ops.modulated_layer_norm import modulated_layer_norm
from .ops.window_cross_attention import window_cross_attention

__all__ = [
    "BACKENDS",
    "BackendNotSupportedError",
    "available_backends",
    "channel_attention",
    "channel_attention_qkv",
    "depthwise_conv3x3",
    "modulated_layer_norm",
    "nn",
    "use_backend",
    "window_cross_attention",
]

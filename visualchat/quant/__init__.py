"""Weight-only quantization of the language backbone: FP6 e3m2, FP5 e2m2, FP4 e2m1, INT8, INT4
(group 128, asymmetric); bit packing; QuantLinear (CPU dequantize + matmul, fused Triton kernel
on CUDA); LoRC low-rank error correction; quantized checkpoints.

    from visualchat.quant import quantize_model
    report = quantize_model(vc.model, "fp6_e3m2", lorc_rank=8)
    vc.save_pretrained("out")   # VisualChat.from_pretrained("out") loads it back
"""

from visualchat.quant.formats import FORMAT_NAMES, FORMATS, FloatFormat, IntFormat, encode_float
from visualchat.quant.linear import QuantLinear
from visualchat.quant.lorc import lorc_factors
from visualchat.quant.model import (
    DEFAULT_SKIP,
    QuantizationReport,
    dequantized_weights,
    quant_config,
    quantize_model,
)
from visualchat.quant.packing import LAYOUTS, pack_codes, unpack_codes
from visualchat.quant.tensor import QuantizedTensor, quantize_tensor, sqnr_db

__all__ = [
    "DEFAULT_SKIP",
    "FORMAT_NAMES",
    "FORMATS",
    "LAYOUTS",
    "FloatFormat",
    "IntFormat",
    "QuantLinear",
    "QuantizationReport",
    "QuantizedTensor",
    "dequantized_weights",
    "encode_float",
    "lorc_factors",
    "pack_codes",
    "quant_config",
    "quantize_model",
    "quantize_tensor",
    "sqnr_db",
    "unpack_codes",
]

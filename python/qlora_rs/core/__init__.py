"""The core layer: the 4-bit format (:mod:`~qlora_rs.core.quant_state`), quantize/dequantize
(:mod:`~qlora_rs.core.functional`), the torch ops with their CPU (Rust), CUDA and pure-torch
implementations (:mod:`~qlora_rs.core.ops`, :mod:`~qlora_rs.core.cuda_ops`, their argument checks in
:mod:`~qlora_rs.core.op_args`, the memory the CPU ops reuse in :mod:`~qlora_rs.core.memory`) and the
autograd functions on top (:mod:`~qlora_rs.core.autograd`)."""

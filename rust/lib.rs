//! qlora-rs core: bitsandbytes-compatible 4-bit quantization with double quantization,
//! checkpoint conversion, CUDA kernel launches and a managed-memory page manager.
//!
//! The core knows nothing of Python; `python.rs` (feature `python`) is the thin PyO3 layer.

pub mod blockwise8;
pub mod calibrate;
pub mod codebook;
pub mod convert;
pub mod cpu_isa;
pub mod decode;
pub mod cuda;
pub mod dtype;
pub mod error;
pub mod matmul4;
pub mod gguf;
pub mod lora;
pub mod paging;
pub mod quant4;
pub mod reduce;
pub mod safetensors;
pub mod tensor_file;
pub mod threads;

#[cfg(feature = "python")]
mod python;

pub use blockwise8::{
    dequantize_blockwise_8bit, double_dequantize, double_quantize, quantize_blockwise_8bit, signed_dynamic_map,
    unsigned_dynamic_map, NESTED_BLOCKSIZE,
};
pub use dtype::{DType, FloatSlice, FloatSliceMut};
pub use error::{Error, Result};
pub use quant4::{dequantize_4bit, quantize_4bit, QuantType, BLOCKSIZES};

/// Version of the crate (and of the Python package).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Whether the CUDA kernels were compiled into this build (set by build.rs).
pub const CUDA_KERNELS: bool = cfg!(qlora_cuda_kernels);

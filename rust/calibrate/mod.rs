//! Calibrated 4-bit quantization: codes and block scales chosen to minimise a linear layer's
//! output error on real activations, stored in the unchanged bitsandbytes format.
//!
//! The format fixes only how a weight is decoded (`code[nibble] * absmax`, the absmax
//! double-quantized); which nibble each weight stores and which scale each block stores are free.
//! Round-to-nearest minimises each weight's own error. Here a layer `y = W x` with inputs whose
//! second moment is `H = XᵀX` (accumulated by the caller over calibration tokens) is quantized to
//! minimise `tr(ΔW H ΔWᵀ)`, the squared output error summed over those tokens:
//!
//! - [`factor`]: `H` -> damped, factored (`U` with `Uᵀ U = (H + λI)⁻¹`), once per distinct input
//!   (q/k/v projections share one; gate/up share one);
//! - [`sweep`]: GPTQ's column sweep on the 4-bit code table, each block's scale (sign included)
//!   chosen by [`scale`] as the sweep reaches the block, double quantization made exact;
//! - [`kernels`]: the inner loops, per instruction-set level, bit-identical across AVX2/AVX-512.
//!
//! The caller (the Python driver, `qlora_rs.calibrate`) runs the model one decoder block at a
//! time and supplies `H`; the result is written by the ordinary conversion (`convert`).

pub mod factor;
pub(crate) mod kernels;
pub mod scale;
pub mod sweep;

#[cfg(test)]
mod tests;

pub use factor::{HessianFactor, DEFAULT_DAMP};
pub use sweep::{calibrate_4bit, CalibrateOptions, Report, ScalesOut};

//! Checkpoint conversion: a float safetensors checkpoint (one file, or a model directory with
//! `model.safetensors` or a sharded `model.safetensors.index.json`) to a 4-bit checkpoint in
//! bitsandbytes' layout, which transformers + bitsandbytes load unchanged; and the inspection of
//! such checkpoints (sizes, and fidelity against the source). A GGUF model is another kind of source
//! ([`crate::gguf::GgufSource`], read through [`TensorFile`]): its tensors are decoded on demand to
//! the float tensors transformers loads from it, then follow the same pipeline.
//!
//! The conversion streams: inputs are memory-mapped, linear weights are quantized a window of
//! tensors at a time (rayon across and within tensors), results go straight to their final offset
//! in the output file, and the source pages of a finished window are dropped from the resident
//! set. Peak memory is therefore about one window (at least the largest tensor) plus its 4-bit
//! output, whatever the size of the model.
//!
//! The output appears atomically: everything is written into a hidden sibling of the
//! destination (`.<name>.tmp-<pid>`), flushed, and renamed into place at the end. Any error or a
//! cancellation from the progress callback removes the temporary; a killed process leaves only
//! that hidden temporary, which the next conversion to the same destination removes.
//!
//! The parts, in the order data flows through them: [`options`] and [`source`] (what to do, from what),
//! [`select`] and [`plan`] (which tensors, where in the output), [`execute`] (quantize and write),
//! [`staging`] (atomic output), [`json`] (Python-compatible JSON for the metadata), and
//! [`inspect`] / [`compare`] for reading the result back.

mod compare;
mod execute;
mod inspect;
mod json;
mod options;
mod plan;
mod select;
mod source;
mod staging;
#[cfg(test)]
mod tests;

pub use compare::*;
pub use execute::*;
pub use inspect::*;
pub use json::*;
pub use options::*;
pub use plan::*;
pub use select::*;
pub use source::*;
pub(crate) use staging::*;

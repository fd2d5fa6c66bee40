//! What a conversion is asked to do ([`ConvertOptions`]), the file names of a model directory, and
//! which weights GPT-2-style models store transposed (Conv1D).

use serde_json::Value;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::quant4::{self, QuantType};

/// File names of a transformers model directory.
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const CONFIG_FILE: &str = "config.json";

/// Key suffix of bitsandbytes' JSON quantization state: `<weight>.quant_state.bitsandbytes__nf4`.
pub const QUANT_STATE_PREFIX: &str = "quant_state.bitsandbytes__";

/// Smallest window of tensors quantized together (bytes of input).
pub(crate) const MIN_WINDOW_BYTES: u64 = 64 << 20;

/// Kept tensors are copied in pieces of this size so their pages can be released as they go.
pub(crate) const COPY_CHUNK: usize = 16 << 20;

/// Elements compared per task by [`compare`] (a multiple of every block size, and even).
pub(crate) const COMPARE_CHUNK: usize = 1 << 20;

/// Files of a model directory that hold weights in other formats: not copied to the output.
pub(crate) const OTHER_WEIGHT_EXTENSIONS: [&str; 10] = ["bin", "pt", "pth", "ckpt", "h5", "msgpack", "onnx", "gguf", "ot", "tflite"];

/// Model types whose linear layers are GPT-2 `Conv1D` modules (weights stored [in, out]).
pub(crate) const CONV1D_MODEL_TYPES: [&str; 4] = ["gpt2", "openai-gpt", "imagegpt", "decision_transformer"];

/// The `Conv1D` modules of those models (GPT-2's attention and MLP projections).
pub(crate) const CONV1D_MODULES: [&str; 4] = ["c_attn", "c_proj", "c_fc", "q_attn"];

/// Whether a checkpoint's config names a model type whose linear layers are `Conv1D`.
pub(crate) fn conv1d_model(config: Option<&serde_json::Map<String, Value>>) -> bool {
    config.and_then(|c| c.get("model_type")).and_then(Value::as_str).is_some_and(|mt| CONV1D_MODEL_TYPES.contains(&mt))
}

/// Whether tensor `name` of a `Conv1D` model is the [in, out] weight of a `Conv1D` module.
pub(crate) fn is_conv1d_weight(name: &str) -> bool {
    name.strip_suffix(".weight").and_then(|m| m.rsplit('.').next()).is_some_and(|m| CONV1D_MODULES.contains(&m))
}

/// Whether a rank-2 source tensor is stored [in, out] (a `Conv1D` weight of a `Conv1D` model), so
/// that its 4-bit form, [out, in], is its transpose.
pub(crate) fn stored_transposed(conv1d_model: bool, name: &str, shape: &[usize]) -> bool {
    conv1d_model && shape.len() == 2 && is_conv1d_weight(name)
}

/// Options of a conversion; the defaults are the QLoRA paper's (NF4, block size 64, double
/// quantization, bfloat16 compute).
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    pub quant_type: QuantType,
    pub blocksize: usize,
    pub double_quant: bool,
    /// Written to `quantization_config.bnb_4bit_compute_dtype`; does not change the stored data.
    pub compute_dtype: DType,
    /// Glob patterns on full tensor names. When given, exactly the rank-2 float tensors matching
    /// one of them are quantized (instead of the default selection of linear weights).
    pub include: Vec<String>,
    /// Glob patterns on full tensor names: matching tensors are kept as they are.
    pub exclude: Vec<String>,
    /// Threads for this conversion (default: the global pool, `QLORA_RS_NUM_THREADS` or all cores).
    pub threads: Option<usize>,
    /// Replace an existing destination.
    pub force: bool,
    /// Quantize weights holding NaN/inf (NaN encodes as 0, inf saturates) instead of failing.
    pub allow_nonfinite: bool,
    /// fsync the output before renaming it into place.
    pub sync: bool,
    /// For a GGUF source: the float type its tensors decode to (default bfloat16).
    pub dtype: Option<DType>,
    /// For a GGUF source: write the decoded float model, without quantizing anything.
    pub dequantize_only: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            quant_type: QuantType::Nf4,
            blocksize: 64,
            double_quant: true,
            compute_dtype: DType::BF16,
            include: Vec::new(),
            exclude: Vec::new(),
            threads: None,
            force: false,
            allow_nonfinite: false,
            sync: true,
            dtype: None,
            dequantize_only: false,
        }
    }
}

impl ConvertOptions {
    pub fn validate(&self) -> Result<()> {
        if self.quant_type == QuantType::Int4 {
            return Err(Error::unsupported(
                "quant_type \"int4\" has no bitsandbytes checkpoint format: expected \"nf4\" or \"fp4\"",
            ));
        }
        quant4::check_blocksize(self.blocksize)?;
        if self.threads == Some(0) {
            return Err(Error::unsupported("threads must be at least 1"));
        }
        if self.dequantize_only && !(self.include.is_empty() && self.exclude.is_empty()) {
            return Err(Error::unsupported("--dequantize-only quantizes nothing, so --include/--exclude do not apply"));
        }
        Ok(())
    }
}

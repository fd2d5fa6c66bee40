//! GGUF tensor names to transformers parameter names, and the un-permutation of llama's q/k
//! weights: what transformers' GGUF loader (`modeling_gguf_pytorch_utils.load_gguf_checkpoint`)
//! does for the architectures supported here.
//!
//! transformers maps a GGUF tensor only when the model it builds has that parameter (gguf-py's name
//! map applied to the model's state dict, for `block_count` layers); other tensors (llama.cpp's
//! `rope_freqs`, biases the model does not have, layers past `block_count`) are silently dropped,
//! and so they are here. llama.cpp stores llama's q and k rows with the two rotary halves of each
//! head interleaved; transformers undoes that with the head counts from the metadata.

use std::path::Path;

use super::{GgufFile, MetaValue};
use crate::error::{Error, Result};

/// Architectures (`general.architecture`) whose tensors this module maps.
pub const SUPPORTED_ARCHITECTURES: [&str; 3] = ["llama", "qwen2", "qwen3"];

/// Per-layer tensors shared by the supported architectures: GGUF name -> transformers name.
const LAYER_TENSORS: [(&str, &str); 9] = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

/// Qwen2's attention has q/k/v biases.
const QWEN2_LAYER_TENSORS: [(&str, &str); 3] = [
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
];

/// Qwen3 normalizes q and k per head.
const QWEN3_LAYER_TENSORS: [(&str, &str); 2] =
    [("attn_q_norm.weight", "self_attn.q_norm.weight"), ("attn_k_norm.weight", "self_attn.k_norm.weight")];

const GLOBAL_TENSORS: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// How one GGUF model's tensors become transformers tensors.
#[derive(Clone, Debug)]
pub struct NameMap {
    pub architecture: String,
    pub layers: u64,
    /// (attention heads, key/value heads) when llama's q/k rows are to be un-permuted.
    heads: Option<(usize, usize)>,
}

fn integer(path: &Path, file: &GgufFile, key: &str) -> Result<Option<u64>> {
    match file.get(key) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            Error::format(path, format!("metadata {key} is {v:?}; expected a non-negative integer"))
        }),
    }
}

impl NameMap {
    pub fn new(file: &GgufFile) -> Result<NameMap> {
        let path = file.path();
        let architecture = match file.get("general.architecture") {
            Some(MetaValue::String(a)) => a.clone(),
            Some(v) => return Err(Error::format(path, format!("general.architecture is {v:?}; expected a string"))),
            None => return Err(Error::format(path, "no general.architecture in the metadata; not a model file?")),
        };
        if !SUPPORTED_ARCHITECTURES.contains(&architecture.as_str()) {
            return Err(Error::unsupported(format!(
                "{}: architecture {architecture:?} is not supported; qlora-rs converts GGUF models of the architectures {}",
                path.display(),
                SUPPORTED_ARCHITECTURES.join(", ")
            )));
        }
        let layers = integer(path, file, &format!("{architecture}.block_count"))?
            .ok_or_else(|| Error::format(path, format!("no {architecture}.block_count in the metadata")))?;
        // transformers un-permutes only llama, and only when both head counts are known.
        let heads = if architecture == "llama" {
            let h = integer(path, file, "llama.attention.head_count")?;
            let kv = integer(path, file, "llama.attention.head_count_kv")?;
            match (h, kv) {
                (Some(0), _) | (_, Some(0)) => {
                    return Err(Error::format(path, "llama.attention.head_count(_kv) is 0; expected a positive head count"))
                }
                (Some(h), Some(kv)) => Some((h as usize, kv as usize)),
                _ => None,
            }
        } else {
            None
        };
        Ok(NameMap { architecture, layers, heads })
    }

    /// The transformers name of a GGUF tensor, or None if transformers drops it.
    pub fn hf_name(&self, gguf: &str) -> Option<String> {
        if let Some((_, hf)) = GLOBAL_TENSORS.iter().find(|(g, _)| *g == gguf) {
            return Some(hf.to_string());
        }
        let rest = gguf.strip_prefix("blk.")?;
        let (layer, tensor) = rest.split_once('.')?;
        // gguf-py's map names layers 0..block_count exactly as printed by `str(int)`.
        let n: u64 = layer.parse().ok().filter(|n: &u64| n.to_string() == layer && *n < self.layers)?;
        let extra: &[(&str, &str)] = match self.architecture.as_str() {
            "qwen2" => &QWEN2_LAYER_TENSORS,
            "qwen3" => &QWEN3_LAYER_TENSORS,
            _ => &[],
        };
        let (_, hf) = LAYER_TENSORS.iter().chain(extra).find(|(g, _)| *g == tensor)?;
        Some(format!("model.layers.{n}.{hf}"))
    }

    /// For a tensor whose rows transformers un-permutes: the number of head groups of that
    /// permutation (attention heads for q, key/value heads for k).
    pub fn unpermute_groups(&self, gguf: &str) -> Option<usize> {
        let (heads, kv_heads) = self.heads?;
        // The same substring test transformers' LlamaTensorProcessor applies.
        if gguf.contains(".attn_q.") {
            Some(heads)
        } else if gguf.contains(".attn_k.") {
            Some(kv_heads)
        } else {
            None
        }
    }
}

/// The stored row of output row `row` when `rows` rows in `groups` head groups are un-permuted:
/// llama.cpp stores head h's rows as (i, half) pairs, i.e. row h*2d + 2i + half, and transformers
/// orders them half-major, row h*2d + half*d + i (numpy: reshape(groups, d, 2, ...).swapaxes(1, 2)).
pub fn unpermuted_source_row(row: usize, rows: usize, groups: usize) -> usize {
    let d = rows / groups / 2;
    let (h, r) = (row / (2 * d), row % (2 * d));
    let (half, i) = (r / d, r % d);
    h * 2 * d + 2 * i + half
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermutation_matches_numpy_swapaxes() {
        // rows = groups * d * 2 with groups = 3, d = 2: numpy gives source order
        // [0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11].
        let rows = 12;
        let got: Vec<usize> = (0..rows).map(|r| unpermuted_source_row(r, rows, 3)).collect();
        assert_eq!(got, [0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11]);
    }

    #[test]
    fn names_follow_the_layer_count_and_architecture() {
        let m = NameMap { architecture: "llama".into(), layers: 2, heads: Some((4, 2)) };
        assert_eq!(m.hf_name("blk.1.attn_q.weight").as_deref(), Some("model.layers.1.self_attn.q_proj.weight"));
        assert_eq!(m.hf_name("token_embd.weight").as_deref(), Some("model.embed_tokens.weight"));
        assert_eq!(m.hf_name("blk.2.attn_q.weight"), None);
        assert_eq!(m.hf_name("blk.01.attn_q.weight"), None);
        assert_eq!(m.hf_name("blk.0.attn_q.bias"), None);
        assert_eq!(m.hf_name("rope_freqs.weight"), None);
        assert_eq!((m.unpermute_groups("blk.0.attn_q.weight"), m.unpermute_groups("blk.0.attn_k.weight")), (Some(4), Some(2)));
        assert_eq!(m.unpermute_groups("blk.0.attn_v.weight"), None);
        let q = NameMap { architecture: "qwen2".into(), layers: 1, heads: None };
        assert_eq!(q.hf_name("blk.0.attn_k.bias").as_deref(), Some("model.layers.0.self_attn.k_proj.bias"));
        assert_eq!(q.unpermute_groups("blk.0.attn_q.weight"), None);
    }
}

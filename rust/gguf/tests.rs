//! Hostile and well-formed headers, built byte by byte.

use std::path::PathBuf;

use super::*;

/// A GGUF file under construction: metadata and tensor infos are raw bytes, so that any field can
/// lie.
#[derive(Clone)]
struct Builder {
    version: u32,
    kv: Vec<u8>,
    kv_count: u64,
    infos: Vec<u8>,
    tensor_count: u64,
    data: Vec<u8>,
    alignment: usize,
}

fn string(buf: &mut Vec<u8>, s: &str) {
    buf.extend((s.len() as u64).to_le_bytes());
    buf.extend(s.as_bytes());
}

impl Builder {
    fn new() -> Builder {
        Builder::with_architecture("llama")
    }

    fn with_architecture(architecture: &str) -> Builder {
        let mut b = Builder { version: 3, kv: vec![], kv_count: 0, infos: vec![], tensor_count: 0, data: vec![], alignment: 32 };
        b.kv_str("general.architecture", architecture);
        b
    }

    fn kv_raw(&mut self, key: &str, vtype: u32, value: &[u8]) -> &mut Self {
        string(&mut self.kv, key);
        self.kv.extend(vtype.to_le_bytes());
        self.kv.extend(value);
        self.kv_count += 1;
        self
    }

    fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.kv_raw(key, 4, &v.to_le_bytes())
    }

    fn kv_str(&mut self, key: &str, v: &str) -> &mut Self {
        let mut value = vec![];
        string(&mut value, v);
        self.kv_raw(key, 8, &value)
    }

    fn info(&mut self, name: &str, dims: &[u64], type_id: u32, offset: u64) -> &mut Self {
        string(&mut self.infos, name);
        self.infos.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.infos.extend(d.to_le_bytes());
        }
        self.infos.extend(type_id.to_le_bytes());
        self.infos.extend(offset.to_le_bytes());
        self.tensor_count += 1;
        self
    }

    /// An F32 tensor of `values` appended at the next aligned offset.
    fn f32_tensor(&mut self, name: &str, dims: &[u64], values: &[f32]) -> &mut Self {
        let offset = self.data.len().div_ceil(self.alignment) * self.alignment;
        self.data.resize(offset, 0);
        self.data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        self.info(name, dims, 0, offset as u64)
    }

    fn bytes(&self) -> Vec<u8> {
        let mut v = b"GGUF".to_vec();
        v.extend(self.version.to_le_bytes());
        v.extend(self.tensor_count.to_le_bytes());
        v.extend(self.kv_count.to_le_bytes());
        v.extend(&self.kv);
        v.extend(&self.infos);
        v.resize(v.len().div_ceil(self.alignment) * self.alignment, 0);
        v.extend(&self.data);
        v
    }
}

struct Tmp(PathBuf);

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tmp(name: &str) -> Tmp {
    let dir = std::env::temp_dir().join(format!("qlora-rs-gguf-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Tmp(dir)
}

fn open_bytes(dir: &Tmp, bytes: &[u8]) -> Result<GgufFile> {
    let p = dir.0.join("m.gguf");
    std::fs::write(&p, bytes).unwrap();
    GgufFile::open(&p)
}

fn error(dir: &Tmp, bytes: &[u8]) -> String {
    match open_bytes(dir, bytes) {
        Ok(_) => panic!("expected an error"),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "one line: {msg}");
            assert!(msg.contains("m.gguf"), "names the file: {msg}");
            msg
        }
    }
}

fn good() -> Builder {
    let mut b = Builder::new();
    b.kv_u32("llama.block_count", 1);
    b.f32_tensor("blk.0.attn_norm.weight", &[4], &[1.0, 2.0, 3.0, 4.0]);
    b.f32_tensor("blk.0.ffn_up.weight", &[4, 2], &[0.5; 8]);
    b
}

#[test]
fn reads_a_valid_file() {
    let dir = tmp("valid");
    let f = open_bytes(&dir, &good().bytes()).unwrap();
    assert_eq!((f.version, f.alignment), (3, 32));
    assert_eq!(f.get("general.architecture").and_then(MetaValue::as_str), Some("llama"));
    let t = &f.tensors()[1];
    assert_eq!((t.shape(), t.nbytes, t.ggml_type.name), (vec![2, 4], 32, "F32"));
    assert_eq!(f.data(t), [0.5f32; 8].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>());
}

#[test]
fn truncated_files() {
    let dir = tmp("truncated");
    let full = good().bytes();
    assert!(error(&dir, &full[..10]).contains("too short"));
    // Cut inside the metadata, inside the tensor infos, and inside the data.
    for cut in [40, full.len() - 40, full.len() - 1] {
        let e = error(&dir, &full[..cut]);
        assert!(e.contains("truncated"), "{cut}: {e}");
    }
}

#[test]
fn magic_and_versions() {
    let dir = tmp("magic");
    let mut bytes = good().bytes();
    bytes[0] = b'X';
    assert!(error(&dir, &bytes).contains("not a GGUF file"));
    for (version, hint) in [(1u32, "version 1"), (3u32.swap_bytes(), "big-endian"), (7, "expected 2 or 3")] {
        let mut b = good();
        b.version = version;
        let e = error(&dir, &b.bytes());
        assert!(e.contains(hint), "{e}");
    }
    let mut b = good();
    b.version = 2;
    assert!(open_bytes(&dir, &b.bytes()).is_ok());
}

#[test]
fn lying_counts() {
    let dir = tmp("counts");
    for (kv, tensors) in [(u64::MAX, 2), (1_000_000, 2), (2, u64::MAX / 2), (2, 1 << 40)] {
        let mut b = good();
        b.kv_count = kv;
        b.tensor_count = tensors;
        let e = error(&dir, &b.bytes());
        assert!(e.contains("more than the remaining"), "{e}");
    }
    // One tensor more than listed: the data section is read as a tensor info.
    let mut b = good();
    b.tensor_count += 1;
    let e = error(&dir, &b.bytes());
    assert!(e.contains("tensor"), "{e}");
}

#[test]
fn huge_string_and_array_lengths() {
    let dir = tmp("lengths");
    let mut b = good();
    let mut value = u64::MAX.to_le_bytes().to_vec();
    value.extend(b"x");
    b.kv_raw("general.name", 8, &value);
    assert!(error(&dir, &b.bytes()).contains("has length 18446744073709551615"));
    let mut b = good();
    let mut value = 8u32.to_le_bytes().to_vec(); // array of strings
    value.extend((1u64 << 60).to_le_bytes());
    b.kv_raw("tokenizer.ggml.tokens", 9, &value);
    assert!(error(&dir, &b.bytes()).contains("declares 1152921504606846976 array elements"));
    // Nested arrays deeper than the limit.
    let mut b = good();
    let mut value = vec![];
    for _ in 0..8 {
        value.extend(9u32.to_le_bytes());
        value.extend(1u64.to_le_bytes());
    }
    b.kv_raw("x.nested", 9, &value);
    assert!(error(&dir, &b.bytes()).contains("nests arrays"));
    // A tensor name with a lying length.
    let mut b = good();
    b.tensor_count += 1;
    b.infos.extend((1u64 << 50).to_le_bytes());
    assert!(error(&dir, &b.bytes()).contains("has length"));
}

#[test]
fn bad_values() {
    let dir = tmp("values");
    let e = error(&dir, good().kv_raw("x.flag", 7, &[2]).bytes().as_slice());
    assert!(e.contains("bool stored as 2"), "{e}");
    let e = error(&dir, good().kv_raw("x.y", 13, &[0; 8]).bytes().as_slice());
    assert!(e.contains("unknown value type 13"), "{e}");
    let e = error(&dir, good().kv_u32("general.architecture", 1).bytes().as_slice());
    assert!(e.contains("appears twice"), "{e}");
    let mut value = vec![];
    string(&mut value, "ok");
    let mut b = good();
    b.kv_raw("\u{0}", 8, &value);
    let bad_key = b.bytes().windows(3).position(|w| w == [0, 8, 0]).unwrap();
    let mut bytes = b.bytes();
    bytes[bad_key] = 0xff; // the key byte becomes invalid UTF-8
    assert!(error(&dir, &bytes).contains("not valid UTF-8"));
    for a in [0u32, 24] {
        let e = error(&dir, good().kv_u32("general.alignment", a).bytes().as_slice());
        assert!(e.contains("power of two"), "{e}");
    }
}

#[test]
fn bad_tensor_infos() {
    let dir = tmp("infos");
    let e = error(&dir, good().info("t", &[32], 99, 0).bytes().as_slice());
    assert!(e.contains("unknown ggml type 99"), "{e}");
    let e = error(&dir, good().info("t", &[33], 2, 0).bytes().as_slice());
    assert!(e.contains("not a whole number of 32-element blocks"), "{e}");
    let e = error(&dir, good().info("t", &[4], 0, 8).bytes().as_slice());
    assert!(e.contains("not a multiple of the alignment 32"), "{e}");
    let e = error(&dir, good().info("t", &[4], 0, 1 << 20).bytes().as_slice());
    assert!(e.contains("goes beyond the end"), "{e}");
    let e = error(&dir, good().info("t", &[u64::MAX, 4], 0, 0).bytes().as_slice());
    assert!(e.contains("overflows"), "{e}");
    let e = error(&dir, good().info("t", &[], 0, 0).bytes().as_slice());
    assert!(e.contains("0 dimensions"), "{e}");
    let e = error(&dir, good().info("t", &[1, 1, 1, 1, 1], 0, 0).bytes().as_slice());
    assert!(e.contains("5 dimensions"), "{e}");
    let e = error(&dir, good().info("t", &[8], 0, 0).bytes().as_slice());
    assert!(e.contains("overlap"), "{e}");
    let e = error(&dir, good().info("blk.0.ffn_up.weight", &[4], 0, 64).bytes().as_slice());
    assert!(e.contains("listed twice"), "{e}");
}

#[test]
fn source_maps_names_and_checks_types() {
    let dir = tmp("source");
    let p = dir.0.join("m.gguf");
    let mut b = good();
    b.data.resize(64, 0);
    b.data.extend([0u8; 66]);
    b.info("rope_freqs.weight", &[256], 16, 64); // IQ2_XXS, but dropped: transformers does not load it
    std::fs::write(&p, b.bytes()).unwrap();
    let s = GgufSource::open(&p, crate::DType::BF16).unwrap();
    let names: Vec<_> = s.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["model.layers.0.input_layernorm.weight", "model.layers.0.mlp.up_proj.weight"]);
    assert_eq!(s.dropped(), ["rope_freqs.weight"]);
    let t = s.get("model.layers.0.mlp.up_proj.weight").unwrap();
    assert_eq!((t.shape.clone(), t.nbytes()), (vec![2, 4], 16));
    assert_eq!(s.decode_bytes(t, 2, 4).unwrap(), [half::bf16::from_f32(0.5).to_le_bytes(); 2].concat());

    let mut b = good();
    b.data.resize(64, 0);
    b.data.extend([0u8; 66]);
    b.info("blk.0.ffn_down.weight", &[256], 16, 64);
    std::fs::write(&p, b.bytes()).unwrap();
    let e = GgufSource::open(&p, crate::DType::BF16).unwrap_err().to_string();
    assert!(e.contains("\"blk.0.ffn_down.weight\" is stored as IQ2_XXS"), "{e}");

    std::fs::write(&p, Builder::with_architecture("gpt2").bytes()).unwrap();
    let e = GgufSource::open(&p, crate::DType::BF16).unwrap_err().to_string();
    assert!(e.contains("architecture \"gpt2\" is not supported"), "{e}");
    let mut b = Builder::new();
    b.kv_u32("llama.block_count", 1).kv_u32("llama.attention.head_count", 3).kv_u32("llama.attention.head_count_kv", 3);
    b.f32_tensor("blk.0.attn_q.weight", &[2, 4], &[0.0; 8]);
    std::fs::write(&p, b.bytes()).unwrap();
    let e = GgufSource::open(&p, crate::DType::BF16).unwrap_err().to_string();
    assert!(e.contains("4 rows, not a multiple of 2 x 3 heads"), "{e}");
}

#[test]
fn converts_through_the_safetensors_pipeline() {
    use crate::convert::{self, ConvertOptions};

    let dir = tmp("convert");
    let src = dir.0.join("m.gguf");
    let mut b = Builder::new();
    b.kv_u32("llama.block_count", 1).kv_u32("llama.attention.head_count", 2).kv_u32("llama.attention.head_count_kv", 2);
    let q: Vec<f32> = (0..8 * 64).map(|i| ((i * 37 % 101) as f32 - 50.0) / 100.0).collect();
    b.f32_tensor("blk.0.attn_q.weight", &[64, 8], &q);
    b.f32_tensor("output_norm.weight", &[4], &[1.0, 2.0, 3.0, 4.0]);
    std::fs::write(&src, b.bytes()).unwrap();

    let out = dir.0.join("q.safetensors");
    let s = convert::convert(&src, Some(&out), &ConvertOptions::default(), &mut |_| true).unwrap();
    assert_eq!((s.tensors_quantized, s.tensors_kept), (1, 1));
    let f = crate::safetensors::SafetensorsFile::open(&out).unwrap();
    // The packed weight is the core's quantization of the un-permuted bf16 rows.
    let rows = 8;
    let unpermuted: Vec<half::bf16> = (0..rows)
        .flat_map(|r| {
            let src = names::unpermuted_source_row(r, rows, 2);
            q[src * 64..(src + 1) * 64].iter().map(|&x| half::bf16::from_f32(x)).collect::<Vec<_>>()
        })
        .collect();
    let mut packed = vec![0u8; crate::quant4::packed_len(unpermuted.len())];
    let mut absmax = vec![0f32; crate::quant4::num_blocks(unpermuted.len(), 64)];
    crate::quant4::quantize_4bit(crate::FloatSlice::BF16(&unpermuted), crate::QuantType::Nf4, 64, false, &mut packed, &mut absmax)
        .unwrap();
    assert_eq!(f.data(f.get("model.layers.0.self_attn.q_proj.weight").unwrap()), &packed[..]);
    let norm = f.get("model.norm.weight").unwrap();
    assert_eq!(norm.dtype, crate::safetensors::TensorDtype::BF16);

    // Dequantize-only keeps everything, in the requested dtype; safetensors sources refuse it.
    let opts = ConvertOptions { dequantize_only: true, dtype: Some(crate::DType::F32), ..ConvertOptions::default() };
    let out = dir.0.join("f.safetensors");
    convert::convert(&src, Some(&out), &opts, &mut |_| true).unwrap();
    let f = crate::safetensors::SafetensorsFile::open(&out).unwrap();
    let w = f.get("model.layers.0.self_attn.q_proj.weight").unwrap();
    let got: Vec<f32> = f.data(w).chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(got[64..128], q[2 * 64..3 * 64]); // output row 1 is stored row 2 (d = 2)
    let e = convert::convert(&out, Some(&dir.0.join("x")), &opts, &mut |_| true).unwrap_err();
    assert!(e.to_string().contains("apply to GGUF sources"), "{e}");
}

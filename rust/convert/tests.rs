#![allow(unused_imports)] // the imports the tests shared with the single-file module

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;
use rayon::prelude::*;
use serde_json::{Map, Value};
use crate::blockwise8::{self, NESTED_BLOCKSIZE};
use crate::dtype::{DType, Element, FloatSlice, FloatSliceMut};
use crate::error::{Error, Result};
use crate::quant4::{self, QuantType};
use crate::safetensors::{Extent, SafetensorsFile, SafetensorsWriter, TensorDtype, TensorInfo, TensorSpec};
use crate::tensor_file::TensorFile;

use super::*;


#[test]
fn transpose_crosses_tile_edges() {
    let (rows, cols) = (37, 70); // not multiples of the 32-element tile
    let v: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
    let Floats::F32(t) = transpose(FloatSlice::F32(&v), rows, cols) else { panic!("f32 in, f32 out") };
    for r in 0..rows {
        for c in 0..cols {
            assert_eq!(t[c * rows + r], v[r * cols + c]);
        }
    }
}

#[test]
fn conv1d_weights_are_named_by_module() {
    assert!(is_conv1d_weight("transformer.h.0.attn.c_attn.weight"));
    assert!(is_conv1d_weight("transformer.h.11.mlp.c_proj.weight"));
    assert!(!is_conv1d_weight("transformer.h.0.attn.c_attn.bias"));
    assert!(!is_conv1d_weight("transformer.wte.weight"));
    assert!(!is_conv1d_weight("lm_head.weight"));
    let cfg = |mt: &str| serde_json::json!({ "model_type": mt }).as_object().cloned();
    assert!(conv1d_model(cfg("gpt2").as_ref()) && !conv1d_model(cfg("llama").as_ref()) && !conv1d_model(None));
}

#[test]
fn python_float_repr_matches_python() {
    // Expected strings are Python's json.dumps(float(np.float32(x))).
    let cases: [(f32, &str); 14] = [
        (0.051_332_474, "0.05133247375488281"),
        (0.1, "0.10000000149011612"),
        (1.0, "1.0"),
        (-2.5, "-2.5"),
        (0.0, "0.0"),
        (-0.0, "-0.0"),
        (1e-5, "9.999999747378752e-06"),
        (0.0001, "9.999999747378752e-05"),
        (0.00048828125, "0.00048828125"),
        (3.0517578e-5, "3.0517578125e-05"),
        (1e16, "1.0000000272564224e+16"),
        (123456.0, "123456.0"),
        (1.0e15, "999999986991104.0"),
        (f32::MIN_POSITIVE, "1.1754943508222875e-38"),
    ];
    for (x, want) in cases {
        assert_eq!(python_float_repr(x as f64), want, "{x:e}");
    }
    assert_eq!(python_float_repr(1e16), "1e+16");
    assert_eq!(python_float_repr(1234567890123456.0), "1234567890123456.0");
    assert_eq!(python_float_repr(1e-4), "0.0001");
    assert_eq!(python_float_repr(1e-5), "1e-05");
    assert_eq!(python_float_repr(1.5e300), "1.5e+300");
    assert_eq!(python_float_repr(f64::NAN), "NaN");
    assert_eq!(python_float_repr(f64::NEG_INFINITY), "-Infinity");
}

#[test]
fn quant_state_json_layout() {
    let j = quant_state_json(QuantType::Nf4, 64, DType::BF16, &[64, 128], Some(0.051_332_474));
    assert_eq!(
        j,
        "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [64, 128], \
         \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 0.05133247375488281}"
    );
    let j = quant_state_json(QuantType::Fp4, 128, DType::F32, &[3, 5], None);
    assert_eq!(j, "{\"quant_type\": \"fp4\", \"blocksize\": 128, \"dtype\": \"float32\", \"shape\": [3, 5]}");
}

#[test]
fn python_json_dumps_layout() {
    let v: Value = serde_json::from_str(
        r#"{"b": [1, 2.0, 1e-06, "é\n"], "a": {}, "c": [], "d": null, "e": {"y": true, "x": 6.0}}"#,
    )
    .unwrap();
    let want = "{\n  \"a\": {},\n  \"b\": [\n    1,\n    2.0,\n    1e-06,\n    \"\\u00e9\\n\"\n  ],\n  \"c\": [],\n  \
                \"d\": null,\n  \"e\": {\n    \"x\": 6.0,\n    \"y\": true\n  }\n}";
    assert_eq!(python_json_dumps(&v), want);
}

#[test]
fn glob() {
    assert!(glob_match("*.mlp.*", "model.layers.0.mlp.up_proj.weight"));
    assert!(!glob_match("*.mlp.*", "model.layers.0.self_attn.q_proj.weight"));
    assert!(glob_match("*q_proj*", "a.q_proj.weight"));
    assert!(glob_match("layers.[0-2].*", "layers.1.x"));
    assert!(!glob_match("layers.[!0-2].*", "layers.1.x"));
    assert!(glob_match("a?c", "abc"));
    assert!(!glob_match("a?c", "ac"));
    assert!(glob_match("lm_head.weight", "lm_head.weight"));
    assert!(!glob_match("lm_head", "lm_head.weight"));
    assert!(glob_match("*", ""));
    assert!(glob_match("a[b", "a[b"));
}

fn write_source(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    let specs = tensors
        .iter()
        .map(|(n, shape, _)| TensorSpec { name: n.to_string(), dtype: TensorDtype::BF16, extent: Extent::Shape(shape.clone()) })
        .collect();
    let mut w = SafetensorsWriter::create(path, vec![("format".into(), "pt".into())], specs).unwrap();
    for (n, _, v) in tensors {
        let bytes: Vec<u8> = v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect();
        w.write(n, &bytes).unwrap();
    }
    w.finish(false).unwrap();
}

#[test]
fn convert_inspect_compare_end_to_end() {
    let dir = std::env::temp_dir().join(format!("qlora-rs-convert-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let src = dir.join("src.safetensors");
    let w: Vec<f32> = (0..48 * 70).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.05).collect();
    write_source(
        &src,
        &[("l.weight", vec![48, 70], w.clone()), ("l.bias", vec![48], vec![0.5; 48]), ("emb.embed_tokens.weight", vec![4, 8], vec![1.0; 32])],
    );
    let dst = dir.join("out");
    let mut calls = 0;
    let s = convert(&src, Some(&dst), &ConvertOptions::default(), &mut |_| {
        calls += 1;
        true
    })
    .unwrap();
    assert_eq!((s.tensors_quantized, s.tensors_kept, calls), (1, 2, 3));
    let out = SafetensorsFile::open(&dst.join(SINGLE_FILE)).unwrap();
    // The packed weight is what the core produces for the same bf16 values.
    let bf: Vec<half::bf16> = w.iter().map(|&x| half::bf16::from_f32(x)).collect();
    let mut packed = vec![0u8; quant4::packed_len(w.len())];
    let mut absmax = vec![0f32; quant4::num_blocks(w.len(), 64)];
    quant4::quantize_4bit(FloatSlice::BF16(&bf), QuantType::Nf4, 64, false, &mut packed, &mut absmax).unwrap();
    assert_eq!(out.data(out.get("l.weight").unwrap()), &packed[..]);
    assert_eq!(out.get("l.weight.absmax").unwrap().dtype, TensorDtype::U8);
    let json = out.data(out.get("l.weight.quant_state.bitsandbytes__nf4").unwrap());
    assert!(std::str::from_utf8(json).unwrap().starts_with("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [48, 70]"));

    let rows = inspect(&dst).unwrap();
    let q = rows.iter().find(|r| r.name == "l.weight").unwrap();
    assert_eq!((q.shape.clone(), q.numel), (vec![48, 70], 48 * 70));
    assert!(q.quant.as_ref().unwrap().nested_offset.is_some());
    let cmp = compare(&dst, &src, &mut |_| true).unwrap();
    let c = cmp.iter().find(|r| r.name == "l.weight").unwrap();
    let sqnr = 10.0 * (c.signal / c.noise).log10();
    assert!(c.status == "quantized" && sqnr > 15.0 && sqnr < 30.0, "{sqnr}");
    assert_eq!(cmp.iter().find(|r| r.name == "l.bias").unwrap().status, "identical");

    // An existing destination is an error unless forced; a cancelled run leaves nothing.
    let e = convert(&src, Some(&dst), &ConvertOptions::default(), &mut |_| true).unwrap_err();
    assert!(matches!(e, Error::Exists { .. }));
    let forced = ConvertOptions { force: true, ..ConvertOptions::default() };
    let e = convert(&src, Some(&dir.join("cancelled")), &forced, &mut |_| false).unwrap_err();
    assert!(e.to_string().contains("interrupted"));
    let left: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 2, "{left:?}");

    // A NaN names the file and the tensor.
    let mut bad = w.clone();
    bad[100] = f32::NAN;
    let nan_src = dir.join("nan.safetensors");
    write_source(&nan_src, &[("x.weight", vec![48, 70], bad)]);
    let e = convert(&nan_src, Some(&dir.join("nan-out")), &ConvertOptions::default(), &mut |_| true).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("nan.safetensors") && msg.contains("\"x.weight\"") && msg.contains("flat index 100"), "{msg}");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn default_selection() {
    let t = |name: &str, shape: Vec<usize>, dtype| TensorInfo { name: name.into(), dtype, shape, begin: 0, end: 0 };
    let none = Globs::default();
    let q = |t: &TensorInfo| decide(t, &none, &none).0;
    assert!(q(&t("model.layers.0.self_attn.q_proj.weight", vec![8, 8], TensorDtype::BF16)));
    assert!(q(&t("pooler.dense.weight", vec![8, 8], TensorDtype::F32)));
    assert!(!q(&t("model.embed_tokens.weight", vec![8, 8], TensorDtype::BF16)));
    assert!(!q(&t("embeddings.word_embeddings.weight", vec![8, 8], TensorDtype::F32)));
    assert!(!q(&t("lm_head.weight", vec![8, 8], TensorDtype::BF16)));
    assert!(!q(&t("model.norm.weight", vec![8], TensorDtype::BF16)));
    assert!(!q(&t("x.dense.bias", vec![8], TensorDtype::F32)));
    assert!(!q(&t("x.dense.weight", vec![8, 8], TensorDtype::I64)));
    assert!(!q(&t("x.conv.weight", vec![8, 8, 3, 3], TensorDtype::F32)));
    let inc = Globs::new(&["lm_head.weight".to_string()], "--include").unwrap();
    assert!(decide(&t("lm_head.weight", vec![8, 8], TensorDtype::BF16), &inc, &none).0);
    assert!(!decide(&t("a.q_proj.weight", vec![8, 8], TensorDtype::BF16), &inc, &none).0);
}

#[test]
fn glob_keeps_its_semantics_on_globset() {
    assert!(!glob_match("layers.[^0-2].*", "layers.1.x"));
    assert!(glob_match("layers.[^0-2].*", "layers.7.x"));
    assert!(glob_match("a{b,c}", "a{b,c}"));
    assert!(!glob_match("a{b,c}", "ab"));
    assert!(glob_match("a\\b", "a\\b"));
    assert!(glob_match("*[b", "xa[b"));
    assert!(glob_match("[]]x", "]x"));
    assert!(glob_match("a[{]", "a{"));
    let g = Globs::new(&["*.mlp.*".to_string(), "lm_head.weight".to_string()], "--include").unwrap();
    assert_eq!(g.first_match("lm_head.weight"), Some("lm_head.weight"));
    assert_eq!(g.first_match("a.mlp.b"), Some("*.mlp.*"));
    assert_eq!(g.first_match("a.attn.b"), None);
}

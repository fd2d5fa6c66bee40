//! The CUDA header `cuda/codebook.cuh` compiled for the CPU agrees bit for bit with the Rust core:
//! the three 4-bit tables, the double-quant scale decode for all 256 codes, the element decode
//! `code * absmax` and its float16/bfloat16 rounding -- so the kernels, which use the same header,
//! decode exactly what `qlora_rs::dequantize_4bit` decodes.
//!
//! The test builds a small C++ program around the header with the system C++ compiler (`$CXX`,
//! `c++`, `g++` or `clang++`; the same host compiler nvcc needs) and feeds it inputs through files.

use std::path::{Path, PathBuf};
use std::process::Command;

use half::{bf16, f16};
use qlora_rs::codebook::{FP4_CODE, INT4_CODE, NF4_CODE};
use qlora_rs::{dequantize_4bit, double_dequantize, signed_dynamic_map, FloatSliceMut, QuantType};

const SHIM: &str = r#"
#include "codebook.cuh"
#include <cstdio>
#include <cstdlib>
#include <vector>

template <typename T> static std::vector<T> read_all(const char* path) {
  std::vector<T> v;
  FILE* f = std::fopen(path, "rb");
  if (!f) { std::perror(path); std::exit(2); }
  T x;
  while (std::fread(&x, sizeof(T), 1, f) == 1) v.push_back(x);
  std::fclose(f);
  return v;
}

template <typename T> static void write_all(const char* path, const std::vector<T>& v) {
  FILE* f = std::fopen(path, "wb");
  if (!f) { std::perror(path); std::exit(2); }
  if (!v.empty() && std::fwrite(v.data(), sizeof(T), v.size(), f) != v.size()) std::exit(3);
  std::fclose(f);
}

struct Nested { float code; float nested; float offset; };
struct Element { int quant_type; unsigned nibble; float absmax; };
struct Decoded { float value; uint16_t bf16; uint16_t f16; };
struct Rounded { uint16_t bf16; uint16_t f16; };

int main(int argc, char** argv) {
  if (argc != 8) return 1;
  std::vector<float> tables;
  for (int qt = 0; qt < 3; ++qt)
    for (unsigned i = 0; i < 16; ++i) tables.push_back(qlora::code4_value(qt, i));
  write_all(argv[1], tables);

  std::vector<float> scales;
  for (const Nested& n : read_all<Nested>(argv[2]))
    scales.push_back(qlora::decode_nested_absmax(n.code, n.nested, n.offset));
  write_all(argv[3], scales);

  std::vector<Decoded> decoded;
  for (const Element& e : read_all<Element>(argv[4])) {
    const float v = qlora::decode_value(e.quant_type, e.nibble, e.absmax);
    decoded.push_back(Decoded{v, qlora::f32_to_bf16_bits(v), qlora::f32_to_f16_bits(v)});
  }
  write_all(argv[5], decoded);

  std::vector<Rounded> rounded;
  for (float x : read_all<float>(argv[6]))
    rounded.push_back(Rounded{qlora::f32_to_bf16_bits(x), qlora::f32_to_f16_bits(x)});
  write_all(argv[7], rounded);
  return 0;
}
"#;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn work_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("codebook_header");
    std::fs::create_dir_all(&d).expect("create test work dir");
    d
}

fn compilers() -> Vec<String> {
    let mut v: Vec<String> = std::env::var("CXX").ok().filter(|s| !s.is_empty()).into_iter().collect();
    v.extend(["c++", "g++", "clang++"].map(String::from));
    v
}

/// Compiles the shim once per test process; panics with the compiler's output when it fails.
fn shim() -> PathBuf {
    static EXE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    EXE.get_or_init(|| {
        let dir = work_dir();
        let src = dir.join("shim.cpp");
        std::fs::write(&src, SHIM).expect("write shim");
        let exe = dir.join("shim");
        let mut tried = Vec::new();
        for cxx in compilers() {
            let out = Command::new(&cxx)
                .args(["-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wextra", "-I"])
                .arg(root().join("cuda"))
                .arg(&src)
                .arg("-o")
                .arg(&exe)
                .output();
            match out {
                Ok(o) if o.status.success() => {
                    let warnings = String::from_utf8_lossy(&o.stderr);
                    assert!(warnings.trim().is_empty(), "{cxx} warns on cuda/codebook.cuh:\n{warnings}");
                    return exe;
                }
                Ok(o) => panic!("{cxx} failed on cuda/codebook.cuh:\n{}", String::from_utf8_lossy(&o.stderr)),
                Err(e) => tried.push(format!("{cxx}: {e}")),
            }
        }
        panic!("no C++ compiler found to build the header test (set CXX): {}", tried.join("; "));
    })
    .clone()
}

fn write_bytes(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("write input");
}

fn read_u32s(path: &Path) -> Vec<u32> {
    let b = std::fs::read(path).expect("read output");
    b.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// A deterministic xorshift generator (no rand dependency).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn bits32(&mut self) -> u32 {
        (self.next() >> 16) as u32
    }
}

struct Run {
    tables: Vec<u32>,
    scales: Vec<u32>,
    decoded: Vec<(u32, u16, u16)>,
    rounded: Vec<(u16, u16)>,
}

/// Runs the shim on nested-scale inputs (code, nested, offset), element inputs (qt, nibble,
/// absmax) and raw floats to round.
fn run(tag: &str, nested: &[(f32, f32, f32)], elements: &[(i32, u32, f32)], floats: &[f32]) -> Run {
    let dir = work_dir();
    let p = |name: &str| dir.join(format!("{tag}_{name}.bin"));
    let mut nb = Vec::new();
    for (c, n, o) in nested {
        for v in [c, n, o] {
            nb.extend_from_slice(&v.to_le_bytes());
        }
    }
    write_bytes(&p("nested"), &nb);
    let mut eb = Vec::new();
    for (qt, nib, am) in elements {
        eb.extend_from_slice(&qt.to_le_bytes());
        eb.extend_from_slice(&nib.to_le_bytes());
        eb.extend_from_slice(&am.to_le_bytes());
    }
    write_bytes(&p("elements"), &eb);
    let fb: Vec<u8> = floats.iter().flat_map(|f| f.to_le_bytes()).collect();
    write_bytes(&p("floats"), &fb);
    let status = Command::new(shim())
        .arg(p("tables"))
        .arg(p("nested"))
        .arg(p("scales"))
        .arg(p("elements"))
        .arg(p("decoded"))
        .arg(p("floats"))
        .arg(p("rounded"))
        .status()
        .expect("run shim");
    assert!(status.success(), "shim failed: {status}");
    let dec = std::fs::read(p("decoded")).unwrap();
    let decoded = dec
        .chunks_exact(8)
        .map(|c| {
            (
                u32::from_le_bytes(c[0..4].try_into().unwrap()),
                u16::from_le_bytes(c[4..6].try_into().unwrap()),
                u16::from_le_bytes(c[6..8].try_into().unwrap()),
            )
        })
        .collect();
    let rnd = std::fs::read(p("rounded")).unwrap();
    let rounded = rnd
        .chunks_exact(4)
        .map(|c| (u16::from_le_bytes(c[0..2].try_into().unwrap()), u16::from_le_bytes(c[2..4].try_into().unwrap())))
        .collect();
    Run { tables: read_u32s(&p("tables")), scales: read_u32s(&p("scales")), decoded, rounded }
}

const QUANT_TYPES: [(QuantType, i32); 3] = [(QuantType::Nf4, 0), (QuantType::Fp4, 1), (QuantType::Int4, 2)];

#[test]
fn tables_equal_the_rust_codebook() {
    let r = run("tables", &[], &[], &[]);
    let rust: Vec<u32> = [NF4_CODE, FP4_CODE, INT4_CODE].iter().flat_map(|t| t.iter().map(|v| v.to_bits())).collect();
    assert_eq!(r.tables.len(), 48);
    for (i, (h, r)) in r.tables.iter().zip(&rust).enumerate() {
        assert_eq!(
            h,
            r,
            "table {} nibble {}: header {:e} vs rust {:e}",
            i / 16,
            i % 16,
            f32::from_bits(*h),
            f32::from_bits(*r)
        );
    }
    // QuantType::code() is what the core decodes with.
    for (qt, idx) in QUANT_TYPES {
        let bits: Vec<u32> = qt.code().iter().map(|v| v.to_bits()).collect();
        assert_eq!(&r.tables[idx as usize * 16..idx as usize * 16 + 16], &bits[..], "{qt:?}");
    }
}

#[test]
fn double_quant_scale_decode_equals_double_dequantize() {
    let map = signed_dynamic_map();
    let nested_values = [1.0f32, 0.0, 0.5, 3.0517578e-5, 0.037109375, 1.7e-3, 12.5, 1e-30, 6.1e4];
    let offsets = [0.0f32, 0.0123, 1.0, 0.2875, 1e-7, 3.5e3];
    let codes: Vec<u8> = (0..=255).collect();
    let mut inputs = Vec::new();
    let mut expected = Vec::new();
    for &nested in &nested_values {
        for &offset in &offsets {
            let mut out = [0f32; 256];
            double_dequantize(&codes, &[nested], offset, &map, &mut out).unwrap();
            for (q, o) in out.iter().enumerate() {
                inputs.push((map[q], nested, offset));
                expected.push(o.to_bits());
            }
        }
    }
    let r = run("nested", &inputs, &[], &[]);
    assert_eq!(r.scales.len(), expected.len());
    for (i, (h, e)) in r.scales.iter().zip(&expected).enumerate() {
        let (c, n, o) = inputs[i];
        assert_eq!(
            h,
            e,
            "code {c:e} * nested {n:e} + offset {o:e}: header {:e} vs rust {:e}",
            f32::from_bits(*h),
            f32::from_bits(*e)
        );
    }
}

/// Block scales covering the range a checkpoint can hold, plus awkward values.
fn absmax_samples() -> Vec<f32> {
    let mut v = vec![
        0.0,
        1e-38,
        1.1754944e-38,
        1e-45,
        5.9604645e-8,
        6.1035156e-5,
        1e-3,
        0.0123,
        0.5,
        1.0,
        1.5,
        7.0,
        12.0,
        65504.0,
        65520.0,
        7e4,
        1e10,
        3.4028235e38,
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    while v.len() < 4000 {
        // Positive finite floats with a uniformly random exponent in a wide range.
        let bits = rng.bits32() & 0x7fff_ffff;
        let f = f32::from_bits(bits);
        if f.is_finite() && f > 1e-30 && f < 1e30 {
            v.push(f);
        }
    }
    v
}

#[test]
fn element_decode_and_rounding_equal_dequantize_4bit() {
    let absmax = absmax_samples();
    // One block of 32 elements per absmax: nibbles 0..15 twice, high nibble first.
    let packed_block: Vec<u8> = (0..16u8).map(|j| ((2 * j) % 16) << 4 | ((2 * j + 1) % 16)).collect();
    let packed: Vec<u8> = absmax.iter().flat_map(|_| packed_block.iter().copied()).collect();
    let n = absmax.len() * 32;

    let mut elements = Vec::with_capacity(3 * n);
    for (_, idx) in QUANT_TYPES {
        for &am in &absmax {
            for e in 0..32u32 {
                elements.push((idx, e % 16, am));
            }
        }
    }
    let r = run("elements", &[], &elements, &[]);
    assert_eq!(r.decoded.len(), 3 * n);

    for (t, (qt, _)) in QUANT_TYPES.iter().enumerate() {
        let mut f32_out = vec![0f32; n];
        let mut f16_out = vec![f16::ZERO; n];
        let mut bf16_out = vec![bf16::ZERO; n];
        dequantize_4bit(&packed, &absmax, *qt, 32, FloatSliceMut::F32(&mut f32_out)).unwrap();
        dequantize_4bit(&packed, &absmax, *qt, 32, FloatSliceMut::F16(&mut f16_out)).unwrap();
        dequantize_4bit(&packed, &absmax, *qt, 32, FloatSliceMut::BF16(&mut bf16_out)).unwrap();
        for i in 0..n {
            let (value, hb, hh) = r.decoded[t * n + i];
            let ctx = || format!("{qt:?} nibble {} absmax {:e}", i % 16, absmax[i / 32]);
            assert_eq!(value, f32_out[i].to_bits(), "float32 {}", ctx());
            assert_eq!(hb, bf16_out[i].to_bits(), "bfloat16 {}", ctx());
            assert_eq!(hh, f16_out[i].to_bits(), "float16 {}", ctx());
        }
    }
}

#[test]
fn float16_and_bfloat16_rounding_equal_the_half_crate() {
    let mut floats: Vec<f32> = Vec::new();
    // Every float16 and bfloat16 value, and the exact midpoints (ties) between neighbours and their
    // immediate neighbours in float32: where round-to-nearest-even decides.
    for h in 0..=u16::MAX {
        let a = f16::from_bits(h).to_f32();
        let b = f16::from_bits(h.wrapping_add(1)).to_f32();
        floats.push(a);
        if a.is_finite() && b.is_finite() {
            let mid = ((a as f64 + b as f64) / 2.0) as f32;
            floats.extend([
                mid,
                f32::from_bits(mid.to_bits().wrapping_add(1)),
                f32::from_bits(mid.to_bits().wrapping_sub(1)),
            ]);
        }
        let c = bf16::from_bits(h).to_f32();
        floats.push(c);
        floats.push(f32::from_bits(c.to_bits() | 0x8000));
        floats.push(f32::from_bits(c.to_bits() | 0x8001));
        floats.push(f32::from_bits(c.to_bits() | 0x7fff));
    }
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    for _ in 0..500_000 {
        floats.push(f32::from_bits(rng.bits32()));
    }
    floats.extend([
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7f80_0001),
        65519.996,
        65520.0,
        -65520.0,
    ]);

    let r = run("rounding", &[], &[], &floats);
    assert_eq!(r.rounded.len(), floats.len());
    for (x, (hb, hh)) in floats.iter().zip(&r.rounded) {
        assert_eq!(*hb, bf16::from_f32(*x).to_bits(), "bfloat16 of {x:e} ({:#010x})", x.to_bits());
        assert_eq!(*hh, f16::from_f32(*x).to_bits(), "float16 of {x:e} ({:#010x})", x.to_bits());
    }
}

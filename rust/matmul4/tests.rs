use half::{bf16, f16};

use super::*;
use crate::blockwise8::{double_quantize, nested_blocks, signed_dynamic_map};
use crate::quant4::{dequantize_4bit_with, quantize_4bit};

/// [`gemm_4bit_on`] of one weight with the choice of the bf16 products made here.
fn gemm_4bit_with(
    x: FloatSlice<'_>,
    m: usize,
    w: &Weight4<'_>,
    out: FloatSliceMut<'_>,
    isa: Isa,
    host: Host,
    bf16_products: bool,
) -> Result<()> {
    gemm_4bit_group_with(x, m, std::slice::from_ref(w), vec![out], isa, host, bf16_products)
}

/// A deterministic pseudo-random sequence in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

struct Quantized {
    packed: Vec<u8>,
    absmax: Vec<f32>,
    codes: Vec<u8>,
    nested: Vec<f32>,
    offset: f32,
    map: [f32; 256],
}

impl Quantized {
    fn new(w: &[f32], qt: QuantType, bs: usize) -> Self {
        let n = w.len();
        let mut packed = vec![0u8; packed_len(n)];
        let mut absmax = vec![0f32; num_blocks(n, bs)];
        quantize_4bit(FloatSlice::F32(w), qt, bs, false, &mut packed, &mut absmax).unwrap();
        let mut codes = vec![0u8; absmax.len()];
        let mut nested = vec![0f32; nested_blocks(absmax.len())];
        let offset = double_quantize(&absmax, &mut codes, &mut nested).unwrap();
        Quantized { packed, absmax, codes, nested, offset, map: signed_dynamic_map() }
    }

    fn scales(&self, double: bool) -> BlockScales<'_> {
        if double {
            BlockScales::Double { codes: &self.codes, nested_absmax: &self.nested, nested_map: &self.map, offset: self.offset }
        } else {
            BlockScales::F32(&self.absmax)
        }
    }
}

const TYPES: [QuantType; 3] = [QuantType::Nf4, QuantType::Fp4, QuantType::Int4];

/// The decoded weight as float32 (portable decode: `code * scale`, one rounding).
fn decoded(q: &Quantized, double: bool, qt: QuantType, bs: usize, n: usize) -> Vec<f32> {
    let mut w = vec![0f32; n];
    dequantize_4bit_with(&q.packed, q.scales(double), qt, bs, FloatSliceMut::F32(&mut w), Isa::Portable).unwrap();
    w
}

/// `x @ w^T` in float64 from the float32 decode, and the sum of |x| |w| per output (the scale
/// of float32 accumulation error).
fn reference(x: &[f32], w: &[f32], m: usize, rows: usize, cols: usize) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0f64; m * rows];
    let mut mag = vec![0f64; m * rows];
    for i in 0..m {
        for r in 0..rows {
            for c in 0..cols {
                let p = x[i * cols + c] as f64 * w[r * cols + c] as f64;
                y[i * rows + r] += p;
                mag[i * rows + r] += p.abs();
            }
        }
    }
    (y, mag)
}

fn run_gemm(isa: Isa, x: &[f32], m: usize, w: &Weight4<'_>) -> Vec<f32> {
    let mut out = vec![f32::NAN; m * w.rows];
    gemm_4bit(FloatSlice::F32(x), m, w, FloatSliceMut::F32(&mut out), isa).unwrap();
    out
}

/// Asserts that each output is within float32 summation error of [`reference`]'s (`want`, with
/// `mag` its sums of |x| |w|) for products of `cols` terms (a few units of 2^-24 per term), plus
/// `slack`; `what` names the case in the message.
fn assert_near_reference(got: &[f32], (want, mag): &(Vec<f64>, Vec<f64>), cols: usize, slack: f64, what: &dyn Fn() -> String) {
    for (o, ((g, w), s)) in got.iter().zip(want).zip(mag).enumerate() {
        let tol = s * cols as f64 * 2f64.powi(-23) + slack;
        assert!((*g as f64 - w).abs() <= tol, "{} out {o}: {g} vs {w}", what());
    }
}

/// Every level against the float64 reference: each type, with and without double quantization,
/// rows that are and are not multiples of 32 (odd lengths, rows starting mid-byte and mid-block),
/// partial last blocks, tiles with leftover rows, 1..16 activation rows.
#[test]
fn every_level_matches_the_reference() {
    // Rows of 192 and 320 columns start inside a 256-block; (5, ..) and (6, ..) end on a pass of
    // one and of two activation rows; in (1, 90, 192) at blocks of 32 the 16 double-quantized
    // scales of a tile straddle two nested groups of 256 (rows 84..88: blocks 504..528).
    let shapes = [
        (1, 90, 192),
        (1, 32, 32),
        (1, 9, 192),
        (1, 7, 320),
        (1, 3, 4096),
        (2, 5, 320),
        (6, 4, 192),
        (3, 64, 64),
        (5, 96, 64),
        (7, 33, 7),
        (9, 31, 65),
        (16, 17, 128),
        (2, 6, 4096),
        (4, 13, 160),
    ];
    for (case, &(m, rows, cols)) in shapes.iter().enumerate() {
        for (t, &qt) in TYPES.iter().enumerate() {
            for bs in [32, 64, 256] {
                let w = noise(rows * cols, (case * 31 + t * 7 + bs) as u64);
                let x = noise(m * cols, case as u64 + 1000);
                let q = Quantized::new(&w, qt, bs);
                for double in [false, true] {
                    let wd = decoded(&q, double, qt, bs, rows * cols);
                    let want = reference(&x, &wd, m, rows, cols);
                    let weight = Weight4 { packed: &q.packed, scales: q.scales(double), quant_type: qt, blocksize: bs, rows, cols };
                    for isa in Isa::available() {
                        let got = run_gemm(isa, &x, m, &weight);
                        assert_near_reference(&got, &want, cols, 1e-30, &|| {
                            format!("{isa:?} {qt:?} bs={bs} double={double} [{m}x{cols}]@[{rows}x{cols}]^T")
                        });
                    }
                }
            }
        }
    }
}

/// Inputs and outputs in each float type: the input converts exactly to float32, the output
/// rounds once.
#[test]
fn half_precision_in_and_out_round_once() {
    let (m, rows, cols, bs) = (3, 40, 96, 64);
    let q = Quantized::new(&noise(rows * cols, 5), QuantType::Nf4, bs);
    let w = Weight4 { packed: &q.packed, scales: q.scales(true), quant_type: QuantType::Nf4, blocksize: bs, rows, cols };
    let x32 = noise(m * cols, 6);
    let xb: Vec<bf16> = x32.iter().map(|&v| bf16::from_f32(v)).collect();
    let xh: Vec<f16> = x32.iter().map(|&v| f16::from_f32(v)).collect();
    for isa in Isa::available() {
        let mut yb = vec![bf16::ZERO; m * rows];
        // Not the bfloat16 weight's products (see the next test), which AVX512-BF16 may choose.
        gemm_4bit_with(FloatSlice::BF16(&xb), m, &w, FloatSliceMut::BF16(&mut yb), isa, Host::Native, false).unwrap();
        let xbf: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
        let want = run_gemm(isa, &xbf, m, &w);
        assert_eq!(yb, want.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>(), "{isa:?} bf16");
        let mut yh = vec![f16::ZERO; m * rows];
        gemm_4bit(FloatSlice::F16(&xh), m, &w, FloatSliceMut::F16(&mut yh), isa).unwrap();
        let xhf: Vec<f32> = xh.iter().map(|v| v.to_f32()).collect();
        let want = run_gemm(isa, &xhf, m, &w);
        assert_eq!(yh, want.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>(), "{isa:?} f16");
    }
}

/// bfloat16 activations on [`Isa::Avx512Bf16`] with [`crate::cpu_isa::bf16_products`] multiply
/// the weight rounded to bfloat16 (the dequantized weight of the larger products): `vdpbf16ps` where rows are whole 64-groups in
/// blocks of at least 64, the float32 kernel on the rounded weight elsewhere (odd numbers of
/// 32-groups, blocks of 32) and the portable one on rows of other lengths; each against the
/// float64 sum of the same values, in every pass shape (1..6 activation rows, tiles with leftover
/// rows, rows starting inside a block).
#[test]
fn bf16_activations_on_avx512bf16_multiply_the_bf16_weight() {
    if !Isa::Avx512Bf16.is_supported() {
        eprintln!("skipped: this CPU lacks AVX512-BF16");
        return;
    }
    let shapes = [(1, 9, 64), (1, 7, 320), (2, 13, 4096), (3, 8, 192), (4, 6, 256), (5, 11, 96), (6, 5, 128), (3, 7, 77)];
    let mut rounding_seen = false;
    for (case, &(m, rows, cols)) in shapes.iter().enumerate() {
        for (t, &qt) in TYPES.iter().enumerate() {
            for bs in [32, 64, 256] {
                let q = Quantized::new(&noise(rows * cols, (case * 13 + t * 5 + bs) as u64), qt, bs);
                let xb: Vec<bf16> = noise(m * cols, case as u64 + 77).iter().map(|&v| bf16::from_f32(v)).collect();
                let x: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
                for double in [false, true] {
                    let wd = decoded(&q, double, qt, bs, rows * cols);
                    let wb: Vec<f32> = wd.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
                    let want = reference(&x, &wb, m, rows, cols);
                    let weight = Weight4 { packed: &q.packed, scales: q.scales(double), quant_type: qt, blocksize: bs, rows, cols };
                    let mut got = vec![f32::NAN; m * rows];
                    let (xs, out) = (FloatSlice::BF16(&xb), FloatSliceMut::F32(&mut got));
                    gemm_4bit_with(xs, m, &weight, out, Isa::Avx512Bf16, Host::Native, true).unwrap();
                    assert_near_reference(&got, &want, cols, 1e-30, &|| {
                        format!("{qt:?} bs={bs} double={double} [{m}x{cols}]@[{rows}x{cols}]^T")
                    });
                    // The float32 weight's sums are farther off than that somewhere: the test
                    // tells the two apart.
                    let (exact, mag) = reference(&x, &wd, m, rows, cols);
                    rounding_seen |= got.iter().zip(&exact).zip(&mag).any(|((g, e), s)| (*g as f64 - e).abs() > s * cols as f64 * 2f64.powi(-23));
                }
            }
        }
    }
    assert!(rounding_seen, "no product showed the bfloat16 weight");
}

/// Large enough to run on several threads: the row tasks must tile the output exactly.
#[test]
fn parallel_tasks_cover_every_row_once() {
    let (m, rows, cols, bs) = (2, 1000, 1024, 64);
    let q = Quantized::new(&noise(rows * cols, 9), QuantType::Fp4, bs);
    let w = Weight4 { packed: &q.packed, scales: q.scales(false), quant_type: QuantType::Fp4, blocksize: bs, rows, cols };
    assert!(m * rows * cols >= PARALLEL_MIN_WORK);
    let x = noise(m * cols, 10);
    let wd = decoded(&q, false, QuantType::Fp4, bs, rows * cols);
    let want = reference(&x, &wd, m, rows, cols);
    for isa in Isa::available() {
        assert_near_reference(&run_gemm(isa, &x, m, &w), &want, cols, 0.0, &|| format!("{isa:?}"));
    }
}

/// A weight of a real model's size (6 MiB packed, double-quantized: the loops' prefetches and
/// scale decode over many rows), one to three activation rows.
#[test]
fn model_sized_weights_match_the_reference() {
    let (rows, cols, bs) = (3072, 4096, 64);
    let q = Quantized::new(&noise(rows * cols, 11), QuantType::Nf4, bs);
    let wd = decoded(&q, true, QuantType::Nf4, bs, rows * cols);
    let w = Weight4 { packed: &q.packed, scales: q.scales(true), quant_type: QuantType::Nf4, blocksize: bs, rows, cols };
    for m in 1..=3 {
        let x = noise(m * cols, 12 + m as u64);
        let want = reference(&x, &wd, m, rows, cols);
        for isa in Isa::available() {
            assert_near_reference(&run_gemm(isa, &x, m, &w), &want, cols, 0.0, &|| format!("{isa:?} m={m}"));
        }
    }
}

#[test]
fn bad_sizes_are_errors_that_say_what_was_expected() {
    let q = Quantized::new(&noise(64, 1), QuantType::Nf4, 64);
    let w = Weight4 { packed: &q.packed, scales: q.scales(false), quant_type: QuantType::Nf4, blocksize: 64, rows: 4, cols: 16 };
    let mut out = vec![0f32; 4];
    let err = gemm_4bit(FloatSlice::F32(&[0.0; 15]), 1, &w, FloatSliceMut::F32(&mut out), Isa::Portable).unwrap_err();
    assert!(err.to_string().contains("in_features=16 need 16"), "{err}");
    let err = gemm_4bit(FloatSlice::F32(&[0.0; 16]), 1, &w, FloatSliceMut::F32(&mut out[..3]), Isa::Portable).unwrap_err();
    assert!(err.to_string().contains("out_features=4 need 4"), "{err}");
    let short = Weight4 { packed: &q.packed[..31], ..w };
    let err = gemm_4bit(FloatSlice::F32(&[0.0; 16]), 1, &short, FloatSliceMut::F32(&mut out), Isa::Portable).unwrap_err();
    assert!(err.to_string().contains("31 bytes"), "{err}");
}

#[test]
fn empty_products_write_nothing_and_zero_length_rows_give_zeros() {
    let w = Weight4 { packed: &[], scales: BlockScales::F32(&[]), quant_type: QuantType::Nf4, blocksize: 64, rows: 3, cols: 0 };
    let mut out = vec![f32::NAN; 6];
    gemm_4bit(FloatSlice::F32(&[]), 2, &w, FloatSliceMut::F32(&mut out), Isa::detected()).unwrap();
    assert_eq!(out, vec![0.0; 6]);
    gemm_4bit(FloatSlice::F32(&[]), 0, &w, FloatSliceMut::F32(&mut []), Isa::detected()).unwrap();
}

/// The decode of every level gives the bits of the portable one, for each output type: whole
/// groups, partial blocks, odd lengths, double quantization, and scales whose products are
/// subnormal, infinite or NaN.
#[test]
fn every_level_decodes_bit_identically() {
    fn check<T: Element + PartialEq + std::fmt::Debug>(wrap: fn(&mut [T]) -> FloatSliceMut<'_>) {
        for n in [1, 31, 32, 33, 64, 100, 4097, 3 * 32768 + 5] {
            for bs in [32, 64, 4096] {
                for qt in TYPES {
                    let packed: Vec<u8> = (0..packed_len(n)).map(|i| (i * 97 + 13) as u8).collect();
                    let mut absmax: Vec<f32> = (0..num_blocks(n, bs)).map(|b| 0.5 + b as f32 * 0.37).collect();
                    let special = [1e-39, 3e-36, f32::INFINITY, f32::NAN, 0.0, -2.5, 3e38];
                    for (a, s) in absmax.iter_mut().zip(special) {
                        *a = s;
                    }
                    let mut want = vec![T::from_f32(0.0); n];
                    dequantize_4bit_with(&packed, BlockScales::F32(&absmax), qt, bs, wrap(&mut want), Isa::Portable).unwrap();
                    for isa in Isa::available() {
                        let mut got = vec![T::from_f32(7.0); n];
                        dequantize_4bit_with(&packed, BlockScales::F32(&absmax), qt, bs, wrap(&mut got), isa).unwrap();
                        let same = got.iter().zip(&want).all(|(g, w)| g == w || (g != g && w != w));
                        assert!(same, "{isa:?} {:?} n={n} bs={bs} {qt:?}", T::DTYPE);
                    }
                }
            }
        }
    }
    check::<f32>(|o| FloatSliceMut::F32(o));
    check::<f16>(|o| FloatSliceMut::F16(o));
    check::<bf16>(|o| FloatSliceMut::BF16(o));
}

#[test]
fn nan_decodes_to_the_same_bits_on_every_level() {
    let packed = vec![0x5au8; 64];
    for isa in Isa::available() {
        let mut got = vec![bf16::ZERO; 128];
        dequantize_4bit_with(&packed, BlockScales::F32(&[f32::NAN, -f32::NAN]), QuantType::Nf4, 64, FloatSliceMut::BF16(&mut got), isa).unwrap();
        let bits: Vec<u16> = got.iter().map(|v| v.to_bits()).collect();
        assert!(bits[..64].iter().all(|&b| b == bf16::from_f32(f32::NAN).to_bits()), "{isa:?}");
        assert!(bits[64..].iter().all(|&b| b == bf16::from_f32(-f32::NAN).to_bits()), "{isa:?}");
    }
}

#[test]
fn double_quantized_decode_equals_the_float32_scales() {
    let (n, bs) = (256 * 64 * 3 + 100, 64);
    let q = Quantized::new(&noise(n, 3), QuantType::Nf4, bs);
    let scales: Vec<f32> = (0..q.codes.len()).map(|b| q.scales(true).get(b)).collect();
    for isa in Isa::available() {
        let mut a = vec![bf16::ZERO; n];
        let mut b = vec![bf16::ZERO; n];
        dequantize_4bit_with(&q.packed, q.scales(true), QuantType::Nf4, bs, FloatSliceMut::BF16(&mut a), isa).unwrap();
        dequantize_4bit_with(&q.packed, BlockScales::F32(&scales), QuantType::Nf4, bs, FloatSliceMut::BF16(&mut b), isa).unwrap();
        assert_eq!(a, b, "{isa:?}");
    }
    // The scale is nested_map[code] * nested_absmax + offset, two roundings.
    let b = 300;
    let want = q.map[q.codes[b] as usize] * q.nested[b / 256] + q.offset;
    assert_eq!(q.scales(true).get(b).to_bits(), want.to_bits());
}

#[test]
fn unsupported_levels_and_mismatched_nested_scales_are_errors() {
    let q = Quantized::new(&noise(64, 1), QuantType::Nf4, 64);
    let mut out = vec![0f32; 64];
    for isa in Isa::ALL.into_iter().filter(|i| !i.is_supported()) {
        let err = dequantize_4bit_with(&q.packed, q.scales(false), QuantType::Nf4, 64, FloatSliceMut::F32(&mut out), isa);
        assert!(err.unwrap_err().to_string().contains(isa.name()));
    }
    let bad = BlockScales::Double { codes: &q.codes, nested_absmax: &[], nested_map: &q.map, offset: 0.0 };
    let err = dequantize_4bit_with(&q.packed, bad, QuantType::Nf4, 64, FloatSliceMut::F32(&mut out), Isa::Portable);
    assert!(err.unwrap_err().to_string().contains("nested_absmax has 0 entries"));
}

/// Streamed (non-temporal) stores write the same bits as cached ones, on every level and output
/// type, whether the destination is aligned for them or not (then they fall back to plain stores).
#[test]
fn streamed_decode_writes_the_same_bits() {
    fn check<T: Element + PartialEq + std::fmt::Debug>() {
        let n = 3 * 4096 + 96;
        let packed: Vec<u8> = (0..packed_len(n)).map(|i| (i * 131 + 7) as u8).collect();
        let absmax: Vec<f32> = (0..num_blocks(n, 64)).map(|b| 0.25 + b as f32 * 0.01).collect();
        let code = QuantType::Nf4.code();
        for isa in Isa::available() {
            let mut want = vec![T::from_f32(0.0); n];
            // SAFETY: `isa` is available on this CPU.
            unsafe { decode_chunk(isa, &packed, &mut want, code, 64, |b| absmax[b], false) };
            // Offsets 0 and 1 element into a 64-byte aligned buffer: aligned and misaligned stores.
            for shift in [0, 1] {
                let mut buf = vec![0u8; (n + shift) * std::mem::size_of::<T>() + 128];
                let base = buf.as_mut_ptr().align_offset(64);
                // SAFETY: `base + shift` elements in, `n` elements fit in `buf` (128 spare bytes).
                let got = unsafe {
                    std::slice::from_raw_parts_mut((buf.as_mut_ptr().add(base) as *mut T).add(shift), n)
                };
                unsafe { decode_chunk(isa, &packed, got, code, 64, |b| absmax[b], true) };
                assert!(got == &want[..], "{isa:?} {:?} shift {shift}", T::DTYPE);
            }
        }
    }
    check::<f32>();
    check::<f16>();
    check::<bf16>();
}

/// Outputs of STREAM_MIN_BYTES and more are written past the caches, in parallel chunks: the whole
/// decode still equals the portable one.
#[test]
fn large_decode_is_exact() {
    let n = STREAM_MIN_BYTES / 2 + 4096 * 3 + 64; // bf16: just over the threshold
    let q = Quantized::new(&noise(n, 21), QuantType::Nf4, 64);
    for double in [false, true] {
        let mut want = vec![bf16::ZERO; n];
        dequantize_4bit_with(&q.packed, q.scales(double), QuantType::Nf4, 64, FloatSliceMut::BF16(&mut want), Isa::Portable).unwrap();
        for isa in Isa::available() {
            let mut got = vec![bf16::ZERO; n];
            dequantize_4bit_with(&q.packed, q.scales(double), QuantType::Nf4, 64, FloatSliceMut::BF16(&mut got), isa).unwrap();
            assert!(got == want, "{isa:?} double={double}");
        }
    }
}

#[test]
fn a_group_gives_each_weight_its_own_product_bit_for_bit() {
    // A layer's q/k/v (different row counts, one of them not a multiple of the tiles) and weights
    // of another block size in the same call; large enough for the threads to share the rows.
    let cols = 256;
    let shapes = [(96usize, 64usize), (37, 64), (40, 128)];
    let quantized: Vec<(Quantized, usize, usize)> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(rows, bs))| (Quantized::new(&noise(rows * cols, 40 + i as u64), QuantType::Nf4, bs), rows, bs))
        .collect();
    for isa in Isa::available() {
        for double in [false, true] {
            let ws: Vec<Weight4<'_>> = quantized
                .iter()
                .map(|(q, rows, bs)| Weight4 {
                    packed: &q.packed,
                    scales: q.scales(double),
                    quant_type: QuantType::Nf4,
                    blocksize: *bs,
                    rows: *rows,
                    cols,
                })
                .collect();
            for m in [1, 3, 16] {
                let x: Vec<bf16> = noise(m * cols, m as u64).iter().map(|&v| bf16::from_f32(v)).collect();
                let mut outs: Vec<Vec<bf16>> = ws.iter().map(|w| vec![bf16::NAN; m * w.rows]).collect();
                let slices = outs.iter_mut().map(|o| FloatSliceMut::BF16(o)).collect();
                gemm_4bit_group_on(FloatSlice::BF16(&x), m, &ws, slices, isa, Host::Native).unwrap();
                for (w, got) in ws.iter().zip(&outs) {
                    let mut want = vec![bf16::NAN; m * w.rows];
                    gemm_4bit(FloatSlice::BF16(&x), m, w, FloatSliceMut::BF16(&mut want), isa).unwrap();
                    assert!(
                        got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{isa:?} double={double} m={m} rows={}",
                        w.rows
                    );
                }
            }
        }
    }
    // Weights that do not share in_features, and a missing output, are named.
    let (q, rows, bs) = &quantized[0];
    let w = Weight4 { packed: &q.packed, scales: q.scales(false), quant_type: QuantType::Nf4, blocksize: *bs, rows: *rows, cols };
    let half_cols = Weight4 { cols: cols / 2, rows: rows * 2, ..w };
    let x = vec![0f32; cols];
    let (mut a, mut b) = (vec![0f32; *rows], vec![0f32; rows * 2]);
    let outs = vec![FloatSliceMut::F32(&mut a), FloatSliceMut::F32(&mut b)];
    let err = gemm_4bit_group_on(FloatSlice::F32(&x), 1, &[w, half_cols], outs, Isa::Portable, Host::Native).unwrap_err();
    assert!(err.to_string().contains("weight 1: in_features=128 differs from weight 0's 256"), "{err}");
    let err = gemm_4bit_group_on(FloatSlice::F32(&x), 1, &[w, w], vec![FloatSliceMut::F32(&mut a)], Isa::Portable, Host::Native)
        .unwrap_err();
    assert!(err.to_string().contains("2 weights but 1 outputs"), "{err}");
}

/// Each gate activation against its formula in float64, within a few float32 units of `|x|`
/// (`exp` and `tanh` are the library's, and GELU's `1 + tanh` cancels for large negative `x` in
/// float32 as in PyTorch), and the names the Python API passes.
#[test]
fn gate_activations_follow_their_formulas() {
    for i in -400..=400 {
        let v = i as f32 / 40.0; // -10..10
        let x = v as f64;
        let silu = x / (1.0 + (-x).exp());
        let gelu = 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
        for (act, want) in [(GateActivation::Silu, silu), (GateActivation::GeluTanh, gelu)] {
            let got = act.apply(v) as f64;
            assert!((got - want).abs() <= 4.0 * f32::EPSILON as f64 * (want.abs() + x.abs()), "{act:?}({v}) = {got}, want {want}");
        }
    }
    assert_eq!(GateActivation::GeluTanh.apply(0.0), 0.0);
    assert_eq!(GateActivation::from_name("gelu_tanh").unwrap(), GateActivation::GeluTanh);
    let err = GateActivation::from_name("relu").unwrap_err().to_string();
    assert!(err.contains("\"relu\"") && err.contains("\"silu\" or \"gelu_tanh\""), "{err}");
}

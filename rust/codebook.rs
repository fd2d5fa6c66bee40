//! Code tables and rounding rules of the 4-bit and 8-bit formats, bit-compatible with bitsandbytes.
//!
//! This module and `cuda/codebook.cuh` are the only two places these tables exist; a test
//! (`tests/codebook_header.rs`) compiles the header for the host and checks it against this file.

/// NF4: the 16 quantiles of N(0, 1) normalised to [-1, 1], index = nibble (from the QLoRA paper,
/// exactly the float32 values bitsandbytes ships; recomputing them differs in the last bits).
/// Written with the digits bitsandbytes prints, which round to these float32 values.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// FP4 (e2m1 without infinities), index = nibble: bit 3 is the sign, bits 0..2 select the
/// magnitude 0, 0.0625, 8, 12, 4, 6, 2, 3 (all divided by 12). Both zeros are +0.0, as in the
/// quant_map bitsandbytes stores.
pub const FP4_CODE: [f32; 16] = [
    0.0,
    0.0625 / 12.0,
    8.0 / 12.0,
    1.0,
    4.0 / 12.0,
    6.0 / 12.0,
    2.0 / 12.0,
    3.0 / 12.0,
    0.0,
    -0.0625 / 12.0,
    -8.0 / 12.0,
    -1.0,
    -4.0 / 12.0,
    -6.0 / 12.0,
    -2.0 / 12.0,
    -3.0 / 12.0,
];

/// INT4: symmetric integers -7..7 divided by 7, sign-magnitude like bitsandbytes' "int4" map:
/// nibbles 0..7 hold 7/7 down to 0, nibbles 8..15 hold 0 (stored as +0.0) down to -7/7.
pub const INT4_CODE: [f32; 16] = [
    1.0,
    6.0 / 7.0,
    5.0 / 7.0,
    4.0 / 7.0,
    3.0 / 7.0,
    2.0 / 7.0,
    1.0 / 7.0,
    0.0,
    0.0,
    -1.0 / 7.0,
    -2.0 / 7.0,
    -3.0 / 7.0,
    -4.0 / 7.0,
    -5.0 / 7.0,
    -6.0 / 7.0,
    -1.0,
];

/// A 4-bit code table prepared for encoding: the table sorted by value, the float32 midpoints
/// between neighbours, and the nibble of each sorted position.
///
/// Encoding counts the midpoints strictly below the scaled value (`torch.bucketize` semantics):
/// a value exactly on a midpoint goes to the lower code.
#[derive(Clone, Copy, Debug)]
pub struct Encoder4 {
    pub midpoints: [f32; 15],
    pub nibble_of_rank: [u8; 16],
    /// The table is already sorted (NF4): the rank is the nibble.
    pub is_sorted: bool,
}

impl Encoder4 {
    pub const fn new(code: &[f32; 16]) -> Self {
        // Stable insertion sort by value (const fn: no iterators). Stability keeps the first zero
        // (FP4: nibble 0) before the second (nibble 8), as bitsandbytes' argsort does.
        let mut order = [0u8; 16];
        let mut i = 0;
        while i < 16 {
            order[i] = i as u8;
            i += 1;
        }
        let mut i = 1;
        while i < 16 {
            let mut j = i;
            while j > 0 && code[order[j - 1] as usize] > code[order[j] as usize] {
                let t = order[j - 1];
                order[j - 1] = order[j];
                order[j] = t;
                j -= 1;
            }
            i += 1;
        }
        let mut midpoints = [0f32; 15];
        let mut i = 0;
        while i < 15 {
            // float32 sum, then an exact halving: what `(code[:-1] + code[1:]) / 2` computes.
            midpoints[i] = (code[order[i] as usize] + code[order[i + 1] as usize]) / 2.0;
            i += 1;
        }
        let mut is_sorted = true;
        let mut i = 0;
        while i < 16 {
            is_sorted &= order[i] as usize == i;
            i += 1;
        }
        Encoder4 { midpoints, nibble_of_rank: order, is_sorted }
    }

    /// Nibble of the code nearest to `x` (x already scaled into [-1, 1]); ties go to the lower code.
    #[inline(always)]
    pub fn encode(&self, x: f32) -> u8 {
        let mut rank = 0u8;
        for m in self.midpoints {
            rank += (x > m) as u8;
        }
        self.nibble_of_rank[rank as usize]
    }
}

pub const NF4_ENCODER: Encoder4 = Encoder4::new(&NF4_CODE);
pub const FP4_ENCODER: Encoder4 = Encoder4::new(&FP4_CODE);
pub const INT4_ENCODER: Encoder4 = Encoder4::new(&INT4_CODE);

/// The 8-bit "dynamic" map of bitsandbytes (`create_dynamic_map`): a sign bit, a unary-coded
/// decimal exponent and a linear fraction, 256 sorted float32 values. `signed = true` spans
/// [-1, 1] (index 127 is 0.0); `signed = false` spans [0, 1].
///
/// The construction follows the float32 arithmetic of the reference (linspace, midpoints, scale)
/// so that the table is bit-identical; a test checks it against bitsandbytes.
pub fn dynamic_map(signed: bool) -> [f32; 256] {
    const MAX_EXPONENT_BITS: i32 = 7;
    const TOTAL_BITS: i32 = 8;
    let non_sign_bits = TOTAL_BITS - 1;
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..MAX_EXPONENT_BITS {
        let fraction_items = if signed {
            2usize.pow((i + non_sign_bits - MAX_EXPONENT_BITS) as u32) + 1
        } else {
            2usize.pow((i + non_sign_bits - MAX_EXPONENT_BITS + 1) as u32) + 1
        };
        let boundaries = linspace_f32(0.1, 1.0, fraction_items);
        let scale = 10f64.powi(-(MAX_EXPONENT_BITS - 1) + i) as f32;
        for w in boundaries.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            if signed {
                data.push(-scale * mean);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    while data.len() < 256 {
        data.push(0.0);
    }
    data.sort_by(|a, b| a.partial_cmp(b).expect("finite map values"));
    let mut out = [0f32; 256];
    out.copy_from_slice(&data[..256]);
    out
}

/// float32 linspace as PyTorch computes it on the CPU: the first half counts up from `start`,
/// the second half counts down from `end`, with a float32 step and fused multiply-adds.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| if i < halfway { step.mul_add(i as f32, start) } else { (-step).mul_add((steps - i - 1) as f32, end) })
        .collect()
}

/// Number of grid points bitsandbytes' CPU 8-bit quantizer snaps normalised values to.
const GRID_POINTS: usize = 65536;

/// Grid point `k` of [`Encoder8`]: `-1 + 2k / 65535` in float32, as bitsandbytes computes it.
#[inline]
fn grid_value(k: usize) -> f32 {
    let twice = k as f32 + k as f32;
    twice / (GRID_POINTS - 1) as f32 - 1.0
}

/// The grid point bitsandbytes snaps a normalised value to: clamp to [-1, 1] (NaN passes, as
/// `std::clamp` lets it), `(x + 1) * 0.5`, then `* 65535 + 0.5` as ONE fused multiply-add (the
/// compiled library uses `vfmadd`), truncated to an integer and kept mod 2^16.
#[inline(always)]
fn grid_index(x: f32) -> usize {
    let x = x.clamp(-1.0, 1.0); // NaN stays NaN, as with std::clamp
    let half = (x + 1.0) * 0.5;
    // The fused multiply-add without needing the FMA instruction: `half` is a multiple of 2^-25
    // below 1, so `half * 65535 + 0.5` is exact in f64 and the cast to f32 is the single rounding.
    let scaled = (half as f64 * 65535.0 + 0.5) as f32;
    // Truncation like `cvttss2si`; NaN gives 0 here and i32::MIN there: both keep 0 mod 2^16.
    (scaled as i32 as u32 & 0xFFFF) as usize
}

/// A 256-entry 8-bit map prepared for encoding exactly as bitsandbytes' CPU `quantize_blockwise`
/// (0.50) does it.
///
/// bitsandbytes does not search the map for the nearest entry: it snaps the normalised value to
/// one of 65536 evenly spaced grid points in [-1, 1] (step 3.05e-5) and reads the code stored for
/// that grid point, namely where a walk over the midpoints `0.5 * (map[i] + map[i + 1])` stops
/// (the first midpoint not below the grid value; the walk never goes back). Where entries are
/// closer together than the grid step (the signed dynamic map near zero) or a value lies near a
/// midpoint, this is not the nearest entry: 0.0 encodes as 131 in the signed dynamic map, not
/// 127. Reproducing it keeps double-quantized block scales byte-identical to bitsandbytes'.
pub struct Encoder8 {
    lut: Box<[u8; GRID_POINTS]>,
}

impl Encoder8 {
    /// Builds the 65536-entry lookup table for `map` (about 4k float divisions and a fill).
    pub fn new(map: &[f32; 256]) -> Self {
        let mut lut = Box::new([255u8; GRID_POINTS]);
        // The walk passes midpoint i at the first grid point above midpoints 0..=i (grid values
        // never decrease), so grid points [from, to) stop at code i. A NaN midpoint is never
        // passed: everything after it keeps its code, as in the walk.
        let mut from = 0usize;
        for i in 0..255 {
            let mid = 0.5 * (map[i] + map[i + 1]);
            let to = first_grid_point_above(mid, from);
            lut[from..to].fill(i as u8);
            from = to;
        }
        Encoder8 { lut }
    }

    /// Code of a normalised value (the input divided by its block's absmax, by multiplying
    /// with the float32 reciprocal as bitsandbytes does).
    #[inline(always)]
    pub fn encode(&self, x: f32) -> u8 {
        self.lut[grid_index(x)]
    }
}

/// Smallest grid point k >= from with `mid < grid_value(k)`, or GRID_POINTS if there is none.
fn first_grid_point_above(mid: f32, from: usize) -> usize {
    let (mut lo, mut hi) = (from, GRID_POINTS);
    while lo < hi {
        let k = lo + (hi - lo) / 2;
        if mid < grid_value(k) {
            hi = k;
        } else {
            lo = k + 1;
        }
    }
    lo
}

/// Code of one normalised value, as [`Encoder8::encode`] gives it. Builds the table on every
/// call: use an [`Encoder8`] to encode more than a few values.
pub fn encode_8bit(map: &[f32; 256], x: f32) -> u8 {
    Encoder8::new(map).encode(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table bitsandbytes builds, literally: a walk over the grid and the midpoints.
    fn walked_table(map: &[f32; 256]) -> Vec<u8> {
        let mids: Vec<f32> = (0..255).map(|i| 0.5 * (map[i] + map[i + 1])).collect();
        let mut code = 0usize;
        (0..GRID_POINTS)
            .map(|k| {
                let val = grid_value(k);
                while code < 255 && mids[code] < val {
                    code += 1;
                }
                code as u8
            })
            .collect()
    }

    #[test]
    fn table_equals_the_walk() {
        let mut unsorted = dynamic_map(true);
        unsorted.swap(3, 200);
        unsorted.swap(128, 129);
        let mut with_nan = dynamic_map(true);
        with_nan[140] = f32::NAN;
        let mut clustered = [0f32; 256];
        for (i, v) in clustered.iter_mut().enumerate() {
            *v = (i as f32 - 128.0) * 1e-6;
        }
        for map in [dynamic_map(true), dynamic_map(false), unsorted, with_nan, clustered] {
            assert_eq!(&Encoder8::new(&map).lut[..], &walked_table(&map)[..]);
        }
    }

    #[test]
    fn codes_bitsandbytes_gives() {
        // (normalised value bits, code) from bitsandbytes 0.50.2 `quantize_blockwise` (blocks
        // with absmax 1), including values where the nearest entry is a different code.
        let cases: [(u32, u8); 8] = [
            (0x0000_0000, 131), // 0.0: nearest is 127
            (0x8000_0000, 131), // -0.0
            (0x33d6_bf95, 131), // 1e-7
            (0xbf80_0000, 0),   // -1.0
            (0xbf7e_3348, 0),   // -0.99297 (map[0])
            (0x3f7d_70a4, 254), // 0.99
            (0x3f7f_f972, 255), // 0.9999
            (0x3f80_0000, 255), // 1.0
        ];
        let enc = Encoder8::new(&dynamic_map(true));
        for (bits, want) in cases {
            assert_eq!(enc.encode(f32::from_bits(bits)), want, "value {}", f32::from_bits(bits));
        }
        assert_eq!(encode_8bit(&dynamic_map(true), 0.0), 131);
    }

    #[test]
    fn grid_index_rounds_like_the_fused_multiply_add() {
        let fused = |x: f32| ((x.clamp(-1.0, 1.0) + 1.0) * 0.5).mul_add(65535.0, 0.5) as i32 as usize & 0xFFFF;
        for k in 0..GRID_POINTS {
            assert_eq!(grid_index(grid_value(k)), fused(grid_value(k)));
        }
        // A sweep over float32 bit patterns of both signs up to beyond 1.
        for bits in (0..0x3f90_0000u32).step_by(1021) {
            for x in [f32::from_bits(bits), -f32::from_bits(bits)] {
                assert_eq!(grid_index(x), fused(x), "x = {x:e}");
            }
        }
        assert_eq!(grid_index(f32::NAN), 0);
        assert_eq!(grid_index(-3.0), 0);
        assert_eq!(grid_index(3.0), 65535);
    }
}

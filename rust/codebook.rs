//! Code tables and rounding rules of the 4-bit and 8-bit formats, bit-compatible with bitsandbytes.
//!
//! This module and `cuda/codebook.cuh` are the only two places these tables exist; a test
//! (`tests/codebook_header.rs`) compiles the header for the host and checks it against this file.

/// NF4: the 16 quantiles of N(0, 1) normalised to [-1, 1], index = nibble (from the QLoRA paper,
/// exactly the float32 values bitsandbytes ships; recomputing them differs in the last bits).
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
/// magnitude 0, 0.0625, 8, 12, 4, 6, 2, 3 (all divided by 12).
pub const FP4_CODE: [f32; 16] = [
    0.0 / 12.0,
    0.0625 / 12.0,
    8.0 / 12.0,
    12.0 / 12.0,
    4.0 / 12.0,
    6.0 / 12.0,
    2.0 / 12.0,
    3.0 / 12.0,
    -0.0 / 12.0,
    -0.0625 / 12.0,
    -8.0 / 12.0,
    -12.0 / 12.0,
    -4.0 / 12.0,
    -6.0 / 12.0,
    -2.0 / 12.0,
    -3.0 / 12.0,
];

/// INT4: symmetric integers -7..7 scaled to [-1, 1]; index = value + 8 (index 0 is unused and
/// decodes to -8/7 clamped to -1 so that every nibble decodes to something finite).
pub const INT4_CODE: [f32; 16] = [
    -1.0,
    -7.0 / 7.0,
    -6.0 / 7.0,
    -5.0 / 7.0,
    -4.0 / 7.0,
    -3.0 / 7.0,
    -2.0 / 7.0,
    -1.0 / 7.0,
    0.0,
    1.0 / 7.0,
    2.0 / 7.0,
    3.0 / 7.0,
    4.0 / 7.0,
    5.0 / 7.0,
    6.0 / 7.0,
    7.0 / 7.0,
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
}

impl Encoder4 {
    pub const fn new(code: &[f32; 16]) -> Self {
        // Stable insertion sort by value (const fn: no iterators). Stability keeps +0.0 (nibble 0)
        // before -0.0 (nibble 8) for FP4, as bitsandbytes' argsort does.
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
        Encoder4 { midpoints, nibble_of_rank: order }
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

/// Index of the value of a sorted 256-entry map nearest to `x`; ties go to the lower index.
/// (The search bitsandbytes' CPU blockwise quantizer does: the largest entry <= x, then the right
/// neighbour if it is strictly closer.)
#[inline]
pub fn encode_8bit(map: &[f32; 256], x: f32) -> u8 {
    // Largest i with map[i] <= x; x below map[0] maps to 0.
    let mut lo = 0usize;
    let mut hi = 256usize;
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if map[mid] <= x {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    if lo < 255 {
        let left = (x - map[lo]).abs();
        let right = (x - map[lo + 1]).abs();
        if right < left {
            lo += 1;
        }
    }
    lo as u8
}

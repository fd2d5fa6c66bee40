//! Products with packed 4-bit weights on the CPU that read the weights as they are stored: each
//! nibble is decoded in registers through the 16-entry code table (one `vpermps` per 16 values
//! on AVX-512, two and a blend per 8 on AVX2), the table scaled once per block, and the products
//! summed in float32. The dequantized matrix never exists. The same decode, written out in
//! order, is what [`crate::quant4::dequantize_4bit`] runs.
//!
//! One module per instruction-set level ([`Isa`], chosen at run time): `avx512`, `avx2`,
//! `portable`. The activations are converted once per call, in the order in which the kernel
//! decodes the weights, so that no shuffle is needed in the inner loop: for AVX-512 each group of
//! 32 is laid out as its 16 even elements, then its 16 odd ones (a vector of packed bytes yields
//! high nibbles, the even elements, and low nibbles, the odd ones); the AVX2 order is
//! `avx2::layout_activations`'s. bfloat16 activations on AVX512-BF16 stay bfloat16, in groups of
//! 64 (32 even, 32 odd), and meet the weight rounded to bfloat16 in `vdpbf16ps` (see
//! [`Kernel::choose`]); everything else is float32.

use std::sync::atomic::{AtomicUsize, Ordering};

use half::{bf16, f16};

use crate::cpu_isa::{Host, Isa};
use crate::dtype::{DType, Element, FloatSlice, FloatSliceMut};
use crate::error::{Error, Result};
use crate::quant4::{check_blocksize, num_blocks, packed_len, BlockScales, QuantType};

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod portable;

/// Multiply-adds below which a product runs on the calling thread alone: handing tasks to the
/// pool costs a few microseconds (waking a thread), which does not pay below about 10 us of work
/// for one core (a 576x576 layer at M = 1 takes ~20 us).
const PARALLEL_MIN_WORK: usize = 1 << 17;

/// Row tasks per pool thread: threads take them in turn, so one slowed by others (or slow to
/// wake) leaves its share to the rest.
const TASKS_PER_THREAD: usize = 4;

/// A packed 4-bit weight of `rows` x `cols` (out_features x in_features), row-major, as the
/// product `x @ W^T` reads it.
#[derive(Clone, Copy, Debug)]
pub struct Weight4<'a> {
    pub packed: &'a [u8],
    pub scales: BlockScales<'a>,
    pub quant_type: QuantType,
    pub blocksize: usize,
    pub rows: usize,
    pub cols: usize,
}

impl Weight4<'_> {
    fn check(&self) -> Result<()> {
        check_blocksize(self.blocksize)?;
        let n = self.rows.checked_mul(self.cols).ok_or_else(|| Error::shape("weight shape overflows"))?;
        if self.packed.len() != packed_len(n) {
            return Err(Error::shape(format!(
                "packed weight has {} bytes; [{}, {}] needs {}",
                self.packed.len(),
                self.rows,
                self.cols,
                packed_len(n)
            )));
        }
        if self.scales.len() != num_blocks(n, self.blocksize) {
            return Err(Error::shape(format!(
                "absmax has {} entries; [{}, {}] in blocks of {} needs {}",
                self.scales.len(),
                self.rows,
                self.cols,
                self.blocksize,
                num_blocks(n, self.blocksize)
            )));
        }
        self.scales.check()
    }
}

/// Decoded outputs of at least this many bytes are written with non-temporal stores, past the
/// caches: a weight this large does not stay in cache for the product that reads it next, and
/// writing around the cache skips reading each line in first. Measured on 2 cores (AVX-512, a
/// 105 MiB L3 shared with other tenants), bf16 into a preallocated output: 4096x4096 (32 MiB)
/// 5.5 -> 8.2-9.2 Gparam/s, and its decode + `F.linear` at M = 32 7.0 -> 6.0 ms; 2048x2048
/// (8 MiB) about the same either way; 576x576 41 -> 65 us (small outputs are read back from
/// the cache, so they keep to it). Only into buffers already in use: see `quant4::OutputMemory`.
pub const STREAM_MIN_BYTES: usize = 16 << 20;

/// The kernel family a product runs, which also fixes the activation layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    /// float32 products; with `bf16_weights`, of the weight rounded to bfloat16 (see [`Kernel::choose`]).
    #[cfg(target_arch = "x86_64")]
    Avx512 { bf16_weights: bool },
    /// bfloat16 activations times the weight rounded to bfloat16, `vdpbf16ps` (AVX512-BF16).
    #[cfg(target_arch = "x86_64")]
    Avx512Dot,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// See [`Kernel::Avx512`] for `bf16_weights`.
    Portable { bf16_weights: bool },
}

/// Activations converted once per call into a kernel's layout.
enum Activations {
    F32(Vec<f32>),
    #[cfg(target_arch = "x86_64")]
    BF16(Vec<bf16>),
}

impl Kernel {
    /// The vector kernels read whole groups of 32 values, so a row must start on one.
    ///
    /// With `bf16_products` (bfloat16 activations on [`Isa::Avx512Bf16`], where
    /// [`crate::cpu_isa::bf16_products`] says so) the kernels multiply the weight as bfloat16 (each
    /// `code * scale` rounded once, as the dequantized weight the larger products multiply): the
    /// products of two bfloat16 values are exact in float32, so `vdpbf16ps` does two of them an
    /// element in one instruction. That kernel reads 64 values at a time within one block; rows of
    /// an odd number of 32-groups, or blocks of 32, run the float32 kernel on the same rounded
    /// weight, and rows of other lengths the portable one. Other types and levels multiply the
    /// float32 weight.
    fn choose(isa: Isa, cols: usize, blocksize: usize, bf16_products: bool) -> Kernel {
        if !cols.is_multiple_of(32) {
            return Kernel::Portable { bf16_weights: bf16_products };
        }
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 if bf16_products => {
                if cols.is_multiple_of(64) && blocksize >= 64 {
                    Kernel::Avx512Dot
                } else {
                    Kernel::Avx512 { bf16_weights: true }
                }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 | Isa::Avx512Bf16 => Kernel::Avx512 { bf16_weights: false },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Kernel::Avx2,
            _ => Kernel::Portable { bf16_weights: false },
        }
    }

    /// The activations (rows of `cols`) in the kernel's layout.
    fn activations<T: Element>(self, x: &[T], cols: usize) -> Activations {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 { .. } => Activations::F32(even_odd(x, cols, 16, |v| v.to_f32())),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Dot => Activations::BF16(even_odd(x, cols, 32, |v| bf16::from_f32(v.to_f32()))),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => Activations::F32(avx2::layout_activations(x, cols)),
            Kernel::Portable { .. } => Activations::F32(x.iter().map(|v| v.to_f32()).collect()),
        }
    }

    /// Output rows one tile covers (task boundaries fall on multiples of it).
    fn tile_rows(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 { .. } | Kernel::Avx512Dot => avx512::TILE_ROWS,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => 1,
            Kernel::Portable { .. } => 1,
        }
    }

    /// Sums of rows `r0..r1` for all `m` activation rows into `acc` ([m][r1 - r0]).
    fn run(self, w: &Weight4<'_>, xs: &Activations, m: usize, r0: usize, r1: usize, acc: &mut [f32]) {
        match (self, xs) {
            // SAFETY: `choose` picks a vector kernel only for a level the caller checked is
            // supported, and only for rows it reads whole (cols a multiple of 32, or of 64 in
            // blocks of at least 64 for the dot kernel); xs holds m rows of cols values in its
            // layout (`activations`).
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx512 { bf16_weights }, Activations::F32(xs)) => unsafe {
                avx512::gemm_rows(w, xs, bf16_weights, m, r0, r1, acc)
            },
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx512Dot, Activations::BF16(xs)) => unsafe { avx512::gemm_rows_dot(w, xs, m, r0, r1, acc) },
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx2, Activations::F32(xs)) => unsafe { avx2::gemm_rows(w, xs, m, r0, r1, acc) },
            (Kernel::Portable { bf16_weights }, Activations::F32(xs)) => portable::gemm_rows(w, xs, bf16_weights, m, r0, r1, acc),
            #[allow(unreachable_patterns)] // one layout per kernel (`activations`)
            _ => unreachable!("activations in another kernel's layout"),
        }
    }
}

/// `out[m, rows] = x[m, cols] @ dequant(W)^T`, summed in float32 and rounded once to the output
/// type, on the kernels of `isa` (an error if this CPU lacks it). Any `m` works; the kernels are
/// meant for a few rows (up to 16), where decoding the whole weight first costs more than the
/// product. Multithreaded over output rows ([`crate::threads::run_team`]).
pub fn gemm_4bit(x: FloatSlice<'_>, m: usize, w: &Weight4<'_>, out: FloatSliceMut<'_>, isa: Isa) -> Result<()> {
    gemm_4bit_on(x, m, w, out, isa, Host::Native)
}

/// [`gemm_4bit`] on the given host (an emulated CPU: one thread, the level not checked).
pub fn gemm_4bit_on(x: FloatSlice<'_>, m: usize, w: &Weight4<'_>, out: FloatSliceMut<'_>, isa: Isa, host: Host) -> Result<()> {
    gemm_4bit_group_on(x, m, std::slice::from_ref(w), vec![out], isa, host)
}

/// The products of one `x[m, cols]` with several weights of `cols` columns at once:
/// `outs[i][m, ws[i].rows] = x @ dequant(ws[i])^T`, each exactly as [`gemm_4bit_on`] computes it.
/// One call converts the activations once and shares the rows of all the weights among the
/// threads: the query, key and value projections of a layer read the same input, and at one
/// row each of them is too small to be worth a team of its own.
pub fn gemm_4bit_group_on(
    x: FloatSlice<'_>,
    m: usize,
    ws: &[Weight4<'_>],
    outs: Vec<FloatSliceMut<'_>>,
    isa: Isa,
    host: Host,
) -> Result<()> {
    // The CPU is looked up natively only (an emulator would answer for itself); no emulator here
    // has AVX512-BF16.
    let bf16 = isa == Isa::Avx512Bf16 && x.dtype() == DType::BF16 && host == Host::Native && crate::cpu_isa::bf16_products()?;
    gemm_4bit_group_with(x, m, ws, outs, isa, host, bf16)
}

/// A LoRA adapter on one of [`gated_mlp_4bit_on`]'s projections: `a` `[rank, in]`, `b`
/// `[out, rank]`, of one float dtype (see [`crate::lora::lora_add`]).
#[derive(Clone, Copy, Debug)]
pub struct Adapter<'a> {
    pub a: FloatSlice<'a>,
    pub b: FloatSlice<'a>,
    pub rank: usize,
    pub scaling: f32,
}

/// The activation of a gated MLP's gate, each in float32 as PyTorch's CPU kernel computes it
/// (its vectorized `exp` and `tanh` may differ from these in the last bit of a float32; a bf16 or
/// fp16 result almost never shows it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateActivation {
    /// `x / (1 + exp(-x))` (`F.silu`: Llama, Mistral, Qwen).
    Silu,
    /// `0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))` (`F.gelu(approximate="tanh")`: Gemma).
    GeluTanh,
}

impl GateActivation {
    /// The activation by its name in the Python API (`"silu"`, `"gelu_tanh"`).
    pub fn from_name(name: &str) -> Result<GateActivation> {
        match name {
            "silu" => Ok(GateActivation::Silu),
            "gelu_tanh" => Ok(GateActivation::GeluTanh),
            _ => Err(Error::shape(format!("gated MLP: activation {name:?}; expected \"silu\" or \"gelu_tanh\""))),
        }
    }

    /// The activation of `v`, with PyTorch's operations in its order (no fused multiply-adds).
    #[inline]
    pub fn apply(self, v: f32) -> f32 {
        match self {
            GateActivation::Silu => v / (1.0 + (-v).exp()),
            GateActivation::GeluTanh => {
                // torch's constants, rounded from double: sqrt(2) * (2 / sqrt(pi)) * 0.5 and 0.044715.
                const BETA: f32 = (std::f64::consts::SQRT_2 * std::f64::consts::FRAC_2_SQRT_PI * 0.5) as f32;
                const KAPPA: f32 = 0.044715f64 as f32;
                let cube = v * v * v;
                let inner = BETA * (v + KAPPA * cube);
                0.5 * v * (1.0 + inner.tanh())
            }
        }
    }
}

/// An element type whose slices wrap as [`FloatSlice`] and [`FloatSliceMut`] (for the
/// intermediate buffers of the calls that chain several kernels).
trait Wrap: Element {
    fn slice(s: &[Self]) -> FloatSlice<'_>;
    fn slice_mut(s: &mut [Self]) -> FloatSliceMut<'_>;
}

macro_rules! wrap {
    ($t:ty, $v:ident) => {
        impl Wrap for $t {
            fn slice(s: &[Self]) -> FloatSlice<'_> {
                FloatSlice::$v(s)
            }
            fn slice_mut(s: &mut [Self]) -> FloatSliceMut<'_> {
                FloatSliceMut::$v(s)
            }
        }
    };
}
wrap!(f32, F32);
wrap!(f16, F16);
wrap!(bf16, BF16);

/// A gated MLP at one call: `out = down(act(gate(x)) * up(x))` with 4-bit weights, rounded as
/// PyTorch computes transformers' `LlamaMLP` (SiLU) or `GemmaMLP` (GELU, tanh approximation) in
/// `x`'s dtype: each product rounded to it ([`gemm_4bit_group_on`]), `act(g)` computed in float32
/// and rounded, the elementwise product of the two rounded once more, then the down product of
/// that. `gate` and `up` are `[inter, cols]`, `down` `[rows, inter]`; `x` `[m, cols]`, `out`
/// `[m, rows]`, one dtype. `adapters` (gate, up, down): a LoRA adapter's share added to that
/// projection's rounded product, as `qlora_rs.nn.LoraLinear4bit` adds it ([`crate::lora::lora_add`]).
#[allow(clippy::too_many_arguments)]
pub fn gated_mlp_4bit_on(
    x: FloatSlice<'_>,
    m: usize,
    gate: &Weight4<'_>,
    up: &Weight4<'_>,
    down: &Weight4<'_>,
    act: GateActivation,
    adapters: [Option<Adapter<'_>>; 3],
    out: FloatSliceMut<'_>,
    isa: Isa,
    host: Host,
) -> Result<()> {
    if gate.rows != up.rows || down.cols != gate.rows {
        return Err(Error::shape(format!(
            "gated MLP: gate [{}, {}], up [{}, {}] and down [{}, {}] do not chain (down's in_features must be gate's and up's out_features)",
            gate.rows, gate.cols, up.rows, up.cols, down.rows, down.cols
        )));
    }
    if x.dtype() != out.dtype() {
        return Err(Error::shape(format!("gated MLP: x is {}, out {}; expected one dtype", x.dtype().name(), out.dtype().name())));
    }
    #[allow(clippy::too_many_arguments)]
    fn run<T: Wrap>(
        x: &[T],
        m: usize,
        ws: [&Weight4<'_>; 3],
        act: GateActivation,
        adapters: [Option<Adapter<'_>>; 3],
        out: &mut [T],
        isa: Isa,
        host: Host,
    ) -> Result<()> {
        let [gate, up, down] = ws;
        let inter = gate.rows;
        let (mut g, mut u) = (vec![T::from_f32(0.0); m * inter], vec![T::from_f32(0.0); m * inter]);
        gemm_4bit_group_on(T::slice(x), m, &[*gate, *up], vec![T::slice_mut(&mut g), T::slice_mut(&mut u)], isa, host)?;
        let share = |adapter: Option<Adapter<'_>>, input: &[T], w: &Weight4<'_>, y: &mut [T]| match adapter {
            Some(Adapter { a, b, rank, scaling }) => {
                let shape = crate::lora::LoraShape { rows: m, in_features: w.cols, rank, out_features: w.rows };
                crate::lora::lora_add(T::slice(input), a, b, scaling, shape, T::slice_mut(y), isa, host)
            }
            None => Ok(()),
        };
        share(adapters[0], x, gate, &mut g)?;
        share(adapters[1], x, up, &mut u)?;
        for (g, u) in g.iter_mut().zip(&u) {
            let a = T::from_f32(act.apply(g.to_f32()));
            *g = T::from_f32(a.to_f32() * u.to_f32());
        }
        gemm_4bit_on(T::slice(&g), m, down, T::slice_mut(out), isa, host)?;
        share(adapters[2], &g, down, out)
    }
    let ws = [gate, up, down];
    match (x, out) {
        (FloatSlice::F32(x), FloatSliceMut::F32(o)) => run::<f32>(x, m, ws, act, adapters, o, isa, host),
        (FloatSlice::F16(x), FloatSliceMut::F16(o)) => run::<f16>(x, m, ws, act, adapters, o, isa, host),
        (FloatSlice::BF16(x), FloatSliceMut::BF16(o)) => run::<bf16>(x, m, ws, act, adapters, o, isa, host),
        _ => unreachable!("dtypes checked above"),
    }
}

/// A 4-bit projection with what its layer adds to the rounded product: a bias (any float dtype,
/// rounded to the product's first, as `Linear4bit` adds it) and a LoRA adapter's share (after
/// the bias, as `qlora_rs.nn.LoraLinear4bit` adds it).
#[derive(Clone, Copy, Debug)]
pub struct Projection<'a> {
    pub weight: Weight4<'a>,
    pub bias: Option<FloatSlice<'a>>,
    pub adapter: Option<Adapter<'a>>,
}

/// The RMS norms of a decoder layer's second half, of one epsilon and style ([`crate::decode::rms_norm`]):
/// `mlp` before the MLP (Llama's `post_attention_layernorm`, Gemma3's `pre_feedforward_layernorm`)
/// and, in Gemma3's form, `post`: the norms of the attention's and of the MLP's output, each before
/// its residual sum (Gemma3's `post_attention_layernorm` and `post_feedforward_layernorm`).
#[derive(Clone, Copy, Debug)]
pub struct TailNorms<'a> {
    pub mlp: FloatSlice<'a>,
    pub post: Option<[FloatSlice<'a>; 2]>,
    pub eps: f32,
    pub style: crate::decode::NormStyle,
}

/// What follows the attention in a decoder layer of Llama's form, for `m` rows in one call:
/// `h = residual + o_proj(attended)`, then `out = h + mlp(norm(h))` (in Gemma3's form, with
/// `norms.post`: `h = residual + norm(o_proj(attended))`, `out = h + norm(mlp(norm(h)))`), each
/// step rounded as PyTorch rounds transformers' forward in the rows' dtype: the output projection
/// as [`gemm_4bit_on`] and the projection's additions, each residual sum computed in float32 and
/// rounded once, the norms as [`crate::decode::rms_norm`], the MLP as [`gated_mlp_4bit_on`].
/// `attended` `[m, o.cols]`; `residual` and `out` `[m, o.rows]`; one dtype with the norms'
/// weights `[o.rows]`.
#[allow(clippy::too_many_arguments)]
pub fn decoder_tail_on(
    attended: FloatSlice<'_>,
    m: usize,
    o: &Projection<'_>,
    residual: FloatSlice<'_>,
    norms: &TailNorms<'_>,
    mlp: [&Weight4<'_>; 3],
    act: GateActivation,
    mlp_adapters: [Option<Adapter<'_>>; 3],
    out: FloatSliceMut<'_>,
    isa: Isa,
    host: Host,
) -> Result<()> {
    let width = o.weight.rows;
    let mut weights = vec![("norm weight", norms.mlp)];
    if let Some([after_attention, after_mlp]) = norms.post {
        weights.extend([("post-attention norm weight", after_attention), ("post-MLP norm weight", after_mlp)]);
    }
    let dtype = attended.dtype();
    if residual.dtype() != dtype || out.dtype() != dtype || weights.iter().any(|(_, w)| w.dtype() != dtype) {
        return Err(Error::shape(format!(
            "decoder tail: attended is {}, residual {}, out {}, the norm weights {}; expected one dtype",
            dtype.name(),
            residual.dtype().name(),
            out.dtype().name(),
            weights.iter().map(|(_, w)| w.dtype().name()).collect::<Vec<_>>().join(", ")
        )));
    }
    let mut sizes = vec![
        ("attended", attended.len(), m * o.weight.cols),
        ("residual", residual.len(), m * width),
        ("out", out.len(), m * width),
    ];
    sizes.extend(weights.iter().map(|&(name, w)| (name, w.len(), width)));
    for (name, got, want) in sizes {
        if got != want {
            return Err(Error::shape(format!("decoder tail: {name} has {got} elements, expected {want}")));
        }
    }
    if let Some(bias) = o.bias {
        if bias.len() != width {
            return Err(Error::shape(format!("decoder tail: the bias has {} elements, expected {width}", bias.len())));
        }
    }
    if mlp[0].cols != width || mlp[2].rows != width {
        return Err(Error::shape(format!(
            "decoder tail: the MLP takes {} features and gives {}; the layer's width is {width}",
            mlp[0].cols, mlp[2].rows
        )));
    }
    #[allow(clippy::too_many_arguments)]
    fn run<T: Wrap>(
        attended: &[T],
        m: usize,
        o: &Projection<'_>,
        residual: &[T],
        norms: &TailNorms<'_>,
        mlp: [&Weight4<'_>; 3],
        act: GateActivation,
        mlp_adapters: [Option<Adapter<'_>>; 3],
        out: &mut [T],
        isa: Isa,
        host: Host,
    ) -> Result<()> {
        let width = o.weight.rows;
        let zeros = || vec![T::from_f32(0.0); m * width];
        let mut h = zeros();
        gemm_4bit_on(T::slice(attended), m, &o.weight, T::slice_mut(&mut h), isa, host)?;
        if let Some(bias) = o.bias {
            let bias: Vec<T> = match bias {
                FloatSlice::F32(b) => b.iter().map(|&v| T::from_f32(v)).collect(),
                FloatSlice::F16(b) => b.iter().map(|&v| T::from_f32(v.to_f32())).collect(),
                FloatSlice::BF16(b) => b.iter().map(|&v| T::from_f32(v.to_f32())).collect(),
            };
            for row in h.chunks_mut(width) {
                for (y, b) in row.iter_mut().zip(&bias) {
                    *y = T::from_f32(y.to_f32() + b.to_f32());
                }
            }
        }
        if let Some(Adapter { a, b, rank, scaling }) = o.adapter {
            let shape = crate::lora::LoraShape { rows: m, in_features: o.weight.cols, rank, out_features: width };
            crate::lora::lora_add(T::slice(attended), a, b, scaling, shape, T::slice_mut(&mut h), isa, host)?;
        }
        let TailNorms { eps, style, .. } = *norms;
        let mut normed = zeros();
        if let Some([after_attention, _]) = norms.post {
            crate::decode::rms_norm(T::slice(&h), after_attention, eps, style, T::slice_mut(&mut normed))?;
            std::mem::swap(&mut h, &mut normed);
        }
        for (h, r) in h.iter_mut().zip(residual) {
            *h = T::from_f32(r.to_f32() + h.to_f32());
        }
        crate::decode::rms_norm(T::slice(&h), norms.mlp, eps, style, T::slice_mut(&mut normed))?;
        gated_mlp_4bit_on(T::slice(&normed), m, mlp[0], mlp[1], mlp[2], act, mlp_adapters, T::slice_mut(out), isa, host)?;
        if let Some([_, after_mlp]) = norms.post {
            crate::decode::rms_norm(T::slice(out), after_mlp, eps, style, T::slice_mut(&mut normed))?;
            out.copy_from_slice(&normed);
        }
        for (y, h) in out.iter_mut().zip(&h) {
            *y = T::from_f32(h.to_f32() + y.to_f32());
        }
        Ok(())
    }
    match (attended, residual, out) {
        (FloatSlice::F32(a), FloatSlice::F32(r), FloatSliceMut::F32(y)) => {
            run::<f32>(a, m, o, r, norms, mlp, act, mlp_adapters, y, isa, host)
        }
        (FloatSlice::F16(a), FloatSlice::F16(r), FloatSliceMut::F16(y)) => {
            run::<f16>(a, m, o, r, norms, mlp, act, mlp_adapters, y, isa, host)
        }
        (FloatSlice::BF16(a), FloatSlice::BF16(r), FloatSliceMut::BF16(y)) => {
            run::<bf16>(a, m, o, r, norms, mlp, act, mlp_adapters, y, isa, host)
        }
        _ => unreachable!("dtypes checked above"),
    }
}

/// One task of a product: rows `r0..r1` of weight `w`.
#[derive(Clone, Copy)]
struct Task {
    w: usize,
    r0: usize,
    r1: usize,
}

/// [`gemm_4bit_group_on`] with the choice of [`crate::cpu_isa::bf16_products`] made by the caller
/// (`bf16_products`: bfloat16 activations at [`Isa::Avx512Bf16`] only; the tests choose both).
fn gemm_4bit_group_with(
    x: FloatSlice<'_>,
    m: usize,
    ws: &[Weight4<'_>],
    outs: Vec<FloatSliceMut<'_>>,
    isa: Isa,
    host: Host,
    bf16_products: bool,
) -> Result<()> {
    debug_assert!(!bf16_products || (isa == Isa::Avx512Bf16 && x.dtype() == DType::BF16));
    if ws.len() != outs.len() {
        return Err(Error::shape(format!("{} weights but {} outputs", ws.len(), outs.len())));
    }
    host.check(isa)?;
    let which = |i: usize| if ws.len() > 1 { format!("weight {i}: ") } else { String::new() };
    for (i, (w, out)) in ws.iter().zip(&outs).enumerate() {
        w.check().map_err(|e| if ws.len() > 1 { Error::shape(format!("{}{e}", which(i))) } else { e })?;
        if w.cols != ws[0].cols {
            return Err(Error::shape(format!(
                "{}in_features={} differs from weight 0's {}: the weights of one call share x",
                which(i),
                w.cols,
                ws[0].cols
            )));
        }
        if x.len() != m * w.cols {
            return Err(Error::shape(format!(
                "x has {} elements; {m} rows of in_features={} need {}",
                x.len(),
                w.cols,
                m * w.cols
            )));
        }
        if out.len() != m * w.rows {
            return Err(Error::shape(format!(
                "{}out has {} elements; {m} rows of out_features={} need {}",
                which(i),
                out.len(),
                w.rows,
                m * w.rows
            )));
        }
    }
    let outs: Vec<OutPtr> = outs.into_iter().map(OutPtr::new).collect();
    let rows: usize = ws.iter().map(|w| w.rows).sum();
    if m == 0 || rows == 0 {
        return Ok(());
    }
    let cols = ws[0].cols;
    if cols == 0 {
        for (w, out) in ws.iter().zip(&outs) {
            // SAFETY: out holds m * rows elements (checked above), all written here.
            unsafe { out.write(&vec![0f32; m * w.rows], m, w.rows, 0, w.rows) };
        }
        return Ok(());
    }
    // The activations once per layout the weights' kernels read (one, unless block sizes differ).
    let kernels: Vec<Kernel> = ws.iter().map(|w| Kernel::choose(isa, cols, w.blocksize, bf16_products)).collect();
    let mut layouts: Vec<(Kernel, Activations)> = Vec::new();
    for &kernel in &kernels {
        if !layouts.iter().any(|(k, _)| *k == kernel) {
            let xs = match x {
                FloatSlice::F32(x) => kernel.activations(x, cols),
                FloatSlice::F16(x) => kernel.activations(x, cols),
                FloatSlice::BF16(x) => kernel.activations(x, cols),
            };
            layouts.push((kernel, xs));
        }
    }
    let xs: Vec<&Activations> =
        kernels.iter().map(|k| &layouts.iter().find(|(l, _)| l == k).expect("a layout per kernel").1).collect();
    let work = m.saturating_mul(rows).saturating_mul(cols);
    // Small products run here alone: no need to look the team up.
    let threads = if work < PARALLEL_MIN_WORK { 1 } else { host.team_size() };
    let tasks = if threads == 1 { 1 } else { threads * TASKS_PER_THREAD };
    let tile = kernels.iter().map(|k| k.tile_rows()).max().unwrap_or(1);
    let per_task = rows.div_ceil(tasks).next_multiple_of(tile);
    let tasks: Vec<Task> = ws
        .iter()
        .enumerate()
        .flat_map(|(i, w)| (0..w.rows).step_by(per_task).map(move |r0| Task { w: i, r0, r1: (r0 + per_task).min(w.rows) }))
        .collect();
    let run = |t: Task| {
        let mut acc = vec![0f32; m * (t.r1 - t.r0)];
        kernels[t.w].run(&ws[t.w], xs[t.w], m, t.r0, t.r1, &mut acc);
        // SAFETY: tasks cover disjoint row ranges of each output, so each element is written once.
        unsafe { outs[t.w].write(&acc, m, ws[t.w].rows, t.r0, t.r1) };
    };
    if tasks.len() == 1 {
        run(tasks[0]);
        return Ok(());
    }
    // Every thread, the calling one too, takes tasks from one counter: none waits for a
    // straggler or for a thread slow to wake.
    let next = AtomicUsize::new(0);
    crate::threads::run_team(threads.min(tasks.len()), &|| loop {
        let t = next.fetch_add(1, Ordering::Relaxed);
        if t >= tasks.len() {
            break;
        }
        run(tasks[t]);
    });
    Ok(())
}

/// Rows of `cols` (a multiple of `2 * lanes`) converted by `conv`, each group of `2 * lanes` laid
/// out as its `lanes` even elements, then its odd ones.
#[cfg(target_arch = "x86_64")]
fn even_odd<T: Element, U: Copy + Default>(x: &[T], cols: usize, lanes: usize, conv: impl Fn(T) -> U) -> Vec<U> {
    let mut xs = vec![U::default(); x.len()];
    for (src, dst) in x.chunks_exact(cols).zip(xs.chunks_exact_mut(cols)) {
        for (s, d) in src.chunks_exact(2 * lanes).zip(dst.chunks_exact_mut(2 * lanes)) {
            let (even, odd) = d.split_at_mut(lanes);
            for (l, pair) in s.chunks_exact(2).enumerate() {
                even[l] = conv(pair[0]);
                odd[l] = conv(pair[1]);
            }
        }
    }
    xs
}

/// The output buffer shared by the row tasks.
#[derive(Clone, Copy)]
enum OutPtr {
    F32(*mut f32),
    F16(*mut f16),
    BF16(*mut bf16),
}

// SAFETY: the tasks write disjoint elements (see `gemm_4bit`) of a buffer that outlives them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    fn new(out: FloatSliceMut<'_>) -> Self {
        match out {
            FloatSliceMut::F32(o) => OutPtr::F32(o.as_mut_ptr()),
            FloatSliceMut::F16(o) => OutPtr::F16(o.as_mut_ptr()),
            FloatSliceMut::BF16(o) => OutPtr::BF16(o.as_mut_ptr()),
        }
    }

    /// Writes `acc` ([m][r1 - r0]) to columns r0..r1 of the [m][rows] output.
    ///
    /// SAFETY: the buffer holds m * rows elements and nothing else writes columns r0..r1.
    unsafe fn write(self, acc: &[f32], m: usize, rows: usize, r0: usize, r1: usize) {
        unsafe fn put<T: Element>(out: *mut T, acc: &[f32], m: usize, rows: usize, r0: usize, r1: usize) {
            let width = r1 - r0;
            for i in 0..m {
                let dst = std::slice::from_raw_parts_mut(out.add(i * rows + r0), width);
                for (d, s) in dst.iter_mut().zip(&acc[i * width..(i + 1) * width]) {
                    *d = T::from_f32(*s);
                }
            }
        }
        match self {
            OutPtr::F32(p) => put(p, acc, m, rows, r0, r1),
            OutPtr::F16(p) => put(p, acc, m, rows, r0, r1),
            OutPtr::BF16(p) => put(p, acc, m, rows, r0, r1),
        }
    }
}

/// Decodes one chunk of a packed tensor that starts on a block boundary: `out.len()` values
/// from `packed`, block `b` of the chunk scaled by `scale(b)`. Every level gives the same bits:
/// `code[nibble] * scale` in float32, rounded once to `T`. With `stream`, the vector levels store
/// past the caches (see [`STREAM_MIN_BYTES`]).
///
/// SAFETY: the CPU supports `isa`.
pub(crate) unsafe fn decode_chunk<T: Element, F: Fn(usize) -> f32>(
    isa: Isa,
    packed: &[u8],
    out: &mut [T],
    code: &[f32; 16],
    blocksize: usize,
    scale: F,
    stream: bool,
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Bf16 if T::DTYPE == DType::BF16 => {
            // T is bf16 (the only Element with that DTYPE).
            let out = std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut bf16, out.len());
            avx512::decode_chunk_bf16_native(packed, out, code, blocksize, scale, stream)
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Bf16 => avx512::decode_chunk(packed, out, code, blocksize, scale, stream),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::decode_chunk(packed, out, code, blocksize, scale, stream),
        _ => portable::decode_chunk(packed, out, code, blocksize, scale),
    }
}

#[cfg(test)]
mod tests;

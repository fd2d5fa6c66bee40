//! Argument checking and launches of the 4-bit kernels.
//!
//! Each operation is a plain struct of device addresses and sizes; `plan()` validates it and
//! computes the launch geometry without touching the GPU (so every check is testable on a CPU),
//! and the free functions load the module (once per device) and launch on the given stream.

use std::ffi::{c_void, CString};
use std::sync::Mutex;

use cudarc::driver::sys;

use super::driver::{self, check, describe, Context};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::quant4::{check_blocksize, QuantType};

/// Every kernel in the fatbin, looked up when the module loads.
const KERNEL_NAMES: &[&str] = &[
    "qlora_dequantize_4bit_f32",
    "qlora_dequantize_4bit_f16",
    "qlora_dequantize_4bit_bf16",
    "qlora_gemm_4bit_gemv_w8_bf16",
    "qlora_gemm_4bit_gemv_w8_f16",
    "qlora_gemm_4bit_gemv_w16_bf16",
    "qlora_gemm_4bit_gemv_w16_f16",
    "qlora_gemm_4bit_gemv_w32_bf16",
    "qlora_gemm_4bit_gemv_w32_f16",
    "qlora_gemm_4bit_mma_bf16",
    "qlora_gemm_4bit_mma_f16",
    "qlora_gemm_4bit_simt_m1_bf16",
    "qlora_gemm_4bit_simt_m1_f16",
    "qlora_gemm_4bit_simt_m4_bf16",
    "qlora_gemm_4bit_simt_m4_f16",
];

/// Threads per block of the dequantize kernel, and the 4-byte words (8 elements each) each thread
/// decodes (`kDequantWords` in cuda/dequant.cu).
const DEQUANT_THREADS: u64 = 256;
const DEQUANT_WORDS: u64 = 4;
/// Output columns per block of the tensor-core GEMM (4 tiles of 8).
const MMA_COLUMNS: usize = 32;
/// Warps per block of the SIMT GEMM (`kSimtWarps`), a warp per output column.
const SIMT_WARPS: u32 = 8;
/// Rows of W per block of the tensor-core GEMV, and the warps per block it has an instance for
/// (`qlora_gemm_4bit_gemv_w{warps}_*` in cuda/gemm_4bit.cu).
const GEMV_ROWS: usize = 16;
pub const GEMV_WARPS: [u32; 3] = [8, 16, 32];
/// Largest M each fused kernel supports.
pub const GEMV_MAX_M: usize = 8;
pub const MMA_MAX_M: usize = 16;
pub const SIMT_MAX_M: usize = 4;

/// The block scales of a 4-bit tensor: float32 `absmax`, or (double quant) uint8 codes decoded
/// as `nested_code[q] * nested_absmax[block / 256] + offset`.
#[derive(Clone, Copy, Debug)]
pub struct Scales {
    pub absmax: u64,
    pub nested: Option<NestedScales>,
}

#[derive(Clone, Copy, Debug)]
pub struct NestedScales {
    pub nested_absmax: u64,
    pub nested_code: u64,
    pub offset: f32,
}

impl Scales {
    fn check(&self) -> Result<()> {
        if self.absmax == 0 {
            return Err(Error::unsupported("absmax is a null device pointer"));
        }
        if let Some(n) = self.nested {
            if n.nested_absmax == 0 || n.nested_code == 0 {
                return Err(Error::unsupported("nested_absmax/nested_code is a null device pointer"));
            }
            if !n.offset.is_finite() {
                return Err(Error::unsupported(format!("double-quant offset must be finite, got {}", n.offset)));
            }
        }
        Ok(())
    }
}

/// Geometry of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub kernel: &'static str,
    pub grid: u32,
    pub block: u32,
    pub shared_bytes: u32,
    /// Dequantize only: 16-byte loads and stores are allowed (both pointers 16-byte aligned).
    pub vectorized: bool,
}

fn quant_index(qt: QuantType) -> i32 {
    // Must match `enum QuantType` in cuda/codebook.cuh.
    match qt {
        QuantType::Nf4 => 0,
        QuantType::Fp4 => 1,
        QuantType::Int4 => 2,
    }
}

fn grid_of(blocks: u64, what: &str) -> Result<u32> {
    u32::try_from(blocks)
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| Error::unsupported(format!("{what} is too large for one launch ({blocks} thread blocks)")))
}

/// Dequantize `n` elements of a packed 4-bit tensor into `out` (`dtype`).
#[derive(Clone, Copy, Debug)]
pub struct Dequantize4bit {
    pub packed: u64,
    pub scales: Scales,
    pub n: u64,
    pub quant_type: QuantType,
    pub blocksize: usize,
    pub out: u64,
    pub dtype: DType,
}

impl Dequantize4bit {
    /// Validates the arguments; `None` when there is nothing to do (n == 0).
    pub fn plan(&self) -> Result<Option<Launch>> {
        check_blocksize(self.blocksize)?;
        if self.n == 0 {
            return Ok(None);
        }
        if self.packed == 0 || self.out == 0 {
            return Err(Error::unsupported("dequantize_4bit: packed/out is a null device pointer"));
        }
        self.scales.check()?;
        let words = self.n.div_ceil(8);
        let kernel = match self.dtype {
            DType::F32 => "qlora_dequantize_4bit_f32",
            DType::F16 => "qlora_dequantize_4bit_f16",
            DType::BF16 => "qlora_dequantize_4bit_bf16",
        };
        Ok(Some(Launch {
            kernel,
            grid: grid_of(words.div_ceil(DEQUANT_THREADS * DEQUANT_WORDS), "dequantize_4bit")?,
            block: DEQUANT_THREADS as u32,
            shared_bytes: 0,
            vectorized: self.packed.is_multiple_of(16) && self.out.is_multiple_of(16),
        }))
    }
}

/// Which fused GEMM kernel to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmKernel {
    /// Tensor cores with W as the A operand, M <= 8; `warps` (8, 16 or 32) split K inside a block.
    Gemv { warps: u32 },
    /// Tensor cores, M <= 16; `warps` (1, 2, 4, 8 or 16) split K inside a block.
    Mma { warps: u32 },
    /// Plain FMA, M <= 4.
    Simt,
}

impl GemmKernel {
    pub fn parse(name: &str, warps: u32) -> Result<Self> {
        match name {
            "gemv" => Ok(GemmKernel::Gemv { warps }),
            "mma" => Ok(GemmKernel::Mma { warps }),
            "simt" => Ok(GemmKernel::Simt),
            _ => Err(Error::unsupported(format!(
                "unknown 4-bit GEMM kernel {name:?}: expected \"gemv\", \"mma\" or \"simt\""
            ))),
        }
    }
}

/// `out[m, n] = x[m, k] @ dequant(W[n, k])^T` for small m, reading the packed weight directly.
#[derive(Clone, Copy, Debug)]
pub struct Gemm4bit {
    pub x: u64,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub dtype: DType,
    pub packed: u64,
    pub scales: Scales,
    pub quant_type: QuantType,
    pub blocksize: usize,
    pub out: u64,
    pub kernel: GemmKernel,
}

impl Gemm4bit {
    pub fn plan(&self) -> Result<Launch> {
        check_blocksize(self.blocksize)?;
        let suffix =
            match self.dtype {
                DType::BF16 => "bf16",
                DType::F16 => "f16",
                DType::F32 => return Err(Error::unsupported(
                    "the fused 4-bit GEMM takes float16 or bfloat16 activations, got float32 (use dequantize + matmul)",
                )),
            };
        let max_m = match self.kernel {
            GemmKernel::Gemv { .. } => GEMV_MAX_M,
            GemmKernel::Mma { .. } => MMA_MAX_M,
            GemmKernel::Simt => SIMT_MAX_M,
        };
        if self.m == 0 || self.m > max_m {
            return Err(Error::unsupported(format!(
                "the fused 4-bit GEMM ({:?}) takes 1 to {max_m} rows of activations, got {}",
                self.kernel, self.m
            )));
        }
        if self.n == 0 || self.k == 0 || !self.k.is_multiple_of(32) {
            return Err(Error::unsupported(format!(
                "the fused 4-bit GEMM needs a weight [N, K] with N > 0 and K a positive multiple of 32, got [{}, {}]",
                self.n, self.k
            )));
        }
        if self.n > i32::MAX as usize || self.k > i32::MAX as usize {
            return Err(Error::unsupported(format!("weight [{}, {}] is too large for the fused GEMM", self.n, self.k)));
        }
        if self.x == 0 || self.packed == 0 || self.out == 0 {
            return Err(Error::unsupported("gemm_4bit: x/packed/out is a null device pointer"));
        }
        if !self.x.is_multiple_of(16) || !self.packed.is_multiple_of(16) {
            return Err(Error::unsupported(
                "the fused 4-bit GEMM needs x and the packed weight 16-byte aligned (use dequantize + matmul)",
            ));
        }
        self.scales.check()?;
        Ok(match self.kernel {
            GemmKernel::Gemv { warps } => Launch {
                kernel: match (warps, suffix == "bf16") {
                    (8, true) => "qlora_gemm_4bit_gemv_w8_bf16",
                    (8, false) => "qlora_gemm_4bit_gemv_w8_f16",
                    (16, true) => "qlora_gemm_4bit_gemv_w16_bf16",
                    (16, false) => "qlora_gemm_4bit_gemv_w16_f16",
                    (32, true) => "qlora_gemm_4bit_gemv_w32_bf16",
                    (32, false) => "qlora_gemm_4bit_gemv_w32_f16",
                    _ => {
                        return Err(Error::unsupported(format!(
                            "gemv GEMM warps must be one of {GEMV_WARPS:?}, got {warps}"
                        )))
                    }
                },
                grid: grid_of(self.n.div_ceil(GEMV_ROWS) as u64, "gemm_4bit")?,
                block: 32 * warps,
                shared_bytes: 0,
                vectorized: true,
            },
            GemmKernel::Mma { warps } => {
                if !matches!(warps, 1 | 2 | 4 | 8 | 16) {
                    return Err(Error::unsupported(format!("mma GEMM warps must be 1, 2, 4, 8 or 16, got {warps}")));
                }
                Launch {
                    kernel: if suffix == "bf16" { "qlora_gemm_4bit_mma_bf16" } else { "qlora_gemm_4bit_mma_f16" },
                    grid: grid_of(self.n.div_ceil(MMA_COLUMNS) as u64, "gemm_4bit")?,
                    block: 32 * warps,
                    shared_bytes: warps * (MMA_COLUMNS as u32 / 8) * 4 * 32 * 4,
                    vectorized: true,
                }
            }
            GemmKernel::Simt => Launch {
                // One row of activations has its own instance (fewer registers, no unused loads).
                kernel: match (self.m == 1, suffix == "bf16") {
                    (true, true) => "qlora_gemm_4bit_simt_m1_bf16",
                    (true, false) => "qlora_gemm_4bit_simt_m1_f16",
                    (false, true) => "qlora_gemm_4bit_simt_m4_bf16",
                    (false, false) => "qlora_gemm_4bit_simt_m4_f16",
                },
                grid: grid_of(self.n.div_ceil(SIMT_WARPS as usize) as u64, "gemm_4bit")?,
                block: 32 * SIMT_WARPS,
                shared_bytes: 0,
                vectorized: true,
            },
        })
    }
}

/// A loaded module and its kernels on one device.
pub(crate) struct Kernels {
    ctx: Context,
    functions: Vec<(&'static str, sys::CUfunction)>,
}

// SAFETY: function handles may be used from any thread while their module stays loaded (forever).
unsafe impl Send for Kernels {}
unsafe impl Sync for Kernels {}

impl Kernels {
    fn function(&self, name: &str) -> Result<sys::CUfunction> {
        self.functions
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| *f)
            .ok_or_else(|| Error::Cuda { call: "cuModuleGetFunction".into(), message: format!("no kernel {name}") })
    }
}

/// Driver functions the launches call beyond the shared ones (see `driver`).
const KERNEL_SYMBOLS: &[&str] = &["cuModuleLoadData", "cuModuleGetFunction", "cuFuncLoad", "cuLaunchKernel"];

/// The kernels of `device`, loading the module from the embedded fatbin on first use.
pub(crate) fn kernels(device: i32) -> Result<&'static Kernels> {
    static LOADED: Mutex<Vec<Option<&'static Kernels>>> = Mutex::new(Vec::new());
    let image = super::fatbin().ok_or_else(super::not_compiled)?;
    let mut loaded = LOADED.lock().unwrap_or_else(|p| p.into_inner());
    // The launch path: one lock and a lookup once the module is loaded.
    if let Some(Some(k)) = usize::try_from(device).ok().and_then(|d| loaded.get(d)) {
        return Ok(k);
    }
    driver::require("the CUDA kernels", "13.0", KERNEL_SYMBOLS)?;
    let ctx = Context::primary(device)?; // checks the ordinal (0 <= device < count)
    if loaded.len() <= device as usize {
        loaded.resize(device as usize + 1, None);
    }
    let k = ctx.run(|| {
        let mut module: sys::CUmodule = std::ptr::null_mut();
        // SAFETY: `image` is a complete fatbin, 16-byte aligned, alive for the whole process.
        let r = unsafe { sys::cuModuleLoadData(&mut module, image.as_ptr() as *const c_void) };
        if r != sys::CUresult::CUDA_SUCCESS {
            let (major, minor) = ctx.capability;
            let hint = match r {
                sys::CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU | sys::CUresult::CUDA_ERROR_INVALID_PTX => format!(
                    "; the kernels were built for {} and device {device} has compute capability {major}.{minor} \
                     (they need 8.0 or newer)",
                    super::ARCHS
                ),
                sys::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION => format!(
                    "; the kernels were compiled by nvcc {} and the driver is older: update the NVIDIA driver",
                    super::NVCC_VERSION
                ),
                _ => String::new(),
            };
            return Err(Error::Cuda { call: "cuModuleLoadData".into(), message: format!("{}{hint}", describe(r)) });
        }
        let mut functions = Vec::with_capacity(KERNEL_NAMES.len());
        for name in KERNEL_NAMES {
            let cname = CString::new(*name).expect("kernel names have no NUL");
            let mut f: sys::CUfunction = std::ptr::null_mut();
            // SAFETY: the module was just loaded and is never unloaded.
            check(&format!("cuModuleGetFunction({name})"), unsafe {
                sys::cuModuleGetFunction(&mut f, module, cname.as_ptr())
            })?;
            // Load the code now: under lazy loading (PyTorch's default) the first launch would
            // load it, and a first launch inside CUDA graph capture must not.
            // SAFETY: `f` was just returned by the driver.
            check(&format!("cuFuncLoad({name})"), unsafe { sys::cuFuncLoad(f) })?;
            functions.push((*name, f));
        }
        Ok(Kernels { ctx, functions })
    })?;
    let k: &'static Kernels = Box::leak(Box::new(k));
    loaded[device as usize] = Some(k);
    Ok(k)
}

/// Launches `launch.kernel` with the given parameter pointers on `stream` (a raw CUstream; 0 is
/// the legacy default stream).
///
/// SAFETY: `params` must match the kernel's parameter list in number, order and size, and every
/// device address in them must be valid for what the kernel reads and writes.
unsafe fn launch_raw(device: i32, stream: u64, launch: &Launch, params: &mut [*mut c_void]) -> Result<()> {
    let k = kernels(device)?;
    let f = k.function(launch.kernel)?;
    k.ctx.run(|| {
        check(
            launch.kernel,
            sys::cuLaunchKernel(
                f,
                launch.grid,
                1,
                1,
                launch.block,
                1,
                1,
                launch.shared_bytes,
                stream as usize as sys::CUstream,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            ),
        )
    })
}

fn param<T>(v: &mut T) -> *mut c_void {
    v as *mut T as *mut c_void
}

/// Scale parameters as the kernels take them: absmax, nested_absmax, nested_code, offset, nested.
struct ScaleParams {
    absmax: u64,
    nested_absmax: u64,
    nested_code: u64,
    offset: f32,
    nested: i32,
}

impl ScaleParams {
    fn new(s: &Scales) -> Self {
        match s.nested {
            Some(n) => ScaleParams {
                absmax: s.absmax,
                nested_absmax: n.nested_absmax,
                nested_code: n.nested_code,
                offset: n.offset,
                nested: 1,
            },
            None => ScaleParams { absmax: s.absmax, nested_absmax: 0, nested_code: 0, offset: 0.0, nested: 0 },
        }
    }
}

/// Dequantizes on `device` (its ordinal) on `stream`. The device addresses must belong to that
/// device and stay valid until the stream has run the kernel.
pub fn dequantize_4bit(device: i32, stream: u64, args: &Dequantize4bit) -> Result<()> {
    let Some(launch) = args.plan()? else {
        return Ok(());
    };
    let mut packed = args.packed;
    let mut s = ScaleParams::new(&args.scales);
    let mut n = args.n;
    let mut qt = quant_index(args.quant_type);
    let mut log2 = args.blocksize.trailing_zeros() as i32;
    let mut out = args.out;
    let mut vec_ok = launch.vectorized as i32;
    let mut params = [
        param(&mut packed),
        param(&mut s.absmax),
        param(&mut s.nested_absmax),
        param(&mut s.nested_code),
        param(&mut s.offset),
        param(&mut s.nested),
        param(&mut n),
        param(&mut qt),
        param(&mut log2),
        param(&mut out),
        param(&mut vec_ok),
    ];
    // SAFETY: the parameter list matches QLORA_DEQUANT_4BIT in cuda/dequant.cu; the caller
    // guarantees the addresses (checked for size by the Python layer).
    unsafe { launch_raw(device, stream, &launch, &mut params) }
}

/// Runs the fused small-M GEMM on `device` on `stream`.
pub fn gemm_4bit(device: i32, stream: u64, args: &Gemm4bit) -> Result<()> {
    let launch = args.plan()?;
    let mut x = args.x;
    let mut packed = args.packed;
    let mut s = ScaleParams::new(&args.scales);
    let mut m = args.m as i32;
    let mut n = args.n as i32;
    let mut k = args.k as i32;
    let mut qt = quant_index(args.quant_type);
    let mut log2 = args.blocksize.trailing_zeros() as i32;
    let mut out = args.out;
    let mut params = [
        param(&mut x),
        param(&mut packed),
        param(&mut s.absmax),
        param(&mut s.nested_absmax),
        param(&mut s.nested_code),
        param(&mut s.offset),
        param(&mut s.nested),
        param(&mut m),
        param(&mut n),
        param(&mut k),
        param(&mut qt),
        param(&mut log2),
        param(&mut out),
    ];
    // SAFETY: the parameter list matches QLORA_GEMM_4BIT_ARGS in cuda/gemm_4bit.cu.
    unsafe { launch_raw(device, stream, &launch, &mut params) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dq(n: u64, dtype: DType) -> Dequantize4bit {
        Dequantize4bit {
            packed: 0x1000,
            scales: Scales { absmax: 0x2000, nested: None },
            n,
            quant_type: QuantType::Nf4,
            blocksize: 64,
            out: 0x3000,
            dtype,
        }
    }

    fn gemm(m: usize, n: usize, k: usize, kernel: GemmKernel) -> Gemm4bit {
        Gemm4bit {
            x: 0x1000,
            m,
            n,
            k,
            dtype: DType::BF16,
            packed: 0x2000,
            scales: Scales { absmax: 0x3000, nested: None },
            quant_type: QuantType::Nf4,
            blocksize: 64,
            out: 0x4000,
            kernel,
        }
    }

    #[test]
    fn dequant_geometry() {
        let l = dq(4096 * 4096, DType::BF16).plan().unwrap().unwrap();
        assert_eq!(l.kernel, "qlora_dequantize_4bit_bf16");
        assert_eq!(l.grid as u64, (4096u64 * 4096 / 8).div_ceil(256 * 4));
        assert!(l.vectorized);
        // 33 elements: five words, one block; an odd address disables the vector path.
        let mut a = dq(33, DType::F32);
        a.packed = 0x1001;
        let l = a.plan().unwrap().unwrap();
        assert_eq!((l.grid, l.block, l.vectorized), (1, 256, false));
        assert!(dq(0, DType::F16).plan().unwrap().is_none());
    }

    #[test]
    fn dequant_rejects_bad_arguments() {
        let mut a = dq(64, DType::BF16);
        a.blocksize = 48;
        assert!(a.plan().unwrap_err().to_string().contains("unsupported blocksize 48"));
        let mut a = dq(64, DType::BF16);
        a.scales.absmax = 0;
        assert!(a.plan().unwrap_err().to_string().contains("absmax is a null"));
        let mut a = dq(64, DType::BF16);
        a.scales.nested = Some(NestedScales { nested_absmax: 8, nested_code: 0, offset: 0.5 });
        assert!(a.plan().unwrap_err().to_string().contains("nested_code is a null"));
    }

    /// The geometry here is written for constants and instances in cuda/: each of them matches its
    /// twin there, and every kernel looked up is defined (a GPU run would fail at load otherwise).
    #[test]
    fn launch_constants_match_the_kernel_sources() {
        let src = [include_str!("../../cuda/dequant.cu"), include_str!("../../cuda/gemm_4bit.cu")].concat();
        let value = |name: &str| -> usize {
            let at = src.find(&format!("constexpr int {name} = ")).unwrap_or_else(|| panic!("{name} not in cuda/"));
            let rest = &src[at..];
            let after = rest[rest.find('=').unwrap() + 1..].trim_start();
            after.chars().take_while(char::is_ascii_digit).collect::<String>().parse().unwrap()
        };
        assert_eq!(value("kDequantWords"), DEQUANT_WORDS as usize);
        assert_eq!(value("kSimtWarps"), SIMT_WARPS as usize);
        assert_eq!(value("kSimtMaxM"), SIMT_MAX_M);
        assert_eq!(8 * value("kMmaTiles"), MMA_COLUMNS);
        for warps in GEMV_WARPS {
            for (suffix, ty) in [("bf16", "__nv_bfloat16"), ("f16", "__half")] {
                let instance = format!("QLORA_GEMM_4BIT_GEMV(qlora_gemm_4bit_gemv_w{warps}_{suffix}, {ty}, {warps},");
                assert!(src.contains(&instance), "{instance}");
            }
        }
        for name in KERNEL_NAMES {
            assert!(src.contains(&format!("({name},")), "{name} is not defined in cuda/");
        }
    }

    #[test]
    fn gemm_geometry_and_checks() {
        let l = gemm(8, 4097, 4096, GemmKernel::Gemv { warps: 8 }).plan().unwrap();
        assert_eq!((l.kernel, l.grid, l.block, l.shared_bytes), ("qlora_gemm_4bit_gemv_w8_bf16", 257, 256, 0));
        for warps in GEMV_WARPS {
            let mut g = gemm(1, 1024, 4096, GemmKernel::Gemv { warps });
            g.dtype = DType::F16;
            let l = g.plan().unwrap();
            assert_eq!((l.kernel, l.grid, l.block), (format!("qlora_gemm_4bit_gemv_w{warps}_f16").as_str(), 64, 32 * warps));
            assert!(KERNEL_NAMES.contains(&l.kernel));
        }
        assert!(gemm(9, 64, 64, GemmKernel::Gemv { warps: 8 }).plan().unwrap_err().to_string().contains("1 to 8 rows"));
        let e = gemm(1, 64, 64, GemmKernel::Gemv { warps: 4 }).plan().unwrap_err().to_string();
        assert!(e.contains("gemv GEMM warps must be one of [8, 16, 32], got 4"), "{e}");
        let l = gemm(1, 4096, 4096, GemmKernel::Mma { warps: 8 }).plan().unwrap();
        assert_eq!((l.kernel, l.grid, l.block, l.shared_bytes), ("qlora_gemm_4bit_mma_bf16", 128, 256, 16384));
        let l = gemm(16, 33, 4096, GemmKernel::Mma { warps: 16 }).plan().unwrap();
        assert_eq!((l.grid, l.block, l.shared_bytes), (2, 512, 32768));
        let l = gemm(4, 14336, 4096, GemmKernel::Simt).plan().unwrap();
        assert_eq!((l.kernel, l.grid, l.block), ("qlora_gemm_4bit_simt_m4_bf16", 1792, 256));
        let mut g = gemm(1, 4097, 4096, GemmKernel::Simt);
        g.dtype = DType::F16;
        let l = g.plan().unwrap();
        assert_eq!((l.kernel, l.grid, l.block), ("qlora_gemm_4bit_simt_m1_f16", 513, 256));
        let err = |g: Gemm4bit| g.plan().unwrap_err().to_string();
        assert!(err(gemm(17, 64, 64, GemmKernel::Mma { warps: 8 })).contains("1 to 16 rows"));
        assert!(err(gemm(5, 64, 64, GemmKernel::Simt)).contains("1 to 4 rows"));
        assert!(err(gemm(1, 64, 48, GemmKernel::Simt)).contains("multiple of 32"));
        assert!(err(gemm(1, 64, 64, GemmKernel::Mma { warps: 3 })).contains("warps must be"));
        let mut g = gemm(1, 64, 64, GemmKernel::Simt);
        g.x = 0x1002;
        assert!(err(g).contains("16-byte aligned"));
        let mut g = gemm(1, 64, 64, GemmKernel::Simt);
        g.dtype = DType::F32;
        assert!(err(g).contains("float32"));
        assert!(GemmKernel::parse("wmma", 8).unwrap_err().to_string().contains("\"gemv\", \"mma\" or \"simt\""));
        assert_eq!(GemmKernel::parse("gemv", 16).unwrap(), GemmKernel::Gemv { warps: 16 });
    }

    #[test]
    fn launches_fail_cleanly_without_a_usable_gpu() {
        // On a machine without a driver (CI), or a build without kernels, a launch is an error
        // naming the cause, never a panic. With a GPU and kernels the module loads.
        match super::super::check_device(0) {
            Ok(()) => {}
            Err(Error::CudaUnavailable(msg)) => {
                assert!(msg.contains("libcuda") || msg.contains("built without") || msg.contains("cuInit"), "{msg}");
            }
            Err(e) => panic!("unexpected error kind: {e}"),
        }
        match super::super::check_device(-1) {
            Ok(()) => panic!("device -1 cannot exist"),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
}

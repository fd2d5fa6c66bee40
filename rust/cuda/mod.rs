//! CUDA kernels (`cuda/*.cu`, compiled by build.rs into one embedded fatbin) launched through the
//! driver API on a caller-given stream.
//!
//! Tensors stay owned by the caller (PyTorch): launches take raw device addresses (`data_ptr()`)
//! and a raw `CUstream` handle, and nothing here wraps them in an owning allocation. Without nvcc
//! at build time the same API exists and every launch returns `Error::CudaUnavailable` saying how
//! to build with kernels.

pub mod driver;
pub mod launch;

pub use launch::{dequantize_4bit, gemm_4bit, Dequantize4bit, Gemm4bit, GemmKernel, Launch, NestedScales, Scales};

use crate::error::{Error, Result};

/// Whether build.rs compiled the kernels into this library.
pub const KERNELS_COMPILED: bool = cfg!(qlora_cuda_kernels);

/// The targets build.rs asked nvcc for, e.g. "sm_80,sm_86,sm_89,sm_90,compute_90" ("" without kernels).
pub const ARCHS: &str = match option_env!("QLORA_RS_CUDA_ARCHS") {
    Some(s) => s,
    None => "",
};

/// The nvcc release that compiled the kernels, e.g. "13.0.88" ("" without kernels).
pub const NVCC_VERSION: &str = match option_env!("QLORA_RS_NVCC_VERSION") {
    Some(s) => s,
    None => "",
};

/// How to get a build with kernels; part of every "not compiled" error.
pub const HOW_TO_BUILD: &str = "qlora-rs was built without its CUDA kernels (nvcc was not found at build time). \
    To build them: install nvcc (`pip install nvidia-cuda-nvcc==13.0.*`, or a CUDA toolkit) or point NVCC=/path/to/nvcc \
    at one, then rebuild: `maturin develop --release` (or `pip install --no-binary qlora-rs .`); \
    qlora_rs.build_info()['cuda_kernels'] then reports True.";

/// The embedded fatbin, when the kernels were compiled in.
#[cfg(qlora_cuda_kernels)]
pub fn fatbin() -> Option<&'static [u8]> {
    // The driver reads the image's 64-bit header fields in place: keep it 16-byte aligned.
    #[repr(C, align(16))]
    struct Aligned<B: ?Sized>(B);
    static FATBIN: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/qlora_kernels.fatbin")));
    Some(&FATBIN.0)
}

/// The embedded fatbin, when the kernels were compiled in.
#[cfg(not(qlora_cuda_kernels))]
pub fn fatbin() -> Option<&'static [u8]> {
    None
}

/// The error every launch returns in a build without kernels.
pub fn not_compiled() -> Error {
    Error::CudaUnavailable(HOW_TO_BUILD.to_string())
}

/// The code objects in a fatbin: "sm_XY" for machine code, "compute_XY" for PTX, in file order.
///
/// Reads the container's framing (a 16-byte header with magic 0xBA55ED50, then entries with their
/// kind, header size, payload size and target) -- enough to prove which targets were built.
pub fn fatbin_targets(bytes: &[u8]) -> Result<Vec<String>> {
    const MAGIC: u32 = 0xBA55_ED50;
    let bad = |what: &str| Error::unsupported(format!("not a CUDA fatbin: {what}"));
    let u16_at = |o: usize| bytes.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| bytes.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |o: usize| bytes.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    if u32_at(0) != Some(MAGIC) {
        return Err(bad("wrong magic number"));
    }
    let header = u16_at(6).ok_or_else(|| bad("truncated header"))? as usize;
    let body = u64_at(8).ok_or_else(|| bad("truncated header"))? as usize;
    let end = header.checked_add(body).filter(|&e| e <= bytes.len()).ok_or_else(|| bad("size beyond the data"))?;
    let mut targets = Vec::new();
    let mut off = header;
    while off < end {
        let kind = u16_at(off).ok_or_else(|| bad("truncated entry"))?;
        let entry_header = u32_at(off + 4).ok_or_else(|| bad("truncated entry"))? as usize;
        let payload = u64_at(off + 8).ok_or_else(|| bad("truncated entry"))? as usize;
        let arch = u32_at(off + 28).ok_or_else(|| bad("truncated entry"))?;
        targets.push(match kind {
            1 => format!("compute_{arch}"),
            2 => format!("sm_{arch}"),
            k => format!("kind{k}_{arch}"),
        });
        let step = entry_header.checked_add(payload).filter(|&s| s > 0).ok_or_else(|| bad("empty entry"))?;
        off = off.checked_add(step).ok_or_else(|| bad("entry size overflows"))?;
    }
    Ok(targets)
}

/// Ok when kernels can be launched on `device`: compiled in, driver present, device exists, and
/// its module loads. Otherwise the error a launch would return.
pub fn check_device(device: i32) -> Result<()> {
    launch::kernels(device).map(|_| ())
}

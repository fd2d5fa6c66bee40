//! The instruction-set levels the CPU kernels over packed 4-bit weights dispatch on (dequantize,
//! fused matmul), detected at run time: one binary runs on every x86-64 CPU and uses the widest
//! vectors each one has.
//!
//! `QLORA_RS_CPU_ISA` (`avx512bf16`, `avx512`, `avx2` or `portable`, read once) caps the level a
//! process uses, e.g. to compare paths or to rule one out; a cap above what the CPU has is no
//! error (the CPU's best level below it runs). Functions that take an explicit [`Isa`] run that
//! level, and fail with an error when the CPU lacks it (tests run every level this way).

use std::sync::OnceLock;

use crate::error::{Error, Result};

/// Environment variable that caps the level (see the module docs).
pub const ENV_VAR: &str = "QLORA_RS_CPU_ISA";

/// A dispatch level, ordered from the narrowest to the widest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Plain Rust (what the compiler makes of it for the baseline target).
    Portable,
    /// AVX2 + FMA + F16C: 8-lane decode through two `vpermps` and a blend.
    Avx2,
    /// AVX-512 F/BW/VL: 16-lane decode through one `vpermps`; bfloat16 rounded in integer code.
    Avx512,
    /// [`Isa::Avx512`] with AVX512-BF16: bfloat16 output through `vcvtne2ps2bf16`.
    Avx512Bf16,
}

impl Isa {
    /// Every level, widest first.
    pub const ALL: [Isa; 4] = [Isa::Avx512Bf16, Isa::Avx512, Isa::Avx2, Isa::Portable];

    pub const NAMES: &'static str = "\"avx512bf16\", \"avx512\", \"avx2\", \"portable\"";

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Bf16 => "avx512bf16",
        }
    }

    pub fn parse(name: &str) -> Result<Isa> {
        let lower = name.trim().to_ascii_lowercase();
        Isa::ALL.into_iter().find(|isa| isa.name() == lower).ok_or_else(|| {
            Error::unsupported(format!("unknown CPU instruction-set level {name:?}: expected one of {}", Self::NAMES))
        })
    }

    /// Whether this CPU runs the level.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.is_supported()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 => Isa::Avx512.is_supported() && is_x86_feature_detected!("avx512bf16"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The levels this CPU runs, widest first.
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|isa| isa.is_supported()).collect()
    }

    /// The widest level this CPU runs.
    pub fn detected() -> Isa {
        Isa::ALL.into_iter().find(|isa| isa.is_supported()).unwrap_or(Isa::Portable)
    }

    /// The level the kernels use when not told: [`Isa::detected`], capped by `QLORA_RS_CPU_ISA`.
    /// Errors (every time) when the variable holds an unknown name.
    pub fn current() -> Result<Isa> {
        static CURRENT: OnceLock<std::result::Result<Isa, String>> = OnceLock::new();
        CURRENT
            .get_or_init(|| match std::env::var(ENV_VAR) {
                Ok(cap) if !cap.trim().is_empty() => match Isa::parse(&cap) {
                    Ok(cap) => Ok(Isa::ALL.into_iter().find(|isa| *isa <= cap && isa.is_supported()).unwrap_or(Isa::Portable)),
                    Err(e) => Err(format!("{ENV_VAR}: {e}")),
                },
                _ => Ok(Isa::detected()),
            })
            .clone()
            .map_err(Error::Unsupported)
    }

    /// Errors unless this CPU runs the level, naming the ones it does run.
    pub fn check_supported(self) -> Result<()> {
        if self.is_supported() {
            return Ok(());
        }
        let names: Vec<&str> = Isa::available().into_iter().map(Isa::name).collect();
        Err(Error::unsupported(format!(
            "this CPU cannot run the {:?} kernels; it runs {}",
            self.name(),
            names.join(", ")
        )))
    }
}

/// Environment variable: `1` or `0` turns [`bf16_products`] on or off (read once).
pub const BF16_PRODUCTS_VAR: &str = "QLORA_RS_BF16_PRODUCTS";

/// Whether the fused products of bfloat16 activations at [`Isa::Avx512Bf16`] multiply the weight
/// rounded to bfloat16 (`vdpbf16ps`: half the instructions of the float32 products a weight, and
/// the same weight the decode + GEMM of larger products multiplies) rather than the float32
/// weight. By default on CPUs without AMX: on a 2-core AMD Zen 5 it is 1.04-1.47x faster than the
/// float32 kernel (4096x4096, M = 1..16), while on the AVX-512 + AMX Xeon of an earlier
/// measurement `vdpbf16ps` took 2.2 cycles an instruction and the same kind of kernel was
/// 1.17-1.39x slower. `QLORA_RS_BF16_PRODUCTS=1` or `0` decides instead; anything else is an
/// error (every time).
pub fn bf16_products() -> Result<bool> {
    static CHOICE: OnceLock<std::result::Result<bool, String>> = OnceLock::new();
    CHOICE
        .get_or_init(|| match std::env::var(BF16_PRODUCTS_VAR) {
            Ok(v) if v.trim() == "1" => Ok(true),
            Ok(v) if v.trim() == "0" => Ok(false),
            Ok(v) if !v.trim().is_empty() => Err(format!("{BF16_PRODUCTS_VAR}={v:?}: expected 1 or 0")),
            _ => Ok(!has_amx()),
        })
        .clone()
        .map_err(Error::Unsupported)
}

/// Whether the CPU has AMX with bfloat16 tiles (CPUID leaf 7, EDX bit 22).
fn has_amx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        #[allow(unused_unsafe)] // safe in newer Rust
        // SAFETY: CPUID exists on every x86-64 CPU.
        let leaf = unsafe { std::arch::x86_64::__cpuid_count(7, 0) };
        leaf.edx & (1 << 22) != 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Which CPU runs a kernel call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    /// This one: the level is checked against it and the work is spread over the thread team.
    Native,
    /// An emulated CPU that the caller vouches runs the level (the tests run the levels this CPU
    /// lacks under an emulator: `qlora_rs._lib.set_cpu_emulator`). No check against this CPU,
    /// and one thread: the call must neither start threads nor look the CPU up, which the
    /// emulator cannot do or would answer for the emulated CPU (an answer cached process-wide).
    Emulated,
}

impl Host {
    /// Errors unless this host runs the level.
    pub fn check(self, isa: Isa) -> Result<()> {
        match self {
            Host::Native => isa.check_supported(),
            Host::Emulated => Ok(()),
        }
    }

    /// The threads a parallel kernel call may use here ([`crate::threads::team_size`], or one).
    pub fn team_size(self) -> usize {
        match self {
            Host::Native => crate::threads::team_size(),
            Host::Emulated => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_listed() {
        for isa in Isa::ALL {
            assert_eq!(Isa::parse(isa.name()).unwrap(), isa);
        }
        assert_eq!(Isa::parse(" AVX2 ").unwrap(), Isa::Avx2);
        let err = Isa::parse("sse9").unwrap_err().to_string();
        assert!(err.contains("sse9") && err.contains("portable"), "{err}");
    }

    #[test]
    fn levels_are_nested() {
        // Every level below a supported one is supported: the cap in `current` relies on it.
        let available = Isa::available();
        for isa in Isa::ALL {
            if isa.is_supported() {
                assert!(Isa::ALL.iter().filter(|l| **l <= isa).all(|l| available.contains(l)));
            }
        }
        assert_eq!(Isa::detected(), available[0]);
        assert!(available.contains(&Isa::Portable));
    }
}

//! The CUDA driver, loaded at run time through cudarc (no libcuda needed to build or import).
//! Shared by the kernel launches (`cuda::launch`) and the page manager (`paging`).
//!
//! cudarc panics when the driver library or one of its symbols is missing; every entry point here
//! first checks, once per process, that the library loads and has the symbols every user needs;
//! each user then checks its own ([`require`]) before its first call. A machine without a driver,
//! or with one too old for a feature, gets `Error::CudaUnavailable` and never a panic.
//!
//! Contexts: the device's primary context, the one PyTorch's runtime uses. It is retained once and
//! kept for the life of the process; work runs with it current on the calling thread (pushed and
//! popped when another context, or none, is current).

use std::ffi::{c_int, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, OnceLock};

use cudarc::driver::sys;

use crate::error::{Error, Result};

/// Driver functions this module calls itself (loading, errors, devices, contexts). Checked up front.
const BASE_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDriverGetVersion",
    "cuGetErrorName",
    "cuGetErrorString",
    "cuDeviceGet",
    "cuDeviceGetCount",
    "cuDeviceGetAttribute",
    "cuDevicePrimaryCtxRetain",
    "cuCtxGetCurrent",
    "cuCtxPushCurrent_v2",
    "cuCtxPopCurrent_v2",
];

/// The symbols of `names` that the loaded driver lacks. Only called once the library loaded.
fn missing_symbols(names: &[&'static str]) -> Vec<&'static str> {
    // SAFETY: `culib` returns the library `is_culib_present` found; looking a symbol up does not call it.
    let lib = unsafe { sys::culib() };
    names.iter().copied().filter(|name| unsafe { lib.get::<*const c_void>(name.as_bytes()) }.is_err()).collect()
}

/// Checks that the driver loads and has every symbol in `symbols`, which `feature` (e.g. "the CUDA
/// kernels") calls; `min_cuda` names the driver release that has them all (e.g. "13.0"). Callers
/// cache the result: this looks the symbols up each time.
pub fn require(feature: &str, min_cuda: &str, symbols: &[&'static str]) -> Result<()> {
    driver_version()?;
    let missing = missing_symbols(symbols);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::CudaUnavailable(format!(
            "the CUDA driver library lacks {}: the NVIDIA driver is too old for {feature} (a driver for CUDA \
             {min_cuda} or newer is needed)",
            missing.join(", ")
        )))
    }
}

/// Describes a failed driver call: its name, the error's name and text.
pub fn describe(result: sys::CUresult) -> String {
    // SAFETY: the driver returns pointers to static strings (or an error we ignore).
    unsafe {
        let mut name: *const std::ffi::c_char = std::ptr::null();
        let mut text: *const std::ffi::c_char = std::ptr::null();
        let n = if sys::cuGetErrorName(result, &mut name) == sys::CUresult::CUDA_SUCCESS && !name.is_null() {
            CStr::from_ptr(name).to_string_lossy().into_owned()
        } else {
            format!("{result:?}")
        };
        let t = if sys::cuGetErrorString(result, &mut text) == sys::CUresult::CUDA_SUCCESS && !text.is_null() {
            CStr::from_ptr(text).to_string_lossy().into_owned()
        } else {
            String::new()
        };
        if t.is_empty() {
            n
        } else {
            format!("{n} ({t})")
        }
    }
}

/// Turns a driver result into `Error::Cuda` naming the call.
pub fn check(call: &str, result: sys::CUresult) -> Result<()> {
    if result == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(Error::Cuda { call: call.to_string(), message: describe(result) })
    }
}

fn load_driver() -> std::result::Result<i32, String> {
    let probe = catch_unwind(|| {
        // SAFETY: loading a shared library runs its initialisers; libcuda's are expected to be sound.
        if !unsafe { sys::is_culib_present() } {
            return Err("the CUDA driver library (libcuda.so.1) was not found: no NVIDIA driver is installed \
                        or visible to this process"
                .to_string());
        }
        let missing = missing_symbols(BASE_SYMBOLS);
        if !missing.is_empty() {
            return Err(format!(
                "the CUDA driver library lacks {}: the NVIDIA driver is too old for qlora-rs",
                missing.join(", ")
            ));
        }
        // SAFETY: cuInit may be called any number of times.
        let init = unsafe { sys::cuInit(0) };
        if init == sys::CUresult::CUDA_ERROR_NO_DEVICE {
            return Err("no CUDA device is visible (cuInit: CUDA_ERROR_NO_DEVICE); check CUDA_VISIBLE_DEVICES".to_string());
        }
        if init != sys::CUresult::CUDA_SUCCESS {
            return Err(format!("cuInit failed: {}; is a GPU visible (CUDA_VISIBLE_DEVICES)?", describe(init)));
        }
        let mut version: c_int = 0;
        // SAFETY: writes one int.
        let r = unsafe { sys::cuDriverGetVersion(&mut version) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(format!("cuDriverGetVersion failed: {}", describe(r)));
        }
        Ok(version)
    });
    match probe {
        Ok(r) => r,
        Err(_) => Err("loading the CUDA driver library failed (cudarc panicked while loading it)".to_string()),
    }
}

/// The driver's CUDA version (e.g. 13000 for 13.0), after checking that the driver loads and
/// initialises. Cached: the check runs once per process.
pub fn driver_version() -> Result<i32> {
    static DRIVER: OnceLock<std::result::Result<i32, String>> = OnceLock::new();
    DRIVER.get_or_init(load_driver).clone().map_err(Error::CudaUnavailable)
}

/// Number of CUDA devices visible to the process.
pub fn device_count() -> Result<i32> {
    driver_version()?;
    let mut n: c_int = 0;
    // SAFETY: writes one int; the driver is initialised.
    check("cuDeviceGetCount", unsafe { sys::cuDeviceGetCount(&mut n) })?;
    Ok(n)
}

/// The primary context of one device, retained for the life of the process.
#[derive(Clone, Copy, Debug)]
pub struct Context {
    pub ordinal: i32,
    pub device: sys::CUdevice,
    pub ctx: sys::CUcontext,
    /// Compute capability, e.g. (9, 0).
    pub capability: (i32, i32),
}

// SAFETY: a CUcontext handle may be used from any thread; the driver synchronises its own state.
unsafe impl Send for Context {}
unsafe impl Sync for Context {}

impl Context {
    /// The primary context of device `ordinal` (the one PyTorch uses), retained on first use.
    pub fn primary(ordinal: i32) -> Result<Context> {
        static CONTEXTS: Mutex<Vec<Option<Context>>> = Mutex::new(Vec::new());
        let count = device_count()?;
        if ordinal < 0 || ordinal >= count {
            return Err(Error::unsupported(format!(
                "CUDA device {ordinal} does not exist: this process sees {count} device(s)"
            )));
        }
        let mut contexts = CONTEXTS.lock().unwrap_or_else(|p| p.into_inner());
        if contexts.len() <= ordinal as usize {
            contexts.resize(ordinal as usize + 1, None);
        }
        if let Some(c) = contexts[ordinal as usize] {
            return Ok(c);
        }
        let mut device: sys::CUdevice = 0;
        // SAFETY: out-parameters of the documented types; the ordinal was range-checked.
        unsafe {
            check("cuDeviceGet", sys::cuDeviceGet(&mut device, ordinal))?;
            let mut ctx: sys::CUcontext = std::ptr::null_mut();
            check("cuDevicePrimaryCtxRetain", sys::cuDevicePrimaryCtxRetain(&mut ctx, device))?;
            let mut major: c_int = 0;
            let mut minor: c_int = 0;
            check(
                "cuDeviceGetAttribute",
                sys::cuDeviceGetAttribute(
                    &mut major,
                    sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                    device,
                ),
            )?;
            check(
                "cuDeviceGetAttribute",
                sys::cuDeviceGetAttribute(
                    &mut minor,
                    sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                    device,
                ),
            )?;
            let c = Context { ordinal, device, ctx, capability: (major, minor) };
            contexts[ordinal as usize] = Some(c);
            Ok(c)
        }
    }

    /// Runs `f` with this context current on the calling thread, restoring the previous one after.
    pub fn run<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let mut current: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: writes one handle.
        check("cuCtxGetCurrent", unsafe { sys::cuCtxGetCurrent(&mut current) })?;
        if current == self.ctx {
            return f();
        }
        // SAFETY: the context is retained for the life of the process.
        check("cuCtxPushCurrent", unsafe { sys::cuCtxPushCurrent_v2(self.ctx) })?;
        let result = catch_unwind(AssertUnwindSafe(f));
        let mut popped: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: pops the context pushed above.
        let pop = check("cuCtxPopCurrent", unsafe { sys::cuCtxPopCurrent_v2(&mut popped) });
        match result {
            Ok(r) => {
                let r = r?;
                pop?;
                Ok(r)
            }
            Err(payload) => std::panic::resume_unwind(payload),
        }
    }
}

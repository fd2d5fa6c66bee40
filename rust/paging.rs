//! Managed (unified) memory for paged optimizer state, over the CUDA driver API.
//!
//! A [`ManagedBuffer`] is one `cuMemAllocManaged` allocation shared by reference counting: clones
//! are further owners, and the memory is freed (`cuMemFree`) when the last one goes away. The
//! driver can then move the pages between GPU and host memory; [`ManagedBuffer::prefetch`] does it
//! on request, asynchronously on a given stream (PyTorch's current stream, passed as a raw handle),
//! which is how the paged optimizers page their state out during the activation-heavy part of a
//! step and back in before the update.
//!
//! SAFETY RULE (shared GPUs): a program that asks for more managed memory than the card has free
//! can hang the GPU, not only itself. [`ManagedBuffer::allocate`] therefore reads `cuMemGetInfo`
//! first and refuses with [`Error::OutOfMemory`] unless the request, plus every live managed
//! allocation of this process, plus a safety margin fits in the free memory. Live allocations are
//! counted in full although the driver may already count some of them as used: the rule errs on
//! the side of refusing. The rule itself is the pure function [`check_managed_request`].
//!
//! Devices without concurrent managed access (`CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS` = 0:
//! Windows, some virtualised GPUs) still get plain managed allocations, but the driver migrates
//! managed memory wholesale at each kernel launch there and explicit prefetches and advice are
//! not available. Prefetches to the device become no-ops (counted as `prefetches_skipped`: the
//! launch migrates the data anyway), advice is skipped the same way, and a prefetch to the host
//! raises [`Error::Unsupported`], since the memory cannot be paged out on request.
//!
//! The driver is loaded dynamically (cudarc): this module first checks that `libcuda` and every
//! entry point it uses are present, so a machine without a driver gets
//! [`Error::CudaUnavailable`], never a panic.
//!
//! Statistics (bytes allocated now and at peak, bytes and counts of prefetches in each direction)
//! live in one process-wide registry, see [`stats`].

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use cudarc::driver::sys;

use crate::cuda::driver::{self, check, Context};
use crate::error::{Error, Result};

/// Bytes always left free on the GPU: the larger of this and [`SAFETY_MARGIN_FRACTION`] of the
/// card's memory.
pub const SAFETY_MARGIN_MIN_BYTES: usize = 256 << 20;

/// Fraction (1/32, about 3%) of the card's total memory always left free.
pub const SAFETY_MARGIN_FRACTION: usize = 32;

/// The legacy driver API's "device" number for the host in prefetch calls (`CU_DEVICE_CPU`).
pub const HOST: i32 = -1;

/// Where a prefetch moves data, or where advice points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// GPU memory of device `ordinal`.
    Device(i32),
    /// Host (CPU) memory.
    Host,
}

impl Location {
    /// `-1` (`CU_DEVICE_CPU`) is the host; any other value a device ordinal.
    pub fn from_ordinal(ordinal: i32) -> Result<Self> {
        match ordinal {
            HOST => Ok(Location::Host),
            d if d >= 0 => Ok(Location::Device(d)),
            d => Err(Error::unsupported(format!(
                "invalid location {d}: expected a CUDA device ordinal (>= 0) or -1 for the host"
            ))),
        }
    }

    fn describe(self) -> String {
        match self {
            Location::Device(d) => format!("cuda:{d}"),
            Location::Host => "host".into(),
        }
    }

    fn raw(self) -> sys::CUmemLocation {
        match self {
            Location::Device(d) => {
                sys::CUmemLocation { type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE, id: d }
            }
            Location::Host => sys::CUmemLocation { type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST, id: 0 },
        }
    }
}

/// Driver advice for a managed range (`cuMemAdvise`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// The pages' preferred home: faults from elsewhere map them instead of migrating them.
    PreferredLocation(Location),
    /// Keep a mapping in this device's page tables wherever the pages are, so its accesses to
    /// paged-out state read over the bus instead of faulting.
    AccessedBy(i32),
}

// --------------------------------------------------------------------------------------------
// The refusal rule (pure; unit-tested without a GPU)
// --------------------------------------------------------------------------------------------

/// Bytes kept free on a card of `total` bytes: max(256 MiB, total / 32).
pub fn safety_margin(total: usize) -> usize {
    SAFETY_MARGIN_MIN_BYTES.max(total / SAFETY_MARGIN_FRACTION)
}

/// Whether a managed allocation of `requested` bytes may be made when the device reports `free`
/// of `total` bytes free and this process already holds `live_managed` bytes of managed memory on
/// it. Refuses unless `requested + live_managed + safety_margin(total) <= free`, with an
/// [`Error::OutOfMemory`] that states every number; a zero-byte request is
/// [`Error::Unsupported`] (the driver rejects it).
pub fn check_managed_request(requested: usize, free: usize, total: usize, live_managed: usize) -> Result<()> {
    if requested == 0 {
        return Err(Error::unsupported("a managed allocation needs at least one byte (got a request for 0)"));
    }
    let margin = safety_margin(total);
    let need = requested as u128 + live_managed as u128 + margin as u128;
    if need > free as u128 {
        let allowed = (free as u128).saturating_sub(live_managed as u128 + margin as u128);
        return Err(Error::OutOfMemory(format!(
            "managed allocation of {} refused: the GPU has {} free of {}; with {} of managed memory already \
             allocated by this process and a safety margin of {}, at most {} can be allocated. Asking for more \
             managed memory than the GPU has free can hang a shared GPU. Free GPU memory first (smaller \
             batch or sequence length, fewer trainable parameters, an 8-bit optimizer) or use a \
             non-paged optimizer",
            human(requested as u128),
            human(free as u128),
            human(total as u128),
            human(live_managed as u128),
            human(margin as u128),
            human(allowed),
        )));
    }
    Ok(())
}

/// "1.50 GiB (1610612736 bytes)": readable and exact.
fn human(bytes: u128) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{v:.2} {} ({bytes} bytes)", UNITS[unit])
    }
}

// --------------------------------------------------------------------------------------------
// Statistics and the registry of live allocations
// --------------------------------------------------------------------------------------------

/// Process-wide paging statistics. Byte counts of prefetches count what was asked for; the
/// driver skips pages that are already where they are sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PagingStats {
    /// Bytes of managed memory allocated now.
    pub bytes_allocated: usize,
    /// Largest `bytes_allocated` since start (or the last [`reset_peak`]).
    pub peak_bytes_allocated: usize,
    /// Live managed allocations.
    pub allocations: usize,
    /// Managed allocations made since start.
    pub total_allocations: u64,
    /// Allocation requests refused by the safety rule.
    pub refused_allocations: u64,
    /// Estimate of the live bytes whose last prefetch went to the host (an over-estimate when
    /// parts of an allocation were prefetched separately).
    pub bytes_on_host: usize,
    pub bytes_prefetched_to_device: u64,
    pub bytes_prefetched_to_host: u64,
    pub prefetches_to_device: u64,
    pub prefetches_to_host: u64,
    /// Prefetches and advice not issued because the device lacks concurrent managed access.
    pub prefetches_skipped: u64,
}

#[derive(Debug)]
struct Entry {
    len: usize,
    device: i32,
    host_bytes: usize,
    owner: Weak<Allocation>,
}

/// The accounting of live allocations and the statistics; one global instance, and local ones
/// in the tests.
#[derive(Debug, Default)]
struct Registry {
    entries: BTreeMap<u64, Entry>,
    stats: PagingStats,
}

impl Registry {
    fn on_alloc(&mut self, ptr: u64, len: usize, device: i32, owner: Weak<Allocation>) {
        self.entries.insert(ptr, Entry { len, device, host_bytes: 0, owner });
        let s = &mut self.stats;
        s.bytes_allocated += len;
        s.peak_bytes_allocated = s.peak_bytes_allocated.max(s.bytes_allocated);
        s.allocations += 1;
        s.total_allocations += 1;
    }

    fn on_free(&mut self, ptr: u64) {
        if let Some(e) = self.entries.remove(&ptr) {
            let s = &mut self.stats;
            s.bytes_allocated -= e.len;
            s.allocations -= 1;
            s.bytes_on_host -= e.host_bytes;
        }
    }

    fn on_refused(&mut self) {
        self.stats.refused_allocations += 1;
    }

    fn on_skipped(&mut self) {
        self.stats.prefetches_skipped += 1;
    }

    /// Records a prefetch of `len` bytes at `offset` into the allocation at `base`.
    fn on_prefetch(&mut self, base: u64, offset: usize, len: usize, dst: Location) {
        let Some(e) = self.entries.get_mut(&base) else { return };
        let whole = offset == 0 && len == e.len;
        let before = e.host_bytes;
        // Partial prefetches only ever raise the host estimate, so it never under-counts.
        e.host_bytes = match dst {
            Location::Host if whole => e.len,
            Location::Host => (e.host_bytes + len).min(e.len),
            Location::Device(_) if whole => 0,
            Location::Device(_) => e.host_bytes,
        };
        let s = &mut self.stats;
        s.bytes_on_host = s.bytes_on_host - before + e.host_bytes;
        match dst {
            Location::Host => {
                s.prefetches_to_host += 1;
                s.bytes_prefetched_to_host += len as u64;
            }
            Location::Device(_) => {
                s.prefetches_to_device += 1;
                s.bytes_prefetched_to_device += len as u64;
            }
        }
    }

    /// Bytes of live managed memory on `device`.
    fn live_on(&self, device: i32) -> usize {
        self.entries.values().filter(|e| e.device == device).map(|e| e.len).sum()
    }

    /// The allocation holding `[ptr, ptr + len)`, with the offset of `ptr` in it.
    fn find(&self, ptr: u64, len: usize) -> Result<(u64, usize, Weak<Allocation>)> {
        let found = self.entries.range(..=ptr).next_back();
        match found {
            Some((&base, e)) if ptr - base < e.len as u64 => {
                let offset = (ptr - base) as usize;
                if len > e.len - offset {
                    return Err(Error::shape(format!(
                        "range of {len} bytes at {ptr:#x} runs past the end of its managed allocation \
                         ({} bytes at {base:#x})",
                        e.len
                    )));
                }
                Ok((base, offset, e.owner.clone()))
            }
            _ => Err(Error::unsupported(format!(
                "{ptr:#x} is not inside a live managed allocation made by qlora_rs: only memory from \
                 qlora_rs.optim.managed_empty (qlora_rs.paging) can be prefetched"
            ))),
        }
    }
}

fn registry() -> MutexGuard<'static, Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    // A panic while holding the lock cannot leave the counters half-updated in a way that
    // matters more than losing them, so a poisoned lock is used as is.
    REGISTRY.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner())
}

/// A snapshot of the process-wide paging statistics.
pub fn stats() -> PagingStats {
    registry().stats
}

/// Sets the peak to the current allocation.
pub fn reset_peak() {
    let mut r = registry();
    r.stats.peak_bytes_allocated = r.stats.bytes_allocated;
}

// --------------------------------------------------------------------------------------------
// The driver: presence check, errors, contexts
// --------------------------------------------------------------------------------------------

/// Driver entry points this module calls beyond the shared ones (`cuda::driver`); checked before
/// the first call so a missing one is an error, not cudarc's panic.
const SYMBOLS: &[&str] =
    &["cuMemGetInfo_v2", "cuMemAllocManaged", "cuMemFree_v2", "cuMemAdvise_v2", "cuMemPrefetchAsync_v2"];

/// `Ok(())` when the driver is present, complete and initialised; else
/// [`Error::CudaUnavailable`] with the reason. Never panics. Checked once per process.
pub fn driver_available() -> Result<()> {
    static STATE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    STATE
        .get_or_init(|| driver::require("managed-memory paging", "12.2", SYMBOLS).map_err(|e| e.to_string()))
        .clone()
        .map_err(Error::CudaUnavailable)
}

/// The device's primary context (shared with PyTorch's runtime), after the driver check.
fn context(ordinal: i32) -> Result<Context> {
    driver_available()?;
    Context::primary(ordinal)
}

/// Runs `f` with device `ordinal`'s primary context current on this thread.
fn with_context<T>(ordinal: i32, f: impl FnOnce() -> Result<T>) -> Result<T> {
    context(ordinal)?.run(f)
}

fn attribute(ctx: &Context, attr: sys::CUdevice_attribute) -> Result<i32> {
    let mut v = 0;
    // SAFETY: the driver is loaded; `ctx.device` is a valid device handle; writes one int.
    check("cuDeviceGetAttribute", unsafe { sys::cuDeviceGetAttribute(&mut v, attr, ctx.device) })?;
    Ok(v)
}

/// Facts about one device that paging depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: i32,
    /// `CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY`: managed allocations possible at all.
    pub managed_memory: bool,
    /// `CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS`: prefetch and advice available.
    pub concurrent_managed_access: bool,
    /// Free and total device memory (`cuMemGetInfo`) when asked.
    pub free: usize,
    pub total: usize,
    /// The driver's CUDA version, e.g. 13000.
    pub driver_version: i32,
}

/// Paging-related facts of device `ordinal`, including its free memory now.
pub fn device_info(ordinal: i32) -> Result<DeviceInfo> {
    let ctx = context(ordinal)?;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: the context is current inside `run`; the out-pointers are valid locals.
    ctx.run(|| check("cuMemGetInfo", unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) }))?;
    use sys::CUdevice_attribute as A;
    Ok(DeviceInfo {
        ordinal,
        managed_memory: attribute(&ctx, A::CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY)? != 0,
        concurrent_managed_access: attribute(&ctx, A::CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS)? != 0,
        free,
        total,
        driver_version: driver::driver_version()?,
    })
}

/// Whether `ordinal` has concurrent managed access (cached: device attributes do not change).
fn concurrent_access(ordinal: i32) -> Result<bool> {
    static CACHE: OnceLock<Mutex<HashMap<i32, bool>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(&v) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&ordinal) {
        return Ok(v);
    }
    let ctx = context(ordinal)?;
    let v = attribute(&ctx, sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS)? != 0;
    cache.lock().unwrap_or_else(|p| p.into_inner()).insert(ordinal, v);
    Ok(v)
}

// --------------------------------------------------------------------------------------------
// Managed buffers
// --------------------------------------------------------------------------------------------

/// One managed allocation; freed when dropped (the last [`ManagedBuffer`] owner goes away).
#[derive(Debug)]
struct Allocation {
    ptr: u64,
    len: usize,
    device: i32,
}

impl Drop for Allocation {
    fn drop(&mut self) {
        registry().on_free(self.ptr);
        // Errors cannot be reported from a destructor; at interpreter exit the driver may already
        // be shut down (CUDA_ERROR_DEINITIALIZED), when the memory is gone anyway.
        let _ = with_context(self.device, || {
            // SAFETY: ptr came from cuMemAllocManaged and this is its only free.
            check("cuMemFree", unsafe { sys::cuMemFree_v2(self.ptr) })
        });
    }
}

/// Serialises the check-then-allocate sequence so two threads cannot both pass the check.
static ALLOCATING: Mutex<()> = Mutex::new(());

/// A shared handle to a managed allocation: clone it for another owner; the memory is freed when
/// the last handle is dropped.
#[derive(Clone, Debug)]
pub struct ManagedBuffer {
    inner: Arc<Allocation>,
}

impl ManagedBuffer {
    /// Allocates `len` bytes of managed memory associated with device `ordinal`
    /// (`CU_MEM_ATTACH_GLOBAL`: usable from every stream), after the safety check against the
    /// device's free memory (see the module doc). The pages are populated on first touch or by a
    /// prefetch.
    pub fn allocate(len: usize, ordinal: i32) -> Result<Self> {
        let _serial = ALLOCATING.lock().unwrap_or_else(|p| p.into_inner());
        let info = device_info(ordinal)?;
        if !info.managed_memory {
            return Err(Error::CudaUnavailable(format!(
                "CUDA device {ordinal} does not support managed memory (CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY = 0)"
            )));
        }
        let live = registry().live_on(ordinal);
        if let Err(e) = check_managed_request(len, info.free, info.total, live) {
            registry().on_refused();
            return Err(e);
        }
        let ptr = with_context(ordinal, || {
            let mut ptr: sys::CUdeviceptr = 0;
            let flags = sys::CUmemAttach_flags::CU_MEM_ATTACH_GLOBAL as u32;
            // SAFETY: a context is current; ptr is a valid out-pointer.
            check("cuMemAllocManaged", unsafe { sys::cuMemAllocManaged(&mut ptr, len, flags) })?;
            Ok(ptr)
        })?;
        let inner = Arc::new(Allocation { ptr, len, device: ordinal });
        registry().on_alloc(ptr, len, ordinal, Arc::downgrade(&inner));
        Ok(ManagedBuffer { inner })
    }

    /// Device address of the first byte.
    pub fn ptr(&self) -> u64 {
        self.inner.ptr
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.inner.len
    }

    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    /// The device the allocation was made for.
    pub fn device(&self) -> i32 {
        self.inner.device
    }

    /// Number of handles (owners) sharing this allocation.
    pub fn owners(&self) -> usize {
        Arc::strong_count(&self.inner)
    }

    /// Asynchronously moves `len` bytes from `offset` to `dst` on `stream` (a raw `CUstream`;
    /// 0 is the legacy default stream), ordered with the other work on that stream. Returns
    /// whether a prefetch was issued: `false` when the device lacks concurrent managed access
    /// and `dst` is a device (see the module doc); to the host that is an error.
    pub fn prefetch(&self, offset: usize, len: usize, dst: Location, stream: usize) -> Result<bool> {
        if offset > self.len() || len > self.len() - offset {
            return Err(Error::shape(format!(
                "prefetch of {len} bytes at offset {offset} runs past the end of a {}-byte managed allocation",
                self.len()
            )));
        }
        prefetch_checked(&self.inner, offset, len, dst, stream)
    }

    /// Prefetches the whole allocation.
    pub fn prefetch_all(&self, dst: Location, stream: usize) -> Result<bool> {
        self.prefetch(0, self.len(), dst, stream)
    }

    /// Applies `advice` to the whole allocation. Returns whether it was applied: `false` when
    /// the device lacks concurrent managed access.
    pub fn advise(&self, advice: Advice) -> Result<bool> {
        let a = &self.inner;
        if !concurrent_access(a.device)? {
            registry().on_skipped();
            return Ok(false);
        }
        let (kind, loc) = match advice {
            Advice::PreferredLocation(loc) => (sys::CUmem_advise::CU_MEM_ADVISE_SET_PREFERRED_LOCATION, loc),
            Advice::AccessedBy(d) => (sys::CUmem_advise::CU_MEM_ADVISE_SET_ACCESSED_BY, Location::Device(d)),
        };
        if let Location::Device(d) = loc {
            context(d)?; // validates the ordinal with a clear message
        }
        with_context(a.device, || {
            // SAFETY: the range is the whole live allocation; a context is current.
            check("cuMemAdvise", unsafe { sys::cuMemAdvise_v2(a.ptr, a.len, kind, loc.raw()) })
        })?;
        Ok(true)
    }
}

fn prefetch_checked(a: &Allocation, offset: usize, len: usize, dst: Location, stream: usize) -> Result<bool> {
    if len == 0 {
        return Ok(false);
    }
    if let Location::Device(d) = dst {
        context(d)?; // validates the ordinal with a clear message
    }
    if !concurrent_access(a.device)? {
        return match dst {
            Location::Device(_) => {
                registry().on_skipped();
                Ok(false)
            }
            Location::Host => Err(Error::unsupported(format!(
                "CUDA device {} has no concurrent managed access (CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS = 0, \
                 e.g. Windows or a virtualised GPU): its managed memory cannot be paged out to the host on request; \
                 use paging without page_out (page_out_after_step=False) or a non-paged optimizer",
                a.device
            ))),
        };
    }
    with_context(a.device, || {
        // SAFETY: [ptr + offset, + len) lies inside the live allocation (checked by the callers);
        // the stream handle comes from the caller (PyTorch's stream for this device).
        check(&format!("cuMemPrefetchAsync (to {})", dst.describe()), unsafe {
            sys::cuMemPrefetchAsync_v2(a.ptr + offset as u64, len, dst.raw(), 0, stream as sys::CUstream)
        })
    })?;
    registry().on_prefetch(a.ptr, offset, len, dst);
    Ok(true)
}

/// Prefetches `[ptr, ptr + len)`, which must lie inside one live managed allocation made by
/// this module (e.g. the storage of a tensor from `managed_empty`). The allocation is kept alive
/// for the call.
pub fn prefetch_range(ptr: u64, len: usize, dst: Location, stream: usize) -> Result<bool> {
    let (_, offset, owner) = registry().find(ptr, len)?;
    // Upgraded after the registry lock is released: dropping the last owner takes that lock.
    let Some(alloc) = owner.upgrade() else {
        return Err(Error::unsupported(format!("the managed allocation at {ptr:#x} was freed during the call")));
    };
    prefetch_checked(&alloc, offset, len, dst, stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: usize = 1 << 30;

    #[test]
    fn margin_is_the_larger_of_floor_and_fraction() {
        assert_eq!(safety_margin(0), SAFETY_MARGIN_MIN_BYTES);
        assert_eq!(safety_margin(4 * GIB), SAFETY_MARGIN_MIN_BYTES); // 4 GiB / 32 = 128 MiB < 256 MiB
        assert_eq!(safety_margin(141 * GIB), 141 * GIB / 32);
    }

    #[test]
    fn requests_that_fit_are_allowed() {
        let total = 80 * GIB;
        let free = 40 * GIB;
        let margin = safety_margin(total);
        check_managed_request(free - margin, free, total, 0).unwrap();
        check_managed_request(GIB, free, total, 10 * GIB).unwrap();
        check_managed_request(free - margin - 10 * GIB, free, total, 10 * GIB).unwrap();
    }

    #[test]
    fn requests_over_free_minus_margin_are_refused_with_numbers() {
        let total = 80 * GIB;
        let free = 40 * GIB;
        let margin = safety_margin(total);
        let err = check_managed_request(free - margin + 1, free, total, 0).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::OutOfMemory(_)), "{err:?}");
        assert!(msg.contains(&format!("({} bytes)", free - margin + 1)), "{msg}");
        assert!(msg.contains(&format!("({free} bytes) free")), "{msg}");
        assert!(msg.contains("hang a shared GPU"), "{msg}");
        // Live managed memory counts against the request.
        assert!(check_managed_request(free - margin - GIB + 1, free, total, GIB).is_err());
        // A request larger than free memory, and free memory smaller than the margin.
        assert!(check_managed_request(100 * GIB, free, total, 0).is_err());
        assert!(check_managed_request(1, 100 << 20, total, 0).is_err());
    }

    #[test]
    fn huge_numbers_do_not_overflow() {
        let err = check_managed_request(usize::MAX, usize::MAX, usize::MAX, usize::MAX).unwrap_err();
        assert!(matches!(err, Error::OutOfMemory(_)));
    }

    #[test]
    fn zero_byte_request_is_unsupported() {
        assert!(matches!(check_managed_request(0, GIB * 10, GIB * 10, 0), Err(Error::Unsupported(_))));
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 bytes");
        assert_eq!(human(1536), "1.50 KiB (1536 bytes)");
        assert_eq!(human(3 * GIB as u128), "3.00 GiB (3221225472 bytes)");
    }

    #[test]
    fn locations() {
        assert_eq!(Location::from_ordinal(-1).unwrap(), Location::Host);
        assert_eq!(Location::from_ordinal(2).unwrap(), Location::Device(2));
        assert!(matches!(Location::from_ordinal(-2), Err(Error::Unsupported(_))));
    }

    #[test]
    fn registry_accounting() {
        let mut r = Registry::default();
        r.on_alloc(0x1000, 4096, 0, Weak::new());
        r.on_alloc(0x10000, 1024, 0, Weak::new());
        r.on_alloc(0x20000, 512, 1, Weak::new());
        assert_eq!(r.stats.bytes_allocated, 5632);
        assert_eq!(r.stats.allocations, 3);
        assert_eq!(r.live_on(0), 5120);
        assert_eq!(r.live_on(1), 512);

        r.on_prefetch(0x1000, 0, 4096, Location::Host);
        assert_eq!(r.stats.bytes_on_host, 4096);
        assert_eq!((r.stats.prefetches_to_host, r.stats.bytes_prefetched_to_host), (1, 4096));
        // A partial prefetch back does not lower the (conservative) host estimate...
        r.on_prefetch(0x1000, 0, 1024, Location::Device(0));
        assert_eq!(r.stats.bytes_on_host, 4096);
        // ...a whole one does.
        r.on_prefetch(0x1000, 0, 4096, Location::Device(0));
        assert_eq!(r.stats.bytes_on_host, 0);
        assert_eq!((r.stats.prefetches_to_device, r.stats.bytes_prefetched_to_device), (2, 5120));
        // Partial prefetches to the host add up, capped at the allocation.
        r.on_prefetch(0x10000, 0, 800, Location::Host);
        r.on_prefetch(0x10000, 100, 800, Location::Host);
        assert_eq!(r.stats.bytes_on_host, 1024);

        r.on_free(0x10000);
        assert_eq!(r.stats.bytes_on_host, 0);
        assert_eq!(r.stats.bytes_allocated, 4608);
        assert_eq!(r.stats.peak_bytes_allocated, 5632);
        assert_eq!(r.stats.total_allocations, 3);
        r.on_free(0x10000); // unknown: ignored
        assert_eq!(r.stats.allocations, 2);
    }

    #[test]
    fn registry_finds_ranges() {
        let mut r = Registry::default();
        r.on_alloc(0x1000, 4096, 0, Weak::new());
        r.on_alloc(0x4000, 256, 0, Weak::new());
        let (base, off, _) = r.find(0x1000, 4096).unwrap();
        assert_eq!((base, off), (0x1000, 0));
        let (base, off, _) = r.find(0x1800, 1024).unwrap();
        assert_eq!((base, off), (0x1000, 0x800));
        assert!(matches!(r.find(0x1800, 4096), Err(Error::Shape(_))));
        assert!(matches!(r.find(0x2000, 1), Err(Error::Unsupported(_))));
        assert!(matches!(r.find(0x10, 1), Err(Error::Unsupported(_))));
        let msg = r.find(0x4100, 1).unwrap_err().to_string();
        assert!(msg.contains("not inside a live managed allocation"), "{msg}");
    }

    /// Without a driver every entry point gives CudaUnavailable, never a panic; with one (on a
    /// GPU machine) the driver loads.
    #[test]
    fn driver_absent_is_a_clear_error() {
        // SAFETY: only probes for the library.
        let present = unsafe { sys::is_culib_present() };
        match driver_available() {
            Ok(()) => assert!(present),
            Err(Error::CudaUnavailable(msg)) => {
                assert!(!msg.is_empty());
                if !present {
                    assert!(msg.contains("CUDA driver library"), "{msg}");
                    assert!(matches!(ManagedBuffer::allocate(1024, 0), Err(Error::CudaUnavailable(_))));
                    assert!(matches!(device_info(0), Err(Error::CudaUnavailable(_))));
                    assert!(matches!(
                        prefetch_range(0x1234, 16, Location::Host, 0),
                        Err(Error::Unsupported(_))
                    ));
                }
            }
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }
}

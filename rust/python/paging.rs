//! Bindings of the page manager (`crate::paging`): managed allocations visible to torch through
//! `__cuda_array_interface__`, prefetches, statistics and the pure refusal rule.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use super::to_pyerr;
use crate::paging::{self, Advice, Location, ManagedBuffer};

/// One managed (unified-memory) allocation of `nbytes` bytes for CUDA device `device`.
///
/// Exposes ``__cuda_array_interface__`` (version 3) as a 1-D uint8 array over the whole
/// allocation, so ``torch.as_tensor(alloc, device="cuda")`` views it without a copy; torch keeps
/// a reference to this object for as long as the tensor's storage lives, and the memory is freed
/// when the last reference goes. Raises ``OutOfMemoryError`` before allocating when the request
/// does not fit in the device's free memory minus a safety margin, ``CudaUnavailableError``
/// without a driver or device.
#[pyclass(name = "ManagedAllocation", module = "qlora_rs._lib", frozen)]
struct PyManagedAllocation {
    buf: ManagedBuffer,
}

#[pymethods]
impl PyManagedAllocation {
    #[new]
    #[pyo3(signature = (nbytes, device=0))]
    fn new(py: Python<'_>, nbytes: usize, device: i32) -> PyResult<Self> {
        let buf = py.detach(|| ManagedBuffer::allocate(nbytes, device)).map_err(to_pyerr)?;
        Ok(PyManagedAllocation { buf })
    }

    /// Device address of the first byte.
    #[getter]
    fn ptr(&self) -> u64 {
        self.buf.ptr()
    }

    /// Size in bytes.
    #[getter]
    fn nbytes(&self) -> usize {
        self.buf.len()
    }

    /// The CUDA device ordinal the allocation belongs to.
    #[getter]
    fn device(&self) -> i32 {
        self.buf.device()
    }

    #[getter]
    fn __cuda_array_interface__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("version", 3)?;
        d.set_item("typestr", "|u1")?;
        d.set_item("shape", PyTuple::new(py, [self.buf.len()])?)?;
        d.set_item("data", (self.buf.ptr(), false))?;
        d.set_item("strides", py.None())?;
        // Nothing is pending on the memory when a consumer takes it: no stream to wait on.
        d.set_item("stream", py.None())?;
        Ok(d)
    }

    /// Prefetches ``nbytes`` (default: to the end) from ``offset`` to ``device`` (-1: the host)
    /// on the raw CUDA stream handle ``stream`` (``torch.cuda.current_stream().cuda_stream``).
    /// Returns whether a prefetch was issued (False: the device lacks concurrent managed access).
    #[pyo3(signature = (device, stream=0, offset=0, nbytes=None))]
    fn prefetch(
        &self,
        py: Python<'_>,
        device: i32,
        stream: usize,
        offset: usize,
        nbytes: Option<usize>,
    ) -> PyResult<bool> {
        let dst = Location::from_ordinal(device).map_err(to_pyerr)?;
        let len = nbytes.unwrap_or_else(|| self.buf.len().saturating_sub(offset));
        py.detach(|| self.buf.prefetch(offset, len, dst, stream)).map_err(to_pyerr)
    }

    /// ``cuMemAdvise(SET_ACCESSED_BY, device)`` over the whole allocation; returns whether it was
    /// applied (False: the device lacks concurrent managed access).
    fn advise_accessed_by(&self, py: Python<'_>, device: i32) -> PyResult<bool> {
        py.detach(|| self.buf.advise(Advice::AccessedBy(device))).map_err(to_pyerr)
    }

    /// ``cuMemAdvise(SET_PREFERRED_LOCATION, device)`` (-1: the host) over the whole allocation.
    fn advise_preferred_location(&self, py: Python<'_>, device: i32) -> PyResult<bool> {
        let loc = Location::from_ordinal(device).map_err(to_pyerr)?;
        py.detach(|| self.buf.advise(Advice::PreferredLocation(loc))).map_err(to_pyerr)
    }

    fn __repr__(&self) -> String {
        format!("ManagedAllocation(nbytes={}, device={}, ptr={:#x})", self.buf.len(), self.buf.device(), self.buf.ptr())
    }
}

/// Prefetches ``[ptr, ptr + nbytes)``, which must lie inside a live managed allocation made by
/// qlora_rs, to ``device`` (-1: the host) on raw stream ``stream``. Returns whether a prefetch
/// was issued.
///
/// ``ptr`` stays a raw address: it is managed memory handed to the CUDA driver's prefetch on a
/// stream, never dereferenced here, and `paging::prefetch_range` refuses a range that is not
/// inside a live allocation it made, so a wrong address is an error, not a stray access.
#[pyfunction]
#[pyo3(signature = (ptr, nbytes, device, stream=0))]
fn managed_prefetch(py: Python<'_>, ptr: u64, nbytes: usize, device: i32, stream: usize) -> PyResult<bool> {
    let dst = Location::from_ordinal(device).map_err(to_pyerr)?;
    py.detach(|| paging::prefetch_range(ptr, nbytes, dst, stream)).map_err(to_pyerr)
}

/// The process-wide paging statistics as a dict.
#[pyfunction]
fn paging_stats(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let s = paging::stats();
    let d = PyDict::new(py);
    d.set_item("bytes_allocated", s.bytes_allocated)?;
    d.set_item("peak_bytes_allocated", s.peak_bytes_allocated)?;
    d.set_item("allocations", s.allocations)?;
    d.set_item("total_allocations", s.total_allocations)?;
    d.set_item("refused_allocations", s.refused_allocations)?;
    d.set_item("bytes_on_host", s.bytes_on_host)?;
    d.set_item("bytes_prefetched_to_device", s.bytes_prefetched_to_device)?;
    d.set_item("bytes_prefetched_to_host", s.bytes_prefetched_to_host)?;
    d.set_item("prefetches_to_device", s.prefetches_to_device)?;
    d.set_item("prefetches_to_host", s.prefetches_to_host)?;
    d.set_item("prefetches_skipped", s.prefetches_skipped)?;
    Ok(d)
}

/// Sets the peak of ``bytes_allocated`` to its current value.
#[pyfunction]
fn paging_reset_peak() {
    paging::reset_peak()
}

/// The refusal rule, without touching a GPU: raises ``OutOfMemoryError`` unless
/// ``requested + live_managed + paging_safety_margin(total) <= free``.
#[pyfunction]
#[pyo3(signature = (requested, free, total, live_managed=0))]
fn paging_check_request(requested: usize, free: usize, total: usize, live_managed: usize) -> PyResult<()> {
    paging::check_managed_request(requested, free, total, live_managed).map_err(to_pyerr)
}

/// Bytes kept free on a device of ``total`` bytes: max(256 MiB, total / 32).
#[pyfunction]
fn paging_safety_margin(total: usize) -> usize {
    paging::safety_margin(total)
}

/// Raises ``CudaUnavailableError`` (with the reason) unless the CUDA driver is present, recent
/// enough and sees a device. Never crashes when the driver library is missing.
#[pyfunction]
fn paging_driver_check(py: Python<'_>) -> PyResult<()> {
    py.detach(paging::driver_available).map_err(to_pyerr)
}

/// Paging facts of a device: managed_memory, concurrent_managed_access, free, total, driver_version.
#[pyfunction]
fn paging_device_info(py: Python<'_>, device: i32) -> PyResult<Bound<'_, PyDict>> {
    let info = py.detach(|| paging::device_info(device)).map_err(to_pyerr)?;
    let d = PyDict::new(py);
    d.set_item("device", info.ordinal)?;
    d.set_item("managed_memory", info.managed_memory)?;
    d.set_item("concurrent_managed_access", info.concurrent_managed_access)?;
    d.set_item("free", info.free)?;
    d.set_item("total", info.total)?;
    d.set_item("driver_version", info.driver_version)?;
    Ok(d)
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyManagedAllocation>()?;
    m.add_function(wrap_pyfunction!(managed_prefetch, m)?)?;
    m.add_function(wrap_pyfunction!(paging_stats, m)?)?;
    m.add_function(wrap_pyfunction!(paging_reset_peak, m)?)?;
    m.add_function(wrap_pyfunction!(paging_check_request, m)?)?;
    m.add_function(wrap_pyfunction!(paging_safety_margin, m)?)?;
    m.add_function(wrap_pyfunction!(paging_driver_check, m)?)?;
    m.add_function(wrap_pyfunction!(paging_device_info, m)?)?;
    m.add("PAGING_HOST", paging::HOST)?;
    Ok(())
}

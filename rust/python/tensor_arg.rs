//! Tensors handed to the bindings as Python objects, read through DLPack: either a capsule
//! (`torch.utils.dlpack.to_dlpack(t)`, the cheap form the hot paths pass) or any object with
//! `__dlpack__` (a torch tensor, a numpy array). Device, dtype, contiguity, alignment and length
//! are checked before a slice is formed, and outputs that share memory with another argument are
//! refused, so a wrong argument in the Python layer is an exception, never a stray read or write.
//!
//! The capsule is consumed as the DLPack Python specification prescribes for a consumer: renamed
//! "used_dltensor" (so its own destructor no longer frees the tensor, and nobody can consume it a
//! second time) and the producer's `deleter` called when the [`TensorArg`] is dropped. Until then
//! the producer keeps the memory alive, whatever happens to the Python objects.

use std::ffi::c_void;
use std::ptr::NonNull;

use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyCapsuleMethods};

use crate::error::Error;
use crate::{DType, FloatSlice, FloatSliceMut};

// The unversioned DLPack ABI (dlpack.h, stable since 0.6), the part read here.
#[repr(C)]
#[derive(Clone, Copy)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *const i64,
    /// Null means compact row-major.
    strides: *const i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

const DL_CPU: i32 = 1;
const DL_INT: u8 = 0;
const DL_UINT: u8 = 1;
const DL_FLOAT: u8 = 2;
const DL_BFLOAT: u8 = 4;

fn device_name(code: i32) -> String {
    match code {
        2 => "cuda".into(),
        3 => "cuda pinned host memory".into(),
        7 => "vulkan".into(),
        8 => "metal".into(),
        10 => "rocm".into(),
        13 => "cuda managed memory".into(),
        14 => "oneapi (xpu)".into(),
        other => format!("DLPack device type {other}"),
    }
}

/// Element types the bindings accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Elem {
    U8,
    I32,
    F32,
    F64,
    F16,
    BF16,
}

impl Elem {
    fn of(t: DLDataType) -> Option<Elem> {
        if t.lanes != 1 {
            return None;
        }
        Some(match (t.code, t.bits) {
            (DL_UINT, 8) => Elem::U8,
            (DL_INT, 32) => Elem::I32,
            (DL_FLOAT, 32) => Elem::F32,
            (DL_FLOAT, 64) => Elem::F64,
            (DL_FLOAT, 16) => Elem::F16,
            (DL_BFLOAT, 16) => Elem::BF16,
            _ => return None,
        })
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Elem::U8 => "uint8",
            Elem::I32 => "int32",
            Elem::F32 => "float32",
            Elem::F64 => "float64",
            Elem::F16 => "float16",
            Elem::BF16 => "bfloat16",
        }
    }

    fn size(self) -> usize {
        match self {
            Elem::U8 => 1,
            Elem::F16 | Elem::BF16 => 2,
            Elem::I32 | Elem::F32 => 4,
            Elem::F64 => 8,
        }
    }

    /// The float type of the core, for float32/float16/bfloat16.
    pub(crate) fn float(self) -> Option<DType> {
        match self {
            Elem::F32 => Some(DType::F32),
            Elem::F16 => Some(DType::F16),
            Elem::BF16 => Some(DType::BF16),
            _ => None,
        }
    }
}

/// Element types a [`TensorArg`] can be viewed as.
pub(crate) trait Element: Copy + Sync {
    const ELEM: Elem;
}

impl Element for u8 {
    const ELEM: Elem = Elem::U8;
}
impl Element for i32 {
    const ELEM: Elem = Elem::I32;
}
impl Element for f32 {
    const ELEM: Elem = Elem::F32;
}
impl Element for f64 {
    const ELEM: Elem = Elem::F64;
}
impl Element for half::f16 {
    const ELEM: Elem = Elem::F16;
}
impl Element for half::bf16 {
    const ELEM: Elem = Elem::BF16;
}

/// A consumed DLPack tensor; dropping it tells the producer it may release the memory.
struct Managed(NonNull<DLManagedTensor>);

impl Drop for Managed {
    fn drop(&mut self) {
        let m = self.0.as_ptr();
        // SAFETY: `m` came from a "dltensor" capsule this value consumed, so it is valid and its
        // deleter is ours to call, exactly once (DLPack: the consumer calls it when done).
        unsafe {
            if let Some(deleter) = (*m).deleter {
                deleter(m);
            }
        }
    }
}

/// One contiguous CPU tensor argument; the memory stays valid while this value lives.
pub(crate) struct TensorArg {
    _managed: Managed,
    what: &'static str,
    pub(crate) elem: Elem,
    /// Where the elements are read: the tensor's memory, or `copy` when that is misaligned.
    ptr: usize,
    pub(crate) len: usize,
    /// The tensor's own bytes, for overlap checks.
    range: (usize, usize),
    /// An aligned copy of a misaligned tensor (one loaded from a file at an odd offset), so that
    /// it can still be read; such a tensor cannot be an output.
    copy: Option<Vec<u64>>,
}

fn bad(msg: String) -> PyErr {
    super::to_pyerr(Error::shape(msg))
}

impl TensorArg {
    /// Reads `obj`, a DLPack capsule or an object with `__dlpack__`, as a contiguous CPU tensor;
    /// `what` names the argument in errors ("function: argument").
    pub(crate) fn new(obj: &Bound<'_, PyAny>, what: &'static str) -> PyResult<Self> {
        let owned;
        let capsule = match obj.cast::<PyCapsule>() {
            Ok(c) => c,
            Err(_) => {
                if !obj.hasattr(pyo3::intern!(obj.py(), "__dlpack__"))? {
                    return Err(bad(format!(
                        "{what}: expected a CPU tensor (or a DLPack capsule), got {}",
                        obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
                    )));
                }
                let c = obj
                    .call_method0(pyo3::intern!(obj.py(), "__dlpack__"))
                    .map_err(|e| bad(format!("{what}: the tensor cannot be exported through DLPack ({e})")))?;
                owned = c.cast_into::<PyCapsule>().map_err(|_| bad(format!("{what}: __dlpack__ did not return a capsule")))?;
                &owned
            }
        };
        let raw = capsule.pointer_checked(Some(c"dltensor")).map_err(|_| {
            bad(format!("{what}: the capsule is not an unconsumed DLPack tensor (\"dltensor\"); pass a fresh one"))
        })?;
        // Consume before reading: from here on the memory is ours to release, even on an error.
        // SAFETY: renaming a live capsule we hold a reference to; the name is a static C string.
        if unsafe { pyo3::ffi::PyCapsule_SetName(capsule.as_ptr(), c"used_dltensor".as_ptr()) } != 0 {
            return Err(PyErr::fetch(obj.py()));
        }
        let managed = Managed(raw.cast());
        // SAFETY: a "dltensor" capsule holds a DLManagedTensor (DLPack) that stays valid until its
        // deleter runs, which only `managed` does, after this borrow ends.
        let t = unsafe { &managed.0.as_ref().dl_tensor };
        if t.device.device_type != DL_CPU {
            return Err(bad(format!(
                "{what}: the tensor is on {}, expected a CPU tensor",
                device_name(t.device.device_type)
            )));
        }
        let elem = Elem::of(t.dtype).ok_or_else(|| {
            bad(format!(
                "{what}: unsupported element type (DLPack type code {}, {} bits, {} lanes)",
                t.dtype.code, t.dtype.bits, t.dtype.lanes
            ))
        })?;
        let ndim = usize::try_from(t.ndim).map_err(|_| bad(format!("{what}: negative ndim {}", t.ndim)))?;
        let shape: &[i64] = if ndim == 0 {
            &[]
        } else {
            // SAFETY: DLPack: `shape` points to `ndim` int64 values that live as long as the tensor.
            unsafe { std::slice::from_raw_parts(t.shape, ndim) }
        };
        let mut len = 1usize;
        for &d in shape {
            let d = usize::try_from(d).map_err(|_| bad(format!("{what}: negative dimension in shape {shape:?}")))?;
            len = len.checked_mul(d).ok_or_else(|| bad(format!("{what}: shape {shape:?} overflows")))?;
        }
        if !t.strides.is_null() && ndim > 0 && len > 0 {
            // SAFETY: DLPack: non-null `strides` points to `ndim` int64 values, like `shape`.
            let strides = unsafe { std::slice::from_raw_parts(t.strides, ndim) };
            // Row-major contiguous: each stride is the product of the later dimensions; a size-1
            // dimension may carry any stride (torch gives such dimensions arbitrary ones).
            let mut want = 1i64;
            for (&d, &s) in shape.iter().zip(strides).rev() {
                if d != 1 && s != want {
                    return Err(bad(format!(
                        "{what}: the tensor is not contiguous (shape {shape:?}, strides {strides:?}); pass .contiguous()"
                    )));
                }
                want *= d;
            }
        }
        let data = (t.data as usize).wrapping_add(t.byte_offset as usize);
        let bytes = len * elem.size();
        let range = (data, data.wrapping_add(bytes));
        let copy = (len > 0 && !data.is_multiple_of(elem.size())).then(|| {
            let mut v = vec![0u64; bytes.div_ceil(8)];
            // SAFETY: `data` addresses `bytes` live bytes (checked above; bytes need no alignment)
            // and `v` is a distinct allocation at least that long.
            unsafe { std::ptr::copy_nonoverlapping(data as *const u8, v.as_mut_ptr().cast::<u8>(), bytes) };
            v
        });
        let ptr = copy.as_ref().map_or(data, |v| v.as_ptr() as usize);
        Ok(TensorArg { _managed: managed, what, elem, ptr, len, range, copy })
    }

    /// [`TensorArg::new`] for an optional argument.
    pub(crate) fn optional(obj: Option<&Bound<'_, PyAny>>, what: &'static str) -> PyResult<Option<Self>> {
        obj.filter(|o| !o.is_none()).map(|o| Self::new(o, what)).transpose()
    }

    /// Refuses any element type but `want`.
    pub(crate) fn expect(self, want: Elem) -> PyResult<Self> {
        if self.elem != want {
            return Err(bad(format!("{}: dtype {}, expected {}", self.what, self.elem.name(), want.name())));
        }
        Ok(self)
    }

    /// Refuses a length other than `want` elements.
    pub(crate) fn expect_len(self, want: usize) -> PyResult<Self> {
        if self.len != want {
            return Err(bad(format!("{}: {} elements, expected {want}", self.what, self.len)));
        }
        Ok(self)
    }

    /// [`TensorArg::expect`] and [`TensorArg::expect_len`].
    pub(crate) fn expect_of(self, want: Elem, len: usize) -> PyResult<Self> {
        self.expect(want)?.expect_len(len)
    }

    /// The float type, refusing anything but float32/float16/bfloat16.
    pub(crate) fn float_dtype(&self) -> PyResult<DType> {
        self.elem.float().ok_or_else(|| {
            bad(format!("{}: dtype {}, expected float32, float16 or bfloat16", self.what, self.elem.name()))
        })
    }

    pub(crate) fn bytes_len(&self) -> usize {
        self.len * self.elem.size()
    }


    /// The memory as `T`, refusing another element type.
    pub(crate) fn slice<T: Element>(&self) -> PyResult<&[T]> {
        if T::ELEM != self.elem {
            return Err(bad(format!("{}: dtype {}, expected {}", self.what, self.elem.name(), T::ELEM.name())));
        }
        if self.len == 0 {
            return Ok(&[]);
        }
        // SAFETY: checked in `new`: `ptr` addresses `len` aligned elements of this type (the
        // producer's, kept alive until `self` drops, or our own copy), and `self` outlives the borrow.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr as *const T, self.len) })
    }

    /// The memory as bytes, whatever the element type (packed data stored in a float tensor).
    pub(crate) fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: as in `slice` (bytes need no alignment); any initialized memory is valid as bytes.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.bytes_len()) }
    }

    /// The memory as `T`, writable.
    ///
    /// SAFETY: the caller has checked with [`no_overlap`] that this output shares no memory with
    /// any other argument of the call, and takes this slice once.
    #[allow(clippy::mut_from_ref)] // the memory is the tensor's, not this description's
    pub(crate) unsafe fn slice_mut<T: Element>(&self) -> PyResult<&mut [T]> {
        if T::ELEM != self.elem {
            return Err(bad(format!("{}: dtype {}, expected {}", self.what, self.elem.name(), T::ELEM.name())));
        }
        if self.len == 0 {
            return Ok(&mut []);
        }
        if self.copy.is_some() {
            return Err(bad(format!("{}: the data is not aligned to its {}-byte elements", self.what, self.elem.size())));
        }
        // SAFETY: as in `slice`, and the caller guarantees no other reference to this memory.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut T, self.len) })
    }

    pub(crate) fn float_slice(&self) -> PyResult<FloatSlice<'_>> {
        Ok(match self.float_dtype()? {
            DType::F32 => FloatSlice::F32(self.slice()?),
            DType::F16 => FloatSlice::F16(self.slice()?),
            DType::BF16 => FloatSlice::BF16(self.slice()?),
        })
    }

    /// SAFETY: as [`TensorArg::slice_mut`].
    pub(crate) unsafe fn float_slice_mut(&self) -> PyResult<FloatSliceMut<'_>> {
        // SAFETY: forwarded to the caller.
        unsafe {
            Ok(match self.float_dtype()? {
                DType::F32 => FloatSliceMut::F32(self.slice_mut()?),
                DType::F16 => FloatSliceMut::F16(self.slice_mut()?),
                DType::BF16 => FloatSliceMut::BF16(self.slice_mut()?),
            })
        }
    }

    /// Asks Linux to back a freshly allocated output with transparent huge pages: a 32 MiB tensor
    /// then takes 16 page faults instead of 8192, which otherwise cost more than decoding into it.
    /// Advice only: it changes no data and failures are ignored.
    pub(crate) fn advise_huge_pages(&self) {
        #[cfg(target_os = "linux")]
        {
            const HUGE: usize = 2 << 20;
            let (start, end) = self.range;
            let (start, end) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
            if end > start {
                // SAFETY: madvise only advises the kernel about pages of this live tensor.
                unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
            }
        }
    }
}

/// Raises if any output shares memory with any other argument (input or output).
pub(crate) fn no_overlap(outputs: &[&TensorArg], inputs: &[&TensorArg]) -> PyResult<()> {
    for (i, o) in outputs.iter().enumerate() {
        let (a0, a1) = o.range;
        for other in outputs[i + 1..].iter().chain(inputs) {
            let (b0, b1) = other.range;
            if a0 < b1 && b0 < a1 {
                return Err(bad(format!("{} shares memory with {}; pass a separate output tensor", o.what, other.what)));
            }
        }
    }
    Ok(())
}

/// A [`TensorArg`] kept beyond one call (inside a Python object).
pub(crate) struct HeldTensor(pub(crate) TensorArg);

// SAFETY: the memory is only read, through shared slices, while the holder lives; the deleter runs
// when the Python object holding this is freed, with the GIL held (torch's deleter needs nothing
// more, numpy's takes the GIL itself).
unsafe impl Send for HeldTensor {}
// SAFETY: as for Send: nothing mutates through a shared reference.
unsafe impl Sync for HeldTensor {}

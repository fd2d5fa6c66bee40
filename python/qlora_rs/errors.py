"""The exceptions qlora_rs raises. Every one derives from :class:`QloraError`; those about bad
arguments or bad files also derive from ``ValueError``, CUDA ones from ``RuntimeError``, so
code written against the built-in types keeps working. I/O problems raise the built-in
``FileNotFoundError``, ``PermissionError``, ``FileExistsError`` or ``OSError``."""


class QloraError(Exception):
    """Base class of all qlora_rs errors."""


class InvalidArgumentError(QloraError, ValueError):
    """An argument is unsupported or inconsistent: block size, quant type, dtype, shape, device."""


class NonFiniteError(InvalidArgumentError):
    """The input holds NaN or infinity; the message names the first bad position."""


class FormatError(QloraError, ValueError):
    """A checkpoint, quantization state or other input file is malformed."""


class CudaError(QloraError, RuntimeError):
    """A CUDA driver call failed."""


class CudaUnavailableError(CudaError):
    """CUDA cannot be used: no driver or device, or the library was built without CUDA kernels."""


class OutOfMemoryError(CudaError, MemoryError):
    """A device or managed-memory request would not fit; nothing was allocated."""


__all__ = [
    "QloraError",
    "InvalidArgumentError",
    "NonFiniteError",
    "FormatError",
    "CudaError",
    "CudaUnavailableError",
    "OutOfMemoryError",
]

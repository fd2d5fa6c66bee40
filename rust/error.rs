//! The one error type of the qlora-rs core. The Python bindings map each variant to an exception
//! of the `qlora_rs.QloraError` tree (see `python.rs`).

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A caller-supplied argument is outside what the format supports (block size, quant type, dtype).
    #[error("{0}")]
    Unsupported(String),

    /// Sizes of the buffers handed to a function do not agree with each other.
    #[error("{0}")]
    Shape(String),

    /// A NaN or infinity where finite values are required.
    #[error("{what} has a non-finite value ({value}) at flat index {index}; pass allow_nonfinite=True (CLI: --allow-nonfinite) to quantize it anyway")]
    NonFinite { what: String, index: usize, value: f32 },

    /// A checkpoint or other input file is malformed.
    #[error("{}: {message}", path.display())]
    Format { path: PathBuf, message: String },

    /// An I/O error, with the path it concerns.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The output exists and the caller did not ask to overwrite it.
    #[error("{}: already exists; pass --force (force=True) to replace it", path.display())]
    Exists { path: PathBuf },

    /// CUDA is not usable: no driver, no device, or the library was built without kernels.
    #[error("{0}")]
    CudaUnavailable(String),

    /// A CUDA driver call failed.
    #[error("CUDA error in {call}: {message}")]
    Cuda { call: String, message: String },

    /// A request for device or managed memory that would not fit.
    #[error("{0}")]
    OutOfMemory(String),
}

impl Error {
    pub fn unsupported(msg: impl Into<String>) -> Self {
        Error::Unsupported(msg.into())
    }

    pub fn shape(msg: impl Into<String>) -> Self {
        Error::Shape(msg.into())
    }

    pub fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Format { path: path.into(), message: message.into() }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// Names the tensor a `NonFinite` error concerns (the core only knows "input").
    pub fn in_tensor(self, name: &str) -> Self {
        match self {
            Error::NonFinite { index, value, .. } => {
                Error::NonFinite { what: format!("tensor {name:?}"), index, value }
            }
            other => other,
        }
    }
}

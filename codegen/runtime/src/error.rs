//! The one error type of the runtime, and its conversion to Python exceptions.

use std::fmt;

use pyo3::exceptions::{PyMemoryError, PyRuntimeError, PyValueError};
use pyo3::PyErr;

/// An integer id outside `[0, bound)`: a bad class label or embedding id.
///
/// This is the user's mistake (bad data), so it becomes a Python `ValueError`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexError {
    /// What was indexed, e.g. `"take"` or the name of the input the ids came from.
    pub what: String,
    /// The offending id.
    pub index: i64,
    /// Its position in the flattened id array.
    pub position: usize,
    /// The exclusive upper bound ids must stay below.
    pub bound: usize,
}

impl IndexError {
    /// Replace [`IndexError::what`], e.g. with the name of the model input.
    pub fn named(mut self, what: &str) -> Self {
        self.what = what.to_string();
        self
    }
}

impl fmt::Display for IndexError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: index {} (at position {}) is out of range [0, {})",
            self.what, self.index, self.position, self.bound
        )
    }
}

impl std::error::Error for IndexError {}

/// Everything a runtime function can fail with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// An id out of range (bad input data). Python: `ValueError`.
    Index(IndexError),
    /// Operands that do not fit the call: a slice too short for its shape and
    /// strides, overlapping output elements, mismatched lengths. Generated code
    /// never passes such operands, so this is a bug in ferrograd. Python:
    /// `RuntimeError("ferrograd internal error: ...")`.
    Layout(String),
    /// An allocation failed. Python: `MemoryError`.
    Alloc {
        /// The size of the failed request.
        bytes: usize,
    },
    /// No usable GPU: the CUDA driver library is missing, or it finds no
    /// device. The message says which and what to do. Python: `RuntimeError`.
    NoDevice(String),
    /// A call into the GPU failed: a kernel launch, a copy, a cuBLAS call, the
    /// PTX JIT (with its log). The message names the kernel or step. Python:
    /// `RuntimeError`.
    Device(String),
    /// An input the caller passed does not fit (a device array on another
    /// GPU, say); the message names the input. Python: `ValueError`.
    Input(String),
    /// Device memory ran out. Python: `MemoryError`.
    DeviceAlloc {
        /// The size of the failed request.
        bytes: usize,
        /// What was being allocated.
        what: String,
    },
}

impl Error {
    /// A [`Error::Layout`] with the given message.
    pub fn layout(msg: impl Into<String>) -> Self {
        Error::Layout(msg.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Index(e) => e.fmt(f),
            Error::Layout(msg) => f.write_str(msg),
            Error::Alloc { bytes } => write!(f, "cannot allocate {bytes} bytes"),
            Error::NoDevice(msg) | Error::Device(msg) | Error::Input(msg) => f.write_str(msg),
            Error::DeviceAlloc { bytes, what } => write!(
                f,
                "cannot allocate {bytes} bytes ({:.1} MiB) of GPU memory for {what}",
                mib(*bytes)
            ),
        }
    }
}

impl std::error::Error for Error {}

impl From<IndexError> for Error {
    fn from(e: IndexError) -> Self {
        Error::Index(e)
    }
}

impl From<IndexError> for PyErr {
    fn from(e: IndexError) -> Self {
        PyValueError::new_err(e.to_string())
    }
}

impl From<Error> for PyErr {
    fn from(e: Error) -> Self {
        match e {
            Error::Index(e) => e.into(),
            Error::Layout(msg) => {
                PyRuntimeError::new_err(format!("ferrograd internal error: {msg}"))
            }
            Error::Alloc { bytes } => PyMemoryError::new_err(format!(
                "ferrograd: cannot allocate {bytes} bytes ({:.1} MiB)",
                mib(bytes)
            )),
            Error::Input(msg) => PyValueError::new_err(msg),
            Error::NoDevice(msg) | Error::Device(msg) => {
                PyRuntimeError::new_err(format!("ferrograd: {msg}"))
            }
            e @ Error::DeviceAlloc { .. } => PyMemoryError::new_err(format!("ferrograd: {e}")),
        }
    }
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_index_and_the_bound() {
        let e = IndexError {
            what: "take".into(),
            index: -3,
            position: 7,
            bound: 10,
        };
        assert_eq!(
            e.to_string(),
            "take: index -3 (at position 7) is out of range [0, 10)"
        );
        let e = Error::from(e.named("labels"));
        assert_eq!(
            e.to_string(),
            "labels: index -3 (at position 7) is out of range [0, 10)"
        );
    }
}

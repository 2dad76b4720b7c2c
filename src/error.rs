//! The errors of the public API. Every bad input is one of these, never a panic.

use twilight_jit::{Dtype, JitError, KvLayout, SpecError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Jit(#[from] JitError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("{what}: expected {expected}, got {got}")]
    Shape {
        what: String,
        expected: String,
        got: String,
    },
    #[error("dtype mismatch: variant {variant} runs on {expected:?} but the tensors are {got:?}")]
    Dtype {
        variant: String,
        expected: Dtype,
        got: Dtype,
    },
    #[error(
        "layout mismatch: variant {variant} reads {expected:?} pages but the cache is {got:?}"
    )]
    Layout {
        variant: String,
        expected: KvLayout,
        got: KvLayout,
    },
    #[error("bad page table: {0}")]
    PageTable(String),
    #[error("bad parameter: {0}")]
    Parameter(String),
    /// Channel calibration of double sparsity: bad activations, a bad or missing channel
    /// config, or a config file that cannot be read or written.
    #[error("channel calibration: {0}")]
    Calibration(String),
    #[error("variant {variant} is not supported here: {reason}")]
    Unsupported { variant: String, reason: String },
    #[error("KV cache is out of pages: request needs {needed} more, {free} free of {total}")]
    OutOfPages {
        needed: usize,
        free: usize,
        total: usize,
    },
    #[error("unknown request id {0}")]
    UnknownRequest(usize),
    #[error("CUDA driver error while {what}: {message}")]
    Driver { what: String, message: String },
}

impl Error {
    pub(crate) fn driver(what: impl Into<String>, e: impl std::fmt::Display) -> Error {
        Error::Driver {
            what: what.into(),
            message: e.to_string(),
        }
    }

    pub(crate) fn shape(
        what: impl Into<String>,
        expected: impl std::fmt::Display,
        got: impl std::fmt::Display,
    ) -> Error {
        Error::Shape {
            what: what.into(),
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }
}

impl From<crate::host::HostError> for Error {
    fn from(e: crate::host::HostError) -> Error {
        use crate::host::HostError as H;
        match e {
            H::Shape {
                what,
                expected,
                got,
            } => Error::Shape {
                what,
                expected,
                got,
            },
            H::Layout {
                variant,
                expected,
                got,
            } => Error::Layout {
                variant,
                expected,
                got,
            },
            H::PageTable(m) => Error::PageTable(m),
            H::Parameter(m) => Error::Parameter(m),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

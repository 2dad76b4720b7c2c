//! The errors of twilight-synth. Every bad input is one of these, never a panic.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A parameter of the generator or of a synthetic step outside its range.
    #[error("bad parameter: {0}")]
    Parameter(String),
    /// The library refused what was built from the parameters (a page table, a top-p threshold).
    #[error(transparent)]
    Twilight(#[from] twilight::Error),
    /// The host checks or the CPU reference refused it.
    #[error(transparent)]
    Host(#[from] twilight::HostError),
    /// An array whose data does not fill its shape, or whose header does not fit the format.
    #[error("npy: {0}")]
    Npy(String),
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

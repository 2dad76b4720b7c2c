//! Synthetic decode inputs for twilight's tests, examples, demo and benchmarks: what no engine
//! links, kept out of the library crate.
//!
//! - [`generator`]: q, K and V whose attention is peaked like a real model's (sinks, a local
//!   window, retrieval hits, a diffuse background), with named presets;
//! - [`synthetic`]: plain normal inputs over a shuffled page table, ragged request lengths;
//! - [`oracle`]: top-p on the exact attention weights, the yardstick of the pruner;
//! - [`npy`]: a NumPy `.npy` writer, so that any other implementation can read a step.

pub mod error;
pub mod generator;
pub mod npy;
pub mod oracle;
pub mod synthetic;

pub use error::{Error, Result};

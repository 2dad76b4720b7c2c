//! `twilight bench`: performance figures measured with CUDA events on the GPU, each printed
//! with its shape, its byte floor and the ratio to it. This module only dispatches; the
//! modules below depend on each other one way, from the commands down to their parts:
//! `grid` -> `sparse` -> `caches` -> `bytes` -> `shape`, with `table` and `report` for the
//! results, and `timing` and `kernels` for the measurements.

mod bytes;
mod caches;
mod dense;
mod grid;
mod jit;
mod kernels;
mod report;
mod shape;
mod sparse;
mod table;
mod timing;
mod tp;

pub use bytes::dense_decode_bytes;
pub use timing::{time_stages, time_with_events, Timing};

use twilight::VariantSpec;

use crate::CliResult;

#[derive(clap::Subcommand, Debug)]
pub enum What {
    /// Dense paged decode (`full`/`none`) against the card's read-bandwidth floor.
    Dense(shape::ShapeArgs),
    /// The Select-then-Prune step beside Quest alone and dense decode, per stage and per step.
    Sparse(sparse::SparseArgs),
    /// Every shape of bench/shapes.json: dense, Quest alone and the twilight step, as a table.
    Grid(grid::GridArgs),
    /// The table of earlier `bench grid` results (several runs merged), with no GPU.
    Table(table::TableArgs),
    /// The sparse step with the KV heads split over GPUs (tensor parallel), beside the one-GPU
    /// step over every head, and the compile count.
    Tp(tp::TpArgs),
    /// JIT costs: cold compile, warm disk-cache load and memory-cache hit, per variant.
    Jit {
        /// Variants (default: the dense Llama-3 shape in f16 and bf16).
        variants: Vec<VariantSpec>,
    },
}

pub fn run(what: What) -> CliResult {
    match what {
        What::Dense(args) => dense::run(args),
        What::Sparse(args) => sparse::run(args),
        What::Grid(args) => grid::run(args),
        What::Table(args) => table::run(args),
        What::Tp(args) => tp::run(args),
        What::Jit { variants } => jit::run(variants),
    }
}

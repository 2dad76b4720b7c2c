//! `twilight`: render, precompile and inspect kernel variants, and run the demo and benchmarks.

mod bench;
mod cache;
mod declared;
mod demo;
mod doctor;
mod parse;
mod precompile;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use twilight::VariantSpec;

/// Adaptive sparse attention kernels for LLM decoding, generated per variant.
#[derive(Parser, Debug)]
#[command(name = "twilight", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the CUDA source of a variant (a name like ps16_hd128_f16_g4_hnd_full_none, or
    /// key=value pairs).
    Render { variant: VariantSpec },
    /// Compile variants into the kernel cache, printing one line per kernel.
    Precompile(precompile::Args),
    /// Inspect or clear the kernel cache.
    Cache {
        #[command(subcommand)]
        action: cache::Action,
    },
    /// Report the CUDA driver, every device, NVRTC and the cache directory found.
    Doctor,
    /// The main job: a decode step on synthetic data, on the GPU or else the CPU reference.
    Demo(demo::Args),
    /// Benchmarks measured with CUDA events on the GPU.
    Bench {
        #[command(subcommand)]
        what: bench::What,
    },
}

type CliResult = Result<(), Box<dyn std::error::Error>>;

fn run() -> CliResult {
    match Cli::parse().command {
        Command::Render { variant } => {
            print!("{}", twilight::twilight_jit::render(&variant)?.source);
            Ok(())
        }
        Command::Precompile(args) => precompile::run(args),
        Command::Cache { action } => cache::run(action),
        Command::Doctor => doctor::run(),
        Command::Demo(args) => demo::run(args),
        Command::Bench { what } => bench::run(what),
    }
}

/// Logs go to stderr; `TWILIGHT_LOG` (or `RUST_LOG`) sets the filter, `info` by default.
fn init_logging() {
    let filter = std::env::var("TWILIGHT_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never into a log file or a pipe.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

fn main() -> ExitCode {
    init_logging();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

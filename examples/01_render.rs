//! Declare a variant and print the CUDA rendered for exactly it. Needs neither a GPU nor NVRTC.
//!
//!     cargo run --example 01_render

use twilight::{twilight_kernel, Variant};

/// Llama-3-8B-like decode: 32 query heads over 8 KV heads, Quest + Twilight pruning.
#[twilight_kernel(page_size = 16, head_dim = 128, dtype = f16, group_size = 4,
                  kv_layout = hnd, selector = quest, pruning = top_p)]
pub struct Llama3Twilight;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("variant {}", Llama3Twilight::NAME);
    let program = twilight::twilight_jit::render(&Llama3Twilight::SPEC)?;
    println!(
        "{} lines of CUDA, entries: {}",
        program.source.lines().count(),
        program
            .stages
            .iter()
            .map(|s| program.entry(*s))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for line in program.source.lines().take(3) {
        println!("  {line}");
    }
    Ok(())
}

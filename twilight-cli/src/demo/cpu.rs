//! The demo on the CPU reference: the whole step in f64, and dense attention beside it.

use std::error::Error;
use std::time::Instant;

use twilight::reference::dense_decode;

use super::reference::Derived;
use super::{Inputs, Outcome};

pub(super) fn run(x: &Inputs) -> Result<Outcome, Box<dyn Error>> {
    println!("  ran on: CPU reference (f64 accumulation, one thread)");
    let kv = x.step.kv();
    let table = &x.step.table;

    let start = Instant::now();
    let derived = Derived::build(&x.spec, x, &kv, table)?;
    let meta_ms = start.elapsed().as_secs_f64() * 1e3;
    let built = derived.names();
    if !built.is_empty() {
        println!(
            "  metadata: {} built from the cache in {meta_ms:.0} ms",
            built.join(" and ")
        );
    }

    let start = Instant::now();
    let step = derived.step(&x.spec, x, kv, table)?;
    let step_ms = start.elapsed().as_secs_f64() * 1e3;

    let start = Instant::now();
    let dense = dense_decode(&x.step.q, x.num_qo_heads(), &kv, table, x.sm_scale)?;
    let dense_ms = start.elapsed().as_secs_f64() * 1e3;
    println!(
        "  decode step: {step_ms:.1} ms (select, prune and attend in the reference); dense attention on the same cache: {dense_ms:.1} ms"
    );
    println!(
        "  (CPU times show the reference's cost, not the kernels': the GPU path times each stage)"
    );

    Ok(Outcome {
        ran_on: "cpu reference".into(),
        cache: None,
        o: step.o,
        lse: step.lse,
        kept: step.kept,
        dense,
        dense_ms,
        others: Vec::new(),
        failure: None,
    })
}

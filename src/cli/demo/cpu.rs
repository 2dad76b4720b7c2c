//! The demo on the CPU reference: the whole step in f64, and dense attention beside it.

use std::error::Error;
use std::time::Instant;

use twilight::reference::{
    decode_step, dense_decode, Quant4Cache, QuestMeta, StepInputs, StepParams,
};
use twilight::{Pruning, Selector};

use super::{Inputs, Outcome};

pub(super) fn run(x: &Inputs) -> Result<Outcome, Box<dyn Error>> {
    println!("  ran on: CPU reference (f64 accumulation, one thread)");
    let kv = x.step.kv();
    let table = &x.step.table;

    let start = Instant::now();
    let quest = (x.spec.selector == Selector::Quest).then(|| QuestMeta::build(&kv, table));
    let quant = (x.spec.pruning == Pruning::TopP)
        .then(|| Quant4Cache::build(&kv, table))
        .transpose()?;
    let meta_ms = start.elapsed().as_secs_f64() * 1e3;
    if quest.is_some() || quant.is_some() {
        let what = match (&quest, &quant) {
            (Some(_), Some(_)) => "Quest page bounds and 4-bit K",
            (Some(_), None) => "Quest page bounds",
            _ => "4-bit K",
        };
        println!("  metadata: {what} built from the cache in {meta_ms:.0} ms");
    }

    let start = Instant::now();
    let step = decode_step(
        &x.spec,
        &StepParams::new(x.budget, x.p, x.sm_scale),
        &StepInputs {
            q: &x.step.q,
            num_qo_heads: x.num_qo_heads(),
            kv,
            table,
            quest: quest.as_ref(),
            quant: quant.as_ref(),
            ds: None,
        },
    )?;
    let step_ms = start.elapsed().as_secs_f64() * 1e3;

    let start = Instant::now();
    let dense = dense_decode(&x.step.q, x.num_qo_heads(), &kv, table, x.sm_scale);
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

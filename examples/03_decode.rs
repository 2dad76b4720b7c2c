//! One Select-then-Prune decode step: on the GPU when there is one, else on the CPU reference.
//!
//!     cargo run --release --example 03_decode

use twilight::reference::quant::Quant4Cache;
use twilight::reference::quest::QuestMeta;
use twilight::reference::step::{decode_step, StepInputs, StepParams};
use twilight::{twilight_kernel, PagedKvCache, SparseDecoder, SparseParams, Variant};
use twilight_synth::generator::{generate, GeneratorParams, Preset};
use twilight_synth::synthetic::SyntheticStep;

#[twilight_kernel(page_size = 16, head_dim = 128, dtype = f16, group_size = 4,
                  kv_layout = hnd, selector = quest, pruning = top_p)]
pub struct Llama3Twilight;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let spec = Llama3Twilight::SPEC;
    let (budget, p) = (1024, 0.9);
    let lens = [4000, 1500];
    let step = generate::<half::f16>(
        &GeneratorParams::preset(Preset::Default, 7),
        &lens,
        2,
        4,
        16,
        128,
        spec.kv_layout,
    )?;
    let counts: Vec<usize> = match twilight::twilight_jit::open_device(0) {
        Ok(ctx) => {
            let stream = ctx.default_stream();
            let params = SparseParams {
                budget,
                p,
                sm_scale: None,
            };
            let decoder = SparseDecoder::new(stream.clone(), spec, params)?;
            let mut cache = PagedKvCache::<half::f16>::for_variant(&stream, step.shape, &spec)?;
            let mut ids = Vec::new();
            for (b, &len) in lens.iter().enumerate() {
                let id = cache.add_request();
                let (k, v) = step.request_rows::<half::f16>(b)?;
                decoder.append(
                    &mut cache,
                    &[(id, len)],
                    &stream.clone_htod(&k)?,
                    &stream.clone_htod(&v)?,
                )?;
                ids.push(id);
            }
            let table = cache.page_table(&stream, &ids)?;
            let q = stream.clone_htod(&SyntheticStep::to_elements::<half::f16>(&step.q))?;
            let out = decoder.run(&q, &cache, &table)?;
            println!("ran on the GPU");
            stream
                .clone_dtoh(&out.kept_counts)?
                .iter()
                .map(|&c| c as usize)
                .collect()
        }
        Err(e) => {
            println!("no GPU ({e}); running the CPU reference");
            let kv = step.kv();
            let quest = QuestMeta::build(&kv, &step.table)?;
            let quant = Quant4Cache::build(&kv, &step.table)?;
            let inputs = StepInputs {
                q: &step.q,
                num_qo_heads: step.num_qo_heads,
                kv,
                table: &step.table,
                quest: Some(&quest),
                quant: Some(&quant),
                ds: None,
            };
            let sm_scale = 1.0 / (spec.head_dim as f32).sqrt();
            decode_step(&spec, &StepParams::new(budget, p, sm_scale), &inputs)?.kept_counts
        }
    };
    println!(
        "{}: B0 = {budget}, p = {p}; kept tokens per (request, KV head): {counts:?}",
        Llama3Twilight::NAME
    );
    Ok(())
}

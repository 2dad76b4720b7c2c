//! The Select-then-Prune step on the GPU against the CPU reference, on fresh random inputs each
//! run, with every output poisoned before the launch.
//!
//! Selections are compared honestly: the GPU scores pages and tokens in f32 and the reference in
//! f64, so a page or token whose score ties the selection boundary within float rounding may go
//! either way. Every difference between the two sets must be such a near-tie (judged with the
//! reference's own scores and an error bound derived from f32 accumulation), and the GPU's kept
//! set must still carry the mass p under the reference weights. Attention itself is checked
//! exactly: the GPU output is compared with the reference attention over the GPU's own kept set.

mod common;

use std::sync::Arc;

use cudarc::driver::CudaStream;
use rand::{Rng, SeedableRng};
use twilight::reference::double_sparse::{ds_scores, DsLabels};
use twilight::reference::quant::Quant4Cache;
use twilight::reference::quest::{quest_scores, QuestMeta};
use twilight::reference::step::{decode_step, StepInputs, StepParams};
use twilight::reference::{attend, HostKv};
use twilight::twilight_jit::Stage;
use twilight::{
    AttentionKernel, Dtype, KvElement, KvLayout, LaunchOverlap, PageTable, PagedKvCache,
    PruneBlocks, Pruning, SelectionKernel, Selector, SparseDecoder, SparseOutput, SparseParams,
    SparseWorkspace, VariantSpec,
};
use twilight_synth::synthetic::{ragged_lengths, SyntheticStep};

/// Relative tolerance of a score near a selection boundary: f32 accumulation over head_dim x
/// group terms errs by a few units in 1e-6 of the sum of magnitudes; 1e-4 leaves a wide margin
/// and is still far below any gap between distinct random scores that matters.
const NEAR_TIE: f64 = 1e-4;

struct Case {
    spec: VariantSpec,
    lens: Vec<usize>,
    num_kv_heads: usize,
    budget: usize,
    p: f32,
    key_scale: f32,
}

/// A device cache filled through the variant's append (one launch per request, like a prefill),
/// plus its host mirror for the reference.
struct Built<T: KvElement> {
    step: SyntheticStep,
    cache: PagedKvCache<T>,
    table: PageTable,
    host_table: twilight::HostPageTable,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Double Sparsity's channels per KV head (empty for other selectors).
    channels: Vec<Vec<usize>>,
}

/// `r` distinct random channels below head_dim per KV head, ascending.
fn random_channels(seed: u64, num_kv_heads: usize, head_dim: usize, r: usize) -> Vec<Vec<usize>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xc4a7);
    (0..num_kv_heads)
        .map(|_| {
            let mut all: Vec<usize> = (0..head_dim).collect();
            for i in 0..r {
                let j = rng.random_range(i..head_dim);
                all.swap(i, j);
            }
            let mut picked = all[..r].to_vec();
            picked.sort_unstable();
            picked
        })
        .collect()
}

fn build<T: KvElement>(
    stream: &Arc<CudaStream>,
    decoder: &SparseDecoder,
    case: &Case,
    seed: u64,
) -> Built<T> {
    let spec = case.spec;
    let step = SyntheticStep::random::<T>(
        seed,
        &case.lens,
        case.num_kv_heads,
        spec.group_size as usize,
        spec.page_size as usize,
        spec.head_dim as usize,
        spec.kv_layout,
        case.key_scale,
    )
    .unwrap();
    let (mut cache, channels) = match spec.selector {
        Selector::DoubleSparse { channels: r } => {
            let channels =
                random_channels(seed, case.num_kv_heads, spec.head_dim as usize, r as usize);
            let cache =
                PagedKvCache::<T>::for_double_sparse(stream, step.shape, &spec, &channels).unwrap();
            (cache, channels)
        }
        _ => (
            PagedKvCache::<T>::for_variant(stream, step.shape, &spec).unwrap(),
            Vec::new(),
        ),
    };
    let mut ids = Vec::new();
    for b in 0..case.lens.len() {
        let id = cache.add_request();
        ids.push(id);
        // Two appends per request (a prefill that ends mid-page, then the rest), so pages are
        // extended as well as started.
        let (k, v) = step.request_rows::<T>(b).unwrap();
        let row = step.shape.num_kv_heads * step.shape.head_dim;
        let split = case.lens[b] / 2;
        for (lo, hi) in [(0, split), (split, case.lens[b])] {
            if hi > lo {
                let kd = stream.clone_htod(&k[lo * row..hi * row]).unwrap();
                let vd = stream.clone_htod(&v[lo * row..hi * row]).unwrap();
                decoder
                    .append(&mut cache, &[(id, hi - lo)], &kd, &vd)
                    .unwrap();
            }
        }
    }
    let host_table = cache.host_page_table(&ids).unwrap();
    let table = cache.page_table(stream, &ids).unwrap();
    let (k, v) = cache.download(stream).unwrap();
    let to_f32 = |x: Vec<T>| x.into_iter().map(|e| e.to_f32()).collect::<Vec<f32>>();
    Built {
        step,
        cache,
        table,
        host_table,
        k: to_f32(k),
        v: to_f32(v),
        channels,
    }
}

fn poisoned_output<T: KvElement>(
    stream: &Arc<CudaStream>,
    decoder: &SparseDecoder,
    built: &Built<T>,
) -> SparseOutput<T> {
    let mut out = decoder
        .alloc_output::<T>(&built.table, built.step.shape.num_kv_heads)
        .unwrap();
    stream
        .memcpy_htod(&vec![T::poison(); out.o.len()], &mut out.o)
        .unwrap();
    stream
        .memcpy_htod(&vec![f32::NAN; out.lse.len()], &mut out.lse)
        .unwrap();
    stream
        .memcpy_htod(&vec![-7i32; out.kept.len()], &mut out.kept)
        .unwrap();
    stream
        .memcpy_htod(&vec![-1i32; out.kept_counts.len()], &mut out.kept_counts)
        .unwrap();
    out
}

/// The derived structures on the GPU equal the reference's, bit for bit.
fn check_metadata<T: KvElement>(
    stream: &Arc<CudaStream>,
    built: &Built<T>,
    kv: &HostKv,
    what: &str,
) -> (Option<QuestMeta>, Option<Quant4Cache>, Option<DsLabels>) {
    let d = built.cache.derived();
    let labels = d.k_label.as_ref().map(|labels_dev| {
        let want = DsLabels::build(kv, &built.host_table, built.channels.clone()).unwrap();
        let got: Vec<f32> = stream
            .clone_dtoh(labels_dev)
            .unwrap()
            .iter()
            .map(|x| x.to_f32())
            .collect();
        assert_eq!(got.len(), want.labels.len(), "{what}: label cache size");
        for slot in built.host_table.valid_slots() {
            for g in 0..kv.shape.num_kv_heads {
                let at = want.try_row(slot, g).unwrap() * want.r;
                assert_eq!(
                    &got[at..at + want.r],
                    want.try_label_row(slot, g).unwrap(),
                    "{what}: labels of slot {slot} head {g}"
                );
            }
        }
        want
    });
    let quest = d.page_bounds.as_ref().map(|bounds_dev| {
        let want = QuestMeta::build(kv, &built.host_table).unwrap();
        let bounds: Vec<f32> = stream
            .clone_dtoh(bounds_dev)
            .unwrap()
            .iter()
            .map(|x| x.to_f32())
            .collect();
        for page in built.host_table.kv_indices().iter().map(|&p| p as usize) {
            for g in 0..kv.shape.num_kv_heads {
                // The device keeps (page, head)'s max row and then its min row.
                let at = 2 * want.try_offset(page, g).unwrap();
                let n = kv.shape.head_dim;
                assert_eq!(
                    &bounds[at..at + n],
                    want.try_max_row(page, g).unwrap(),
                    "{what}: page max of page {page} head {g}"
                );
                assert_eq!(
                    &bounds[at + n..at + 2 * n],
                    want.try_min_row(page, g).unwrap(),
                    "{what}: page min of page {page} head {g}"
                );
            }
        }
        want
    });
    let quant = d.k_q4.as_ref().map(|codes_dev| {
        let want = Quant4Cache::build(kv, &built.host_table).unwrap();
        let codes = stream.clone_dtoh(codes_dev).unwrap();
        let scales = stream
            .clone_dtoh(d.k_q4_scale_min.as_ref().unwrap())
            .unwrap();
        for b in 0..built.host_table.batch() {
            for t in 0..built.host_table.len_of(b) {
                let slot = built.host_table.try_slot(b, t).unwrap();
                for g in 0..kv.shape.num_kv_heads {
                    let row = want.try_row(slot, g).unwrap();
                    let n = kv.shape.head_dim / 2;
                    assert_eq!(
                        &codes[row * n..row * n + n],
                        want.try_codes_row(slot, g).unwrap(),
                        "{what}: 4-bit codes of slot {slot} head {g}"
                    );
                    assert_eq!(
                        [scales[2 * row], scales[2 * row + 1]],
                        want.try_scale_min_row(slot, g).unwrap(),
                        "{what}: scale/min of slot {slot} head {g}"
                    );
                }
            }
        }
        want
    });
    (quest, quant, labels)
}

/// Every position where the GPU selector's choice differs from the reference's is a near-tie
/// with the boundary score; `scores(row)` gives the reference's scores of a row's items (pages
/// or tokens) and `want` its choice as positions. Returns, per row, whether the choices are
/// identical.
fn check_selection(
    gpu: &(Vec<i32>, Vec<i32>),
    stride: usize,
    want: &[Vec<usize>],
    scores: &dyn Fn(usize) -> Vec<f64>,
    what: &str,
) -> Vec<bool> {
    let mut identical = vec![true; want.len()];
    for (row, want_row) in want.iter().enumerate() {
        let count = gpu.1[row] as usize;
        let got: Vec<usize> = gpu.0[row * stride..row * stride + count]
            .iter()
            .map(|&x| x as usize)
            .collect();
        if &got == want_row {
            continue;
        }
        identical[row] = false;
        let scores = scores(row);
        assert_eq!(
            got.len(),
            want_row.len(),
            "{what}: selection size of row {row}"
        );
        assert_eq!(
            got.last(),
            want_row.last(),
            "{what}: the last page (newest token) is always selected"
        );
        let boundary = want_row[..want_row.len() - 1]
            .iter()
            .map(|&p| scores[p])
            .fold(f64::INFINITY, f64::min);
        let scale: f64 = scores.iter().map(|s| s.abs()).fold(0.0, f64::max).max(1.0);
        for p in got
            .iter()
            .filter(|p| !want_row.contains(p))
            .chain(want_row.iter().filter(|p| !got.contains(p)))
        {
            assert!((scores[*p] - boundary).abs() <= NEAR_TIE * scale, "{what}: item {p} of row {row} differs but its score {} is not near the boundary {boundary}", scores[*p]);
        }
    }
    identical
}

fn run_case<T: KvElement>(stream: &Arc<CudaStream>, case: &Case, seed: u64) {
    let spec = case.spec;
    // The cases cycle through launch overlap off, always, and the default (programmatic
    // dependent launch; launched, as here, the default overlaps too), and every other pair runs
    // top-p's threshold and compaction fused in one cluster launch: each launch path meets
    // every part of the matrix over the runs.
    let overlap = [
        LaunchOverlap::Off,
        LaunchOverlap::Always,
        LaunchOverlap::Auto,
    ][(seed % 3) as usize];
    let fused = (seed / 2) % 2 == 1;
    // And the attention alternates between its two kernels, out of step with both.
    let kernel = if (seed / 4) % 2 == 1 {
        AttentionKernel::TensorCores
    } else {
        AttentionKernel::CudaCores
    };
    // And a kept list's smallest attention chunk is 1, 2 or 3 tiles.
    let chunk_tiles = 1 + (seed / 8 % 3) as usize;
    // And the selection runs on the decoder's choice or either kernel forced, whatever the
    // step's rows and lengths; nine consecutive seeds meet every pair of it and the overlap.
    let selection = [
        SelectionKernel::Auto,
        SelectionKernel::RadixPasses,
        SelectionKernel::InRegisters,
    ][((seed + seed / 3) % 3) as usize];
    // And blocks of a kernel per row are spread over the SMs, or packed, in every other run.
    let spread_rows = (seed / 9).is_multiple_of(2);
    // And the register selection's clusters are limited to 8 (the default; twice as often), 4,
    // 2 or 1 CTAs per row.
    let cluster_limit = [8, 8, 4, 2, 1][(seed % 5) as usize];
    // And the threshold and compaction, when apart, run in the decoder's choice of blocks or
    // either size forced.
    let prune_blocks = [PruneBlocks::Auto, PruneBlocks::Small, PruneBlocks::Large]
        [((seed / 2 + seed / 7) % 3) as usize];
    let what = format!(
        "{spec} B0 {} p {} kv_heads {} lens {:?} seed {seed} launch overlap {overlap:?} fused prune {fused} attention {kernel:?} chunk tiles {chunk_tiles} selection {selection:?} clusters of at most {cluster_limit} spread rows {spread_rows} pruning blocks {prune_blocks:?}",
        case.budget,
        case.p,
        case.num_kv_heads,
        &case.lens[..case.lens.len().min(6)]
    );
    let sm_scale = 1.0 / (spec.head_dim as f32).sqrt();
    let params = SparseParams {
        budget: case.budget,
        p: case.p,
        sm_scale: Some(sm_scale),
    };
    let mut decoder = SparseDecoder::new(stream.clone(), spec, params).unwrap();
    decoder.set_launch_overlap(overlap);
    decoder.set_fused_prune(fused);
    decoder.set_attention_kernel(kernel);
    decoder.set_sparse_chunk_tiles(chunk_tiles);
    decoder.set_selection_kernel(selection);
    decoder.set_spread_rows(spread_rows);
    decoder.set_selection_cluster_limit(cluster_limit).unwrap();
    decoder.set_prune_blocks(prune_blocks);
    let built = build::<T>(stream, &decoder, case, seed);
    let kv = HostKv {
        shape: built.step.shape,
        k: &built.k,
        v: &built.v,
    };
    let (quest, quant, labels) = check_metadata(stream, &built, &kv, &what);

    let mut out = poisoned_output(stream, &decoder, &built);
    let mut ws = SparseWorkspace::default();
    let mut launched = Vec::new();
    decoder
        .run_instrumented(
            &built.cache_q(stream),
            &built.cache,
            &built.table,
            &mut out,
            &mut ws,
            &mut |stage| {
                launched.extend(stage);
                Ok(())
            },
        )
        .unwrap();
    // The selector runs unless every request fits the budget (then it would choose everything).
    let plan = decoder.plan(case.lens.len(), case.num_kv_heads, built.table.max_len());
    let page_size = spec.page_size as usize;
    let fits = case.lens.iter().all(|&len| match spec.selector {
        Selector::Quest => len.div_ceil(page_size) <= case.budget.div_ceil(page_size),
        _ => len <= case.budget,
    });
    assert_eq!(
        plan.selects_everything,
        fits && spec.selector != Selector::Full,
        "{what}: the plan's selects_everything"
    );
    let forced_prune = match prune_blocks {
        PruneBlocks::Small => Some((Stage::ThresholdInSmallBlocks, Stage::CompactInSmallBlocks)),
        PruneBlocks::Large => Some((Stage::Threshold, Stage::Compact)),
        PruneBlocks::Auto => None,
    };
    if let (Some((threshold, compact)), false) = (forced_prune, fused) {
        let pruned = spec.selector != Selector::Full || spec.pruning == Pruning::TopP;
        assert_eq!(
            launched.contains(&compact),
            pruned,
            "{what}: compaction kernel: {launched:?}"
        );
        assert_eq!(
            launched.contains(&threshold),
            spec.pruning == Pruning::TopP,
            "{what}: threshold kernel: {launched:?}"
        );
    }
    assert_eq!(
        launched.iter().any(|stage| stage.is_selector()),
        spec.selector != Selector::Full && !plan.selects_everything,
        "{what}: selector stages launched: {launched:?}"
    );
    let o: Vec<f32> = stream
        .clone_dtoh(&out.o)
        .unwrap()
        .iter()
        .map(|x| x.to_f32())
        .collect();
    let lse = stream.clone_dtoh(&out.lse).unwrap();
    let counts = stream.clone_dtoh(&out.kept_counts).unwrap();
    let kept = stream.clone_dtoh(&out.kept).unwrap();

    let mut step_params = StepParams::new(case.budget, case.p, sm_scale);
    step_params.record_weights = true;
    let inputs = StepInputs {
        q: &built.step.q,
        num_qo_heads: built.step.num_qo_heads,
        kv,
        table: &built.host_table,
        quest: quest.as_ref(),
        quant: quant.as_ref(),
        ds: labels.as_ref(),
    };
    let want = decode_step(&spec, &step_params, &inputs).unwrap();

    let kvh = case.num_kv_heads;
    let g_size = spec.group_size as usize;
    let qo = kvh * g_size;
    let d = spec.head_dim as usize;
    let q_group = |row: usize| {
        let (b, g) = (row / kvh, row % kvh);
        &built.step.q[(b * qo + g * g_size) * d..][..g_size * d]
    };
    let stride = plan.selected_stride;
    // Slot -> position within its request, one map per request.
    let positions_of: Vec<std::collections::HashMap<usize, usize>> = (0..case.lens.len())
        .map(|b| {
            (0..built.host_table.len_of(b))
                .map(|t| (built.host_table.try_slot(b, t).unwrap(), t))
                .collect()
        })
        .collect();
    let gpu_selection = ws.selection(stream).unwrap();
    let rows = case.lens.len() * case.num_kv_heads;
    let identical_rows = match (&quest, &labels, &gpu_selection) {
        // Every request fits the budget: the step launched no selection and took every token,
        // which must be what the reference's selector chose.
        (Some(_), _, None) | (_, Some(_), None) if plan.selects_everything => {
            for (row, candidates) in want.candidates.iter().enumerate() {
                assert_eq!(
                    candidates.len(),
                    built.host_table.len_of(row / kvh),
                    "{what}: the step selected everything but the reference's selector did not (row {row})"
                );
            }
            vec![true; rows]
        }
        (Some(meta), _, Some(gpu)) => check_selection(
            gpu,
            stride,
            &want.selected_pages,
            &|row| {
                quest_scores(q_group(row), meta, &built.host_table, row / kvh, row % kvh).unwrap()
            },
            &what,
        ),
        (_, Some(ds), Some(gpu)) => {
            // The reference's token choice as positions (its candidates, in position order).
            let want_positions: Vec<Vec<usize>> = want
                .candidates
                .iter()
                .enumerate()
                .map(|(row, slots)| {
                    let position = &positions_of[row / kvh];
                    slots.iter().map(|s| position[s]).collect()
                })
                .collect();
            check_selection(
                gpu,
                stride,
                &want_positions,
                &|row| {
                    ds_scores(q_group(row), ds, &built.host_table, row / kvh, row % kvh).unwrap()
                },
                &what,
            )
        }
        (None, None, None) => vec![true; rows],
        _ => panic!("{what}: the GPU selection does not match the variant's selector"),
    };
    let selection_identical = identical_rows.iter().all(|&same| same);
    let (atol, rtol) = match spec.dtype {
        Dtype::F16 => (2e-3, 8e-3),
        Dtype::Bf16 => (8e-3, 2e-2),
    };
    let mut differing_rows = 0;
    for (b, position) in positions_of.iter().enumerate() {
        for g in 0..kvh {
            let row = b * kvh + g;
            let count = counts[row];
            assert!(
                count >= 1 && count as usize <= out.max_cands,
                "{what}: kept count {count} of row {row}"
            );
            let got: Vec<usize> = kept[row * out.max_cands..row * out.max_cands + count as usize]
                .iter()
                .map(|&s| s as usize)
                .collect();
            // Kept slots are candidates of this request, in candidate order, each once.
            let positions: Vec<usize> = got
                .iter()
                .map(|s| {
                    *position
                        .get(s)
                        .unwrap_or_else(|| panic!("{what}: slot {s} is not a token of request {b}"))
                })
                .collect();
            if identical_rows[row] {
                assert!(
                    positions.windows(2).all(|w| w[0] < w[1]),
                    "{what}: kept list of row {row} is not in candidate order"
                );
            }
            let mut want_set = want.kept[row].clone();
            want_set.sort_unstable();
            let mut got_set = got.clone();
            got_set.sort_unstable();
            if got_set != want_set {
                differing_rows += 1;
            }
            // Where the row's candidates agree, only near-ties of a threshold may differ. (Where
            // a near-tie of the selection changed them, the top-p target, p times the mass of
            // every candidate, changed with them, and the kept sets may differ at the margin.)
            if got_set != want_set && identical_rows[row] {
                assert_eq!(
                    spec.pruning,
                    Pruning::TopP,
                    "{what}: without pruning the kept set is the candidate set"
                );
                let cands = &want.candidates[row];
                for s in got_set
                    .iter()
                    .filter(|s| !want_set.contains(s))
                    .chain(want_set.iter().filter(|s| !got_set.contains(s)))
                {
                    let c = cands
                        .iter()
                        .position(|x| x == s)
                        .unwrap_or_else(|| panic!("{what}: slot {s} is not a candidate"));
                    let near = (0..g_size).any(|h| {
                        let head = &want.heads[b * qo + g * g_size + h];
                        let w = head.weights.as_ref().unwrap()[c];
                        (w - head.threshold).abs() <= NEAR_TIE * head.threshold
                    });
                    assert!(near, "{what}: slot {s} of row {row} kept differently but no head's weight is near its threshold");
                }
                // The GPU's set still carries mass p for every head under the reference weights.
                for h in 0..g_size {
                    let head = &want.heads[b * qo + g * g_size + h];
                    let weights = head.weights.as_ref().unwrap();
                    let mass: f64 = cands
                        .iter()
                        .zip(weights)
                        .filter(|(s, _)| got_set.contains(s))
                        .map(|(_, w)| w)
                        .sum();
                    assert!(
                        mass >= case.p as f64 * (1.0 - NEAR_TIE),
                        "{what}: row {row} head {h} keeps mass {mass} < p"
                    );
                }
            }
            // Attention is exact over whatever was kept.
            for h in 0..g_size {
                let head = b * qo + g * g_size + h;
                let (ref_o, ref_lse) = attend(
                    &built.step.q[head * d..][..d],
                    &kv,
                    g,
                    &got,
                    sm_scale as f64,
                )
                .unwrap();
                common::assert_close(
                    &format!("o of head {head}, {what}"),
                    &o[head * d..][..d],
                    &ref_o,
                    atol,
                    rtol,
                );
                common::assert_close(
                    &format!("lse of head {head}, {what}"),
                    &lse[head..head + 1],
                    &[ref_lse],
                    1e-3,
                    1e-4,
                );
            }
        }
    }
    // Near-ties are rare on random data: a systematic disagreement is a bug, not rounding.
    assert!(
        differing_rows * 10 <= counts.len().max(10),
        "{what}: {differing_rows} of {} rows differ",
        counts.len()
    );
    if selection_identical && differing_rows == 0 {
        common::assert_close(
            &format!("o vs the reference step, {what}"),
            &o,
            &want.o,
            atol,
            rtol,
        );
        assert_eq!(
            counts.iter().map(|&c| c as usize).collect::<Vec<_>>(),
            want.kept_counts,
            "{what}: kept counts"
        );
    }
}

impl<T: KvElement> Built<T> {
    fn cache_q(&self, stream: &Arc<CudaStream>) -> cudarc::driver::CudaSlice<T> {
        stream
            .clone_htod(&SyntheticStep::to_elements::<T>(&self.step.q))
            .unwrap()
    }
}

fn run(stream: &Arc<CudaStream>, case: &Case, seed: u64) {
    match case.spec.dtype {
        Dtype::F16 => run_case::<half::f16>(stream, case, seed),
        Dtype::Bf16 => run_case::<half::bf16>(stream, case, seed),
    }
}

fn spec(
    page_size: u32,
    head_dim: u32,
    dtype: Dtype,
    group_size: u32,
    layout: KvLayout,
    selector: Selector,
    pruning: Pruning,
) -> VariantSpec {
    VariantSpec {
        page_size,
        head_dim,
        dtype,
        group_size,
        kv_layout: layout,
        selector,
        pruning,
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_sparse_step_matches_reference_over_the_variant_matrix() {
    let Some(stream) = common::gpu_stream() else {
        return;
    };
    let seed = common::fresh_seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let ps = [0.5f32, 0.85, 0.95, 0.99, 1.0];
    let mut cases = Vec::new();
    let mut i = 0usize;
    for (selector, pruning) in [
        (Selector::Quest, Pruning::TopP),
        (Selector::Quest, Pruning::None),
        (Selector::Full, Pruning::TopP),
        (Selector::DoubleSparse { channels: 0 }, Pruning::TopP),
        (Selector::DoubleSparse { channels: 0 }, Pruning::None),
    ] {
        for dtype in [Dtype::F16, Dtype::Bf16] {
            for layout in [KvLayout::Nhd, KvLayout::Hnd] {
                for group_size in [1, 2, 4, 8] {
                    let page_size = [1, 16, 64][i % 3];
                    let head_dim = [64, 128, 256][(i / 3) % 3];
                    // r cycles over 16, 32, 64, below head_dim.
                    let selector = match selector {
                        Selector::DoubleSparse { .. } => Selector::DoubleSparse {
                            channels: [16, 32, 64][i % if head_dim == 64 { 2 } else { 3 }],
                        },
                        other => other,
                    };
                    i += 1;
                    let batch = rng.random_range(1..=6);
                    let max_len = rng.random_range(1..=if page_size == 1 { 1500 } else { 5000 });
                    let lens = ragged_lengths(&mut rng, batch, max_len).unwrap();
                    // B0 below the longest request, or (one case in four) above all of them.
                    let budget = if i.is_multiple_of(4) {
                        max_len + rng.random_range(0..100)
                    } else {
                        rng.random_range(1..=max_len.max(2) / 2 + 1)
                    };
                    cases.push(Case {
                        spec: spec(
                            page_size, head_dim, dtype, group_size, layout, selector, pruning,
                        ),
                        lens,
                        num_kv_heads: rng.random_range(1..=2),
                        budget,
                        p: ps[i % ps.len()],
                        key_scale: [0.5, 1.5, 3.0][i % 3],
                    });
                }
            }
        }
    }
    common::warm_jit(&stream, cases.iter().map(|c| c.spec));
    for (n, case) in cases.iter().enumerate() {
        run(&stream, case, seed.wrapping_add(n as u64));
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_sparse_step_every_p_on_one_long_batch() {
    let Some(stream) = common::gpu_stream() else {
        return;
    };
    let seed = common::fresh_seed();
    for (n, p) in [0.5f32, 0.85, 0.95, 0.99, 1.0].into_iter().enumerate() {
        let case = Case {
            spec: spec(
                16,
                128,
                Dtype::F16,
                4,
                KvLayout::Hnd,
                Selector::Quest,
                Pruning::TopP,
            ),
            lens: vec![12_000, 333, 4097, 20],
            num_kv_heads: 2,
            budget: 2048,
            p,
            key_scale: 2.0,
        };
        run(&stream, &case, seed.wrapping_add(n as u64));
    }
}

/// Selections over long requests: Double Sparsity for each r (scores over many token blocks),
/// and Quest on pages of one token. The register kernels spread a row longer than half a CTA's
/// share of scores (8192 pages, 16384 tokens) over a cluster of the fewest CTAs that hold the
/// step's longest row (up to the decoder's limit), and choose shorter rows in passes on the
/// cluster's first CTA (see select.cuh). Under the default choice and limit the cases below
/// meet clusters of 8, 4, 2 and 1 on a GPU of 132 SMs (the H200); `run_case` also forces
/// either kernel and lower limits, and every case is checked against the reference.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_selection_over_long_requests() {
    let Some(stream) = common::gpu_stream() else {
        return;
    };
    let seed = common::fresh_seed();
    let ds = |channels| Selector::DoubleSparse { channels };
    // (selector, page size, pruning, dtype, longest request, KV heads); 6 requests each.
    let rows = [
        // 12 rows: clusters of 8 (70000 tokens, 60000 pages), 4 (40000 and 33000 tokens,
        // 20000 pages), 2 (20000 tokens) and 1 (7000 pages).
        (ds(32), 16, Pruning::TopP, Dtype::F16, 70_000, 2),
        (Selector::Quest, 1, Pruning::TopP, Dtype::Bf16, 60_000, 2),
        (ds(16), 16, Pruning::TopP, Dtype::F16, 20_000, 2),
        (ds(32), 16, Pruning::None, Dtype::Bf16, 40_000, 2),
        (ds(64), 8, Pruning::TopP, Dtype::Bf16, 33_000, 2),
        (Selector::Quest, 1, Pruning::TopP, Dtype::F16, 20_000, 2),
        (Selector::Quest, 1, Pruning::None, Dtype::Bf16, 7_000, 2),
        // 24 and 48 rows: clusters of 2.
        (ds(16), 16, Pruning::TopP, Dtype::Bf16, 30_000, 4),
        (ds(32), 16, Pruning::TopP, Dtype::F16, 20_000, 8),
        // 96 rows: one CTA per row where it holds the longest (16000 tokens); clusters of two
        // for 12000 pages, in more than one wave where the register kernel is forced (else
        // the passes).
        (ds(32), 16, Pruning::TopP, Dtype::F16, 16_000, 16),
        (Selector::Quest, 1, Pruning::TopP, Dtype::F16, 12_000, 16),
    ];
    let spec_of = |(selector, page_size, pruning, dtype, _, _)| {
        spec(page_size, 128, dtype, 4, KvLayout::Hnd, selector, pruning)
    };
    common::warm_jit(&stream, rows.into_iter().map(spec_of));
    for (n, row) in rows.into_iter().enumerate() {
        let (longest, num_kv_heads) = (row.4, row.5);
        let case = Case {
            spec: spec_of(row),
            // Rows in registers (token rows past 8192, page rows past 4096) beside rows in
            // passes (`gpu_selection_over_more_rows_than_sms` covers the kernels of passes
            // only).
            lens: vec![longest, 333, 6000, 4097, 20, 9000],
            num_kv_heads,
            budget: 2048,
            p: 0.9,
            key_scale: 2.0,
        };
        run(&stream, &case, seed.wrapping_add(n as u64));
    }
}

/// Steps of more rows than any GPU has SMs, which the selections run on their kernels of radix
/// passes in small blocks (fewer rows take the register kernels, a block per SM): both
/// selectors, with and without pruning, over ragged requests of up to 3000 tokens.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_selection_over_more_rows_than_sms() {
    let Some(stream) = common::gpu_stream() else {
        return;
    };
    let seed = common::fresh_seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let rows = [
        (Selector::Quest, Pruning::TopP, Dtype::F16),
        (Selector::Quest, Pruning::None, Dtype::Bf16),
        (
            Selector::DoubleSparse { channels: 32 },
            Pruning::TopP,
            Dtype::Bf16,
        ),
        (
            Selector::DoubleSparse { channels: 16 },
            Pruning::None,
            Dtype::F16,
        ),
    ];
    let spec_of =
        |(selector, pruning, dtype)| spec(16, 128, dtype, 4, KvLayout::Hnd, selector, pruning);
    common::warm_jit(&stream, rows.into_iter().map(spec_of));
    for (n, row) in rows.into_iter().enumerate() {
        // 40 requests x 8 KV heads = 320 rows.
        let case = Case {
            spec: spec_of(row),
            lens: ragged_lengths(&mut rng, 40, 3000).unwrap(),
            num_kv_heads: 8,
            budget: 512,
            p: 0.9,
            key_scale: 2.0,
        };
        run(&stream, &case, seed.wrapping_add(n as u64));
    }
}

/// A whole step captured in a CUDA graph and replayed with new queries.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_sparse_step_replays_as_a_cuda_graph() {
    let Some(default) = common::gpu_stream() else {
        return;
    };
    let ctx = default.context().clone();
    // Graph capture needs a stream of its own, and cudarc's cross-stream event tracking would
    // insert waits on events recorded outside the capture.
    // SAFETY: everything below runs on the one stream created here.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().unwrap();
    let seed = common::fresh_seed();
    let case = Case {
        spec: spec(
            16,
            128,
            Dtype::Bf16,
            4,
            KvLayout::Nhd,
            Selector::Quest,
            Pruning::TopP,
        ),
        lens: vec![9000, 4000, 130],
        num_kv_heads: 2,
        budget: 1024,
        p: 0.9,
        key_scale: 2.0,
    };
    let sm_scale = 1.0 / 128f32.sqrt();
    let mut decoder = SparseDecoder::new(
        stream.clone(),
        case.spec,
        SparseParams {
            budget: case.budget,
            p: case.p,
            sm_scale: Some(sm_scale),
        },
    )
    .unwrap();
    // Captured with overlapped launches (the graph keeps their programmatic dependencies; the
    // default also captures this small step so) or without, the fused threshold and
    // compaction (a cluster launch), and the tensor-core attention.
    let overlap = if seed.is_multiple_of(2) {
        LaunchOverlap::Always
    } else {
        LaunchOverlap::WhenLaunched
    };
    eprintln!("graph replay: seed {seed}, launch overlap {overlap:?}");
    decoder.set_launch_overlap(overlap);
    decoder.set_fused_prune(true);
    decoder.set_attention_kernel(AttentionKernel::TensorCores);
    let built = build::<half::bf16>(&stream, &decoder, &case, seed);
    let kv = HostKv {
        shape: built.step.shape,
        k: &built.k,
        v: &built.v,
    };
    let mut q = built.cache_q(&stream);
    let mut out = poisoned_output(&stream, &decoder, &built);
    let mut ws = SparseWorkspace::default();
    decoder
        .run_into(&q, &built.cache, &built.table, &mut out, &mut ws)
        .unwrap();
    stream.synchronize().unwrap();
    stream
        .begin_capture(
            cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
        )
        .unwrap();
    decoder
        .run_into(&q, &built.cache, &built.table, &mut out, &mut ws)
        .unwrap();
    let graph = stream
        .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("a captured graph");
    let quest = QuestMeta::build(&kv, &built.host_table).unwrap();
    let quant = Quant4Cache::build(&kv, &built.host_table).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    for replay in 0..2 {
        let q_host: Vec<f32> = (0..built.step.q.len())
            .map(|_| {
                twilight::element::round_to::<half::bf16>(
                    2.0 * twilight_synth::synthetic::standard_normal(&mut rng),
                )
            })
            .collect();
        stream
            .memcpy_htod(&SyntheticStep::to_elements::<half::bf16>(&q_host), &mut q)
            .unwrap();
        stream
            .memcpy_htod(&vec![half::bf16::poison(); out.o.len()], &mut out.o)
            .unwrap();
        graph.launch().unwrap();
        stream.synchronize().unwrap();
        let o: Vec<f32> = stream
            .clone_dtoh(&out.o)
            .unwrap()
            .iter()
            .map(|x| x.to_f32())
            .collect();
        let counts = stream.clone_dtoh(&out.kept_counts).unwrap();
        let kept = stream.clone_dtoh(&out.kept).unwrap();
        let want = decode_step(
            &case.spec,
            &StepParams::new(case.budget, case.p, sm_scale),
            &StepInputs {
                q: &q_host,
                num_qo_heads: built.step.num_qo_heads,
                kv,
                table: &built.host_table,
                quest: Some(&quest),
                quant: Some(&quant),
                ds: None,
            },
        )
        .unwrap();
        // Attention over the replay's own kept lists must match the reference exactly, and the
        // kept counts must be the new query's (not the captured one's).
        let d = 128;
        let mut same_counts = 0;
        for row in 0..counts.len() {
            let got: Vec<usize> = kept[row * out.max_cands..][..counts[row] as usize]
                .iter()
                .map(|&s| s as usize)
                .collect();
            same_counts += usize::from(counts[row] as usize == want.kept_counts[row]);
            for h in 0..4 {
                let head = row * 4 + h;
                let (ref_o, _) = attend(
                    &q_host[head * d..][..d],
                    &kv,
                    row % 2,
                    &got,
                    sm_scale as f64,
                )
                .unwrap();
                common::assert_close(
                    &format!("replay {replay} head {head}"),
                    &o[head * d..][..d],
                    &ref_o,
                    8e-3,
                    2e-2,
                );
            }
        }
        assert!(
            same_counts * 10 >= counts.len() * 8,
            "replay {replay}: kept counts {counts:?} vs reference {:?}",
            want.kept_counts
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_sparse_bad_parameters_are_errors() {
    let Some(stream) = common::gpu_stream() else {
        return;
    };
    let quest = spec(
        16,
        64,
        Dtype::F16,
        2,
        KvLayout::Hnd,
        Selector::Quest,
        Pruning::TopP,
    );
    let ok = SparseParams {
        budget: 64,
        p: 0.9,
        sm_scale: None,
    };
    for bad in [
        SparseParams { p: 0.0, ..ok },
        SparseParams { p: 1.5, ..ok },
        SparseParams { p: f32::NAN, ..ok },
        SparseParams { budget: 0, ..ok },
        SparseParams {
            sm_scale: Some(f32::INFINITY),
            ..ok
        },
        SparseParams {
            sm_scale: Some(-1.0),
            ..ok
        },
    ] {
        assert!(
            matches!(
                SparseDecoder::new(stream.clone(), quest, bad),
                Err(twilight::Error::Parameter(_))
            ),
            "{bad:?}"
        );
    }
    let mut decoder = SparseDecoder::new(stream.clone(), quest, ok).unwrap();
    // A selection cluster is 1, 2, 4 or 8 CTAs.
    for bad in [0, 3, 6, 16, u32::MAX] {
        assert!(
            matches!(
                decoder.set_selection_cluster_limit(bad),
                Err(twilight::Error::Parameter(_))
            ),
            "{bad}"
        );
    }
    assert_eq!(decoder.decoder().selection_cluster_limit(), 8);
    for good in [1, 2, 4, 8] {
        decoder.set_selection_cluster_limit(good).unwrap();
        assert_eq!(decoder.decoder().selection_cluster_limit(), good);
    }
    // A cache without the variant's metadata is refused, for append and for a step.
    let step =
        SyntheticStep::random::<half::f16>(3, &[40], 1, 2, 16, 64, KvLayout::Hnd, 1.0).unwrap();
    let mut plain = PagedKvCache::<half::f16>::new(&stream, step.shape).unwrap();
    let id = plain.add_request();
    let (k, v) = step.request_rows::<half::f16>(0).unwrap();
    let (k, v) = (
        stream.clone_htod(&k).unwrap(),
        stream.clone_htod(&v).unwrap(),
    );
    assert!(decoder
        .append(&mut plain, &[(id, 40)], &k, &v)
        .unwrap_err()
        .to_string()
        .contains("metadata"));
    let mut full = PagedKvCache::<half::f16>::for_variant(&stream, step.shape, &quest).unwrap();
    let id = full.add_request();
    decoder.append(&mut full, &[(id, 40)], &k, &v).unwrap();
    let table = full.page_table(&stream, &[id]).unwrap();
    let q = stream.alloc_zeros::<half::f16>(2 * 64).unwrap();
    assert!(decoder.run(&q, &plain, &table).is_err());
    assert!(decoder.run(&q, &full, &table).is_ok());
    // The dense variant belongs to DenseDecoder.
    assert!(SparseDecoder::new(
        stream.clone(),
        VariantSpec {
            selector: Selector::Full,
            pruning: Pruning::None,
            ..quest
        },
        ok
    )
    .is_err());
    // Double Sparsity needs its channels, valid ones, and a cache labelled with the same r.
    let ds = VariantSpec {
        selector: Selector::DoubleSparse { channels: 16 },
        ..quest
    };
    let ds_decoder = SparseDecoder::new(stream.clone(), ds, ok).unwrap();
    let message = PagedKvCache::<half::f16>::for_variant(&stream, step.shape, &ds)
        .unwrap_err()
        .to_string();
    assert!(message.contains("for_double_sparse"), "{message}");
    let good: Vec<usize> = (0..16).map(|i| i * 4).collect();
    for bad in [
        vec![(0..15).collect::<Vec<usize>>()],
        vec![(1..17).map(|i| i * 4).collect()],
        vec![[vec![3, 3], (2..16).collect()].concat()],
        vec![good.clone(), good.clone()],
    ] {
        assert!(matches!(
            PagedKvCache::<half::f16>::for_double_sparse(&stream, step.shape, &ds, &bad),
            Err(twilight::Error::Parameter(_))
        ));
    }
    assert!(PagedKvCache::<half::f16>::for_double_sparse(
        &stream,
        step.shape,
        &quest,
        std::slice::from_ref(&good)
    )
    .is_err());
    let r32 = VariantSpec {
        selector: Selector::DoubleSparse { channels: 32 },
        ..quest
    };
    let mut labelled32 = PagedKvCache::<half::f16>::for_double_sparse(
        &stream,
        step.shape,
        &r32,
        &[(0..32).collect()],
    )
    .unwrap();
    let id32 = labelled32.add_request();
    let message = ds_decoder
        .append(&mut labelled32, &[(id32, 40)], &k, &v)
        .unwrap_err()
        .to_string();
    assert!(message.contains("metadata"), "{message}");
    assert!(ds_decoder.run(&q, &full, &table).is_err());
    let mut labelled =
        PagedKvCache::<half::f16>::for_double_sparse(&stream, step.shape, &ds, &[good]).unwrap();
    let id = labelled.add_request();
    ds_decoder
        .append(&mut labelled, &[(id, 40)], &k, &v)
        .unwrap();
    let table = labelled.page_table(&stream, &[id]).unwrap();
    assert!(ds_decoder.run(&q, &labelled, &table).is_ok());
}

//! Property tests of the CPU reference: top-p sets minimal and sufficient, budgets monotone in
//! p, `full` + `none` equal to dense attention, the 4-bit error bound, Quest's metadata and
//! selection rules. Small shapes, 64 cases per property.

use half::f16;
use proptest::prelude::*;
use twilight::reference::quant::{dequantize_row, quantize_row, Quant4Cache};
use twilight::reference::quest::{
    quest_budget_pages, quest_scores, quest_select, valid_tokens_per_page, QuestMeta,
};
use twilight::reference::{
    decode_step, dense_decode, CacheShape, HostKv, StepInputs, StepParams, StepResult,
};
use twilight::{AttentionGrid, Dtype, KvLayout, Pruning, Selector, StepPlan, VariantSpec};
use twilight_synth::generator::{generate, GeneratorParams, Preset};
use twilight_synth::synthetic::SyntheticStep;

/// One random problem: shapes, lengths and how peaked the keys are.
#[derive(Clone, Debug)]
struct Case {
    seed: u64,
    lens: Vec<usize>,
    num_kv_heads: usize,
    group_size: usize,
    page_size: usize,
    head_dim: usize,
    layout: KvLayout,
    key_scale: f32,
    /// Use the realistic generator instead of normal keys.
    realistic: bool,
}

fn case() -> impl Strategy<Value = Case> {
    (
        any::<u64>(),
        prop::collection::vec(1usize..=70, 1..=3),
        1usize..=2,
        prop::sample::select(vec![1usize, 2, 4]),
        prop::sample::select(vec![1usize, 2, 3, 4, 8, 16]),
        prop::sample::select(vec![8usize, 16]),
        any::<bool>(),
        prop::sample::select(vec![0.3f32, 1.0, 3.0, 8.0]),
        any::<bool>(),
    )
        .prop_map(
            |(
                seed,
                lens,
                num_kv_heads,
                group_size,
                page_size,
                head_dim,
                nhd,
                key_scale,
                realistic,
            )| {
                Case {
                    seed,
                    lens,
                    num_kv_heads,
                    group_size,
                    page_size,
                    head_dim,
                    layout: if nhd { KvLayout::Nhd } else { KvLayout::Hnd },
                    key_scale,
                    realistic,
                }
            },
        )
}

fn step_of(c: &Case) -> SyntheticStep {
    if c.realistic {
        let params = GeneratorParams::preset(Preset::Default, c.seed);
        generate::<f16>(
            &params,
            &c.lens,
            c.num_kv_heads,
            c.group_size,
            c.page_size,
            c.head_dim,
            c.layout,
        )
        .unwrap()
    } else {
        SyntheticStep::random::<f16>(
            c.seed,
            &c.lens,
            c.num_kv_heads,
            c.group_size,
            c.page_size,
            c.head_dim,
            c.layout,
            c.key_scale,
        )
        .unwrap()
    }
}

fn spec(c: &Case, selector: Selector, pruning: Pruning) -> VariantSpec {
    VariantSpec {
        page_size: c.page_size as u32,
        head_dim: c.head_dim as u32,
        dtype: Dtype::F16,
        group_size: c.group_size as u32,
        kv_layout: c.layout,
        selector,
        pruning,
    }
}

/// Runs a step of the given selector and pruning on `s`, with every derived structure.
fn run(
    c: &Case,
    s: &SyntheticStep,
    selector: Selector,
    pruning: Pruning,
    params: StepParams,
) -> StepResult {
    let kv = s.kv();
    let meta = QuestMeta::build(&kv, &s.table).unwrap();
    let quant = Quant4Cache::build(&kv, &s.table).unwrap();
    let inputs = StepInputs {
        q: &s.q,
        num_qo_heads: s.num_qo_heads,
        kv,
        table: &s.table,
        quest: Some(&meta),
        quant: Some(&quant),
        ds: None,
    };
    decode_step(&spec(c, selector, pruning), &params, &inputs).unwrap()
}

fn sm_scale(c: &Case) -> f32 {
    1.0 / (c.head_dim as f32).sqrt()
}

fn desc_sum(mut w: Vec<f64>) -> f64 {
    w.sort_by(|a, b| b.total_cmp(a));
    w.iter().sum()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Every query head's own kept set is `{w >= w*}`, sums to at least p, and its members
    /// strictly above the threshold sum to less than p (so without a tie at the threshold,
    /// dropping the smallest member falls below p). The group keeps the union.
    #[test]
    fn top_p_sets_are_sufficient_and_minimal(
        c in case(),
        p in prop::sample::select(vec![0.05f32, 0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0]),
        b0 in 1usize..=80,
        quest in any::<bool>(),
    ) {
        let s = step_of(&c);
        let mut params = StepParams::new(b0, p, sm_scale(&c));
        params.record_weights = true;
        let selector = if quest { Selector::Quest } else { Selector::Full };
        let r = run(&c, &s, selector, Pruning::TopP, params);
        let group = c.group_size;
        let p = p as f64;
        prop_assert_eq!(r.heads.len(), s.table.batch() * s.num_qo_heads);
        for (i, cands) in r.candidates.iter().enumerate() {
            let mut union = vec![false; cands.len()];
            for h in 0..group {
                let head = &r.heads[i * group + h];
                let w = head.weights.as_ref().unwrap();
                prop_assert_eq!(w.len(), cands.len());
                let kept: Vec<usize> = (0..w.len()).filter(|&j| w[j] >= head.threshold).collect();
                prop_assert_eq!(kept.len(), head.kept_count);
                prop_assert!(!kept.is_empty());
                let kept_w: Vec<f64> = kept.iter().map(|&j| w[j]).collect();
                let above: Vec<f64> =
                    kept_w.iter().cloned().filter(|&x| x > head.threshold).collect();
                if p >= 1.0 || desc_sum(w.clone()) < p {
                    // p = 1, or a p the rounded sum never reaches: everything.
                    prop_assert_eq!(kept.len(), w.len());
                } else {
                    prop_assert!(desc_sum(kept_w.clone()) >= p, "kept sum below p");
                    prop_assert!(desc_sum(above.clone()) < p, "not minimal");
                    if above.len() + 1 == kept.len() {
                        // No tie at the threshold: dropping the smallest falls below p.
                        let mut sorted = kept_w.clone();
                        sorted.sort_by(f64::total_cmp);
                        prop_assert!(desc_sum(sorted[1..].to_vec()) < p);
                    }
                }
                for j in kept {
                    union[j] = true;
                }
            }
            let mut want: Vec<usize> =
                cands.iter().zip(&union).filter(|(_, &u)| u).map(|(&s, _)| s).collect();
            want.sort_unstable();
            prop_assert_eq!(&r.kept[i], &want);
            prop_assert_eq!(r.kept_counts[i], want.len());
        }
    }

    /// Kept sets only grow with p (per query head and per group), on the same candidates.
    #[test]
    fn budgets_are_monotone_in_p(c in case(), b0 in 1usize..=80, quest in any::<bool>()) {
        let s = step_of(&c);
        let selector = if quest { Selector::Quest } else { Selector::Full };
        let ps = [0.1f32, 0.5, 0.7, 0.85, 0.9, 0.95, 0.99, 0.999, 1.0];
        let runs: Vec<StepResult> = ps
            .iter()
            .map(|&p| run(&c, &s, selector, Pruning::TopP, StepParams::new(b0, p, sm_scale(&c))))
            .collect();
        for pair in runs.windows(2) {
            let (lo, hi) = (&pair[0], &pair[1]);
            prop_assert_eq!(&lo.candidates, &hi.candidates);
            for (a, b) in lo.kept.iter().zip(&hi.kept) {
                prop_assert!(a.iter().all(|x| b.binary_search(x).is_ok()), "{:?} not in {:?}", a, b);
            }
            for (a, b) in lo.heads.iter().zip(&hi.heads) {
                prop_assert!(a.kept_count <= b.kept_count);
            }
        }
        // p = 1 keeps every candidate.
        let last = runs.last().unwrap();
        for (k, cands) in last.kept.iter().zip(&last.candidates) {
            prop_assert_eq!(k.len(), cands.len());
        }
    }

    /// `full` + `none` is dense attention, bit for bit; so is `full` + `top_p` at p = 1; and a
    /// budget of at least the sequence length selects every token with either selector.
    #[test]
    fn full_none_is_dense_and_big_budgets_select_everything(c in case(), p in 0.01f32..=1.0) {
        let s = step_of(&c);
        let scale = sm_scale(&c);
        let dense = dense_decode(&s.q, s.num_qo_heads, &s.kv(), &s.table, scale).unwrap();
        let full = run(&c, &s, Selector::Full, Pruning::None, StepParams::new(1, p, scale));
        prop_assert_eq!(&full.o, &dense.o);
        prop_assert_eq!(&full.lse, &dense.lse);
        let all_p = run(&c, &s, Selector::Full, Pruning::TopP, StepParams::new(1, 1.0, scale));
        prop_assert_eq!(&all_p.o, &dense.o);
        prop_assert_eq!(&all_p.lse, &dense.lse);
        let max_len = s.table.max_len();
        for selector in [Selector::Full, Selector::Quest] {
            let b0 = max_len + (c.seed % 5) as usize;
            let r = run(&c, &s, selector, Pruning::None, StepParams::new(b0, p, scale));
            for b in 0..s.table.batch() {
                let all: Vec<usize> = (0..s.table.len_of(b)).map(|t| s.table.try_slot(b, t).unwrap()).collect();
                let pages = s.table.pages_of(b).len();
                for g in 0..c.num_kv_heads {
                    let i = b * c.num_kv_heads + g;
                    prop_assert_eq!(&r.candidates[i], &all);
                    prop_assert_eq!(&r.selected_pages[i], &(0..pages).collect::<Vec<_>>());
                }
            }
            prop_assert_eq!(&r.o, &dense.o);
        }
    }

    /// The GPU plan skips Quest's selection (`StepPlan::selects_everything`) exactly where the
    /// reference's Quest chooses every page of every request.
    #[test]
    fn plans_skip_the_selection_exactly_where_quest_chooses_everything(
        c in case(),
        b0 in 1usize..=80,
    ) {
        let s = step_of(&c);
        let r = run(&c, &s, Selector::Quest, Pruning::None, StepParams::new(b0, 0.9, sm_scale(&c)));
        let everything = (0..s.table.batch()).all(|b| {
            let pages = s.table.pages_of(b).len();
            (0..c.num_kv_heads).all(|g| r.selected_pages[b * c.num_kv_heads + g].len() == pages)
        });
        let grid = AttentionGrid { tile: 32, num_sms: 132, resident_blocks: None };
        let rows = s.table.batch() * c.num_kv_heads;
        let plan = StepPlan::new(&spec(&c, Selector::Quest, Pruning::TopP), b0, grid, rows, s.table.max_len());
        prop_assert_eq!(plan.selects_everything, everything, "B0 {} lens {:?}", b0, &c.lens);
    }

    /// Quest: the budget is `min(pages, ceil(B0 / page_size))`, the last page is always in,
    /// every other selected page scores at least as high as every page left out (a tie going
    /// to the lower position), and candidates are the selected pages' valid tokens in order.
    #[test]
    fn quest_selection_rules(c in case(), b0 in 1usize..=80) {
        let s = step_of(&c);
        let r = run(&c, &s, Selector::Quest, Pruning::None, StepParams::new(b0, 0.9, sm_scale(&c)));
        let kv = s.kv();
        let meta = QuestMeta::build(&kv, &s.table).unwrap();
        let d = c.head_dim;
        for b in 0..s.table.batch() {
            let req_pages = s.table.pages_of(b);
            let n = req_pages.len();
            for g in 0..c.num_kv_heads {
                let i = b * c.num_kv_heads + g;
                let sel = &r.selected_pages[i];
                let budget = quest_budget_pages(b0, c.page_size).unwrap();
                prop_assert_eq!(sel.len(), n.min(budget));
                prop_assert_eq!(*sel.last().unwrap(), n - 1);
                let q_group = &s.q[(b * s.num_qo_heads + g * c.group_size) * d..][..c.group_size * d];
                let scores = quest_scores(q_group, &meta, &s.table, b, g).unwrap();
                for &a in &sel[..sel.len() - 1] {
                    for out in (0..n - 1).filter(|x| sel.binary_search(x).is_err()) {
                        prop_assert!(
                            scores[a] > scores[out] || (scores[a] == scores[out] && a < out),
                            "selected {} ({}) vs left out {} ({})", a, scores[a], out, scores[out]
                        );
                    }
                }
                prop_assert_eq!(sel, &quest_select(&scores, budget));
                let mut want = Vec::new();
                for &pos in sel {
                    let page = req_pages[pos] as usize;
                    let valid = if pos + 1 == n { s.table.kv_last_page_len()[b] as usize } else { c.page_size };
                    want.extend((0..valid).map(|o| page * c.page_size + o));
                }
                prop_assert_eq!(&r.candidates[i], &want);
            }
        }
    }

    /// Appending tokens a few at a time, page by page, gives exactly the batch-built Quest
    /// metadata and 4-bit K; unreferenced pages stay 0.
    #[test]
    fn incremental_append_matches_batch_build(c in case(), chunk_seed in any::<u64>()) {
        let s = step_of(&c);
        let kv = s.kv();
        let batch_meta = QuestMeta::build(&kv, &s.table).unwrap();
        let batch_q4 = Quant4Cache::build(&kv, &s.table).unwrap();
        let sh = s.shape;
        let mut meta = QuestMeta::zeros(sh.num_pages, sh.num_kv_heads, sh.head_dim).unwrap();
        let mut q4 = Quant4Cache::zeros(sh).unwrap();
        let mut rng = chunk_seed;
        for b in 0..s.table.batch() {
            let mut t = 0;
            let len = s.table.len_of(b);
            while t < len {
                // Pieces of 1..=5 tokens that never cross a page boundary.
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let off = t % c.page_size;
                let n = (1 + (rng >> 60) as usize % 5).min(c.page_size - off).min(len - t);
                let page = s.table.try_slot(b, t).unwrap() / c.page_size;
                meta.append(&kv, page, off, n).unwrap();
                q4.append(&kv, page, off, n).unwrap();
                t += n;
            }
        }
        prop_assert_eq!(&meta, &batch_meta);
        prop_assert_eq!(&q4, &batch_q4);
        let valid = valid_tokens_per_page(&s.table, sh.num_pages).unwrap();
        for (page, &v) in valid.iter().enumerate() {
            if v == 0 {
                for g in 0..sh.num_kv_heads {
                    prop_assert!(meta.try_max_row(page, g).unwrap().iter().all(|&x| x == 0.0));
                    prop_assert!(meta.try_min_row(page, g).unwrap().iter().all(|&x| x == 0.0));
                }
            }
        }
    }

    /// 4-bit error bound per element, against the exact row parameters computed here in f64
    /// (not the quantizer's own): `kmin`, `kmax` of the row and `scale = max(kmax - kmin,
    /// 1e-6) / 15`. The stored f16 `(scale_h, min_h)` must be the exact values to f16's
    /// half-ulp (plus the f32 rounding of the scale's division before it is stored), and
    /// `|dequant - k| <= scale / 2 + 15 * |scale - scale_h| + |kmin - min_h|
    ///                   + 4 * eps * (|k| + |kmin| + 15 * scale)`, eps = f32::EPSILON:
    /// half a step from rounding to the grid, the grid's stretch from the f16 scale over at
    /// most 15 steps, the f16 offset, and the f32 roundings of subtract, divide, multiply, add.
    #[test]
    fn four_bit_error_is_bounded(
        row in prop::collection::vec(-1.0f32..1.0, 1..=64),
        magnitude in prop::sample::select(vec![1e-7f32, 1e-3, 1.0, 30.0, 1000.0]),
        offset in -2.0f32..2.0,
        flat in any::<bool>(),
    ) {
        let mut k: Vec<f32> = row.iter().map(|&x| offset * magnitude + x * magnitude).collect();
        if k.len() % 2 == 1 {
            k.push(offset * magnitude);
        }
        if flat {
            let first = k[0];
            k.iter_mut().for_each(|x| *x = first);
        }
        let mut packed = vec![0u8; k.len() / 2];
        let sm = quantize_row(&k, &mut packed).unwrap();
        let kmin = k.iter().map(|&x| x as f64).fold(f64::INFINITY, f64::min);
        let kmax = k.iter().map(|&x| x as f64).fold(f64::NEG_INFINITY, f64::max);
        let scale = (kmax - kmin).max(1e-6) / 15.0;
        let mut out = vec![0f32; k.len()];
        dequantize_row(&packed, sm, &mut out).unwrap();
        let (scale_h, min_h) = (sm[0].to_f32() as f64, sm[1].to_f32() as f64);
        let eps = f32::EPSILON as f64;
        // kmin is an f32 value: one rounding to f16. The scale is divided in f32 first.
        prop_assert!((min_h - kmin).abs() <= f16_half_ulp(kmin), "min {} stored {}", kmin, min_h);
        prop_assert!(
            (scale_h - scale).abs() <= f16_half_ulp(scale) + 2.0 * eps * scale,
            "scale {} stored {}", scale, scale_h
        );
        for (&x, &y) in k.iter().zip(&out) {
            let bound = scale / 2.0
                + 15.0 * (scale - scale_h).abs()
                + (kmin - min_h).abs()
                + 4.0 * eps * (x.abs() as f64 + kmin.abs() + 15.0 * scale);
            let err = (y as f64 - x as f64).abs();
            prop_assert!(err <= bound, "k {} dequant {} err {} bound {}", x, y, err, bound);
        }
    }
}

/// Half the spacing of f16 values around `x` (subnormals below 2^-14 are spaced 2^-24).
fn f16_half_ulp(x: f64) -> f64 {
    let x = x.abs();
    let ulp = if x < 2f64.powi(-14) {
        2f64.powi(-24)
    } else {
        2f64.powi(x.log2().floor() as i32 - 10)
    };
    ulp / 2.0
}

#[test]
fn f16_half_ulp_matches_f16_spacing() {
    for x in [1.0f64, 1.5, 2.0, 1000.0, 6.1e-5, 1e-7, 0.0] {
        let h = half::f16::from_f64(x);
        let up = half::f16::from_bits(h.to_bits() + 1).to_f64();
        assert_eq!(f16_half_ulp(h.to_f64()), (up - h.to_f64()) / 2.0, "{x}");
    }
}

/// Hand-computed top-p examples of the tie rule.
#[test]
fn top_p_tie_rule_by_hand() {
    use twilight::reference::top_p::top_p_keep;
    // 0.4 < 0.5 <= 0.4 + 0.3: the threshold is 0.3, and both weights of 0.3 are kept.
    assert_eq!(
        top_p_keep(&[0.4, 0.3, 0.3], 0.5).unwrap(),
        (vec![0, 1, 2], 0.3)
    );
    // 0.4 reaches 0.4 alone.
    assert_eq!(top_p_keep(&[0.4, 0.3, 0.3], 0.4).unwrap(), (vec![0], 0.4));
    // Ties above the threshold change nothing: 0.25 + 0.25 + 0.25 >= 0.7.
    assert_eq!(
        top_p_keep(&[0.25, 0.1, 0.25, 0.15, 0.25], 0.7).unwrap(),
        (vec![0, 2, 4], 0.25)
    );
    assert_eq!(
        top_p_keep(&[0.25, 0.1, 0.25, 0.15, 0.25], 0.8).unwrap(),
        (vec![0, 2, 3, 4], 0.15)
    );
}

/// Hand-computed Quest examples: the last page always, ties to the lower position, a budget
/// covering every page selects them all.
#[test]
fn quest_selection_by_hand() {
    assert_eq!(quest_select(&[5.0, -1.0, 2.0], 3), vec![0, 1, 2]);
    assert_eq!(quest_select(&[5.0, -1.0, 2.0], 7), vec![0, 1, 2]);
    assert_eq!(quest_select(&[5.0, -1.0, 2.0], 2), vec![0, 2]);
    assert_eq!(quest_select(&[-1.0, 5.0, 2.0], 1), vec![2]);
    assert_eq!(quest_select(&[4.0, 4.0, 4.0, 4.0, 0.0], 3), vec![0, 1, 4]);
    assert_eq!(quest_budget_pages(33, 16).unwrap(), 3);
    // A tiny cache: one KV head, head_dim 2, pages of 2 tokens, request pages [1, 0].
    let shape = CacheShape {
        num_pages: 2,
        num_kv_heads: 1,
        page_size: 2,
        head_dim: 2,
        layout: KvLayout::Hnd,
    };
    let k = [2.0, -1.0, -3.0, 4.0, 1.0, 1.0, 0.5, -2.0];
    let kv = HostKv {
        shape,
        k: &k,
        v: &k,
    };
    let table = twilight::HostPageTable::new(vec![0, 2], vec![1, 0], vec![2], 2, 2).unwrap();
    let meta = QuestMeta::build(&kv, &table).unwrap();
    // Page 1: max (1, 1), min (0.5, -2); page 0: max (2, 4), min (-3, -1).
    assert_eq!(meta.try_max_row(1, 0).unwrap(), &[1.0, 1.0]);
    assert_eq!(meta.try_min_row(0, 0).unwrap(), &[-3.0, -1.0]);
    // q = (-1, 1): page 1: max(-1, -0.5) + max(1, -2) = 0.5; page 0: max(-2, 3) + max(4, -1) = 7.
    assert_eq!(
        quest_scores(&[-1.0, 1.0], &meta, &table, 0, 0).unwrap(),
        vec![0.5, 7.0]
    );
}

/// Times the reference at benchmark scale: `cargo test --release --test reference_props
/// reference_speed -- --ignored --nocapture`.
#[test]
#[ignore = "a timing report, run in release"]
fn reference_speed() {
    use std::time::Instant;
    let (kv_heads, group, ps, d) = (8, 4, 16, 128);
    let params = GeneratorParams::preset(Preset::Default, 1);
    let t = Instant::now();
    let s = generate::<f16>(&params, &[32768; 8], kv_heads, group, ps, d, KvLayout::Hnd).unwrap();
    println!("{params}\ngenerate: {:.2} s", t.elapsed().as_secs_f64());
    let kv = s.kv();
    let t = Instant::now();
    let meta = QuestMeta::build(&kv, &s.table).unwrap();
    println!("QuestMeta::build: {:.2} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let quant = Quant4Cache::build(&kv, &s.table).unwrap();
    println!("Quant4Cache::build: {:.2} s", t.elapsed().as_secs_f64());
    let inputs = StepInputs {
        q: &s.q,
        num_qo_heads: s.num_qo_heads,
        kv,
        table: &s.table,
        quest: Some(&meta),
        quant: Some(&quant),
        ds: None,
    };
    let c = Case {
        seed: 0,
        lens: vec![],
        num_kv_heads: kv_heads,
        group_size: group,
        page_size: ps,
        head_dim: d,
        layout: KvLayout::Hnd,
        key_scale: 1.0,
        realistic: true,
    };
    for (selector, pruning) in [
        (Selector::Full, Pruning::None),
        (Selector::Quest, Pruning::None),
        (Selector::Quest, Pruning::TopP),
        (Selector::Full, Pruning::TopP),
    ] {
        let t = Instant::now();
        let r = decode_step(
            &spec(&c, selector, pruning),
            &StepParams::new(8192, 0.9, sm_scale(&c)),
            &inputs,
        )
        .unwrap();
        let mean_kept = r.kept_counts.iter().sum::<usize>() as f64 / r.kept_counts.len() as f64;
        println!(
            "{selector:?}/{pruning:?}, B0 8192, p 0.9: {:.2} s, mean kept per (request, kv head) {mean_kept:.0}",
            t.elapsed().as_secs_f64()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Double Sparsity: labels, selection, and the step composed with `none` and `top_p`.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use twilight::reference::attend;
use twilight::reference::double_sparse::{ds_scores, ds_select, DsLabels};

/// A random problem for `double_sparse(r)`: head_dim large enough for r < head_dim, and `r`
/// random channels per KV head.
#[derive(Clone, Debug)]
struct DsCase {
    c: Case,
    r: usize,
    channel_seed: u64,
}

fn ds_case() -> impl Strategy<Value = DsCase> {
    (
        case(),
        prop::sample::select(vec![(32usize, 16usize), (64, 16), (64, 32)]),
        any::<u64>(),
    )
        .prop_map(|(mut c, (head_dim, r), channel_seed)| {
            c.head_dim = head_dim;
            DsCase { c, r, channel_seed }
        })
}

/// `r` distinct channels per KV head, drawn from the seed, sorted ascending.
fn random_channels(seed: u64, num_kv_heads: usize, head_dim: usize, r: usize) -> Vec<Vec<usize>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..num_kv_heads)
        .map(|_| {
            let mut all: Vec<usize> = (0..head_dim).collect();
            all.shuffle(&mut rng);
            let mut chosen = all[..r].to_vec();
            chosen.sort_unstable();
            chosen
        })
        .collect()
}

fn ds_labels(dc: &DsCase, s: &SyntheticStep) -> DsLabels {
    let channels = random_channels(dc.channel_seed, dc.c.num_kv_heads, dc.c.head_dim, dc.r);
    DsLabels::build(&s.kv(), &s.table, channels).unwrap()
}

fn ds_selector(dc: &DsCase) -> Selector {
    Selector::DoubleSparse {
        channels: dc.r as u32,
    }
}

/// Runs a `double_sparse(r)` step with the given pruning on `s`.
fn run_ds(
    dc: &DsCase,
    s: &SyntheticStep,
    labels: &DsLabels,
    pruning: Pruning,
    params: StepParams,
) -> StepResult {
    let kv = s.kv();
    let quant = Quant4Cache::build(&kv, &s.table).unwrap();
    let inputs = StepInputs {
        q: &s.q,
        num_qo_heads: s.num_qo_heads,
        kv,
        table: &s.table,
        quest: None,
        quant: Some(&quant),
        ds: Some(labels),
    };
    // The cases include page sizes (2, 3, 4) and a head_dim (32) no variant has: not validated.
    decode_step(&spec(&dc.c, ds_selector(dc), pruning), &params, &inputs).unwrap()
}

/// The positions (within request `b`) of the given slots, in the slots' order.
fn positions_of(table: &twilight::HostPageTable, b: usize, slots: &[usize]) -> Vec<usize> {
    slots
        .iter()
        .map(|&slot| {
            (0..table.len_of(b))
                .find(|&t| table.try_slot(b, t).unwrap() == slot)
                .expect("a slot of the request")
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// `double_sparse`: `min(len, B0)` tokens, the newest always among them, a budget of at
    /// least the length selects every token, every other selected token scores at least as
    /// high as every token left out (a tie going to the lower position), candidates are the
    /// selected tokens' slots in request order, and `selected_pages` lists are empty.
    #[test]
    fn ds_selection_rules(dc in ds_case(), b0 in 1usize..=80) {
        let c = &dc.c;
        let s = step_of(c);
        let labels = ds_labels(&dc, &s);
        let r = run_ds(&dc, &s, &labels, Pruning::None, StepParams::new(b0, 0.9, sm_scale(c)));
        let d = c.head_dim;
        prop_assert_eq!(r.candidates.len(), s.table.batch() * c.num_kv_heads);
        for b in 0..s.table.batch() {
            let n = s.table.len_of(b);
            for g in 0..c.num_kv_heads {
                let i = b * c.num_kv_heads + g;
                prop_assert!(r.selected_pages[i].is_empty());
                let sel = positions_of(&s.table, b, &r.candidates[i]);
                prop_assert!(sel.windows(2).all(|w| w[0] < w[1]), "not in request order");
                prop_assert_eq!(sel.len(), n.min(b0));
                prop_assert_eq!(*sel.last().unwrap(), n - 1, "the newest token is always in");
                if b0 >= n {
                    prop_assert_eq!(&sel, &(0..n).collect::<Vec<_>>());
                }
                let q_group = &s.q[(b * s.num_qo_heads + g * c.group_size) * d..][..c.group_size * d];
                let scores = ds_scores(q_group, &labels, &s.table, b, g).unwrap();
                for &a in &sel[..sel.len() - 1] {
                    for out in (0..n - 1).filter(|x| sel.binary_search(x).is_err()) {
                        prop_assert!(
                            scores[a] > scores[out] || (scores[a] == scores[out] && a < out),
                            "selected {} ({}) vs left out {} ({})", a, scores[a], out, scores[out]
                        );
                    }
                }
                prop_assert_eq!(&sel, &ds_select(&scores, b0));
                // `none` keeps every candidate.
                let mut sorted = r.candidates[i].clone();
                sorted.sort_unstable();
                prop_assert_eq!(&r.kept[i], &sorted);
                prop_assert_eq!(r.kept_counts[i], n.min(b0));
            }
        }
    }

    /// `double_sparse` + `none` is exact attention over exactly the selected tokens (bit for
    /// bit), and with a budget of at least the longest request it is dense attention.
    #[test]
    fn ds_none_attends_over_exactly_the_selected_tokens(dc in ds_case(), b0 in 1usize..=80) {
        let c = &dc.c;
        let s = step_of(c);
        let labels = ds_labels(&dc, &s);
        let scale = sm_scale(c);
        let r = run_ds(&dc, &s, &labels, Pruning::None, StepParams::new(b0, 0.9, scale));
        let kv = s.kv();
        let d = c.head_dim;
        for b in 0..s.table.batch() {
            for h in 0..s.num_qo_heads {
                let g = h / c.group_size;
                let q = &s.q[(b * s.num_qo_heads + h) * d..][..d];
                let (o, lse) = attend(q, &kv, g, &r.candidates[b * c.num_kv_heads + g], scale as f64).unwrap();
                prop_assert_eq!(&r.o[(b * s.num_qo_heads + h) * d..][..d], &o[..]);
                prop_assert_eq!(r.lse[b * s.num_qo_heads + h], lse);
            }
        }
        let all = run_ds(
            &dc, &s, &labels, Pruning::None,
            StepParams::new(s.table.max_len() + b0 % 3, 0.9, scale),
        );
        let dense = dense_decode(&s.q, s.num_qo_heads, &kv, &s.table, scale).unwrap();
        prop_assert_eq!(&all.o, &dense.o);
        prop_assert_eq!(&all.lse, &dense.lse);
    }

    /// `double_sparse` + `top_p`: each query head's kept weights (over the DS candidates) sum
    /// to at least p, the group keeps the union, and nothing outside the candidates is kept.
    #[test]
    fn ds_top_p_keeps_mass_at_least_p(
        dc in ds_case(),
        b0 in 1usize..=80,
        p in prop::sample::select(vec![0.05f32, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0]),
    ) {
        let c = &dc.c;
        let s = step_of(c);
        let labels = ds_labels(&dc, &s);
        let mut params = StepParams::new(b0, p, sm_scale(c));
        params.record_weights = true;
        let r = run_ds(&dc, &s, &labels, Pruning::TopP, params);
        let none = run_ds(&dc, &s, &labels, Pruning::None, params);
        prop_assert_eq!(&r.candidates, &none.candidates);
        let p = p as f64;
        for (i, cands) in r.candidates.iter().enumerate() {
            let mut union = vec![false; cands.len()];
            for h in 0..c.group_size {
                let head = &r.heads[i * c.group_size + h];
                let w = head.weights.as_ref().unwrap();
                prop_assert_eq!(w.len(), cands.len());
                let kept: Vec<usize> = (0..w.len()).filter(|&j| w[j] >= head.threshold).collect();
                prop_assert_eq!(kept.len(), head.kept_count);
                let mass = desc_sum(kept.iter().map(|&j| w[j]).collect());
                if desc_sum(w.clone()) >= p {
                    prop_assert!(mass >= p, "kept mass {} below p = {}", mass, p);
                } else {
                    prop_assert_eq!(kept.len(), w.len());
                }
                for j in kept {
                    union[j] = true;
                }
            }
            let mut want: Vec<usize> =
                cands.iter().zip(&union).filter(|(_, &u)| u).map(|(&s, _)| s).collect();
            want.sort_unstable();
            prop_assert_eq!(&r.kept[i], &want);
        }
    }

    /// Labelling tokens a few at a time, page by page, gives exactly the batch-built labels;
    /// rows of slots no request holds stay 0.
    #[test]
    fn ds_labels_append_matches_build(dc in ds_case(), chunk_seed in any::<u64>()) {
        let c = &dc.c;
        let s = step_of(c);
        let kv = s.kv();
        let built = ds_labels(&dc, &s);
        let mut labels = DsLabels::zeros(s.shape, built.channels.clone()).unwrap();
        let mut rng = chunk_seed;
        for b in 0..s.table.batch() {
            let mut t = 0;
            let len = s.table.len_of(b);
            while t < len {
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let off = t % c.page_size;
                let n = (1 + (rng >> 60) as usize % 5).min(c.page_size - off).min(len - t);
                let page = s.table.try_slot(b, t).unwrap() / c.page_size;
                labels.append(&kv, page, off, n).unwrap();
                t += n;
            }
        }
        prop_assert_eq!(&labels, &built);
        let valid = valid_tokens_per_page(&s.table, s.shape.num_pages).unwrap();
        for g in 0..c.num_kv_heads {
            for (page, &v) in valid.iter().enumerate() {
                for off in 0..c.page_size {
                    let row = labels.try_label_row(page * c.page_size + off, g).unwrap();
                    if off < v {
                        let k = kv.try_k_row(page * c.page_size + off, g).unwrap();
                        let want: Vec<f32> = built.channels[g].iter().map(|&ch| k[ch]).collect();
                        prop_assert_eq!(row, &want[..]);
                    } else {
                        prop_assert!(row.iter().all(|&x| x == 0.0));
                    }
                }
            }
        }
    }

    /// When q is zero outside each KV head's label channels (the channels cover all of q's
    /// mass), the DS score of every token is exactly the group's q.k, so DS selects exactly
    /// what a top-B0 by exact q.k (newest token forced in) selects.
    #[test]
    fn ds_matches_exact_ranking_when_channels_cover_q(dc in ds_case(), b0 in 1usize..=80) {
        let c = &dc.c;
        let mut s = step_of(c);
        let labels = ds_labels(&dc, &s);
        let d = c.head_dim;
        for b in 0..s.table.batch() {
            for h in 0..s.num_qo_heads {
                let channels = &labels.channels[h / c.group_size];
                for (ch, x) in s.q[(b * s.num_qo_heads + h) * d..][..d].iter_mut().enumerate() {
                    if channels.binary_search(&ch).is_err() {
                        *x = 0.0;
                    }
                }
            }
        }
        let r = run_ds(&dc, &s, &labels, Pruning::None, StepParams::new(b0, 0.9, sm_scale(c)));
        let kv = s.kv();
        for b in 0..s.table.batch() {
            let n = s.table.len_of(b);
            for g in 0..c.num_kv_heads {
                let q_group = &s.q[(b * s.num_qo_heads + g * c.group_size) * d..][..c.group_size * d];
                let exact: Vec<f64> = (0..n)
                    .map(|t| {
                        let k = kv.try_k_row(s.table.try_slot(b, t).unwrap(), g).unwrap();
                        q_group
                            .chunks_exact(d)
                            .map(|qh| qh.iter().zip(k).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>())
                            .sum()
                    })
                    .collect();
                prop_assert_eq!(&ds_scores(q_group, &labels, &s.table, b, g).unwrap(), &exact);
                let want: Vec<usize> =
                    ds_select(&exact, b0).iter().map(|&t| s.table.try_slot(b, t).unwrap()).collect();
                prop_assert_eq!(&r.candidates[b * c.num_kv_heads + g], &want);
            }
        }
    }
}

/// The step refuses double-sparse inputs that do not fit the variant or the cache.
#[test]
fn ds_step_refuses_bad_labels() {
    let dc = DsCase {
        c: Case {
            seed: 3,
            lens: vec![20, 7],
            num_kv_heads: 2,
            group_size: 2,
            page_size: 4,
            head_dim: 32,
            layout: KvLayout::Hnd,
            key_scale: 1.0,
            realistic: false,
        },
        r: 16,
        channel_seed: 5,
    };
    let s = step_of(&dc.c);
    let kv = s.kv();
    let good = ds_labels(&dc, &s);
    let step = |labels: Option<&DsLabels>, r: u32| {
        let inputs = StepInputs {
            q: &s.q,
            num_qo_heads: s.num_qo_heads,
            kv,
            table: &s.table,
            quest: None,
            quant: None,
            ds: labels,
        };
        decode_step(
            &spec(&dc.c, Selector::DoubleSparse { channels: r }, Pruning::None),
            &StepParams::new(8, 0.9, 1.0),
            &inputs,
        )
    };
    assert!(step(Some(&good), 16).is_ok());
    let mut unsorted = good.clone();
    unsorted.channels[1].swap(0, 1);
    let mut dup = good.clone();
    dup.channels[0][1] = dup.channels[0][0];
    let mut too_few_heads = good.clone();
    too_few_heads.channels.pop();
    let mut out_of_range = good.clone();
    *out_of_range.channels[1].last_mut().unwrap() = 32;
    let mut short = good.clone();
    short.labels.pop();
    let mut other_shape = good.clone();
    other_shape.shape.layout = KvLayout::Nhd;
    let cases: Vec<(Option<&DsLabels>, u32, &str)> = vec![
        (None, 16, "no DsLabels"),
        (Some(&good), 32, "r = 16"),
        (Some(&unsorted), 16, "not sorted"),
        (Some(&dup), 16, "appears twice"),
        (Some(&too_few_heads), 16, "1 channel lists for 2 KV heads"),
        (Some(&out_of_range), 16, "channel 32 is outside 0..32"),
        (Some(&short), 16, "double-sparse labels"),
        (Some(&other_shape), 16, "label geometry"),
    ];
    for (labels, r, needle) in cases {
        let err = step(labels, r).unwrap_err().to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
}

/// A hand-checked double-sparse step: one request, one KV head with two query heads,
/// head_dim 64, channels 0..16, pages of one token in shuffled order; B0 = 3 of 6 tokens.
#[test]
fn ds_step_by_hand() {
    let shape = CacheShape {
        num_pages: 6,
        num_kv_heads: 1,
        page_size: 1,
        head_dim: 64,
        layout: KvLayout::Nhd,
    };
    // Token t of the request has k[0] = key0[t] and v[0] = t; its other channels are 0.
    let key0 = [1.0f32, 4.0, -2.0, 3.0, 0.5, -1.0];
    let table =
        twilight::HostPageTable::new(vec![0, 6], vec![5, 2, 0, 1, 4, 3], vec![1], 1, 6).unwrap();
    let mut k = vec![0f32; shape.elements()];
    let mut v = vec![0f32; shape.elements()];
    for (t, &x) in key0.iter().enumerate() {
        let at = shape.try_offset(table.try_slot(0, t).unwrap(), 0).unwrap();
        k[at] = x;
        v[at] = t as f32;
    }
    let kv = HostKv {
        shape,
        k: &k,
        v: &v,
    };
    let labels = DsLabels::build(&kv, &table, vec![(0..16).collect()]).unwrap();
    // Query heads (1, 0, ...) and (0.5, 0, ...): DS score = 1.5 * key0[t].
    let mut q = vec![0f32; 128];
    q[0] = 1.0;
    q[64] = 0.5;
    let spec = VariantSpec {
        page_size: 1,
        head_dim: 64,
        dtype: Dtype::F16,
        group_size: 2,
        kv_layout: KvLayout::Nhd,
        selector: Selector::DoubleSparse { channels: 16 },
        pruning: Pruning::None,
    };
    spec.validate().unwrap();
    let inputs = StepInputs {
        q: &q,
        num_qo_heads: 2,
        kv,
        table: &table,
        quest: None,
        quant: None,
        ds: Some(&labels),
    };
    let r = decode_step(&spec, &StepParams::new(3, 1.0, 1.0), &inputs).unwrap();
    // Newest (t = 5) plus the best two others: t = 1 (4.0) and t = 3 (3.0).
    let want: Vec<usize> = [1, 3, 5]
        .iter()
        .map(|&t| table.try_slot(0, t).unwrap())
        .collect();
    assert_eq!(r.candidates, vec![want.clone()]);
    assert_eq!(r.selected_pages, vec![Vec::<usize>::new()]);
    let mut sorted = want.clone();
    sorted.sort_unstable();
    assert_eq!(r.kept, vec![sorted]);
    assert_eq!(r.kept_counts, vec![3]);
    // Head 0 attends with logits (4, 3, -1) over values (1, 3, 5) in channel 0.
    let w: Vec<f64> = [4.0f64, 3.0, -1.0].iter().map(|x| x.exp()).collect();
    let sum: f64 = w.iter().sum();
    let o0 = (w[0] * 1.0 + w[1] * 3.0 + w[2] * 5.0) / sum;
    assert!((r.o[0] as f64 - o0).abs() < 1e-6, "{} vs {o0}", r.o[0]);
    assert!((r.lse[0] as f64 - sum.ln()).abs() < 1e-6);
}

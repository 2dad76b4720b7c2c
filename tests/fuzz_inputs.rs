//! Generated inputs for every parser and validator an engine or a user reaches: variant names,
//! key=value lists, channel configs (the Double Sparsity tooling's JSON), page tables, the
//! page allocator's appends, the CPU reference's entry points and its per-row helpers, and the
//! calibration sample. Each property says what must hold for any input: an answer or an error,
//! never a panic, and an error never echoes a control character. Thousands of cases run in CI
//! (a few hundred per property).

use half::f16;
use proptest::prelude::*;
use twilight::calibration::{CalibrationMode, ChannelConfig, DecodeSample};
use twilight::reference::double_sparse::{ds_scores, ds_token_score};
use twilight::reference::quant::{dequantize_row, packed_code, quantize_row};
use twilight::reference::quest::{
    quest_budget_pages, quest_page_score, quest_scores, valid_tokens_per_page,
};
use twilight::reference::top_p::{estimated_logits, group_union, top_p_head};
use twilight::reference::{
    attend, decode_step, dense_decode, DsLabels, HostKv, Quant4Cache, QuestMeta, StepInputs,
    StepParams,
};
use twilight::{CacheShape, Dtype, HostPageTable, KvLayout, Pruning, Selector, VariantSpec};

const NAME: &str = "ps16_hd128_f16_g4_hnd_quest_topp";
const PIECES: &[&str] = &[
    "ps",
    "hd",
    "g",
    "ds",
    "_",
    "=",
    ",",
    " ",
    "(",
    ")",
    "page_size",
    "head_dim",
    "dtype",
    "group_size",
    "kv_layout",
    "selector",
    "pruning",
    "double_sparse",
    "top_p",
    "topp",
    "none",
    "full",
    "quest",
    "f16",
    "bf16",
    "hnd",
    "nhd",
    "0",
    "1",
    "16",
    "016",
    "+16",
    "-1",
    "4294967296",
    "\u{1b}[31m",
    "\r",
    "\n",
    "\u{7}",
    "é",
    "\0",
];

/// Text built from the grammar's own pieces, so that many cases get far into the parser.
fn pieces() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(PIECES), 0..16).prop_map(|p| p.concat())
}

/// A canonical name with one piece changed.
fn mutated_name() -> impl Strategy<Value = String> {
    (0..NAME.len(), prop::sample::select(PIECES), 0..4usize).prop_map(|(at, piece, cut)| {
        let at = (0..=at)
            .rev()
            .find(|&i| NAME.is_char_boundary(i))
            .unwrap_or(0);
        let end = (at + cut).min(NAME.len());
        format!("{}{piece}{}", &NAME[..at], &NAME[end..])
    })
}

fn check_spec_text(text: &str) -> Result<(), TestCaseError> {
    match text.parse::<VariantSpec>() {
        Ok(spec) => {
            // Whatever is accepted is a valid spec whose name parses back to it.
            prop_assert!(spec.validate().is_ok());
            prop_assert_eq!(spec.name().parse::<VariantSpec>().ok(), Some(spec));
            // A name is accepted only in its canonical spelling.
            if !text.contains('=') {
                prop_assert_eq!(spec.name(), text.trim());
            }
        }
        Err(e) => {
            let msg = e.to_string();
            prop_assert!(!msg.chars().any(char::is_control), "{:?}", msg);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn variant_text_of_any_kind_parses_or_is_refused(text in any::<String>()) {
        check_spec_text(&text)?;
    }

    #[test]
    fn variant_text_from_grammar_pieces(text in pieces()) {
        check_spec_text(&text)?;
    }

    #[test]
    fn variant_names_with_one_piece_changed(text in mutated_name()) {
        check_spec_text(&text)?;
    }
}

fn config_strategy() -> impl Strategy<Value = String> {
    let id = prop_oneof![
        (0u64..160).prop_map(|n| n.to_string()),
        Just("-1".to_string()),
        Just("1.5".to_string()),
        Just("18446744073709551616".to_string()),
        Just("\"3\"".to_string()),
        Just("null".to_string()),
    ];
    let list = prop::collection::vec(id, 0..6).prop_map(|ids| format!("[{}]", ids.join(", ")));
    let heads = prop::collection::vec(list, 0..5).prop_map(|l| format!("[{}]", l.join(", ")));
    let key = prop_oneof![
        (0usize..4).prop_map(|l| format!("model.layers.{l}.self_attn.qk_proj")),
        (0usize..4).prop_map(|l| format!("model.layers.{l}.self_attn.q_proj")),
        Just("model.layers.x.self_attn.qk_proj".to_string()),
        Just("model.layers.99999999999999999999.self_attn.qk_proj".to_string()),
        Just("other".to_string()),
    ];
    let value = prop_oneof![heads, Just("{}".to_string()), Just("3".to_string())];
    prop_oneof![
        prop::collection::vec((key, value), 0..5).prop_map(|pairs| {
            let body: Vec<String> = pairs.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
            format!("{{{}}}", body.join(", "))
        }),
        any::<String>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, failure_persistence: None, ..ProptestConfig::default() })]

    /// Any text, any geometry: a config, or an error; and a config that loads gives each KV
    /// head `r` ascending ids below head_dim.
    #[test]
    fn channel_configs_load_or_are_refused(
        text in config_strategy(),
        layers in 0usize..3,
        heads in prop_oneof![1usize..5, Just(usize::MAX)],
        head_dim in prop_oneof![Just(0usize), 1usize..200, Just(usize::MAX)],
        r in prop_oneof![0usize..6, Just(usize::MAX)],
        kv_heads in 0usize..5,
    ) {
        if let Ok(config) = ChannelConfig::from_json(&text, CalibrationMode::Qk, layers, heads, head_dim, r) {
            for layer in 0..layers {
                if let Ok(lists) = config.kv_head_channels(layer, kv_heads) {
                    prop_assert_eq!(lists.len(), kv_heads);
                    for list in lists {
                        prop_assert_eq!(list.len(), r);
                        prop_assert!(list.windows(2).all(|w| w[0] < w[1]));
                        prop_assert!(list.iter().all(|&c| c < head_dim));
                    }
                }
            }
        }
    }

    /// Public fields hold anything: the reduction to KV heads never indexes by an id.
    #[test]
    fn channel_votes_never_index_by_id(
        lists in prop::collection::vec(prop::collection::vec(any::<usize>(), 0..4), 0..8),
        r in 0usize..5,
        kv_heads in 0usize..4,
    ) {
        let config = ChannelConfig {
            mode: CalibrationMode::Qk,
            r,
            layers: [(0usize, lists)].into_iter().collect(),
        };
        let _ = config.kv_head_channels(0, kv_heads);
    }
}

fn small_i32() -> impl Strategy<Value = i32> {
    prop_oneof![-2i32..12, Just(i32::MAX), Just(i32::MIN)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random vectors: a table, or an error; every table that exists answers every accessor
    /// without panicking, and its slots are inside the pool.
    #[test]
    fn page_tables_from_random_vectors(
        indptr in prop::collection::vec(small_i32(), 0..6),
        indices in prop::collection::vec(small_i32(), 0..10),
        last in prop::collection::vec(small_i32(), 0..5),
        page_size in prop_oneof![0usize..5, Just(usize::MAX), Just(1usize << 40)],
        num_pages in 0usize..12,
    ) {
        if let Ok(table) = HostPageTable::new(indptr, indices, last, page_size, num_pages) {
            let total: usize = (0..table.batch()).map(|b| table.len_of(b)).sum();
            prop_assert_eq!(table.valid_slots().count(), total);
            for slot in table.valid_slots() {
                prop_assert!(slot < num_pages * page_size);
            }
            prop_assert_eq!(table.len_of(table.batch()), 0);
            prop_assert_eq!(table.try_slot(table.batch(), 0), None);
            prop_assert!(table.max_len() <= twilight::host::MAX_REQUEST_TOKENS);
        }
    }

    #[test]
    fn page_tables_from_requests(
        requests in prop::collection::vec(
            (prop::collection::vec(small_i32(), 0..5), prop_oneof![0usize..40, Just(usize::MAX)]),
            0..4,
        ),
        page_size in prop_oneof![0usize..9, Just(usize::MAX)],
        num_pages in 0usize..12,
    ) {
        let rows: Vec<(&[i32], usize)> =
            requests.iter().map(|(p, l)| (p.as_slice(), *l)).collect();
        if let Ok(table) = HostPageTable::from_requests(&rows, page_size, num_pages) {
            for (b, (_, len)) in rows.iter().enumerate() {
                prop_assert_eq!(table.len_of(b), *len);
            }
        }
    }

    /// The reference's entry points take any cache and table: an answer, or an error.
    #[test]
    fn reference_entry_points_check_their_inputs(
        pages in 0usize..4,
        page_size in 0usize..3,
        heads in 0usize..3,
        head_dim in prop_oneof![0usize..3, Just(usize::MAX)],
        k_len in 0usize..40,
        q_len in 0usize..8,
        qo in 0usize..4,
        table_pages in prop::collection::vec(0i32..6, 1..4),
        len in 1usize..6,
    ) {
        let shape = CacheShape { num_pages: pages, num_kv_heads: heads, page_size, head_dim, layout: KvLayout::Hnd };
        let data = vec![0.5f32; k_len];
        let kv = HostKv { shape, k: &data, v: &data };
        if let Ok(table) = HostPageTable::from_requests(&[(&table_pages, len)], page_size.max(1), 6) {
            let q = vec![1.0f32; q_len];
            let _ = dense_decode(&q, qo, &kv, &table, 1.0);
            let _ = QuestMeta::build(&kv, &table);
            let _ = Quant4Cache::build(&kv, &table);
        }
    }
}

/// A size: mostly small (0 included), sometimes one whose products overflow or whose
/// allocation no allocator grants.
fn size() -> impl Strategy<Value = usize> {
    prop_oneof![8 => 0usize..4, 1 => Just(usize::MAX), 1 => Just(1usize << 62)]
}

/// An index: mostly near the small sizes above, sometimes far past them.
fn index() -> impl Strategy<Value = usize> {
    prop_oneof![8 => 0usize..6, 1 => Just(usize::MAX), 1 => Just(usize::MAX / 2 + 1)]
}

fn values(max: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(
        prop_oneof![-4.0f32..4.0, Just(f32::NAN), Just(f32::INFINITY)],
        0..max,
    )
}

/// A cache whose data may or may not fill its shape, and a table that may or may not fit it.
#[derive(Clone, Debug)]
struct Pool {
    shape: CacheShape,
    k: Vec<f32>,
    v: Vec<f32>,
    table: Option<HostPageTable>,
}

impl Pool {
    fn kv(&self) -> HostKv<'_> {
        HostKv {
            shape: self.shape,
            k: &self.k,
            v: &self.v,
        }
    }
}

fn pool() -> impl Strategy<Value = Pool> {
    let layout = prop_oneof![Just(KvLayout::Hnd), Just(KvLayout::Nhd)];
    (
        (size(), size(), size(), size(), layout),
        any::<bool>(),
        values(40),
        prop::collection::vec(0i32..5, 1..4),
        1usize..7,
    )
        .prop_map(
            |((pages, heads, ps, d, layout), fill, data, table_pages, len)| {
                let shape = CacheShape {
                    num_pages: pages,
                    num_kv_heads: heads,
                    page_size: ps,
                    head_dim: d,
                    layout,
                };
                // Half the cases fill the shape exactly (when it is small), so that the checks
                // pass and the indices are what is tried.
                let k = match shape.checked_elements() {
                    Some(n) if fill && n <= 64 => (0..n)
                        .map(|i| data.get(i).copied().unwrap_or(0.5))
                        .collect(),
                    _ => data,
                };
                let table = HostPageTable::from_requests(
                    &[(&table_pages, len)],
                    ps.clamp(1, 8),
                    pages.min(8),
                )
                .ok();
                Pool {
                    shape,
                    v: k.clone(),
                    k,
                    table,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    /// Rows of K and V, their addresses, and attention over any slots: an answer or an error.
    #[test]
    fn cache_rows_and_attention_check_their_indices(
        p in pool(),
        slot in index(),
        kv_head in index(),
        q in values(6),
        slots in prop::collection::vec(index(), 0..4),
        b in index(),
    ) {
        let kv = p.kv();
        let _ = p.shape.elements();
        if let Ok(at) = p.shape.try_offset(slot, kv_head) {
            prop_assert!(at < p.shape.elements());
            prop_assert_eq!(p.shape.try_row(slot, kv_head).ok(), Some(at / p.shape.head_dim));
        }
        if let Ok(row) = kv.try_k_row(slot, kv_head) {
            prop_assert_eq!(row.len(), p.shape.head_dim);
            prop_assert_eq!(kv.try_v_row(slot, kv_head).map(<[f32]>::len).ok(), Some(row.len()));
        }
        if let Ok((o, _)) = attend(&q, &kv, kv_head, &slots, 0.5) {
            prop_assert_eq!(o.len(), p.shape.head_dim);
        }
        if let Some(table) = &p.table {
            prop_assert_eq!(table.slots_of(b).count(), table.len_of(b));
            let _ = valid_tokens_per_page(table, p.shape.num_pages);
            let _ = dense_decode(&q, kv_head, &kv, table, 1.0);
        }
    }

    /// Quest metadata of any geometry, built or written by hand, and any page, head, piece of a
    /// page and query group.
    #[test]
    fn quest_rows_scores_and_appends_check_their_indices(
        p in pool(),
        hand in any::<bool>(),
        lens in (0usize..40, 0usize..40),
        page in index(),
        kv_head in index(),
        first in index(),
        count in index(),
        q in values(8),
        b in index(),
        b0 in index(),
    ) {
        let kv = p.kv();
        let built = p.table.as_ref().and_then(|t| QuestMeta::build(&kv, t).ok());
        let mut meta = match (built, hand) {
            (Some(meta), false) => meta,
            _ => match QuestMeta::zeros(p.shape.num_pages, p.shape.num_kv_heads, p.shape.head_dim) {
                Ok(mut meta) => {
                    // Fields are public: lengths that disagree with the geometry.
                    meta.page_max.resize(lens.0, 0.0);
                    meta.page_min.truncate(lens.1);
                    meta
                }
                Err(_) => QuestMeta {
                    num_pages: p.shape.num_pages,
                    num_kv_heads: p.shape.num_kv_heads,
                    head_dim: p.shape.head_dim,
                    page_max: vec![0.0; lens.0],
                    page_min: vec![0.0; lens.1],
                },
            },
        };
        if let Ok(row) = meta.try_max_row(page, kv_head) {
            prop_assert_eq!(row.len(), meta.head_dim);
        }
        let _ = meta.try_min_row(page, kv_head);
        let _ = meta.try_offset(page, kv_head);
        let _ = quest_page_score(&q, &meta, page, kv_head);
        if let Some(table) = &p.table {
            if let Ok(scores) = quest_scores(&q, &meta, table, b, kv_head) {
                prop_assert_eq!(scores.len(), table.pages_of(b).len());
            }
        }
        let _ = quest_budget_pages(b0, p.shape.page_size);
        let _ = meta.append(&kv, page, first, count);
    }

    /// 4-bit rows: quantizing, reading and dequantizing any row of any cache, packed rows of
    /// any length, and top-p over any candidates.
    #[test]
    fn four_bit_rows_check_their_indices(
        p in pool(),
        hand in (any::<bool>(), 0usize..40, 0usize..40),
        slot in index(),
        kv_head in index(),
        first in index(),
        count in index(),
        out_len in 0usize..8,
        row in values(9),
        packed_len in 0usize..6,
        c in index(),
        q in values(6),
        candidates in prop::collection::vec(index(), 0..4),
        kept in prop::collection::vec(prop::collection::vec(index(), 0..3), 0..3),
        n in index(),
    ) {
        let kv = p.kv();
        let built = p.table.as_ref().and_then(|t| Quant4Cache::build(&kv, t).ok());
        let mut quant = match (built, hand.0) {
            (Some(quant), false) => quant,
            _ => Quant4Cache {
                shape: p.shape,
                codes: vec![0x5a; hand.1],
                scale_min: vec![f16::ONE; hand.2],
            },
        };
        if let Ok(codes) = quant.try_codes_row(slot, kv_head) {
            prop_assert_eq!(codes.len() * 2, quant.shape.head_dim);
        }
        let _ = quant.try_scale_min_row(slot, kv_head);
        let mut out = vec![0f32; out_len];
        let _ = quant.dequantize(slot, kv_head, &mut out);
        let _ = estimated_logits(&q, &quant, kv_head, &candidates, 1.0);
        let _ = top_p_head(&q, &quant, kv_head, &candidates, 1.0, 0.9);
        let _ = quant.update(&kv, slot, kv_head);
        let _ = quant.append(&kv, slot, first, count);
        let mut packed = vec![0u8; packed_len];
        if let Ok(sm) = quantize_row(&row, &mut packed) {
            let mut back = vec![0f32; row.len()];
            prop_assert!(dequantize_row(&packed, sm, &mut back).is_ok());
        }
        let _ = dequantize_row(&packed, [f16::ONE, f16::ZERO], &mut out);
        prop_assert_eq!(packed_code(&packed, c).is_ok(), c / 2 < packed.len());
        let heads: Vec<&[usize]> = kept.iter().map(Vec::as_slice).collect();
        if let Ok(union) = group_union(heads, n) {
            prop_assert!(union.windows(2).all(|w| w[0] < w[1]) && union.iter().all(|&i| i < n));
        }
    }

    /// Double-sparse labels of any geometry and channel lists, any row, piece of a page and
    /// query group.
    #[test]
    fn label_rows_and_scores_check_their_indices(
        p in pool(),
        channels in prop::collection::vec(prop::collection::vec(index(), 0..3), 0..3),
        labels_len in 0usize..40,
        slot in index(),
        kv_head in index(),
        first in index(),
        count in index(),
        q in values(8),
        b in index(),
    ) {
        let kv = p.kv();
        let r = channels.first().map_or(0, Vec::len);
        let mut labels = match DsLabels::zeros(p.shape, channels.clone()) {
            Ok(labels) if labels_len % 2 == 0 => labels,
            _ => DsLabels { shape: p.shape, r, channels, labels: vec![0.0; labels_len] },
        };
        if let Ok(row) = labels.try_label_row(slot, kv_head) {
            prop_assert_eq!(row.len(), labels.r);
        }
        let _ = labels.try_row(slot, kv_head);
        let _ = ds_token_score(&q, &labels, slot, kv_head);
        if let Some(table) = &p.table {
            if let Ok(scores) = ds_scores(&q, &labels, table, b, kv_head) {
                prop_assert_eq!(scores.len(), table.len_of(b));
            }
        }
        let _ = labels.update(&kv, slot, kv_head);
        let _ = labels.append(&kv, slot, first, count);
    }

    /// A decode step whose Quest, 4-bit and label structures were edited by hand after they
    /// were built: the step refuses them instead of indexing past their ends.
    #[test]
    fn decode_step_checks_hand_edited_structures(
        cut in (0usize..3, 0usize..40),
        selector in 0usize..3,
        pruning in any::<bool>(),
    ) {
        let shape = CacheShape { num_pages: 3, num_kv_heads: 1, page_size: 2, head_dim: 4, layout: KvLayout::Hnd };
        let k: Vec<f32> = (0..shape.elements()).map(|i| (i % 5) as f32 - 2.0).collect();
        let kv = HostKv { shape, k: &k, v: &k };
        let table = HostPageTable::new(vec![0, 3], vec![2, 0, 1], vec![1], 2, 3).unwrap();
        let mut quest = QuestMeta::build(&kv, &table).unwrap();
        let mut quant = Quant4Cache::build(&kv, &table).unwrap();
        let mut ds = DsLabels::build(&kv, &table, vec![vec![0, 3]]).unwrap();
        match cut.0 {
            0 => quest.page_max.truncate(cut.1),
            1 => quant.codes.truncate(cut.1),
            _ => ds.labels.truncate(cut.1),
        }
        let spec = VariantSpec {
            page_size: 2,
            head_dim: 4,
            dtype: Dtype::F16,
            group_size: 1,
            kv_layout: KvLayout::Hnd,
            selector: [Selector::Full, Selector::Quest, Selector::DoubleSparse { channels: 2 }][selector],
            pruning: if pruning { Pruning::TopP } else { Pruning::None },
        };
        let q = [1.0f32, -1.0, 0.5, 2.0];
        let x = StepInputs { q: &q, num_qo_heads: 1, kv, table: &table, quest: Some(&quest), quant: Some(&quant), ds: Some(&ds) };
        let _ = decode_step(&spec, &StepParams::new(2, 0.9, 0.5), &x);
    }

    /// The calibration sample: any geometry, request and range.
    #[test]
    fn decode_samples_check_their_ranges(
        dims in (size(), size(), size(), 0usize..5),
        q in values(8),
        key_len in 0usize..6,
        len in prop_oneof![0usize..9, Just(usize::MAX)],
        range in (index(), index()),
    ) {
        let (qo, kvh, d, per_request) = dims;
        let mut sample = DecodeSample::new(qo, kvh, d, per_request);
        let _ = sample.positions(len).take(16).count();
        let key = |_| std::borrow::Cow::Owned(vec![1.0f32; key_len]);
        // At most `per_request` keys are read, whatever `len` says.
        let _ = sample.add_request(&q, len, key);
        let tokens = sample.tokens();
        prop_assert!(tokens <= per_request.max(1));
        let view = sample.view(range.0..range.1);
        prop_assert_eq!(view.is_ok(), range.0 <= range.1 && range.1 <= tokens);
        let _ = sample.all();
    }
}

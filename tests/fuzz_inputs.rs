//! Generated inputs for every parser and validator an engine or a user reaches: variant names,
//! key=value lists, channel configs (the Double Sparsity tooling's JSON), page tables, the
//! page allocator's appends and the CPU reference's entry points. Each property says what must
//! hold for any input: an answer or an error, never a panic, and an error never echoes a
//! control character. Thousands of cases run in CI (a few hundred per property).

use proptest::prelude::*;
use twilight::calibration::{CalibrationMode, ChannelConfig};
use twilight::reference::{dense_decode, HostKv, Quant4Cache, QuestMeta};
use twilight::{CacheShape, HostPageTable, KvLayout, VariantSpec};

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

//! Variants declared with `#[twilight_kernel(...)]`: their constants, their names and their
//! registration in `twilight::declared_variants()`.

use std::collections::HashSet;

use twilight::{
    declared_variants, twilight_kernel, Dtype, KvLayout, Pruning, Selector, Variant, VariantSpec,
};

/// The example of DESIGN.md.
#[twilight_kernel(page_size = 16, head_dim = 128, dtype = f16, group_size = 4, kv_layout = hnd, selector = quest, pruning = top_p)]
pub struct Llama3Decode;

/// Default layout, Double Sparsity, no pruning.
#[twilight_kernel(page_size = 32, head_dim = 128, dtype = bf16, group_size = 1, selector = double_sparse(16), pruning = none)]
#[derive(Debug, Clone, Copy)]
pub struct DsMha;

mod baselines {
    use twilight::twilight_kernel;

    /// Dense decode attention in candle's layout.
    #[twilight_kernel(page_size = 1, head_dim = 64, dtype = f16, group_size = 8, kv_layout = nhd, selector = full, pruning = none)]
    pub(crate) struct DenseNhd;

    /// The same spec as `crate::Llama3Decode` under another name.
    #[twilight_kernel(group_size = 4, pruning = top_p, selector = quest, dtype = f16, head_dim = 128, page_size = 16)]
    pub struct SameAsLlama;
}

fn spec(
    page_size: u32,
    head_dim: u32,
    dtype: Dtype,
    group_size: u32,
    kv_layout: KvLayout,
    selector: Selector,
    pruning: Pruning,
) -> VariantSpec {
    VariantSpec {
        page_size,
        head_dim,
        dtype,
        group_size,
        kv_layout,
        selector,
        pruning,
    }
}

#[test]
fn spec_holds_the_declared_values() {
    assert_eq!(
        <Llama3Decode as Variant>::SPEC,
        spec(
            16,
            128,
            Dtype::F16,
            4,
            KvLayout::Hnd,
            Selector::Quest,
            Pruning::TopP
        )
    );
    assert_eq!(
        DsMha::SPEC,
        spec(
            32,
            128,
            Dtype::Bf16,
            1,
            KvLayout::Hnd,
            Selector::DoubleSparse { channels: 16 },
            Pruning::None
        )
    );
    assert_eq!(
        baselines::DenseNhd::SPEC,
        VariantSpec::dense(1, 64, Dtype::F16, 8, KvLayout::Nhd)
    );
    assert_eq!(baselines::SameAsLlama::SPEC, Llama3Decode::SPEC);
    // Every emitted spec is one the run-time rules accept.
    for spec in [
        Llama3Decode::SPEC,
        DsMha::SPEC,
        baselines::DenseNhd::SPEC,
        baselines::SameAsLlama::SPEC,
    ] {
        assert_eq!(spec.validate(), Ok(()));
    }
}

#[test]
fn name_is_the_canonical_name_of_the_spec() {
    assert_eq!(Llama3Decode::NAME, "ps16_hd128_f16_g4_hnd_quest_topp");
    assert_eq!(DsMha::NAME, "ps32_hd128_bf16_g1_hnd_ds16_none");
    assert_eq!(baselines::DenseNhd::NAME, "ps1_hd64_f16_g8_nhd_full_none");
    for (name, spec) in [
        (Llama3Decode::NAME, Llama3Decode::SPEC),
        (DsMha::NAME, DsMha::SPEC),
        (baselines::DenseNhd::NAME, baselines::DenseNhd::SPEC),
        (baselines::SameAsLlama::NAME, baselines::SameAsLlama::SPEC),
    ] {
        assert_eq!(name, spec.name());
        assert_eq!(VariantSpec::from_name(name), Ok(spec));
    }
}

#[test]
fn the_struct_is_kept_as_written() {
    // Attributes next to the macro still apply, and the struct is still a unit struct.
    let ds = DsMha;
    let copy = ds;
    assert_eq!(format!("{copy:?}"), "DsMha");
}

#[test]
fn declared_variants_lists_every_declaration() {
    let declared = declared_variants();
    let find = |path: &str| declared.iter().find(|d| d.rust_path == path);

    let llama = find("macro_declare::Llama3Decode")
        .or_else(|| find("macro_declare::baselines::SameAsLlama"))
        .expect("Llama3Decode (or its twin) is registered");
    assert_eq!(llama.spec, Llama3Decode::SPEC);
    assert_eq!(find("macro_declare::DsMha").unwrap().spec, DsMha::SPEC);
    assert_eq!(
        find("macro_declare::baselines::DenseNhd").unwrap().spec,
        baselines::DenseNhd::SPEC
    );
    // A variant declared inside a function body registers too.
    #[twilight_kernel(page_size = 8, head_dim = 256, dtype = bf16, group_size = 2, kv_layout = nhd, selector = double_sparse(64), pruning = top_p)]
    struct InFunction;
    assert_eq!(
        find("macro_declare::InFunction").unwrap().spec,
        InFunction::SPEC
    );
    // Two declarations of one spec are one entry.
    assert_eq!(
        declared
            .iter()
            .filter(|d| d.spec == Llama3Decode::SPEC)
            .count(),
        1
    );
}

#[test]
fn every_declared_variant_has_a_unique_name() {
    let declared = declared_variants();
    assert!(declared.len() >= 4, "{declared:?}");
    let mut names = HashSet::new();
    for d in &declared {
        assert!(
            names.insert(d.spec.name()),
            "two entries named {}",
            d.spec.name()
        );
    }
    // Distinct specs have distinct names, and the name reads back to the spec.
    let specs: HashSet<VariantSpec> = declared.iter().map(|d| d.spec).collect();
    assert_eq!(specs.len(), names.len());
    for d in &declared {
        assert_eq!(VariantSpec::from_name(&d.spec.name()), Ok(d.spec));
    }
    // Every registration of this test binary, duplicates included, is a struct of this crate.
    for node in twilight::inventory::iter::<twilight::DeclaredVariant>() {
        assert!(
            node.rust_path.starts_with("macro_declare::"),
            "{}",
            node.rust_path
        );
    }
}

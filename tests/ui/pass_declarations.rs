//! Valid declarations in every position a unit struct can take.
use twilight::{twilight_kernel, Variant};

/// Doc comments and other attributes are kept.
#[derive(Clone, Copy, Debug, Default)]
#[twilight_kernel(page_size = 16, head_dim = 128, dtype = f16, group_size = 4, kv_layout = hnd, selector = quest, pruning = top_p)]
pub struct Llama3Decode;

// Keys in any order, trailing comma, default layout.
#[twilight_kernel(
    pruning = none,
    selector = double_sparse(32),
    group_size = 1,
    dtype = bf16,
    head_dim = 64,
    page_size = 1,
)]
pub(crate) struct DsMha;

mod engine {
    #[twilight::twilight_kernel(page_size = 64, head_dim = 256, dtype = bf16, group_size = 8, kv_layout = nhd, selector = full, pruning = none)]
    pub struct Dense;
}

fn main() {
    #[twilight_kernel(page_size = 8, head_dim = 128, dtype = f16, group_size = 2, selector = double_sparse(64), pruning = top_p)]
    struct Local;

    assert_eq!(Llama3Decode::NAME, "ps16_hd128_f16_g4_hnd_quest_topp");
    assert_eq!(DsMha::NAME, "ps1_hd64_bf16_g1_hnd_ds32_none");
    assert_eq!(
        <engine::Dense as Variant>::NAME,
        "ps64_hd256_bf16_g8_nhd_full_none"
    );
    assert_eq!(Local::NAME, "ps8_hd128_f16_g2_hnd_ds64_topp");
    const SPEC: twilight::VariantSpec = <Llama3Decode as Variant>::SPEC;
    assert_eq!(SPEC.page_size, 16);
    let _ = format!("{:?}", Llama3Decode);
}

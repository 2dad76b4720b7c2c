//! The variants whose rendered glue is snapshotted and compiled in tests. Weighted to the sparse
//! variants: every selector x pruning x dtype at least once; together they also cover every
//! page size, head_dim, group size and layout.

use twilight_jit::{Dtype, KvLayout, Pruning, Selector, VariantSpec};

fn variant(
    (page_size, head_dim, dtype, group_size, kv_layout): (u32, u32, Dtype, u32, KvLayout),
    selector: Selector,
    pruning: Pruning,
) -> VariantSpec {
    VariantSpec {
        selector,
        pruning,
        ..VariantSpec::dense(page_size, head_dim, dtype, group_size, kv_layout)
    }
}

pub fn snapshot_variants() -> Vec<VariantSpec> {
    use Dtype::*;
    use KvLayout::*;
    use Pruning::{None as Keep, TopP};
    use Selector::{DoubleSparse, Full, Quest};
    let ds = |channels| DoubleSparse { channels };
    vec![
        variant((16, 128, F16, 4, Hnd), Full, Keep),
        variant((64, 64, Bf16, 8, Nhd), Full, Keep),
        variant((1, 256, F16, 8, Nhd), Full, TopP),
        variant((32, 128, Bf16, 1, Hnd), Full, TopP),
        variant((16, 128, F16, 4, Hnd), Quest, TopP),
        variant((8, 64, Bf16, 2, Nhd), Quest, TopP),
        variant((32, 256, F16, 1, Nhd), Quest, Keep),
        variant((64, 64, Bf16, 2, Hnd), Quest, Keep),
        variant((16, 128, Bf16, 4, Nhd), ds(32), TopP),
        variant((32, 256, F16, 8, Hnd), ds(64), TopP),
        variant((8, 64, F16, 2, Hnd), ds(16), Keep),
        variant((1, 128, Bf16, 4, Hnd), ds(32), Keep),
    ]
}

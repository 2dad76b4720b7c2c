//! The variants whose rendered source is snapshotted and compiled in tests: every dtype,
//! layout, head_dim, selector with kernels and pruning mode, and several group and page sizes.

use twilight_jit::{Dtype, KvLayout, Pruning, Selector, VariantSpec};

fn sparse(mut spec: VariantSpec, selector: Selector, pruning: Pruning) -> VariantSpec {
    spec.selector = selector;
    spec.pruning = pruning;
    spec
}

pub fn snapshot_variants() -> Vec<VariantSpec> {
    use Dtype::*;
    use KvLayout::*;
    vec![
        VariantSpec::dense(16, 128, F16, 4, Hnd),
        VariantSpec::dense(16, 128, Bf16, 4, Nhd),
        VariantSpec::dense(1, 64, F16, 1, Nhd),
        VariantSpec::dense(64, 64, Bf16, 8, Hnd),
        VariantSpec::dense(8, 256, F16, 8, Nhd),
        VariantSpec::dense(32, 256, Bf16, 1, Hnd),
        VariantSpec::dense(16, 128, F16, 1, Nhd),
        VariantSpec::dense(64, 128, Bf16, 2, Hnd),
        VariantSpec::dense(1, 128, F16, 8, Hnd),
        sparse(
            VariantSpec::dense(16, 128, F16, 4, Hnd),
            Selector::Quest,
            Pruning::TopP,
        ),
        sparse(
            VariantSpec::dense(64, 64, Bf16, 2, Nhd),
            Selector::Quest,
            Pruning::None,
        ),
        sparse(
            VariantSpec::dense(1, 256, F16, 8, Nhd),
            Selector::Full,
            Pruning::TopP,
        ),
        sparse(
            VariantSpec::dense(16, 128, Bf16, 4, Nhd),
            Selector::DoubleSparse { channels: 32 },
            Pruning::TopP,
        ),
        sparse(
            VariantSpec::dense(8, 64, F16, 2, Hnd),
            Selector::DoubleSparse { channels: 16 },
            Pruning::None,
        ),
        sparse(
            VariantSpec::dense(32, 256, F16, 8, Hnd),
            Selector::DoubleSparse { channels: 64 },
            Pruning::TopP,
        ),
    ]
}

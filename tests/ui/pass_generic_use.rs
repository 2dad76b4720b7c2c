//! A declared variant works as a type parameter: code generic over `Variant` sees its constants.
use twilight::{twilight_kernel, Variant};

#[twilight_kernel(page_size = 32, head_dim = 128, dtype = bf16, group_size = 4, selector = quest, pruning = top_p)]
struct Qwen;

fn name_of<V: Variant>() -> &'static str {
    V::NAME
}

fn main() {
    assert_eq!(name_of::<Qwen>(), Qwen::SPEC.name());
    assert!(twilight::declared_variants()
        .iter()
        .any(|d| d.rust_path.ends_with("::Qwen") && d.spec == Qwen::SPEC));
}

//! Variants declared in Rust with `#[twilight_kernel(...)]`, and the registry of all of them.

pub use twilight_jit::VariantSpec;

/// A kernel variant known at compile time. Implemented by `#[twilight_kernel(...)]` on a unit
/// struct; the macro has already validated [`Variant::SPEC`].
pub trait Variant {
    /// Every parameter of the variant.
    const SPEC: VariantSpec;
    /// The canonical name of [`Variant::SPEC`], e.g. `ps16_hd128_f16_g4_hnd_quest_topp`.
    const NAME: &'static str;
}

/// One declaration, registered by `#[twilight_kernel(...)]` so that a program can precompile
/// every variant it declares (`twilight precompile --declared`, [`declared_variants`]).
#[derive(Debug)]
pub struct DeclaredVariant {
    /// Path of the declaring struct, e.g. `my_engine::Llama3Decode`.
    pub rust_path: &'static str,
    pub spec: VariantSpec,
}

inventory::collect!(DeclaredVariant);

/// Every variant declared in the running program, sorted by name, one entry per distinct spec.
pub fn declared_variants() -> Vec<&'static DeclaredVariant> {
    let mut all: Vec<&'static DeclaredVariant> = inventory::iter::<DeclaredVariant>().collect();
    all.sort_by_key(|d| (d.spec.name(), d.rust_path));
    all.dedup_by_key(|d| d.spec);
    all
}

//! Code generation from a checked item and a validated spec.

use proc_macro2::{Literal, TokenStream};
use quote::quote;
use syn::ext::IdentExt;
use twilight_jit::{Dtype, KvLayout, Pruning, Selector, VariantSpec};

use crate::target::Target;

/// The struct as written, its `Variant` impl and its registration.
pub(crate) fn expansion(target: &Target, spec: &VariantSpec) -> TokenStream {
    let item = &target.item;
    let ident = target.ident();
    let spec_tokens = spec_literal(spec);
    let name = spec.name();
    let path_tail = format!("::{}", ident.unraw());
    quote! {
        #item

        impl ::twilight::Variant for #ident {
            const SPEC: ::twilight::VariantSpec = #spec_tokens;
            const NAME: &'static str = #name;
        }

        ::twilight::inventory::submit! {
            ::twilight::DeclaredVariant {
                rust_path: ::core::concat!(::core::module_path!(), #path_tail),
                spec: <#ident as ::twilight::Variant>::SPEC,
            }
        }
    }
}

/// `::twilight::VariantSpec { ... }`, a constant expression.
fn spec_literal(spec: &VariantSpec) -> TokenStream {
    // Destructured so that a new field does not compile until it is emitted.
    let VariantSpec {
        page_size,
        head_dim,
        dtype,
        group_size,
        kv_layout,
        selector,
        pruning,
    } = *spec;
    let page_size = Literal::u32_unsuffixed(page_size);
    let head_dim = Literal::u32_unsuffixed(head_dim);
    let group_size = Literal::u32_unsuffixed(group_size);
    let dtype = match dtype {
        Dtype::F16 => quote!(::twilight::Dtype::F16),
        Dtype::Bf16 => quote!(::twilight::Dtype::Bf16),
    };
    let kv_layout = match kv_layout {
        KvLayout::Nhd => quote!(::twilight::KvLayout::Nhd),
        KvLayout::Hnd => quote!(::twilight::KvLayout::Hnd),
    };
    let selector = match selector {
        Selector::Full => quote!(::twilight::Selector::Full),
        Selector::Quest => quote!(::twilight::Selector::Quest),
        Selector::DoubleSparse { channels } => {
            let channels = Literal::u32_unsuffixed(channels);
            quote!(::twilight::Selector::DoubleSparse { channels: #channels })
        }
    };
    let pruning = match pruning {
        Pruning::None => quote!(::twilight::Pruning::None),
        Pruning::TopP => quote!(::twilight::Pruning::TopP),
    };
    quote! {
        ::twilight::VariantSpec {
            page_size: #page_size,
            head_dim: #head_dim,
            dtype: #dtype,
            group_size: #group_size,
            kv_layout: #kv_layout,
            selector: #selector,
            pruning: #pruning,
        }
    }
}

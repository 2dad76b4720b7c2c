//! The item under the attribute: a unit struct without generics.

use proc_macro2::TokenStream;
use quote::quote;
use syn::{Fields, Ident, Item, ItemStruct};

/// The struct that receives the `Variant` impl.
pub(crate) struct Target {
    pub(crate) item: ItemStruct,
}

const WANT: &str = "#[twilight_kernel] goes on a unit struct, like `pub struct Llama3Decode;`";

impl Target {
    /// # Errors
    /// When the item is not a unit struct, or has generic parameters.
    pub(crate) fn parse(item: TokenStream) -> syn::Result<Self> {
        let item: Item = syn::parse2(item)?;
        let (tokens, what) = match item {
            Item::Struct(item) => return Self::from_struct(item),
            Item::Enum(e) => {
                let (token, ident) = (e.enum_token, e.ident);
                (quote!(#token #ident), "an enum")
            }
            Item::Fn(f) => {
                let (token, ident) = (f.sig.fn_token, f.sig.ident);
                (quote!(#token #ident), "a function")
            }
            Item::Union(u) => {
                let (token, ident) = (u.union_token, u.ident);
                (quote!(#token #ident), "a union")
            }
            other => (quote!(#other), "this item"),
        };
        Err(syn::Error::new_spanned(
            tokens,
            format!("{WANT}, not on {what}"),
        ))
    }

    fn from_struct(item: ItemStruct) -> syn::Result<Self> {
        match &item.fields {
            Fields::Unit => {}
            Fields::Named(fields) => {
                return Err(syn::Error::new_spanned(
                    fields,
                    format!("{WANT}; this struct has fields"),
                ))
            }
            Fields::Unnamed(fields) => {
                return Err(syn::Error::new_spanned(
                    fields,
                    format!("{WANT}; this tuple struct has fields"),
                ))
            }
        }
        let generics = &item.generics;
        if !generics.params.is_empty() || generics.where_clause.is_some() {
            let (params, where_clause) = (&generics.params, &generics.where_clause);
            return Err(syn::Error::new_spanned(
                quote!(#params #where_clause),
                "a variant has no generic parameters: \
                 declare one struct per variant, each with its own #[twilight_kernel(...)]",
            ));
        }
        Ok(Target { item })
    }

    pub(crate) fn ident(&self) -> &Ident {
        &self.item.ident
    }
}

//! `#[twilight_kernel(...)]`: declares a twilight attention variant on a unit struct.
//!
//! The attribute reads `key = value` arguments, feeds each one to
//! [`twilight_jit::spec::SpecBuilder`] (the one set of rules that specs built at run time also
//! go through), and emits an `impl ::twilight::Variant` plus a registration in
//! `::twilight::declared_variants()`. Every mistake is a compile error pointing at the argument
//! to blame.
//!
//! Layout: `args` splits and reads the arguments (syntax only), `target` checks the item,
//! `spec` turns the arguments into a validated spec, `emit` generates the code.

mod args;
mod emit;
mod spec;
mod target;

use proc_macro::TokenStream;
use proc_macro2::TokenStream as TokenStream2;

/// Declares a kernel variant, checked at compile time.
///
/// ```ignore
/// #[twilight_kernel(page_size = 16, head_dim = 128, dtype = f16, group_size = 4,
///                   kv_layout = hnd, selector = quest, pruning = top_p)]
/// pub struct Llama3Decode;
/// ```
///
/// `kv_layout` is optional (default `hnd`); every other key is required. The struct is kept
/// as written; the macro adds `impl ::twilight::Variant for Llama3Decode` and registers the
/// variant for `::twilight::declared_variants()`.
#[proc_macro_attribute]
pub fn twilight_kernel(args: TokenStream, item: TokenStream) -> TokenStream {
    let item = TokenStream2::from(item);
    match expand(args.into(), item.clone()) {
        Ok(tokens) => tokens.into(),
        // The item goes out unchanged next to the error, so that the rest of the crate (and
        // the IDE) still sees the struct and reports nothing beyond the macro's own error.
        Err(err) => {
            let mut tokens = err.to_compile_error();
            tokens.extend(item);
            tokens.into()
        }
    }
}

/// The whole expansion: the item as written, followed by the generated impl and registration.
///
/// # Errors
/// Every mistake found in the arguments and the item, combined.
fn expand(args: TokenStream2, item: TokenStream2) -> syn::Result<TokenStream2> {
    let target = target::Target::parse(item);
    let spec = args::KernelArgs::parse(args).and_then(|args| spec::build(&args));
    let (target, spec) = match (target, spec) {
        (Ok(target), Ok(spec)) => (target, spec),
        (Err(mut a), Err(b)) => {
            a.combine(b);
            return Err(a);
        }
        (Err(e), _) | (_, Err(e)) => return Err(e),
    };
    Ok(emit::expansion(&target, &spec))
}

//! From arguments to a validated spec, through `twilight_jit`'s rules, with each error placed
//! on the argument it blames.

use proc_macro2::Span;
use quote::ToTokens;
use twilight_jit::spec::{parse_value, SpecBuilder, SpecError, SpecField};
use twilight_jit::VariantSpec;

use crate::args::{KernelArg, KernelArgs};

/// # Errors
/// Every error of a `key = value` (unknown key, bad value, duplicate); when there are none,
/// the first missing key or the validation error of the finished spec.
pub(crate) fn build(args: &KernelArgs) -> syn::Result<VariantSpec> {
    let mut builder = SpecBuilder::default();
    // Each argument that set a field, to point at when the finished spec is refused.
    let mut set: Vec<(SpecField, &KernelArg)> = Vec::new();
    let mut errors: Option<syn::Error> = None;
    for arg in &args.args {
        match builder.set(&arg.key_text(), &arg.value_text()) {
            Ok(field) => set.push((field, arg)),
            Err(err) => {
                let err = argument_error(arg, &err);
                match &mut errors {
                    Some(errors) => errors.combine(err),
                    None => errors = Some(err),
                }
            }
        }
    }
    // A missing key or a refused combination would only echo the errors above.
    if let Some(errors) = errors {
        return Err(errors);
    }
    builder.finish().map_err(|err| {
        let arg = err
            .field()
            .and_then(|field| set.iter().find(|(f, _)| *f == field))
            .map(|(_, arg)| *arg);
        match (&err, arg) {
            (SpecError::BadValue { .. }, Some(arg)) => value_error(arg, &err),
            (SpecError::MissingKey { field }, _) => {
                let message = format!("{err}; add `{field} = ...` to #[twilight_kernel(...)]");
                match args.span_tokens() {
                    Some(all) => syn::Error::new_spanned(all, message),
                    None => syn::Error::new(Span::call_site(), message),
                }
            }
            (_, Some(arg)) => syn::Error::new_spanned(arg, err),
            (_, None) => match args.span_tokens() {
                Some(all) => syn::Error::new_spanned(all, err),
                None => syn::Error::new(Span::call_site(), err),
            },
        }
    })
}

/// An error from setting one argument.
fn argument_error(arg: &KernelArg, err: &SpecError) -> syn::Error {
    match err {
        SpecError::UnknownKey { .. } => syn::Error::new_spanned(&arg.key, err),
        SpecError::BadValue { .. } => value_error(arg, err),
        // The later occurrence is the one set: the first is where the builder took it.
        _ => syn::Error::new_spanned(arg, err),
    }
}

/// A bad value, pointing at the value; a string literal holding a good value gets a hint.
fn value_error(arg: &KernelArg, err: &SpecError) -> syn::Error {
    let mut message = err.to_string();
    if let (Some(text), Some(field)) = (arg.value_as_str(), err.field()) {
        if parse_value(field, &text).is_ok() {
            message = format!("{message}; write `{text}` without the quotes");
        }
    }
    syn::Error::new_spanned(arg.value.to_token_stream(), message)
}

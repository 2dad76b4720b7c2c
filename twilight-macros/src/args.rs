//! Syntax of the attribute's arguments: a comma-separated list of `key = value`. Nothing here
//! knows which keys or values exist; that is `twilight_jit`'s business.

use proc_macro2::{Delimiter, Span, TokenStream, TokenTree};
use quote::ToTokens;
use syn::ext::IdentExt;
use syn::parse::{ParseStream, Parser};
use syn::{Ident, Lit, Token};

/// Every argument of one attribute, in order.
pub(crate) struct KernelArgs {
    /// The arguments as written, to point at when a key is missing.
    pub(crate) all: TokenStream,
    pub(crate) args: Vec<KernelArg>,
}

/// One `key = value`.
pub(crate) struct KernelArg {
    pub(crate) key: Ident,
    pub(crate) eq: Token![=],
    /// Every token after `=` up to the next top-level comma.
    pub(crate) value: TokenStream,
}

impl KernelArg {
    /// The key as written, without a raw `r#` prefix.
    pub(crate) fn key_text(&self) -> String {
        self.key.unraw().to_string()
    }

    /// The value in its declaration spelling (`16`, `f16`, `double_sparse(32)`), as
    /// `twilight_jit` reads it. Anything that is not an integer, an identifier or
    /// `name(integer)` is passed on as its tokens print, for the spec rules to refuse.
    pub(crate) fn value_text(&self) -> String {
        let tokens: Vec<TokenTree> = self.value.clone().into_iter().collect();
        match tokens.as_slice() {
            [TokenTree::Literal(lit)] => match Lit::new(lit.clone()) {
                Lit::Int(int) if int.suffix().is_empty() => int.base10_digits().to_string(),
                _ => lit.to_string(),
            },
            [TokenTree::Ident(ident)] => ident.unraw().to_string(),
            // `-128` prints as `- 128` otherwise.
            [TokenTree::Punct(minus), TokenTree::Literal(lit)] if minus.as_char() == '-' => {
                format!("-{lit}")
            }
            [TokenTree::Ident(name), TokenTree::Group(group)]
                if group.delimiter() == Delimiter::Parenthesis =>
            {
                let inner: Vec<TokenTree> = group.stream().into_iter().collect();
                match inner.as_slice() {
                    [TokenTree::Literal(lit)] => match Lit::new(lit.clone()) {
                        Lit::Int(int) if int.suffix().is_empty() => {
                            format!("{}({})", name.unraw(), int.base10_digits())
                        }
                        _ => self.value.to_string(),
                    },
                    _ => self.value.to_string(),
                }
            }
            _ => self.value.to_string(),
        }
    }

    /// The contents of the value when it is a single string literal (`dtype = "f16"`).
    pub(crate) fn value_as_str(&self) -> Option<String> {
        let mut tokens = self.value.clone().into_iter();
        match (tokens.next(), tokens.next()) {
            (Some(TokenTree::Literal(lit)), None) => match Lit::new(lit) {
                Lit::Str(s) => Some(s.value()),
                _ => None,
            },
            _ => None,
        }
    }
}

impl ToTokens for KernelArg {
    fn to_tokens(&self, tokens: &mut TokenStream) {
        self.key.to_tokens(tokens);
        self.eq.to_tokens(tokens);
        self.value.to_tokens(tokens);
    }
}

impl KernelArgs {
    /// Splits at top-level commas and reads each piece as `key = value`.
    ///
    /// # Errors
    /// Every piece that is not `key = value`, combined.
    pub(crate) fn parse(all: TokenStream) -> syn::Result<Self> {
        let mut args = Vec::new();
        let mut errors: Option<syn::Error> = None;
        let mut push_error = |err: syn::Error| match &mut errors {
            Some(errors) => errors.combine(err),
            None => errors = Some(err),
        };
        for piece in split_at_commas(all.clone()) {
            match piece {
                Piece::Arg(tokens) => match parse_arg.parse2(tokens) {
                    Ok(arg) => args.push(arg),
                    Err(err) => push_error(err),
                },
                Piece::EmptyBefore(comma) => push_error(syn::Error::new(
                    comma,
                    "expected `key = value` before this comma",
                )),
            }
        }
        match errors {
            Some(err) => Err(err),
            None => Ok(KernelArgs { all, args }),
        }
    }

    /// Where to point when the arguments as a whole are to blame.
    pub(crate) fn span_tokens(&self) -> Option<&TokenStream> {
        (!self.all.is_empty()).then_some(&self.all)
    }
}

enum Piece {
    /// The tokens between two top-level commas.
    Arg(TokenStream),
    /// Nothing between two commas (or before the first one): the span of the comma.
    EmptyBefore(Span),
}

/// Pieces between top-level commas; one trailing comma is allowed. Commas inside brackets
/// belong to the group they are in.
fn split_at_commas(all: TokenStream) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut current = TokenStream::new();
    for tree in all {
        match &tree {
            TokenTree::Punct(p) if p.as_char() == ',' => {
                if current.is_empty() {
                    pieces.push(Piece::EmptyBefore(p.span()));
                } else {
                    pieces.push(Piece::Arg(std::mem::take(&mut current)));
                }
            }
            _ => current.extend([tree]),
        }
    }
    if !current.is_empty() {
        pieces.push(Piece::Arg(current));
    }
    pieces
}

const EXPECTED_ARG: &str = "expected `key = value`, like `page_size = 16`";

/// One piece: `key = value`, where the value is every remaining token.
fn parse_arg(input: ParseStream) -> syn::Result<KernelArg> {
    if !(input.peek(Ident::peek_any) && input.peek2(Token![=]) && !input.peek2(Token![==])) {
        let rest: TokenStream = input.parse()?;
        return Err(syn::Error::new_spanned(rest, EXPECTED_ARG));
    }
    let key = Ident::parse_any(input)?;
    let eq: Token![=] = input.parse()?;
    let value: TokenStream = input.parse()?;
    if value.is_empty() {
        return Err(syn::Error::new_spanned(
            quote::quote!(#key #eq),
            format!("expected a value after `{} =`", key.unraw()),
        ));
    }
    Ok(KernelArg { key, eq, value })
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::quote;

    fn texts(tokens: TokenStream) -> Vec<(String, String)> {
        KernelArgs::parse(tokens)
            .unwrap()
            .args
            .iter()
            .map(|a| (a.key_text(), a.value_text()))
            .collect()
    }

    #[test]
    fn values_get_their_declaration_spelling() {
        let got = texts(quote!(
            page_size = 0x10,
            dtype = r#f16,
            selector = double_sparse(32),
        ));
        let want = [
            ("page_size", "16"),
            ("dtype", "f16"),
            ("selector", "double_sparse(32)"),
        ];
        assert_eq!(
            got,
            want.map(|(k, v)| (k.to_string(), v.to_string())).to_vec()
        );
    }

    #[test]
    fn other_values_pass_through_as_written() {
        let got = texts(quote!(
            dtype = "f16",
            page_size = 16u32,
            selector = double_sparse(a),
            head_dim = -64
        ));
        assert_eq!(got[0].1, "\"f16\"");
        assert_eq!(got[3].1, "-64");
        assert_eq!(got[1].1, "16u32");
        assert_eq!(got[2].1.replace(' ', ""), "double_sparse(a)");
    }

    #[test]
    fn syntax_errors_are_reported_per_argument() {
        let err = KernelArgs::parse(quote!(quest, page_size = , , head_dim == 2))
            .err()
            .unwrap();
        let messages: Vec<String> = err.into_iter().map(|e| e.to_string()).collect();
        assert_eq!(
            messages,
            [
                EXPECTED_ARG.to_string(),
                "expected a value after `page_size =`".to_string(),
                "expected `key = value` before this comma".to_string(),
                EXPECTED_ARG.to_string(),
            ]
        );
        assert!(KernelArgs::parse(TokenStream::new())
            .unwrap()
            .args
            .is_empty());
    }
}

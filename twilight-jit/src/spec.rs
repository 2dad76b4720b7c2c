//! The variant space: every parameter that a generated kernel is specialized for, the one
//! validation routine shared by the proc macro and by specs built at run time, and the canonical
//! name that spells every parameter.
//!
//! Two spellings exist for every value and are never mixed: the *declaration* spelling used in
//! `#[twilight_kernel(...)]` and `key=value` lists (`bf16`, `double_sparse(32)`, `top_p`), and the
//! *name* spelling used inside canonical names (`bf16`, `ds32`, `topp`). The C++ spelling of a
//! dtype (`__nv_bfloat16`) belongs to rendering.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// Element type of Q, K, V and the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Dtype {
    F16,
    Bf16,
}

/// Order of the two middle axes of a K or V page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum KvLayout {
    /// `[num_pages, page_size, num_kv_heads, head_dim]` (candle).
    Nhd,
    /// `[num_pages, num_kv_heads, page_size, head_dim]` (FlashInfer-style engines).
    Hnd,
}

/// How the candidate tokens of a decode step are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Selector {
    /// Every valid token.
    Full,
    /// Quest: pages ranked by an upper bound of q.k from per-page channel min/max.
    Quest,
    /// Double Sparsity: tokens ranked by q.k over `channels` calibrated channels.
    DoubleSparse { channels: u32 },
}

/// What happens to the candidates before attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Pruning {
    /// Keep every candidate.
    None,
    /// Twilight: keep the smallest set whose estimated weights sum to at least p.
    TopP,
}

/// One point of the specialization space. Fields are public so that a spec can be a constant
/// (`#[twilight_kernel]` emits one); call [`VariantSpec::validate`] on any spec built by hand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct VariantSpec {
    pub page_size: u32,
    pub head_dim: u32,
    pub dtype: Dtype,
    pub group_size: u32,
    pub kv_layout: KvLayout,
    pub selector: Selector,
    pub pruning: Pruning,
}

/// The parameters of a spec, as they are spelled as keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SpecField {
    PageSize,
    HeadDim,
    Dtype,
    GroupSize,
    KvLayout,
    Selector,
    Pruning,
}

impl SpecField {
    pub const ALL: [SpecField; 7] = [
        SpecField::PageSize,
        SpecField::HeadDim,
        SpecField::Dtype,
        SpecField::GroupSize,
        SpecField::KvLayout,
        SpecField::Selector,
        SpecField::Pruning,
    ];

    pub fn key(self) -> &'static str {
        match self {
            SpecField::PageSize => "page_size",
            SpecField::HeadDim => "head_dim",
            SpecField::Dtype => "dtype",
            SpecField::GroupSize => "group_size",
            SpecField::KvLayout => "kv_layout",
            SpecField::Selector => "selector",
            SpecField::Pruning => "pruning",
        }
    }

    pub fn from_key(key: &str) -> Option<SpecField> {
        SpecField::ALL.into_iter().find(|f| f.key() == key)
    }

    /// The values this field accepts, as a user would type them.
    pub fn expected(self) -> &'static str {
        match self {
            SpecField::PageSize => "one of 1, 8, 16, 32, 64",
            SpecField::HeadDim => "one of 64, 128, 256",
            SpecField::Dtype => "`f16` or `bf16`",
            SpecField::GroupSize => "one of 1, 2, 4, 8",
            SpecField::KvLayout => "`nhd` or `hnd`",
            SpecField::Selector => "`quest`, `full` or `double_sparse(r)` with r in 16, 32, 64",
            SpecField::Pruning => "`top_p` or `none`",
        }
    }
}

impl fmt::Display for SpecField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// Why a spec, a key or a value was refused. `field` names the argument to blame, so the macro
/// can point at it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("unknown key `{}`; expected one of page_size, head_dim, dtype, group_size, kv_layout, selector, pruning", printable(.key))]
    UnknownKey { key: String },
    #[error("`{field}` is given more than once")]
    DuplicateKey { field: SpecField },
    #[error("missing `{field}` ({})", field.expected())]
    MissingKey { field: SpecField },
    #[error("bad value `{}` for `{field}`: expected {}", printable(.value), field.expected())]
    BadValue { field: SpecField, value: String },
    #[error("unsupported combination: {reason}")]
    Unsupported { field: SpecField, reason: String },
    #[error("`{}` is not a variant name (like `ps16_hd128_f16_g4_hnd_quest_topp`) nor a key=value list: {}", printable(.text), printable(.reason))]
    BadName { text: String, reason: String },
}

/// `text` with every control character escaped (`\n`, `\u{1b}`), so that an error never
/// writes raw control characters (terminal escapes, carriage returns) from its input back to
/// a terminal or a log.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A number in its one canonical spelling: ASCII digits, no sign, no leading zero. Anything
/// else (`016`, `+16`, ` 16`) would give a second name for one variant.
fn canonical_number(text: &str) -> Option<u32> {
    let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    if !digits || (text.len() > 1 && text.starts_with('0')) {
        return None;
    }
    text.parse().ok()
}

impl SpecError {
    /// The field to blame, where there is one.
    pub fn field(&self) -> Option<SpecField> {
        match self {
            SpecError::DuplicateKey { field }
            | SpecError::MissingKey { field }
            | SpecError::BadValue { field, .. }
            | SpecError::Unsupported { field, .. } => Some(*field),
            SpecError::UnknownKey { .. } | SpecError::BadName { .. } => None,
        }
    }
}

pub const PAGE_SIZES: [u32; 5] = [1, 8, 16, 32, 64];
pub const HEAD_DIMS: [u32; 3] = [64, 128, 256];
pub const GROUP_SIZES: [u32; 4] = [1, 2, 4, 8];
pub const DS_CHANNELS: [u32; 3] = [16, 32, 64];
/// The layout a declaration gets when it names none.
pub const DEFAULT_KV_LAYOUT: KvLayout = KvLayout::Hnd;

impl Dtype {
    /// Short spelling, used in declarations and names.
    pub fn short(self) -> &'static str {
        match self {
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }
    /// The CUDA C++ type.
    pub fn cpp(self) -> &'static str {
        match self {
            Dtype::F16 => "half",
            Dtype::Bf16 => "__nv_bfloat16",
        }
    }
    pub fn size_bytes(self) -> usize {
        2
    }
}

impl KvLayout {
    pub fn short(self) -> &'static str {
        match self {
            KvLayout::Nhd => "nhd",
            KvLayout::Hnd => "hnd",
        }
    }
}

impl Selector {
    /// Declaration spelling: `quest`, `full`, `double_sparse(32)`.
    pub fn declared(self) -> String {
        match self {
            Selector::Full => "full".into(),
            Selector::Quest => "quest".into(),
            Selector::DoubleSparse { channels } => format!("double_sparse({channels})"),
        }
    }
    /// Name spelling: `quest`, `full`, `ds32`.
    pub fn short(self) -> String {
        match self {
            Selector::Full => "full".into(),
            Selector::Quest => "quest".into(),
            Selector::DoubleSparse { channels } => format!("ds{channels}"),
        }
    }
}

impl Pruning {
    pub fn declared(self) -> &'static str {
        match self {
            Pruning::None => "none",
            Pruning::TopP => "top_p",
        }
    }
    pub fn short(self) -> &'static str {
        match self {
            Pruning::None => "none",
            Pruning::TopP => "topp",
        }
    }
}

/// The structures a variant derives from K and keeps beside the KV pool (its sidecar), all
/// written by the append launch: decided here once, for the renderer, the pools and the
/// reference alike.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DerivedKinds {
    /// Quest's per-page element-wise max and min of K.
    pub quest: bool,
    /// The 4-bit K with its per-token (scale, min), read by the top-p pruner.
    pub quant4: bool,
    /// Label channels per token (Double Sparsity's r); 0 keeps no labels.
    pub labels: usize,
}

impl DerivedKinds {
    /// Whether the sidecar holds nothing.
    pub fn is_empty(&self) -> bool {
        !self.quest && !self.quant4 && self.labels == 0
    }
}

impl VariantSpec {
    /// Dense paged decode attention for the given shape: the baseline variant.
    pub const fn dense(
        page_size: u32,
        head_dim: u32,
        dtype: Dtype,
        group_size: u32,
        kv_layout: KvLayout,
    ) -> Self {
        VariantSpec {
            page_size,
            head_dim,
            dtype,
            group_size,
            kv_layout,
            selector: Selector::Full,
            pruning: Pruning::None,
        }
    }

    /// What the variant's kernels read beside K and V.
    pub fn derived_kinds(&self) -> DerivedKinds {
        DerivedKinds {
            quest: self.selector == Selector::Quest,
            quant4: self.pruning == Pruning::TopP,
            labels: match self.selector {
                Selector::DoubleSparse { channels } => channels as usize,
                _ => 0,
            },
        }
    }

    /// `selector = full, pruning = none`: dense decode, the shortest pipeline.
    pub fn is_dense(&self) -> bool {
        self.selector == Selector::Full && self.pruning == Pruning::None
    }

    /// The one set of rules for a spec, used by the macro at compile time and by every spec
    /// built at run time.
    ///
    /// # Errors
    /// A [`SpecError::BadValue`] for a value outside its field's range, or a
    /// [`SpecError::Unsupported`] for values that are fine alone but not together.
    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |field: SpecField, value: String| Err(SpecError::BadValue { field, value });
        if !PAGE_SIZES.contains(&self.page_size) {
            return bad(SpecField::PageSize, self.page_size.to_string());
        }
        if !HEAD_DIMS.contains(&self.head_dim) {
            return bad(SpecField::HeadDim, self.head_dim.to_string());
        }
        if !GROUP_SIZES.contains(&self.group_size) {
            return bad(SpecField::GroupSize, self.group_size.to_string());
        }
        if let Selector::DoubleSparse { channels } = self.selector {
            if !DS_CHANNELS.contains(&channels) {
                return bad(SpecField::Selector, self.selector.declared());
            }
            // Scoring with every channel is dense scoring at a higher cost than `full`.
            if channels >= self.head_dim {
                return Err(SpecError::Unsupported {
                    field: SpecField::Selector,
                    reason: format!(
                        "double_sparse({channels}) needs fewer label channels than head_dim = {}",
                        self.head_dim
                    ),
                });
            }
        }
        Ok(())
    }

    /// The canonical name, e.g. `ps16_hd128_f16_g4_hnd_quest_topp`. It spells every field, so
    /// two specs share a name only when they are equal; [`VariantSpec::from_name`] reads it back.
    pub fn name(&self) -> String {
        // Destructured so that a new field does not compile until the name spells it.
        let VariantSpec {
            page_size,
            head_dim,
            dtype,
            group_size,
            kv_layout,
            selector,
            pruning,
        } = *self;
        format!(
            "ps{page_size}_hd{head_dim}_{}_g{group_size}_{}_{}_{}",
            dtype.short(),
            kv_layout.short(),
            selector.short(),
            pruning.short()
        )
    }

    /// Reads a canonical name back into a validated spec.
    ///
    /// # Errors
    /// [`SpecError::BadName`] when the text is not shaped like a name, or the validation error
    /// of the spec it spells.
    pub fn from_name(name: &str) -> Result<Self, SpecError> {
        let bad = |reason: &str| SpecError::BadName {
            text: name.to_string(),
            reason: reason.to_string(),
        };
        let parts: Vec<&str> = name.split('_').collect();
        let [ps, hd, dt, g, layout, sel, pr] = parts[..] else {
            return Err(bad("a name has 7 parts separated by `_`"));
        };
        let number = |text: &str, prefix: &str, field: SpecField| -> Result<u32, SpecError> {
            text.strip_prefix(prefix)
                .and_then(canonical_number)
                .ok_or_else(|| bad(&format!("`{text}` should be `{prefix}<n>` ({field})")))
        };
        let selector = match sel {
            "full" => Selector::Full,
            "quest" => Selector::Quest,
            _ => Selector::DoubleSparse {
                channels: number(sel, "ds", SpecField::Selector)?,
            },
        };
        let pruning = match pr {
            "none" => Pruning::None,
            "topp" => Pruning::TopP,
            _ => return Err(bad(&format!("`{pr}` should be `none` or `topp`"))),
        };
        let spec = VariantSpec {
            page_size: number(ps, "ps", SpecField::PageSize)?,
            head_dim: number(hd, "hd", SpecField::HeadDim)?,
            dtype: parse_value(SpecField::Dtype, dt)?.dtype(),
            group_size: number(g, "g", SpecField::GroupSize)?,
            kv_layout: parse_value(SpecField::KvLayout, layout)?.kv_layout(),
            selector,
            pruning,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Parses `page_size=16,head_dim=128,dtype=f16,group_size=4,selector=quest,pruning=top_p`
    /// (commas or whitespace between pairs; `kv_layout` defaults to `hnd`).
    ///
    /// # Errors
    /// The first unknown, duplicate, missing or bad key, or the validation error.
    pub fn from_key_values(text: &str) -> Result<Self, SpecError> {
        let mut builder = SpecBuilder::default();
        for pair in text
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|s| !s.is_empty())
        {
            let Some((key, value)) = pair.split_once('=') else {
                return Err(SpecError::BadName {
                    text: text.to_string(),
                    reason: format!("`{pair}` is not key=value"),
                });
            };
            builder.set(key.trim(), value.trim())?;
        }
        builder.finish()
    }
}

impl fmt::Display for VariantSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// A canonical name or a key=value list.
impl FromStr for VariantSpec {
    type Err = SpecError;
    fn from_str(text: &str) -> Result<Self, SpecError> {
        if text.contains('=') {
            VariantSpec::from_key_values(text)
        } else {
            VariantSpec::from_name(text.trim())
        }
    }
}

/// One parsed value, before it is placed in a spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldValue {
    Number(u32),
    Dtype(Dtype),
    KvLayout(KvLayout),
    Selector(Selector),
    Pruning(Pruning),
}

impl FieldValue {
    fn number(self) -> u32 {
        match self {
            FieldValue::Number(n) => n,
            _ => unreachable!("parse_value returns a number for numeric fields"),
        }
    }
    fn dtype(self) -> Dtype {
        match self {
            FieldValue::Dtype(d) => d,
            _ => unreachable!("parse_value returns a dtype for `dtype`"),
        }
    }
    fn kv_layout(self) -> KvLayout {
        match self {
            FieldValue::KvLayout(l) => l,
            _ => unreachable!("parse_value returns a layout for `kv_layout`"),
        }
    }
}

/// Parses one value in its declaration spelling. Numbers are checked against their range by
/// [`VariantSpec::validate`], not here, so that both paths give the same message.
///
/// # Errors
/// [`SpecError::BadValue`] when the text is not a value of that field at all.
pub fn parse_value(field: SpecField, text: &str) -> Result<FieldValue, SpecError> {
    let bad = || SpecError::BadValue {
        field,
        value: text.to_string(),
    };
    let value = match field {
        SpecField::PageSize | SpecField::HeadDim | SpecField::GroupSize => {
            FieldValue::Number(canonical_number(text).ok_or_else(bad)?)
        }
        SpecField::Dtype => FieldValue::Dtype(match text {
            "f16" => Dtype::F16,
            "bf16" => Dtype::Bf16,
            _ => return Err(bad()),
        }),
        SpecField::KvLayout => FieldValue::KvLayout(match text {
            "nhd" => KvLayout::Nhd,
            "hnd" => KvLayout::Hnd,
            _ => return Err(bad()),
        }),
        SpecField::Selector => FieldValue::Selector(match text {
            "full" => Selector::Full,
            "quest" => Selector::Quest,
            _ => {
                let inner = text
                    .strip_prefix("double_sparse")
                    .map(str::trim)
                    .and_then(|s| s.strip_prefix('('))
                    .and_then(|s| s.strip_suffix(')'))
                    .ok_or_else(bad)?;
                let channels = canonical_number(inner.trim()).ok_or_else(bad)?;
                Selector::DoubleSparse { channels }
            }
        }),
        SpecField::Pruning => FieldValue::Pruning(match text {
            "none" => Pruning::None,
            "top_p" => Pruning::TopP,
            _ => return Err(bad()),
        }),
    };
    Ok(value)
}

/// Collects `key = value` pairs one at a time (the macro's and the key=value parser's shared
/// path), then builds and validates the spec.
#[derive(Clone, Debug, Default)]
pub struct SpecBuilder {
    page_size: Option<u32>,
    head_dim: Option<u32>,
    dtype: Option<Dtype>,
    group_size: Option<u32>,
    kv_layout: Option<KvLayout>,
    selector: Option<Selector>,
    pruning: Option<Pruning>,
}

impl SpecBuilder {
    /// Sets one key from its declaration spelling.
    ///
    /// # Errors
    /// Unknown key, a key already set, or a value that does not parse.
    pub fn set(&mut self, key: &str, value: &str) -> Result<SpecField, SpecError> {
        let field = SpecField::from_key(key).ok_or_else(|| SpecError::UnknownKey {
            key: key.to_string(),
        })?;
        let parsed = parse_value(field, value)?;
        let duplicate = SpecError::DuplicateKey { field };
        fn put<T>(slot: &mut Option<T>, value: T, dup: SpecError) -> Result<(), SpecError> {
            if slot.is_some() {
                return Err(dup);
            }
            *slot = Some(value);
            Ok(())
        }
        match (field, parsed) {
            (SpecField::PageSize, v) => put(&mut self.page_size, v.number(), duplicate)?,
            (SpecField::HeadDim, v) => put(&mut self.head_dim, v.number(), duplicate)?,
            (SpecField::GroupSize, v) => put(&mut self.group_size, v.number(), duplicate)?,
            (SpecField::Dtype, v) => put(&mut self.dtype, v.dtype(), duplicate)?,
            (SpecField::KvLayout, v) => put(&mut self.kv_layout, v.kv_layout(), duplicate)?,
            (SpecField::Selector, FieldValue::Selector(s)) => {
                put(&mut self.selector, s, duplicate)?
            }
            (SpecField::Pruning, FieldValue::Pruning(p)) => put(&mut self.pruning, p, duplicate)?,
            _ => unreachable!("parse_value returns the kind of its field"),
        }
        Ok(field)
    }

    /// Builds the spec; `kv_layout` defaults to [`DEFAULT_KV_LAYOUT`], every other key is required.
    ///
    /// # Errors
    /// The first missing key in declaration order, or the validation error.
    pub fn finish(&self) -> Result<VariantSpec, SpecError> {
        let missing = |field| SpecError::MissingKey { field };
        let spec = VariantSpec {
            page_size: self.page_size.ok_or(missing(SpecField::PageSize))?,
            head_dim: self.head_dim.ok_or(missing(SpecField::HeadDim))?,
            dtype: self.dtype.ok_or(missing(SpecField::Dtype))?,
            group_size: self.group_size.ok_or(missing(SpecField::GroupSize))?,
            kv_layout: self.kv_layout.unwrap_or(DEFAULT_KV_LAYOUT),
            selector: self.selector.ok_or(missing(SpecField::Selector))?,
            pruning: self.pruning.ok_or(missing(SpecField::Pruning))?,
        };
        spec.validate()?;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_canonical_numbers_name_a_variant() {
        let good = "ps16_hd128_f16_g4_hnd_quest_topp";
        assert!(VariantSpec::from_name(good).is_ok());
        for bad in [
            "ps016_hd128_f16_g4_hnd_quest_topp",
            "ps+16_hd128_f16_g4_hnd_quest_topp",
            "ps16_hd0128_f16_g4_hnd_quest_topp",
            "ps16_hd128_f16_g04_hnd_quest_topp",
            "ps16_hd128_f16_g4_hnd_ds+16_topp",
            "ps16_hd128_f16_g4_hnd_ds016_topp",
            "ps_hd128_f16_g4_hnd_quest_topp",
        ] {
            assert!(VariantSpec::from_name(bad).is_err(), "{bad} was accepted");
        }
        for bad in [
            "page_size=016",
            "page_size=+16",
            "selector=double_sparse(+16)",
        ] {
            let text =
                format!("{bad},head_dim=128,dtype=f16,group_size=4,selector=quest,pruning=top_p");
            assert!(text.parse::<VariantSpec>().is_err(), "{text} was accepted");
        }
    }

    #[test]
    fn errors_escape_control_characters() {
        for text in [
            "ps16\x1b[31m_hd128_f16_g4_hnd_quest_topp",
            "\x1b]0;title\x07",
            "page_size=16\r,pages\x1b=1",
            "page_size=1\x1b6",
        ] {
            let err = text.parse::<VariantSpec>().unwrap_err().to_string();
            assert!(!err.chars().any(char::is_control), "{err:?}");
        }
    }

    use super::*;

    fn llama() -> VariantSpec {
        VariantSpec {
            page_size: 16,
            head_dim: 128,
            dtype: Dtype::F16,
            group_size: 4,
            kv_layout: KvLayout::Hnd,
            selector: Selector::Quest,
            pruning: Pruning::TopP,
        }
    }

    #[test]
    fn name_spells_every_field() {
        assert_eq!(llama().name(), "ps16_hd128_f16_g4_hnd_quest_topp");
        let ds = VariantSpec {
            selector: Selector::DoubleSparse { channels: 32 },
            dtype: Dtype::Bf16,
            kv_layout: KvLayout::Nhd,
            pruning: Pruning::None,
            ..llama()
        };
        assert_eq!(ds.name(), "ps16_hd128_bf16_g4_nhd_ds32_none");
    }

    #[test]
    fn every_valid_spec_round_trips_through_its_name() {
        let mut count = 0;
        for spec in all_specs() {
            if spec.validate().is_ok() {
                assert_eq!(VariantSpec::from_name(&spec.name()), Ok(spec));
                assert_eq!(spec.name().parse::<VariantSpec>(), Ok(spec));
                count += 1;
            }
        }
        // 5 page sizes, 3 head dims, 2 dtypes, 4 groups, 2 layouts, 5 selectors (less ds64 at
        // hd64), 2 prunings.
        assert_eq!(count, 5 * 2 * 4 * 2 * 2 * (3 * 5 - 1));
    }

    #[test]
    fn key_values_parse_with_default_layout() {
        let spec: VariantSpec =
            "page_size=16, head_dim=128, dtype=f16, group_size=4, selector=quest, pruning=top_p"
                .parse()
                .unwrap();
        assert_eq!(spec, llama());
    }

    #[test]
    fn builder_reports_each_kind_of_mistake() {
        let mut b = SpecBuilder::default();
        assert!(matches!(
            b.set("page_sise", "16"),
            Err(SpecError::UnknownKey { .. })
        ));
        b.set("page_size", "16").unwrap();
        assert_eq!(
            b.set("page_size", "16"),
            Err(SpecError::DuplicateKey {
                field: SpecField::PageSize
            })
        );
        assert!(matches!(
            b.set("dtype", "f32"),
            Err(SpecError::BadValue {
                field: SpecField::Dtype,
                ..
            })
        ));
        assert_eq!(
            b.finish(),
            Err(SpecError::MissingKey {
                field: SpecField::HeadDim
            })
        );
        let err = VariantSpec {
            head_dim: 64,
            selector: Selector::DoubleSparse { channels: 64 },
            ..llama()
        }
        .validate()
        .unwrap_err();
        assert_eq!(err.field(), Some(SpecField::Selector));
        assert!(matches!(err, SpecError::Unsupported { .. }));
    }

    #[test]
    fn out_of_range_values_are_refused() {
        for (spec, field) in [
            (
                VariantSpec {
                    page_size: 12,
                    ..llama()
                },
                SpecField::PageSize,
            ),
            (
                VariantSpec {
                    head_dim: 96,
                    ..llama()
                },
                SpecField::HeadDim,
            ),
            (
                VariantSpec {
                    group_size: 3,
                    ..llama()
                },
                SpecField::GroupSize,
            ),
            (
                VariantSpec {
                    selector: Selector::DoubleSparse { channels: 8 },
                    ..llama()
                },
                SpecField::Selector,
            ),
        ] {
            assert_eq!(
                spec.validate().unwrap_err().field(),
                Some(field),
                "{spec:?}"
            );
        }
        assert!(VariantSpec::from_name("ps16_hd128_f16_g4_hnd_quest").is_err());
        assert!(VariantSpec::from_name("ps16_hd128_f32_g4_hnd_quest_topp").is_err());
        assert!(VariantSpec::from_name("ps16_hd128_f16_g4_hnd_ds_topp").is_err());
    }

    /// Every combination of in-range values and a few out-of-range ones.
    pub(crate) fn all_specs() -> Vec<VariantSpec> {
        let mut out = Vec::new();
        for page_size in PAGE_SIZES {
            for head_dim in HEAD_DIMS {
                for dtype in [Dtype::F16, Dtype::Bf16] {
                    for group_size in GROUP_SIZES {
                        for kv_layout in [KvLayout::Nhd, KvLayout::Hnd] {
                            for selector in [
                                Selector::Full,
                                Selector::Quest,
                                Selector::DoubleSparse { channels: 16 },
                                Selector::DoubleSparse { channels: 32 },
                                Selector::DoubleSparse { channels: 64 },
                            ] {
                                for pruning in [Pruning::None, Pruning::TopP] {
                                    out.push(VariantSpec {
                                        page_size,
                                        head_dim,
                                        dtype,
                                        group_size,
                                        kv_layout,
                                        selector,
                                        pruning,
                                    });
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

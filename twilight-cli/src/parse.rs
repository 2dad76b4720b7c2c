//! Values of command-line flags. Variant fields are read by twilight-jit's own parser of
//! declarations, so a flag accepts exactly what `#[twilight_kernel(...)]` and `key=value` specs
//! do, and the CLI spells no value by hand. Every function is a clap `value_parser`.

use twilight::calibration::CalibrationMode;
use twilight::twilight_jit::spec::{parse_value, FieldValue, SpecField};
use twilight::{Dtype, KvLayout, PruneBlocks, Pruning, SelectionKernel, Selector};
use twilight_synth::generator::Preset;

fn field(field: SpecField, text: &str) -> Result<FieldValue, String> {
    parse_value(field, text.trim()).map_err(|e| e.to_string())
}

fn unexpected(text: &str, field: SpecField, value: FieldValue) -> String {
    format!("`{text}` parsed as {value:?}, not a value of `{field}`")
}

/// `f16` or `bf16`.
pub fn dtype(text: &str) -> Result<Dtype, String> {
    match field(SpecField::Dtype, text)? {
        FieldValue::Dtype(dtype) => Ok(dtype),
        other => Err(unexpected(text, SpecField::Dtype, other)),
    }
}

/// `hnd` or `nhd`.
pub fn layout(text: &str) -> Result<KvLayout, String> {
    match field(SpecField::KvLayout, text)? {
        FieldValue::KvLayout(layout) => Ok(layout),
        other => Err(unexpected(text, SpecField::KvLayout, other)),
    }
}

/// `quest`, `full` or `double_sparse(r)`; `double_sparse` alone means `double_sparse(16)`.
/// Whether r is one of 16, 32, 64 and below head_dim is checked with the whole variant
/// (`VariantSpec::validate`).
pub fn selector(text: &str) -> Result<Selector, String> {
    let text = match text.trim() {
        "double_sparse" => "double_sparse(16)",
        other => other,
    };
    match field(SpecField::Selector, text)? {
        FieldValue::Selector(selector) => Ok(selector),
        other => Err(unexpected(text, SpecField::Selector, other)),
    }
}

/// `top_p` or `none`.
pub fn pruning(text: &str) -> Result<Pruning, String> {
    match field(SpecField::Pruning, text)? {
        FieldValue::Pruning(pruning) => Ok(pruning),
        other => Err(unexpected(text, SpecField::Pruning, other)),
    }
}

/// A top-k selection kernel: `auto` (the decoder's choice per step), `passes` (radix passes
/// only) or `registers` (the register kernel).
pub fn selection_kernel(text: &str) -> Result<SelectionKernel, String> {
    match text.trim() {
        "auto" => Ok(SelectionKernel::Auto),
        "passes" => Ok(SelectionKernel::RadixPasses),
        "registers" => Ok(SelectionKernel::InRegisters),
        other => Err(format!(
            "`{other}` is not a selection kernel: auto, passes or registers"
        )),
    }
}

/// Blocks of top-p's threshold and compaction: `auto`, `large` or `small`.
pub fn prune_blocks(text: &str) -> Result<PruneBlocks, String> {
    match text.trim() {
        "auto" => Ok(PruneBlocks::Auto),
        "large" => Ok(PruneBlocks::Large),
        "small" => Ok(PruneBlocks::Small),
        other => Err(format!(
            "`{other}` is not a choice of pruning blocks: auto, large or small"
        )),
    }
}

/// An attention preset of the generator: `default`, `focused`, `diffuse` or `uniform`.
pub fn preset(text: &str) -> Result<Preset, String> {
    text.trim()
        .parse()
        .map_err(|e: twilight_synth::Error| e.to_string())
}

/// A calibration mode of Double Sparsity's channel configs.
pub fn calibration_mode(text: &str) -> Result<CalibrationMode, String> {
    text.trim()
        .parse()
        .map_err(|e: twilight::Error| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_blocks_read_by_name_and_refuse_others() {
        assert_eq!(prune_blocks("auto"), Ok(PruneBlocks::Auto));
        assert_eq!(prune_blocks(" small"), Ok(PruneBlocks::Small));
        assert_eq!(prune_blocks("large"), Ok(PruneBlocks::Large));
        assert!(prune_blocks("tiny")
            .unwrap_err()
            .contains("auto, large or small"));
    }

    #[test]
    fn selection_kernels_read_by_name_and_refuse_others() {
        assert_eq!(selection_kernel("auto"), Ok(SelectionKernel::Auto));
        assert_eq!(
            selection_kernel(" passes"),
            Ok(SelectionKernel::RadixPasses)
        );
        assert_eq!(
            selection_kernel("registers"),
            Ok(SelectionKernel::InRegisters)
        );
        assert!(selection_kernel("radix")
            .unwrap_err()
            .contains("auto, passes or registers"));
    }

    #[test]
    fn every_value_reads_back_from_its_declaration_spelling() {
        for d in [Dtype::F16, Dtype::Bf16] {
            assert_eq!(dtype(d.short()), Ok(d));
        }
        for l in [KvLayout::Hnd, KvLayout::Nhd] {
            assert_eq!(layout(l.short()), Ok(l));
        }
        for s in [
            Selector::Full,
            Selector::Quest,
            Selector::DoubleSparse { channels: 32 },
        ] {
            assert_eq!(selector(&s.declared()), Ok(s));
        }
        for p in [Pruning::TopP, Pruning::None] {
            assert_eq!(pruning(p.declared()), Ok(p));
        }
        assert_eq!(
            selector("double_sparse"),
            Ok(Selector::DoubleSparse { channels: 16 })
        );
        assert_eq!(preset("focused"), Ok(Preset::Focused));
    }

    #[test]
    fn bad_values_say_what_is_expected() {
        assert!(dtype("fp16").unwrap_err().contains("`f16` or `bf16`"));
        assert!(layout("HND").unwrap_err().contains("`nhd` or `hnd`"));
        assert!(selector("topk").unwrap_err().contains("double_sparse(r)"));
        assert!(pruning("top-p").unwrap_err().contains("`top_p` or `none`"));
        assert!(preset("peaky").is_err());
        assert!(calibration_mode("kq").is_err());
    }
}

//! A variant's identity: every field of a spec is spelled in its canonical name and reaches the
//! cache key (through the rendered source), and so does the target. The key half needs NVRTC
//! (its version is hashed) but no GPU; it is skipped with a printed reason where NVRTC is
//! absent, unless `TWILIGHT_REQUIRE_NVRTC=1`.

mod common;

use std::collections::HashSet;

use twilight_jit::cache::key_of;
use twilight_jit::key::CacheKey;
use twilight_jit::render::{render_with, TemplateSource};
use twilight_jit::{
    Dtype, KvLayout, Pruning, RenderError, RenderedProgram, Selector, SpecField, Target,
    VariantSpec,
};

fn base() -> VariantSpec {
    VariantSpec::dense(16, 128, Dtype::F16, 4, KvLayout::Hnd)
}

/// `base()` with one field changed to another valid value, for every field.
fn single_field_changes() -> Vec<(SpecField, VariantSpec)> {
    let b = base();
    let changes: Vec<(SpecField, VariantSpec)> = SpecField::ALL
        .into_iter()
        .map(|field| {
            let spec = match field {
                SpecField::PageSize => VariantSpec { page_size: 32, ..b },
                SpecField::HeadDim => VariantSpec { head_dim: 64, ..b },
                SpecField::Dtype => VariantSpec {
                    dtype: Dtype::Bf16,
                    ..b
                },
                SpecField::GroupSize => VariantSpec { group_size: 8, ..b },
                SpecField::KvLayout => VariantSpec {
                    kv_layout: KvLayout::Nhd,
                    ..b
                },
                SpecField::Selector => VariantSpec {
                    selector: Selector::Quest,
                    ..b
                },
                SpecField::Pruning => VariantSpec {
                    pruning: Pruning::TopP,
                    ..b
                },
            };
            (field, spec)
        })
        .collect();
    assert_eq!(changes.len(), 7, "VariantSpec has 7 fields");
    changes
}

fn render(spec: &VariantSpec) -> Result<RenderedProgram, RenderError> {
    render_with(spec, &TemplateSource::Embedded)
}

fn target(arch: &str) -> Target {
    Target::parse(arch).unwrap_or_else(|| panic!("{arch} does not parse"))
}

fn key(program: &RenderedProgram, target: &Target) -> CacheKey {
    key_of(program, target).unwrap_or_else(|e| panic!("key_of({}): {e}", program.spec))
}

#[test]
fn every_field_changes_the_name() {
    let b = base();
    b.validate().unwrap();
    let base_parts: Vec<String> = b.name().split('_').map(str::to_owned).collect();
    assert_eq!(base_parts.len(), SpecField::ALL.len());
    let mut names = HashSet::from([b.name()]);
    for (i, (field, spec)) in single_field_changes().into_iter().enumerate() {
        assert_eq!(field, SpecField::ALL[i]);
        spec.validate()
            .unwrap_or_else(|e| panic!("{field}: {spec:?} is invalid: {e}"));
        assert_ne!(spec, b, "changing {field} left the spec equal");
        let name = spec.name();
        assert_ne!(name, b.name(), "changing {field} left the name unchanged");
        // Exactly the part that spells this field changed ...
        let parts: Vec<&str> = name.split('_').collect();
        let changed: Vec<usize> = (0..parts.len())
            .filter(|&p| parts[p] != base_parts[p])
            .collect();
        assert_eq!(changed, vec![i], "{field}: {} -> {name}", b.name());
        // ... and the name still reads back as this spec.
        assert_eq!(VariantSpec::from_name(&name), Ok(spec), "{name}");
        assert!(names.insert(name), "{field}: name collides with another");
    }
}

#[test]
fn every_field_changes_the_source_and_the_key() {
    let base_program = render(&base()).expect("the base spec is dense and renders");
    let with_nvrtc = common::nvrtc_or_skip("the cache-key half").is_some();
    let sm90 = target("sm_90");
    let base_key = with_nvrtc.then(|| key(&base_program, &sm90));

    let mut keys: HashSet<CacheKey> = base_key.into_iter().collect();
    let mut compared = Vec::new();
    for (field, spec) in single_field_changes() {
        let program =
            render(&spec).unwrap_or_else(|e| panic!("{field}: {spec} does not render: {e}"));
        assert!(
            program.source != base_program.source,
            "changing {field} left the rendered source unchanged"
        );
        if let Some(base_key) = base_key {
            let k = key(&program, &sm90);
            assert_ne!(k, base_key, "changing {field} left the cache key unchanged");
            assert!(keys.insert(k), "{field}: key collides with another change");
        }
        compared.push(field);
    }
    for field in SpecField::ALL {
        assert!(compared.contains(&field), "{field} was not compared");
    }
}

#[test]
fn target_changes_the_key_and_key_of_is_stable() {
    if common::nvrtc_or_skip("target keys").is_none() {
        return;
    }
    let program = render(&base()).unwrap();
    let sm90 = key(&program, &target("sm_90"));
    assert_eq!(
        sm90,
        key(&program, &target("sm_90")),
        "key_of is not stable"
    );
    // A second render of the same spec has the same key.
    assert_eq!(sm90, key(&render(&base()).unwrap(), &target("sm_90")));

    let others = [
        ("sm_80", key(&program, &target("sm_80"))),
        ("compute_90 (PTX)", key(&program, &target("compute_90"))),
        ("sm_89", key(&program, &target("sm_89"))),
        ("sm_100", key(&program, &target("sm_100"))),
    ];
    let mut seen = HashSet::from([sm90]);
    for (what, k) in others {
        assert_ne!(k, sm90, "{what} has the key of sm_90");
        assert!(seen.insert(k), "{what} shares a key with another target");
    }
    // The key spells as 64 lowercase hex characters, the disk cache's file stem.
    assert_eq!(CacheKey::from_hex(&sm90.hex()), Some(sm90));
}

#[test]
fn the_key_covers_the_source_byte_for_byte() {
    if common::nvrtc_or_skip("source keys").is_none() {
        return;
    }
    let program = render(&base()).unwrap();
    let sm90 = target("sm_90");
    let mut edited = program.clone();
    edited.source.push(' ');
    assert_ne!(key(&program, &sm90), key(&edited, &sm90));
}

//! NVRTC compile of every snapshot variant. Needs no GPU: skipped with a printed reason where
//! NVRTC is absent, unless `TWILIGHT_REQUIRE_NVRTC=1` (CI) makes that a failure.

mod variants;

use twilight_jit::nvrtc::{compile, nvrtc, Target};

/// NVRTC, or `None` (with the reason printed) where it is absent and not required.
fn nvrtc_or_skip() -> Option<&'static twilight_jit::nvrtc::NvrtcInfo> {
    match nvrtc() {
        Ok(info) => Some(info),
        Err(e) if std::env::var("TWILIGHT_REQUIRE_NVRTC").as_deref() != Ok("1") => {
            eprintln!(
                "SKIPPED: NVRTC not available ({e}); set TWILIGHT_REQUIRE_NVRTC=1 to fail instead"
            );
            None
        }
        Err(e) => panic!("TWILIGHT_REQUIRE_NVRTC=1 but NVRTC is unusable: {e}"),
    }
}

#[test]
fn every_snapshot_variant_compiles_to_cubin_for_sm90() {
    let Some(info) = nvrtc_or_skip() else {
        return;
    };
    eprintln!(
        "NVRTC {}.{} from {:?}",
        info.version.0, info.version.1, info.lib_dir
    );
    let target = Target::parse("sm_90").unwrap();
    let programs: Vec<_> = variants::snapshot_variants()
        .iter()
        .map(|spec| twilight_jit::render(spec).unwrap())
        .collect();
    // NVRTC is thread-safe: compile two at a time to halve the wall time on CI's 2 cores.
    std::thread::scope(|scope| {
        let handles: Vec<_> = programs
            .chunks(programs.len().div_ceil(2))
            .map(|chunk| {
                scope.spawn(move || {
                    for program in chunk {
                        let out = compile(program, &target).unwrap_or_else(|e| panic!("{e}"));
                        assert!(out.binary.len() > 1000, "{}: tiny CUBIN", program.spec);
                        // An ELF image, with every stage's entry symbol in it.
                        assert_eq!(&out.binary[..4], b"\x7fELF");
                        for stage in &program.stages {
                            let entry = program.entry(*stage);
                            assert!(
                                out.binary
                                    .windows(entry.len())
                                    .any(|w| w == entry.as_bytes()),
                                "{entry} missing from the CUBIN"
                            );
                        }
                        eprintln!("compiled {} in {:?}", program.spec, out.duration);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });
}

#[test]
fn ptx_target_yields_ptx_text() {
    if nvrtc_or_skip().is_none() {
        return;
    }
    let program = twilight_jit::render(&variants::snapshot_variants()[0]).unwrap();
    let out = compile(&program, &Target::parse("compute_90").unwrap()).unwrap();
    let text = String::from_utf8_lossy(&out.binary);
    assert!(
        text.contains(".target sm_90"),
        "{}",
        &text[..200.min(text.len())]
    );
    assert_eq!(out.binary.last(), Some(&0));
}

/// The C++ twin of a parameter struct is checked against the Rust layout when the program
/// compiles: a field whose C++ type differs from its Rust field fails, naming the field.
#[test]
fn a_parameter_struct_that_differs_from_rust_fails_the_compile() {
    if nvrtc_or_skip().is_none() {
        return;
    }
    let spec: twilight_jit::VariantSpec = "ps16_hd128_f16_g4_hnd_quest_topp".parse().unwrap();
    let mut program = twilight_jit::render(&spec).unwrap();
    let field = "  int max_pages;";
    assert_eq!(program.source.matches(field).count(), 2, "{}", program.glue);
    program.source = program.source.replacen(field, "  long long max_pages;", 1);
    let err = compile(&program, &Target::parse("sm_90").unwrap())
        .expect_err("a wider field must not compile")
        .to_string();
    assert!(err.contains("tw_quest_score_params.max_pages"), "{err}");
}

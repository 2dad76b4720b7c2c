//! NVRTC compile of every snapshot variant. Needs no GPU: skipped with a printed reason where
//! NVRTC is absent, unless `TWILIGHT_REQUIRE_NVRTC=1` (CI) makes that a failure.

mod variants;

use twilight_jit::nvrtc::{compile, nvrtc, Target};

#[test]
fn every_snapshot_variant_compiles_to_cubin_for_sm90() {
    let info = match nvrtc() {
        Ok(info) => info,
        Err(e) if std::env::var("TWILIGHT_REQUIRE_NVRTC").as_deref() != Ok("1") => {
            eprintln!(
                "SKIPPED: NVRTC not available ({e}); set TWILIGHT_REQUIRE_NVRTC=1 to fail instead"
            );
            return;
        }
        Err(e) => panic!("TWILIGHT_REQUIRE_NVRTC=1 but NVRTC is unusable: {e}"),
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
    if nvrtc().is_err() {
        eprintln!("SKIPPED: NVRTC not available");
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

//! Every kind of `#[twilight_kernel(...)]` mistake is a compile error pointing at the argument to
//! blame (`tests/ui/fail_*.rs` and their `.stderr` goldens), and valid declarations compile
//! (`tests/ui/pass_*.rs`). Regenerate the goldens with `TRYBUILD=overwrite cargo test --test macro_ui`
//! and read every one.

#[test]
fn twilight_kernel_ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass_*.rs");
    t.compile_fail("tests/ui/fail_*.rs");
}

//! Shared by the integration tests that need NVRTC (no GPU): the skip rule.

use twilight_jit::nvrtc::{nvrtc, NvrtcInfo};

/// NVRTC when it is usable here. Without it, prints why the caller skips (`what`) and returns
/// `None`, unless `TWILIGHT_REQUIRE_NVRTC=1` (CI) makes a missing NVRTC a failure.
pub fn nvrtc_or_skip(what: &str) -> Option<&'static NvrtcInfo> {
    match nvrtc() {
        Ok(info) => Some(info),
        Err(e) if std::env::var("TWILIGHT_REQUIRE_NVRTC").as_deref() != Ok("1") => {
            eprintln!(
                "SKIPPED {what}: NVRTC not available ({e}); set TWILIGHT_REQUIRE_NVRTC=1 to fail instead"
            );
            None
        }
        Err(e) => panic!("TWILIGHT_REQUIRE_NVRTC=1 but NVRTC is unusable: {e}"),
    }
}

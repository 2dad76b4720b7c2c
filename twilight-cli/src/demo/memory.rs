//! How much memory a demo shape needs, checked before anything is allocated: a shape that would
//! not fit is refused with the estimate and the limit it broke, instead of aborting the process
//! partway through generating the cache (or wrapping a size and panicking).
//!
//! The estimate counts the big buffers, from the largest shape the flags allow (every request
//! at `--max-len`): host K and V as f32 (the generator's copy and the one the step's cache is
//! read back into or derived from, and the dump's encoded copy), the exact weights of the
//! oracle, and on the device K and V in the dtype, every derived structure of the variant, the
//! appended rows and the step's lists. It is meant to be right within a small factor, which is
//! all a guard against a typo of a few orders of magnitude needs.

use twilight::{Pruning, Selector, VariantSpec};
use twilight_synth::synthetic::SPARE_PAGES;

const GIB: f64 = (1u64 << 30) as f64;

/// Bytes a demo run needs on the host and on the device.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Estimate {
    pub host: f64,
    pub device: f64,
    pub pages: usize,
}

/// The shape a run asks for, as the flags give it.
pub(super) struct Request {
    pub spec: VariantSpec,
    pub batch: usize,
    pub max_len: usize,
    pub kv_heads: usize,
}

/// The estimate for a request, or why the shape cannot exist at all (more than 2^31 token
/// slots, which the kernels' 32-bit slot ids cannot address).
pub(super) fn estimate(r: &Request) -> Result<Estimate, String> {
    let ps = r.spec.page_size as usize;
    let d = r.spec.head_dim as usize;
    let too_big = || {
        format!(
            "--batch {} x --max-len {} in pages of {ps} needs more than 2^31 token slots, beyond \
             the kernels' 32-bit slot ids",
            r.batch, r.max_len
        )
    };
    let pages = r
        .batch
        .checked_mul(r.max_len.div_ceil(ps.max(1)))
        .and_then(|p| p.checked_add(SPARE_PAGES))
        .ok_or_else(too_big)?;
    let slots = pages.checked_mul(ps).ok_or_else(too_big)?;
    if slots > i32::MAX as usize {
        return Err(too_big());
    }
    // From here on every count fits in 2^31 * heads * head_dim: f64 holds them with room.
    let (slots, kv, d) = (slots as f64, r.kv_heads as f64, d as f64);
    let qo = kv * r.spec.group_size as f64;
    let rows = slots * kv;
    let elements = rows * d;
    let (batch, max_len) = (r.batch as f64, r.max_len as f64);
    let host = 4.0 * elements * 4.0 + 2.0 * elements * 2.0 + batch * qo * max_len * 16.0;
    let mut device = 2.0 * elements * 2.0 + 2.0 * max_len * kv * d * 2.0;
    if r.spec.pruning == Pruning::TopP {
        device += elements / 2.0 + rows * 4.0 + batch * qo * max_len.min(slots) * 8.0;
    }
    match r.spec.selector {
        Selector::Quest => device += 2.0 * (pages as f64) * kv * d * 2.0,
        Selector::DoubleSparse { channels } => device += rows * channels as f64 * 2.0,
        Selector::Full => {}
    }
    device += batch * kv * max_len * 8.0;
    Ok(Estimate {
        host,
        device,
        pages,
    })
}

/// The host limit: `--max-gib`, else 80% of the memory the kernel reports available (16 GiB
/// where it cannot be read).
pub(super) fn host_limit(max_gib: Option<f64>) -> (f64, String) {
    if let Some(g) = max_gib {
        return (g * GIB, format!("--max-gib {g}"));
    }
    match mem_available() {
        Some(bytes) => (
            0.8 * bytes,
            format!("80% of the {:.1} GiB of host memory available", bytes / GIB),
        ),
        None => (16.0 * GIB, "16 GiB (available memory unknown)".into()),
    }
}

/// The device limit: `--max-gib`, else 90% of the device's free memory.
pub(super) fn device_limit(max_gib: Option<f64>, free: f64) -> (f64, String) {
    match max_gib {
        Some(g) => (
            (g * GIB).min(free),
            format!("--max-gib {g} or the device's free memory"),
        ),
        None => (
            0.9 * free,
            format!("90% of the device's {:.1} GiB free", free / GIB),
        ),
    }
}

/// Refuses an estimate above its limit, naming both.
pub(super) fn check(what: &str, need: f64, (limit, why): (f64, String)) -> Result<(), String> {
    if need <= limit {
        return Ok(());
    }
    Err(format!(
        "this shape needs about {:.2} GiB of {what} memory, above the limit of {:.2} GiB ({why}); \
         lower --batch or --max-len, or raise --max-gib",
        need / GIB,
        limit / GIB
    ))
}

fn mem_available() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(batch: usize, max_len: usize) -> Request {
        Request {
            spec: "ps16_hd128_f16_g4_hnd_quest_topp".parse().unwrap(),
            batch,
            max_len,
            kv_heads: 8,
        }
    }

    #[test]
    fn the_default_demo_is_small_and_huge_shapes_are_refused_not_wrapped() {
        let e = estimate(&request(4, 8192)).unwrap();
        assert!(e.host < 2.0 * GIB && e.device < 1.0 * GIB, "{e:?}");
        for (batch, len) in [
            (1, 34_359_738_368),
            (usize::MAX, 8192),
            (usize::MAX, usize::MAX),
            (100_000_000, 8192),
        ] {
            assert!(estimate(&request(batch, len)).is_err(), "{batch} x {len}");
        }
        // Addressable, but far too big for any machine's host memory.
        let e = estimate(&request(1, 100_000_000)).unwrap();
        assert!(check("host", e.host, (64.0 * GIB, "a test".into())).is_err());
        let msg = check("host", e.host, (GIB, "a test".into())).unwrap_err();
        assert!(
            msg.contains("GiB of host memory") && msg.contains("a test"),
            "{msg}"
        );
    }
}

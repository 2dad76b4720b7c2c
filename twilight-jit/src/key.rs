//! The cache key of a compiled kernel: a SHA-256 over an explicit, versioned serialization of
//! everything that changes the binary NVRTC produces.
//!
//! What goes in, in this order (every integer little-endian, every string as a `u64` byte length
//! followed by its UTF-8 bytes):
//!
//! 1. the domain tag `"twilight-kernel-key"` (length-prefixed), so that no other sha256 in the
//!    project can collide with a key by construction;
//! 2. [`CACHE_FORMAT`] as a `u32`;
//! 3. the rendered CUDA source;
//! 4. the number of NVRTC options as a `u64`, then each option, in the order given (order
//!    matters to NVRTC, so it matters here);
//! 5. the target (`sm_90` for a CUBIN, `compute_90` for PTX);
//! 6. the NVRTC version, major then minor, each an `i32`;
//! 7. the crate version.
//!
//! Length prefixes make the serialization injective: `["a", "bc"]` and `["ab", "c"]` differ.
//! `std::hash::Hash` is never used: its output is not stable across Rust releases or platforms,
//! and the key names files on disk. A golden test pins the serialization; changing it on purpose
//! means bumping [`CACHE_FORMAT`] and the golden value together.

use std::fmt;

use sha2::{Digest, Sha256};

/// Bumped whenever the on-disk entry format or the key's serialization changes.
pub const CACHE_FORMAT: u32 = 1;

/// Domain separation tag, the first thing hashed.
const DOMAIN_TAG: &str = "twilight-kernel-key";

/// The 32-byte identity of one compiled kernel binary. Its canonical spelling, used in file names
/// and logs, is 64 lowercase hex characters ([`CacheKey::hex`], and `Display`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct CacheKey([u8; 32]);

/// Everything that determines the compiled binary of a kernel.
#[derive(Clone, Copy, Debug)]
pub struct KeyInputs<'a> {
    /// The rendered CUDA source, one self-contained translation unit.
    pub source: &'a str,
    /// NVRTC options, in the order they are passed.
    pub options: &'a [String],
    /// `sm_XY` for a CUBIN, `compute_XY` for PTX.
    pub target: &'a str,
    /// `(major, minor)` as reported by `nvrtcVersion`.
    pub nvrtc_version: (i32, i32),
    /// The caller passes `env!("CARGO_PKG_VERSION")`.
    pub crate_version: &'a str,
}

/// Feeds one length-prefixed byte string to the hasher.
fn put_bytes(hasher: &mut Sha256, bytes: &[u8]) {
    hasher.update((bytes.len() as u64).to_le_bytes());
    hasher.update(bytes);
}

impl CacheKey {
    /// The key of `inputs`; see the module doc for the exact serialization.
    pub fn compute(inputs: &KeyInputs) -> CacheKey {
        // Destructured so that a new input does not compile until it is hashed.
        let KeyInputs {
            source,
            options,
            target,
            nvrtc_version: (nvrtc_major, nvrtc_minor),
            crate_version,
        } = *inputs;

        let mut hasher = Sha256::new();
        put_bytes(&mut hasher, DOMAIN_TAG.as_bytes());
        hasher.update(CACHE_FORMAT.to_le_bytes());
        put_bytes(&mut hasher, source.as_bytes());
        hasher.update((options.len() as u64).to_le_bytes());
        for option in options {
            put_bytes(&mut hasher, option.as_bytes());
        }
        put_bytes(&mut hasher, target.as_bytes());
        hasher.update(nvrtc_major.to_le_bytes());
        hasher.update(nvrtc_minor.to_le_bytes());
        put_bytes(&mut hasher, crate_version.as_bytes());
        CacheKey(hasher.finalize().into())
    }

    /// Wraps 32 raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> CacheKey {
        CacheKey(bytes)
    }

    /// The 32 raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// 64 lowercase hex characters.
    pub fn hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(64);
        for byte in self.0 {
            out.push(char::from(DIGITS[usize::from(byte >> 4)]));
            out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
        }
        out
    }

    /// Reads back [`CacheKey::hex`]. Only the canonical spelling is accepted (exactly 64
    /// lowercase hex characters), so that one key has one file name.
    pub fn from_hex(s: &str) -> Option<CacheKey> {
        fn nibble(c: u8) -> Option<u8> {
            match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                _ => None,
            }
        }
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut key = [0u8; 32];
        for (out, pair) in key.iter_mut().zip(bytes.chunks_exact(2)) {
            *out = (nibble(pair[0])? << 4) | nibble(pair[1])?;
        }
        Some(CacheKey(key))
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> Vec<String> {
        vec![
            "--std=c++17".to_string(),
            "-arch=sm_90".to_string(),
            "-default-device".to_string(),
        ]
    }

    fn key_with<'a>(edit: impl FnOnce(&mut KeyInputs<'a>)) -> CacheKey {
        // Leaked so that an edit may swap in options of any lifetime; a few bytes per test.
        let options: &'static [String] = Box::leak(options().into_boxed_slice());
        let mut inputs = KeyInputs {
            source: "extern \"C\" __global__ void k() {}\n",
            options,
            target: "sm_90",
            nvrtc_version: (13, 0),
            crate_version: "0.1.0",
        };
        edit(&mut inputs);
        CacheKey::compute(&inputs)
    }

    #[test]
    fn same_inputs_same_key() {
        assert_eq!(key_with(|_| {}), key_with(|_| {}));
    }

    #[test]
    fn every_input_changes_the_key() {
        let base = key_with(|_| {});
        let edited_options: Vec<Vec<String>> = (0..options().len())
            .map(|i| {
                let mut o = options();
                o[i].push('x');
                o
            })
            .collect();
        let mut reordered = options();
        reordered.swap(0, 1);
        let mut fewer = options();
        fewer.pop();
        let mut more = options();
        more.push(String::new());

        let mut variants: Vec<(String, CacheKey)> = vec![
            ("source".into(), key_with(|k| k.source = "// other\n")),
            ("target".into(), key_with(|k| k.target = "compute_90")),
            (
                "nvrtc major".into(),
                key_with(|k| k.nvrtc_version = (12, 0)),
            ),
            (
                "nvrtc minor".into(),
                key_with(|k| k.nvrtc_version = (13, 1)),
            ),
            (
                "crate version".into(),
                key_with(|k| k.crate_version = "0.1.1"),
            ),
            ("option order".into(), key_with(|k| k.options = &reordered)),
            ("fewer options".into(), key_with(|k| k.options = &fewer)),
            ("empty option added".into(), key_with(|k| k.options = &more)),
        ];
        for (i, o) in edited_options.iter().enumerate() {
            variants.push((format!("option {i}"), key_with(|k| k.options = o)));
        }
        for (what, key) in &variants {
            assert_ne!(*key, base, "changing the {what} left the key unchanged");
        }
        // And no two edits collide with each other.
        for (i, (a, ka)) in variants.iter().enumerate() {
            for (b, kb) in &variants[i + 1..] {
                assert_ne!(ka, kb, "editing {a} and editing {b} gave one key");
            }
        }
    }

    #[test]
    fn length_prefix_separates_fields() {
        let split_a = ["a".to_string(), "bc".to_string()];
        let split_b = ["ab".to_string(), "c".to_string()];
        assert_ne!(
            key_with(|k| k.options = &split_a),
            key_with(|k| k.options = &split_b)
        );
        // A byte moved from the source into the target must not give the same stream.
        assert_ne!(
            key_with(|k| {
                k.source = "ab";
                k.target = "c";
            }),
            key_with(|k| {
                k.source = "a";
                k.target = "bc";
            })
        );
    }

    #[test]
    fn hex_round_trip() {
        let key = key_with(|_| {});
        let hex = key.hex();
        assert_eq!(hex.len(), 64);
        assert!(hex
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
        assert_eq!(key.to_string(), hex);
        assert_eq!(CacheKey::from_hex(&hex), Some(key));

        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37).wrapping_add(0xa5);
        }
        let raw = CacheKey::from_bytes(bytes);
        assert_eq!(CacheKey::from_hex(&raw.hex()), Some(raw));
        assert_eq!(raw.as_bytes(), &bytes);
    }

    #[test]
    fn from_hex_rejects_non_canonical() {
        let hex = key_with(|_| {}).hex();
        assert_eq!(CacheKey::from_hex(&hex[..63]), None);
        assert_eq!(CacheKey::from_hex(&format!("{hex}0")), None);
        assert_eq!(CacheKey::from_hex(&hex.to_uppercase()), None);
        assert_eq!(CacheKey::from_hex(&format!("g{}", &hex[1..])), None);
        assert_eq!(CacheKey::from_hex(""), None);
        // 64 bytes but not 64 characters.
        assert_eq!(CacheKey::from_hex(&format!("é{}", &hex[2..])), None);
    }

    /// Pins the serialization. If this fails, the key of every cached kernel changed: if that was
    /// intended, bump `CACHE_FORMAT` and update this value; if not, undo the change.
    #[test]
    fn golden_key() {
        let options = vec!["--std=c++17".to_string(), "-arch=sm_90".to_string()];
        let key = CacheKey::compute(&KeyInputs {
            source: "extern \"C\" __global__ void twilight_golden() {}\n",
            options: &options,
            target: "sm_90",
            nvrtc_version: (13, 0),
            crate_version: "0.1.0",
        });
        assert_eq!(
            key.hex(),
            "5aed6f36714838d918a663ea030b93cf4bec28cf124a18f049fbf776560b562e"
        );
    }
}

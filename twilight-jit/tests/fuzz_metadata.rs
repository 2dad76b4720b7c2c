//! Generated metadata files for the disk cache: arbitrary bytes, and valid metadata with one
//! field, one byte or one stretch of bytes changed, written over a real entry's metadata in a
//! cache directory of this user (mode 0700). Whatever the file holds, `get` and `list` answer
//! without panicking, and a metadata file that does not describe the entry's binary is a miss:
//! `get` returns the stored binary or nothing, never anything else, and returns it only when
//! the fields it verifies (format, key, checksum, length, variant) are the stored ones.
//!
//! The entry is written once per property and only its metadata is rewritten per case, so the
//! few thousand cases take a few seconds.

#![cfg(feature = "cuda")]

use std::cell::Cell;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Map, Value};
use twilight_jit::disk_cache::{BinaryKind, DiskCache, EntryMeta};
use twilight_jit::key::{CacheKey, KeyInputs, CACHE_FORMAT};

const VARIANT: &str = "ps16_hd128_f16_g4_hnd_quest_topp";

/// One cache directory holding one committed entry, and what its metadata said.
struct Fixture {
    _tmp: tempfile::TempDir,
    cache: DiskCache,
    key: CacheKey,
    binary: Vec<u8>,
    meta_path: PathBuf,
    original: Vec<u8>,
    fields: Map<String, Value>,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let options = vec!["-arch=sm_90".to_string()];
        let key = CacheKey::compute(&KeyInputs {
            source: "extern \"C\" __global__ void k() {}\n",
            options: &options,
            target: "sm_90",
            nvrtc_version: (13, 0),
            crate_version: env!("CARGO_PKG_VERSION"),
        });
        let binary: Vec<u8> = (0..700u32).map(|i| (i * 31 % 251) as u8).collect();
        let meta = EntryMeta {
            variant: VARIANT.to_string(),
            target: "sm_90".to_string(),
            kind: BinaryKind::Cubin,
            nvrtc_version: (13, 0),
            options,
        };
        let cache = DiskCache::open(Some(tmp.path().to_path_buf()), None);
        cache.put(&key, &meta, &binary).unwrap();
        let meta_path = tmp
            .path()
            .join(format!("v{CACHE_FORMAT}"))
            .join(VARIANT)
            .join(format!("{}.json", key.hex()));
        let original = fs::read(&meta_path).unwrap();
        let fields = match serde_json::from_slice(&original).unwrap() {
            Value::Object(fields) => fields,
            other => panic!("metadata is not an object: {other}"),
        };
        let fixture = Fixture {
            _tmp: tmp,
            cache,
            key,
            binary,
            meta_path,
            original,
            fields,
        };
        // The untouched entry is a hit and is listed: the properties below can fail.
        assert_eq!(fixture.get(), Some(fixture.binary.clone()));
        assert_eq!(fixture.cache.list().len(), 1);
        fixture
    }

    fn get(&self) -> Option<Vec<u8>> {
        self.cache.get(&self.key, VARIANT)
    }

    /// Whether `text` is metadata whose checked fields are those of the stored entry.
    fn describes_entry(&self, text: &[u8]) -> bool {
        let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(text) else {
            return false;
        };
        ["format", "key", "sha256", "len", "variant"]
            .iter()
            .all(|name| fields.get(*name) == self.fields.get(*name))
    }

    /// Writes `text` as the entry's metadata, then checks `get` and `list`.
    fn check(&self, text: &[u8]) -> Result<(), TestCaseError> {
        fs::write(&self.meta_path, text).unwrap();
        let got = self.get();
        if let Some(binary) = &got {
            prop_assert_eq!(binary, &self.binary, "a hit must be the stored binary");
            prop_assert!(
                self.describes_entry(text),
                "a hit from metadata that does not describe the entry: {}",
                String::from_utf8_lossy(text)
            );
        }
        if text == self.original.as_slice() {
            prop_assert_eq!(got.as_ref(), Some(&self.binary));
        }
        for entry in self.cache.list() {
            // Listed only when the recorded length is the binary's.
            prop_assert_eq!(entry.size, self.binary.len() as u64);
            prop_assert_eq!(entry.key, self.key);
        }
        Ok(())
    }
}

/// Any JSON value, small: what a field may be changed to.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop_oneof![
            Just(u64::MAX),
            Just(0u64),
            Just(1u64 << 40),
            Just(CACHE_FORMAT as u64 + 1)
        ]
        .prop_map(Value::from),
        any::<f64>()
            .prop_map(|x| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)),
        "[a-z0-9_\u{0}-\u{1f}é]{0,12}".prop_map(Value::from),
        Just(json!("cubin")),
        Just(json!("ptx")),
        Just(json!(VARIANT)),
        Just(json!("../../etc")),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A field name: one of the metadata's own, or another.
fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "format",
            "key",
            "sha256",
            "len",
            "variant",
            "target",
            "kind",
            "nvrtc_version",
            "options",
            "created",
        ])
        .prop_map(str::to_string),
        "[a-z_]{1,8}",
    ]
}

/// One change to valid metadata.
#[derive(Clone, Debug)]
enum Mutation {
    SetField(String, Value),
    RemoveField(String),
    /// Changes one character of a string field (a key or checksum one digit off).
    EditString(String, usize, char),
    FlipByte(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    /// Pads the text past the largest metadata file the reader accepts.
    Pad(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (field_name(), json_value()).prop_map(|(f, v)| Mutation::SetField(f, v)),
        1 => field_name().prop_map(Mutation::RemoveField),
        2 => (field_name(), any::<usize>(), prop::char::range('0', 'z'))
            .prop_map(|(f, at, c)| Mutation::EditString(f, at, c)),
        2 => (any::<usize>(), 1u8..=255).prop_map(|(at, mask)| Mutation::FlipByte(at, mask)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, b)| Mutation::Insert(at, b)),
        1 => (any::<usize>(), 1usize..16).prop_map(|(at, n)| Mutation::Delete(at, n)),
        1 => prop_oneof![Just(0usize), Just(64 * 1024), Just(70 * 1024)].prop_map(Mutation::Pad),
    ]
}

fn apply(fixture: &Fixture, mutations: &[Mutation]) -> Vec<u8> {
    let mut fields = fixture.fields.clone();
    let mut edits = Vec::new();
    for m in mutations {
        match m {
            Mutation::SetField(name, value) => {
                fields.insert(name.clone(), value.clone());
            }
            Mutation::RemoveField(name) => {
                fields.remove(name);
            }
            Mutation::EditString(name, at, c) => {
                if let Some(Value::String(s)) = fields.get_mut(name) {
                    let mut chars: Vec<char> = s.chars().collect();
                    if !chars.is_empty() {
                        let i = at % chars.len();
                        chars[i] = *c;
                        *s = chars.into_iter().collect();
                    }
                }
            }
            other => edits.push(other),
        }
    }
    let mut text = serde_json::to_vec_pretty(&Value::Object(fields)).unwrap();
    for m in edits {
        let len = text.len();
        match m {
            Mutation::FlipByte(at, mask) if len > 0 => text[at % len] ^= mask,
            Mutation::Truncate(at) => text.truncate(at % (len + 1)),
            Mutation::Insert(at, bytes) => {
                let at = at % (len + 1);
                text.splice(at..at, bytes.iter().copied());
            }
            Mutation::Delete(at, n) if len > 0 => {
                let at = at % len;
                text.drain(at..(at + n).min(len));
            }
            Mutation::Pad(n) => text.extend(std::iter::repeat_n(b' ', *n)),
            _ => {}
        }
    }
    text
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

#[test]
fn arbitrary_bytes_as_metadata_are_a_miss() {
    let fixture = Fixture::new();
    let bytes = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        // Text that starts like JSON gets further into the parser.
        prop::collection::vec(any::<u8>(), 0..300).prop_map(|mut b| {
            b.insert(0, b'{');
            b
        }),
    ];
    runner(1000)
        .run(&bytes, |text| {
            fixture.check(&text)?;
            // No arbitrary text describes the entry, so none of it is a hit.
            prop_assert_eq!(fixture.get(), None);
            Ok(())
        })
        .unwrap();
}

#[test]
fn mutated_metadata_is_a_miss_unless_it_still_describes_the_entry() {
    let fixture = Fixture::new();
    let mutations = prop::collection::vec(mutation(), 1..4);
    let (hits, misses) = (Cell::new(0), Cell::new(0));
    runner(2500)
        .run(&mutations, |mutations| {
            let text = apply(&fixture, &mutations);
            fixture.check(&text)?;
            let seen = if fixture.get().is_some() {
                &hits
            } else {
                &misses
            };
            seen.set(seen.get() + 1);
            Ok(())
        })
        .unwrap();
    // Both outcomes occur: changes to unchecked fields (the time, the options) keep the hit.
    assert!(
        hits.get() > 0 && misses.get() > 0,
        "{hits:?} hits, {misses:?} misses"
    );
    // The original text still gives the hit afterwards: nothing above damaged the binary.
    fixture.check(&fixture.original.clone()).unwrap();
    assert_eq!(fixture.get(), Some(fixture.binary.clone()));
}

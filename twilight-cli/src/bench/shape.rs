//! A benchmark's shape: the flags every `twilight bench` command takes, and the entries of
//! `bench/shapes.json` (the list `bench/peers.py` reads too).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use twilight::{Dtype, KvLayout, VariantSpec};

use crate::parse;

/// The shape and the timing knobs every benchmark takes.
#[derive(clap::Args, Debug)]
pub struct ShapeArgs {
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 32)]
    pub qo_heads: usize,
    #[arg(long, default_value_t = 8)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 128)]
    pub head_dim: u32,
    /// Tokens per request (all requests this long).
    #[arg(long, default_value_t = 32768)]
    pub len: usize,
    #[arg(long, default_value_t = 16)]
    pub page_size: u32,
    /// f16 or bf16.
    #[arg(long, default_value = "f16", value_parser = parse::dtype)]
    pub dtype: Dtype,
    /// hnd or nhd.
    #[arg(long, default_value = "hnd", value_parser = parse::layout)]
    pub layout: KvLayout,
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    #[arg(long, default_value_t = 100)]
    pub iters: usize,
    /// Size of the read-bandwidth probe in GiB.
    #[arg(long, default_value_t = 4.0)]
    pub probe_gib: f64,
    /// Also write the result as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Dense decode: give each request consecutive pages in order instead of shuffled ones
    /// (to separate the cost of scattered pages from the kernel's).
    #[arg(long)]
    pub pages_in_order: bool,
    /// Dense decode: also time the tensor-core attention with its split planned for these
    /// numbers of waves of blocks (comma-separated; the default plan is 1).
    #[arg(long, value_delimiter = ',')]
    pub waves: Vec<usize>,
}

impl ShapeArgs {
    /// The flags as a shape of the list, named `name`, with the sparse step's B0 and p.
    pub fn shape(&self, name: &str, budget: usize, p: f32) -> BenchShape {
        BenchShape {
            name: name.to_string(),
            batch: self.batch,
            qo_heads: self.qo_heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            len: self.len,
            page_size: self.page_size,
            dtype: self.dtype,
            layout: self.layout,
            budget,
            p,
        }
    }
}

/// One benchmark shape, as `bench/shapes.json` lists them. Dtype and layout are written in
/// their declaration spelling (`f16`, `hnd`), which the PyTorch peers read too.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchShape {
    pub name: String,
    pub batch: usize,
    pub qo_heads: usize,
    pub kv_heads: usize,
    pub head_dim: u32,
    pub len: usize,
    pub page_size: u32,
    #[serde(with = "spelled::dtype")]
    pub dtype: Dtype,
    #[serde(with = "spelled::layout", default = "default_layout")]
    pub layout: KvLayout,
    pub budget: usize,
    pub p: f32,
}

fn default_layout() -> KvLayout {
    KvLayout::Hnd
}

impl BenchShape {
    /// The dense (`full`/`none`) variant of the shape.
    ///
    /// # Errors
    /// Query heads that are not a multiple of the KV heads, or a spec that does not validate;
    /// the message names the shape.
    pub fn dense_spec(&self) -> Result<VariantSpec, String> {
        let group_size = match self.qo_heads.checked_rem(self.kv_heads) {
            Some(0) => u32::try_from(self.qo_heads / self.kv_heads).ok(),
            _ => None,
        }
        .ok_or_else(|| {
            format!(
                "{}: {} query heads are not a multiple of {} KV heads",
                self.name, self.qo_heads, self.kv_heads
            )
        })?;
        let spec = VariantSpec::dense(
            self.page_size,
            self.head_dim,
            self.dtype,
            group_size,
            self.layout,
        );
        spec.validate().map_err(|e| format!("{}: {e}", self.name))?;
        Ok(spec)
    }

    /// Bytes of K and V of one cache of this shape (saturating: [`BenchShape::check_size`]
    /// refuses a shape whose count overflows before anything uses it).
    pub fn kv_bytes(&self) -> usize {
        [self.batch, self.kv_heads, self.len, self.head_dim as usize]
            .into_iter()
            .fold(2 * self.dtype.size_bytes(), usize::saturating_mul)
    }

    /// Refuses, before anything is allocated, a shape the kernels cannot address (more than
    /// 2^31 token slots in one cache) or whose host copy (K and V drawn as f32, then converted)
    /// would not fit in `host_limit` bytes; the message names the shape, the estimate and the
    /// limit.
    ///
    /// # Errors
    /// The message.
    pub fn check_size(&self, host_limit: f64) -> Result<(), String> {
        self.check_addressable()?;
        match self.host_shortfall(host_limit) {
            Some(why) => Err(format!("{}: {why}", self.name)),
            None => Ok(()),
        }
    }

    /// Refuses a shape the kernels cannot address: no tokens, or more than 2^31 token slots in
    /// one cache.
    ///
    /// # Errors
    /// The message, naming the shape.
    pub fn check_addressable(&self) -> Result<(), String> {
        let ps = (self.page_size as usize).max(1);
        let slots = self
            .batch
            .checked_mul(self.len.div_ceil(ps))
            .and_then(|pages| pages.checked_mul(ps));
        if self.batch == 0 || self.len == 0 || slots.is_none_or(|s| s > i32::MAX as usize) {
            return Err(format!(
                "{}: batch {} x len {} needs 1 to 2^31 token slots per cache",
                self.name, self.batch, self.len
            ));
        }
        Ok(())
    }

    /// Why the host copy of one cache (K and V drawn as f32, then converted) would not fit in
    /// `host_limit` bytes, or `None` when it fits.
    pub fn host_shortfall(&self, host_limit: f64) -> Option<String> {
        // Twice the f32 values of K and V (drawn, then converted), as f64: no overflow.
        let host = 2.0
            * 2.0
            * 4.0
            * self.batch as f64
            * self.len as f64
            * self.kv_heads as f64
            * self.head_dim as f64;
        (host > host_limit).then(|| {
            format!(
                "the host copy of one cache needs about {:.2} GiB, above the limit of {:.2} GiB \
                 (80% of the available host memory)",
                host / (1u64 << 30) as f64,
                host_limit / (1u64 << 30) as f64
            )
        })
    }
}

/// A headline-like shape (32 query heads, head_dim 128, page 16, f16 HND, B0 8192, p 0.85)
/// of the given batch, KV heads and length, for tests.
#[cfg(test)]
pub(crate) fn test_shape(batch: usize, kv_heads: usize, len: usize) -> BenchShape {
    BenchShape {
        name: format!("b{batch}_{len}_kv{kv_heads}"),
        batch,
        qo_heads: 32,
        kv_heads,
        head_dim: 128,
        len,
        page_size: 16,
        dtype: twilight::Dtype::F16,
        layout: twilight::KvLayout::Hnd,
        budget: 8192,
        p: 0.85,
    }
}

/// 80% of the host memory the kernel reports available (16 GiB where it cannot be read): the
/// most a benchmark's host copies may take.
pub fn host_limit() -> f64 {
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        });
    available.map_or(16.0 * (1u64 << 30) as f64, |kib| 0.8 * kib * 1024.0)
}

/// Serde in the declaration spelling, read back by twilight-jit's parser.
mod spelled {
    use serde::{Deserialize, Deserializer, Serializer};

    pub mod dtype {
        use super::*;
        use twilight::Dtype;

        pub fn serialize<S: Serializer>(value: &Dtype, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(value.short())
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Dtype, D::Error> {
            crate::parse::dtype(&String::deserialize(d)?).map_err(serde::de::Error::custom)
        }
    }

    pub mod layout {
        use super::*;
        use twilight::KvLayout;

        pub fn serialize<S: Serializer>(value: &KvLayout, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(value.short())
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<KvLayout, D::Error> {
            crate::parse::layout(&String::deserialize(d)?).map_err(serde::de::Error::custom)
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn sizes_that_wrap_or_do_not_fit_are_refused() {
        let args = |batch: usize, len: usize| {
            let mut shape: BenchShape = serde_json::from_str(
                r#"{"name": "t", "batch": 1, "qo_heads": 32, "kv_heads": 8, "head_dim": 128,
                    "len": 8192, "page_size": 16, "dtype": "f16", "budget": 2048, "p": 0.9}"#,
            )
            .unwrap();
            shape.batch = batch;
            shape.len = len;
            shape
        };
        let gib = (1u64 << 30) as f64;
        assert!(args(4, 8192).check_size(64.0 * gib).is_ok());
        for (batch, len) in [
            (usize::MAX, 8192),
            (1, 34_359_738_368),
            (0, 8),
            (1, usize::MAX),
        ] {
            assert!(
                args(batch, len).check_size(64.0 * gib).is_err(),
                "{batch} x {len}"
            );
            let _ = args(batch, len).kv_bytes();
        }
        let err = args(64, 1 << 20).check_size(64.0 * gib).unwrap_err();
        assert!(err.contains("GiB"), "{err}");
    }

    use super::*;

    #[test]
    fn shapes_read_and_write_declaration_spellings() {
        let text = r#"{"name": "a", "batch": 2, "qo_heads": 32, "kv_heads": 8, "head_dim": 128,
                       "len": 4096, "page_size": 16, "dtype": "bf16", "budget": 1024, "p": 0.9}"#;
        let shape: BenchShape = serde_json::from_str(text).unwrap();
        assert_eq!((shape.dtype, shape.layout), (Dtype::Bf16, KvLayout::Hnd));
        assert_eq!(
            shape.dense_spec().unwrap().name(),
            "ps16_hd128_bf16_g4_hnd_full_none"
        );
        let json = serde_json::to_value(&shape).unwrap();
        assert_eq!(
            (&json["dtype"], &json["layout"]),
            (&"bf16".into(), &"hnd".into())
        );
        let bad = text.replace("bf16", "fp8");
        let err = serde_json::from_str::<BenchShape>(&bad).unwrap_err();
        assert!(err.to_string().contains("fp8"), "{err}");
    }

    #[test]
    fn dense_spec_refuses_heads_that_do_not_group() {
        let text = r#"{"name": "odd", "batch": 1, "qo_heads": 12, "kv_heads": 8, "head_dim": 128,
                       "len": 64, "page_size": 16, "dtype": "f16", "layout": "nhd",
                       "budget": 64, "p": 0.9}"#;
        let mut shape: BenchShape = serde_json::from_str(text).unwrap();
        assert!(shape
            .dense_spec()
            .unwrap_err()
            .starts_with("odd: 12 query heads"));
        shape.kv_heads = 0;
        assert!(shape.dense_spec().is_err());
        shape.kv_heads = 3;
        // group 4 is fine; head_dim 96 is not a variant.
        shape.head_dim = 96;
        assert!(shape.dense_spec().unwrap_err().contains("head_dim"));
    }
}

//! Channel calibration for the `double_sparse(r)` selector.
//!
//! Double Sparsity scores tokens with q.k over `r` channels of each head, so it needs to know
//! which channels carry most of q.k. That is decided offline, once per model, from the q and k
//! activations of a prefill of some calibration text (collected by the user's engine, one
//! [`LayerSample`] per layer): per KV head, every channel gets the mean over tokens (and over
//! the group's query heads) of a magnitude, and the `r` largest win ([`rank_channels`]). The
//! three [`CalibrationMode`]s are those of the Double Sparsity tooling:
//!
//! - `qk`: `|q[t, h, c] * k[t, g, c]|`, the channel's share of each token's own q.k;
//! - `q`: `|q[t, h, c]|`;
//! - `k`: `|k[t, g, c]|`.
//!
//! The kernels read post-RoPE q and k, so the samples should be post-RoPE too. (The Double
//! Sparsity tooling takes its `q` and `k` statistics from the outputs of `q_proj` and `k_proj`,
//! before RoPE, and its `qk` statistics after RoPE.)
//!
//! A [`ChannelConfig`] holds the result for every layer and is saved as the JSON the Double
//! Sparsity tooling writes (`config/<owner>/<model>.json` in its repository), so configs made
//! there can be loaded here and the other way round:
//!
//! ```json
//! {"model.layers.0.self_attn.qk_proj": [[3, 17, 40], [1, 2, 90]], "model.layers.1.self_attn.qk_proj": ...}
//! ```
//!
//! one key per layer and mode (`q_proj`, `k_proj`, `qk_proj`), one list of channel ids per head.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use crate::error::{Error, Result};

fn calib(msg: String) -> Error {
    Error::Calibration(msg)
}

/// Which activation statistic ranks the channels (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CalibrationMode {
    /// Mean `|q * k|`.
    Qk,
    /// Mean `|q|`.
    Q,
    /// Mean `|k|`.
    K,
}

impl CalibrationMode {
    pub const ALL: [CalibrationMode; 3] =
        [CalibrationMode::Qk, CalibrationMode::Q, CalibrationMode::K];

    /// `qk`, `q` or `k`.
    pub fn as_str(self) -> &'static str {
        match self {
            CalibrationMode::Qk => "qk",
            CalibrationMode::Q => "q",
            CalibrationMode::K => "k",
        }
    }

    /// The suffix of the JSON keys of this mode: `qk_proj`, `q_proj` or `k_proj`.
    pub fn key_suffix(self) -> &'static str {
        match self {
            CalibrationMode::Qk => "qk_proj",
            CalibrationMode::Q => "q_proj",
            CalibrationMode::K => "k_proj",
        }
    }

    /// The JSON key of a layer: `model.layers.{layer}.self_attn.{mode}_proj`.
    pub fn json_key(self, layer: usize) -> String {
        format!("model.layers.{layer}.self_attn.{}", self.key_suffix())
    }

    fn reads_q(self) -> bool {
        self != CalibrationMode::K
    }

    fn reads_k(self) -> bool {
        self != CalibrationMode::Q
    }
}

impl fmt::Display for CalibrationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CalibrationMode {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        CalibrationMode::ALL
            .into_iter()
            .find(|m| m.as_str() == text)
            .ok_or_else(|| {
                calib(format!(
                    "`{text}` is not a calibration mode; expected qk, q or k"
                ))
            })
    }
}

/// The q and k activations of one layer over the tokens of a calibration prefill, as f32.
///
/// - `q`: `[tokens, num_qo_heads, head_dim]`, row-major (token outer, channel inner);
/// - `k`: `[tokens, num_kv_heads, head_dim]`, row-major.
///
/// Query head `h` belongs to KV head `h / (num_qo_heads / num_kv_heads)`, as in the decode
/// step. A tensor the mode does not read (`k` for mode `q`, `q` for mode `k`) is not looked at
/// and may be empty. Several prefills of one layer are given as one sample by concatenating
/// their tokens.
#[derive(Clone, Copy, Debug)]
pub struct LayerSample<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub tokens: usize,
    pub num_qo_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl LayerSample<'_> {
    /// Checks the geometry and values of the tensors `mode` reads.
    ///
    /// # Errors
    /// [`Error::Calibration`] for zero tokens, heads or head_dim, `num_qo_heads` not a multiple
    /// of `num_kv_heads`, a tensor whose length is not its shape's, or a non-finite value.
    pub fn check(&self, mode: CalibrationMode) -> Result<()> {
        let (t, hq, hk, d) = (
            self.tokens,
            self.num_qo_heads,
            self.num_kv_heads,
            self.head_dim,
        );
        if t == 0 {
            return Err(calib("the sample has zero tokens".into()));
        }
        if hq == 0 || hk == 0 || d == 0 {
            return Err(calib(format!(
                "the sample has a zero dimension: num_qo_heads {hq}, num_kv_heads {hk}, \
                 head_dim {d}"
            )));
        }
        if hq % hk != 0 {
            return Err(calib(format!(
                "num_qo_heads = {hq} is not a multiple of num_kv_heads = {hk}"
            )));
        }
        let tensors = [
            ("q", self.q, hq, "num_qo_heads", mode.reads_q()),
            ("k", self.k, hk, "num_kv_heads", mode.reads_k()),
        ];
        for (name, data, heads, heads_name, read) in tensors {
            if !read {
                continue;
            }
            let want = t.checked_mul(heads).and_then(|n| n.checked_mul(d));
            if want != Some(data.len()) {
                let want = want.map_or("more than fit in memory".into(), |n| n.to_string());
                return Err(calib(format!(
                    "wrong shape: {name} has {} values, expected [tokens, {heads_name}, \
                     head_dim] = {t} * {heads} * {d} = {want}",
                    data.len(),
                )));
            }
            if let Some(i) = data.iter().position(|x| !x.is_finite()) {
                return Err(calib(format!(
                    "{name}[token {}, head {}, channel {}] = {} is not finite",
                    i / (heads * d),
                    i / d % heads,
                    i % d,
                    data[i]
                )));
            }
        }
        Ok(())
    }
}

/// A calibration sample assembled from decode steps rather than a prefill: each request adds
/// `per_request` evenly spread positions (every position of a shorter request), and its one
/// query stands for the query at each of them. The same number of positions per request weighs
/// the requests equally, and evenly spread positions cover a request's sinks, window and
/// background in proportion.
#[derive(Clone, Debug)]
pub struct DecodeSample {
    q: Vec<f32>,
    k: Vec<f32>,
    tokens: usize,
    num_qo_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    per_request: usize,
}

impl DecodeSample {
    pub fn new(
        num_qo_heads: usize,
        num_kv_heads: usize,
        head_dim: usize,
        per_request: usize,
    ) -> Self {
        DecodeSample {
            q: Vec::new(),
            k: Vec::new(),
            tokens: 0,
            num_qo_heads,
            num_kv_heads,
            head_dim,
            per_request: per_request.max(1),
        }
    }

    /// The positions of a request of `len` tokens that go into the sample: every one up to
    /// `per_request`, else evenly spread, ascending and distinct. An iterator, so nothing is
    /// sized from `len` or `per_request`.
    pub fn positions(&self, len: usize) -> impl Iterator<Item = usize> {
        let n = len.min(self.per_request);
        // In u128, `i * len` cannot wrap for any usize length; the quotient is below `len`.
        (0..n).map(move |i| (i as u128 * len as u128 / n as u128) as usize)
    }

    /// Adds one request of `len` tokens: `q_request` is its query `[num_qo_heads, head_dim]`,
    /// and `key(t)` returns its key at position t, `[num_kv_heads, head_dim]`. Returns the
    /// request's range of sample tokens.
    ///
    /// # Errors
    /// [`Error::Calibration`] when `q_request` or a key has the wrong length, or a row size
    /// (`num_qo_heads * head_dim`, `num_kv_heads * head_dim`) overflows.
    pub fn add_request<'k>(
        &mut self,
        q_request: &[f32],
        len: usize,
        mut key: impl FnMut(usize) -> std::borrow::Cow<'k, [f32]>,
    ) -> Result<std::ops::Range<usize>> {
        let (q_len, k_len) = self.row_lens()?;
        if q_request.len() != q_len {
            return Err(calib(format!(
                "a request's query has {} values, expected {q_len} ([num_qo_heads, head_dim])",
                q_request.len()
            )));
        }
        let start = self.tokens;
        for t in self.positions(len) {
            let k = key(t);
            if k.len() != k_len {
                return Err(calib(format!(
                    "the key at position {t} has {} values, expected {k_len} ([num_kv_heads, head_dim])",
                    k.len()
                )));
            }
            self.q.extend_from_slice(q_request);
            self.k.extend_from_slice(&k);
            self.tokens += 1;
        }
        Ok(start..self.tokens)
    }

    /// Sample tokens so far.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// The values of one sample token of q and of k: `num_qo_heads * head_dim` and
    /// `num_kv_heads * head_dim`.
    fn row_lens(&self) -> Result<(usize, usize)> {
        let q = self.num_qo_heads.checked_mul(self.head_dim);
        let k = self.num_kv_heads.checked_mul(self.head_dim);
        q.zip(k).ok_or_else(|| {
            calib(format!(
                "a sample token of {} query heads, {} KV heads and head_dim {} has more values \
                 than fit in memory",
                self.num_qo_heads, self.num_kv_heads, self.head_dim
            ))
        })
    }

    /// The sample tokens in `range` as a [`LayerSample`].
    ///
    /// # Errors
    /// [`Error::Calibration`] when the range is reversed or reaches past
    /// [`DecodeSample::tokens`].
    pub fn view(&self, range: std::ops::Range<usize>) -> Result<LayerSample<'_>> {
        if range.start > range.end || range.end > self.tokens {
            return Err(calib(format!(
                "sample tokens {}..{} of a sample of {} tokens",
                range.start, range.end, self.tokens
            )));
        }
        Ok(self.slice(range))
    }

    /// [`DecodeSample::view`] for a range already checked. Every token in the sample was
    /// added with rows of the checked lengths, so the products stay within `q` and `k`; when
    /// the row lengths overflow no token can have been added, and the range is empty.
    fn slice(&self, range: std::ops::Range<usize>) -> LayerSample<'_> {
        let (q_row, k_row) = self.row_lens().unwrap_or((0, 0));
        LayerSample {
            q: &self.q[range.start * q_row..range.end * q_row],
            k: &self.k[range.start * k_row..range.end * k_row],
            tokens: range.len(),
            num_qo_heads: self.num_qo_heads,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
        }
    }

    /// The whole sample.
    pub fn all(&self) -> LayerSample<'_> {
        self.slice(0..self.tokens)
    }
}

/// The statistic of `mode` for every channel of every KV head: `[num_kv_heads][head_dim]`,
/// the mean over tokens (and over the group's query heads when q is read), in f64.
///
/// # Errors
/// As [`LayerSample::check`].
pub fn channel_scores(sample: &LayerSample, mode: CalibrationMode) -> Result<Vec<Vec<f64>>> {
    sample.check(mode)?;
    let (hq, hk, d) = (sample.num_qo_heads, sample.num_kv_heads, sample.head_dim);
    let group = hq / hk;
    let mut scores = vec![vec![0f64; d]; hk];
    for t in 0..sample.tokens {
        for (g, acc) in scores.iter_mut().enumerate() {
            let k = (mode.reads_k()).then(|| &sample.k[(t * hk + g) * d..][..d]);
            match mode {
                CalibrationMode::K => {
                    for (a, &x) in acc.iter_mut().zip(k.expect("read")) {
                        *a += (x as f64).abs();
                    }
                }
                CalibrationMode::Q | CalibrationMode::Qk => {
                    for h in g * group..(g + 1) * group {
                        let q = &sample.q[(t * hq + h) * d..][..d];
                        for c in 0..d {
                            let mut x = q[c] as f64;
                            if let Some(k) = k {
                                x *= k[c] as f64;
                            }
                            acc[c] += x.abs();
                        }
                    }
                }
            }
        }
    }
    let count = sample.tokens * if mode.reads_q() { group } else { 1 };
    for acc in &mut scores {
        acc.iter_mut().for_each(|a| *a /= count as f64);
    }
    Ok(scores)
}

/// The `r` highest-scoring channels of one head (a tie going to the lower channel id), sorted
/// ascending. `r` larger than the list takes every channel.
pub fn top_channels(scores: &[f64], r: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order.truncate(r);
    order.sort_unstable();
    order
}

/// The `r` calibrated channels of every KV head of one layer: `[num_kv_heads][r]`, each list
/// sorted ascending. Channels are ranked by [`channel_scores`], a tie going to the lower id.
///
/// # Errors
/// [`Error::Calibration`] for `r` = 0 or `r > head_dim`, and as [`LayerSample::check`].
pub fn rank_channels(
    sample: &LayerSample,
    mode: CalibrationMode,
    r: usize,
) -> Result<Vec<Vec<usize>>> {
    check_r(r, sample.head_dim)?;
    Ok(channel_scores(sample, mode)?
        .iter()
        .map(|s| top_channels(s, r))
        .collect())
}

/// The largest head_dim a channel config may name: far above any model's (64 to 256 today),
/// small enough that the per-channel tables sized from it are small. It is checked before
/// anything is allocated from a caller's head_dim.
pub const MAX_HEAD_DIM: usize = 1 << 16;

fn check_r(r: usize, head_dim: usize) -> Result<()> {
    if head_dim == 0 || head_dim > MAX_HEAD_DIM {
        return Err(calib(format!(
            "head_dim = {head_dim} is outside 1..={MAX_HEAD_DIM}"
        )));
    }
    if r == 0 || r > head_dim {
        return Err(calib(format!(
            "r = {r} channels is outside 1..={head_dim} (head_dim)"
        )));
    }
    Ok(())
}

/// The calibrated channels of every layer of a model: `layers[l][head]` is the sorted list of
/// `r` channel ids of that head. Heads are KV heads for configs made by [`rank_channels`];
/// configs of the Double Sparsity tooling have one list per query head for modes `q` and `qk`
/// (see [`ChannelConfig::kv_head_channels`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelConfig {
    pub mode: CalibrationMode,
    pub r: usize,
    pub layers: BTreeMap<usize, Vec<Vec<usize>>>,
}

impl ChannelConfig {
    /// Calibrates every sampled layer with [`rank_channels`].
    ///
    /// # Errors
    /// As [`rank_channels`], naming the layer; a layer sampled twice.
    pub fn calibrate<'a>(
        mode: CalibrationMode,
        r: usize,
        samples: impl IntoIterator<Item = (usize, LayerSample<'a>)>,
    ) -> Result<ChannelConfig> {
        let mut layers = BTreeMap::new();
        for (layer, sample) in samples {
            let channels = rank_channels(&sample, mode, r).map_err(|e| match e {
                Error::Calibration(msg) => calib(format!("layer {layer}: {msg}")),
                other => other,
            })?;
            if layers.insert(layer, channels).is_some() {
                return Err(calib(format!(
                    "layer {layer} is sampled twice; concatenate its tokens into one sample"
                )));
            }
        }
        Ok(ChannelConfig { mode, r, layers })
    }

    /// The channel lists of a layer, one per head.
    ///
    /// # Errors
    /// [`Error::Calibration`] when the config has no such layer.
    pub fn channels_for_layer(&self, layer: usize) -> Result<&[Vec<usize>]> {
        self.layers.get(&layer).map(Vec::as_slice).ok_or_else(|| {
            calib(format!(
                "the {} channel config has no layer {layer} (it has {})",
                self.mode,
                describe_layers(self.layers.keys())
            ))
        })
    }

    /// One channel list per KV head for a layer, as the `double_sparse` selector's labels take
    /// them ([`DsLabels`](crate::reference::DsLabels)). A config with one list per KV head is
    /// returned as it is. A config with one list per query head (the Double Sparsity tooling's
    /// `q` and `qk` configs of a GQA model, `num_kv_heads * group` lists, query head `h` in KV
    /// head `h / group`) is reduced per group by votes: the `r` channels most of the group's
    /// heads chose, a tie going to the lower channel id, sorted ascending.
    ///
    /// # Errors
    /// [`Error::Calibration`] for a missing layer, a list count that is not a multiple of
    /// `num_kv_heads`, or a group whose lists name fewer than `r` distinct channels.
    pub fn kv_head_channels(&self, layer: usize, num_kv_heads: usize) -> Result<Vec<Vec<usize>>> {
        let lists = self.channels_for_layer(layer)?;
        if num_kv_heads == 0 || lists.is_empty() || lists.len() % num_kv_heads != 0 {
            return Err(calib(format!(
                "layer {layer} has {} channel lists, not a multiple of num_kv_heads = \
                 {num_kv_heads}",
                lists.len()
            )));
        }
        let group = lists.len() / num_kv_heads;
        if group == 1 {
            return Ok(lists.to_vec());
        }
        // Votes are counted in a map, not a table indexed by id: the fields are public, so an
        // id may be anything, and nothing may be sized or offset from it.
        lists
            .chunks_exact(group)
            .enumerate()
            .map(|(kv_head, heads)| {
                let mut votes = BTreeMap::<usize, usize>::new();
                for &c in heads.iter().flatten() {
                    *votes.entry(c).or_default() += 1;
                }
                if votes.len() < self.r {
                    return Err(calib(format!(
                        "layer {layer}, KV head {kv_head}: its query heads name {} distinct \
                         channels, fewer than r = {}",
                        votes.len(),
                        self.r
                    )));
                }
                let mut order: Vec<(usize, usize)> = votes.into_iter().collect();
                // Most votes first, a tie going to the lower channel id.
                order.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                let mut ids: Vec<usize> = order.into_iter().take(self.r).map(|(c, _)| c).collect();
                ids.sort_unstable();
                Ok(ids)
            })
            .collect()
    }

    /// The config as the Double Sparsity tooling writes it: one key
    /// `model.layers.{l}.self_attn.{mode}_proj` per layer, in layer order, whose value is one
    /// list of channel ids per head (`{"key": [[0, 5], [2, 3]], ...}`, Python's `json.dump`
    /// spacing).
    pub fn to_json(&self) -> String {
        let mut out = String::from("{");
        for (i, (&layer, heads)) in self.layers.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            out.push_str(&format!("\"{}\": [", self.mode.json_key(layer)));
            for (h, list) in heads.iter().enumerate() {
                if h > 0 {
                    out.push_str(", ");
                }
                let ids: Vec<String> = list.iter().map(usize::to_string).collect();
                out.push_str(&format!("[{}]", ids.join(", ")));
            }
            out.push(']');
        }
        out.push('}');
        out
    }

    /// Reads a config in the Double Sparsity tooling's format for one mode.
    ///
    /// Keys of other modes, and keys that are not `model.layers.{l}.self_attn.{x}_proj`, are
    /// ignored. Every layer `0..num_layers` must have a key of `mode`; each holds exactly
    /// `num_heads` lists of distinct channel ids below `head_dim`, each at least `r` long.
    ///
    /// Of each list the **first `r` ids, as written**, are taken, then sorted ascending. The
    /// tooling (`config/offline_calibration.py`) writes every channel of the head ordered by
    /// descending importance (`torch.sort(..., descending=True)` indices), and its attention
    /// reads the first `r` (`sorted_channel[..., :r]`), so the first `r` are the `r` most
    /// important ones; a list of exactly `r` (what [`ChannelConfig::to_json`] writes, sorted
    /// ascending) is taken whole.
    ///
    /// # Errors
    /// [`Error::Calibration`] naming the key, head and id: text that is not a JSON object, a
    /// missing layer, a layer at or beyond `num_layers`, a wrong head count, a list shorter
    /// than `r`, an id that is not an integer in `0..head_dim`, a duplicate id; `r` = 0 or
    /// `r > head_dim`.
    pub fn from_json(
        text: &str,
        mode: CalibrationMode,
        num_layers: usize,
        num_heads: usize,
        head_dim: usize,
        r: usize,
    ) -> Result<ChannelConfig> {
        check_r(r, head_dim)?;
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| calib(format!("the channel config is not valid JSON: {e}")))?;
        let object = value.as_object().ok_or_else(|| {
            calib("the channel config is not a JSON object of per-layer keys".into())
        })?;
        let mut layers = BTreeMap::new();
        let mut modes_seen = std::collections::BTreeSet::new();
        for (key, value) in object {
            let Some((layer, suffix)) = parse_key(key) else {
                continue;
            };
            modes_seen.insert(suffix.to_string());
            if suffix != mode.key_suffix() {
                continue;
            }
            let layer: usize = layer
                .parse()
                .map_err(|_| calib(format!("key `{key}`: `{layer}` is not a layer number")))?;
            if layer >= num_layers {
                return Err(calib(format!(
                    "key `{key}`: layer {layer} is beyond the model's {num_layers} layers"
                )));
            }
            layers.insert(layer, read_layer(key, value, num_heads, head_dim, r)?);
        }
        if let Some(missing) = (0..num_layers).find(|l| !layers.contains_key(l)) {
            let seen = if modes_seen.is_empty() {
                "no per-layer keys at all".to_string()
            } else {
                format!(
                    "keys for {}",
                    modes_seen.into_iter().collect::<Vec<_>>().join(", ")
                )
            };
            return Err(calib(format!(
                "missing layer {missing}: no key `{}` (the file has {seen})",
                mode.json_key(missing)
            )));
        }
        Ok(ChannelConfig { mode, r, layers })
    }

    /// Writes [`ChannelConfig::to_json`] to `path`.
    ///
    /// # Errors
    /// [`Error::Calibration`] naming the path when it cannot be written.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        std::fs::write(path, self.to_json()).map_err(|e| {
            calib(format!(
                "cannot write channel config {}: {e}",
                path.display()
            ))
        })
    }

    /// Reads `path` with [`ChannelConfig::from_json`].
    ///
    /// # Errors
    /// [`Error::Calibration`] naming the path when it cannot be read, and as
    /// [`ChannelConfig::from_json`].
    pub fn load(
        path: impl AsRef<Path>,
        mode: CalibrationMode,
        num_layers: usize,
        num_heads: usize,
        head_dim: usize,
        r: usize,
    ) -> Result<ChannelConfig> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            calib(format!(
                "cannot read channel config {}: {e}",
                path.display()
            ))
        })?;
        ChannelConfig::from_json(&text, mode, num_layers, num_heads, head_dim, r).map_err(|e| {
            match e {
                Error::Calibration(msg) => calib(format!("{}: {msg}", path.display())),
                other => other,
            }
        })
    }
}

/// `model.layers.{layer}.self_attn.{suffix}` -> (layer text, suffix) when suffix ends `_proj`.
fn parse_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once(".self_attn.")?;
    suffix.ends_with("_proj").then_some((layer, suffix))
}

fn read_layer(
    key: &str,
    value: &serde_json::Value,
    num_heads: usize,
    head_dim: usize,
    r: usize,
) -> Result<Vec<Vec<usize>>> {
    let heads = value
        .as_array()
        .ok_or_else(|| calib(format!("key `{key}`: not a list of per-head channel lists")))?;
    if heads.len() != num_heads {
        return Err(calib(format!(
            "key `{key}`: wrong head count: {} channel lists, expected {num_heads} heads",
            heads.len()
        )));
    }
    heads
        .iter()
        .enumerate()
        .map(|(h, list)| {
            let list = list.as_array().ok_or_else(|| {
                calib(format!("key `{key}`, head {h}: not a list of channel ids"))
            })?;
            if list.len() < r {
                return Err(calib(format!(
                    "key `{key}`, head {h}: {} channels, fewer than r = {r}",
                    list.len()
                )));
            }
            let mut seen = vec![false; head_dim];
            let mut ids = Vec::with_capacity(list.len());
            for id in list {
                let c = id
                    .as_u64()
                    .ok_or_else(|| {
                        calib(format!(
                            "key `{key}`, head {h}: channel id {id} is not a non-negative integer"
                        ))
                    })
                    .and_then(|c| {
                        usize::try_from(c)
                            .ok()
                            .filter(|&c| c < head_dim)
                            .ok_or_else(|| {
                                calib(format!(
                                    "key `{key}`, head {h}: channel id {c} is out of range \
                                     0..{head_dim} (head_dim)"
                                ))
                            })
                    })?;
                if std::mem::replace(&mut seen[c], true) {
                    return Err(calib(format!(
                        "key `{key}`, head {h}: duplicate channel id {c}"
                    )));
                }
                ids.push(c);
            }
            ids.truncate(r);
            ids.sort_unstable();
            Ok(ids)
        })
        .collect()
}

fn describe_layers<'a>(layers: impl Iterator<Item = &'a usize>) -> String {
    let layers: Vec<String> = layers.map(usize::to_string).collect();
    if layers.is_empty() {
        "no layers".into()
    } else {
        format!("layers {}", layers.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_samples_take_evenly_spread_positions_of_each_request() {
        let mut sample = DecodeSample::new(2, 1, 2, 4);
        assert_eq!(sample.positions(3).collect::<Vec<_>>(), vec![0, 1, 2]);
        for len in [1, 3, 4, 5, 700, 8192] {
            let p: Vec<usize> = sample.positions(len).collect();
            assert_eq!(p.len(), len.min(4));
            assert!(p.windows(2).all(|w| w[0] < w[1]), "{len}");
            assert!(*p.last().unwrap() < len);
        }
        // Key at position t: (t, -t); q of request 0 is [1, 2, 3, 4].
        let key = |t: usize| std::borrow::Cow::Owned(vec![t as f32, -(t as f32)]);
        assert_eq!(
            sample.add_request(&[1.0, 2.0, 3.0, 4.0], 8, key).unwrap(),
            0..4
        );
        assert_eq!(sample.add_request(&[5.0; 4], 2, key).unwrap(), 4..6);
        let all = sample.all();
        assert_eq!(all.tokens, 6);
        assert_eq!(&all.k[..8], &[0.0, 0.0, 2.0, -2.0, 4.0, -4.0, 6.0, -6.0]);
        assert_eq!(&sample.view(4..6).unwrap().q, &[5.0; 8]);
        assert!(sample.view(4..7).is_err());
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = 5..4;
        assert!(sample.view(reversed).is_err());
        assert_eq!(sample.view(6..6).unwrap().tokens, 0);
        let huge = DecodeSample::new(usize::MAX, 1, 2, 4);
        assert_eq!(huge.positions(usize::MAX).count(), 4);
        let every = DecodeSample::new(1, 1, 1, usize::MAX);
        assert_eq!(every.positions(usize::MAX).nth(1), Some(1));
        let mut huge = huge;
        assert!(huge.add_request(&[], 1, key).is_err());
        assert!(sample.add_request(&[1.0; 3], 8, key).is_err());
        assert!(sample
            .add_request(&[1.0; 4], 8, |_| std::borrow::Cow::Owned(vec![0.0]))
            .is_err());
    }

    #[test]
    fn modes_parse_and_print() {
        for m in CalibrationMode::ALL {
            assert_eq!(m.to_string().parse::<CalibrationMode>().unwrap(), m);
        }
        assert_eq!(
            CalibrationMode::Qk.json_key(7),
            "model.layers.7.self_attn.qk_proj"
        );
        assert_eq!(CalibrationMode::K.key_suffix(), "k_proj");
        let err = "kq".parse::<CalibrationMode>().unwrap_err().to_string();
        assert!(err.contains("`kq` is not a calibration mode"), "{err}");
    }

    #[test]
    fn top_channels_break_ties_low_and_sort() {
        assert_eq!(top_channels(&[1.0, 3.0, 2.0, 3.0], 2), vec![1, 3]);
        assert_eq!(top_channels(&[1.0, 2.0, 2.0, 0.0], 2), vec![1, 2]);
        assert_eq!(top_channels(&[5.0, 2.0, 2.0, 0.0], 2), vec![0, 1]);
        assert_eq!(top_channels(&[0.0; 4], 3), vec![0, 1, 2]);
    }

    #[test]
    fn parse_key_recognizes_the_tooling_keys() {
        assert_eq!(
            parse_key("model.layers.12.self_attn.qk_proj"),
            Some(("12", "qk_proj"))
        );
        assert_eq!(parse_key("model.layers.1.mlp.up_proj"), None);
        assert_eq!(parse_key("lm_head"), None);
        assert_eq!(parse_key("model.layers.1.self_attn.rotary_emb"), None);
    }
}

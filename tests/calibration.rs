//! Channel calibration for `double_sparse(r)`: ranking on synthetic activations, the Double
//! Sparsity tooling's JSON format, and every kind of bad input.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use twilight::calibration::{
    channel_scores, rank_channels, CalibrationMode, ChannelConfig, LayerSample,
};
use twilight::reference::{decode_step, DsLabels, StepInputs, StepParams};
use twilight::{Dtype, KvLayout, Pruning, Selector, VariantSpec};
use twilight_synth::synthetic::SyntheticStep;

const TOKENS: usize = 40;
const HQ: usize = 4;
const HK: usize = 2;
const D: usize = 16;

/// Activations with a small random background (|x| <= 0.1) and, per KV head `g` (channels
/// shifted by `g`), three kinds of heavy channels with random signs:
/// - `qk` channels 2, 7, 11: q = ±5 and k = ±5, so |q k| = 25;
/// - `q` channels 4, 5, 6: q = ±20 and k = 0, so |q| is largest but q k = 0;
/// - `k` channels 9, 12, 13: k = ±20 and q = 0, so |k| is largest but q k = 0.
///
/// Only the first query head of each group carries the q-heavy channels, so the group mean
/// (10) still beats every other channel's |q| (at most 5).
struct Activations {
    q: Vec<f32>,
    k: Vec<f32>,
}

const QK: [usize; 3] = [2, 7, 11];
const Q_ONLY: [usize; 3] = [4, 5, 6];
const K_ONLY: [usize; 3] = [9, 12, 13];

fn activations(seed: u64) -> Activations {
    let mut rng = StdRng::seed_from_u64(seed);
    let sign = |rng: &mut StdRng| if rng.random::<bool>() { 1.0f32 } else { -1.0 };
    let mut q: Vec<f32> = (0..TOKENS * HQ * D)
        .map(|_| rng.random_range(-0.1f32..0.1))
        .collect();
    let mut k: Vec<f32> = (0..TOKENS * HK * D)
        .map(|_| rng.random_range(-0.1f32..0.1))
        .collect();
    let group = HQ / HK;
    for t in 0..TOKENS {
        for g in 0..HK {
            let krow = (t * HK + g) * D;
            for &c in &QK {
                k[krow + c + g] = 5.0 * sign(&mut rng);
            }
            for &c in &Q_ONLY {
                k[krow + c + g] = 0.0;
            }
            for &c in &K_ONLY {
                k[krow + c + g] = 20.0 * sign(&mut rng);
            }
            for h in g * group..(g + 1) * group {
                let qrow = (t * HQ + h) * D;
                for &c in &QK {
                    q[qrow + c + g] = 5.0 * sign(&mut rng);
                }
                for &c in &Q_ONLY {
                    q[qrow + c + g] = if h == g * group {
                        20.0 * sign(&mut rng)
                    } else {
                        0.0
                    };
                }
                for &c in &K_ONLY {
                    q[qrow + c + g] = 0.0;
                }
            }
        }
    }
    Activations { q, k }
}

fn sample(a: &Activations) -> LayerSample<'_> {
    LayerSample {
        q: &a.q,
        k: &a.k,
        tokens: TOKENS,
        num_qo_heads: HQ,
        num_kv_heads: HK,
        head_dim: D,
    }
}

fn shifted(channels: [usize; 3], g: usize) -> Vec<usize> {
    channels.iter().map(|c| c + g).collect()
}

#[test]
fn each_mode_picks_its_heavy_channels() {
    let a = activations(1);
    let s = sample(&a);
    for (mode, heavy) in [
        (CalibrationMode::Qk, QK),
        (CalibrationMode::Q, Q_ONLY),
        (CalibrationMode::K, K_ONLY),
    ] {
        let ranked = rank_channels(&s, mode, 3).unwrap();
        let want: Vec<Vec<usize>> = (0..HK).map(|g| shifted(heavy, g)).collect();
        assert_eq!(ranked, want, "mode {mode}");
    }
    // q-only and k-only channels carry no q k at all: with r = 4, `qk` takes its three
    // channels and then the best of the small background, never a q-only or k-only channel.
    let qk = rank_channels(&s, CalibrationMode::Qk, 4).unwrap();
    for (g, list) in qk.iter().enumerate() {
        for c in shifted(QK, g) {
            assert!(list.contains(&c));
        }
        for c in shifted(Q_ONLY, g).into_iter().chain(shifted(K_ONLY, g)) {
            assert!(
                !list.contains(&c),
                "qk picked {c} for KV head {g}: {list:?}"
            );
        }
    }
    // `q` ranks the qk channels (|q| = 5) right after the q-only ones; `k` ranks them after
    // the k-only ones (|k| = 5).
    assert_eq!(
        rank_channels(&s, CalibrationMode::Q, 6).unwrap()[0],
        vec![2, 4, 5, 6, 7, 11]
    );
    assert_eq!(
        rank_channels(&s, CalibrationMode::K, 6).unwrap()[1],
        vec![3, 8, 10, 12, 13, 14]
    );
    // A mode reads only its tensors: `k` works without q, `q` without k.
    let no_q = LayerSample { q: &[], ..s };
    assert_eq!(
        rank_channels(&no_q, CalibrationMode::K, 3).unwrap(),
        rank_channels(&s, CalibrationMode::K, 3).unwrap()
    );
    let no_k = LayerSample { k: &[], ..s };
    assert!(rank_channels(&no_k, CalibrationMode::Q, 3).is_ok());
    assert!(rank_channels(&no_k, CalibrationMode::Qk, 3).is_err());
}

#[test]
fn scores_are_means_over_tokens_and_the_group() {
    // Two tokens, two query heads on one KV head, head_dim 2.
    let q = [1.0, -2.0, 3.0, 0.0, /* token 1 */ -1.0, 4.0, 1.0, 2.0];
    let k = [2.0, 1.0, /* token 1 */ -3.0, 0.5];
    let s = LayerSample {
        q: &q,
        k: &k,
        tokens: 2,
        num_qo_heads: 2,
        num_kv_heads: 1,
        head_dim: 2,
    };
    // qk, channel 0: (|1*2| + |3*2| + |-1*-3| + |1*-3|) / 4 = 14 / 4.
    // qk, channel 1: (|-2*1| + 0 + |4*0.5| + |2*0.5|) / 4 = 5 / 4.
    assert_eq!(
        channel_scores(&s, CalibrationMode::Qk).unwrap(),
        vec![vec![3.5, 1.25]]
    );
    assert_eq!(
        channel_scores(&s, CalibrationMode::Q).unwrap(),
        vec![vec![1.5, 2.0]]
    );
    assert_eq!(
        channel_scores(&s, CalibrationMode::K).unwrap(),
        vec![vec![2.5, 0.75]]
    );
    // Equal scores: the lower channel ids win.
    let ones = [1.0f32; 2 * 2 * 8];
    let flat = LayerSample {
        q: &ones,
        k: &ones,
        tokens: 2,
        num_qo_heads: 2,
        num_kv_heads: 2,
        head_dim: 8,
    };
    assert_eq!(
        rank_channels(&flat, CalibrationMode::Qk, 3).unwrap(),
        vec![vec![0, 1, 2]; 2]
    );
}

fn two_layer_config() -> ChannelConfig {
    let (a0, a1) = (activations(2), activations(3));
    ChannelConfig::calibrate(CalibrationMode::Qk, 4, [(1, sample(&a1)), (0, sample(&a0))]).unwrap()
}

#[test]
fn json_round_trip_and_exact_format() {
    let config = two_layer_config();
    assert_eq!(config.layers.len(), 2);
    let json = config.to_json();
    let back = ChannelConfig::from_json(&json, CalibrationMode::Qk, 2, HK, D, 4).unwrap();
    assert_eq!(back, config);
    // Through a file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.json");
    config.save(&path).unwrap();
    let loaded = ChannelConfig::load(&path, CalibrationMode::Qk, 2, HK, D, 4).unwrap();
    assert_eq!(loaded, config);
    assert_eq!(
        loaded.channels_for_layer(1).unwrap(),
        &config.layers[&1][..]
    );

    // The exact text: keys in layer order, Python json.dump spacing.
    let small = ChannelConfig {
        mode: CalibrationMode::K,
        r: 2,
        layers: [
            (0, vec![vec![1, 5], vec![0, 3]]),
            (10, vec![vec![2, 4], vec![6, 7]]),
        ]
        .into_iter()
        .collect(),
    };
    assert_eq!(
        small.to_json(),
        "{\"model.layers.0.self_attn.k_proj\": [[1, 5], [0, 3]], \
         \"model.layers.10.self_attn.k_proj\": [[2, 4], [6, 7]]}"
    );
    let err = small.channels_for_layer(3).unwrap_err().to_string();
    assert!(
        err.contains("no layer 3") && err.contains("layers 0, 10"),
        "{err}"
    );
}

/// A file as the Double Sparsity tooling writes it: every key of every mode, per head the
/// whole head's channels in descending importance, plus keys that are not channel configs.
const TOOLING_JSON: &str = r#"{
  "model.layers.0.self_attn.q_proj": [[7, 0, 3, 1, 2, 4, 5, 6], [1, 2, 3, 4, 5, 6, 7, 0],
                                      [6, 5, 4, 3, 2, 1, 0, 7], [0, 1, 2, 3, 4, 5, 6, 7]],
  "model.layers.0.self_attn.k_proj": [[5, 4, 3, 2, 1, 0, 6, 7], [2, 0, 1, 3, 4, 5, 6, 7]],
  "model.layers.0.self_attn.qk_proj": [[6, 1, 4, 0, 2, 3, 5, 7], [3, 7, 2, 0, 1, 4, 5, 6],
                                       [4, 1, 6, 0, 2, 3, 5, 7], [2, 7, 5, 0, 1, 3, 4, 6]],
  "model.layers.1.self_attn.qk_proj": [[0, 1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0],
                                       [3, 4, 5, 0, 1, 2, 6, 7], [5, 3, 4, 0, 1, 2, 6, 7]],
  "model.layers.1.self_attn.k_proj": [[1, 0, 2, 3, 4, 5, 6, 7], [7, 0, 1, 2, 3, 4, 5, 6]],
  "model.layers.1.self_attn.q_proj": [[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7],
                                      [0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7]],
  "model.layers.0.mlp.up_proj": [[99]],
  "lm_head": "not a config",
  "language_model.model.layers.0.self_attn.qk_proj": [[1000]]
}"#;

#[test]
fn reads_the_double_sparsity_tooling_format() {
    // qk: 4 query heads, head_dim 8, the first 3 of each list as written, then sorted.
    let qk = ChannelConfig::from_json(TOOLING_JSON, CalibrationMode::Qk, 2, 4, 8, 3).unwrap();
    assert_eq!(qk.r, 3);
    assert_eq!(
        qk.channels_for_layer(0).unwrap(),
        &[vec![1, 4, 6], vec![2, 3, 7], vec![1, 4, 6], vec![2, 5, 7]]
    );
    assert_eq!(
        qk.channels_for_layer(1).unwrap(),
        &[vec![0, 1, 2], vec![5, 6, 7], vec![3, 4, 5], vec![3, 4, 5]]
    );
    // k: one list per KV head.
    let k = ChannelConfig::from_json(TOOLING_JSON, CalibrationMode::K, 2, 2, 8, 2).unwrap();
    assert_eq!(k.channels_for_layer(0).unwrap(), &[vec![4, 5], vec![0, 2]]);
    assert_eq!(
        k.kv_head_channels(1, 2).unwrap(),
        vec![vec![0, 1], vec![0, 7]]
    );
    // Query-head lists of a GQA model, reduced to 2 KV heads by votes (ties to the lower id):
    // layer 0, heads 0 and 1: {1, 4, 6} and {2, 3, 7} -> one vote each -> 1, 2, 3.
    // heads 2 and 3: {1, 4, 6} and {2, 5, 7} -> 1, 2, 4.
    assert_eq!(
        qk.kv_head_channels(0, 2).unwrap(),
        vec![vec![1, 2, 3], vec![1, 2, 4]]
    );
    // layer 1, heads 2 and 3 agree on {3, 4, 5}.
    assert_eq!(qk.kv_head_channels(1, 2).unwrap()[1], vec![3, 4, 5]);
    assert_eq!(qk.kv_head_channels(1, 4).unwrap(), qk.layers[&1]);
    assert!(qk.kv_head_channels(1, 3).is_err());
    // Every r up to head_dim reads; the whole list at r = head_dim.
    let all = ChannelConfig::from_json(TOOLING_JSON, CalibrationMode::Q, 2, 4, 8, 8).unwrap();
    assert!(all
        .layers
        .values()
        .flatten()
        .all(|l| *l == (0..8).collect::<Vec<_>>()));
}

fn err_of(result: twilight::Result<impl std::fmt::Debug>) -> String {
    result.unwrap_err().to_string()
}

#[test]
fn bad_configs_name_the_problem() {
    let read = |text: &str, heads: usize, r: usize| {
        err_of(ChannelConfig::from_json(
            text,
            CalibrationMode::Qk,
            2,
            heads,
            8,
            r,
        ))
    };
    let k0 = "model.layers.0.self_attn.qk_proj";
    let k1 = "model.layers.1.self_attn.qk_proj";
    let cases: Vec<(String, usize, usize, Vec<&str>)> = vec![
        (
            format!(r#"{{"{k0}": [[0, 1, 9]], "{k1}": [[0, 1, 2]]}}"#),
            1,
            2,
            vec!["out of range", "channel id 9", "head 0", k0],
        ),
        (
            format!(r#"{{"{k0}": [[0, 1], [2, 3]], "{k1}": [5, 6]}}"#),
            2,
            2,
            vec!["head 0: not a list of channel ids", k1],
        ),
        (
            format!(r#"{{"{k0}": [[0, 1], [4, 5]], "{k1}": [[0, 1, 2], [3, 5, 3]]}}"#),
            2,
            2,
            vec!["duplicate channel id 3", "head 1", k1],
        ),
        (
            format!(r#"{{"{k0}": [[0, 1, 2]], "model.layers.1.self_attn.k_proj": [[0, 1]]}}"#),
            1,
            2,
            vec!["missing layer 1", k1, "keys for k_proj, qk_proj"],
        ),
        (
            format!(r#"{{"{k0}": [[0, 1, 2], [3, 4, 5]], "{k1}": [[0, 1, 2], [3, 4, 5]]}}"#),
            4,
            2,
            vec!["wrong head count", "2 channel lists, expected 4 heads", k0],
        ),
        (
            format!(r#"{{"{k0}": [[0, 1, 2]], "{k1}": [[0, 1, 2]]}}"#),
            1,
            9,
            vec!["r = 9", "outside 1..=8"],
        ),
        (
            format!(r#"{{"{k0}": [[0, 1, 2]], "{k1}": [[0, 1, 2]]}}"#),
            1,
            0,
            vec!["r = 0"],
        ),
        (
            format!(r#"{{"{k0}": [[0, 1, 2]], "{k1}": [[0, 1]]}}"#),
            1,
            3,
            vec!["2 channels, fewer than r = 3", k1],
        ),
        (
            format!(r#"{{"{k0}": [[0, -1, 2]], "{k1}": [[0, 1.5]]}}"#),
            1,
            2,
            vec!["not a non-negative integer"],
        ),
        (
            format!(
                r#"{{"{k0}": [[0, 1]], "{k1}": [[0, 1]], "model.layers.2.self_attn.qk_proj": [[0, 1]]}}"#
            ),
            1,
            2,
            vec!["layer 2 is beyond the model's 2 layers"],
        ),
        ("[1, 2]".to_string(), 1, 2, vec!["not a JSON object"]),
        ("{\"a\": ".to_string(), 1, 2, vec!["not valid JSON"]),
        (
            "{}".to_string(),
            1,
            2,
            vec!["missing layer 0", "no per-layer keys"],
        ),
    ];
    for (text, heads, r, needles) in cases {
        let err = read(&text, heads, r);
        assert!(err.starts_with("channel calibration: "), "{err}");
        for needle in needles {
            assert!(err.contains(needle), "{text}: `{needle}` not in: {err}");
        }
    }
    // A file that is not there names its path.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.json");
    let err = err_of(ChannelConfig::load(&path, CalibrationMode::Q, 1, 1, 8, 2));
    assert!(
        err.contains("cannot read channel config") && err.contains("absent.json"),
        "{err}"
    );
    // Errors inside a file name it too.
    std::fs::write(&path, "{}").unwrap();
    let err = err_of(ChannelConfig::load(&path, CalibrationMode::Q, 1, 1, 8, 2));
    assert!(
        err.contains("absent.json") && err.contains("missing layer 0"),
        "{err}"
    );
    let err = err_of(two_layer_config().save(dir.path().join("no/such/dir.json")));
    assert!(err.contains("cannot write channel config"), "{err}");
}

#[test]
fn bad_samples_name_the_problem() {
    let a = activations(4);
    let s = sample(&a);
    let short_q = &a.q[1..];
    let mut nan_k = a.k.clone();
    nan_k[(3 * HK + 1) * D + 5] = f32::NAN;
    let cases: Vec<(LayerSample, usize, &str)> = vec![
        (
            LayerSample { q: short_q, ..s },
            3,
            "wrong shape: q has 2559 values, expected [tokens, num_qo_heads, head_dim] = 40 * 4 * 16",
        ),
        (
            LayerSample { tokens: 39, ..s },
            3,
            "wrong shape",
        ),
        (
            LayerSample {
                num_kv_heads: 3,
                ..s
            },
            3,
            "num_qo_heads = 4 is not a multiple of num_kv_heads = 3",
        ),
        (
            LayerSample {
                q: &[],
                k: &[],
                tokens: 0,
                ..s
            },
            3,
            "zero tokens",
        ),
        (
            LayerSample { k: &nan_k, ..s },
            3,
            "k[token 3, head 1, channel 5] = NaN is not finite",
        ),
        (s, 0, "r = 0"),
        (s, 17, "r = 17 channels is outside 1..=16"),
    ];
    for (sample, r, needle) in cases {
        let err = err_of(rank_channels(&sample, CalibrationMode::Qk, r));
        assert!(err.contains(needle), "`{needle}` not in: {err}");
    }
    // calibrate names the layer, and refuses a layer sampled twice.
    let err = err_of(ChannelConfig::calibrate(
        CalibrationMode::Qk,
        3,
        [(5, LayerSample { tokens: 39, ..s })],
    ));
    assert!(err.contains("layer 5: wrong shape"), "{err}");
    let err = err_of(ChannelConfig::calibrate(
        CalibrationMode::Qk,
        3,
        [(5, s), (5, s)],
    ));
    assert!(err.contains("layer 5 is sampled twice"), "{err}");
}

/// End to end: calibrate on activations whose q lives on a few channels, load the config
/// back, label the cache with it, and the `double_sparse` step selects exactly the tokens an
/// exact q.k ranking selects (the channels cover all of q).
#[test]
fn calibrated_channels_drive_the_ds_step() {
    let (kv_heads, group, ps, d, r) = (2, 2, 8, 64, 16);
    let mut s = SyntheticStep::random::<half::f16>(
        9,
        &[150, 61],
        kv_heads,
        group,
        ps,
        d,
        KvLayout::Nhd,
        2.0,
    )
    .unwrap();
    // q of KV head g lives on channels g, g + 4, g + 8, ... (16 channels); elsewhere 0.
    let live = |g: usize, c: usize| c % 4 == g;
    let hq = kv_heads * group;
    for b in 0..s.table.batch() {
        for h in 0..hq {
            for c in 0..d {
                if !live(h / group, c) {
                    s.q[(b * hq + h) * d + c] = 0.0;
                }
            }
        }
    }
    // Calibration activations: the decode queries of both requests as 2 "tokens", and any
    // nonzero keys (qk scores of dead q channels are 0, so live channels win).
    let k_sample: Vec<f32> = (0..2 * kv_heads * d)
        .map(|i| 1.0 + (i % 7) as f32)
        .collect();
    let sample = LayerSample {
        q: &s.q,
        k: &k_sample,
        tokens: 2,
        num_qo_heads: hq,
        num_kv_heads: kv_heads,
        head_dim: d,
    };
    let config = ChannelConfig::calibrate(CalibrationMode::Qk, r, [(0, sample)]).unwrap();
    let config =
        ChannelConfig::from_json(&config.to_json(), CalibrationMode::Qk, 1, kv_heads, d, r)
            .unwrap();
    let channels = config.kv_head_channels(0, kv_heads).unwrap();
    for (g, list) in channels.iter().enumerate() {
        assert!(list.iter().all(|&c| live(g, c)), "KV head {g}: {list:?}");
    }
    let kv = s.kv();
    let labels = DsLabels::build(&kv, &s.table, channels).unwrap();
    let spec = VariantSpec {
        page_size: ps as u32,
        head_dim: d as u32,
        dtype: Dtype::F16,
        group_size: group as u32,
        kv_layout: KvLayout::Nhd,
        selector: Selector::DoubleSparse { channels: r as u32 },
        pruning: Pruning::None,
    };
    spec.validate().unwrap();
    let b0 = 40;
    let result = decode_step(
        &spec,
        &StepParams::new(b0, 0.9, 0.125),
        &StepInputs {
            q: &s.q,
            num_qo_heads: hq,
            kv,
            table: &s.table,
            quest: None,
            quant: None,
            ds: Some(&labels),
        },
    )
    .unwrap();
    for b in 0..s.table.batch() {
        let n = s.table.len_of(b);
        for g in 0..kv_heads {
            let exact: Vec<f64> = (0..n)
                .map(|t| {
                    let k = kv.try_k_row(s.table.try_slot(b, t).unwrap(), g).unwrap();
                    (g * group..(g + 1) * group)
                        .map(|h| {
                            let q = &s.q[(b * hq + h) * d..][..d];
                            q.iter()
                                .zip(k)
                                .map(|(&x, &y)| x as f64 * y as f64)
                                .sum::<f64>()
                        })
                        .sum()
                })
                .collect();
            let mut others: Vec<usize> = (0..n - 1).collect();
            others.sort_by(|&a, &c| exact[c].total_cmp(&exact[a]).then(a.cmp(&c)));
            let mut want: Vec<usize> = others[..b0 - 1].to_vec();
            want.push(n - 1);
            want.sort_unstable();
            let want: Vec<usize> = want
                .iter()
                .map(|&t| s.table.try_slot(b, t).unwrap())
                .collect();
            assert_eq!(
                result.candidates[b * kv_heads + g],
                want,
                "request {b}, KV head {g}"
            );
        }
    }
}

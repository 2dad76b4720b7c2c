//! The decode loop's model: its first logits agree between candle's attention and twilight
//! dense on the same caches, within f16 tolerance; the sparse path runs a few tokens with a
//! budget per sparse layer.

use candle_core::{DType, Tensor};

use crate::common;
use crate::decode_loop_example::model::{self, Caches, Config, Model, TwilightOps};

fn small() -> Config {
    Config {
        layers: 3,
        hidden: 1024,
        intermediate: 2048,
        vocab: 2000,
        ..Config::llama_8_layers()
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn first_logits_agree_between_candle_and_twilight_dense() {
    let Some(device) = common::gpu_device() else {
        return;
    };
    let seed = common::fresh_seed();
    let cfg = small();
    let (batch, prefill) = (3, 2500);
    let model = Model::random(cfg, &device, seed).unwrap();
    let mut ops = TwilightOps::new(&cfg, &device, Some((512, 0.9))).unwrap();
    let dims = (batch, prefill, cfg.kv_heads, cfg.head_dim);
    let mut caches = Caches::new(cfg, batch, prefill + 8, &device, &mut |_| {
        Ok((
            Tensor::randn(0f32, 1.0, dims, &device)?.to_dtype(DType::F16)?,
            Tensor::randn(0f32, 1.0, dims, &device)?.to_dtype(DType::F16)?,
        ))
    })
    .unwrap();
    ops.build_sidecars(&mut caches, prefill).unwrap();
    let (candle, twilight) =
        model::first_logits(&model, &mut caches, &mut ops, prefill, &device).unwrap();
    assert_eq!(candle.dims(), &[batch, cfg.vocab]);
    let (candle, twilight) = (common::download(&candle), common::download(&twilight));
    let scale = candle.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(scale > 0.0 && scale.is_finite(), "logits of scale {scale}");
    // f16 attention outputs carry about 3 digits; three layers of random weights carry the
    // difference to the logits without growing it much.
    common::assert_close("first logits", &twilight, &candle, 1e-2 * scale, 1e-2);

    // The sparse path: a few tokens, every sparse layer reporting a budget within B0.
    let table = caches.table(prefill + 1, &device).unwrap();
    let tokens = Tensor::from_vec(vec![1u32, 2, 3], batch, &device).unwrap();
    let mut budgets = Vec::new();
    model
        .step(&tokens, &vec![prefill; batch], &mut |l, q, k, v| {
            let (o, kept) = model::twilight_attention(
                &mut ops,
                &mut caches,
                &table,
                true,
                l,
                prefill,
                q,
                k,
                v,
            )?;
            if let Some(kept) = kept {
                budgets.push(kept.flatten_all()?.to_vec1::<i32>()?);
            }
            Ok(o)
        })
        .unwrap();
    assert_eq!(budgets.len(), cfg.layers - 2, "layers 0 and 1 run dense");
    for counts in budgets {
        assert!(counts.iter().all(|&c| (1..=512).contains(&c)), "{counts:?}");
    }
}

/// The decode loop's figures (the example's report): every attention path at batch 1 and 8 over
/// 32k-token caches, random and peaked K/V. Flags as the example's, from `DECODE_LOOP_ARGS`
/// (e.g. `--batch 1 --context 4096`); run with `--nocapture` to see them.
#[test]
#[ignore = "needs a CUDA GPU"]
fn decode_loop_report() {
    if common::gpu_device().is_none() {
        return;
    }
    let flags = std::env::var("DECODE_LOOP_ARGS").unwrap_or_default();
    let args =
        crate::decode_loop_example::parse_args(flags.split_whitespace().map(String::from)).unwrap();
    crate::decode_loop_example::report(&args).unwrap();
}

#!/usr/bin/env python3
"""PyTorch peers of twilight's benchmarks, for the GPU host's python3 with PyTorch.

Dense decode: torch.nn.functional.scaled_dot_product_attention with one query token per
request over a contiguous K/V of `len` tokens (GQA through enable_gqa), timed with CUDA events
(median after warm-up), rotating over several K/V sets so the L2 does not hold them.

    python3 bench/peers.py --batch 8 --qo-heads 32 --kv-heads 8 --head-dim 128 --len 32768
"""
import argparse
import json
import statistics

import torch
import torch.nn.functional as F


def sdpa_dense(batch, qo_heads, kv_heads, head_dim, length, dtype, warmup, iters):
    dev = torch.device("cuda")
    kv_bytes = 2 * batch * kv_heads * length * head_dim * 2
    rotation = max(2, min(16, -(-(2 << 30) // kv_bytes)))
    sets = []
    for _ in range(rotation):
        k = torch.randn(batch, kv_heads, length, head_dim, device=dev, dtype=dtype) * 0.5
        v = torch.randn(batch, kv_heads, length, head_dim, device=dev, dtype=dtype)
        sets.append((k, v))
    q = torch.randn(batch, qo_heads, 1, head_dim, device=dev, dtype=dtype)
    gqa = qo_heads != kv_heads

    def step(i):
        k, v = sets[i % rotation]
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)

    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(i)
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    us = [s.elapsed_time(e) * 1e3 for s, e in times]
    return {
        "peer": "torch_sdpa_dense",
        "torch": torch.__version__,
        "batch": batch, "qo_heads": qo_heads, "kv_heads": kv_heads, "head_dim": head_dim,
        "len": length, "dtype": str(dtype).replace("torch.", ""),
        "median_us": statistics.median(us), "min_us": min(us), "max_us": max(us),
        "iters": iters, "bytes": kv_bytes, "rotation": rotation,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--qo-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--len", type=int, default=32768)
    p.add_argument("--dtype", choices=["f16", "bf16"], default="f16")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--json", help="also write the result here")
    a = p.parse_args()
    dtype = torch.float16 if a.dtype == "f16" else torch.bfloat16
    r = sdpa_dense(a.batch, a.qo_heads, a.kv_heads, a.head_dim, a.len, dtype, a.warmup, a.iters)
    print(f"torch {r['torch']} SDPA dense decode: batch {a.batch}, {a.qo_heads}/{a.kv_heads} heads, "
          f"head_dim {a.head_dim}, {a.len} tokens, {a.dtype}: median {r['median_us']:.1f} us "
          f"(min {r['min_us']:.1f}, max {r['max_us']:.1f}) over {a.iters} runs, rotating {r['rotation']} K/V sets")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()

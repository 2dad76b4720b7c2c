"""Checks of bench/peers.py and bench/shapes.json, on the CPU with tiny shapes.

    python3 -m pytest bench/test_peers.py

The shape-list tests need only the standard library; the step tests need torch and are skipped
cleanly without it.
"""
import importlib
import json
import math
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = os.path.join(HERE, "shapes.json")
REQUIRED = ("name", "batch", "qo_heads", "kv_heads", "head_dim", "len", "page_size", "dtype",
            "budget", "p")


# ----------------------------------------------------------------------------------------------
# shapes.json
# ----------------------------------------------------------------------------------------------

def load_json_shapes():
    with open(SHAPES) as f:
        return json.load(f)["shapes"]


def test_shapes_parse_with_unique_names_and_required_keys():
    shapes = load_json_shapes()
    assert shapes, "empty shape list"
    names = [s["name"] for s in shapes]
    assert len(names) == len(set(names)), "duplicate names"
    for s in shapes:
        assert all(k in s for k in REQUIRED), s
        assert s["dtype"] in ("f16", "bf16"), s
        for k in REQUIRED:
            if k not in ("name", "dtype", "p"):
                assert isinstance(s[k], int) and s[k] > 0, (k, s)
        assert 0 < s["p"] <= 1
        assert s["qo_heads"] % s["kv_heads"] == 0


def test_shapes_follow_the_grid_rules():
    shapes = load_json_shapes()
    first = shapes[0]
    assert (first["batch"], first["qo_heads"], first["kv_heads"], first["len"],
            first["dtype"]) == (8, 32, 8, 32768, "f16"), "the headline shape comes first"
    seen = set()
    for s in shapes:
        assert s["budget"] == (8192 if s["len"] >= 32768 else s["len"] // 4), s
        assert s["p"] == 0.85 and s["head_dim"] == 128 and s["qo_heads"] == 32
        assert 2 * s["batch"] * s["kv_heads"] * s["len"] * s["head_dim"] * 2 <= 40 << 30, s
        seen.add((s["batch"], s["len"], s["kv_heads"], s["dtype"]))
    for batch in (1, 8, 32, 64):
        for length in (8192, 32768, 131072):
            for kvh in (32, 8):
                for dtype in ("f16", "bf16"):
                    fits = 2 * batch * kvh * length * 128 * 2 <= 40 << 30
                    assert ((batch, length, kvh, dtype) in seen) == fits, (batch, length, kvh)


# ----------------------------------------------------------------------------------------------
# The step (torch)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def peers():
    pytest.importorskip("torch")
    sys.path.insert(0, HERE)
    try:
        return importlib.import_module("peers")
    finally:
        sys.path.remove(HERE)


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def tiny_cache(peers, torch, batch=2, kv_heads=2, length=100, page_size=8, head_dim=16,
               dtype=None, seed=0, k_std=2.0):
    dtype = dtype or torch.float32
    shape = dict(batch=batch, kv_heads=kv_heads, len=length, page_size=page_size,
                 head_dim=head_dim)
    return peers.random_quest_cache(shape, torch.device("cpu"), dtype, seed, k_std)


def test_load_shapes_filters_and_rejects_unknown_names(peers):
    assert [s["name"] for s in peers.load_shapes(SHAPES, ["b1_8k_h32x8_bf16"])] == \
        ["b1_8k_h32x8_bf16"]
    assert len(peers.load_shapes(SHAPES)) == len(load_json_shapes())
    with pytest.raises(ValueError):
        peers.load_shapes(SHAPES, ["no_such_shape"])


def test_quantization_round_trip_within_half_a_step(peers, torch):
    g = torch.Generator().manual_seed(1)
    k = torch.randn(7, 3, 8, 32, generator=g) * 3
    k[0, 0, 0] = 0.25  # a constant row
    codes, scale_min = peers.quantize_k4(k)
    assert codes.dtype == torch.uint8 and codes.shape == (7, 3, 8, 16)
    assert scale_min.dtype == torch.float16 and scale_min.shape == (7, 3, 8, 2)
    deq = peers.dequant_k4(codes, scale_min)
    kmin, kmax = k.amin(-1, keepdim=True), k.amax(-1, keepdim=True)
    scale = (kmax - kmin).clamp_min(1e-6) / 15
    scale_h, min_h = scale_min.float().unbind(-1)
    # Half a step, plus what storing scale and min in f16 moves a code's value, plus f32 noise.
    bound = (0.5 * scale + (kmin - min_h[..., None]).abs()
             + 15 * (scale - scale_h[..., None]).abs() + 1e-6 * (1 + k.abs()))
    assert bool(((deq - k).abs() <= bound).all())
    assert bool(((deq[0, 0, 0] - 0.25).abs() < 1e-3).all())


def test_quantization_codes_packing_and_rounding(peers, torch):
    # kmin 0, kmax 15: scale 1, so each value is its own code; 2.5 rounds away from zero.
    row = torch.tensor([0.0, 15.0, 2.5, 3.4, 0.5, 14.6, 7.0, 8.0])
    codes, scale_min = peers.quantize_k4(row)
    want = [0, 15, 3, 3, 1, 15, 7, 8]
    assert codes.tolist() == [want[i] | (want[i + 1] << 4) for i in range(0, 8, 2)]
    assert scale_min.tolist() == [1.0, 0.0]
    assert peers.dequant_k4(codes, scale_min).tolist() == [float(c) for c in want]


def literal_quest_scores(q, cache):
    """sum_h sum_d max(q*max, q*min), straight from the definition."""
    import torch
    b, h, d = q.shape
    kvh, pages = cache.kv_heads, cache.pages_per_request
    qg = q.view(b, kvh, 1, h // kvh, d)
    mx = cache.page_max.view(b, pages, kvh, d).transpose(1, 2)[:, :, :, None, :]
    mn = cache.page_min.view(b, pages, kvh, d).transpose(1, 2)[:, :, :, None, :]
    return torch.maximum(qg * mx, qg * mn).sum((-1, -2))


def test_quest_scores_match_the_definition(peers, torch):
    cache = tiny_cache(peers, torch)
    q = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(3))
    got = peers.quest_scores(q, cache)
    want = literal_quest_scores(q, cache)
    assert got.shape == (2, 2, cache.pages_per_request)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("budget", [1, 8, 40, 41, 96, 100, 1000])
def test_quest_selection_keeps_the_last_page_and_the_budget(peers, torch, budget):
    cache = tiny_cache(peers, torch)  # 100 tokens in pages of 8: 13 pages, the last partial
    pages = cache.pages_per_request
    q = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(4))
    scores = peers.quest_scores(q, cache)
    sel = peers.quest_select(scores, budget, cache.page_size)
    n = min(pages, math.ceil(budget / cache.page_size))
    assert sel.shape == (2, 2, n)
    for b in range(2):
        for h in range(2):
            chosen = sel[b, h].tolist()
            assert len(set(chosen)) == n and pages - 1 in chosen
            others = [i for i in chosen if i != pages - 1]
            rest = [i for i in range(pages - 1) if i not in chosen]
            if others and rest:
                assert min(scores[b, h, others]) >= max(scores[b, h, rest])


def check_top_p(w, keep, p):
    """Sufficient (sum >= p) and minimal (the weights above the smallest kept one do not reach
    p, so dropping it, and its ties, goes below p), up to the f32 rounding of the running sum."""
    kept = w[keep]
    assert float(kept.double().sum()) >= p - 1e-6
    smallest = kept.min()
    assert float(w[keep & (w > smallest)].double().sum()) < p + 1e-6
    assert bool((w[~keep] < smallest).all()), "every weight tied with the threshold is kept"


@pytest.mark.parametrize("p", [1e-9, 0.3, 0.5, 0.85, 0.99, 0.999999])
def test_top_p_sets_are_sufficient_and_minimal(peers, torch, p):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 3, 64, generator=g) * 3
    logits[0, 0, :8] = 2.0  # ties among the largest
    logits[1, 1, 10:30] = -1.0  # ties in the middle
    w = torch.softmax(logits, -1)
    valid = torch.ones_like(w, dtype=torch.bool)
    keep = peers.top_p_keep(w, valid, p)
    for i in range(4):
        for j in range(3):
            check_top_p(w[i, j], keep[i, j], p)


def test_top_p_ties_and_invalid_slots(peers, torch):
    w = torch.tensor([[0.3, 0.4, 0.3, 0.0]])
    valid = torch.tensor([[True, True, True, False]])
    assert peers.top_p_keep(w, valid, 0.5).tolist() == [[True, True, True, False]]
    assert peers.top_p_keep(w, valid, 0.4).tolist() == [[False, True, False, False]]
    assert peers.top_p_keep(w, valid, 1.0).tolist() == [[True, True, True, False]]


def dense_attention(q, cache, sm_scale):
    """Softmax attention of every query head over its request's whole K/V, from the pages."""
    import torch
    b, h, d = q.shape
    kvh, pages, ps = cache.kv_heads, cache.pages_per_request, cache.page_size
    k = cache.k.view(b, pages, kvh, ps, d).transpose(1, 2).reshape(b, kvh, pages * ps, d)
    v = cache.v.view(b, pages, kvh, ps, d).transpose(1, 2).reshape(b, kvh, pages * ps, d)
    k, v = k[:, :, :cache.length], v[:, :, :cache.length]
    qg = q.view(b, kvh, h // kvh, d)
    w = torch.softmax(sm_scale * qg @ k.transpose(-1, -2), -1)
    return (w @ v).reshape(b, h, d)


@pytest.mark.parametrize("qo_heads,kv_heads,length", [(8, 2, 100), (4, 4, 64), (8, 1, 37)])
def test_full_budget_and_p_one_equal_dense_attention(peers, torch, qo_heads, kv_heads, length):
    cache = tiny_cache(peers, torch, kv_heads=kv_heads, length=length)
    q = torch.randn(2, qo_heads, 16, generator=torch.Generator().manual_seed(6))
    o, kept = peers.quest_topp_step(q, cache, budget=length, p=1.0)
    assert kept.tolist() == [[length] * kv_heads] * 2
    want = dense_attention(q, cache, 16 ** -0.5)
    torch.testing.assert_close(o, want, rtol=1e-5, atol=1e-5)


def loop_reference_step(peers, q, cache, budget, p, sm_scale):
    """The step per (request, KV head) with plain loops and lists, in f64 except the 4-bit
    estimate (f32, as the step): an independent check of the batched code."""
    import torch
    b, h, d = q.shape
    kvh, pages, ps = cache.kv_heads, cache.pages_per_request, cache.page_size
    g = h // kvh
    o = torch.zeros(b, h, d, dtype=torch.float64)
    kept_counts = torch.zeros(b, kvh, dtype=torch.int64)
    for r in range(b):
        for kh in range(kvh):
            heads = range(kh * g, (kh + 1) * g)
            page_ids = [r * pages + i for i in range(pages)]
            scores = [sum(float(torch.maximum(q[r, hh] * cache.page_max[pg, kh],
                                              q[r, hh] * cache.page_min[pg, kh]).double().sum())
                          for hh in heads) for pg in page_ids]
            n = min(pages, math.ceil(budget / ps))
            order = sorted(range(pages - 1), key=lambda i: -scores[i])
            chosen = sorted(order[:n - 1] + [pages - 1]) if n < pages else list(range(pages))
            slots = [(r * pages + i, t) for i in chosen for t in range(ps)
                     if i * ps + t < cache.length]
            keep = set()
            for hh in heads:
                est = torch.stack([peers.dequant_k4(cache.codes[pg, kh, t],
                                                    cache.scale_min[pg, kh, t])
                                   for pg, t in slots])
                w = torch.softmax(sm_scale * (est @ q[r, hh].float()).double(), 0).tolist()
                ranked = sorted(w, reverse=True)
                acc, thr = 0.0, ranked[-1]
                for x in ranked:
                    acc += x
                    if acc >= p:
                        thr = x
                        break
                keep |= {i for i, x in enumerate(w) if x >= thr}
            kept_counts[r, kh] = len(keep)
            ks = torch.stack([cache.k[slots[i][0], kh, slots[i][1]] for i in sorted(keep)])
            vs = torch.stack([cache.v[slots[i][0], kh, slots[i][1]] for i in sorted(keep)])
            for hh in heads:
                a = torch.softmax(sm_scale * (ks.double() @ q[r, hh].double()), 0)
                o[r, hh] = a @ vs.double()
    return o, kept_counts


@pytest.mark.parametrize("budget,p", [(40, 0.85), (24, 0.5), (1000, 0.9), (8, 0.99)])
def test_step_matches_a_loop_reference(peers, torch, budget, p):
    cache = tiny_cache(peers, torch, length=100, k_std=3.0, seed=7)
    q = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(8))
    o, kept = peers.quest_topp_step(q, cache, budget, p)
    want_o, want_kept = loop_reference_step(peers, q, cache, budget, p, 16 ** -0.5)
    assert kept.tolist() == want_kept.tolist()
    torch.testing.assert_close(o.double(), want_o, rtol=1e-5, atol=1e-5)


def test_step_runs_in_half_precision(peers, torch):
    for dtype in (torch.float16, torch.bfloat16):
        cache = tiny_cache(peers, torch, dtype=dtype)
        q = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(9)).to(dtype)
        o, kept = peers.quest_topp_step(q, cache, budget=40, p=0.85)
        assert o.dtype == dtype and o.shape == (2, 8, 16)
        assert bool(torch.isfinite(o).all()) and bool((kept >= 1).all())


def test_plan_rotation(peers):
    gib = 1 << 30
    assert peers.plan_rotation(gib // 4, 0, 60 * gib) == 8
    assert peers.plan_rotation(gib // 1024, 0, 60 * gib) == 16
    assert peers.plan_rotation(8 * gib, 0, 60 * gib) == 2
    assert peers.plan_rotation(32 * gib, gib, 60 * gib) == 1
    assert peers.plan_rotation(70 * gib, 0, 60 * gib) == 0


def test_script_end_to_end_on_cpu(peers, tmp_path, capsys):
    shapes = {"shapes": [
        {"name": "tiny_gqa", "batch": 2, "qo_heads": 8, "kv_heads": 2, "head_dim": 16,
         "len": 100, "page_size": 8, "dtype": "bf16", "budget": 40, "p": 0.85},
        {"name": "tiny_mha", "batch": 1, "qo_heads": 2, "kv_heads": 2, "head_dim": 16,
         "len": 64, "page_size": 16, "dtype": "f16", "budget": 64, "p": 0.9},
        {"name": "too_big", "batch": 64, "qo_heads": 2, "kv_heads": 2, "head_dim": 16,
         "len": 1 << 22, "page_size": 16, "dtype": "f16", "budget": 64, "p": 0.9}]}
    path = tmp_path / "shapes.json"
    path.write_text(json.dumps(shapes))
    out = tmp_path / "out.json"
    results = peers.main(["--device", "cpu", "--shapes", str(path), "--iters", "3",
                          "--warmup", "1", "--json", str(out), "--max-gib", "1"])
    printed = capsys.readouterr().out
    assert "skip too_big" in printed and "| tiny_gqa | torch_quest_topp |" in printed
    records = json.loads(out.read_text())
    assert records == results
    assert [(r["name"], r["peer"]) for r in records] == [
        ("tiny_gqa", "torch_sdpa_dense"), ("tiny_gqa", "torch_quest_topp"),
        ("tiny_mha", "torch_sdpa_dense"), ("tiny_mha", "torch_quest_topp")]
    for r in records:
        assert r["min_us"] <= r["median_us"] <= r["max_us"] and r["iters"] == 3
    assert 1 <= records[1]["kept_mean"] <= 40

#!/usr/bin/env python3
"""PyTorch peers of twilight's benchmarks, for the GPU host's python3 with PyTorch.

Both peers run on every shape of the shape list that `twilight bench` reads too
(bench/shapes.json), so their numbers join the same table:

  torch_sdpa_dense   torch.nn.functional.scaled_dot_product_attention, one query token per
                     request over a contiguous K/V of `len` tokens (GQA through enable_gqa).
  torch_quest_topp   the twilight step (Quest select, 4-bit estimate, top-p prune, exact
                     attention) written in plain PyTorch on a paged HND cache.

Timing: CUDA events around each step, median/min/max of --iters runs after --warmup runs,
rotating over several caches (about 2 GiB in all, at least 2 when they fit under --max-gib) so
that the L2 never holds the data a step reads. A shape whose tensors do not fit --max-gib is
skipped with the reason printed (and left out of --json).

--json writes a list of records, one per (shape, peer) run: the shape's fields, "peer",
"torch", "device", "median_us", "min_us", "max_us", "iters", "rotation", "set_bytes",
"generator" (how the inputs were drawn) and, for torch_quest_topp, "kept_mean" (mean kept count
per (request, KV head)).

    python3 bench/peers.py                                  # every shape, both peers
    python3 bench/peers.py --only b8_32k_h32x8_f16 --json peers.json

The step functions take tensors on any device, so bench/test_peers.py checks them on the CPU;
`--device cpu` runs the whole script there (wall-clock timing, for smoke tests only).
"""
import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GIB = 1 << 30
DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}
REQUIRED_KEYS = ("name", "batch", "qo_heads", "kv_heads", "head_dim", "len", "page_size",
                 "dtype", "budget", "p")
PEERS = ("torch_sdpa_dense", "torch_quest_topp")
ROTATION_BYTES = 2 * GIB  # far above any L2 (an H200 has 50 MiB)
MAX_ROTATION = 16
SLACK_BYTES = 256 << 20  # the allocator's rounding, cuBLAS/SDPA workspaces
Q4_STEPS = 15.0
Q4_MIN_RANGE = 1e-6
BUILD_CHUNK_ELEMS = 1 << 26  # K values quantized at a time: f32 temporaries of 256 MiB each


# ----------------------------------------------------------------------------------------------
# The shape list
# ----------------------------------------------------------------------------------------------

def load_shapes(path, only=None):
    """The shape records of `path`, in file order, optionally only the named ones.

    Every record must carry REQUIRED_KEYS; names must be unique. An unknown name in `only` is
    an error rather than an empty run, so a typo does not pass silently.
    """
    with open(path) as f:
        shapes = json.load(f)["shapes"]
    names = [s.get("name") for s in shapes]
    for s in shapes:
        missing = [k for k in REQUIRED_KEYS if k not in s]
        if missing:
            raise ValueError(f"{path}: shape {s.get('name')!r} lacks {missing}")
        if s["dtype"] not in DTYPES:
            raise ValueError(f"{path}: shape {s['name']!r} has unknown dtype {s['dtype']!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate shape names")
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ValueError(f"{path} has no shape named {unknown}")
        shapes = [s for s in shapes if s["name"] in only]
    return shapes


# ----------------------------------------------------------------------------------------------
# 4-bit K and Quest metadata (maintained by the append in twilight, so built outside the step)
# ----------------------------------------------------------------------------------------------

def quantize_k4(k):
    """4-bit asymmetric quantization per row (token and head) of `k [..., head_dim]`.

    Exactly DESIGN.md's rule, in f32: scale = max(kmax - kmin, 1e-6) / 15,
    code = clamp(round((k - kmin) / scale), 0, 15) with round half away from zero (CUDA's
    roundf, not torch.round's half to even). Returns `codes` uint8 `[..., head_dim/2]` (low
    nibble = even channel) and `scale_min` f16 `[..., 2]` = (scale, kmin).
    """
    x = k.float()
    kmin = x.amin(-1, keepdim=True)
    kmax = x.amax(-1, keepdim=True)
    scale = (kmax - kmin).clamp_min(Q4_MIN_RANGE) / Q4_STEPS
    t = (x - kmin) / scale  # >= 0, so half away from zero is floor + (frac >= 0.5)
    floor = t.floor()
    code = (floor + (t - floor >= 0.5).float()).clamp(0, Q4_STEPS).to(torch.uint8)
    codes = code[..., 0::2] | (code[..., 1::2] << 4)
    scale_min = torch.cat([scale, kmin], -1).to(torch.float16)
    return codes, scale_min


def dequant_k4(codes, scale_min):
    """f32 `[..., head_dim]` from 4-bit codes: code * scale + min, a multiply then an add."""
    c = torch.stack((codes & 15, codes >> 4), -1).flatten(-2).float()
    sm = scale_min.float()
    return c.mul_(sm[..., 0:1]).add_(sm[..., 1:2])


@dataclass
class QuestCache:
    """A paged HND cache with twilight's derived buffers; request b owns pages b*P .. b*P+P-1.

    k, v        [num_pages, kv_heads, page_size, head_dim]  (dtype)
    page_max/min [num_pages, kv_heads, head_dim]            (dtype, over the valid tokens)
    codes       [num_pages, kv_heads, page_size, head_dim/2] (uint8)
    scale_min   [num_pages, kv_heads, page_size, 2]          (f16)
    Every request holds `length` tokens; its last page may be partial.
    """
    k: torch.Tensor
    v: torch.Tensor
    page_max: torch.Tensor
    page_min: torch.Tensor
    codes: torch.Tensor
    scale_min: torch.Tensor
    batch: int
    length: int

    @property
    def page_size(self):
        return self.k.shape[2]

    @property
    def kv_heads(self):
        return self.k.shape[1]

    @property
    def pages_per_request(self):
        return self.k.shape[0] // self.batch

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in
                   (self.k, self.v, self.page_max, self.page_min, self.codes, self.scale_min))

    @staticmethod
    def from_kv(k, v, batch, length):
        """Builds the Quest bounds and the 4-bit copy of K, a chunk of pages at a time so the
        f32 temporaries stay small next to the cache itself."""
        num_pages, kv_heads, page_size, head_dim = k.shape
        chunk_pages = max(1, BUILD_CHUNK_ELEMS // (kv_heads * page_size * head_dim))
        pages = num_pages // batch
        page_max = torch.empty(num_pages, kv_heads, head_dim, dtype=k.dtype, device=k.device)
        page_min = torch.empty_like(page_max)
        codes = torch.empty(num_pages, kv_heads, page_size, head_dim // 2, dtype=torch.uint8,
                            device=k.device)
        scale_min = torch.empty(num_pages, kv_heads, page_size, 2, dtype=torch.float16,
                                device=k.device)
        offsets = torch.arange(page_size, device=k.device)
        for lo in range(0, num_pages, chunk_pages):
            hi = min(num_pages, lo + chunk_pages)
            kc = k[lo:hi]
            local = torch.arange(lo, hi, device=k.device) % pages
            valid = (local[:, None] * page_size + offsets[None, :] < length)[:, None, :, None]
            page_max[lo:hi] = kc.masked_fill(~valid, -math.inf).amax(2)
            page_min[lo:hi] = kc.masked_fill(~valid, math.inf).amin(2)
            codes[lo:hi], scale_min[lo:hi] = quantize_k4(kc)
        return QuestCache(k, v, page_max, page_min, codes, scale_min, batch, length)


def random_quest_cache(shape, device, dtype, seed, k_std=2.0):
    """A cache of standard normal K (times k_std, so attention is not flat) and V."""
    g = torch.Generator(device=device).manual_seed(seed)
    pages = -(-shape["len"] // shape["page_size"])
    dims = (shape["batch"] * pages, shape["kv_heads"], shape["page_size"], shape["head_dim"])
    k = torch.randn(dims, generator=g, device=device, dtype=dtype).mul_(k_std)
    v = torch.randn(dims, generator=g, device=device, dtype=dtype)
    return QuestCache.from_kv(k, v, shape["batch"], shape["len"])


# ----------------------------------------------------------------------------------------------
# The step: Quest select, 4-bit estimate, top-p prune, exact attention
# ----------------------------------------------------------------------------------------------

def bmm_f32(a, b):
    """Batched `a @ b`, accumulated and returned in f32, for inputs exact in a's dtype.

    On a GPU with f16/bf16 inputs cuBLAS multiplies them as they are and accumulates in f32
    (bmm's out_dtype): every product of two half values is exact in f32, so this matches an f32
    product without writing f32 copies of the operands. Elsewhere, in f32.
    """
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        try:
            return torch.bmm(a, b.to(a.dtype), out_dtype=torch.float32)
        except torch.cuda.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError):  # a PyTorch without bmm(out_dtype=)
            pass
    return torch.bmm(a.float(), b.float())


def quest_scores(q, cache):
    """Quest page scores `[batch, kv_heads, pages]` (f32) of every request's pages.

    score = sum over the group's query heads h and channels d of max(q[h,d]*max[d], q[h,d]*min[d]).
    Since max >= min, each term is relu(q).max + min(q,0).min: one product per bound. The
    product is a batched matmul of the bounds, viewed `[batch, pages, kv_heads*head_dim]` as
    they lie (no permuted copy), with a block-diagonal `[kv_heads*head_dim, qo_heads]` matrix
    holding each query head in its KV head's rows; the group is summed afterwards in f32. It
    reads every bound once, and the extra FLOPs of the zero blocks are free in a
    memory-bound stage.
    """
    b, h, d = q.shape
    kvh, pages = cache.kv_heads, cache.pages_per_request
    qg = q.view(b, kvh, h // kvh, d).permute(0, 2, 3, 1)  # [b, g, d, kvh]
    total = None
    for bound, part in ((cache.page_max, qg.clamp_min(0)), (cache.page_min, qg.clamp_max(0))):
        block = torch.diag_embed(part)  # [b, g, d, kvh, kvh]
        block = block.permute(0, 3, 2, 4, 1).reshape(b, kvh * d, h)
        s = bmm_f32(bound.view(b, pages, kvh * d).to(q.dtype), block)  # [b, pages, h]
        total = s if total is None else total.add_(s)
    return total.view(b, pages, kvh, h // kvh).sum(-1).transpose(1, 2)


def quest_select(scores, budget, page_size):
    """The selected page positions `[batch, kv_heads, n]` (int64, unordered).

    n = ceil(budget / page_size) pages (all when the request has fewer): the last page,
    always, and the highest-scoring others (torch.topk; exact ties may break differently
    from the CPU reference, which prefers the lower position).
    """
    b, kvh, pages = scores.shape
    n = min(pages, max(1, -(-budget // page_size)))
    if n == pages:
        return torch.arange(pages, device=scores.device).expand(b, kvh, pages)
    scores = scores.clone()
    scores[..., -1] = math.inf
    return scores.topk(n, dim=-1, sorted=False).indices


def page_rows(cache, sel):
    """Row ids `[batch * kv_heads * n]` of the selected (page, KV head) pairs in a buffer
    viewed `[num_pages * kv_heads, ...]`: each (request, KV head) reads its own pages, as a
    page table would direct."""
    b, kvh, _ = sel.shape
    first = torch.arange(b, device=sel.device).view(b, 1, 1) * cache.pages_per_request
    heads = torch.arange(kvh, device=sel.device).view(1, kvh, 1)
    return ((first + sel) * kvh + heads).flatten()


def gather_pages(buf, rows, b, kvh):
    """The selected pages of `buf [num_pages, kv_heads, page_size, x]` as
    `[batch, kv_heads, n * page_size, x]`: one index_select of whole (page, head) rows, which
    copies at several times the speed of advanced indexing with two index tensors."""
    x = buf.shape[-1]
    return buf.view(-1, buf.shape[2] * x).index_select(0, rows).view(b, kvh, -1, x)


def candidate_valid(sel, cache):
    """Which candidate slots `[batch, kv_heads, n*page_size]` hold a token (the last page may
    be partial)."""
    offsets = torch.arange(cache.page_size, device=sel.device)
    pos = sel[..., None] * cache.page_size + offsets
    return (pos < cache.length).flatten(-2)


def estimate_weights(q, cache, rows, valid, sm_scale):
    """Estimated attention weights `[batch, kv_heads, group, n*page_size]` (f32) of every
    query head over the candidates: softmax over the valid candidates of
    sm_scale * q . dequant(codes), dequant(codes) = code * scale + min.

    The dequantization is done here in the step, factored as
    q . dequant = scale * (q . code) + min * sum(q): equal in exact arithmetic, and it never
    writes a dequantized K (even and odd channels are the low and high nibbles).
    """
    b, h, d = q.shape
    kvh, g = cache.kv_heads, h // cache.kv_heads
    codes = gather_pages(cache.codes, rows, b, kvh).flatten(0, 1)  # [b*kvh, cand, d/2]
    scale, kmin = gather_pages(cache.scale_min, rows, b, kvh).float().unbind(-1)
    qg = q.view(b * kvh, g, d)
    qc = bmm_f32(qg[..., 0::2].contiguous(), (codes & 15).transpose(1, 2))
    qc.add_(bmm_f32(qg[..., 1::2].contiguous(), (codes >> 4).transpose(1, 2)))
    qsum = qg.float().sum(-1).view(b, kvh, g, 1)
    logits = qc.view(b, kvh, g, -1).mul_(scale[:, :, None, :]).add_(qsum * kmin[:, :, None, :])
    logits.mul_(sm_scale).masked_fill_(~valid[:, :, None, :], -math.inf)
    return torch.softmax(logits, dim=-1)


def top_p_keep(w, valid, p):
    """Per query head, the smallest set of largest weights whose sum is at least p.

    Sort descending and take the running sum; the threshold is the weight at which it first
    reaches p (the smallest valid weight when p >= 1 or when rounding keeps the sum below p);
    every valid weight >= the threshold is kept, so ties with it are all kept and nothing else
    beyond the minimal prefix. `w [..., n]`, `valid [..., n]` broadcastable; returns bool.
    """
    sorted_w = torch.sort(w, dim=-1, descending=True).values
    n_valid = valid.sum(-1, keepdim=True).expand(*w.shape[:-1], 1)
    if p >= 1.0:
        at = n_valid - 1
    else:
        below = (torch.cumsum(sorted_w, dim=-1) < p).sum(-1, keepdim=True)
        at = torch.minimum(below, n_valid - 1)
    threshold = sorted_w.gather(-1, at)
    return (w >= threshold) & valid


def attend(q, cache, rows, keep, sm_scale):
    """Exact attention `[batch, qo_heads, head_dim]` over the kept candidates.

    The straightforward PyTorch way: gather the candidates' full K/V and run SDPA with the kept
    set as a boolean mask (non-kept logits are -inf). This reads every candidate's K and V, not
    only the kept ones as twilight's kernel does; a PyTorch gather of a ragged kept list per
    (request, KV head) would need a host sync or padding to the candidate count anyway.
    """
    b, h, d = q.shape
    kvh = cache.kv_heads
    k = gather_pages(cache.k, rows, b, kvh)
    v = gather_pages(cache.v, rows, b, kvh)
    qg = q.to(cache.k.dtype).view(b, kvh, h // kvh, d)
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=keep[:, :, None, :], scale=sm_scale)
    return o.reshape(b, h, d)


def quest_topp_step(q, cache, budget, p, sm_scale=None):
    """One twilight decode step: `q [batch, qo_heads, head_dim]` -> (o, kept).

    o is `[batch, qo_heads, head_dim]` in the cache dtype; kept `[batch, kv_heads]` (int64) is
    the adaptive budget, the size of the union over the group's heads of their top-p sets.
    No host synchronization: every size comes from the shapes and B0. (twilight's step also
    writes the f32 lse per head; SDPA does not return it, and its bytes are negligible.)
    """
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    sel = quest_select(quest_scores(q, cache), budget, cache.page_size)
    rows = page_rows(cache, sel)
    valid = candidate_valid(sel, cache)
    w = estimate_weights(q, cache, rows, valid, sm_scale)
    keep = top_p_keep(w, valid[:, :, None, :], p).any(dim=2)
    return attend(q, cache, rows, keep, sm_scale), keep.sum(-1)


# ----------------------------------------------------------------------------------------------
# Memory plan and timing
# ----------------------------------------------------------------------------------------------

def sdpa_bytes(s):
    """(bytes of one K/V set, bytes of the step's other tensors) for the dense peer."""
    es = DTYPES[s["dtype"]].itemsize
    kv = 2 * s["batch"] * s["kv_heads"] * s["len"] * s["head_dim"] * es
    return kv, 2 * s["batch"] * s["qo_heads"] * s["head_dim"] * es + SLACK_BYTES


def quest_bytes(s):
    """(bytes of one cache with its derived buffers, bytes of the step's temporaries)."""
    es = DTYPES[s["dtype"]].itemsize
    b, kvh, d, ps = s["batch"], s["kv_heads"], s["head_dim"], s["page_size"]
    g = s["qo_heads"] // kvh
    pages = -(-s["len"] // ps)
    slots = b * pages * ps * kvh
    cache = slots * (2 * d * es + d // 2 + 4) + 2 * b * pages * kvh * d * es
    cand = b * kvh * min(pages, -(-s["budget"] // ps)) * ps
    # Per candidate token, the larger of the estimate's (gathered codes, two nibble planes as
    # bytes and as f32) and the attention's (gathered K and V), plus per query head the
    # logits, weights, sorted values and indices, cumsum and masks; then the page scores.
    # Building a cache adds the chunked quantization's f32 temporaries.
    per_token = max(d // 2 + d + 4 * d, 2 * d * es) + g * (4 * 4 + 8 + 4)
    step = cand * per_token + b * kvh * pages * 16
    build = min(BUILD_CHUNK_ELEMS, slots * d) * 4 * 6
    return cache, step + build + SLACK_BYTES


def plan_rotation(set_bytes, other_bytes, max_bytes):
    """How many sets to rotate over: enough for ROTATION_BYTES, at least 2, at most 16, as
    many as fit in max_bytes; 0 when not even one fits. One set that fits alone is still far
    larger than the L2 whenever two do not fit."""
    want = min(MAX_ROTATION, max(2, -(-ROTATION_BYTES // set_bytes)))
    fit = (max_bytes - other_bytes) // set_bytes
    return max(0, min(want, fit))


def time_us(step, rotation, warmup, iters, device):
    """Times `step(i)` (i picks the set) `iters` times after `warmup` runs; microseconds.

    On a GPU each run is bracketed by CUDA events and nothing is synchronized between runs, so
    launch overhead overlaps as it would in an engine; on the CPU, wall-clock per run.
    """
    for i in range(warmup):
        step(i % rotation)
    if device.type != "cuda":
        us = []
        for i in range(iters):
            t0 = time.perf_counter()
            step(i % rotation)
            us.append((time.perf_counter() - t0) * 1e6)
        return us
    torch.cuda.synchronize(device)
    events = []
    for i in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(i % rotation)
        end.record()
        events.append((start, end))
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) * 1e3 for s, e in events]


def record(shape, peer, us, rotation, set_bytes, device, **extra):
    """One result record: the shape, the peer, the timing and what the run was."""
    return {
        "name": shape["name"], "peer": peer, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        **{k: shape[k] for k in REQUIRED_KEYS if k != "name"},
        "median_us": statistics.median(us), "min_us": min(us), "max_us": max(us),
        "iters": len(us), "rotation": rotation, "set_bytes": set_bytes, **extra,
    }


# ----------------------------------------------------------------------------------------------
# The peers
# ----------------------------------------------------------------------------------------------

def run_sdpa_dense(shape, device, rotation, warmup, iters, seed=0):
    """Dense decode: SDPA with one query token per request over a contiguous K/V."""
    dtype = DTYPES[shape["dtype"]]
    b, h, kvh, d, n = (shape[k] for k in ("batch", "qo_heads", "kv_heads", "head_dim", "len"))
    g = torch.Generator(device=device).manual_seed(seed)
    sets = []
    for _ in range(rotation):
        k = torch.randn(b, kvh, n, d, generator=g, device=device, dtype=dtype).mul_(0.5)
        v = torch.randn(b, kvh, n, d, generator=g, device=device, dtype=dtype)
        sets.append((k, v))
    q = torch.randn(b, h, 1, d, generator=g, device=device, dtype=dtype)
    gqa = h != kvh

    def step(i):
        k, v = sets[i]
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)

    us = time_us(step, rotation, warmup, iters, device)
    return record(shape, "torch_sdpa_dense", us, rotation, sdpa_bytes(shape)[0], device,
                  generator="q, V ~ N(0,1); K ~ 0.5 N(0,1)")


def run_quest_topp(shape, device, rotation, warmup, iters, seed=0):
    """The twilight step in PyTorch; also reports the mean kept count per (request, KV head)."""
    dtype = DTYPES[shape["dtype"]]
    caches = [random_quest_cache(shape, device, dtype, seed + 1 + i) for i in range(rotation)]
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(shape["batch"], shape["qo_heads"], shape["head_dim"], generator=g,
                    device=device, dtype=dtype)
    budget, p = shape["budget"], shape["p"]

    def step(i):
        return quest_topp_step(q, caches[i], budget, p)

    kept = torch.stack([step(i)[1] for i in range(rotation)]).double().mean().item()
    us = time_us(step, rotation, warmup, iters, device)
    return record(shape, "torch_quest_topp", us, rotation, caches[0].nbytes(), device,
                  kept_mean=kept, generator="q, V ~ N(0,1); K ~ 2 N(0,1)")


RUNNERS = {"torch_sdpa_dense": (run_sdpa_dense, sdpa_bytes),
           "torch_quest_topp": (run_quest_topp, quest_bytes)}


def markdown_table(results):
    """The results as a markdown table, one row per (shape, peer)."""
    rows = ["| shape | peer | median us | min | max | kept (mean) | rotation |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        kept = f"{r['kept_mean']:.1f}" if "kept_mean" in r else ""
        rows.append(f"| {r['name']} | {r['peer']} | {r['median_us']:.1f} | {r['min_us']:.1f} | "
                    f"{r['max_us']:.1f} | {kept} | {r['rotation']} |")
    return "\n".join(rows)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="bench/shapes.json", help="the shape list (JSON)")
    ap.add_argument("--only", help="comma-separated shape names to run")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, of {PEERS}")
    ap.add_argument("--json", help="write the list of result records here")
    ap.add_argument("--max-gib", type=float, default=60.0,
                    help="skip a (shape, peer) whose tensors would exceed this many GiB")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--device", default="cuda", help="cuda (CUDA-event timing) or cpu (smoke)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    a.only = [n for n in a.only.split(",") if n] if a.only else None
    a.peers = [n for n in a.peers.split(",") if n]
    unknown = sorted(set(a.peers) - set(PEERS))
    if unknown:
        ap.error(f"unknown peers {unknown}; known: {PEERS}")
    return a


def main(argv=None):
    a = parse_args(argv)
    device = torch.device(a.device)
    shapes = load_shapes(a.shapes, a.only)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} on {where}: {len(shapes)} shapes, peers {a.peers}, "
          f"{a.iters} runs after {a.warmup} warm-up, budget {a.max_gib} GiB", flush=True)
    results = []
    for shape in shapes:
        for peer in a.peers:
            run, plan = RUNNERS[peer]
            set_bytes, other = plan(shape)
            rotation = plan_rotation(set_bytes, other, int(a.max_gib * GIB))
            if rotation == 0:
                print(f"skip {shape['name']} {peer}: one set needs "
                      f"{(set_bytes + other) / GIB:.1f} GiB > --max-gib {a.max_gib}", flush=True)
                continue
            r = run(shape, device, rotation, a.warmup, a.iters, a.seed)
            results.append(r)
            kept = f", kept {r['kept_mean']:.1f}" if "kept_mean" in r else ""
            print(f"{shape['name']} {peer}: median {r['median_us']:.1f} us (min "
                  f"{r['min_us']:.1f}, max {r['max_us']:.1f}), rotating {rotation}{kept}",
                  flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            # After every result, so a run cut short keeps what it measured.
            write_json(a.json, results)
    print()
    print(markdown_table(results))
    write_json(a.json, results)
    return results


def write_json(path, results):
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

//! How a step is laid out over the GPU, decided on the host from bounds alone (the longest
//! request, B0): so a step reads nothing back and can be captured in a CUDA graph.

use twilight_jit::{Selector, VariantSpec};

/// Blocks per SM the attention's split aims for: enough resident warps to keep every SM's
/// loads in flight.
const TARGET_BLOCKS_PER_SM: usize = 8;
/// Below this many tokens per block, merging a dense split costs more than it saves.
const MIN_CHUNK_TOKENS: usize = 256;

/// How dense attention splits each request's tokens over blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitPlan {
    /// Tokens per block; a multiple of the kernel's tile.
    pub chunk_tokens: usize,
    /// Blocks per (request, KV head).
    pub num_chunks: usize,
}

impl SplitPlan {
    /// The split for `rows` (request, KV head) pairs of at most `max_len` tokens, with tiles of
    /// `tile` tokens on `num_sms` multiprocessors: enough blocks to fill the GPU, chunks never
    /// below `MIN_CHUNK_TOKENS`.
    pub fn new(tile: usize, num_sms: usize, rows: usize, max_len: usize) -> SplitPlan {
        let chunk = max_len
            .div_ceil(wanted_blocks_per_row(num_sms, rows))
            .max(MIN_CHUNK_TOKENS)
            .next_multiple_of(tile.max(1));
        SplitPlan {
            chunk_tokens: chunk,
            num_chunks: max_len.div_ceil(chunk).max(1),
        }
    }
}

impl SplitPlan {
    /// The split for `rows` rows of at most `max_len` tokens, when `resident_blocks` blocks of
    /// the kernel fit on the device at once and a block's partial result costs as many bytes
    /// as `merge_tokens` tokens of K and V: the number of chunks whose blocks fill the
    /// resident slots most evenly (the fewest tokens per slot, counting each wave's longest
    /// chunk and one tile more per wave), chunks never below `MIN_CHUNK_TOKENS` unless the
    /// longest request is shorter. The extra tile is what a wave's blocks pay together before
    /// they stream: the first copies of every pipeline in flight at once, none yet computed.
    pub fn balanced(
        tile: usize,
        resident_blocks: usize,
        rows: usize,
        max_len: usize,
        merge_tokens: usize,
    ) -> SplitPlan {
        let tile = tile.max(1);
        let slots = resident_blocks.max(1);
        let rows = rows.max(1);
        let split = |wanted: usize| {
            let chunk = max_len
                .div_ceil(wanted)
                .max(MIN_CHUNK_TOKENS.min(max_len))
                .max(1)
                .next_multiple_of(tile);
            SplitPlan {
                chunk_tokens: chunk,
                num_chunks: max_len.div_ceil(chunk).max(1),
            }
        };
        // Beyond eight waves a finer split only adds merges.
        let most = max_len
            .div_ceil(MIN_CHUNK_TOKENS)
            .min(slots.saturating_mul(8).div_ceil(rows))
            .clamp(1, MAX_BALANCED_CHUNKS);
        let cost = |plan: &SplitPlan| {
            let blocks = rows.saturating_mul(plan.num_chunks);
            let waves = blocks.div_ceil(slots);
            let merge = if plan.num_chunks > 1 {
                blocks.saturating_mul(merge_tokens) / slots
            } else {
                0
            };
            waves
                .saturating_mul(plan.chunk_tokens.saturating_add(tile))
                .saturating_add(merge)
        };
        (1..=most)
            .map(split)
            .min_by_key(|plan| (cost(plan), plan.num_chunks))
            .unwrap_or_else(|| split(1))
    }
}

/// The most chunks the balanced split considers per row (at MIN_CHUNK_TOKENS each, a 1M-token
/// request).
const MAX_BALANCED_CHUNKS: usize = 4096;

fn wanted_blocks_per_row(num_sms: usize, rows: usize) -> usize {
    (num_sms * TARGET_BLOCKS_PER_SM)
        .div_ceil(rows.max(1))
        .max(1)
}

/// Blocks per (request, KV head) of a kernel whose warps each stream a contiguous share of a
/// row of `units` (pages, candidates) through a ring of asynchronous copies (the Quest
/// scoring, the pruner's estimate): as many as fit in one wave of the `slots` blocks the device
/// holds at once (a second, partial wave left SMs idle for its whole length), at least one,
/// and none without `units_per_block` units.
pub(crate) fn streaming_blocks_per_row(
    slots: usize,
    rows: usize,
    units: usize,
    units_per_block: usize,
) -> usize {
    let most = units.div_ceil(units_per_block.max(1));
    (slots / rows.max(1)).clamp(1, most.max(1))
}

/// The bounds of a step: what sizes every buffer and grid of its pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepPlan {
    /// Pages of the longest request.
    pub max_pages: usize,
    /// Token rows of per-token buffers: max_pages * page_size.
    pub max_tokens: usize,
    /// Pages the Quest selector keeps (the last page included): ceil(B0 / page_size), at most
    /// `max_pages`.
    pub budget_pages: usize,
    /// Row length of the selector's output: `budget_pages` page positions (quest), `max_cands`
    /// token positions (double_sparse), 0 for `full`.
    pub selected_stride: usize,
    /// Upper bound of candidates (and so of kept tokens) per (request, KV head).
    pub max_cands: usize,
    /// Attention: the smallest chunk of a list one block takes (sparse: one tile; dense: the
    /// [`SplitPlan`]'s chunk), and the blocks per (request, KV head).
    pub chunk_tokens: usize,
    pub num_chunks: usize,
    /// Whether every request fits the budget, so the base selector would choose all of each
    /// (Quest: B0 covers the longest request's pages; Double Sparsity: its tokens). The step
    /// then launches neither the selector's scoring nor its top-k, and the pruner reads every
    /// token of each request as its candidates, in the same order the selection would have
    /// written them.
    pub selects_everything: bool,
}

/// How the attention kernel of a step fills the device: its tile (chunks are whole tiles) and
/// how a dense split is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionGrid {
    /// Tokens one round of the kernel's block consumes.
    pub tile: usize,
    pub num_sms: usize,
    /// Blocks of the kernel the device holds at once, when known: dense splits are then
    /// [`SplitPlan::balanced`] over them, else [`SplitPlan::new`].
    pub resident_blocks: Option<usize>,
}

/// Whether `selector` with a budget of `budget` tokens chooses every token of every request of
/// at most `max_len` tokens on pages of `page_size`: Quest chooses whole pages, so B0 covers a
/// request whose pages are at most ceil(B0 / page_size); Double Sparsity chooses tokens; `full`
/// has no selector ([`StepPlan::selects_everything`]).
pub fn selects_everything(
    selector: Selector,
    page_size: usize,
    budget: usize,
    max_len: usize,
) -> bool {
    match selector {
        Selector::Quest => budget.div_ceil(page_size.max(1)) >= max_len.div_ceil(page_size.max(1)),
        Selector::DoubleSparse { .. } => budget >= max_len,
        Selector::Full => false,
    }
}

/// The plan of a sparse step (the same type: every variant has one plan).
pub type SparsePlan = StepPlan;

impl StepPlan {
    /// The bounds for `rows` (request, KV head) pairs of at most `max_len` tokens and a token
    /// budget B0 of `budget` (ignored by dense variants), with attention laid out as `grid`.
    pub fn new(
        spec: &VariantSpec,
        budget: usize,
        grid: AttentionGrid,
        rows: usize,
        max_len: usize,
    ) -> StepPlan {
        let AttentionGrid {
            tile,
            num_sms,
            resident_blocks,
        } = grid;
        let page_size = spec.page_size as usize;
        let max_pages = max_len.div_ceil(page_size).max(1);
        // A budget beyond the longest request selects every page either way.
        let budget_pages = budget.div_ceil(page_size).clamp(1, max_pages);
        let max_tokens = max_pages * page_size;
        let selects_everything = selects_everything(spec.selector, page_size, budget, max_len);
        let (max_cands, selected_stride) = match spec.selector {
            Selector::Quest => (budget_pages * page_size, budget_pages),
            Selector::DoubleSparse { .. } => {
                let cands = budget.min(max_len).max(1);
                (cands, cands)
            }
            Selector::Full => (max_tokens, 0),
        };
        let tile = tile.max(1);
        let (chunk_tokens, num_chunks) = if spec.is_dense() {
            // A chunk's partial output and its merge move 2 * group * head_dim floats: as many
            // bytes as 2 * group tokens of K and V.
            let merge_tokens = 2 * spec.group_size as usize;
            let split = match resident_blocks {
                Some(slots) => SplitPlan::balanced(tile, slots, rows, max_len, merge_tokens),
                None => SplitPlan::new(tile, num_sms, rows, max_len),
            };
            (split.chunk_tokens, split.num_chunks)
        } else {
            // Kept lists are of unknown length here: the kernel spreads each over num_chunks
            // blocks in chunks of at least one tile, so a short list takes one or two blocks
            // and the rest of its blocks exit at once.
            let chunks = wanted_blocks_per_row(num_sms, rows)
                .min(max_cands.div_ceil(tile))
                .max(1);
            (tile, chunks)
        };
        StepPlan {
            max_pages,
            max_tokens,
            budget_pages,
            selected_stride,
            max_cands,
            chunk_tokens,
            num_chunks,
            selects_everything,
        }
    }

    /// The split of dense attention, as [`SplitPlan`].
    pub fn split(&self) -> SplitPlan {
        SplitPlan {
            chunk_tokens: self.chunk_tokens,
            num_chunks: self.num_chunks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twilight_jit::{Dtype, KvLayout, Pruning};

    fn fill(tile: usize) -> AttentionGrid {
        AttentionGrid {
            tile,
            num_sms: 132,
            resident_blocks: None,
        }
    }

    #[test]
    fn balanced_splits_cover_the_longest_request_in_whole_tiles() {
        for max_len in [1, 31, 32, 255, 256, 257, 20_000, 32768, 131072, 1 << 20] {
            for rows in [1, 8, 64, 256, 2048] {
                for slots in [1, 132, 792] {
                    let plan = SplitPlan::balanced(32, slots, rows, max_len, 8);
                    let at = format!("len {max_len} rows {rows} slots {slots}: {plan:?}");
                    assert_eq!(plan.chunk_tokens % 32, 0, "{at}");
                    assert!(plan.num_chunks >= 1, "{at}");
                    assert!(plan.num_chunks * plan.chunk_tokens >= max_len, "{at}");
                    assert!(
                        (plan.num_chunks - 1) * plan.chunk_tokens < max_len.max(1),
                        "{at}"
                    );
                    // Chunks stay above the minimum unless one chunk holds the whole request.
                    assert!(
                        plan.chunk_tokens >= MIN_CHUNK_TOKENS.min(max_len.next_multiple_of(32))
                            || plan.num_chunks == 1,
                        "{at}"
                    );
                }
            }
        }
    }

    #[test]
    fn streaming_grids_fill_one_wave_without_idle_blocks() {
        // The headline's estimate: 64 rows of 8192 candidates, 4 warps of 32 per block, 924
        // slots (7 blocks on each of 132 SMs).
        assert_eq!(streaming_blocks_per_row(924, 64, 8192, 128), 14);
        // Batch 1: 8 rows spread until each block has its minimum.
        assert_eq!(streaming_blocks_per_row(924, 8, 8192, 128), 64);
        // A tiny row or more rows than slots: one block per row.
        assert_eq!(streaming_blocks_per_row(924, 8, 1, 128), 1);
        assert_eq!(streaming_blocks_per_row(924, 100_000, 8192, 128), 1);
        assert_eq!(streaming_blocks_per_row(924, 8, 0, 128), 1);
        assert_eq!(streaming_blocks_per_row(0, 8, 8192, 128), 1);
        for (rows, units) in [(1, 1), (1, 100), (8, 97), (64, 8192), (2048, 512)] {
            let parts = streaming_blocks_per_row(924, rows, units, 128);
            assert!(
                parts >= 1 && (parts - 1) * 128 < units,
                "{rows} {units} {parts}"
            );
            assert!(parts == 1 || parts * rows <= 924, "{rows} {units} {parts}");
        }
    }

    #[test]
    fn balanced_splits_fill_the_resident_slots() {
        // The headline (64 rows of 32k) on 792 slots: every wave but the last is full and the
        // blocks use at least 90% of the slots they occupy.
        let plan = SplitPlan::balanced(32, 792, 64, 32768, 8);
        let blocks = 64 * plan.num_chunks;
        let waves = blocks.div_ceil(792);
        assert!(blocks * 10 >= waves * 792 * 9, "{plan:?}");
        // Batch 1 (8 rows) still spreads over the whole device.
        let plan = SplitPlan::balanced(32, 792, 8, 32768, 8);
        assert!(8 * plan.num_chunks >= 700, "{plan:?}");
        // Many rows fill the device by themselves: chunks stay long.
        let plan = SplitPlan::balanced(32, 792, 4096, 8192, 8);
        assert!(plan.chunk_tokens >= 4096, "{plan:?}");
    }

    #[test]
    fn balanced_splits_pay_for_each_wave() {
        // Batch 1 with 32 KV heads on the H200's 264 slots of the tensor-core attention: one
        // wave of 4128-token chunks, not six of 672 (which save 96 rounded-up tokens per slot
        // but restart every pipeline five more times).
        let plan = SplitPlan::balanced(96, 264, 32, 32768, 2);
        assert_eq!((plan.chunk_tokens, plan.num_chunks), (4128, 8));
        // The headline keeps its one wave of four chunks.
        let plan = SplitPlan::balanced(96, 264, 64, 32768, 8);
        assert_eq!((plan.chunk_tokens, plan.num_chunks), (8256, 4));
    }

    #[test]
    fn split_plans_cover_the_longest_request_in_whole_tiles() {
        for max_len in [1, 255, 256, 257, 20_000, 32768, 131072] {
            for rows in [1, 8, 64, 2048] {
                let plan = SplitPlan::new(32, 132, rows, max_len);
                let at = format!("len {max_len} rows {rows}: {plan:?}");
                assert_eq!(plan.chunk_tokens % 32, 0, "{at}");
                assert!(plan.chunk_tokens >= MIN_CHUNK_TOKENS, "{at}");
                assert!(plan.num_chunks * plan.chunk_tokens >= max_len, "{at}");
                assert!(
                    (plan.num_chunks - 1) * plan.chunk_tokens < max_len.max(1),
                    "{at}"
                );
            }
        }
        // The headline shape fills the GPU: 64 rows of 32k tokens in 17 chunks of 1952.
        assert_eq!(
            SplitPlan::new(32, 132, 64, 32768),
            SplitPlan {
                chunk_tokens: 1952,
                num_chunks: 17
            }
        );
        let dense = VariantSpec::dense(16, 128, Dtype::F16, 4, KvLayout::Hnd);
        assert_eq!(
            StepPlan::new(&dense, 0, fill(32), 64, 32768).split(),
            SplitPlan::new(32, 132, 64, 32768)
        );
    }

    #[test]
    fn steps_whose_requests_fit_the_budget_select_everything() {
        let spec = |selector| VariantSpec {
            selector,
            pruning: Pruning::TopP,
            ..VariantSpec::dense(16, 128, Dtype::F16, 4, KvLayout::Hnd)
        };
        let quest = spec(Selector::Quest);
        let ds = spec(Selector::DoubleSparse { channels: 32 });
        let everything = |spec: &VariantSpec, budget, max_len| {
            StepPlan::new(spec, budget, fill(32), 64, max_len).selects_everything
        };
        // Quest chooses whole pages: B0 covers a request when its pages are at most
        // ceil(B0 / page_size), so 8177 tokens of budget cover 8192 (512 pages each).
        assert!(everything(&quest, 8192, 8192));
        assert!(everything(&quest, 8177, 8192));
        assert!(everything(&quest, usize::MAX, 100));
        assert!(!everything(&quest, 8176, 8192));
        assert!(!everything(&quest, 8192, 8193));
        // Double Sparsity chooses tokens.
        assert!(everything(&ds, 8192, 8192));
        assert!(!everything(&ds, 8191, 8192));
        assert!(!everything(&ds, 1, 2));
        assert!(everything(&ds, 1, 1));
        // `full` has no selector to skip.
        assert!(!everything(&spec(Selector::Full), usize::MAX, 16));
    }

    /// Every candidate list fits its row, every kept token is covered by a chunk, and chunks
    /// are whole tiles, over many shapes, up to budgets far beyond any request.
    #[test]
    fn plans_bound_every_list() {
        for selector in [
            Selector::Quest,
            Selector::Full,
            Selector::DoubleSparse { channels: 32 },
        ] {
            for page_size in [1u32, 16, 64] {
                let spec = VariantSpec {
                    selector,
                    pruning: Pruning::TopP,
                    ..VariantSpec::dense(page_size, 128, Dtype::F16, 4, KvLayout::Hnd)
                };
                for max_len in [1, 15, 16, 17, 1000, 32768, 131072] {
                    for budget in [1, 64, 8192, 1 << 20, usize::MAX] {
                        for rows in [1, 64, 4096] {
                            let plan = StepPlan::new(&spec, budget, fill(32), rows, max_len);
                            let ps = page_size as usize;
                            let pages = max_len.div_ceil(ps);
                            // The longest request's candidates: its selected pages, full.
                            let cands = match selector {
                                Selector::Quest => pages.min(budget.div_ceil(ps)) * ps,
                                Selector::DoubleSparse { .. } => budget.min(max_len),
                                Selector::Full => pages * ps,
                            };
                            let at =
                                format!("{spec} len {max_len} B0 {budget} rows {rows}: {plan:?}");
                            assert!(plan.max_cands >= cands.min(max_len), "{at}");
                            assert!(plan.max_cands <= plan.max_tokens, "{at}");
                            assert!(plan.max_pages >= pages && plan.budget_pages >= 1, "{at}");
                            assert!(plan.budget_pages <= plan.max_pages, "{at}");
                            assert!(plan.max_tokens >= max_len, "{at}");
                            // The selector's rows hold its whole choice.
                            match selector {
                                Selector::Quest => assert!(
                                    plan.selected_stride >= budget.div_ceil(ps).min(pages),
                                    "{at}"
                                ),
                                Selector::DoubleSparse { .. } => {
                                    assert!(plan.selected_stride >= budget.min(max_len), "{at}")
                                }
                                Selector::Full => {}
                            }
                            assert_eq!(plan.chunk_tokens % 32, 0, "{at}");
                            assert!(plan.num_chunks >= 1, "{at}");
                            // No more blocks than tiles of the longest possible list.
                            assert!(
                                plan.num_chunks <= plan.max_cands.div_ceil(32).max(1),
                                "{at}"
                            );
                        }
                    }
                }
            }
        }
    }
}

//! The whole decode step of a variant on the CPU: select, prune, attend.
//!
//! Per (request b, KV head g):
//! 1. **Select**: `full` takes every page; `quest` scores pages with [`quest_page_score`] and
//!    chooses with [`quest_select`] at `ceil(B0 / page_size)` pages, and the candidates are the
//!    valid tokens of the selected pages, as slots, in request order; `double_sparse(r)` scores
//!    tokens with [`ds_token_score`] on the label cache ([`DsLabels`]) and chooses B0 tokens
//!    with [`ds_select`] (the newest always among them), and the candidates are the selected
//!    tokens' slots in request order.
//! 2. **Prune**: `top_p` runs [`top_p_keep`] for every query head of the group on the
//!    estimate (the 4-bit copy of K against the query rounded to 8 bits, [`estimate_query`])
//!    and keeps the union; `none` keeps every candidate.
//! 3. **Attend**: [`attend`] over the kept slots (in request order) for every query head of the
//!    group.
//!
//! `full` + `none` therefore computes exactly what [`dense_decode`](super::dense_decode) does.
//!
//! [`quest_page_score`]: crate::reference::quest::quest_page_score
//! [`ds_token_score`]: crate::reference::double_sparse::ds_token_score

use twilight_jit::{Pruning, Selector, VariantSpec};

use crate::host::HostPageTable;
use crate::host::{HostError as Error, HostResult as Result};
use crate::reference::double_sparse::{check_channels, ds_scores, ds_select, DsLabels};
use crate::reference::quant::Quant4Cache;
use crate::reference::quest::{quest_budget_pages, quest_scores, quest_select, QuestMeta};
use crate::reference::top_p::{check_p, estimate_dot, estimate_query, softmax, top_p_keep};
use crate::reference::{attend, HostKv};

/// The run-time parameters of a step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepParams {
    /// Token budget of the selector (B0), at least 1. A request with no more tokens selects
    /// all of them.
    pub b0: usize,
    /// Top-p threshold, in (0, 1]. Checked even when the variant does not prune.
    pub p: f32,
    /// Scale of q.k, finite and positive (usually `1 / sqrt(head_dim)`).
    pub sm_scale: f32,
    /// Keep every candidate's estimated weight per query head in [`HeadDetail::weights`]
    /// (costs 8 bytes per candidate and head).
    pub record_weights: bool,
}

impl StepParams {
    pub fn new(b0: usize, p: f32, sm_scale: f32) -> StepParams {
        StepParams {
            b0,
            p,
            sm_scale,
            record_weights: false,
        }
    }
}

/// The inputs of a step. `q` is `[batch, num_qo_heads, head_dim]`, values exact in the
/// variant's dtype. `quest` is needed by the quest selector, `ds` by `double_sparse(r)` (its
/// `r` must be the variant's), `quant` by top-p; each is ignored by variants that do not read
/// it.
#[derive(Clone, Copy, Debug)]
pub struct StepInputs<'a> {
    pub q: &'a [f32],
    pub num_qo_heads: usize,
    pub kv: HostKv<'a>,
    pub table: &'a HostPageTable,
    pub quest: Option<&'a QuestMeta>,
    pub quant: Option<&'a Quant4Cache>,
    pub ds: Option<&'a DsLabels>,
}

/// Top-p details of one (request, query head).
#[derive(Clone, Debug, PartialEq)]
pub struct HeadDetail {
    /// How many candidates this head alone keeps.
    pub kept_count: usize,
    /// The head's threshold weight `w*`.
    pub threshold: f64,
    /// Estimated weight of every candidate (in candidate order), when
    /// [`StepParams::record_weights`] is set.
    pub weights: Option<Vec<f64>>,
}

/// The outcome of a step. Per-(request, KV head) lists are indexed `b * num_kv_heads + g`;
/// per-(request, query head) ones `b * num_qo_heads + h`.
#[derive(Clone, Debug, PartialEq)]
pub struct StepResult {
    /// `[batch, num_qo_heads, head_dim]`.
    pub o: Vec<f32>,
    /// `[batch, num_qo_heads]`, natural log.
    pub lse: Vec<f32>,
    /// Kept slots per (request, KV head), ascending.
    pub kept: Vec<Vec<usize>>,
    /// `kept[i].len()`: the adaptive budget per (request, KV head).
    pub kept_counts: Vec<usize>,
    /// Selected page positions (indices into the request's page list) per (request, KV head),
    /// ascending. `double_sparse` selects tokens, not pages: its lists are all empty (one per
    /// (request, KV head), so the indexing holds), and its selection is in `candidates`.
    pub selected_pages: Vec<Vec<usize>>,
    /// Candidate slots per (request, KV head), in request order: the valid tokens of the
    /// selected pages, or for `double_sparse` the selected tokens.
    pub candidates: Vec<Vec<usize>>,
    /// Top-p details per (request, query head); empty when the variant does not prune.
    pub heads: Vec<HeadDetail>,
}

fn param(msg: String) -> Error {
    Error::Parameter(msg)
}

/// Checks the inputs against each other and against the variant.
fn check(spec: &VariantSpec, params: &StepParams, x: &StepInputs) -> Result<()> {
    if params.b0 == 0 {
        return Err(param("token budget B0 is 0; it must be at least 1".into()));
    }
    check_p(params.p as f64)?;
    if !(params.sm_scale.is_finite() && params.sm_scale > 0.0) {
        return Err(param(format!(
            "sm_scale = {} must be finite and positive",
            params.sm_scale
        )));
    }
    let s = x.kv.shape;
    let name = spec.name();
    if spec.kv_layout != s.layout {
        return Err(Error::Layout {
            variant: name,
            expected: spec.kv_layout,
            got: s.layout,
        });
    }
    let eq = |what: &str, want: usize, got: usize| {
        if want == got {
            Ok(())
        } else {
            Err(Error::shape(what, want, got))
        }
    };
    eq(
        "page_size (variant vs cache)",
        spec.page_size as usize,
        s.page_size,
    )?;
    eq(
        "page_size (cache vs page table)",
        s.page_size,
        x.table.page_size(),
    )?;
    eq(
        "head_dim (variant vs cache)",
        spec.head_dim as usize,
        s.head_dim,
    )?;
    if s.num_kv_heads == 0 || !x.num_qo_heads.is_multiple_of(s.num_kv_heads) {
        return Err(Error::shape(
            "num_qo_heads (a multiple of num_kv_heads)",
            format!("a multiple of {}", s.num_kv_heads),
            x.num_qo_heads,
        ));
    }
    eq(
        "group_size (variant vs num_qo_heads / num_kv_heads)",
        spec.group_size as usize,
        x.num_qo_heads / s.num_kv_heads,
    )?;
    x.kv.check(x.table)?;
    let q_len = x
        .table
        .batch()
        .checked_mul(x.num_qo_heads)
        .and_then(|n| n.checked_mul(s.head_dim));
    if q_len != Some(x.q.len()) {
        return Err(Error::shape(
            "q elements ([batch, num_qo_heads, head_dim])",
            format!("{} x {} x {}", x.table.batch(), x.num_qo_heads, s.head_dim),
            x.q.len(),
        ));
    }
    x.table.validate(s.num_pages)?;
    if spec.selector == Selector::Quest {
        let meta = x.quest.ok_or_else(|| {
            param(format!(
                "variant {name} selects with Quest but no QuestMeta was given"
            ))
        })?;
        meta.check()?;
        eq(
            "Quest metadata [num_pages, num_kv_heads, head_dim]",
            s.num_pages * s.num_kv_heads * s.head_dim,
            meta.num_pages * meta.num_kv_heads * meta.head_dim,
        )?;
        eq("Quest metadata pages", s.num_pages, meta.num_pages)?;
        eq("Quest metadata heads", s.num_kv_heads, meta.num_kv_heads)?;
        eq("Quest metadata head_dim", s.head_dim, meta.head_dim)?;
        eq(
            "Quest page_max elements",
            meta.page_max.len(),
            meta.page_min.len(),
        )?;
        eq(
            "Quest page_max elements",
            s.num_pages * s.num_kv_heads * s.head_dim,
            meta.page_max.len(),
        )?;
    }
    if let Selector::DoubleSparse { channels: r } = spec.selector {
        let ds = x.ds.ok_or_else(|| {
            param(format!(
                "variant {name} selects with {} but no DsLabels was given",
                spec.selector.declared()
            ))
        })?;
        if ds.shape != s {
            return Err(Error::shape(
                "double-sparse label geometry",
                format!("{s:?}"),
                format!("{:?}", ds.shape),
            ));
        }
        if ds.r != r as usize {
            return Err(param(format!(
                "variant {name} selects with {} but the DsLabels hold r = {} channels",
                spec.selector.declared(),
                ds.r
            )));
        }
        check_channels(&ds.channels, s.num_kv_heads, s.head_dim, r as usize)?;
        ds.check()?;
        eq(
            "double-sparse labels [rows of K, r]",
            s.num_pages * s.num_kv_heads * s.page_size * ds.r,
            ds.labels.len(),
        )?;
    }
    if spec.pruning == Pruning::TopP {
        let quant = x.quant.ok_or_else(|| {
            param(format!(
                "variant {name} prunes with top-p but no Quant4Cache was given"
            ))
        })?;
        if quant.shape != s {
            return Err(Error::shape(
                "4-bit K geometry",
                format!("{s:?}"),
                format!("{:?}", quant.shape),
            ));
        }
        quant.check()?;
    }
    Ok(())
}

/// Runs one decode step of `spec` on the CPU.
///
/// # Errors
/// [`Error::Parameter`] for B0 = 0, p outside (0, 1], a non-finite or non-positive sm_scale, or
/// missing Quest metadata / double-sparse labels / 4-bit K, and for labels whose `r` is not the
/// variant's or whose channel lists are not one list per KV head of `r` ascending distinct ids
/// below head_dim; [`Error::Shape`] / [`Error::Layout`] / a page table error when the inputs
/// disagree with each other or with the variant.
pub fn decode_step(spec: &VariantSpec, params: &StepParams, x: &StepInputs) -> Result<StepResult> {
    check(spec, params, x)?;
    let s = x.kv.shape;
    let (d, ps) = (s.head_dim, s.page_size);
    let num_kv = s.num_kv_heads;
    let group = x.num_qo_heads / num_kv;
    let batch = x.table.batch();
    let sm_scale = params.sm_scale as f64;
    let p = params.p as f64;

    let mut r = StepResult {
        o: vec![0f32; batch * x.num_qo_heads * d],
        lse: vec![0f32; batch * x.num_qo_heads],
        kept: Vec::with_capacity(batch * num_kv),
        kept_counts: Vec::with_capacity(batch * num_kv),
        selected_pages: Vec::with_capacity(batch * num_kv),
        candidates: Vec::with_capacity(batch * num_kv),
        heads: Vec::new(),
    };
    let mut row = vec![0f32; d];
    for b in 0..batch {
        let req_pages = x.table.pages_of(b);
        let n_pages = req_pages.len();
        let last_len = x.table.kv_last_page_len()[b] as usize;
        let q_req = &x.q[b * x.num_qo_heads * d..][..x.num_qo_heads * d];
        for g in 0..num_kv {
            let q_group = &q_req[g * group * d..][..group * d];
            // 1. Select: pages (the candidates are their valid tokens), or tokens.
            let page_tokens = |pages: &[usize]| -> Vec<usize> {
                let mut candidates = Vec::new();
                for &pos in pages {
                    let page = req_pages[pos] as usize;
                    let valid = if pos + 1 == n_pages { last_len } else { ps };
                    candidates.extend((0..valid).map(|off| page * ps + off));
                }
                candidates
            };
            let (selected, candidates): (Vec<usize>, Vec<usize>) = match spec.selector {
                Selector::Full => {
                    let pages: Vec<usize> = (0..n_pages).collect();
                    let candidates = page_tokens(&pages);
                    (pages, candidates)
                }
                Selector::Quest => {
                    let meta = x.quest.expect("checked");
                    let scores = quest_scores(q_group, meta, x.table, b, g)?;
                    let pages = quest_select(&scores, quest_budget_pages(params.b0, ps)?);
                    let candidates = page_tokens(&pages);
                    (pages, candidates)
                }
                Selector::DoubleSparse { .. } => {
                    let ds = x.ds.expect("checked");
                    let scores = ds_scores(q_group, ds, x.table, b, g)?;
                    let tokens = ds_select(&scores, params.b0);
                    let candidates = tokens.iter().map(|&t| x.table.slot(b, t)).collect();
                    // Tokens, not pages: no page list.
                    (Vec::new(), candidates)
                }
            };
            // 2. Prune.
            let kept_in_order: Vec<usize> = match spec.pruning {
                Pruning::None => candidates.clone(),
                Pruning::TopP => {
                    let quant = x.quant.expect("checked");
                    // Each candidate is dequantized once and serves every head of the group.
                    let q8: Vec<Vec<f64>> = (0..group)
                        .map(|h| estimate_query(&q_group[h * d..][..d]))
                        .collect();
                    let mut logits = vec![Vec::with_capacity(candidates.len()); group];
                    for &slot in &candidates {
                        quant.dequantize(slot, g, &mut row)?;
                        for (l, q8) in logits.iter_mut().zip(&q8) {
                            l.push(sm_scale * estimate_dot(q8, &row));
                        }
                    }
                    let mut mask = vec![false; candidates.len()];
                    for l in logits {
                        let weights = softmax(&l);
                        let (kept, threshold) = top_p_keep(&weights, p)?;
                        for &i in &kept {
                            mask[i] = true;
                        }
                        r.heads.push(HeadDetail {
                            kept_count: kept.len(),
                            threshold,
                            weights: params.record_weights.then_some(weights),
                        });
                    }
                    candidates
                        .iter()
                        .zip(&mask)
                        .filter(|(_, &m)| m)
                        .map(|(&s, _)| s)
                        .collect()
                }
            };
            // 3. Attend.
            for h in 0..group {
                let qo = g * group + h;
                let (o, lse) = attend(&q_group[h * d..][..d], &x.kv, g, &kept_in_order, sm_scale)?;
                r.o[(b * x.num_qo_heads + qo) * d..][..d].copy_from_slice(&o);
                r.lse[b * x.num_qo_heads + qo] = lse;
            }
            let mut kept = kept_in_order;
            kept.sort_unstable();
            r.kept_counts.push(kept.len());
            r.kept.push(kept);
            r.selected_pages.push(selected);
            r.candidates.push(candidates);
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::{dense_decode, CacheShape};
    use twilight_jit::{Dtype, KvLayout};

    fn spec(selector: Selector, pruning: Pruning) -> VariantSpec {
        VariantSpec {
            page_size: 2,
            head_dim: 2,
            dtype: Dtype::F16,
            group_size: 1,
            kv_layout: KvLayout::Hnd,
            selector,
            pruning,
        }
    }

    /// One request of 5 tokens over pages [2, 0, 1] (pages of 2, last page holds 1 token),
    /// one KV head, head_dim 2. Keys are picked so that q = (1, 0) scores token t as k[t].x.
    fn fixture() -> (Vec<f32>, Vec<f32>, HostPageTable, CacheShape) {
        let shape = CacheShape {
            num_pages: 3,
            num_kv_heads: 1,
            page_size: 2,
            head_dim: 2,
            layout: KvLayout::Hnd,
        };
        // slot: page 0 = slots 0,1; page 1 = slots 2,3; page 2 = slots 4,5.
        // Request order: slots 4, 5 (page 2), 0, 1 (page 0), 2 (page 1).
        let mut k = vec![0f32; 12];
        let xs = [(4, 0.0), (5, 8.0), (0, 0.0), (1, 1.0), (2, 0.0), (3, 99.0)];
        for (slot, x) in xs {
            k[slot * 2] = x;
        }
        let v: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let table = HostPageTable::new(vec![0, 3], vec![2, 0, 1], vec![1], 2, 3).unwrap();
        (k, v, table, shape)
    }

    #[test]
    fn quest_picks_pages_and_full_none_is_dense() {
        let (k, v, table, shape) = fixture();
        let kv = HostKv {
            shape,
            k: &k,
            v: &v,
        };
        let meta = QuestMeta::build(&kv, &table).unwrap();
        let q = [1.0f32, 0.0];
        let x = StepInputs {
            q: &q,
            num_qo_heads: 1,
            kv,
            table: &table,
            quest: Some(&meta),
            quant: None,
            ds: None,
        };
        // B0 = 3 tokens -> 2 pages: the last (position 2) and the best other. Page scores:
        // position 0 (page 2): max 8; position 1 (page 0): max 1. Slot 3's 99 is past the end.
        let r = decode_step(
            &spec(Selector::Quest, Pruning::None),
            &StepParams::new(3, 1.0, 1.0),
            &x,
        )
        .unwrap();
        assert_eq!(r.selected_pages, vec![vec![0, 2]]);
        assert_eq!(r.candidates, vec![vec![4, 5, 2]]);
        assert_eq!(r.kept, vec![vec![2, 4, 5]]);
        assert_eq!(r.kept_counts, vec![3]);
        // B0 >= length: every page.
        let r = decode_step(
            &spec(Selector::Quest, Pruning::None),
            &StepParams::new(5, 1.0, 1.0),
            &x,
        )
        .unwrap();
        assert_eq!(r.selected_pages, vec![vec![0, 1, 2]]);
        let full = decode_step(
            &spec(Selector::Full, Pruning::None),
            &StepParams::new(1, 0.5, 0.7),
            &x,
        )
        .unwrap();
        let dense = dense_decode(&q, 1, &kv, &table, 0.7).unwrap();
        assert_eq!((full.o, full.lse), (dense.o, dense.lse));
    }

    #[test]
    fn top_p_prunes_the_peaked_head() {
        let (k, v, table, shape) = fixture();
        let kv = HostKv {
            shape,
            k: &k,
            v: &v,
        };
        let quant = Quant4Cache::build(&kv, &table).unwrap();
        let q = [4.0f32, 0.0];
        let x = StepInputs {
            q: &q,
            num_qo_heads: 1,
            kv,
            table: &table,
            quest: None,
            quant: Some(&quant),
            ds: None,
        };
        let mut params = StepParams::new(100, 0.9, 1.0);
        params.record_weights = true;
        let r = decode_step(&spec(Selector::Full, Pruning::TopP), &params, &x).unwrap();
        // Logit 32 for slot 5 against <= 4 for the others: slot 5 alone holds > 0.9.
        assert_eq!(r.kept, vec![vec![5]]);
        assert_eq!(r.heads.len(), 1);
        assert_eq!(r.heads[0].kept_count, 1);
        assert_eq!(r.heads[0].weights.as_ref().unwrap().len(), 5);
        // Attention over slot 5 alone returns its value row.
        assert_eq!(r.o, kv.try_v_row(5, 0).unwrap().to_vec());
    }

    #[test]
    fn bad_parameters_are_errors() {
        let (k, v, table, shape) = fixture();
        let kv = HostKv {
            shape,
            k: &k,
            v: &v,
        };
        let q = [1.0f32, 0.0];
        let x = StepInputs {
            q: &q,
            num_qo_heads: 1,
            kv,
            table: &table,
            quest: None,
            quant: None,
            ds: None,
        };
        let full = spec(Selector::Full, Pruning::None);
        let cases = [
            (full, StepParams::new(0, 0.9, 1.0), "B0"),
            (full, StepParams::new(4, 0.0, 1.0), "outside (0, 1]"),
            (full, StepParams::new(4, 1.5, 1.0), "outside (0, 1]"),
            (full, StepParams::new(4, f32::NAN, 1.0), "outside (0, 1]"),
            (full, StepParams::new(4, 0.9, 0.0), "sm_scale"),
            (full, StepParams::new(4, 0.9, f32::INFINITY), "sm_scale"),
            (
                spec(Selector::Quest, Pruning::None),
                StepParams::new(4, 0.9, 1.0),
                "QuestMeta",
            ),
            (
                spec(Selector::Full, Pruning::TopP),
                StepParams::new(4, 0.9, 1.0),
                "Quant4Cache",
            ),
            (
                spec(Selector::DoubleSparse { channels: 16 }, Pruning::TopP),
                StepParams::new(4, 0.9, 1.0),
                "no DsLabels",
            ),
            (
                VariantSpec {
                    head_dim: 4,
                    ..full
                },
                StepParams::new(4, 0.9, 1.0),
                "head_dim",
            ),
        ];
        for (spec, params, needle) in cases {
            let err = decode_step(&spec, &params, &x).unwrap_err().to_string();
            assert!(err.contains(needle), "{params:?}: {err}");
        }
    }
}

//! The scratch buffers of a step, kept between steps so that a step of a shape seen before
//! allocates nothing (and can be captured in a CUDA graph).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use twilight_jit::{Pruning, Selector, VariantSpec};

use crate::error::{Error, Result};
use crate::plan::StepPlan;

/// Scratch of every stage. The split counters (`done`) are reset to zero by the block that
/// merges a split, so they are zero between steps, as a fresh allocation is.
#[derive(Debug, Default)]
pub struct Workspace {
    pub(crate) scores: Option<CudaSlice<f32>>,
    pub(crate) selected: Option<CudaSlice<i32>>,
    pub(crate) selected_count: Option<CudaSlice<i32>>,
    /// Quest: the selected pages' ids in the pool (rows as `selected`), so the stages after the
    /// selection find a candidate's page in one load instead of two.
    pub(crate) selected_pages: Option<CudaSlice<i32>>,
    pub(crate) logits: Option<CudaSlice<f32>>,
    pub(crate) stats: Option<CudaSlice<f32>>,
    pub(crate) partial_o: Option<CudaSlice<f32>>,
    pub(crate) partial_lse: Option<CudaSlice<f32>>,
    pub(crate) done: Option<CudaSlice<i32>>,
    /// Whether the last step launched its selector (a step whose every request fits the
    /// budget takes every token without one, and leaves `selected` as it was).
    pub(crate) selection_written: bool,
}

/// The workspace of a sparse step (one type serves every variant).
pub type SparseWorkspace = Workspace;

impl Workspace {
    /// Grows every buffer `spec`'s pipeline uses to the sizes of `plan` over `batch` requests
    /// and `num_kv_heads` KV heads; allocates nothing when they are large enough.
    ///
    /// # Errors
    /// A size that overflows, or a failed allocation.
    pub(crate) fn ensure(
        &mut self,
        stream: &Arc<CudaStream>,
        spec: &VariantSpec,
        plan: &StepPlan,
        batch: usize,
        num_kv_heads: usize,
    ) -> Result<()> {
        let n = WorkspaceSizes::new(spec, plan, batch, num_kv_heads)?;
        self.selection_written = !plan.selects_everything;
        ensure_some(stream, &mut self.scores, n.scores, "selector scores")?;
        ensure_some(stream, &mut self.selected, n.selected, "selected positions")?;
        ensure_some(
            stream,
            &mut self.selected_count,
            n.selected_count,
            "selected counts",
        )?;
        ensure_some(
            stream,
            &mut self.selected_pages,
            n.selected_pages,
            "selected page ids",
        )?;
        ensure_some(stream, &mut self.logits, n.logits, "logits")?;
        ensure_some(stream, &mut self.stats, n.stats, "top-p thresholds")?;
        ensure_len(stream, &mut self.partial_o, n.partial_o, "partial o")?;
        ensure_len(stream, &mut self.partial_lse, n.partial_lse, "partial lse")?;
        ensure_len(stream, &mut self.done, n.done, "split counters")?;
        Ok(())
    }

    /// The selector's choice in the last step, copied to the host: positions, ascending, in
    /// rows of [`StepPlan::selected_stride`] (page positions for `quest`, token positions for
    /// `double_sparse`), and their count per (request, KV head). `None` for `full`, and after a
    /// step whose every request fits the budget ([`StepPlan::selects_everything`]): that step
    /// launched no selection and took every page or token. For tests and diagnostics; it
    /// synchronizes.
    ///
    /// # Errors
    /// A failed copy.
    pub fn selection(&self, stream: &Arc<CudaStream>) -> Result<Option<(Vec<i32>, Vec<i32>)>> {
        match (&self.selected, &self.selected_count) {
            (Some(sel), Some(count)) if self.selection_written => Ok(Some((
                stream
                    .clone_dtoh(sel)
                    .map_err(|e| Error::driver("downloading selected pages", e))?,
                stream
                    .clone_dtoh(count)
                    .map_err(|e| Error::driver("downloading selected counts", e))?,
            ))),
            _ => Ok(None),
        }
    }
}

/// [`ensure_len`] for a buffer the pipeline may not use (`None`).
fn ensure_some<E: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    slot: &mut Option<CudaSlice<E>>,
    len: Option<usize>,
    what: &str,
) -> Result<()> {
    len.map_or(Ok(()), |len| ensure_len(stream, slot, len, what))
}

/// Grows a reusable device buffer to at least `len` elements (allocating only when it is too
/// small, so steps of a shape seen before allocate nothing). A buffer of another context (a
/// workspace handed from one device's decoder to another's) is replaced: the kernels of this
/// stream's device cannot use it.
pub(crate) fn ensure_len<E: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    slot: &mut Option<CudaSlice<E>>,
    len: usize,
    what: &str,
) -> Result<()> {
    let usable =
        |s: &CudaSlice<E>| s.len() >= len && s.context().cu_ctx() == stream.context().cu_ctx();
    if !slot.as_ref().is_some_and(usable) {
        *slot = Some(
            stream
                .alloc_zeros::<E>(len.max(1))
                .map_err(|e| Error::driver(format!("allocating {what}"), e))?,
        );
    }
    Ok(())
}

/// The element counts of a step's scratch (every element is 4 bytes: f32 or i32); `None` for
/// a buffer the variant's pipeline does not use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkspaceSizes {
    pub scores: Option<usize>,
    pub selected: Option<usize>,
    pub selected_count: Option<usize>,
    pub selected_pages: Option<usize>,
    pub logits: Option<usize>,
    pub stats: Option<usize>,
    pub partial_o: usize,
    pub partial_lse: usize,
    pub done: usize,
}

impl WorkspaceSizes {
    /// The scratch of `spec`'s pipeline for `plan` over `batch` requests and `num_kv_heads`
    /// KV heads.
    ///
    /// # Errors
    /// [`Error::Parameter`] for a size that overflows.
    pub fn new(
        spec: &VariantSpec,
        plan: &StepPlan,
        batch: usize,
        num_kv_heads: usize,
    ) -> Result<WorkspaceSizes> {
        let size = |what: &str, factors: &[usize]| -> Result<usize> {
            factors
                .iter()
                .try_fold(1usize, |n, &f| n.checked_mul(f))
                .ok_or_else(|| Error::Parameter(format!("the {what} of this step overflow")))
        };
        let rows = size("rows", &[batch, num_kv_heads])?;
        let heads = size("query heads", &[rows, spec.group_size as usize])?;
        let (scores, selected, selected_count) = match spec.selector {
            Selector::Full => (None, None, None),
            Selector::Quest | Selector::DoubleSparse { .. } => {
                let score_rows = if spec.selector == Selector::Quest {
                    plan.max_pages
                } else {
                    plan.max_tokens
                };
                (
                    Some(size("selector scores", &[rows, score_rows])?),
                    Some(size("selected positions", &[rows, plan.selected_stride])?),
                    Some(rows),
                )
            }
        };
        let selected_pages = match spec.selector {
            Selector::Quest => selected,
            _ => None,
        };
        let (logits, stats) = if spec.pruning == Pruning::TopP {
            (
                Some(size("logits", &[heads, plan.max_cands])?),
                Some(size("top-p thresholds", &[heads, 2])?),
            )
        } else {
            (None, None)
        };
        let partials = if plan.num_chunks > 1 {
            size("attention partials", &[heads, plan.num_chunks])?
        } else {
            1
        };
        Ok(WorkspaceSizes {
            scores,
            selected,
            selected_count,
            selected_pages,
            logits,
            stats,
            partial_o: size("attention partials", &[partials, spec.head_dim as usize])?,
            partial_lse: partials,
            done: rows,
        })
    }

    /// Bytes of device memory the scratch takes.
    pub fn bytes(&self) -> usize {
        let optional = [
            self.scores,
            self.selected,
            self.selected_count,
            self.selected_pages,
            self.logits,
            self.stats,
        ];
        optional
            .iter()
            .flatten()
            .chain([&self.partial_o, &self.partial_lse, &self.done])
            .fold(0usize, |n, &len| n.saturating_add(len))
            .saturating_mul(4)
    }
}

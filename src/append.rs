//! The append launch shared by every decoder: new K/V rows and every structure the variant
//! derives from K, written by one kernel.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use twilight_jit::params::{AppendParams, ConstPtr, MutPtr};
use twilight_jit::{LoadedProgram, Stage};

use crate::decoder::check_pool_for;
use crate::element::KvElement;
use crate::error::{Error, Result};
use crate::kv_cache::{PagedKvCache, RequestId};
use crate::launch::{Grid, Launcher};
use crate::pool::{KvPoolMut, SidecarViewMut};

/// Groups the reserved slots (in token order) into one job per touched page:
/// `[page, first_offset, count, src_row]`. A page's new tokens are consecutive in the append, so
/// each page gets one job, and its block can update the page's metadata alone.
pub(crate) fn page_jobs(slots: &[i32], page_size: usize) -> Vec<i32> {
    let mut jobs: Vec<[i32; 4]> = Vec::new();
    for (row, &slot) in slots.iter().enumerate() {
        let page = slot / page_size as i32;
        let offset = slot % page_size as i32;
        match jobs.last_mut() {
            Some(job) if job[0] == page && job[1] + job[2] == offset => job[2] += 1,
            _ => jobs.push([page, offset, 1, row as i32]),
        }
    }
    jobs.concat()
}

pub(crate) fn append<T: KvElement>(
    stream: &Arc<CudaStream>,
    program: &LoadedProgram,
    cache: &mut PagedKvCache<T>,
    appends: &[(RequestId, usize)],
    k_new: &CudaSlice<T>,
    v_new: &CudaSlice<T>,
) -> Result<()> {
    let spec = program.spec;
    let shape = cache.shape();
    check_pool_for(&spec, shape, T::DTYPE)?;
    cache.check_derived_for(&spec)?;
    let tokens = appends
        .iter()
        .try_fold(0usize, |n, a| n.checked_add(a.1))
        .ok_or_else(|| Error::Parameter("the appended token counts overflow".into()))?;
    let row = shape.num_kv_heads * shape.head_dim;
    for (what, t) in [("k_new", k_new), ("v_new", v_new)] {
        if tokens.checked_mul(row) != Some(t.len()) {
            return Err(Error::shape(
                format!("{what} [tokens, num_kv_heads, head_dim]"),
                format!("{tokens} x {} x {}", shape.num_kv_heads, shape.head_dim),
                t.len(),
            ));
        }
    }
    if tokens == 0 {
        return Ok(());
    }
    let slots = cache.reserve(appends)?;
    write_slots(stream, program, cache.pool_mut(), &slots, k_new, v_new)
}

/// Writes the rows of `k_new`/`v_new` into `slots` (one per row, in order) of a pool, with
/// every structure of its sidecar, in one launch.
fn write_slots<T: KvElement>(
    stream: &Arc<CudaStream>,
    program: &LoadedProgram,
    pool: KvPoolMut<'_, T>,
    slots: &[i32],
    k_new: &CudaSlice<T>,
    v_new: &CudaSlice<T>,
) -> Result<()> {
    let jobs = page_jobs(slots, pool.shape.page_size);
    let num_jobs = jobs.len() / 4;
    let jobs = stream
        .clone_htod(&jobs)
        .map_err(|e| Error::driver("uploading append jobs", e))?;
    let function = crate::stages::function(program, &program.spec, Stage::Append)?;
    let KvPoolMut {
        shape,
        mut k,
        mut v,
        sidecar,
    } = pool;
    let SidecarViewMut {
        mut page_max,
        mut page_min,
        mut k_q4,
        mut k_q4_scale_min,
        mut k_label,
        ds_channels,
        ..
    } = sidecar;
    let mut l = Launcher::new(stream, false);
    // The kernel skips every structure whose pointer is null: those the variant does not keep.
    let params = AppendParams {
        k_new: l.read_elem(k_new),
        v_new: l.read_elem(v_new),
        jobs: l.read(&jobs),
        k_cache: l.write_elem(&mut k),
        v_cache: l.write_elem(&mut v),
        page_max: page_max.as_mut().map_or(MutPtr::NULL, |b| l.write_elem(b)),
        page_min: page_min.as_mut().map_or(MutPtr::NULL, |b| l.write_elem(b)),
        k_q4: k_q4.as_mut().map_or(MutPtr::NULL, |b| l.write(b)),
        k_q4_scale_min: k_q4_scale_min.as_mut().map_or(MutPtr::NULL, |b| l.write(b)),
        k_label: k_label.as_mut().map_or(MutPtr::NULL, |b| l.write_elem(b)),
        ds_channels: ds_channels.as_ref().map_or(ConstPtr::NULL, |b| l.read(b)),
        num_jobs: num_jobs as i32,
        num_kv_heads: shape.num_kv_heads as i32,
    };
    let grid = Grid::jobs(num_jobs, program.tiling.append_threads);
    // SAFETY: `function` is `_append`; k_new/v_new hold one row per slot (checked by the
    // caller), every job's page lies inside the pool (the slots were reserved in it), and the
    // sidecar pointers are null exactly for the structures the pool does not keep, which the
    // caller matched to the variant.
    unsafe { l.launch(function, grid, params, "append") }
}

#[cfg(test)]
mod tests {
    use super::page_jobs;

    #[test]
    fn jobs_group_consecutive_slots_of_a_page() {
        // page size 4: request A fills page 2 from offset 3 then page 5; request B starts page 7.
        let slots = [2 * 4 + 3, 5 * 4, 5 * 4 + 1, 7 * 4];
        assert_eq!(
            page_jobs(&slots, 4),
            vec![2, 3, 1, 0, 5, 0, 2, 1, 7, 0, 1, 3]
        );
    }
}

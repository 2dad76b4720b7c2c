//! The append launch shared by every decoder: new K/V rows and every structure the variant
//! derives from K, written by one kernel.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use twilight_jit::{LoadedProgram, Stage};

use crate::element::KvElement;
use crate::error::{Error, Result};
use crate::kv_cache::{DerivedKinds, PagedKvCache, RequestId};

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
    if T::DTYPE != spec.dtype {
        return Err(Error::Dtype {
            variant: spec.name(),
            expected: spec.dtype,
            got: T::DTYPE,
        });
    }
    if shape.layout != spec.kv_layout {
        return Err(Error::Layout {
            variant: spec.name(),
            expected: spec.kv_layout,
            got: shape.layout,
        });
    }
    if shape.page_size != spec.page_size as usize || shape.head_dim != spec.head_dim as usize {
        return Err(Error::shape(
            format!("cache (page_size, head_dim) for {spec}"),
            format!("({}, {})", spec.page_size, spec.head_dim),
            format!("({}, {})", shape.page_size, shape.head_dim),
        ));
    }
    cache.check_derived_for(&spec)?;
    let needed = DerivedKinds::for_spec(&spec);
    let tokens: usize = appends.iter().map(|a| a.1).sum();
    let row = shape.num_kv_heads * shape.head_dim;
    for (what, t) in [("k_new", k_new), ("v_new", v_new)] {
        if t.len() != tokens * row {
            return Err(Error::shape(
                format!("{what} [tokens, num_kv_heads, head_dim]"),
                format!(
                    "{tokens} x {} x {} = {}",
                    shape.num_kv_heads,
                    shape.head_dim,
                    tokens * row
                ),
                t.len(),
            ));
        }
    }
    if tokens == 0 {
        return Ok(());
    }
    let slots = cache.reserve(appends)?;
    let jobs = page_jobs(&slots, shape.page_size);
    let num_jobs = (jobs.len() / 4) as i32;
    let jobs = stream
        .clone_htod(&jobs)
        .map_err(|e| Error::driver("uploading append jobs", e))?;
    let heads_i = shape.num_kv_heads as i32;
    let function = program
        .function(Stage::Append)
        .ok_or_else(|| Error::Unsupported {
            variant: spec.name(),
            reason: "the program has no append stage".into(),
        })?;
    // Kernels take a null pointer for structures this variant does not keep.
    let null: u64 = 0;
    let mut launch = stream.launch_builder(function);
    launch.arg(k_new).arg(v_new).arg(&jobs);
    launch.arg(&mut cache.k).arg(&mut cache.v);
    let derived = &mut cache.derived;
    match (&mut derived.page_max, &mut derived.page_min) {
        (Some(max), Some(min)) if needed.quest => launch.arg(max).arg(min),
        _ => launch.arg(&null).arg(&null),
    };
    match (&mut derived.k_q4, &mut derived.k_q4_scale_min) {
        (Some(codes), Some(scales)) if needed.quant4 => launch.arg(codes).arg(scales),
        _ => launch.arg(&null).arg(&null),
    };
    match (&mut derived.k_label, &derived.ds_channels) {
        (Some(labels), Some(channels)) if needed.labels > 0 => launch.arg(labels).arg(channels),
        _ => launch.arg(&null).arg(&null),
    };
    launch.arg(&num_jobs).arg(&heads_i);
    let config = LaunchConfig {
        grid_dim: (num_jobs as u32, 1, 1),
        block_dim: (program.tiling.append_threads, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match the `_append` entry of append.cu.tera; k_new/v_new hold
    // `tokens` rows (checked), every job's page was reserved inside the pool, and the metadata
    // pointers are null exactly when the variant's kernel does not touch them.
    unsafe { launch.launch(config) }.map_err(|e| Error::driver("launching append", e))?;
    Ok(())
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

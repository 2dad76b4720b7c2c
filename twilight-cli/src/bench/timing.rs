//! CUDA-event timing: medians of repeated runs, of a whole step or of each stage of one.

use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaStream};
use twilight::twilight_jit::Stage;
use twilight::{Error, Result};

/// Timing of repeated runs of one thing, in microseconds.
#[derive(Clone, Debug, PartialEq)]
pub struct Timing {
    pub samples_us: Vec<f64>,
}

impl Timing {
    pub fn median_us(&self) -> f64 {
        let mut s = self.samples_us.clone();
        s.sort_by(f64::total_cmp);
        match s.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => s[n / 2],
            n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
        }
    }
    pub fn min_us(&self) -> f64 {
        self.samples_us
            .iter()
            .cloned()
            .fold(f64::INFINITY, f64::min)
    }
    pub fn max_us(&self) -> f64 {
        self.samples_us
            .iter()
            .cloned()
            .fold(f64::NEG_INFINITY, f64::max)
    }
}

/// Times `iterations` calls of `run(i)` after `warmup` untimed ones, each bracketed by its own
/// pair of CUDA events on `stream`.
///
/// # Errors
/// Whatever `run` returns, or a driver error on events.
pub fn time_with_events(
    stream: &Arc<CudaStream>,
    warmup: usize,
    iterations: usize,
    mut run: impl FnMut(usize) -> Result<()>,
) -> Result<Timing> {
    for i in 0..warmup {
        run(i)?;
    }
    let ctx = stream.context();
    let event = || {
        ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| driver_error("creating an event", e))
    };
    let mut pairs = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let (start, end) = (event()?, event()?);
        start
            .record(stream)
            .map_err(|e| driver_error("recording an event", e))?;
        run(warmup + i)?;
        end.record(stream)
            .map_err(|e| driver_error("recording an event", e))?;
        pairs.push((start, end));
    }
    stream
        .synchronize()
        .map_err(|e| driver_error("synchronizing", e))?;
    let samples_us = pairs
        .iter()
        .map(|(s, e)| s.elapsed_ms(e).map(|ms| ms as f64 * 1e3))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| driver_error("reading event times", e))?;
    Ok(Timing { samples_us })
}

/// A hook called before each launch of an instrumented step with the stage it launches, and
/// with `None` after the last (the contract of `SparseDecoder::run_instrumented`).
pub type StageHook<'a> = dyn FnMut(Option<Stage>) -> Result<()> + 'a;

/// Times every stage of `iterations` instrumented steps after `warmup` untimed ones:
/// `step(i, hook)` runs step `i` and calls `hook` as [`StageHook`] says, which records an event.
/// A stage lasts from its event to the next one. Stages come in launch order.
///
/// # Errors
/// Whatever `step` returns, or a driver error on events.
pub fn time_stages(
    stream: &Arc<CudaStream>,
    warmup: usize,
    iterations: usize,
    mut step: impl FnMut(usize, &mut StageHook) -> Result<()>,
) -> Result<Vec<(Stage, Timing)>> {
    let ctx = stream.context();
    let mut runs: Vec<Vec<(Option<Stage>, CudaEvent)>> = Vec::with_capacity(iterations);
    for i in 0..warmup + iterations {
        let mut marks = Vec::new();
        step(i, &mut |stage| {
            let event = ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| driver_error("creating an event", e))?;
            event
                .record(stream)
                .map_err(|e| driver_error("recording an event", e))?;
            marks.push((stage, event));
            Ok(())
        })?;
        if i >= warmup {
            runs.push(marks);
        }
    }
    stream
        .synchronize()
        .map_err(|e| driver_error("synchronizing", e))?;
    let mut stages: Vec<(Stage, Timing)> = Vec::new();
    for marks in &runs {
        for pair in marks.windows(2) {
            let (Some(stage), start, end) = (pair[0].0, &pair[0].1, &pair[1].1) else {
                continue;
            };
            let us = start
                .elapsed_ms(end)
                .map_err(|e| driver_error("reading event times", e))? as f64
                * 1e3;
            match stages.iter_mut().find(|(s, _)| *s == stage) {
                Some((_, timing)) => timing.samples_us.push(us),
                None => stages.push((
                    stage,
                    Timing {
                        samples_us: vec![us],
                    },
                )),
            }
        }
    }
    Ok(stages)
}

/// A driver failure of the benchmark's own work, as the library reports its own.
pub fn driver_error(what: impl Into<String>, e: impl std::fmt::Display) -> Error {
    Error::Driver {
        what: what.into(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max() {
        let t = Timing {
            samples_us: vec![3.0, 1.0, 2.0, 10.0],
        };
        assert_eq!((t.median_us(), t.min_us(), t.max_us()), (2.5, 1.0, 10.0));
        let odd = Timing {
            samples_us: vec![5.0, 1.0, 4.0],
        };
        assert_eq!(odd.median_us(), 4.0);
        assert!(Timing { samples_us: vec![] }.median_us().is_nan());
    }
}

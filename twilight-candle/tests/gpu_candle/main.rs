//! The GPU tests of the candle ops and of the decode loop, in one binary (each binary that
//! builds candle's CUDA backend carries its kernels, tens of MiB): dense decode equals candle's
//! own attention, the sparse step equals twilight's reference, the append writes where the host
//! page table says, the decode loop's first logits agree between candle's attention and
//! twilight dense; `decode_loop_report` prints the decode loop's figures.

mod common;
mod decode_loop;
#[path = "../../examples/decode_loop/main.rs"]
#[allow(dead_code)]
mod decode_loop_example;
mod ops;

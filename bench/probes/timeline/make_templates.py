#!/usr/bin/env python3
"""Writes a copy of templates/ whose every kernel entry stamps, once per block, its stage, the
block's position and SM, when its thread 0 started (%globaltimer, ns), and how long after that
its wait for the previous kernel returned and it left; a program prints a window of stamps
once the window is full. Run a step on these
templates through TWILIGHT_TEMPLATE_DIR and summarize the lines with summarize.py (README.md).

    python3 bench/probes/timeline/make_templates.py OUT_DIR [SKIP]

A program's first SKIP blocks (default 0) are not stamped, so that a window of steady-state
steps is: the first steps of a process pay for loading each kernel at its first launch.
"""
import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parents[3]
ENTRY_CALL = "tw_after_previous_kernel();"

# Inserted into common.cuh after tw_after_previous_kernel; every entry constructs one scope as
# its first statement, in place of its call to tw_after_previous_kernel.
SCOPE = r'''
// Timeline probe (bench/probes/timeline): one stamp per block, from its thread 0 (a block's
// threads may leave at different points; thread 0's exit stands for the block's, and no shared
// memory is added: QuestScore's blocks use all 48 KB of static shared memory). A program's
// blocks after its first TW_TIMELINE_SKIP store their stamps in a buffer of
// TW_TIMELINE_LINES, and the block that fills its last slot prints them all: no block waits on
// printf while its step runs, so the gaps between kernels are the step's own. (An earlier
// version printed from every block; its printed steps took 5-6 ms.)
#define TW_TIMELINE_LINES 14000u
#define TW_TIMELINE_SKIP @SKIP@u
struct tw_timeline_stamp {
  const char* stage;  // stored last: a slot is complete once it is set
  unsigned x, y, z, sm;
  unsigned long long start;
  unsigned waited, ended;  // ns after start
};
__device__ tw_timeline_stamp tw_timeline_stamps[TW_TIMELINE_LINES];
__device__ unsigned tw_timeline_blocks;
TW_DEVICE unsigned long long tw_timeline_now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
// Prints every slot, waiting for any block that holds a slot and has not filled it yet (it is
// running: it took its slot on its way out).
TW_DEVICE void tw_timeline_print() {
  for (unsigned i = 0; i < TW_TIMELINE_LINES; ++i) {
    const volatile tw_timeline_stamp* slot = tw_timeline_stamps + i;
    const char* stage;
    while ((stage = const_cast<const char*>(slot->stage)) == nullptr) {
    }
    __threadfence();
    printf("TWTL %s %u %u %u %u %llu %u %u\n", stage, slot->x, slot->y, slot->z, slot->sm, slot->start,
           slot->waited, slot->ended);
  }
}
struct tw_timeline_scope {
  const char* stage;
  unsigned long long start, waited;
  TW_DEVICE explicit tw_timeline_scope(const char* name) : stage(name) {
    start = tw_timeline_now();
    tw_after_previous_kernel();
    waited = tw_timeline_now();
  }
  TW_DEVICE ~tw_timeline_scope() {
    const unsigned long long end = tw_timeline_now();
    if (threadIdx.x != 0) return;
    const unsigned at = atomicAdd(&tw_timeline_blocks, 1u) - TW_TIMELINE_SKIP;
    if (at >= TW_TIMELINE_LINES) return;
    unsigned sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    tw_timeline_stamp& slot = tw_timeline_stamps[at];
    slot.x = blockIdx.x;
    slot.y = blockIdx.y;
    slot.z = blockIdx.z;
    slot.sm = sm;
    slot.start = start;
    slot.waited = unsigned(waited - start);
    slot.ended = unsigned(end - start);
    __threadfence();
    *const_cast<const char* volatile*>(&slot.stage) = stage;
    if (at == TW_TIMELINE_LINES - 1) tw_timeline_print();
  }
};
'''


def main() -> None:
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    out = pathlib.Path(sys.argv[1])
    skip = int(sys.argv[2]) if len(sys.argv) == 3 else 0
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(ROOT / "templates", out)
    common = out / "include/twilight/common.cuh"
    text = common.read_text()
    anchor = "// Thread-block clusters (sm_90 and later)"
    if anchor not in text:
        sys.exit(f"{common}: no `{anchor}` to insert the probe before")
    common.write_text(text.replace(anchor, SCOPE.lstrip("\n").replace("@SKIP@", str(skip)) + "\n" + anchor, 1))
    entries = 0
    for template in sorted(out.glob("*.cu.tera")):
        text = template.read_text()
        entries += text.count(ENTRY_CALL)
        # `__func__` is `<variant>_<stage>`: the stage's name starts sizeof("<variant>") bytes in.
        scope = 'const tw_timeline_scope tw_timeline(__func__ + sizeof("{{ variant }}"));'
        template.write_text(text.replace(ENTRY_CALL, scope))
    print(f"{out}: {entries} entries stamped")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Writes a copy of templates/ whose every kernel entry stamps, once per block, its stage, the
block's position and SM, when its thread 0 started (%globaltimer, ns), and how long after that
its wait for the previous kernel returned and it left; a program prints a window of stamps
once the window is full. Run a step on these
templates through TWILIGHT_TEMPLATE_DIR and summarize the lines with summarize.py (README.md).

    python3 bench/probes/timeline/make_templates.py OUT_DIR [SKIP] [--attend-phases]

A program's first SKIP blocks (default 0) are not stamped, so that a window of steady-state
steps is: the first steps of a process pay for loading each kernel at its first launch.
With --attend-phases, each block of the tensor-core attention also stamps three marks from its
thread 0: its list's length known (past the empty-chunk exit), its first tile's copies landed,
and its last tile done (the output or the split merge follows); blocks that exit empty leave
them 0.
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
  unsigned marks[3];       // ns after start, 0 where not reached (the attention's phases)
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
    printf("TWTL %s %u %u %u %u %llu %u %u %u %u %u\n", stage, slot->x, slot->y, slot->z, slot->sm,
           slot->start, slot->waited, slot->ended, slot->marks[0], slot->marks[1], slot->marks[2]);
  }
}
// A block's phase marks, kept by its thread 0 in shared memory. Only kernels whose scope has
// MARKS reference them: QuestScore's static shared memory is full.
TW_DEVICE unsigned long long* tw_timeline_marks() {
  __shared__ unsigned long long marks[3];
  return marks;
}
TW_DEVICE void tw_timeline_mark(int i) {
  if (threadIdx.x == 0) tw_timeline_marks()[i] = tw_timeline_now();
}
template <bool MARKS>
struct tw_timeline_scope {
  const char* stage;
  unsigned long long start, waited;
  TW_DEVICE explicit tw_timeline_scope(const char* name) : stage(name) {
    start = tw_timeline_now();
    if constexpr (MARKS) {
      if (threadIdx.x == 0) tw_timeline_marks()[0] = tw_timeline_marks()[1] = tw_timeline_marks()[2] = 0;
    }
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
    for (int i = 0; i < 3; ++i) {
      unsigned long long mark = 0;
      if constexpr (MARKS) mark = tw_timeline_marks()[i];
      slot.marks[i] = mark ? unsigned(mark - start) : 0u;
    }
    __threadfence();
    *const_cast<const char* volatile*>(&slot.stage) = stage;
    if (at == TW_TIMELINE_LINES - 1) tw_timeline_print();
  }
};
'''


# Where --attend-phases marks the tensor-core attention (twilight/attend.cuh, tw_attend_mma):
# each anchor is found once, after the kernel's struct begins, and the mark goes after it.
ATTEND_MMA = "struct tw_attend_mma {"
ATTEND_MARKS = [
    ("    const int end = min(len, begin + chunk_tokens);\n", "    tw_timeline_mark(0);\n"),
    ("      tw_copy_async_wait<STAGES - 1>();\n      __syncwarp();\n", "      if (i == 0) tw_timeline_mark(1);\n"),
    ("    tw_copy_async_wait<0>();\n", "    tw_timeline_mark(2);\n"),
]


def mark_attend_phases(header: pathlib.Path) -> None:
    text = header.read_text()
    at = text.find(ATTEND_MMA)
    if at < 0:
        sys.exit(f"{header}: no `{ATTEND_MMA}` to mark")
    head, body = text[:at], text[at:]
    for anchor, mark in ATTEND_MARKS:
        if body.count(anchor) != 1:
            sys.exit(f"{header}: the anchor {anchor!r} is not found exactly once in tw_attend_mma")
        body = body.replace(anchor, anchor + mark, 1)
    header.write_text(head + body)


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--attend-phases"]
    phases = len(args) != len(sys.argv) - 1
    if len(args) not in (1, 2):
        sys.exit(__doc__)
    out = pathlib.Path(args[0])
    skip = int(args[1]) if len(args) == 2 else 0
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
        marks = "true" if phases and template.name == "attend.cu.tera" else "false"
        scope = f'const tw_timeline_scope<{marks}> tw_timeline(__func__ + sizeof("{{{{ variant }}}}"));'
        template.write_text(text.replace(ENTRY_CALL, scope))
    if phases:
        mark_attend_phases(out / "include/twilight/attend.cuh")
    print(f"{out}: {entries} entries stamped")


if __name__ == "__main__":
    main()

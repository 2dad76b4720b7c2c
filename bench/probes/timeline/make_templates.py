#!/usr/bin/env python3
"""Writes a copy of templates/ whose every kernel entry prints, once per block, its stage, the
block's position and SM, when its thread 0 started (%globaltimer, ns), and how long after that
its wait for the previous kernel returned and it left. Run a step on these
templates through TWILIGHT_TEMPLATE_DIR and summarize the lines with summarize.py (README.md).

    python3 bench/probes/timeline/make_templates.py OUT_DIR [SKIP]

A program's first SKIP blocks (default 0) do not print, so that a window of steady-state steps
does: the first steps of a process pay for loading each kernel at its first launch.
"""
import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parents[3]
ENTRY_CALL = "tw_after_previous_kernel();"

# Inserted into common.cuh after tw_after_previous_kernel; every entry constructs one scope as
# its first statement, in place of its call to tw_after_previous_kernel.
SCOPE = r'''
// Timeline probe (bench/probes/timeline): one line per block on stdout, from its thread 0 (a
// block's threads may leave at different points; thread 0's exit stands for the block's, and
// no shared memory is added: QuestScore's blocks use all 48 KB of static shared memory). The
// first TW_TIMELINE_LINES blocks of a program print, so that the lines fit the device's printf
// buffer (1 MB unless the host raises it) until the next synchronization, after the first
// TW_TIMELINE_SKIP blocks.
#define TW_TIMELINE_LINES 14000u
#define TW_TIMELINE_SKIP @SKIP@u
__device__ unsigned tw_timeline_lines;
TW_DEVICE unsigned long long tw_timeline_now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
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
    if (threadIdx.x == 0 &&
        atomicAdd(&tw_timeline_lines, 1u) - TW_TIMELINE_SKIP < TW_TIMELINE_LINES) {
      unsigned sm;
      asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
      printf("TWTL %s %u %u %u %u %llu %u %u\n", stage, blockIdx.x, blockIdx.y, blockIdx.z, sm, start,
             unsigned(waited - start), unsigned(end - start));
    }
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

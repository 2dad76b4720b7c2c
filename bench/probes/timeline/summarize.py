#!/usr/bin/env python3
"""Summarizes the probe's lines (make_templates.py), one row per kernel launch in launch order,
times in microseconds from the first block's start:

    stage, blocks, SMs, first and last block start, first and last return from the
    wait for the previous kernel, last end, and the first start minus the previous launch's
    last end (negative: the launch overlapped it).

Lines of one kernel belong to one launch until a block starts after every block of that
launch so far has ended (the same kernel is not launched again before its previous launch
ends: each step's kernels wait for one another).

    python3 bench/probes/timeline/summarize.py < demo-output.txt
"""
import sys


def main() -> None:
    by_kernel = {}
    for line in sys.stdin:
        if not line.startswith("TWTL "):
            continue
        _, kernel, _x, _y, _z, sm, start, waited, end = line.split()
        start = int(start)
        by_kernel.setdefault(kernel, []).append((start, start + int(waited), start + int(end), int(sm)))
    if not by_kernel:
        sys.exit("no TWTL lines: was the step run on the probe's templates?")
    launches = []
    for kernel, blocks in by_kernel.items():
        blocks.sort()
        current, last_end = [], None
        for block in blocks:
            if current and block[0] > last_end:
                launches.append((kernel, current))
                current = []
            current.append(block)
            last_end = block[2] if len(current) == 1 else max(last_end, block[2])
        launches.append((kernel, current))
    launches.sort(key=lambda launch: launch[1][0][0])
    t0 = launches[0][1][0][0]

    def us(t: int) -> str:
        return f"{(t - t0) / 1e3:9.2f}"

    print(f"{'stage':28} {'blocks':>6} {'SMs':>4} {'start':>9} {'last st':>9} "
          f"{'wait':>9} {'last wt':>9} {'end':>9} {'vs prev':>8}")
    prev_end = None
    for kernel, blocks in launches:
        starts = [b[0] for b in blocks]
        waits = [b[1] for b in blocks]
        end = max(b[2] for b in blocks)
        gap = "" if prev_end is None else f"{(min(starts) - prev_end) / 1e3:8.2f}"
        print(f"{kernel[:28]:28} {len(blocks):6} {len({b[3] for b in blocks}):4} {us(min(starts))} "
              f"{us(max(starts))} {us(min(waits))} {us(max(waits))} {us(end)} {gap:>8}")
        prev_end = end


if __name__ == "__main__":
    main()

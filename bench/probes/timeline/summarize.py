#!/usr/bin/env python3
"""Summarizes the probe's lines (make_templates.py), one row per kernel launch in launch order,
times in microseconds from the first block's start:

    stage, blocks, SMs, first and last block start, first and last return from the
    wait for the previous kernel, last end, and the first start minus the previous launch's
    last end (negative: the launch overlapped it).

Lines of one kernel belong to one launch until a block starts after every block of that
launch so far has ended (the same kernel is not launched again before its previous launch
ends: each step's kernels wait for one another).

Where blocks carry phase marks (make_templates.py --attend-phases), each such launch is
followed by a line of the medians and maxima, over its marked blocks, of the time from the
wait to the list's length, from there to the first tile's copies, from there to the last
tile, and from there to the block's end; and a line of when, from the launch's first start, the
blocks' first tiles landed and their last tiles were done (10th percentile, median, maximum).

    python3 bench/probes/timeline/summarize.py < demo-output.txt
"""
import statistics
import sys


def main() -> None:
    by_kernel = {}
    for line in sys.stdin:
        if not line.startswith("TWTL "):
            continue
        fields = line.split()
        kernel, sm, start, waited, end = fields[1], fields[5], fields[6], fields[7], fields[8]
        marks = tuple(int(m) for m in fields[9:12]) if len(fields) >= 12 else (0, 0, 0)
        start = int(start)
        by_kernel.setdefault(kernel, []).append((start, start + int(waited), start + int(end), int(sm), marks))
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
        print_phases(blocks, min(starts))
        prev_end = end


def print_phases(blocks, t0: int) -> None:
    # (start, wait, end) are absolute; marks are ns after the block's start, all three set.
    marked = [b for b in blocks if all(b[4])]
    if not marked:
        return
    spans = []
    for start, wait, end, _sm, marks in marked:
        at = [wait] + [start + m for m in marks] + [end]
        spans.append([(at[i + 1] - at[i]) / 1e3 for i in range(4)])
    names = ("wait->length", "->first tile", "->last tile", "->end")
    cells = "  ".join(
        f"{name} {statistics.median(s[i] for s in spans):.2f}/{max(s[i] for s in spans):.2f}"
        for i, name in enumerate(names))
    print(f"  {len(marked)} blocks with work, median/max us: {cells}")
    # When the blocks' streams start and stop, from the launch's first start: a wide spread of
    # last tiles over blocks of equal work is a tail of unequal bandwidth, not of work.
    def spread(times) -> str:
        times = sorted((t - t0) / 1e3 for t in times)
        return f"{times[len(times) // 10]:.1f}/{statistics.median(times):.1f}/{times[-1]:.1f}"
    first = spread(start + marks[1] for start, _w, _e, _sm, marks in marked)
    last = spread(start + marks[2] for start, _w, _e, _sm, marks in marked)
    print(f"  from the launch's start, p10/median/max us: first tile landed {first}, last tile done {last}")


if __name__ == "__main__":
    main()

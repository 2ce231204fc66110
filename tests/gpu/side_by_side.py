"""The table of run.sh's side-by-side benchmark (phase 2b), in Markdown on stdout.

  side_by_side.py FOLDER ROUNDS SOURCE

FOLDER holds baseline-R.json and current-R.json for R = 1..ROUNDS (spotrain-gpu-train
--json); SOURCE names the baseline's commit. A round whose file is missing or whose
precision failed shows as "failed"; the ratio is of the medians over the rounds that ran; the exit status is 1
when either side has no result at all.
"""
import json
import os
import statistics
import sys


def load(folder, which, rounds):
    """precision -> [(ms per step, MFU or None) or None for a failed round, one per round]."""
    found = {}
    for r in range(rounds):
        path = os.path.join(folder, f"{which}-{r + 1}.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            results = json.load(f)["results"]
        for res in results:
            slots = found.setdefault(res["precision"], [None] * rounds)
            if res["ok"]:
                mfu = res["mfu"] if res["peak_tflops"] > 0 else None
                slots[r] = (res["ms_per_step"], mfu)
    return found


def main(folder, rounds, source):
    base, cur = load(folder, "baseline", rounds), load(folder, "current", rounds)
    print(f"Side by side on this GPU: baseline = {source}; current = this package.")
    print("Rounds alternate baseline, current; ms/step is each round's mean over the timed steps.")
    print()
    print("| precision | baseline ms/step | current ms/step | current / baseline "
          "| baseline MFU | current MFU |")
    print("|---|---|---|---|---|---|")
    order = ["fp32", "tf32", "bf16"]
    for p in sorted(set(base) | set(cur), key=lambda p: (order.index(p) if p in order else 9, p)):
        b = [x for x in base.get(p, []) if x]
        c = [x for x in cur.get(p, []) if x]
        times = lambda slots: " / ".join(f"{x[0]:.1f}" if x else "failed" for x in slots)
        mfus = lambda xs: [m for _, m in xs if m is not None]
        mfu = lambda xs: f"{100 * statistics.median(mfus(xs)):.1f}%" if mfus(xs) else "n/a"
        ratio = "n/a"
        if b and c:
            ratio = f"{statistics.median(ms for ms, _ in c) / statistics.median(ms for ms, _ in b):.3f}"
        print(f"| {p} | {times(base.get(p, [None] * rounds))} | {times(cur.get(p, [None] * rounds))} "
              f"| {ratio} | {mfu(b)} | {mfu(c)} |")
    return 0 if base and cur else 1


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))

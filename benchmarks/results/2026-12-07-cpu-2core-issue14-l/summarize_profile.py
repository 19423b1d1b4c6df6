"""Summarize a py-spy ``--format raw`` profile: the share of samples per frame (self and
inclusive), the inclusive list narrowed to TokenDance and the model's forward.

    python summarize_profile.py sched.txt[.gz] > profile.txt
"""

from __future__ import annotations

import gzip
import sys
from collections import Counter


def main(path: str, top: int = 25) -> None:
    total, own, incl = 0, Counter(), Counter()
    opener = gzip.open if path.endswith(".gz") else open
    for line in opener(path, "rt"):
        stack, _, n = line.rstrip().rpartition(" ")
        if not stack:
            continue
        frames, count = stack.split(";"), int(n)
        total += count
        own[frames[-1]] += count
        for f in sorted(set(frames)):
            incl[f] += count
    print(f"samples: {total}")
    print("--- self time (share of samples)")
    for f, c in own.most_common(top):
        print(f"{100 * c / total:5.1f}%  {f[:140]}")
    print("--- inclusive (TokenDance, the model's forward, the scheduler's batch)")
    keep = ("tokendance", "forward", "run_batch", "event_loop")
    shown = 0
    for f, c in incl.most_common():
        if any(k in f for k in keep):
            print(f"{100 * c / total:5.1f}%  {f[:140]}")
            shown += 1
            if shown >= 2 * top:
                break


if __name__ == "__main__":
    main(sys.argv[1])

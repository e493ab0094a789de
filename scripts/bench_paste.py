"""PASTE on BFCL multi-turn tasks: serial loop vs PASTE vs a bigram predictor vs an oracle.

Replays each test task's gold calls with real decoding on SmolLM2-135M between calls (see
jaxlab/agents/bench.py), prints the table and writes the numbers and a per-task plot:

    python scripts/bench_paste.py                 # 12 test tasks, 6 modes: ~15 min, busy 2 cores
    python scripts/bench_paste.py --test-tasks 0  # all 60 test tasks

Takes every option of `python -m jaxlab agents bench`; writes docs/results/paste_bfcl.{json,png}
unless --json / --plot say otherwise.
"""

from __future__ import annotations

import sys

from jaxlab.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--json" not in argv:
        argv += ["--json", "docs/results/paste_bfcl.json"]
    if "--plot" not in argv:
        argv += ["--plot", "docs/results/paste_bfcl.png"]
    if "--overwrite" not in argv:
        argv.append("--overwrite")
    sys.exit(main(["agents", "bench", *argv]))

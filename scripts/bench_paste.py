"""PASTE on BFCL multi-turn tasks: serial loop vs PASTE vs a bigram predictor vs an oracle.

Replays each test task's gold calls with real decoding on SmolLM2-135M between calls (see
jaxlab/agents/bench.py), prints the table and writes the numbers and a per-task plot:

    python scripts/bench_paste.py                 # 12 test tasks, 6 modes: ~15 min, busy 2 cores
    python scripts/bench_paste.py --test-tasks 0  # all 60 test tasks
    python scripts/bench_paste.py --workload research --test-tasks 0 --sleep-per-token 3.5 \
        --sleep-fixed 3                           # scripted research tasks (search / fetch chains)

Takes every option of `python -m jaxlab agents bench`; writes docs/results/paste_bfcl.{json,png}
(with --workload research: docs/results/paste_research.{json,png}) unless --json / --plot say
otherwise.
"""

from __future__ import annotations

import sys

from jaxlab.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    research = any(a.startswith(("research", "--workload=research")) for a in argv)
    name = "docs/results/paste_research" if research else "docs/results/paste_bfcl"
    if "--json" not in argv:
        argv += ["--json", f"{name}.json"]
    if "--plot" not in argv:
        argv += ["--plot", f"{name}.png"]
    if "--overwrite" not in argv:
        argv.append("--overwrite")
    sys.exit(main(["agents", "bench", *argv]))

#!/usr/bin/env bash
# Kernel block-size / warp sweep on one GPU (prints one JSON row per setting).
set -u
B="python3 scripts/bench_sparse_attention.py"
$B --lengths 32768 131072 --json $OUT/bench_default.json
for cfg in "--block-k 128 --num-warps 8 --num-stages 2" "--block-k 64 --num-warps 4 --num-stages 3" \
           "--block-k 128 --num-warps 8 --num-stages 3" "--block-k 64 --num-warps 8 --num-stages 3"; do
  echo "== $cfg"; $B --lengths 32768 --skip-backward $cfg | tail -1
done
echo "== bwd-block 32"; $B --lengths 32768 --bwd-block 32 | tail -1

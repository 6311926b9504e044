#!/usr/bin/env bash
# The SAE template's GPU check, prepared to run as one command on a machine with CUDA (under 10 minutes).
#
#   bash bench/gpu_check.sh [OUT_DIR]      (OUT_DIR defaults to $OUT, else ./gpu_check_out)
#   bash bench/gpu_check.sh --dry-run DIR  (the same plumbing on the CPU in about a minute: cpu preset, SAE_FAST)
#
# Needs python3 with torch (CUDA build), numpy, scipy and rich; nothing is installed or downloaded.
# 1. the throughput table of bench/sae_template.py (CPU and CUDA rows, FLOP ceiling);
# 2. the template's baseline on the gpu preset, one seed, both conditions, 10,000 steps each, with the
#    metrics the orchestrator would read (final_info.json) and the whole log;
# 3. bench/sae_sweep.py on the gpu preset's clean data: lr x l1_coeff, what each recovers (for tuning the preset).
# Everything lands in OUT_DIR: env.txt, bench.txt, baseline.log, final_info.json, run_info.json, sweep.txt.
# Each part has its own time limit (120 + 240 + 180 s), so the whole stays under 10 minutes.
set -uo pipefail
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out=${1:-${OUT:-./gpu_check_out}}
mkdir -p "$out"
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

{
  date -u
  if command -v nvidia-smi >/dev/null; then nvidia-smi -L; else echo "nvidia-smi: not found"; fi
  "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
} 2>&1 | tee "$out/env.txt"

if [ $dry -eq 1 ]; then
  bench_args=(--steps 3); run_env=(SAE_PRESET=cpu SAE_FAST=1)
  sweep_args=(--preset cpu --steps 200 --lr 5e-3 --l1 0.5,3 --budget-s 30)
else
  bench_args=(); run_env=(SAE_PRESET=gpu)
  sweep_args=(--preset gpu --lr 1e-3,4e-3,1e-2 --l1 1.2,2.5 --budget-s 100)
fi
[ $dry -eq 1 ] || "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || {
  echo "error: torch sees no CUDA device; this check is for a GPU machine" >&2
  exit 2
}

echo "== throughput (bench/sae_template.py)"
(cd "$root" && PYTHONPATH=. timeout 120 "$py" bench/sae_template.py "${bench_args[@]}") 2>&1 | tee "$out/bench.txt"
bench_rc=${PIPESTATUS[0]}

echo "== baseline, ${run_env[*]} SAE_SEEDS=1"
work=$(mktemp -d)
cp "$root"/templates/sae/*.py "$work"/
(cd "$work" && env "${run_env[@]}" SAE_SEEDS=1 timeout 240 "$py" experiment.py --out_dir=run_0) 2>&1 | tee "$out/baseline.log"
run_rc=${PIPESTATUS[0]}
cp "$work"/run_0/final_info.json "$work"/run_0/run_info.json "$out"/ 2>/dev/null
rm -rf "$work"

echo "== sweep (bench/sae_sweep.py ${sweep_args[*]})"
(cd "$root" && PYTHONPATH=. timeout 180 "$py" bench/sae_sweep.py "${sweep_args[@]}") 2>&1 | tee "$out/sweep.txt"
sweep_rc=${PIPESTATUS[0]}

echo "== exit statuses: bench $bench_rc, baseline $run_rc, sweep $sweep_rc"
[ "$bench_rc" -eq 0 ] && [ "$run_rc" -eq 0 ] && [ "$sweep_rc" -eq 0 ]

#!/usr/bin/env bash
# The GPU check, one script, under 8 minutes on one GPU; run it whenever a GPU machine is at hand:
#
#   bash bench/gpu_smoke.sh                       # CUDA + NCCL
#   GPU_SMOKE_DEVICE=cpu bash bench/gpu_smoke.sh  # the same steps on CPU + gloo (checks the script itself)
#
# 1. Makes sure the project and its cluster extra import: the project's .venv, else the machine's python3 with
#    wheels from $DISTILL_WHEELS (a machine without a registry: `pip download` them elsewhere, carry the
#    folder), else a fresh .venv from the lock (TORCH_SPEC picks the CUDA torch build).
# 2. Prints the devices.
# 3. The online distributed path with tiny models (distill prepare-demo's teacher, cached): Ray teacher actor,
#    buffer shard, DeepSpeed student rank(s) on NCCL; 2 student ranks when the machine has 3+ GPUs, else 1
#    (teacher and student share the GPU). Prints the run's last metrics row and eval.json.
# 4. bench/student_memory.py on the device at a real student width (Qwen2.5-3B's 2,048; V 151,936; T 8,192):
#    unfused vs fused head peak memory and step time.
# Every figure is printed; the run folder and logs stay under $GPU_SMOKE_OUT (default /tmp/gpu_smoke).
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE="${GPU_SMOKE_DEVICE:-cuda}"
OUT="${GPU_SMOKE_OUT:-/tmp/gpu_smoke}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled
export DISTILL_CACHE="${DISTILL_CACHE:-$OUT/cache}"
[ "$DEVICE" = cpu ] && export DS_ACCELERATOR=cpu
started=$(date +%s)
stamp() { echo "== $(($(date +%s) - started)) s: $*"; }

# ---- 1. what it needs
imports="import distill, ray, deepspeed, hydra, torch"
if [ -x .venv/bin/python ] && .venv/bin/python -c "$imports" 2>/dev/null; then
  PY=.venv/bin/python
elif python3 -c "$imports" 2>/dev/null; then
  PY=python3
elif [ -n "${DISTILL_WHEELS:-}" ]; then
  stamp "installing the carried wheels from $DISTILL_WHEELS into $(command -v python3) (its torch kept)"
  python3 -m pip install -q --no-index --find-links "$DISTILL_WHEELS" "$DISTILL_WHEELS"/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
  PY=python3
else
  stamp "setting up .venv from the lock (TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0})"
  bash scripts/setup.sh
  PY=.venv/bin/python
fi
"$PY" -c "import torch, transformers, deepspeed, ray; print('torch', torch.__version__, '| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__, '| ray', ray.__version__)"

# ---- 2. devices
stamp "devices"
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
else
  GPUS=0
fi
echo "device=$DEVICE gpus=$GPUS cpus=$(nproc)"

# ---- 3. the online distributed path
if [ "$DEVICE" = cuda ] && [ "$GPUS" -ge 3 ]; then
  placement=(cluster.student_world_size=2 cluster.grad_accum_steps=1 cluster.gpus_per_teacher_actor=1
    cluster.gpus_per_student_actor=1)
elif [ "$DEVICE" = cuda ]; then
  placement=(cluster.student_world_size=1 cluster.gpus_per_teacher_actor=0.5 cluster.gpus_per_student_actor=0.5)
else
  placement=(cluster.student_world_size=1)
fi
backend=$([ "$DEVICE" = cuda ] && echo nccl || echo gloo)
run_dir="$OUT/online"
rm -rf "$run_dir"
stamp "the tiny demo teacher (distill prepare-demo, cached in $DISTILL_CACHE)"
"$PY" -m launch.cli prepare-demo experiment=ci_tiny 2>&1 | tail -n 5
stamp "online run: cluster=local_ray device=$DEVICE backend=$backend ${placement[*]}"
"$PY" -m launch.cli experiment=ci_tiny cluster=local_ray cluster.device="$DEVICE" cluster.backend="$backend" \
  cluster.gpus_per_node="$GPUS" cluster.cpus_per_node="$(nproc)" "${placement[@]}" \
  eval.generate_examples=0 run_dir="$run_dir" 2>&1 | tee "$OUT/online.log" | tail -n 25
"$PY" - "$run_dir" <<'PY'
import json, sys
from pathlib import Path

run = Path(sys.argv[1])
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
last = rows[-1]
print("last metrics row:", json.dumps({k: last[k] for k in sorted(last) if not k.startswith("grad_share")}))
print("eval.json:", (run / "eval.json").read_text())
PY

# ---- 4. the student memory bench at a real width
stamp "student memory bench"
if [ "$DEVICE" = cuda ]; then
  "$PY" bench/student_memory.py --device cuda --hidden 2048 --layers 2 --seq-len 8192 --repeats 3
else
  "$PY" bench/student_memory.py --device cpu --hidden 64 --layers 2 --seq-len 1024 --repeats 1
fi
stamp "done"

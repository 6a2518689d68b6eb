#!/usr/bin/env bash
# Create .venv and install the project: torch first (pinned), then everything else under the same pin so no
# dependency can pull a different (multi-GB CUDA) torch. Idempotent: a stamp skips work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${DISTILL_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
# On a GPU cluster set TORCH_SPEC (e.g. "torch==2.13.0" from a CUDA index) and edit constraints.txt to match.
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${DISTILL_EXTRAS:-cluster,tracking,slurm,peft,dev}"

export PIP_DISABLE_PIP_VERSION_CHECK=1
export DS_BUILD_OPS=0            # DeepSpeed ops JIT-build on first use; nothing compiles at install time
export HF_HUB_OFFLINE=1

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.distill-install-stamp"
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)-$TORCH_SPEC-$EXTRAS
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# This machine's pip config lists local index folders that may not exist; pip warns once per package.
pip_install() {
  "$VENV/bin/pip" install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
echo "setting up $VENV (torch first, then the project) ..."
pip_install "$TORCH_SPEC"
pip_install -c constraints.txt -e ".[$EXTRAS]"
"$VENV/bin/python" - <<'PY'
import torch
print(f"torch {torch.__version__} ready")
PY
echo "$want" > "$stamp"

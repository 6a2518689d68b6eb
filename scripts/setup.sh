#!/usr/bin/env bash
# Create .venv and install the project at the locked versions: torch first (TORCH_SPEC, its own dependencies held to
# the lock), then every other package exactly as requirements.lock pins it (no resolution, so a new release of any
# dependency cannot change a fresh machine's install), then the project itself. Regenerate the lock with
# scripts/lock.sh. Idempotent: a stamp skips work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${DISTILL_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
# On a GPU cluster set TORCH_SPEC (e.g. "torch==2.13.0" from a CUDA index) and edit constraints.txt to match.
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${DISTILL_EXTRAS:-cluster,tracking,slurm,peft,dev,real-tokenizers,export}"
LOCK="${DISTILL_LOCK:-requirements.lock}"

export PIP_DISABLE_PIP_VERSION_CHECK=1
export DS_BUILD_OPS=0            # DeepSpeed ops JIT-build on first use; nothing compiles at install time
export HF_HUB_OFFLINE=1

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.distill-install-stamp"
want=$(cat pyproject.toml constraints.txt "$LOCK" | sha256sum | cut -d' ' -f1)-$TORCH_SPEC-$EXTRAS
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# This machine's pip config lists local index folders that may not exist; pip warns once per package.
pip_install() {
  "$VENV/bin/pip" install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
echo "setting up $VENV from $LOCK (torch first, then the locked set, then the project) ..."
pip_install "$TORCH_SPEC" -c "$LOCK"
# The lock holds every extra's packages; DISTILL_EXTRAS only selects what the project declares (pip check below).
pip_install --no-deps -r "$LOCK"
pip_install --no-deps -e ".[$EXTRAS]"
if ! "$VENV/bin/pip" check > "$VENV/pip-check.txt" 2>/dev/null; then
  cat "$VENV/pip-check.txt" >&2
  echo "setup: the installed packages conflict (above); regenerate the lock with scripts/lock.sh" >&2
  exit 1
fi
"$VENV/bin/python" - <<'PY'
from importlib.metadata import distributions

found = sorted(f"{d.metadata['Name']}=={d.version}" for d in distributions())
print(f"installed {len(found)} packages: " + ", ".join(found))
PY
# DeepSpeed's CPU comm op, JIT-built once here (30-60 s on 2 cores) with this environment's ninja into the folder
# that runs and tests share, so no run pays for it (distill.student.engine.use_interpreters_ninja says why the
# ninja matters). GPU clusters leave DS_ACCELERATOR unset and skip this.
if [ "${DS_ACCELERATOR:-}" = cpu ] && "$VENV/bin/python" -c "import deepspeed" 2>/dev/null; then
  export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/distill/torch_extensions}"
  echo "building DeepSpeed's CPU comm op into $TORCH_EXTENSIONS_DIR ..."
  "$VENV/bin/python" -c "
from distill.student.engine import use_interpreters_ninja
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
use_interpreters_ninja()
ShareMemCommBuilder().load()" > "$VENV/ds-op-build.log" 2>&1 || { cat "$VENV/ds-op-build.log" >&2; exit 1; }
fi
echo "$want" > "$stamp"

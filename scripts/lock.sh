#!/usr/bin/env bash
# The dependency lock: requirements.lock pins every package the project installs (all extras), for every platform
# and Python the project supports, resolved by uv from pyproject.toml's ranges. torch is left out of it on purpose:
# scripts/setup.sh installs it first from TORCH_SPEC (the CPU build here, a CUDA build on a cluster) and every
# other package resolves against the torch of constraints.txt.
#
#   bash scripts/lock.sh            regenerate requirements.lock at the versions it holds (after editing pyproject.toml)
#   bash scripts/lock.sh --newest   resolve the newest releases, install them into a fresh venv, run the test suite:
#                                   on success requirements.lock takes the new versions (review, commit); on failure it
#                                   stays, and the packages whose version moved are printed beside the failing tests.
#   make lock / make lock-newest    the same
set -euo pipefail
cd "$(dirname "$0")/.."

UV="${UV:-.venv/bin/uv}"
[ -x "$UV" ] || UV=$(command -v uv) || { echo "lock.sh: uv is not installed: run 'make setup' (dev extra) or pip install uv" >&2; exit 2; }
EXTRAS=(cluster tracking slurm peft dev real-tokenizers export)
LOCK=requirements.lock

compile() {  # compile OUT [uv options...]
  local out=$1; shift
  local torch_pin
  torch_pin=$(grep -E '^torch==' constraints.txt)
  # The local wheel folders pip is configured with (PIP_FIND_LINKS, pip.conf): there the CPU build of torch
  # (2.13.0+cpu) satisfies the pin, and its dependencies (no CUDA libraries) are what this machine installs.
  local find_links=()
  for dir in ${PIP_FIND_LINKS:-} $(pip config get global.find-links 2>/dev/null || true); do
    [ -d "$dir" ] && find_links+=(--find-links "$dir")
  done
  "$UV" pip compile pyproject.toml "${EXTRAS[@]/#/--extra=}" --universal --python-version 3.10 \
    --constraint <(echo "$torch_pin") --no-emit-package torch "${find_links[@]}" \
    --custom-compile-command "bash scripts/lock.sh" --quiet -o "$out" "$@"
}

if [ "${1:-}" != "--newest" ]; then
  compile "$LOCK"
  echo "wrote $LOCK ($(grep -c '==' "$LOCK") pins)"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$LOCK" "$work/old.lock"
compile "$work/new.lock" --upgrade
moved=$(diff <(grep -E '^[a-zA-Z0-9]' "$work/old.lock" | sort) <(grep -E '^[a-zA-Z0-9]' "$work/new.lock" | sort) \
  | sed -n 's/^> //p' || true)
echo "newest releases that differ from $LOCK:"
echo "${moved:-  (none)}" | sed 's/^/  /'
cp "$work/new.lock" "$LOCK.newest"
echo "testing them in a fresh venv ($work/venv) ..."
# The README's test command, on a venv of the newest releases (the Makefile exports the test environment).
if DISTILL_VENV="$work/venv" DISTILL_LOCK="$LOCK.newest" make test VENV="$work/venv"; then
  mv "$LOCK.newest" "$LOCK"
  echo "lock-newest: the suite passes on the newest releases; $LOCK updated (review and commit it)"
else
  echo "lock-newest: the suite FAILED on the newest releases; $LOCK is unchanged. Packages whose version moved:" >&2
  echo "${moved:-  (none)}" | sed 's/^/  /' >&2
  echo "Pin the incompatible one with an upper bound in pyproject.toml, then run 'bash scripts/lock.sh'." >&2
  rm -f "$LOCK.newest"
  exit 1
fi

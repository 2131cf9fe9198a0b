#!/usr/bin/env bash
# Build the self-contained onedir binary: dist/appliance/appliance (run ./scripts/setup first).
# VENV=DIR builds from another virtual environment (the release uses build/release-venv, see release.sh).
# Then smoke-test it: packaging/smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
"${VENV:-.venv}"/bin/pyinstaller --noconfirm --clean --log-level WARN \
  --distpath dist --workpath build/pyinstaller packaging/appliance.spec
# The llama_cpp wheel ships three copies of each library (libX.so, .so.0, .so.0.x.y): keep one.
lib=dist/appliance/_internal/llama_cpp/lib
if [ -d "$lib" ]; then
  for f in "$lib"/*.so.*.*; do
    [ -e "$f" ] || continue
    base=${f%%.so.*}.so
    for dup in "$base" "$base".[0-9]; do
      if [ -f "$dup" ] && [ ! -L "$dup" ] && cmp -s "$f" "$dup"; then ln -sf "$(basename "$f")" "$dup"; fi
    done
  done
fi
du -sh dist/appliance

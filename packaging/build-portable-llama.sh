#!/usr/bin/env bash
# Build a PORTABLE llama-cpp-python wheel for the release: build/portable-wheel/<key>/llama_cpp_python-*.whl
#
# scripts/setup compiles llama.cpp with GGML_NATIVE=ON (-march=native): the libraries need the build
# machine's instruction set (here AVX512, VBMI, VNNI, BF16) and die with SIGILL on an older CPU.
# This builds instead with
#   -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DGGML_RPC=on
# so the CPU backend is 14 separate modules, llama_cpp/lib/libggml-cpu-<variant>.so (x64, sse42,
# sandybridge, ivybridge, piledriver, haswell, skylakex, cannonlake, cascadelake, icelake, cooperlake,
# zen4, alderlake, sapphirerapids). At run time ggml_backend_load_all() loads every variant the CPU can
# run and keeps the best-scoring one. The RPC backend becomes a module too (libggml-rpc.so, no SONAME
# versions) that is only registered once it is loaded: nothing is linked into libggml.so any more.
#
# Where ggml looks (vendor/llama.cpp/ggml/src/ggml-backend-reg.cpp, ggml_backend_load_best): only the
# directory of the executable (/proc/self/exe: python, or the frozen binary) and the current directory,
# unless a folder is passed to ggml_backend_load_all_from_path(). llama_backend_init() and
# llama_supports_*() call ggml_backend_load_all() with no folder, and llama-cpp-python 0.3.36 never
# loads backends itself (upstream issue abetlen/llama-cpp-python#2069): with this wheel, model loading
# fails with "no backends are loaded" until the process calls
# ggml_backend_load_all_from_path(<site-packages>/llama_cpp/lib), and it must call it through the
# libggml that libllama uses (llama_cpp/lib/libggml.so.0; llama_cpp._ggml loads libggml.so, a second
# copy with its own registry). The appliance needs that change (engines/llama.py load_backends()) before
# it can run on this wheel. The modules are installed into llama_cpp/lib (CMAKE_INSTALL_BINDIR; ggml's
# default would be site-packages/bin/), where PyInstaller's collect_dynamic_libs("llama_cpp") picks them
# up (frozen: _internal/llama_cpp/lib/).
#
# Every input is hash-checked like scripts/setup: the sdist pin from requirements.lock, the build
# backends (cmake, ninja, scikit-build-core, setuptools) from requirements-build.lock, installed into a
# private folder and used with --no-build-isolation. pip's cache is left alone (--no-cache-dir).
# Took 807 s (13.5 min) on 2 busy cores (14 CPU variants); the wheel is 27 MB. Cached: skipped when a wheel for the same
# sdist hash + CMAKE_ARGS + compiler exists. FORCE=1 rebuilds.
#
#   packaging/build-portable-llama.sh            # prints the wheel's path on its last line
#   PORTABLE_CMAKE_ARGS="... -DGGML_CUDA=on" packaging/build-portable-llama.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
CMAKE_ARGS_PORTABLE=${PORTABLE_CMAKE_ARGS:-"-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DGGML_RPC=on -DCMAKE_INSTALL_BINDIR=llama_cpp/lib"}
lock=requirements.lock
out_root=build/portable-wheel

lock_entry() {
  awk -v want="$1" 'tolower($0) ~ "^" want "==" { p = 1 } p { print; if ($0 !~ /\\$/) exit }' "$2"
}
lock_without() {
  awk -v skip="$1" 'tolower($0) ~ "^" skip "==" { s = 1 } s { if ($0 !~ /\\$/) s = 0; next } { print }' "$2"
}

llama_pin=$(lock_entry llama-cpp-python "$lock")
[ -n "$llama_pin" ] || { echo "build-portable-llama: no llama-cpp-python pin in $lock" >&2; exit 1; }
version=$(printf '%s\n' "$llama_pin" | head -1 | sed -E 's/^[^=]+==([^ ]+).*/\1/')
compiler=$( (cc --version 2>/dev/null || echo no-cc) | head -1)
key=$(printf '%s\n' "$llama_pin" "$CMAKE_ARGS_PORTABLE" "$compiler" "$($PYTHON -c 'import sys; print(sys.version_info[:2])')" \
  | sha256sum | cut -c1-12)
dest=$out_root/$version-$key

existing=$(ls "$dest"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -1 || true)
if [ -n "$existing" ] && [ "${FORCE:-0}" != 1 ]; then
  echo "build-portable-llama: cached ($(cat "$dest/FLAGS" 2>/dev/null | head -1))" >&2
  echo "$existing"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "build-portable-llama: llama-cpp-python $version with CMAKE_ARGS=$CMAKE_ARGS_PORTABLE (~14 min on 2 cores)" >&2
"$PYTHON" -m venv "$tmp/venv"
pip=("$tmp/venv/bin/python" -m pip --disable-pip-version-check --no-cache-dir)
lock_entry pip requirements-build.lock > "$tmp/pip.txt"
"${pip[@]}" install --quiet --require-hashes --no-deps -r "$tmp/pip.txt"
lock_without pip requirements-build.lock > "$tmp/build.txt"
"${pip[@]}" install --quiet --require-hashes --no-deps --target "$tmp/build-env" -r "$tmp/build.txt"
printf '%s\n' "$llama_pin" > "$tmp/llama.txt"

started=$(date +%s)
mkdir -p "$tmp/wheel"
PATH="$tmp/build-env/bin:$PATH" PYTHONPATH="$tmp/build-env" CMAKE_ARGS="$CMAKE_ARGS_PORTABLE" \
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  "${pip[@]}" wheel --quiet --require-hashes --no-deps --no-build-isolation --no-binary llama-cpp-python \
  -w "$tmp/wheel" -r "$tmp/llama.txt"
took=$(( $(date +%s) - started ))

wheel=$(ls "$tmp"/wheel/llama_cpp_python-"$version"-*.whl)
# The wheel must hold the CPU variants and the RPC module in llama_cpp/lib, or the build is useless.
"$tmp/venv/bin/python" - "$wheel" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
variants = sorted(n for n in names if n.startswith("llama_cpp/lib/libggml-cpu-") and n.endswith(".so"))
missing = [n for n in ("llama_cpp/lib/libggml-rpc.so", "llama_cpp/lib/libggml.so", "llama_cpp/lib/libllama.so")
           if n not in names]
if len(variants) < 2 or missing:
    sys.exit(f"build-portable-llama: wheel lacks CPU variants ({variants}) or {missing}")
print("build-portable-llama: CPU variants:", " ".join(v.split("libggml-cpu-")[1][:-3] for v in variants), file=sys.stderr)
EOF
rm -rf "$dest"
mkdir -p "$dest"
mv "$wheel" "$dest/"
{
  echo "CMAKE_ARGS=$CMAKE_ARGS_PORTABLE"
  echo "compiler=$compiler"
  echo "build_seconds=$took"
  echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} > "$dest/FLAGS"
echo "build-portable-llama: built in ${took} s, $(du -h "$dest"/*.whl | cut -f1)" >&2
ls "$dest"/llama_cpp_python-"$version"-*.whl

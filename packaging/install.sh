#!/usr/bin/env bash
# Install, upgrade, roll back or remove the appliance from this release folder. Needs no network.
#
#   sudo ./install.sh                      install or upgrade (verifies SHA256SUMS before touching anything)
#   sudo ./install.sh --rollback           switch back to the release installed before this one
#   sudo ./install.sh --uninstall [--purge] remove the program (and with --purge the data and settings)
#   ./install.sh --verify                  only check this folder against SHA256SUMS
#
# Options: --prefix DIR (/opt/appliance) --data-dir DIR (/var/lib/appliance) --etc-dir DIR (/etc/appliance)
#          --unit-dir DIR (/etc/systemd/system) --user NAME (appliance) --port N (8080)
#          --no-systemd (print how to run it in the foreground instead of installing the unit)
#          --no-start (install the unit but do not start it) --restore-data (with --rollback, see README)
set -euo pipefail
umask 022

here=$(cd "$(dirname "$0")" && pwd)
prefix=/opt/appliance
data_dir=/var/lib/appliance
etc_dir=/etc/appliance
unit_dir=/etc/systemd/system
user=appliance
port=
action=install
systemd=auto
start=yes
purge=no
restore_data=no
started_at=$(date +%s)

say() { echo "install: $*"; }
die() { echo "install: error: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix=${2:?--prefix needs a directory}; shift ;;
    --data-dir) data_dir=${2:?--data-dir needs a directory}; shift ;;
    --etc-dir) etc_dir=${2:?--etc-dir needs a directory}; shift ;;
    --unit-dir) unit_dir=${2:?--unit-dir needs a directory}; shift ;;
    --user) user=${2:?--user needs a name}; shift ;;
    --port) port=${2:?--port needs a number}; shift ;;
    --no-systemd) systemd=no ;;
    --no-start) start=no ;;
    --uninstall) action=uninstall ;;
    --purge) purge=yes ;;
    --rollback) action=rollback ;;
    --restore-data) restore_data=yes ;;
    --verify) action=verify ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift
done
for p in prefix data_dir etc_dir unit_dir; do
  case "${!p}" in /*) ;; *) die "--${p//_/-} must be an absolute path, not ${!p}" ;; esac
done
[ -z "$port" ] || [[ "$port" =~ ^[0-9]+$ && "$port" -ge 1 && "$port" -le 65535 ]] || die "--port must be 1-65535"
backups=$data_dir.backups

release_value() { # release_value FOLDER KEY
  grep -m1 "^$2=" "$1/RELEASE" | cut -d= -f2- || true
}

# -- verification: before anything is touched -------------------------------------------------------

verify_release() { # verify_release FOLDER: every file listed with its checksum, nothing missing, nothing added
  local dir=$1 listed actual bad link target
  [ -f "$dir/SHA256SUMS" ] || die "$dir/SHA256SUMS is missing: this is not a complete release folder"
  [ -f "$dir/RELEASE" ] || die "$dir/RELEASE is missing: this is not a complete release folder"
  if ! bad=$(cd "$dir" && sha256sum --strict --quiet -c SHA256SUMS 2>&1); then
    echo "$bad" | sed 's/^/install:   /' >&2
    die "$dir does not match its SHA256SUMS (the files above are corrupted, truncated or missing); refusing to install. Copy the archive again and check it against its .sha256."
  fi
  listed=$(sed 's/^[0-9a-f]\{64\}  //' "$dir/SHA256SUMS" | LC_ALL=C sort)
  actual=$(cd "$dir" && find . \( -type f -o -type l \) ! -name SHA256SUMS -printf '%P\n' | LC_ALL=C sort)
  if [ "$listed" != "$actual" ]; then
    bad=$(comm -13 <(echo "$listed") <(echo "$actual") | head -5)
    die "$dir holds files SHA256SUMS does not list: ${bad//$'\n'/, }; refusing to install"
  fi
  # Links must stay inside the release (PyInstaller's shared libraries link to their neighbours).
  while IFS= read -r link; do
    target=$(readlink "$dir/$link")
    case "$target" in /*|*..*) die "$dir/$link points outside the release ($target); refusing to install" ;; esac
  done < <(cd "$dir" && find . -type l -printf '%P\n')
}

cpu_flag_name() { # llama.cpp's feature name -> /proc/cpuinfo flag
  case "$1" in
    SSE3) echo pni ;; SSSE3) echo ssse3 ;; AVX) echo avx ;; AVX2) echo avx2 ;; F16C) echo f16c ;; FMA) echo fma ;;
    BMI2) echo bmi2 ;; AVX512) echo avx512f ;; AVX512_VBMI) echo avx512vbmi ;; AVX512_VNNI) echo avx512_vnni ;;
    AVX512_BF16) echo avx512_bf16 ;; AVX_VNNI) echo avx_vnni ;; AMX_INT8) echo amx_int8 ;; *) echo "" ;;
  esac
}

check_machine() { # check_machine FOLDER: architecture, glibc and CPU features the build needs
  local dir=$1 arch need have flags missing=""
  arch=$(release_value "$dir" arch)
  [ "$arch" = "$(uname -m)" ] || die "this release is built for $arch; this machine is $(uname -m)"
  need=$(release_value "$dir" glibc_min)
  have=$(getconf GNU_LIBC_VERSION 2> /dev/null | awk '{print $2}')
  if [ -n "$need" ] && [ "$need" != unknown ] && [ -n "$have" ] && [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -1)" != "$need" ]; then
    die "this release needs glibc $need or newer; this machine has $have"
  fi
  flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
  for f in $(release_value "$dir" cpu_features); do
    name=$(cpu_flag_name "$f")
    if [ -n "$name" ] && [[ "$flags" != *" $name "* ]]; then missing="$missing $f"; fi
  done
  [ -z "$missing" ] || die "this CPU lacks instructions the release's llama.cpp was built for:$missing. Build the release on (or for) a CPU like this one (see README, Release)."
}

need_space() { # need_space DIR MEGABYTES WHAT
  local dir=$1 want=$2 free
  while [ ! -d "$dir" ]; do dir=$(dirname "$dir"); done
  free=$(df -Pm "$dir" | awk 'NR==2 {print $4}')
  [ "$free" -ge "$want" ] || die "$3 needs ${want} MB free in $dir; it has ${free} MB. Free some space and run it again (nothing was changed)."
}

as_user() { # run a command as the service user (root installs) or as ourselves
  if [ "$(id -u)" = 0 ] && [ "$user" != root ]; then
    runuser -u "$user" -- "$@"
  else
    "$@"
  fi
}

systemd_running() { [ "$systemd" != no ] && [ -d /run/systemd/system ] && command -v systemctl > /dev/null; }

service_stop() {
  if systemd_running && systemctl is-active --quiet appliance.service 2> /dev/null; then
    say "stopping appliance.service"
    systemctl stop appliance.service
  fi
}

wait_healthy() { # wait_healthy PORT SECONDS: bash's /dev/tcp, so no curl is needed
  local deadline=$(( $(date +%s) + $2 ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    if exec 3<> "/dev/tcp/127.0.0.1/$1" 2> /dev/null; then
      printf 'GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
      if head -1 <&3 | grep -q ' 200 '; then exec 3>&-; return 0; fi
      exec 3>&-
    fi
    sleep 0.5
  done
  return 1
}

install_unit() { # install_unit RELEASE_DIR
  local src=$1/systemd/appliance.service dst=$unit_dir/appliance.service
  mkdir -p "$unit_dir"
  sed -e "s|/opt/appliance|$prefix|g" -e "s|/var/lib/appliance|$data_dir|g" -e "s|/etc/appliance|$etc_dir|g" \
      -e "s|^User=.*|User=$user|" -e "s|^Group=.*|Group=$user|" "$src" > "$dst.tmp"
  if [ "$data_dir" != /var/lib/appliance ]; then
    # StateDirectory= only manages /var/lib/<name>; another data dir is made writable explicitly.
    sed -i -e '/^StateDirectory/d' -e "s|^\[Service\]|[Service]\nReadWritePaths=$data_dir|" "$dst.tmp"
  fi
  mv "$dst.tmp" "$dst"
}

foreground_hint() {
  say "start the server in the foreground with:"
  if [ "$(id -u)" = 0 ] && [ "$user" != root ]; then
    echo "    runuser -u $user -- env APPLIANCE_CONFIG=$etc_dir/appliance.toml $prefix/current/appliance serve"
  else
    echo "    env APPLIANCE_CONFIG=$etc_dir/appliance.toml $prefix/current/appliance serve"
  fi
}

# -- install / upgrade ------------------------------------------------------------------------------

do_install() {
  verify_release "$here"
  check_machine "$here"
  local version old_version="" old_format new_format mb
  version=$(release_value "$here" version)
  new_format=$(release_value "$here" data_format)
  if [ "$(id -u)" != 0 ] && [ "$user" != "$(id -un)" ]; then
    die "run as root to install for the service user $user (or pass --user $(id -un) to install for yourself)"
  fi
  [ -L "$prefix/current" ] && old_version=$(release_value "$prefix/current" version)
  if [ -d "$data_dir" ] && [ -n "$(ls -A "$data_dir" 2> /dev/null)" ]; then
    # The new binary judges the data directory before anything changes (exit 3: written by a newer release).
    set +e; "$here/appliance" data status --data-dir "$data_dir" > /dev/null 2>&1; rc=$?; set -e
    if [ "$rc" = 3 ]; then
      "$here/appliance" data status --data-dir "$data_dir" >&2 || true
      die "$data_dir was written by a newer release than $version; install that release or newer (nothing was changed)"
    fi
  fi
  mb=$(( $(du -sm "$here" | cut -f1) + 64 ))
  [ "$old_version" = "$version" ] || need_space "$prefix" "$mb" "the program"
  need_space "$data_dir" $(( $(du -sm "$here/models" | cut -f1) + 64 )) "the models"

  # The service user and the data directory.
  if ! id -u "$user" > /dev/null 2>&1; then
    useradd --system --user-group --home-dir "$data_dir" --no-create-home --shell /usr/sbin/nologin "$user"
    say "created system user $user"
  fi
  if [ -e "$data_dir" ]; then
    owner=$(stat -c %U "$data_dir")
    if [ "$owner" != "$user" ]; then
      if [ "$owner" = root ] && [ -z "$(ls -A "$data_dir")" ]; then
        chown "$user:" "$data_dir"
      else
        die "$data_dir belongs to $owner, not to $user who runs the service: chown -R $user: $data_dir, or pass --user $owner"
      fi
    fi
  else
    install -d -m 0750 -o "$user" -g "$(id -gn "$user")" "$data_dir"
  fi
  chmod 0750 "$data_dir"

  # The program: releases/<version>, switched in by renaming a symlink.
  mkdir -p "$prefix/releases"
  chmod 0755 "$prefix" "$prefix/releases"
  local target=$prefix/releases/$version
  if [ -d "$target" ] && (cd "$target" && cmp -s SHA256SUMS "$here/SHA256SUMS") && [ "$target" != "$here" ]; then
    verify_release "$target"
    say "release $version is already in $target"
  elif [ "$target" != "$here" ]; then
    incoming=$prefix/releases/.incoming-$version-$$
    rm -rf "$incoming"
    trap 'rm -rf "$incoming"' EXIT
    if ! cp -a "$here/." "$incoming/"; then
      die "copying the release into $prefix failed (disk full?); the installed release is unchanged"
    fi
    chown -R 0:0 "$incoming"
    chmod -R go-w,a+rX "$incoming"
    verify_release "$incoming"
    rm -rf "$target.old"
    [ ! -d "$target" ] || mv "$target" "$target.old"
    mv "$incoming" "$target"
    rm -rf "$target.old"
    trap - EXIT
    say "installed release $version into $target"
  fi

  service_stop
  # Before a data format change, a backup the previous release can restore (install.sh --rollback --restore-data).
  old_format=$(as_user "$target/appliance" data status --data-dir "$data_dir" --json 2> /dev/null \
    | sed -n 's/^  "data_format": \([0-9]*\).*/\1/p' || true)
  if [ -n "$old_format" ] && [ "$old_format" -lt "$new_format" ]; then
    install -d -m 0700 -o "$user" "$backups"
    file=$backups/pre-upgrade-${old_version:-format$old_format}-to-$version.tar
    # The new release reads the older format without changing it; the backup is of the data as it was.
    as_user "$target/appliance" backup "$file" --no-models --data-dir "$data_dir" \
      || die "could not back up $data_dir before migrating it (see above); nothing was switched"
    say "backed up the data (format $old_format) to $file before migrating it"
  fi
  as_user "$target/appliance" --data-dir "$data_dir" models install-defaults --from "$target/models"
  as_user "$target/appliance" data migrate --data-dir "$data_dir" > /dev/null

  # Settings: kept across upgrades; made once.
  mkdir -p "$etc_dir"
  if [ ! -f "$etc_dir/appliance.toml" ]; then
    {
      echo "# Appliance settings (see README, Settings). Kept across upgrades."
      echo "data_dir = \"$data_dir\""
      echo "[server]"
      echo "host = \"127.0.0.1\""
      echo "port = ${port:-8080}"
    } > "$etc_dir/appliance.toml"
    chmod 0644 "$etc_dir/appliance.toml"
  elif [ -n "$port" ]; then
    sed -i "s/^port = .*/port = $port/" "$etc_dir/appliance.toml"
  fi
  if [ ! -f "$etc_dir/environment" ]; then
    echo "# APPLIANCE_* settings for the service (secrets such as APPLIANCE_CLUSTER_SECRET go here)." > "$etc_dir/environment"
    echo "APPLIANCE_CONFIG=$etc_dir/appliance.toml" >> "$etc_dir/environment"
    chmod 0640 "$etc_dir/environment"
    chgrp "$(id -gn "$user")" "$etc_dir/environment"
  fi

  switch_to "$version"
  prune_releases
  # What this machine can run of the configuration, as the service will see it (never fatal here:
  # the service may still run, e.g. with a model that is only lazily loaded).
  if ! as_user "$prefix/current/appliance" --config "$etc_dir/appliance.toml" doctor > "$prefix/.doctor.txt" 2>&1; then
    grep -E '^(FAIL|warn)' "$prefix/.doctor.txt" | sed 's/^/install: doctor: /' || true
    say "appliance doctor found problems (above); the full report: $prefix/current/appliance doctor"
  fi
  rm -f "$prefix/.doctor.txt"
  finish
}

switch_to() { # switch_to VERSION: current -> releases/VERSION, previous -> what current was
  local version=$1 old=""
  [ -L "$prefix/current" ] && old=$(basename "$(readlink "$prefix/current")")
  if [ -n "$old" ] && [ "$old" != "$version" ]; then
    ln -sfn "releases/$old" "$prefix/.previous.tmp" && mv -T "$prefix/.previous.tmp" "$prefix/previous"
  fi
  ln -sfn "releases/$version" "$prefix/.current.tmp" && mv -T "$prefix/.current.tmp" "$prefix/current"
  say "current release: $version${old:+ (previous: $old)}"
}

prune_releases() { # keep the current and the previous release
  local keep_cur keep_prev
  keep_cur=$(basename "$(readlink "$prefix/current")")
  keep_prev=$([ -L "$prefix/previous" ] && basename "$(readlink "$prefix/previous")" || true)
  for d in "$prefix"/releases/*/; do
    d=$(basename "$d")
    if [ "$d" != "$keep_cur" ] && [ "$d" != "$keep_prev" ]; then rm -rf "${prefix:?}/releases/$d"; say "removed old release $d"; fi
  done
}

finish() {
  local version
  version=$(release_value "$prefix/current" version)
  local p=${port:-$(sed -n 's/^port = //p' "$etc_dir/appliance.toml" 2> /dev/null | head -1)}
  if systemd_running; then
    install_unit "$prefix/current"
    systemctl daemon-reload
    systemctl enable --quiet appliance.service
    if [ "$start" = yes ]; then
      systemctl restart appliance.service
      if wait_healthy "${p:-8080}" 300; then
        say "appliance $version is running and healthy on http://127.0.0.1:${p:-8080}/ ($(( $(date +%s) - started_at )) s)"
      else
        die "appliance.service did not become healthy; see: journalctl -u appliance -n 50"
      fi
    else
      say "installed appliance.service; start it with: systemctl start appliance"
    fi
  else
    [ "$systemd" = no ] || say "no running systemd found"
    foreground_hint
    say "done: appliance $version in $prefix ($(( $(date +%s) - started_at )) s)"
  fi
}

# -- rollback ---------------------------------------------------------------------------------------

do_rollback() {
  [ -L "$prefix/previous" ] || die "no previous release in $prefix to roll back to"
  local prev cur prev_dir
  prev=$(basename "$(readlink "$prefix/previous")")
  cur=$(basename "$(readlink "$prefix/current")")
  prev_dir=$prefix/releases/$prev
  verify_release "$prev_dir"
  set +e; "$prev_dir/appliance" data status --data-dir "$data_dir" > /dev/null 2>&1; rc=$?; set -e
  service_stop
  if [ "$rc" = 3 ]; then
    local file=$backups/pre-upgrade-$prev-to-$cur.tar
    if [ "$restore_data" != yes ]; then
      die "the data in $data_dir was migrated by $cur to a format $prev cannot read. Roll back with the data as it was before the upgrade (changes since are set aside, not deleted): $0 --rollback --restore-data${prefix:+ --prefix $prefix} (backup: $file)"
    fi
    [ -f "$file" ] || die "no pre-upgrade backup $file; cannot roll back the data"
    local aside=$data_dir.rolled-back-$(date -u +%Y%m%dT%H%M%SZ)
    mv "$data_dir" "$aside"
    if ! "$prev_dir/appliance" restore "$file" --data-dir "$data_dir" --owner "$user"; then
      rm -rf "$data_dir"; mv "$aside" "$data_dir"
      die "restoring $file failed; the data directory is back as it was"
    fi
    as_user "$prev_dir/appliance" --data-dir "$data_dir" models install-defaults --from "$prev_dir/models"
    say "data restored from $file; the data as it was is kept in $aside"
  fi
  switch_to "$prev"
  finish
}

# -- uninstall --------------------------------------------------------------------------------------

do_uninstall() {
  if systemd_running; then
    systemctl disable --now --quiet appliance.service 2> /dev/null || true
  fi
  rm -f "$unit_dir/appliance.service"
  systemd_running && systemctl daemon-reload || true
  if [ -d "$prefix/releases" ] || [ -L "$prefix/current" ]; then
    rm -rf "${prefix:?}/releases" "$prefix/current" "$prefix/previous"
    rmdir "$prefix" 2> /dev/null || true
    say "removed the program from $prefix"
  fi
  if [ "$purge" = yes ]; then
    rm -rf "$data_dir" "$backups" "$etc_dir"
    say "purged $data_dir, $backups and $etc_dir (the user $user is kept)"
  else
    say "kept the data in $data_dir and the settings in $etc_dir (--purge removes them)"
  fi
}

case "$action" in
  verify) verify_release "$here"; check_machine "$here"; say "$here matches its SHA256SUMS and this machine can run it" ;;
  install) do_install ;;
  rollback) do_rollback ;;
  uninstall) do_uninstall ;;
esac

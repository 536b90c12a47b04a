#!/usr/bin/env bash
# Installs the Debian packages the integration tests need (QEMU, Ceph, nginx, Prometheus, ...) when they
# are missing and we run as root. Each scripts/deps/*.txt lists lines "BINARY PACKAGE [SUITE]": PACKAGE
# (from SUITE, e.g. bookworm-backports) is installed when BINARY is not on PATH. Without root nothing is
# installed: the tests that need a missing binary fail and print the command to run.
set -euo pipefail
cd "$(dirname "$0")"
declare -A by_suite=()
for list in deps/*.txt; do
  [ -e "$list" ] || continue
  while read -r bin pkg suite; do
    case "$bin" in ""|\#*) continue ;; esac
    command -v "$bin" >/dev/null 2>&1 && continue
    [ -x "/usr/sbin/$bin" ] || [ -x "/usr/bin/$bin" ] && continue
    by_suite[${suite:-default}]+=" $pkg"
  done <"$list"
done
[ ${#by_suite[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  for suite in "${!by_suite[@]}"; do
    t=""; [ "$suite" = default ] || t="-t $suite"
    echo "ensure-deps: not root; the integration tests need: apt-get install $t --no-install-recommends${by_suite[$suite]}" >&2
  done
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt_opts=(-y -q --no-install-recommends -o DPkg::Lock::Timeout=600)
if [ -n "${by_suite[bookworm-backports]:-}" ] && ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "deb http://deb.debian.org/debian bookworm-backports main" >/etc/apt/sources.list.d/snapload-backports.list
fi
echo "ensure-deps: installing${by_suite[*]}" >&2
# Packages such as nginx and prometheus start their service on install: the tests start their own.
policy=/usr/sbin/policy-rc.d
[ -e "$policy" ] || { printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; trap 'rm -f "$policy"' EXIT; }
apt-get -q -o DPkg::Lock::Timeout=600 update >/dev/null
for suite in "${!by_suite[@]}"; do
  t=(); [ "$suite" = default ] || t=(-t "$suite")
  # shellcheck disable=SC2086
  apt-get install "${apt_opts[@]}" "${t[@]}" ${by_suite[$suite]} >/dev/null
done

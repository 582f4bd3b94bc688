#!/usr/bin/env bash
# Install what the test suite needs, then run it. Usable on a fresh Debian machine
# (as root it installs the real NBD clients and redis-server when they are missing)
# and anywhere else (tests whose client programs are missing skip with the package name).
# Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."

want=()
for pair in qemu-img:qemu-utils qemu-io:qemu-utils nbdinfo:libnbd-bin nbdcopy:libnbd-bin \
            fio:fio redis-server:redis-server redis-cli:redis-tools nbdkit:nbdkit; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || want+=("${pair#*:}")
done
if [ ${#want[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    mapfile -t want < <(printf '%s\n' "${want[@]}" | sort -u)
    echo "installing Debian packages: ${want[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq "${want[@]}" >/dev/null \
      || echo "warning: could not install ${want[*]}; tests needing them will skip"
  else
    echo "note: missing ${want[*]}; tests needing them will skip (install as root to run them)"
  fi
fi

python3 -m pip install -q -e '.[dev,redis]' || exit 1

python3 -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"

#!/usr/bin/env bash
# Make sure redis-server, PostgreSQL's server binaries and faketime (the clock of the DST
# acceptance test) are installed. Installs them from the system's packages when it can (root or
# sudo with apt-get); otherwise says what to do. --redis-only skips PostgreSQL and faketime,
# which only the tests need.
set -euo pipefail

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if ! command -v initdb >/dev/null 2>&1 && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  need+=(postgresql)
fi
command -v faketime >/dev/null 2>&1 || need+=(faketime)
[ "${1:-}" = "--redis-only" ] && need=("${need[@]/postgresql}") && need=("${need[@]/faketime}")
need=($(printf '%s\n' "${need[@]}" | grep -v '^$' || true))
[ ${#need[@]} -eq 0 ] && exit 0

sudo_cmd=()
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo_cmd=(sudo -n)
if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ ${#sudo_cmd[@]} -gt 0 ]; }; then
  echo "installing ${need[*]} from the system's packages..."
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # The Debian packages start system-wide services; the project runs its own instances.
  exit 0
fi
echo "error: ${need[*]} not installed. Install them with your package manager, e.g." >&2
echo "  sudo apt-get install ${need[*]}      (Debian/Ubuntu)" >&2
echo "  brew install redis postgresql         (macOS)" >&2
exit 1

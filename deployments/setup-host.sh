#!/usr/bin/env bash
# Prepare this machine for AICert: system packages, a running Docker engine, the project's
# virtual environment, and the offline base image. Idempotent: a second run only checks.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AICERT_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${AICERT_EXTRAS:-test}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

APT_PACKAGES=(
  swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config   # the software TPM and its tools
  docker.io debootstrap git make                        # containers, the base image
  qemu-system-x86 ovmf mmdebstrap binutils              # measured boot (qemu provider)
  shellcheck                                            # the qemu guest's scripts' test
  chromium fonts-liberation postgresql curl             # UI tests, the PostgreSQL-backed stack
)
missing=()
for package in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing system packages: ${missing[*]}"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  log "starting dockerd"
  $SUDO sh -c 'nohup dockerd >/var/log/aicert-dockerd.log 2>&1 &'
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start; see /var/log/aicert-dockerd.log" >&2; exit 1; }
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating the virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
stamp="$VENV/.aicert-installed-$EXTRAS"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  log "installing aicert[$EXTRAS] (tpm2-pytss builds against libtss2: about a minute)"
  "$VENV/bin/pip" install -q --progress-bar on -e "$ROOT[$EXTRAS]"
  touch "$stamp"
fi

log "ensuring the offline base image (debootstrap + docker import, about a minute the first time)"
"$VENV/bin/aicert" image build-base
log "ready"

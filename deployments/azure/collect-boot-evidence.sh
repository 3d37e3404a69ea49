#!/bin/sh
# Collect what `aicert reference-values derive-azure` needs from a VM booted from a
# new gallery image version: the boot event log, PCR 0-9, a quote over them by the VM's
# Azure-certified AK, the AK's public key and certificate. Run as root on that VM, through
# `az vm run-command invoke` (see README.md, section 3). Writes OUT_DIR and OUT_DIR.tar.gz.
#
#   collect-boot-evidence.sh OUT_DIR NONCE_HEX
#
# NONCE_HEX: 32 random bytes, hex, chosen on the publisher's workstation (so the quote is
# fresh). The environment may point elsewhere for tests: AICERT_BOOT_EVENT_LOG (the log
# file), AICERT_AK_HANDLE, AICERT_AK_CERT_NV_INDEX, TPM2TOOLS_TCTI (default: /dev/tpmrm0).
set -eu

usage="usage: collect-boot-evidence.sh OUT_DIR NONCE_HEX"
out=${1:?$usage}
nonce=${2:?$usage}
log=${AICERT_BOOT_EVENT_LOG:-/sys/kernel/security/tpm0/binary_bios_measurements}
ak=${AICERT_AK_HANDLE:-0x81000003}
ak_cert_nv=${AICERT_AK_CERT_NV_INDEX:-0x01C101D0}
pcrs=sha256:0,1,2,3,4,5,6,7,8,9

case $nonce in
  *[!0-9a-fA-F]* | "") echo "NONCE_HEX must be hex" >&2; exit 2 ;;
esac

mkdir -p "$out"
cp "$log" "$out/binary_bios_measurements"
tpm2_pcrread "$pcrs" > "$out/pcrs.txt"
tpm2_quote -c "$ak" -l "$pcrs" -q "$nonce" -g sha256 \
  -m "$out/quote.msg" -s "$out/quote.sig" > "$out/quote.yaml"
tpm2_readpublic -c "$ak" -o "$out/ak.pub" > /dev/null
tpm2_nvread -C o "$ak_cert_nv" -o "$out/ak-cert.bin"
printf '%s\n' "$nonce" > "$out/nonce.hex"
# Context for the publisher, never checked: what this VM booted and on what.
uname -r > "$out/kernel-release"
cat /proc/cmdline > "$out/proc-cmdline"
tar -C "$out" -czf "$out.tar.gz" .
echo "wrote $out.tar.gz"

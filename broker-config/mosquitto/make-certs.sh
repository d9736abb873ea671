#!/usr/bin/env bash
# Development certificates for a microfed broker: a private CA, the broker's server certificate, and one
# client certificate per name given (device ids, `aggregator`, `fleet-manager`, ...).
#
#     make-certs.sh OUT_DIR NAME...
#
# Writes, with openssl (EC P-256 keys, SHA-256 signatures):
#     OUT_DIR/ca.crt ca.key                 the CA (10 years); ca.key never leaves this folder
#     OUT_DIR/server.crt server.key         the broker (2 years), SANs localhost and 127.0.0.1, plus
#                                           the names/addresses in $BROKER_HOSTS (comma separated;
#                                           when set, a certificate with other names is re-issued)
#     OUT_DIR/clients/NAME.crt NAME.key     one per NAME (2 years), subject CN=NAME: with
#                                           `use_identity_as_username true` the CN is the MQTT user name
#                                           the ACLs see, so NAME is the device id.
#
# Idempotent: an existing CA is kept; a server or client certificate is kept when it still verifies
# against that CA, has more than 30 days left and (server) was made for the same host names; anything
# else is issued again. Run it again with more names to add devices.
#
# Permissions: every key is created mode 600 for the user running the script, except server.key, which
# the broker reads: mode 640, and group `mosquitto` when run as root and that group exists, because
# Mosquitto started as root drops privileges to the `mosquitto` user (or to the user named by `user` in
# mosquitto.conf). Client keys belong on their device only: copy NAME.crt, NAME.key and ca.crt there.
#
# This is a development CA. For a production fleet, keep the CA key offline (or use your site's PKI) and
# issue one certificate per board; revoking a board then needs a CRL (mosquitto's `crlfile`).
set -euo pipefail

usage() {
  echo "usage: $0 OUT_DIR NAME..." >&2
  echo "  NAME: 1-64 characters from [A-Za-z0-9._-] (an MQTT user name and a topic level)" >&2
  exit 2
}
[[ $# -ge 1 ]] || usage
out=$1
shift
command -v openssl >/dev/null || { echo "$0: openssl not found (apt-get install openssl)" >&2; exit 1; }

# A name becomes the MQTT user name and, through `%u` in the ACL patterns, one level of a topic: a `/`
# would let it reach other topics' levels, and Mosquitto refuses pattern ACLs to names with `+` or `#`.
for name in "$@"; do
  if [[ ! $name =~ ^[A-Za-z0-9._-]{1,64}$ ]]; then
    echo "$0: invalid name '$name'" >&2
    usage
  fi
done

umask 077
mkdir -p "$out/clients"
chmod 755 "$out" "$out/clients"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

new_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
# A random positive serial of at most 15 bytes (RFC 5280 allows 20).
serial() { echo "0x$(openssl rand -hex 15)"; }
# True when certificate $1 verifies against the CA and is valid for 30 more days.
still_good() {
  [[ -s $1 ]] &&
    openssl verify -CAfile "$out/ca.crt" "$1" >/dev/null 2>&1 &&
    openssl x509 -in "$1" -noout -checkend 2592000 >/dev/null 2>&1
}
# The subject CN of certificate $1.
cn_of() { openssl x509 -in "$1" -noout -subject -nameopt multiline | sed -n 's/^ *commonName *= //p'; }
# issue KEY CERT SUBJECT_CN EXTENSIONS: a CSR for KEY, signed by the CA, 730 days.
issue() {
  local key=$1 crt=$2 cn=$3 ext=$4
  printf '%s\n' "$ext" >"$tmp/ext.cnf"
  openssl req -new -key "$key" -subj "/CN=$cn" -out "$tmp/req.csr"
  openssl x509 -req -in "$tmp/req.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -set_serial "$(serial)" \
    -days 730 -sha256 -extfile "$tmp/ext.cnf" -out "$crt" 2>/dev/null
  chmod 644 "$crt"
}

# ---- the CA ---------------------------------------------------------------------------------------
if [[ ! -s $out/ca.crt || ! -s $out/ca.key ]]; then
  new_key "$out/ca.key"
  openssl req -x509 -new -key "$out/ca.key" -subj "/CN=microfed development CA" -days 3650 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$out/ca.crt"
  chmod 644 "$out/ca.crt"
  # A new CA invalidates everything it did not sign: the checks below re-issue those.
  echo "made CA $out/ca.crt"
fi

# ---- the broker -----------------------------------------------------------------------------------
san="DNS:localhost,IP:127.0.0.1"
IFS=',' read -r -a extra <<<"${BROKER_HOSTS:-}"
for h in "${extra[@]}"; do
  [[ -z $h ]] && continue
  if [[ $h =~ ^[0-9.]+$ || $h == *:* ]]; then san+=",IP:$h"; else san+=",DNS:$h"; fi
done
# Without $BROKER_HOSTS a valid server certificate is kept with whatever names it has.
old_san=$(cat "$out/server.san" 2>/dev/null || true)
[[ -z ${BROKER_HOSTS+set} ]] && old_san=$san
if ! still_good "$out/server.crt" || [[ ! -s $out/server.key || $old_san != "$san" ]]; then
  [[ -s $out/server.key ]] || new_key "$out/server.key"
  issue "$out/server.key" "$out/server.crt" "microfed broker" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$san
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid"
  printf '%s' "$san" >"$out/server.san"
  chmod 644 "$out/server.san"
  echo "made server certificate $out/server.crt ($san)"
fi
chmod 640 "$out/server.key"
if [[ $(id -u) -eq 0 ]] && getent group mosquitto >/dev/null; then
  chgrp mosquitto "$out/server.key"
fi

# ---- the clients ----------------------------------------------------------------------------------
for name in "$@"; do
  crt=$out/clients/$name.crt
  key=$out/clients/$name.key
  if still_good "$crt" && [[ -s $key ]] && [[ "$(cn_of "$crt")" == "$name" ]]; then
    continue
  fi
  [[ -s $key ]] || new_key "$key"
  issue "$key" "$crt" "$name" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid"
  chmod 600 "$key"
  echo "made client certificate $crt (CN=$name)"
done

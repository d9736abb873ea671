#!/usr/bin/env bash
# Checks that an ELF binary needs no glibc symbol version above a floor, so it loads on an older
# distribution (default 2.31: JetPack 5 / Ubuntu 20.04).
#
#     cross/glibc-check.sh BINARY [FLOOR]
#
# Reads the binary's version needs (.gnu.version_r) with readelf, which reads ELF files of any
# architecture. On failure it lists every dynamic symbol bound to a newer GLIBC_ version: those are the
# calls that would fail to resolve on the board ("version `GLIBC_2.34' not found").
set -euo pipefail

bin=${1:?usage: glibc-check.sh BINARY [FLOOR]}
floor=${2:-2.31}
[[ -f $bin ]] || { echo "error: $bin does not exist" >&2; exit 1; }

# true when version $1 > version $2
newer() { [[ $1 != "$2" && $(printf '%s\n%s\n' "$1" "$2" | sort -V | tail -n1) == "$1" ]]; }

mapfile -t versions < <(readelf -W -V "$bin" | grep -o 'Name: GLIBC_[0-9][0-9.]*' | sed 's/Name: GLIBC_//' | sort -uV)
((${#versions[@]})) || { echo "error: $bin needs no GLIBC_ version at all: not a dynamically linked glibc binary?" >&2; exit 1; }
max=${versions[-1]}

if newer "$max" "$floor"; then
  echo "FAIL: $bin needs GLIBC_$max, above the floor GLIBC_$floor. Symbols above the floor:" >&2
  readelf -W --dyn-syms "$bin" | grep -o '[^ ]*@GLIBC_[0-9.]*' | sort -u |
    while IFS= read -r sym; do
      v=${sym##*@GLIBC_}
      if newer "$v" "$floor"; then echo "  $sym" >&2; fi
    done
  exit 1
fi
echo "ok: $(basename "$bin") needs at most GLIBC_$max (floor GLIBC_$floor)"

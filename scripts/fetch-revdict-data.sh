#!/usr/bin/env bash
# Fetch the raw data of the reverse-dictionary benchmark (SPEC §4) from Debian's archive:
# dict-gcide (Webster's 1913) and wordnet-base (WordNet 3.0 noun glosses). `apt-get download`
# needs no root and installs nothing; the .deb files are unpacked under
# ${ZRAG_HOME:-~/.cache/zrag}/data/debian. Idempotent.
set -euo pipefail

ZRAG_HOME="${ZRAG_HOME:-$HOME/.cache/zrag}"
OUT="$ZRAG_HOME/data/debian"
mkdir -p "$OUT"
if [ -f "$OUT/usr/share/dictd/gcide.dict.dz" ] && [ -f "$OUT/usr/share/dictd/gcide.index" ] \
   && [ -f "$OUT/usr/share/wordnet/data.noun" ]; then
  echo "zrag: reverse-dictionary sources already in $OUT"
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
download() { (cd "$tmp" && apt-get download dict-gcide wordnet-base 2>&1 | grep -v '^W: Download is performed unsandboxed' || true); }
download
if ! ls "$tmp"/dict-gcide_*.deb "$tmp"/wordnet-base_*.deb >/dev/null 2>&1; then
  # A fresh machine may have no package lists yet.
  echo "zrag: refreshing apt package lists"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq; else sudo apt-get update -qq; fi
  download
fi
for deb in "$tmp"/dict-gcide_*.deb "$tmp"/wordnet-base_*.deb; do
  [ -f "$deb" ] || { echo "zrag: apt-get download did not produce $deb (is the Debian archive reachable?)" >&2; exit 1; }
  dpkg-deb -x "$deb" "$OUT"
done
echo "zrag: gcide -> $OUT/usr/share/dictd, wordnet -> $OUT/usr/share/wordnet"

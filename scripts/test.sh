#!/usr/bin/env bash
# The test suite on a fresh machine: fetch models and benchmark sources, install the Python
# packages that the independent reference checks use, start a real PostgreSQL + pgvector
# (primary and streaming replica, on loopback) for the store tests, then run every test
# (release mode: the model tests are too slow unoptimised) and stop the database.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh
scripts/fetch-revdict-data.sh
bash scripts/pg.sh start
trap 'bash scripts/pg.sh stop' EXIT
bash scripts/pg.sh start-replica
eval "$(bash scripts/pg.sh env)"
# A store test that finds no database fails instead of skipping.
export ZRAG_REQUIRE_POSTGRES=1
python3 -m pip install --quiet --disable-pip-version-check numpy==2.2.6 tokenizers==0.23.3 gguf==0.19.0 \
  openai==3.63.0
cargo test --release --workspace
# The official OpenAI Python client as a real client of `zrag serve` (built by the tests above).
python3 scripts/test-openai-client.py target/release/zrag

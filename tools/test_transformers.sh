#!/usr/bin/env bash
# The default test suite against another transformers release, e.g. the lowest that pyproject.toml allows:
#     bash tools/test_transformers.sh 5.23.0
# Everything else is installed at the versions in constraints.txt, in a fresh venv under /tmp.
set -euo pipefail
version="$1"
cd "$(dirname "$0")/.."
venv="/tmp/streammerge-transformers-$version"
python3 -m venv "$venv"
. "$venv/bin/activate"
grep -v '^transformers==' constraints.txt > "$venv/constraints.txt"
pip install --quiet -c "$venv/constraints.txt" "transformers==$version" -e '.[test]'
python -m pytest -q

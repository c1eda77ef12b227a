#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_suite.py needs on a GPU machine whose image lacks them (no network
# there): pydantic (pipeline.config) and webdataset (the shard reader), their own needs, and the locked
# timm so the models build the same. Versions are the ones installed in .venv (the lock file's).
#
#   benchmarks/gpu_wheels.sh [DEST]        # DEST defaults to .whl, added to .git/info/exclude
#
# Then on the GPU machine, from the repository root, before the suite:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
python=${PYTHON:-.venv/bin/python}
if [ -d .git ] && ! grep -qxF "/$dest/" .git/info/exclude 2>/dev/null; then
    echo "/$dest/" >> .git/info/exclude
fi
mapfile -t pins < <("$python" - <<'EOF'
from importlib.metadata import version

for name in ("webdataset", "braceexpand", "pydantic", "pydantic_core", "annotated_types",
             "typing_inspection", "typing_extensions", "timm"):
    print(f"{name}=={version(name)}")
EOF
)
# The GPU image's Python is CPython 3.12 on x86_64 (manylinux); pip matches each platform tag exactly.
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" "${pins[@]}"
ls -1 "$dest"

#!/usr/bin/env bash
# Fills .wheelhouse/ (git-ignored) with the wheels that an offline GPU machine needs besides its own
# CUDA build of torch and Triton: the pure-Python packages of fusedrl's engine / trl / bench extras
# that a stock CUDA image (PyTorch, transformers, accelerate, pytest...) lacks, plus the GPU peers of
# the benchmarks (Liger-Kernel, cut-cross-entropy). Run it on a machine that reaches the package index,
# then take .wheelhouse/ along to the GPU machine; bench/run_gpu.sh installs from it without a network
# (see docs/benchmarks.md). Versions are those of this checkout's .venv where it has them (what CI
# tested), else the newest. About 10 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_VERSION=${PYTHON_VERSION:-3.12}  # the GPU image's Python
PACKAGES=(omegaconf antlr4-python3-runtime math-verify latex2sympy2_extended trl datasets dill multiprocess
          liger-kernel cut-cross-entropy)

pinned() {
    local name=$1 version=""
    if [ -x .venv/bin/python ]; then
        version=$(.venv/bin/python -c 'import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass' "$name")
    fi
    echo "$name${version:+==$version}"
}

rm -rf .wheelhouse
mkdir -p .wheelhouse
specs=()
for name in "${PACKAGES[@]}"; do
    specs+=("$(pinned "$name")")
done
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PYTHON_VERSION" -d .wheelhouse "${specs[@]}" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
echo "wheelhouse: $(ls .wheelhouse | wc -l) wheels, $(du -sh .wheelhouse | cut -f1), in .wheelhouse/"

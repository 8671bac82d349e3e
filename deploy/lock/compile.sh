#!/bin/bash
# Regenerates the image lock files from pyproject.toml (run after changing dependencies):
#   deploy/lock/compile.sh            # all flavours
#   deploy/lock/compile.sh xpu        # one
# cpu.txt    extra [cpu]  Python 3.11 (python:3.11-slim)
# nvidia.txt extra [gpu]  Python 3.11 (python:3.11-slim + the NVIDIA driver from the host)
# xpu.txt    extra [xpu]  Python 3.10 (the oneAPI 2024.1 runtime image is Ubuntu 22.04; ITEX 2.15 pairs with TF 2.15)
# Needs uv (pip install uv). Wheels only, so the images need no compiler.
set -euo pipefail
cd "$(dirname "$0")/../.."
uv=${UV:-uv}
compile() {  # compile FLAVOUR EXTRA PYTHON
  "$uv" pip compile pyproject.toml --extra "$2" --python-version "$3" --python-platform x86_64-manylinux_2_28 \
    --only-binary :all: --quiet --custom-compile-command "deploy/lock/compile.sh" -o "deploy/lock/$1.txt"
  sed -i 's|^#    deploy/lock/compile.sh$|#    deploy/lock/compile.sh  (uv pip compile pyproject.toml --extra FLAVOUR, Linux x86_64, wheels only)|' "deploy/lock/$1.txt"
}
for flavour in "${@:-cpu nvidia xpu}"; do
  for one in $flavour; do
    case "$one" in
      cpu) compile cpu cpu 3.11 ;;
      nvidia) compile nvidia gpu 3.11 ;;
      xpu) compile xpu xpu 3.10 ;;
      *) echo "compile.sh: unknown flavour $one (cpu, nvidia, xpu)" >&2; exit 2 ;;
    esac
  done
done

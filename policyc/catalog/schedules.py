"""Schedules: amounts that vary by layer across a multi-layer stage, or adapt to the scores.

A list literal `[300, 200, 110]` is the explicit schedule: one kept count per layer.
"""

from policyc.catalog.base import Option, Registry, Spec

SCHEDULES = Registry("schedule", "schedule")
SCHEDULES.add(
    Spec("geometric", "schedule", "keep N0 * ratio^(i+1) tokens at the i-th layer of the stage (PyramidDrop's lambda)",
         options=(Option("ratio", ("number",), "lambda, the share kept at each step", positional=True, low=0,
                         high=1),),
         returns="schedule", paper="PyramidDrop arXiv:2410.17247"),
    Spec("linear", "schedule", "an amount moving linearly from `start` at the first layer to `end` at the last "
         "(ToMe's decreasing r schedule is linear(2r, 0))",
         options=(Option("start", ("count", "percent"), "amount at the first layer", positional=True),
                  Option("end", ("count", "percent"), "amount at the last layer", positional=True)),
         returns="schedule", paper="ToMe arXiv:2210.09461"),
    Spec("cosine", "schedule", "an amount following a cosine decay from `start` to `end` over the stage's layers "
         "(p-MoD's progressive ratio decay)",
         options=(Option("start", ("count", "percent"), "amount at the first layer", positional=True),
                  Option("end", ("count", "percent"), "amount at the last layer", positional=True)),
         returns="schedule", paper="p-MoD arXiv:2412.04449"),
    Spec("mass", "schedule", "adaptive: the fewest tokens whose scores hold `tau` of the total score mass (ZipVL)",
         options=(Option("tau", ("number",), "mass to keep", positional=True, low=0, high=1),),
         returns="schedule", paper="ZipVL arXiv:2410.08584"),
    Spec("entropy", "schedule", "adaptive: prune more where the score distribution is peaked, reaching `target` "
         "tokens by the stage's last layer, acting every `every` layers (FlowCut)",
         options=(Option("target", ("count",), "tokens left after the last layer", positional=True, integer=True),
                  Option("every", ("number",), "act on the stage's last layer and every n-th layer before it",
                         default="1", low=1, integer=True),
                  Option("score", ("score",), "the distribution whose entropy sets the pace (FlowCut: the CLS "
                         "attention row)", default="by")),
         returns="schedule", paper="FlowCut arXiv:2505.19536"),
    Spec("rank", "schedule", "adaptive: scale * rank(attention of the flow's queries to the set) + bias "
         "(SparseVLM v1)",
         options=(Option("scale", ("number",), "multiplier", default="1", low=0),
                  Option("bias", ("number",), "offset", default="0")),
         returns="schedule", paper="SparseVLM arXiv:2410.04417"),
)

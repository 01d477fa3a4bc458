"""Functions usable in score and amount expressions."""

from policyc.catalog.base import Option, Registry, Spec


def _unary(name: str, summary: str) -> Spec:
    x = Option("x", ("score", "number"), "input", positional=True)
    return Spec(name, "function", summary, options=(x,), returns="same")


def _reduction(name: str, summary: str) -> Spec:
    x = Option("x", ("score",), "per-token score", positional=True)
    return Spec(name, "function", summary, options=(x,), returns="number")


def _rounding(name: str, summary: str) -> Spec:
    x = Option("x", ("number", "count"), "input", positional=True)
    return Spec(name, "function", summary, options=(x,), returns="count")


FUNCTIONS = Registry("function", "function")
FUNCTIONS.add(
    Spec("normalize", "function", "rescale a score over the stage's tokens: divide by its sum (or max, or min-max)",
         options=(Option("x", ("score",), "per-token score", positional=True),
                  Option("by", ("enum",), "normaliser", default="sum", choices=("sum", "max", "minmax"))),
         returns="score"),
    Spec("ema", "function", "exponential moving average of a score across the layers of a multi-layer stage "
         "(FlowCut's information flow)",
         options=(Option("x", ("score",), "per-token score", positional=True),
                  Option("decay", ("number",), "weight of the previous layers", default="0.5", low=0, high=1)),
         returns="score", paper="FlowCut arXiv:2505.19536"),
    Spec("softmax", "function", "softmax of a score over the stage's tokens",
         options=(Option("x", ("score",), "per-token score", positional=True),
                  Option("temperature", ("number",), "temperature", default="1", low=0)),
         returns="score"),
    _reduction("sum", "sum of a score over the tokens it is defined on"),
    _reduction("mean", "mean of a score over the tokens it is defined on"),
    _reduction("max", "maximum of a score over the tokens it is defined on"),
    _reduction("min", "minimum of a score over the tokens it is defined on"),
    _unary("abs", "absolute value"),
    _unary("exp", "exponential"),
    _unary("log", "natural logarithm"),
    _unary("sqrt", "square root"),
    _rounding("round", "round to the nearest whole number"),
    _rounding("floor", "round down"),
    _rounding("ceil", "round up"),
    Spec("size", "function", "number of tokens in a set",
         options=(Option("set", ("set",), "token set", positional=True),), returns="count"),
    Spec("dilate", "function", "a set grown by its neighbours on the image patch grid (HiPrune's buffer tokens)",
         options=(Option("set", ("set",), "token set", positional=True),
                  Option("radius", ("number",), "grid distance (4-neighbourhood steps)", default="1", low=1,
                         integer=True)),
         returns="set", stages=frozenset({"encoder", "projector"}), paper="HiPrune arXiv:2508.00553"),
)

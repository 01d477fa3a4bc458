"""Signals: per-token scores and features read from the model at a stage."""

from policyc.catalog.base import Option, Registry, Spec

LAYER = Option("layer", ("number", "enum"), "layer to read: an index (negative from the end), `next` "
               "(recompute with the next layer's projections, as PyramidDrop) or `previous` (the LLM layer before "
               "the stage's, as recorded: CATP's attention gain); default: this stage's layer",
               default="here", choices=("next", "previous"), integer=True)

SIGNALS = Registry("signal", "signal")
SIGNALS.add(
    Spec("attention", "signal",
         "attention the key tokens receive from a query set: softmax over all visible keys, then reduced",
         options=(
             Option("flow", ("flow",), "queries -> keys, e.g. last -> vision", positional=True),
             Option("heads", ("enum",), "reduce over heads", default="mean", choices=("mean", "sum", "max")),
             Option("queries", ("enum",), "reduce over query rows", default="mean", choices=("mean", "sum", "max")),
             LAYER,
             Option("layers", ("range",), "sum the scores of encoder layers a..b (inclusive; negative indices "
                    "count from the end), each at or before the stage's layer (VTC-CLS's ensemble)",
                    default="here", integer=True),
             Option("top_heads", ("count",), "keep only the k heads giving the keys most mass (SparseVLM v2)",
                    default="all", low=1, integer=True),
             Option("space", ("enum",), "`values`: softmax of unscaled value products (FlowCut's semantic score)",
                    default="keys", choices=("keys", "values")),
             Option("correct", ("enum",), "bias correction: `causal` divides by the queries that see each key; "
                    "`rope` divides by the RoPE distance bias (SparseVLM v2)", default="none",
                    choices=("none", "causal", "rope")),
             Option("softmax", ("enum",), "normalise over `all` visible keys or only the `keys` of the flow",
                    default="all", choices=("all", "keys")),
         ),
         paper="FastV arXiv:2403.06764; PyramidDrop arXiv:2410.17247; VTC-CLS arXiv:2412.05819"),
    Spec("key_norm", "signal", "L2 norm of each token's attention key (mean over heads)", options=(LAYER,)),
    Spec("value_norm", "signal", "L1 norm of each token's head-mean value vector (FlowCut)", options=(LAYER,),
         paper="FlowCut arXiv:2505.19536"),
    Spec("similarity", "signal", "cosine similarity of each token to a token set, reduced over that set",
         options=(
             Option("to", ("set",), "the set compared against", positional=True),
             Option("features", ("feature",), "features compared", default="hidden"),
             Option("reduce", ("enum",), "reduce over the set", default="mean", choices=("mean", "max")),
         )),
    Spec("diversity", "signal", "cosine distance of each token to its nearest neighbour among the image tokens "
         "alive at the stage (one image before the LLM)",
         options=(Option("features", ("feature",), "features compared", default="hidden"),),
         paper="DivPrune arXiv:2503.02175"),
    Spec("random", "signal", "uniform random score: ranking by it is random pruning (a strong baseline)",
         options=(Option("seed", ("number",), "random seed", default="0", integer=True, low=0),)),
    Spec("image", "signal", "each token's image in its prompt, 0 for the first (an image, a video, or a tile of "
         "Idefics3 and InternVL): `vision where image > 0`; `vision[i]` is image i",
         stages=frozenset({"projector", "llm"})),
    Spec("frame", "signal", "each token's frame in its video, 0 for the first (Qwen2-VL: a group of "
         "temporal_patch_size frames); an image is frame 0: `vision where frame < 4`",
         stages=frozenset({"projector"})),
    Spec("hidden", "feature", "hidden states (the residual stream) of each token", options=(LAYER,),
         returns="feature"),
    Spec("keys", "feature", "attention keys of each token, mean over heads (ToMe's metric)", options=(LAYER,),
         returns="feature", paper="ToMe arXiv:2210.09461"),
    Spec("values", "feature", "attention values of each token, mean over heads", options=(LAYER,), returns="feature"),
)

"""Merges: `merge METHOD(options) of SET [into SET] [by FEATURES]` folds tokens into others."""

from policyc.catalog.base import Option, Registry, Spec

MERGES = Registry("merge", "merge method")
MERGES.add(
    Spec("bipartite", "merge", "ToMe bipartite soft matching: split alternately, merge the r most similar pairs "
         "by size-weighted average, tracking token sizes; the tokens reach the LLM each at its earliest patch "
         "(`order=spatial`: LLaVA's raster order, which its LLM was trained on) or in the order ToMe's code leaves "
         "them (`order=code`: after each merge the unmerged A tokens, then all B tokens)",
         options=(Option("r", ("count", "schedule"), "tokens removed per layer", positional=False),
                  Option("proportional", ("enum",), "add log(size) to attention logits (proportional attention)",
                         default="true", choices=("true", "false")),
                  Option("order", ("enum",), "the order the tokens reach the LLM in: `spatial`, each at its earliest "
                         "patch (LLaVA's raster order, which its LLM was trained on); `code`, the order ToMe's code "
                         "leaves the rows in (after each merge the unmerged A tokens, then all B tokens); encoder "
                         "layers of towers that hand their rows to the LLM as they are (LLaVA)",
                         default="spatial", choices=("spatial", "code"))),
         returns="set", by="feature", stages=frozenset({"encoder", "projector"}), paper="ToMe arXiv:2210.09461"),
    Spec("window", "merge", "merge each non-overlapping k x k window whose mean pairwise cosine similarity is at "
         "least `threshold` into one token, at the window's top-left patch (MustDrop's local spatial merge)",
         options=(Option("size", ("number",), "window side k", default="3", low=2, integer=True),
                  Option("threshold", ("number",), "similarity threshold", default="0.8", low=-1, high=1)),
         returns="set", by="feature", stages=frozenset({"encoder", "projector"}), paper="MustDrop arXiv:2411.10803"),
    Spec("nearest", "merge", "assign each token to its most similar target; each target becomes itself plus the "
         "mean of its assigned tokens, in its own slot (VisionZip contextual tokens)",
         options=(Option("combine", ("enum",), "`add_mean`: target + mean(assigned), as VisionZip's code; "
                         "`mean`: plain average", default="add_mean", choices=("add_mean", "mean")),),
         returns="set", by="feature", into=True, paper="VisionZip arXiv:2412.04467"),
    Spec("cluster", "merge", "recycle tokens (typically `dropped`): cluster the best-ranked share with DPC-kNN and "
         "make each cluster one token, the mean of its members, in its centre's slot (SparseVLM's recycling)",
         options=(Option("clusters", ("count", "percent"), "clusters: a count, or floor(P% of the clustered) + 1",
                         default="10%"),
                  Option("knn", ("number",), "neighbours for the density estimate (default: the cluster count)",
                         default="clusters", low=1, integer=True),
                  Option("share", ("percent",), "recycle the floor(share of SET) + 1 ranked highest; 0% none",
                         default="100%"),
                  Option("rank", ("score",), "the score ranking SET for `share` (default: position order)",
                         default="position")),
         returns="set", by="feature", paper="SparseVLM arXiv:2410.04417"),
    Spec("pool", "merge", "average-pool the image patch grid with a k x k window (plain downsampling baseline)",
         options=(Option("size", ("number",), "window side k", default="2", low=2, integer=True),),
         returns="set", stages=frozenset({"encoder", "projector"})),
    Spec("fuse", "merge", "fuse the tokens into one token, weighted by a score, in the place of their earliest "
         "member (EViT's inattentive-token fusion)",
         returns="set", by="score", paper="EViT arXiv:2202.07800"),
    Spec("temporal", "merge", "merge each video token into the token at its spatial position in the previous frame "
         "(group) when their cosine similarity exceeds `threshold`, averaging each run of similar tokens into its "
         "first frame's slot (HoliTom's and DyCoke's temporal merging); images (one frame) are left alone",
         options=(Option("threshold", ("number",), "cosine similarity a token must exceed", default="0.9", low=-1,
                         high=1),),
         returns="set", by="feature", stages=frozenset({"projector"}), paper="HoliTom arXiv:2505.21334"),
)

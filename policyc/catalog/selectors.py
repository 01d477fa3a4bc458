"""Selectors: `SELECTOR amount of SET [by ...]` picks a token set. Kept indices stay in original order."""

from policyc.catalog.base import Option, Registry, Spec

# `top(allocate=S) 64 of vision by S`: one budget per sample, split across its images (passes/allocate.py).
ALLOCATE = Option("allocate", ("score", "enum"), "`none`: the amount holds for each image on its own; a score or "
                  "`equal`: the amount is one budget for each sample's images, split across them in proportion to "
                  "the sum of the score over each image's candidates (GlobalCom2, HiRED), or equally",
                  default="none", choices=("none", "equal"))

SELECTORS = Registry("selector", "selector")
SELECTORS.add(
    Spec("top", "selector", "the tokens with the highest score; with `allocate` one budget per sample is split "
         "across its images (GlobalCom2, HiRED)", options=(ALLOCATE,), returns="set", by="score"),
    Spec("diverse", "selector", "greedy max-min diversity over features, seeded with the most isolated token "
         "(DivPrune; ToDRE's k-center); objective=sum gives greedy max-sum",
         options=(Option("metric", ("enum",), "distance", default="cosine", choices=("cosine", "l2")),
                  Option("objective", ("enum",), "max-min or max-sum", default="min", choices=("min", "sum")),
                  ALLOCATE),
         returns="set", by="feature", paper="DivPrune arXiv:2503.02175"),
    Spec("cover", "selector", "greedy maximum coverage of the question's words (by the `by` features) and of the "
         "image tokens (by the encoder features the projector reads) (MMTok)",
         options=(Option("alpha", ("number",), "weight of vision-to-vision coverage", default="0.5", low=0),
                  Option("tau_text", ("number",), "text-vision temperature", default="0.02", low=0),
                  Option("tau_vision", ("number",), "vision-vision temperature", default="0.2", low=0),
                  Option("words", ("enum",), "question words: the prompt's text tokens after the image, or "
                         "MMTok's keyword filter", default="prompt", choices=("prompt", "keywords"))),
         returns="set", by="feature", stages=frozenset({"projector", "llm"}), paper="MMTok arXiv:2508.18264"),
    Spec("grid", "selector", "tokens on a uniform 2-D grid over the image patches (a downsampling baseline)",
         returns="set", stages=frozenset({"encoder", "projector", "llm"})),
    Spec("stride", "selector", "every k-th token of the set in order, k = size(set) // amount (VisionZip's targets)",
         returns="set", paper="VisionZip arXiv:2412.04467"),
)

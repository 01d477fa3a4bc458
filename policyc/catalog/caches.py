"""Cache policies: `cache METHOD(options)` in the `decode` stage decides what the KV cache keeps."""

from policyc.catalog.base import Option, Registry, Spec

DECODE = frozenset({"decode"})
CACHES = Registry("cache", "cache policy")
CACHES.add(
    Spec("full", "cache", "keep every layer's cache as prefill left it (the default)", stages=DECODE),
    Spec("regather", "cache", "after prefill, shrink every pruned layer's cache to the tokens that survive the "
         "last stage (MustDrop's output-aware cache)", stages=DECODE, paper="MustDrop arXiv:2411.10803"),
    Spec("heavy_hitter", "cache", "keep the tokens with the most accumulated attention plus a recent window, "
         "per head (H2O)",
         options=(Option("heavy", ("count", "percent"), "heavy-hitter budget", default="10%"),
                  Option("recent", ("count", "percent"), "recent-window budget", default="10%"),
                  Option("per_head", ("enum",), "select per head", default="true", choices=("true", "false"))),
         stages=DECODE, paper="H2O arXiv:2306.14048"),
    Spec("sink_window", "cache", "keep the first `sinks` tokens and the last `window` tokens (StreamingLLM)",
         options=(Option("sinks", ("count",), "attention-sink tokens", default="4", integer=True),
                  Option("window", ("count",), "recent tokens", default="2000", integer=True)),
         stages=DECODE, paper="StreamingLLM arXiv:2309.17453"),
    Spec("snapkv", "cache", "vote with the last `window` prompt queries, pool the votes, keep the top "
         "`capacity` tokens per head (SnapKV)",
         options=(Option("window", ("count",), "observation window", default="32", integer=True),
                  Option("capacity", ("count",), "tokens kept per head, window included", default="2048",
                         integer=True),
                  Option("kernel", ("number",), "pooling kernel", default="7", low=1, integer=True),
                  Option("pool", ("enum",), "pooling", default="max", choices=("max", "avg"))),
         stages=DECODE, paper="SnapKV arXiv:2404.14469"),
    Spec("mixed_precision", "cache", "keep the tokens holding `mass` of the attention in high precision and the "
         "rest in low precision, recompressing every `every` steps (ZipVL v1)",
         options=(Option("mass", ("number",), "attention mass of the important set", default="0.975", low=0, high=1),
                  Option("high_bits", ("number",), "bits for important tokens", default="4", low=1, high=16,
                         integer=True),
                  Option("low_bits", ("number",), "bits for the rest", default="2", low=1, high=16, integer=True),
                  Option("every", ("number",), "decode steps between recompressions", default="100", low=1,
                         integer=True)),
         stages=DECODE, paper="ZipVL arXiv:2410.08584"),
    Spec("importance", "cache", "every `every` generated tokens, keep of the last `every` cache entries those "
         "holding `mass` of the newest query's attention over them and evict the rest (ZipVL v2)",
         options=(Option("mass", ("number",), "attention mass kept", default="0.975", low=0, high=1),
                  Option("every", ("number",), "generated tokens between recompressions", default="100", low=1,
                         integer=True)),
         stages=DECODE, paper="ZipVL arXiv:2410.08584"),
)

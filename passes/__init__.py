"""Runtime operators, one per file, registered by the names the language's catalog uses.

Shipped as `policyc.passes`. Importing this package registers every operator in it.
"""

from policyc.passes import (  # noqa: F401  (registration)
    attention,
    cache_heavy_hitter,
    cache_importance,
    cache_mixed_precision,
    cache_regather,
    cache_sink_window,
    cache_snapkv,
    diversity,
    frame_index,
    graph_stage_drop,
    hidden,
    image_index,
    key_norm,
    keys,
    merge_bipartite,
    merge_cluster,
    merge_fuse,
    merge_nearest,
    merge_pool,
    merge_temporal,
    merge_window,
    random_score,
    select_cover,
    select_diverse,
    select_grid,
    select_stride,
    select_top,
    text_relevance,
    value_norm,
)
from policyc.passes.base import SIGNAL_OPS, SignalOp, register_signal
from policyc.passes.cache_base import CACHE_OPS, CacheOp, register_cache
from policyc.passes.features import FEATURE_OPS, FeatureOp, register_feature
from policyc.passes.graph import GRAPH_PASSES, GraphPass, register_graph_pass
from policyc.passes.merges import MERGE_OPS, MergeOp, register_merge
from policyc.passes.selectors import SELECTOR_OPS, SelectorOp, register_selector

__all__ = ["CACHE_OPS", "FEATURE_OPS", "GRAPH_PASSES", "MERGE_OPS", "SELECTOR_OPS", "SIGNAL_OPS", "CacheOp",
           "FeatureOp", "GraphPass", "MergeOp", "SelectorOp", "SignalOp", "register_cache", "register_feature",
           "register_graph_pass", "register_merge", "register_selector", "register_signal"]

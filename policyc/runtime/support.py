"""What the eager runtime implements today. Anything else fails at compile time, at its policy
line, instead of running with a silently different meaning."""

from __future__ import annotations

from collections.abc import Mapping

from policyc.catalog import SIGNALS
from policyc.catalog.base import ALL_STAGES
from policyc.catalog.signals import LAYER
from policyc.compiler.plan import BoundStage, Plan
from policyc.errors import PolicyError
from policyc.lang import ir
from policyc.passes import (
    CACHE_OPS,
    FEATURE_OPS,
    FUNCTION_OPS,
    MERGE_OPS,
    SCHEDULE_OPS,
    SELECTOR_OPS,
    SIGNAL_OPS,
    AmountFunction,
    MergeOp,
    SelectorOp,
)

_SETS = {"llm": {"cls"}, "encoder": {"raters", "dropped"}, "projector": {"raters", "dropped"}}
_WHERE = {"projector": " at projector.output", "llm": " in the LLM", "encoder": " in encoder stages"}


def check_supported(plan: Plan, backend: str = "eager") -> None:
    problems: list[PolicyError] = []
    if backend != "eager" and plan.adapter.rope != "1d":
        span = next((s.span for s in plan.stages if s.kind == "llm"), None)
        problems.append(PolicyError.at(f"the {backend} backend's graph passes rewrite 1-D RoPE decoders so far; "
                                       f"this model ({plan.adapter.family}) uses M-RoPE", span,
                                       "compile with backend='eager' (the reference semantics)"))
    elif backend != "eager" and plan.adapter.layer_types:
        span = next((s.span for s in plan.stages if s.kind == "llm"), None)
        problems.append(PolicyError.at(f"the {backend} backend's graph passes rewrite decoders whose layers share one "
                                       f"causal mask and rotary embedding; this model ({plan.adapter.family}) has "
                                       "sliding-window and global layers with masks of their own", span,
                                       "compile with backend='eager' (the reference semantics)"))
    for stage in plan.stages:
        if backend != "eager" and _not_in_graphs(stage):
            problems.append(PolicyError.at(f"{_not_in_graphs(stage)} not implemented by the {backend} backend yet",
                                           stage.span, "compile with backend='eager' (the reference semantics)"))
        for statement in stage.statements:
            try:
                _statement(stage, statement, plan)
            except PolicyError as error:
                problems.append(error)
    problems += _cache_length_with(plan)
    problems += _multi_image(plan)
    problems += _schedule_inputs(plan)
    if plan.adapter.token_grid is None:
        problems += _without_one_grid(plan)
    if problems:
        raise PolicyError([d for p in problems for d in p.diagnostics])


def _cache_length_with(plan: Plan) -> list[PolicyError]:
    """`positions cache_length` numbers decode tokens by each layer's cache: only caches that shrink once, after
    prefill, to the same tokens in every head (`full`, `regather`) are defined with it so far."""
    if not any(isinstance(st, ir.Positions) and st.mode == "cache_length" for s in plan.stages for st in s.statements):
        return []
    return [_not_yet(f"cache {st.method} with positions cache_length", st) for s in plan.stages if s.kind == "decode"
            for st in s.statements if isinstance(st, ir.Cache) and st.method not in ("full", "regather")]


def _multi_image(plan: Plan) -> list[PolicyError]:
    """`top(allocate=...)` splits a budget across the images of a sample: at projector.output and in the LLM, not in
    the encoder, which sees each image on its own. `merge temporal` reads video frames from the model
    (`reads_video_frames`: Qwen2-VL's grid_thw where its packed tower hands the merged tokens to projector.output,
    LLaVA-OneVision's frames of pooled tokens; runtime/vision.py); on image-only families every image is one frame
    (a no-op), and families with videos whose frames are not read fail here."""
    problems = []
    adapter = plan.adapter
    for stage in plan.stages:
        for statement in stage.statements:
            for node in statement.walk():
                if isinstance(node, ir.Select) and stage.kind == "encoder" and any(
                        k.name == "allocate" and stage.values.get(getattr(k.value, "id", ""), k.value)
                        != ir.Name(id="none") for k in node.options):
                    problems.append(PolicyError.at(
                        f"an encoder stage sees each image on its own: {node.selector}(allocate=...) splits a "
                        "prompt's budget across its images at projector.output or in the LLM", node.span,
                        "move this stage to projector.output, or allocate in an LLM stage"))
            if isinstance(statement, ir.Merge) and statement.method == "temporal" and \
                    not adapter.reads_video_frames and len(adapter.visual_ids) > 1:  # image-only: a no-op
                problems.append(PolicyError.at(
                    f"merge temporal needs the video frames of the model, which {adapter.family}'s projector "
                    "stages do not read yet", statement.span,
                    "Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision give them; on images it changes nothing"))
    return problems


def _schedule_inputs(plan: Plan) -> list[PolicyError]:
    """A schedule that reads how the selection's score is computed (`ScheduleOp.reads_by`: `rank` reads the
    attention matrix) needs `by` to be that signal, directly or through parameters and `score` definitions."""
    formulas = {s.name: s.value for stage in plan.stages for s in stage.statements if isinstance(s, ir.ScoreDef)}
    problems = []
    for stage in plan.stages:
        for node in (n for statement in stage.statements for n in statement.walk()):
            if not (isinstance(node, ir.Select) and isinstance(node.amount, ir.Call) and node.amount.fn in
                    SCHEDULE_OPS and SCHEDULE_OPS[node.amount.fn].reads_by):
                continue
            wanted = SCHEDULE_OPS[node.amount.fn].reads_by
            by, seen = node.by, set()
            while isinstance(by, ir.Name) and by.id not in seen and (by.id in stage.values or by.id in formulas):
                seen.add(by.id)
                by = stage.values.get(by.id) or formulas[by.id]
            if not (isinstance(by, ir.Call) and by.fn == wanted):
                problems.append(PolicyError.at(
                    f"{node.amount.fn}() reads the matrix of the selection's `by {wanted}(...)`, and this selection "
                    "ranks by something else", node.amount.span,
                    f"e.g. top {node.amount.fn}() of vision by {wanted}(text -> vision)"))
    return problems


def _needs(node: ir.Node) -> tuple[str | None, frozenset[str]]:
    """The operator or function a node names and what it needs at projector.output (`Spec.needs`)."""
    match node:
        case ir.Select(selector=name) if name in SELECTOR_OPS:
            return name, SELECTOR_OPS[name].spec.needs
        case ir.Merge(method=name) if name in MERGE_OPS:
            return name, MERGE_OPS[name].spec.needs
        case ir.Call(fn=name) | ir.Name(id=name) if name in SIGNAL_OPS or name in FEATURE_OPS:
            return name, (SIGNAL_OPS.get(name) or FEATURE_OPS[name]).spec.needs
        case ir.Call(fn=name) if name in FUNCTION_OPS or name in SCHEDULE_OPS:
            return name, (FUNCTION_OPS.get(name) or SCHEDULE_OPS[name]).spec.needs
    return None, frozenset()


def _without_one_grid(plan: Plan) -> list[PolicyError]:
    """Where LLM tokens fold patches (Qwen2-VL's merger, pixel shuffle) or images differ in size, projector stages
    have no token grid common to every image, and no question (the stash reads LLaVA's one run per image): what
    needs either fails here."""
    problems = []
    for stage in plan.stages:
        if stage.kind != "projector":
            continue
        for node in (n for st in stage.statements for n in st.walk()):
            name, needs = _needs(node)
            if needs:
                need = "the image patch grid" if "grid" in needs else "the question"
                problems.append(PolicyError.at(
                    f"{name} needs {need}, which {plan.adapter.family}'s projector stages do not have yet (its tokens "
                    "fold patches, or each image has its own size)", node.span,
                    "score-based selections run there: top, diverse, stride"))
    return problems


def _not_in_graphs(stage: BoundStage) -> str | None:
    """What the graph backends cannot run yet: stages before the LLM, merges in the LLM and cache policies."""
    if stage.kind in ("encoder", "projector"):
        return f"{stage.kind} stages are"
    if stage.kind == "llm" and any(isinstance(s, ir.Merge) for s in stage.statements):
        return "merges in the LLM are"
    if any(isinstance(s, ir.Cache) and s.method != "full" for s in stage.statements):
        return "cache policies other than `full` are"
    if any(_names(s, "raters") for s in stage.statements):
        return "the token set `raters` is"
    if any(_names(s, "previous") for s in stage.statements):
        return "attention(layer=previous) is"
    return None


def _names(node: ir.Node, name: str) -> bool:
    return any(isinstance(n, ir.Name) and n.id == name for n in node.walk())


def _not_yet(what: str, node: ir.Node) -> PolicyError:
    return PolicyError.at(f"{what} is not implemented by policyc's runtime yet", node.span,
                          "supported today: encoder, projector and llm.layer[...] stages with "
                          "let/score/keep/drop/protect, the selectors top and stride (everywhere) and "
                          f"{_builtin(_selectors_before_llm_only())} (before the LLM), the amounts [lists] (in the "
                          f"LLM) and {_by_stage(SCHEDULE_OPS)}, the functions {_by_stage(FUNCTION_OPS)}, the merges "
                          f"{_builtin(_merges_before_llm())} (before the LLM; "
                          "nearest with combine=add_mean by keys also in the LLM) and cluster by hidden or keys (in "
                          f"the LLM), the signals {_builtin(SIGNAL_OPS)}, the features "
                          f"{_builtin(FEATURE_OPS)} (in "
                          "the LLM keys and keys(layer=next), and hidden for merge cluster), "
                          "attention(layer=previous) in the LLM, "
                          "positions original, compact or cache_length (with the caches full and regather), "
                          f"and the cache policies {_builtin(CACHE_OPS)}")


def _by_stage(operators: Mapping[str, object]) -> str:
    """policyc's own `operators` (functions or schedules), grouped by the stage kinds they run in."""
    groups: dict[str, list[str]] = {}
    for name, op in operators.items():
        spec = op.spec  # type: ignore[attr-defined]
        kinds = frozenset(k for k in ALL_STAGES if spec.runs_in(k))
        where = {ALL_STAGES: "in every stage", frozenset({"encoder", "projector"}): "before the LLM",
                 frozenset({"llm"}): "in the LLM"}.get(kinds, " and ".join(sorted(kinds)))
        groups.setdefault(where, []).append(name)
    return "; ".join(f"{_builtin({n: operators[n] for n in names})} ({where})"
                     for where, names in sorted(groups.items()))


def _selectors_before_llm_only() -> dict[str, SelectorOp]:
    return {n: op for n, op in SELECTOR_OPS.items() if not op.spec.runs_in("llm")}


def _merges_before_llm() -> dict[str, MergeOp]:
    return {n: op for n, op in MERGE_OPS.items() if op.spec.runs_in("encoder") or op.spec.runs_in("projector")}


def _signal_runs(name: str, kind: str) -> bool:
    """Whether the runtime implements signal or features `name` in a stage of this kind (True for other names).
    Attention readers run in the encoder and the LLM, not at projector.output; value readers in the encoder."""
    op = SIGNAL_OPS.get(name) or FEATURE_OPS.get(name)
    return op is None or op.spec.runs_in(kind)  # type: ignore[arg-type]


def _builtin(operators: Mapping[str, object]) -> str:
    """The names of policyc's own operators among `operators`, sorted (the hint lists no plug-in's)."""
    from policyc.operators import is_builtin

    return ", ".join(sorted(name for name, op in operators.items() if is_builtin(op)))


def _statement(stage: BoundStage, statement: ir.Statement, plan: Plan) -> None:
    kind = stage.kind
    if kind == "decode":
        if isinstance(statement, ir.Cache) and statement.method in CACHE_OPS and plan.adapter.rope != "1d" \
                and CACHE_OPS[statement.method].relative_positions:
            raise PolicyError.at(f"cache {statement.method} re-rotates cached keys to their index in the cache "
                                 "(StreamingLLM's pos-shift), which is defined for 1-D RoPE; this model's LLM uses "
                                 "M-RoPE (3-D positions)", statement.span,
                                 "heavy_hitter (H2O) or snapkv keep positions and run on M-RoPE models")
        if isinstance(statement, ir.Cache) and statement.method in CACHE_OPS and plan.adapter.layer_types \
                and CACHE_OPS[statement.method].relative_positions:
            raise PolicyError.at(f"cache {statement.method} re-rotates cached keys to their index in the cache "
                                 "(StreamingLLM's pos-shift), which is not defined for this model's sliding-window "
                                 "layers: their windows count original positions", statement.span,
                                 "heavy_hitter (H2O) or snapkv keep positions and run on this model")
        if isinstance(statement, ir.Cache) and statement.method in CACHE_OPS:
            return
        raise _not_yet(f"cache policy '{getattr(statement, 'method', '?')}'", statement)
    match statement:
        case ir.Positions(mode="original" | "compact" | "cache_length"):
            return
        case ir.Positions(mode=mode):
            raise _not_yet(f"positions {mode}", statement)
        case ir.Merge(method=method, options=options, source=source, into=into, by=by) if kind == "llm":
            # policyc/runtime/llm.py `merge_rows`: nearest with combine=add_mean by keys (VisionDrop); cluster
            if method not in MERGE_OPS or not MERGE_OPS[method].spec.runs_in("llm"):
                raise _not_yet(f"merge {method} in the LLM", statement)
            for option in options:
                value = stage.values.get(option.value.id, option.value) if isinstance(option.value, ir.Name) \
                    else option.value
                if option.name not in MERGE_OPS[method].spec.implemented or (option.name == "combine" and not (
                        isinstance(value, ir.Name) and value.id == "add_mean")):
                    raise _not_yet(f"merge {method}({option.name}={_text(value)}) in the LLM", option)
                if option.name == "rank":
                    _expr(option.value, stage)
            if method == "cluster" and any(o.name == "share" for o in options) and \
                    not any(o.name == "rank" for o in options):
                raise PolicyError.at("merge cluster(share=...) needs rank=SCORE: the score that picks the tokens "
                                     "it recycles", statement.span, "e.g. rank=attention(raters -> vision)")
            if not (_keys(by) or (method == "cluster" and isinstance(by, ir.Name) and by.id == "hidden")):
                what = "keys or hidden" if method == "cluster" else "keys"
                raise _not_yet(f"merge {method} in the LLM by features other than {what}", by or statement)
            for part in (source, into):
                if part is not None:
                    _expr(part, stage)
            if by is not None and _keys(by):
                _expr(by, stage)
        case ir.Merge(method=method) if method not in MERGE_OPS or not MERGE_OPS[method].spec.runs_in(kind):
            raise _not_yet(f"merge {method}{' before the LLM' if method in MERGE_OPS else ''}", statement)
        case ir.Merge(method=method, options=options, source=source, into=into, by=by):
            feature_layer = plan.adapter.feature_encoder_layer
            if kind == "encoder" and stage.layers and all(k > feature_layer for k in stage.layers):
                raise PolicyError.at(f"merge at {stage.label} runs after the encoder's feature layer "
                                     f"(encoder layer {feature_layer}), whose output LLaVA hands to the projector: "
                                     "it would change nothing the LLM sees (multi-layer stages skip such layers)",
                                     statement.span,
                                     f"merge at encoder.layer[{feature_layer}] or earlier, or at encoder.output")
            for option in options:
                if option.name not in MERGE_OPS[method].spec.implemented:
                    raise _not_yet(f"{method} option '{option.name}'", option)
                if option.name == "r" and isinstance(option.value, ir.ListExpr | ir.Call):
                    raise _not_yet("a schedule for bipartite(r=...)", option.value)
            for part in (source, into, by):
                if part is not None:
                    _expr(part, stage)
        case ir.Let(value=value) | ir.ScoreDef(value=value) | ir.Keep(target=value) | ir.Drop(target=value) | \
                ir.Protect(target=value):
            _expr(value, stage)


def _expr(expr: ir.Expr, stage: BoundStage) -> None:
    kind = stage.kind
    if isinstance(expr, ir.Name) and isinstance(stage.values.get(expr.id), ir.Name):
        expr = stage.values[expr.id]  # a parameter choosing a built-in set: check the set it chose
    match expr:
        case ir.Select(selector=selector) if selector not in SELECTOR_OPS or not SELECTOR_OPS[selector].spec.runs_in(
                kind):
            where = "" if selector not in SELECTOR_OPS else " in the LLM" if kind == "llm" else f" in {kind} stages"
            raise _not_yet(f"the `{selector}` selector{where}", expr)
        case ir.Select(selector="cover", options=options) if any(
                o.name == "words" and isinstance(o.value, ir.Name) and stage.values.get(o.value.id, o.value) ==
                ir.Name(id="keywords") for o in options):
            raise PolicyError.at("cover(words=keywords) is not implemented by policyc's runtime yet: MMTok's keyword "
                                 "filter drops stopwords and LLaVA's suffix prompts from the question's text, which "
                                 "the runtime does not have", expr.span,
                                 "words=prompt covers the LLM input embeddings of every text token after the image")
        case ir.Select(selector=selector, amount=ir.Call(fn=fn) as amount) if fn in SCHEDULE_OPS and \
                _reads_selection_score(amount) and SELECTOR_OPS[selector].spec.by != "score":
            raise _not_yet(f"{fn}() with the `{selector}` selector ({fn} reads the selection's score: use a selector "
                           "that ranks `by SCORE`, e.g. top)", amount)
        case ir.Select(amount=ir.ListExpr() as amount) if kind != "llm":
            raise _not_yet("a schedule list before the LLM", amount)
        case ir.Select(amount=ir.Call(fn=fn) as amount) if fn not in SCHEDULE_OPS and not isinstance(
                FUNCTION_OPS.get(fn), AmountFunction):
            raise _not_yet(f"the amount {fn}()", amount)
        case ir.Call(fn=fn) | ir.Name(id=fn) if not _signal_runs(fn, kind):  # Spec.runs: e.g. value_norm, encoder
            where = {**_WHERE, "projector": " at projector.output (no attention runs there)"}
            raise _not_yet(f"{fn}{where[kind]}", expr)
        case ir.Call(fn="keys", kwargs=kwargs) if kind == "llm":
            for kwarg in kwargs:
                if not (kwarg.name == "layer" and isinstance(kwarg.value, ir.Name) and kwarg.value.id == "next"):
                    raise _not_yet(f"keys option {kwarg.name}={_text(kwarg.value)} in the LLM", kwarg)
            return
        case ir.Name(id="keys") if kind == "llm":
            return
        case ir.Call(fn=fn) if fn in FEATURE_OPS:
            if kind == "llm" or expr.kwargs:
                raise _not_yet(f"the features {fn}{' in the LLM' if kind == 'llm' else ' with options'}", expr)
        case ir.Name(id=fn) if fn in FEATURE_OPS and kind == "llm":
            raise _not_yet(f"the features {fn} in the LLM", expr)
        case ir.Call(fn=fn, kwargs=kwargs) if fn in FUNCTION_OPS or fn in SCHEDULE_OPS:
            spec = (FUNCTION_OPS.get(fn) or SCHEDULE_OPS[fn]).spec
            if not spec.runs_in(kind):
                raise _not_yet(f"{fn}(){_WHERE[kind]}", expr)
            for kwarg in kwargs:
                if kwarg.name not in spec.implemented:
                    raise _not_yet(f"{fn} option '{kwarg.name}'", kwarg)
        case ir.Call(fn=fn) if fn not in SIGNAL_OPS:
            raise _not_yet(f"{fn}()", expr)
        case ir.Call(fn=fn, kwargs=kwargs) if fn in SIGNAL_OPS:
            for kwarg in kwargs:
                if kwarg.name not in SIGNAL_OPS[fn].spec.implemented:
                    raise _not_yet(f"{fn} option '{kwarg.name}'", kwarg)
                if kind == "encoder" and fn == "attention" and kwarg.name in ("layer", "layers", "space"):
                    continue  # checked against the model in policyc/runtime/vision_evaluate.py
                if fn == "attention" and kwarg.name == "correct":
                    _correct(call=expr, kwarg=kwarg, stage=stage)
                word = kwarg.value.id if isinstance(kwarg.value, ir.Name) else None
                if fn == "attention" and kwarg.name == "space" and word != "keys":
                    raise _not_yet(f"{fn}(space=values) outside encoder stages", kwarg)
                if SIGNAL_OPS[fn].spec.option(kwarg.name) is LAYER and not (kind == "llm" and (
                        word == "next" or (word == "previous" and fn == "attention"))):
                    words = "`next` or `previous`" if fn == "attention" else "`next`"
                    raise _not_yet(f"{fn}(layer=...) other than {words} in the LLM", kwarg)
        case ir.Name(id=name) if name in SIGNALS and name not in SIGNAL_OPS and name not in FEATURE_OPS:
            raise _not_yet(f"the signal '{name}'", expr)
        case ir.Name(id=name) if name in _SETS[kind]:
            raise _not_yet(f"the token set '{name}'{' in the LLM' if name == 'cls' else ''}", expr)
        case ir.Index() if kind == "encoder":
            raise PolicyError.at("an encoder stage sees each image (or tile, or frame) on its own: one image of a "
                                 "prompt is picked at projector.output or in the LLM", expr.span,
                                 "move this stage to projector.output, or use vision[i] in an LLM stage")
    for child in expr.children():
        if not _choice_word(expr, child):  # e.g. space=values is a word, not the `values` features
            _expr(child, stage)  # type: ignore[arg-type]


def _correct(call: ir.Call, kwarg: ir.KwArg, stage: BoundStage) -> None:
    """`attention(correct=causal)` divides by the query rows that see each key: a mean or sum over rows."""
    value = stage.values.get(kwarg.value.id, kwarg.value) if isinstance(kwarg.value, ir.Name) else kwarg.value
    word = value.id if isinstance(value, ir.Name) else None
    if word == "rope":
        raise _not_yet("attention(correct=rope)", kwarg)
    queries = next((k.value for k in call.kwargs if k.name == "queries"), None)
    queries = stage.values.get(queries.id, queries) if isinstance(queries, ir.Name) else queries
    if word == "causal" and isinstance(queries, ir.Name) and queries.id == "max":
        raise PolicyError.at("attention(correct=causal) averages each key's attention over the query rows that "
                             "can see it; it has no meaning with queries=max", kwarg.span,
                             "drop queries=max (correct=causal replaces the mean or sum over rows)")


def _reads_selection_score(call: ir.Call) -> bool:
    """Whether an adaptive schedule reads the selection's `by` score (not a `score=` of its own)."""
    return SCHEDULE_OPS[call.fn].adaptive and not any(k.name == "score" for k in call.kwargs)


def _keys(by: ir.Expr | None) -> bool:
    """Whether a merge's `by` is `keys` or `keys(layer=next)`: the features the LLM runtime gives a merge."""
    return isinstance(by, ir.Name | ir.Call) and getattr(by, "id", getattr(by, "fn", None)) == "keys"


def _text(expr: ir.Expr) -> str:
    return expr.id if isinstance(expr, ir.Name) else type(expr).__name__.lower()


def _choice_word(call: ir.Node, child: ir.Node) -> bool:
    if not (isinstance(call, ir.Call) and call.fn in SIGNALS and isinstance(child, ir.KwArg)
            and isinstance(child.value, ir.Name)):
        return False
    option = SIGNALS.specs[call.fn].option(child.name)
    return option is not None and child.value.id in option.choices

"""Functions and schedules as operators (passes/function_*.py, passes/schedule_*.py): each computes what its
spec says (plain torch computations written here), SparseVLM v1's `rank()` schedule equals a plain reference on
a tiny LLaVA, and a plug-in function and schedule check, compile and generate like the built-ins."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pytest
import torch
from generation import assert_same_steps
from policyc.passes import FUNCTION_OPS, SCHEDULE_OPS
from reference.llm_stage import llava_llm_inputs, llm_stage_generate
from tiny_models import make_inputs, tiny_llava_clip

import policyc
from policyc import operators
from policyc.catalog import FUNCTIONS, SCHEDULES
from policyc.errors import PolicyError
from policyc.lang import check_source, ir
from policyc.operators import LayerSchedule, Option, PluginError, ScoreFunction, Spec
from policyc.runtime.evaluate import PrefillState, StageEvaluator

if TYPE_CHECKING:
    from collections.abc import Iterator

STEPS = 3


def evaluator(scores: torch.Tensor, image: torch.Tensor, valid: torch.Tensor | None = None) -> StageEvaluator:
    """A one-layer LLM stage over prompts [B, L] whose score `s` is `scores`, every token alive."""
    batch, length = image.shape
    state = PrefillState(image, torch.ones_like(image) if valid is None else valid,
                         torch.arange(length).expand(batch, -1), torch.zeros_like(image))
    state.scores["s"] = scores
    return StageEvaluator(state, None, {})


def call(fn: str, *args: ir.Expr, **kwargs: ir.Expr) -> ir.Call:
    return ir.Call(fn=fn, args=args, kwargs=tuple(ir.KwArg(name=k, value=v) for k, v in kwargs.items()))


S = ir.Name(id="s")
IMAGE = torch.tensor([[False, True, True, True, False], [True, True, False, False, False]])
SCORES = torch.tensor([[9.0, 1.0, 2.0, 5.0, -3.0], [0.5, 1.5, 7.0, 2.0, 4.0]])


def test_every_function_and_schedule_is_an_operator_declared_beside_its_code() -> None:
    assert set(FUNCTIONS.names()) == set(FUNCTION_OPS)
    assert set(SCHEDULES.names()) == set(SCHEDULE_OPS)
    for name, op in {**FUNCTION_OPS, **SCHEDULE_OPS}.items():
        assert type(op).__module__.startswith("policyc.passes.") and op.spec.name == name
        assert FUNCTIONS.package(name) == "policyc" if name in FUNCTIONS else SCHEDULES.package(name) == "policyc"


def test_normalize_softmax_and_reductions_read_the_image_tokens_alive() -> None:
    ctx = evaluator(SCORES, IMAGE)
    over = [SCORES[0, 1:4], SCORES[1, :2]]  # each row's image tokens
    total = torch.tensor([[o.sum()] for o in over])
    top = torch.tensor([[o.max()] for o in over])
    low = torch.tensor([[o.min()] for o in over])
    torch.testing.assert_close(ctx.score(call("normalize", S)), SCORES / total)
    torch.testing.assert_close(ctx.score(call("normalize", S, by=ir.Name(id="max"))), SCORES / top)
    torch.testing.assert_close(ctx.score(call("normalize", S, by=ir.Name(id="minmax"))), (SCORES - low) / (top - low))
    for name, reduce in (("sum", torch.sum), ("mean", torch.mean), ("max", torch.max), ("min", torch.min)):
        expected = torch.tensor([[float(reduce(o))] * 5 for o in over])
        torch.testing.assert_close(ctx.score(call(name, S)), expected)
    for temperature in (1.0, 0.25):
        softmax = ctx.score(call("softmax", S, temperature=ir.Number(value=temperature)))
        for row, o in enumerate(over):
            expected = torch.tensor([math.exp(x / temperature) for x in SCORES[row].tolist()])
            expected /= sum(math.exp(x / temperature) for x in o.tolist())
            torch.testing.assert_close(softmax[row], expected)
            assert float(softmax[row][IMAGE[row]].sum()) == pytest.approx(1.0)


def test_elementwise_functions_and_counts() -> None:
    ctx = evaluator(SCORES.abs() + 1, IMAGE)
    for name, fn in (("exp", math.exp), ("log", math.log), ("sqrt", math.sqrt), ("abs", abs)):
        expected = torch.tensor([[fn(x) for x in row] for row in (SCORES.abs() + 1).tolist()])
        torch.testing.assert_close(ctx.score(call(name, S)), expected)
    torch.testing.assert_close(ctx.score(call("abs", ir.Number(value=-2))), torch.full((2, 5), 2.0))
    vision = ir.Name(id="vision")
    half = ir.Binary(op="/", left=call("size", vision), right=ir.Number(value=2))
    for name, expected in (("round", [2, 1]), ("floor", [1, 1]), ("ceil", [2, 1])):  # sizes 3 and 2; round(1.5) = 2
        select = ir.Select(selector="top", amount=call(name, half), source=vision, by=S)
        assert ctx.counts(select, ctx.set(vision)).tolist() == expected


def test_mass_counts_the_fewest_tokens_holding_tau_and_refuses_negative_scores() -> None:
    scores = torch.tensor([[0.0, 6.0, 3.0, 1.0, 0.0]])
    ctx = evaluator(scores, IMAGE[:1])
    vision = ir.Name(id="vision")
    for tau, expected in ((0.5, 1), (0.6, 1), (0.7, 2), (0.95, 3), (1.0, 3)):
        select = ir.Select(selector="top", amount=call("mass", ir.Number(value=tau)), source=vision, by=S)
        assert ctx.counts(select, ctx.set(vision)).tolist() == [expected]
    negative = evaluator(-scores - 1, IMAGE[:1])
    select = ir.Select(selector="top", amount=call("mass", ir.Number(value=0.5)), source=vision, by=S)
    with pytest.raises(PolicyError, match="non-negative"):
        negative.counts(select, negative.set(vision))


def test_layer_schedules_follow_the_stage_layer_and_n0() -> None:
    ctx = evaluator(SCORES, IMAGE)
    ctx.origin, ctx.steps = torch.tensor([40, 10]), 3
    vision = ir.Name(id="vision")
    candidates = torch.ones(2, 30, dtype=torch.bool)
    expected = {"geometric": [[20, 5], [10, 2], [5, 1]],  # int(N0 * 0.5^(i+1))
                "linear": [[20, 5], [12, 4], [4, 4]],  # 50% of N0 -> 4: (20 + 4) / 2 = 12, (5 + 4) / 2 = 4.5
                "cosine": [[20, 5], [12, 3], [4, 1]]}  # 50% -> 10% of N0: at the middle layer halfway
    amounts = {"geometric": call("geometric", ir.Number(value=0.5)),
               "linear": call("linear", ir.Percent(value=50), ir.Number(value=4)),
               "cosine": call("cosine", ir.Percent(value=50), ir.Percent(value=10))}
    for name, amount in amounts.items():
        select = ir.Select(selector="top", amount=amount, source=vision, by=S)
        got = []
        for step in range(3):
            ctx.step = step
            got.append(ctx.counts(select, candidates).tolist())
        assert got == expected[name], name
    ctx.step = 0
    assert ctx.counts(select, torch.ones(2, 7, dtype=torch.bool)).tolist() == [7, 5]  # at most the candidates


def rank_pick(scale: float, bias: float):  # type: ignore[no-untyped-def]
    """SparseVLM v1 (`attn_postprocess_rank`), written plainly: P = head-mean attention of the text after the image
    to the image tokens; r = matrix_rank(P); keep all when r == N, else the top min(int(r * scale + bias), N - 1)
    by P's mean over its rows (ties to the earlier token)."""
    def pick(_row: int, _hidden: torch.Tensor, probs: torch.Tensor, valid: torch.Tensor,
             image: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(len(image))
        text = valid & ~image & (positions > int(image.nonzero().min()))
        vision = (valid & image).nonzero().flatten()
        matrix = probs.mean(0)[text][:, vision]
        rank, size = int(torch.linalg.matrix_rank(matrix.float())), len(vision)
        count = size if rank == size else max(0, min(int(rank * scale + bias), size - 1))
        order = torch.sort(matrix.mean(0), descending=True, stable=True).indices
        return vision[order[:count]]
    return pick


@pytest.mark.parametrize(("seed", "batch", "text_after", "scale", "bias"), [
    (0, 1, 5, 1.0, 0.0), (1, 2, 6, 2.0, 1.0), (2, 2, 4, 0.5, 2.0), (3, 1, 24, 1.0, 0.0),  # 25 text rows: full rank
])
def test_rank_schedule_equals_sparsevlm_v1(seed: int, batch: int, text_after: int, scale: float,
                                           bias: float) -> None:
    model = tiny_llava_clip(seed=seed)
    inputs = make_inputs(model, batch=batch, pad_left=2, seed=seed, text_after=text_after)
    ref, embeds, valid, image = llava_llm_inputs(model, **inputs)
    tokens, expected_kept, logits = llm_stage_generate(ref, embeds, valid, image, layer=1,
                                                       pick=rank_pick(scale, bias), max_new_tokens=STEPS)
    text = (f"policy r {{ stage llm.layer[1] {{ keep top rank(scale={scale}, bias={bias}) of vision "
            "by attention(text -> vision) } }")
    compiled = policyc.compile(model, check_source(text)[0]).policyc
    result = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_scores=True,
                            return_dict_in_generate=True)
    for row in range(batch):
        rows = compiled.runtime.kept_at_layer[2][row]
        assert torch.equal(rows[image[row, rows]], expected_kept[row])
    if text_after > 16:
        assert all(len(k) == 16 for k in expected_kept)  # rank 16 of 16 image tokens: nothing dropped
    assert_same_steps(result, tokens, logits, inputs["input_ids"].shape[1])


def test_rank_reads_the_attention_behind_a_score_name() -> None:
    """`score relevance = attention(...)` then `by relevance`: rank() reads the definition's matrix, as SparseVLM's
    policy would write it."""
    kept = []
    for text in ("policy r { stage llm.layer[1] { keep top rank(scale=2) of vision by attention(text -> vision) } }",
                 "policy r { stage llm.layer[1] { score relevance = attention(text -> vision)\n"
                 "keep top rank(scale=2) of vision by relevance } }"):
        model = tiny_llava_clip(seed=5)
        inputs = make_inputs(model, batch=2, pad_left=2, seed=5, text_after=5)
        compiled = policyc.compile(model, check_source(text)[0]).policyc
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        kept.append(compiled.runtime.kept_at_layer[2])
    assert all(torch.equal(a, b) for a, b in zip(*kept, strict=True))
    assert all(len(rows) < inputs["input_ids"].shape[1] for rows in kept[0])  # something was dropped


class Square(ScoreFunction):
    """x^2, token by token."""

    spec = Spec("square", "function", "the square of a score", returns="score",
                options=(Option("x", ("score",), "per-token score", positional=True),))

    def score(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        return ctx.score(call.args[0]) ** 2


class Halving(LayerSchedule):
    """`start` tokens at the stage's first layer, halved (truncated) at each later layer."""

    spec = Spec("halving", "schedule", "a count halved at every layer of the stage", returns="schedule",
                options=(Option("start", ("count",), "tokens at the first layer", positional=True, low=1,
                                integer=True),))

    def budget(self, call: ir.Call, ctx: StageEvaluator, row: int) -> float:
        return self.number(call, "start", ctx) // 2 ** ctx.step


@pytest.fixture
def plugin() -> Iterator[None]:
    with operators.registered(Square, Halving, package="policyc-test-plugin"):
        yield
    assert "square" not in FUNCTIONS and "halving" not in SCHEDULES


def test_a_plugin_function_and_schedule_run_as_their_builtin_equivalents(plugin: None) -> None:
    """square(key_norm) ranks as key_norm * key_norm; halving(12) over three layers is the list [12, 6, 3]."""
    assert FUNCTIONS.package("square") == "policyc-test-plugin"
    runs = {}
    for name, score, amount in (("plugin", "square(key_norm)", "halving(12)"),
                                ("builtin", "key_norm * key_norm", "[12, 6, 3]")):
        model = tiny_llava_clip(seed=3)
        inputs = make_inputs(model, batch=2, pad_left=2, seed=3)
        text = f"policy p {{ stage llm.layer[0, 1, 2] {{ keep top {amount} of vision by {score} }} }}"
        compiled = policyc.compile(model, check_source(text)[0]).policyc
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
        runs[name] = (out, [compiled.runtime.kept_at_layer[layer] for layer in (1, 2, 3)])
    assert torch.equal(runs["plugin"][0], runs["builtin"][0])
    for got, expected in zip(runs["plugin"][1], runs["builtin"][1], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    with pytest.raises(PolicyError, match="did you mean 'square'"):
        check_source("policy p { stage llm.layer[1] { keep top 4 of vision by squar(key_norm) } }")


def test_a_function_base_refuses_a_spec_returning_what_it_does_not_compute() -> None:
    class Broken(ScoreFunction):
        spec = Spec("broken_set", "function", "claims to return a set", returns="set",
                    options=(Option("x", ("score",), "per-token score", positional=True),))

        def score(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
            return ctx.score(call.args[0])

    with pytest.raises(PluginError, match="computes score or same or number, not 'set'"):
        operators.register(Broken, package="policyc-test-plugin")
    assert "broken_set" not in FUNCTIONS

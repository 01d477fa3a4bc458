"""`search` blocks: checking them into a `CheckedSearch`, its dimensions and assignments, and concrete policies.

Syntax, canonical printing and every error message have golden files (tests/golden/parse/searches.*,
tests/golden/errors/{syntax,check}/search_*); this file tests the Python API the search command uses.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import tiny_llava_clip

from policyc.compiler.plan import lower
from policyc.errors import PolicyError
from policyc.lang import (
    check_path,
    check_search_path,
    check_searches,
    check_source,
    check_stdlib,
    concrete_policy_text,
    ir,
    space_from_policies,
)
from policyc.lang.build import parse
from policyc.lang.printer import domain_text, print_expr, print_file
from policyc.lang.search_counts import cap_counts, count_params
from policyc.lang.search_space import SearchDimension
from policyc.models import adapt

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "budget_front.tokpol"
STDLIB = check_stdlib()

LOCAL = """
policy mine {
  param k = 64 in [8, 256] step 8
  param mode = "fast"
  stage llm.layer[2] { keep top k of vision by attention(last -> vision) }
}

search s {
  choose { mine, fastv, pyramiddrop_snapkv }
  mine.k in {16, 32}
  mine.mode = "slow"
  fastv.ratio in [10%, 30%] step 5%
  pyramiddrop_snapkv.snapkv.window = 64
}
"""


def pct(value: float) -> ir.Percent:
    return ir.Percent(value=value)


def num(value: float) -> ir.Number:
    return ir.Number(value=value)


def stages(checked: object) -> tuple[ir.Stage, ...]:
    return tuple(plan.placed.stage for plan in checked.stages)  # type: ignore[attr-defined]


def bound_values(checked: object, assignments: dict[str, ir.Expr]) -> list[tuple[str, dict[str, object]]]:
    """Each stage with the parameter values it runs with (what lowering binds), model-independent."""
    return [(plan.label, {p.name: plan.placed.scope.value(p.name, assignments)
                          for p in plan.placed.scope.policy.params}) for plan in checked.stages]  # type: ignore


def dimensions(search: object, policy: str) -> dict[str, object]:
    return {d.param: d for d in search.dimensions if d.policy == policy}  # type: ignore[attr-defined]


def test_example_search_checks_with_narrowed_domains_and_fixed_values() -> None:
    (search,) = check_search_path(EXAMPLE)
    assert search.name == "budget_front" and search.names == ("fastv", "pyramiddrop", "visionzip")
    assert [c.program.policy.name for c in search.candidates] == ["fastv", "pyramiddrop", "visionzip"]
    assert search.description == "FastV, PyramidDrop or VisionZip, at 11% to 33% of the image tokens"
    assert search.fixed == (("fastv", "rows", ir.Name(id="last")), ("visionzip", "contextual", num(16)))
    assert [(d.policy, d.param) for d in search.dimensions] == [
        ("fastv", "layer"), ("fastv", "ratio"), ("pyramiddrop", "lam"), ("visionzip", "dominant")]
    fastv = dimensions(search, "fastv")
    assert fastv["ratio"].domain == ir.RangeDomain(low=pct(11), high=pct(33))
    assert fastv["ratio"].default == pct(33)  # the declared 50% is outside: the nearest value of the range
    assert fastv["layer"].domain == STDLIB["fastv"].program.policy.params[0].domain  # declared, not narrowed
    assert fastv["layer"].default == num(1)
    dominant = dimensions(search, "visionzip")["dominant"]
    assert dominant.domain == ir.RangeDomain(low=num(48), high=num(176), step=num(16))
    assert dominant.default == num(48)  # 54 snapped to the step grid 48, 64, ...
    assert search.span is not None and search.span.file == str(EXAMPLE)


def test_stdlib_candidates_are_the_checked_stdlib_policies() -> None:
    (search,) = check_search_path(EXAMPLE)
    for name in search.names:
        assert search.candidate(name).program.policy == STDLIB[name].program.policy
        assert stages(search.candidate(name)) == stages(STDLIB[name])
    with pytest.raises(PolicyError, match="did you mean 'fastv'"):
        search.candidate("fastvv")


def test_local_and_composed_candidates_use_qualified_parameters() -> None:
    (search,) = check_searches(LOCAL, "local.tokpol")
    assert search.names == ("mine", "fastv", "pyramiddrop_snapkv")
    assert dimensions(search, "mine") == {"k": dimensions(search, "mine")["k"]}  # `mode` is fixed and has no domain
    assert dimensions(search, "mine")["k"].domain == ir.ChoiceDomain(options=(num(16), num(32)))
    assert dimensions(search, "mine")["k"].default == num(16)
    # snapkv's capacity is set by the `use`, its window fixed here: pyramiddrop's lam is all that is left
    assert list(dimensions(search, "pyramiddrop_snapkv")) == ["pyramiddrop.lam"]
    assert ("pyramiddrop_snapkv", "snapkv.window", num(64)) in search.fixed
    assert search.assignments("pyramiddrop_snapkv", {"pyramiddrop.lam": num(0.4)}) == {
        "snapkv.window": num(64), "pyramiddrop.lam": num(0.4)}


def test_check_source_returns_policies_and_checks_searches_too() -> None:
    assert [c.program.policy.name for c in check_source(LOCAL, "local.tokpol")] == ["mine"]
    assert check_searches(LOCAL.split("search s")[0], "no_search.tokpol") == []
    broken = LOCAL.replace("mine.k in {16, 32}", "mine.k in {16, 300}")
    with pytest.raises(PolicyError, match="300 is outside the declared domain"):
        check_source(broken, "local.tokpol")


def test_a_candidate_that_fails_its_own_check_is_reported_once() -> None:
    text = LOCAL.replace("keep top k of vision", "keep top k of visoin")
    with pytest.raises(PolicyError) as caught:
        check_searches(text, "local.tokpol")
    assert len(caught.value.diagnostics) == 1 and "visoin" in str(caught.value)


def test_candidates_of_files_imported_as_an_alias(tmp_path: Path) -> None:
    (tmp_path / "lib.tokpol").write_text(LOCAL.split("search s")[0], encoding="utf-8")
    main = tmp_path / "main.tokpol"
    main.write_text('import "lib.tokpol" as lib\n\nsearch s {\n  choose { lib.mine }\n  lib.mine.k in [8, 64]\n}\n',
                    encoding="utf-8")
    (search,) = check_search_path(main)
    assert search.names == ("lib.mine",) and search.candidate("lib.mine").program.policy.name == "mine"
    assert [(d.policy, d.param, d.default) for d in search.dimensions] == [("lib.mine", "k", num(64))]
    assert check_path(main) == []


def test_space_from_policies_has_every_declared_domain() -> None:
    space = space_from_policies([STDLIB["fastv"]])
    assert (space.name, space.names, space.fixed, space.span) == ("space", ("fastv",), (), None)
    declared = {p.name: p for p in STDLIB["fastv"].program.policy.params}
    assert [(d.param, d.domain, d.default) for d in space.dimensions] == [
        (name, declared[name].domain, declared[name].default) for name in ("layer", "ratio", "rows")]
    with pytest.raises(PolicyError, match="two candidate policies are named 'fastv'"):
        space_from_policies([STDLIB["fastv"], STDLIB["fastv"]])


def test_assignments_add_fixed_values_and_reject_values_outside_the_domain() -> None:
    (search,) = check_search_path(EXAMPLE)
    assert search.assignments("fastv", {"ratio": pct(20), "layer": num(3)}) == {
        "rows": ir.Name(id="last"), "ratio": pct(20), "layer": num(3)}
    assert search.assignments("pyramiddrop", {}) == {}
    problems = {
        "is outside the range \\[11%, 33%\\]": ("fastv", {"ratio": pct(40)}),
        "holds values like 33%, not 0.2": ("fastv", {"ratio": num(0.2)}),
        "holds values like 1, not 2.5": ("fastv", {"layer": num(2.5)}),
        "is fixed to last": ("fastv", {"rows": ir.Name(id="all")}),
        "has no dimension 'ratoi'": ("fastv", {"ratoi": pct(20)}),
        "not a candidate": ("snapkv", {}),
    }
    for message, (policy, values) in problems.items():
        with pytest.raises(PolicyError, match=message):
            search.assignments(policy, values)


def test_sampled_values_become_literals_of_the_dimension() -> None:
    (search,) = check_search_path(EXAMPLE)
    fastv = dimensions(search, "fastv")
    assert fastv["ratio"].literal(25) == pct(25) and fastv["ratio"].literal(12.5) == pct(12.5)
    assert fastv["layer"].literal(3.0) == num(3) and isinstance(fastv["layer"].literal(3.0).value, int)
    rows = space_from_policies([STDLIB["fastv"]]).dimensions[2]
    assert rows.literal("all") == ir.Name(id="all")
    with pytest.raises(PolicyError, match="did you mean 'last'"):
        rows.literal("lst")
    with pytest.raises(PolicyError, match="takes a number"):
        fastv["ratio"].literal("25%")


def test_concrete_policy_text_is_the_policy_with_the_values_as_defaults() -> None:
    fastv = STDLIB["fastv"]
    assignments = {"ratio": pct(25)}
    text = concrete_policy_text(fastv, assignments)
    (concrete,) = check_source(text, "concrete.tokpol")
    assert "param ratio = 25% in [5%, 90%]" in text and print_file(parse(text)) == text
    assert stages(concrete) == stages(fastv)
    model = adapt(tiny_llava_clip())
    assert lower(concrete, model).describe() == lower(fastv, model, assignments).describe()
    assert concrete_policy_text(fastv, {}) == concrete_policy_text(fastv, {"ratio": pct(50)})


def test_concrete_policy_text_of_a_composed_policy_sets_used_parameters() -> None:
    composed = STDLIB["pyramiddrop_snapkv"]
    assignments = {"pyramiddrop.lam": num(0.4), "snapkv.window": num(16)}
    text = concrete_policy_text(composed, assignments)
    (concrete, *_) = check_source(text, "concrete.tokpol")
    assert stages(concrete) == stages(composed)
    assert bound_values(concrete, {}) == bound_values(composed, assignments) != bound_values(composed, {})


def test_concrete_policy_text_rejects_values_a_policy_file_cannot_hold() -> None:
    fastv = STDLIB["fastv"]
    with pytest.raises(PolicyError, match="95% is outside the range \\[5%, 90%\\] of 'ratio'"):
        concrete_policy_text(fastv, {"ratio": pct(95)})
    with pytest.raises(PolicyError, match="no searchable parameter 'ratoi'"):
        concrete_policy_text(fastv, {"ratoi": pct(25)})
    with pytest.raises(PolicyError, match=r"no searchable parameter 'snapkv\.capacity'"):  # set by the `use`
        concrete_policy_text(STDLIB["pyramiddrop_snapkv"], {"snapkv.capacity": num(256)})


def test_sampled_numbers_are_rounded_to_their_domain_and_written_as_used() -> None:
    def dimension(domain: str, default: str = "50%", amount: str = "v") -> SearchDimension:
        (checked,) = check_source(f"policy p {{ param v = {default} {domain}\n stage llm.layer[2] {{ "
                                  f"keep top {amount} of vision by attention(last -> vision) }} }}")
        return space_from_policies([checked]).dimensions[0]

    linear = dimension("in [5%, 50%]")  # 1/1000 of the width is 0.045: hundredths
    assert linear.literal(49.956068) == pct(49.96) and print_expr(linear.literal(49.956068)) == "49.96%"
    assert print_expr(dimension("in [0%, 100%]").literal(33.3333333)) == "33.3%"
    assert print_expr(dimension("in [1%, 90%] log").literal(1.23456789)) == "1.23%"  # 3 significant digits
    stepped = dimension("in [10%, 90%] step 10%")
    assert print_expr(stepped.literal(30.000000000000004)) == "30%" and print_expr(stepped.literal(88.0)) == "90%"
    fraction = dimension("in [0.05, 1.0] step 0.05", "0.5", "ceil(size(vision) * v)")
    assert print_expr(fraction.literal(0.15000000000000002)) == "0.15"
    assert print_expr(linear.literal(50)) == "50%"  # a whole number sampled (a default) stays as written
    assert linear.literal(50.0049) == pct(50) and linear.literal(4.999) == pct(5)  # within the bounds
    (policy,) = check_source("policy p { param v = 50% in [5%, 50%]\n"
                             "stage llm.layer[2] { keep top v of vision by attention(last -> vision) } }")
    for sampled in (49.956068, 5.0000001, 27.123456):  # the written policy holds the value used
        value = linear.literal(sampled)
        (concrete,) = check_source(concrete_policy_text(policy, {"v": value}))
        assert concrete.program.policy.params[0].default == value


def test_count_parameters_are_capped_at_the_image_tokens_a_prompt_holds() -> None:
    assert count_params(STDLIB["visionzip"]) == {"dominant", "contextual"}
    assert {"early", "middle", "late"} <= count_params(STDLIB["sparsevlm"])
    assert "visiondrop_llm.early" in count_params(STDLIB["visiondrop"])  # a used policy's, qualified
    assert count_params(STDLIB["hiprune"]) == set()  # `top round(T * alpha / 5)`: not a bare amount
    (mixed,) = check_source("policy m { param k = 16 in [1, 512]\n"
                            "stage llm.layer[k] { keep top k of vision by attention(last -> vision) } }")
    assert count_params(mixed) == set()  # also a layer: a larger value still changes the policy
    space = space_from_policies([STDLIB["fastv"], STDLIB["visionzip"], STDLIB["sparsevlm"]])
    capped, notes = cap_counts(space, 144)
    domains = {(d.policy, d.param): d for d in capped.dimensions}
    assert domain_text(domains["visionzip", "dominant"].domain) == "in [8, 144]"
    assert domain_text(domains["visionzip", "contextual"].domain) == "in [1, 64]"  # within already
    assert domain_text(domains["fastv", "ratio"].domain) == domain_text(  # percentages are no counts
        next(d for d in space.dimensions if d.param == "ratio").domain)
    assert domains["sparsevlm", "early"].default == num(144)  # 300, nearest within the cap
    assert len(notes) == 4 and notes[0] == ("visionzip.dominant searched in [8, 144], not [8, 512]: a prompt holds "
                                            "at most 144 image tokens, and a larger count keeps them all")
    (stepped,) = check_source("policy s { param k = 64 in [8, 256] step 8 param far = 300 in [200, 400]\n"
                              "stage llm.layer[2] { keep top k of vision by attention(last -> vision)\n"
                              "drop top far of vision by attention(last -> vision) } }")
    capped, _ = cap_counts(space_from_policies([stepped]), 100)
    assert [domain_text(d.domain) for d in capped.dimensions] == ["in [8, 96] step 8", "in [200, 200]"]

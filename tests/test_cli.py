"""The `policyc` command line: exit codes 0/1/2, messages, and files left intact on errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from policyc.cli import main
from policyc.lang.ir import PolicyFile

ROOT = Path(__file__).parent.parent
FASTV = ROOT / "policies" / "fastv.tokpol"
MESSY = "policy p {stage llm.layer[ 1 ] {keep top 50% of vision by attention( last->vision )   # why\n}}\n"


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_check_accepts_the_standard_library() -> None:
    files = sorted(str(p) for p in (ROOT / "policies").glob("*.tokpol"))
    code, out, _ = run("check", *files)
    assert code == 0
    assert out.count("ok  ") == len(files)


def test_check_reports_a_policy_error_with_exit_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tokpol"
    bad.write_text("policy p {\n  stage llm.layer[1] { keep visoin }\n}\n")
    code, _, err = run("check", str(bad))
    assert code == 1
    assert f"{bad}:2:29: error: unknown name 'visoin'" in err
    assert "hint: did you mean 'vision'?" in err
    assert "1 of 1 file failed" in err


@pytest.mark.parametrize("args", [("check",), ("check", "no-such-file.tokpol"), ("fmt",), ("nonsense",),
                                  ("list", "widgets")])
def test_usage_errors_exit_2(args: tuple[str, ...]) -> None:
    assert run(*args)[0] == 2


def test_fmt_check_reports_without_touching_the_file(tmp_path: Path) -> None:
    path = tmp_path / "messy.tokpol"
    path.write_text(MESSY)
    code, _, err = run("fmt", "--check", str(path))
    assert code == 1 and "would reformat" in err
    assert path.read_text() == MESSY


def test_fmt_rewrites_canonically_and_keeps_comments(tmp_path: Path) -> None:
    path = tmp_path / "messy.tokpol"
    path.write_text(MESSY)
    assert run("fmt", str(path))[0] == 0
    assert path.read_text() == (
        "policy p {\n"
        "  stage llm.layer[1] {\n"
        "    keep top 50% of vision by attention(last -> vision)  # why\n"
        "  }\n"
        "}\n"
    )
    assert run("fmt", "--check", str(path))[0] == 0


def test_fmt_leaves_a_broken_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "broken.tokpol"
    path.write_text("policy p { stage llm.layer[1] { keep top 5 of vision } }\n")
    code, _, err = run("fmt", str(path))
    assert code == 1 and "broken.tokpol:1:" in err
    assert path.read_text() == "policy p { stage llm.layer[1] { keep top 5 of vision } }\n"


def test_show_prints_parameters_stages_and_requirements() -> None:
    code, out, _ = run("show", "mustdrop")
    assert code == 0
    for text in ("g_thr", "encoder.layer[0]", "llm.layer[2, 6, 10, 14]", "cache regather", "cls token"):
        assert text in out


def test_show_graph_and_json() -> None:
    code, mermaid, _ = run("show", "pyramiddrop", "--graph", "mermaid")
    assert code == 0 and mermaid.startswith("flowchart TD") and "geometric(lam)" in mermaid
    code, dot, _ = run("show", str(FASTV), "--graph", "dot")
    assert code == 0 and dot.startswith("digraph policy {")
    code, text, _ = run("show", f"{FASTV}:fastv", "--json")
    assert code == 0
    policy = json.loads(text)
    assert policy["name"] == "fastv" and policy["stages"][0]["name"] == "prune"


def test_show_json_validates_back_into_the_same_ir() -> None:
    from policyc.lang.build import parse

    file = parse(FASTV.read_text(), str(FASTV))
    assert PolicyFile.model_validate_json(file.model_dump_json()) == file


def test_show_unknown_policy_suggests_the_closest() -> None:
    code, _, err = run("show", "fastvv")
    assert code == 1 and "did you mean 'fastv'?" in err


def test_list_is_generated_from_every_registry() -> None:
    from policyc.catalog import REGISTRIES

    code, out, _ = run("list")
    assert code == 0
    for registry in REGISTRIES:
        for spec in registry:
            assert spec.signature().split("(")[0] in out
    assert "mustdrop" in out and "arXiv:2411.10803" in out


def heavy_modules_after(*commands: list[str]) -> list[str]:
    """The heavy libraries (torch, transformers, networkx) a fresh interpreter holds after running `commands`."""
    code = (
        "import sys\n"
        "from policyc.cli import main\n"
        f"for args in {list(commands)!r}:\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code in (0, None), exit.code\n"
        "import json\n"
        "heavy = {m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'networkx'}\n"
        "print(json.dumps(sorted(heavy)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_fmt_imports_no_torch_and_check_and_list_no_model_libraries() -> None:
    """fmt only parses and prints; check and list read the operators' declarations, which live beside their
    torch code (one class in one file), but never load transformers or networkx."""
    assert heavy_modules_after(["fmt", "--check", str(FASTV)]) == []
    assert heavy_modules_after(["check", str(FASTV)], ["list"]) == ["torch"]


def test_compile_plan_on_the_default_model() -> None:
    code, out, err = run("compile", "default", "fastv", "--emit", "plan", "--param", "ratio=25%")
    assert code == 0, err
    assert "llm: LlamaModel, 8 layers" in out and "param ratio = 25%" in out
    assert "RANDOM weights" not in err
    code, out, err = run("compile", "random", "fastv", "--emit", "plan")
    assert code == 0 and "RANDOM weights" in err


def test_run_and_compile_output_are_listed_in_help() -> None:
    code, out, _ = run("--help")
    assert code == 0 and "run" in out.split("Commands:")[1]
    code, out, _ = run("compile", "--help")
    assert code == 0 and "-o, --output" in out


def test_compile_emit_fx_prints_the_rewritten_prefill_graph(tmp_path: Path) -> None:
    from tiny_models import tiny_llava_clip

    tiny_llava_clip().save_pretrained(tmp_path / "tiny")
    code, out, err = run("compile", str(tmp_path / "tiny"), str(FASTV), "--emit", "fx", "--param", "layer=1")
    assert code == 0, err
    headers = [line for line in out.splitlines() if line.startswith("# graph ")]
    assert headers[0] == "# graph 0: prefill (passes applied: stage_drop)"
    assert any(h.endswith("decode (passes applied: none)") for h in headers[1:])
    assert out.count("torch.ops.policyc.llm_stage.default(") == 1


def test_check_lists_the_searches_of_a_file() -> None:
    example = Path(__file__).parent.parent / "examples" / "budget_front.tokpol"
    code, out, err = run("check", str(example))
    assert code == 0, err
    assert out.strip() == f"ok  {example}  (search budget_front)"

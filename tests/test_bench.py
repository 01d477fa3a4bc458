"""`policyc bench` on CPU with the random tiny model and tiny settings: the four rows and their figures, the
ideal row's token counts, KV cache bytes of cache policies, clear errors, and the --shapes architectures on the
meta device. No timing assertion: only that times were measured (positive), never how they compare."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from tiny_idefics3 import tiny_idefics3
from tiny_mistral3 import tiny_mistral3
from tiny_models import tiny_llava_clip, tiny_qwen2_vl

from policyc.bench import Settings, synthetic_inputs
from policyc.cli import main
from policyc.errors import PolicyError
from policyc.models import adapt
from policyc.models.random_tiny import random_config
from policyc.models.shapes import build_shape

TINY = ("--batch", "2", "--gen-len", "3", "--repeats", "1", "--warmup", "0", "--prompt-len", "8",
        "--dtype", "float32")
IDENTITY = """policy identity {
  description "Keeps every token"

  stage decode {
    cache full
  }
}
"""


def bench(tmp_path: Path, *args: str) -> dict[str, Any]:
    """Run `policyc bench random ARGS` with the tiny settings; the JSON it wrote, by row name."""
    path = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "random", *args, *TINY, "--json", str(path)])
    assert result.exit_code == 0, result.stderr + result.stdout
    written = json.loads(path.read_text())
    return {**written, "rows": {row["name"]: row for row in written["rows"]}}


def kv_bytes_in_full(batch: int, length: int) -> int:
    """A full float32 cache of the random model after `length` positions: keys and values of every layer."""
    text = random_config().text_config
    head_dim = text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * batch * text.num_key_value_heads * length * head_dim * 4


@pytest.fixture(scope="module")
def fastv(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return bench(tmp_path_factory.mktemp("fastv"), "fastv")


def test_fastv_has_four_rows_with_times(fastv: dict[str, Any]) -> None:
    rows = fastv["rows"]
    assert list(rows) == ["unmodified", "ideal", "policy", "reference"]
    for name in ("unmodified", "ideal", "policy"):
        assert rows[name]["prefill_s"] > 0 and rows[name]["ttft_s"] > 0
    assert rows["unmodified"]["decode_tokens_per_s"] > 0 and rows["policy"]["decode_tokens_per_s"] > 0
    assert rows["ideal"]["decode_tokens_per_s"] is None and rows["ideal"]["kv_bytes"] is None  # prefill/TTFT only
    assert rows["reference"]["ttft_s"] > 0 and rows["reference"]["prefill_s"] is None
    assert all(rows[name]["peak_prefill_bytes"] is None for name in rows)  # CPU: no peak memory figure
    assert set(fastv["versions"]) == {"torch", "transformers", "policyc"} and fastv["device"].startswith("cpu")
    assert fastv["machine"]["node"] and fastv["date"] and fastv["settings"]["batch"] == 2


def test_ideal_layers_see_the_policys_counts(fastv: dict[str, Any]) -> None:
    rows = fastv["rows"]
    length = 8 + 64  # text tokens + the image's tokens
    kept = 8 + 32  # FastV keeps 50% of the 64 image tokens after layer 1; layers 0 and 1 see everything
    assert rows["policy"]["tokens_per_layer"] == [length, length] + [kept] * 30
    assert rows["ideal"]["tokens_per_layer"] == rows["policy"]["tokens_per_layer"]
    assert rows["unmodified"]["tokens_per_layer"] == [length] * 32
    assert rows["policy"]["image_tokens"] == 32 and rows["reference"]["image_tokens"] == 32
    assert rows["unmodified"]["image_tokens"] == 64
    assert 0 < rows["policy"]["flops_share"] < 1 and rows["ideal"]["flops_share"] == rows["policy"]["flops_share"]


def test_kv_bytes_of_fastv_are_measured_from_the_cache(fastv: dict[str, Any]) -> None:
    rows, new = fastv["rows"], 3 - 1  # the cache holds every position but the last generated token's
    assert rows["unmodified"]["kv_bytes"] == kv_bytes_in_full(2, 72 + new)
    per_layer = kv_bytes_in_full(2, 1) // 32  # one position of one layer
    assert rows["policy"]["kv_bytes"] == per_layer * (2 * (72 + new) + 30 * (40 + new))


def test_eviction_policy_shrinks_the_cache_and_identity_does_not(tmp_path: Path) -> None:
    h2o = bench(tmp_path, "h2o", "--no-reference")["rows"]
    assert h2o["policy"]["kv_bytes"] < h2o["unmodified"]["kv_bytes"]
    assert h2o["reference"]["ttft_s"] is None and "--no-reference" in h2o["reference"]["note"]
    policy = tmp_path / "identity.tokpol"
    policy.write_text(IDENTITY)
    identity = bench(tmp_path, str(policy))["rows"]
    assert identity["policy"]["kv_bytes"] == identity["unmodified"]["kv_bytes"] > 0
    assert identity["ideal"]["tokens_per_layer"] == identity["unmodified"]["tokens_per_layer"]
    assert "no reference implementation of 'identity'" in identity["reference"]["note"]


def test_a_static_cache_is_timed_and_counted_whole(tmp_path: Path) -> None:
    """--cache static: every row's generate() uses a static cache (on CUDA transformers compiles its decode steps),
    whose slots the KV figure counts: the prompt and every new token but the last (generate() sizes it so), in every
    layer, whatever the policy keeps."""
    result = bench(tmp_path, "fastv", "--cache", "static", "--no-reference")
    rows = result["rows"]
    assert result["settings"]["cache"] == "static"
    assert rows["unmodified"]["kv_bytes"] == rows["policy"]["kv_bytes"] == kv_bytes_in_full(2, 72 + 3 - 1)
    assert rows["policy"]["decode_tokens_per_s"] > 0 and rows["unmodified"]["decode_tokens_per_s"] > 0
    assert rows["policy"]["image_tokens"] == 32 and rows["unmodified"]["recompiles"] is None  # nothing compiled on CPU


def test_a_cache_policy_on_a_static_cache_holds_its_slots_only(tmp_path: Path) -> None:
    """H2O under --cache static decodes from fixed-capacity slot layers and transformers' full static layers release
    their storage after prefill: 64 slots (H2O's budget plus the incoming token, rounded up to a bucket) instead of
    74 positions."""
    result = bench(tmp_path, "h2o", "--cache", "static", "--no-reference")
    rows = result["rows"]
    assert rows["unmodified"]["kv_bytes"] == kv_bytes_in_full(2, 72 + 3 - 1)
    assert rows["policy"]["kv_bytes"] == kv_bytes_in_full(2, 64)
    assert rows["policy"]["decode_tokens_per_s"] > 0


@pytest.mark.parametrize(("args", "message"), [
    (("random", "streamingllm", "--cache", "static"), "static caches are not supported"),
    (("--shapes", "llava-1.5-7"), "did you mean 'llava-1.5-7b'?"),
    (("random", "fastv", "--shapes", "llava-1.5-7b"), "MODEL ('random') cannot be given too"),
    (("random", "fastvv"), "fastv"),
])
def test_errors_are_policy_errors(args: tuple[str, ...], message: str) -> None:
    argv = ["bench", *args] if args[0] == "random" else ["bench", "fastv", *args]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 1 and message in result.stderr, result.stderr


@pytest.mark.parametrize("family", ["idefics3", "mistral3"])
def test_other_families_bench_their_calibration_prompt(family: str, tmp_path: Path) -> None:
    """`policyc bench DIR fastv` on a saved Idefics3 (tiles) or Mistral 3 (Pixtral, [IMG_BREAK] rows): the family's
    calibration prompt `--batch` times; the ideal row is fed the policy's counts; no reference row (said why)."""
    model = tiny_idefics3() if family == "idefics3" else tiny_mistral3()
    model.save_pretrained(tmp_path / family)
    path = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", str(tmp_path / family), "fastv", *TINY, "--json", str(path)])
    assert result.exit_code == 0, result.stderr + result.stdout
    rows = {row["name"]: row for row in json.loads(path.read_text())["rows"]}
    tokens = int((adapt(model).sample_inputs(8)["input_ids"] == model.config.image_token_id).sum())
    assert rows["unmodified"]["image_tokens"] == tokens and rows["policy"]["image_tokens"] == tokens // 2
    assert rows["ideal"]["tokens_per_layer"] == rows["policy"]["tokens_per_layer"]
    assert rows["policy"]["tokens_per_layer"][-1] < rows["unmodified"]["tokens_per_layer"][-1]
    assert "no reference implementation" in rows["reference"]["note"]
    with pytest.raises(PolicyError, match="holds one image"):
        synthetic_inputs(adapt(model), Settings(batch=1, images=2))


def test_qwen_inputs_are_what_its_processor_gives() -> None:
    """Per image <vision_start>, 576 image tokens (48 x 48 patches merged 2 x 2) and <vision_end>; the flattened
    patches, grids and token types Qwen-VL's forward reads."""
    model = tiny_qwen2_vl(seed=1)
    config = model.config
    inputs = synthetic_inputs(adapt(model), Settings(batch=2, images=2, prompt_len=10))
    ids = inputs["input_ids"]
    assert ids.shape == (2, 10 + 2 * (576 + 2)) and torch.equal(ids[0], ids[1])
    assert int((ids[0] == config.vision_start_token_id).sum()) == int((ids[0] == config.vision_end_token_id).sum()) == 2
    assert torch.equal(inputs["mm_token_type_ids"], (ids == config.image_token_id).long())
    assert int(inputs["mm_token_type_ids"][0].sum()) == 2 * 576
    assert inputs["image_grid_thw"].tolist() == [[1, 48, 48]] * 4
    vision = config.vision_config
    assert inputs["pixel_values"].shape == (4 * 48 * 48, 3 * vision.temporal_patch_size * vision.patch_size ** 2)


def test_bench_of_a_saved_qwen_directory_has_every_row(tmp_path: Path) -> None:
    """`policyc bench DIR fastv` on a saved tiny Qwen2.5-VL: the ideal row is fed the policy's counts (Qwen's
    layers take positions in their rotary tables, which the ideal's hooks cut too) and the reference row runs
    FastV's M-RoPE reference, keeping as many image tokens as the policy."""
    model = tiny_qwen2_vl(seed=2, version="2.5")
    model.save_pretrained(tmp_path / "qwen")
    path = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", str(tmp_path / "qwen"), "fastv", "--param", "ratio=25%", *TINY,
                                       "--json", str(path)])
    assert result.exit_code == 0, result.stderr + result.stdout
    rows = {row["name"]: row for row in json.loads(path.read_text())["rows"]}
    length = 8 + 576 + 2
    assert rows["unmodified"]["image_tokens"] == 576 and rows["unmodified"]["tokens_per_layer"] == [length] * 4
    assert rows["policy"]["image_tokens"] == rows["ideal"]["image_tokens"] == rows["reference"]["image_tokens"] == 144
    assert rows["ideal"]["tokens_per_layer"] == rows["policy"]["tokens_per_layer"] == [length] * 2 + [length - 432] * 2
    assert rows["reference"]["note"].startswith("reference/fastv_mrope.py") and rows["reference"]["ttft_s"] > 0
    assert rows["policy"]["decode_tokens_per_s"] > 0 and rows["policy"]["kv_bytes"] > 0


def test_pyramiddrop_benches_on_a_24_layer_llava_with_its_reference(tmp_path: Path) -> None:
    """`policyc bench DIR pyramiddrop` on a 24-layer LLaVA: the stages land on layers 5, 11, 17 (`depth / 4 - 1`,
    ...), and the reference row runs the plain PyramidDrop at those layers, keeping what the policy keeps."""
    tiny_llava_clip(seed=1, num_llm_layers=24).save_pretrained(tmp_path / "llava24")
    path = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", str(tmp_path / "llava24"), "pyramiddrop", *TINY, "--json", str(path)])
    assert result.exit_code == 0, result.stderr + result.stdout
    rows = {row["name"]: row for row in json.loads(path.read_text())["rows"]}
    assert rows["policy"]["image_tokens"] == rows["reference"]["image_tokens"] == 2  # int(16 * 0.5 ** 3)
    assert rows["reference"]["note"].startswith("reference/pyramiddrop.py") and rows["reference"]["ttft_s"] > 0
    counts = rows["policy"]["tokens_per_layer"]
    assert [k for k in range(1, 24) if counts[k] < counts[k - 1]] == [6, 12, 18]  # after layers 5, 11, 17


def test_the_qwen_fastv_reference_runs_only_what_it_implements() -> None:
    """FastV's M-RoPE reference scores by the last prompt token: `rows=all` leaves the reference row out, saying
    why, rather than timing a different method."""
    import policyc
    from policyc.bench_reference import unavailable

    model = tiny_qwen2_vl(seed=1)
    policyc.compile(model, "fastv", rows="all")
    assert unavailable("fastv", False, "qwen2_vl", model.policyc) == \
        "the M-RoPE FastV reference scores by the last prompt token only (rows=last)"
    policyc.compile(model, "fastv")
    assert unavailable("fastv", False, "qwen2_vl", model.policyc) is None
    assert unavailable("pyramiddrop", False, "qwen2_vl").startswith("no reference implementation of 'pyramiddrop'")


def test_qwen_shape_inputs_on_the_meta_device() -> None:
    model = build_shape("qwen2.5-vl-7b", "meta", torch.bfloat16)
    inputs = synthetic_inputs(adapt(model), Settings(batch=8, images=1))
    assert inputs["input_ids"].shape == (8, 64 + 578) and inputs["pixel_values"].shape == (8 * 2304, 3 * 2 * 14 * 14)
    assert inputs["pixel_values"].device.type == "meta"


def test_llava_shape_on_the_meta_device() -> None:
    model = build_shape("llava-1.5-7b", "meta", torch.bfloat16)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert abs(sum(p.numel() for p in model.parameters()) - 7.06e9) < 0.01e9
    adapter = adapt(model)
    assert adapter.tokens_per_image == 576 and adapter.patch_grid == (24, 24) and adapter.has_cls
    assert (len(adapter.vision_layers), adapter.vision_num_heads, adapter.vision_head_dim) == (24, 16, 64)
    assert adapter.feature_layer == 23 and adapter.feature_start == 1  # layer -2, strategy "default"
    assert (len(adapter.decoder_layers), adapter.num_heads, adapter.hidden_size) == (32, 32, 4096)
    assert model.config.text_config.vocab_size == 32064 and model.config.text_config.intermediate_size == 11008


def test_qwen_shape_on_the_meta_device() -> None:
    model = build_shape("qwen2.5-vl-7b", "meta", torch.bfloat16)
    assert abs(sum(p.numel() for p in model.parameters()) - 8.29e9) < 0.01e9  # the released model's count
    adapter = adapt(model)
    assert (len(adapter.decoder_layers), adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (28, 28, 4, 128)
    assert len(adapter.vision_layers) == 32 and adapter.rope == "mrope"


def _benchmark_script(name: str) -> Any:
    """benchmarks/NAME.py as a module (the folder is no package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def _speed_script() -> Any:
    return _benchmark_script("speed")


def test_speed_script_smoke_run(tmp_path: Path) -> None:
    """benchmarks/speed.py --tiny on one configuration and its batch-1 pair (dynamic and static cache): a RESULTS.md
    titled as a CPU smoke run, and the plot; the unmodified row is measured once per batch and cache."""
    _speed_script().main(["--tiny", "--out", str(tmp_path), "--policies", "fastv", "--budgets", "64", "--backends",
                          "eager", "--no-long-context", "--no-reference"])
    results = (tmp_path / "RESULTS.md").read_text()
    assert results.startswith("# CPU smoke run of the tiny random model (not the GPU result)")
    rows = [line for line in results.splitlines() if line.startswith("| fastv | 64 |")]
    assert [row.split(" | ")[2:5] for row in rows] == [["ratio=11.1545%", "eager", "2"],
                                                        ["ratio=11.1545%", "eager", "1"],
                                                        ["ratio=11.1545%, static cache", "eager", "1"]]
    assert all("| 7.0 |" in row for row in rows)  # FastV's 64-of-576 setting keeps 7 of the tiny model's 64 tokens
    runs = sorted(p.name for p in (tmp_path / "runs").glob("*.json"))
    assert runs == ["fastv-64-eager-1img-batch1-dynamic.json", "fastv-64-eager-1img-batch1-static.json",
                    "fastv-64-eager-1img.json"]
    static = json.loads((tmp_path / "runs" / runs[1]).read_text())
    assert static["settings"]["cache"] == "static" and static["settings"]["batch"] == 1
    assert (tmp_path / "speed.png").stat().st_size > 0


def test_speed_script_long_context_pair_saves_the_evicted_share(tmp_path: Path) -> None:
    """The long-context pair (SnapKV, 8 images, tiny capacity 128, dynamic then static cache): each reports the KV
    memory saved next to the share of positions evicted. The dynamic cache saves exactly that share; the static one
    holds the capacity and the new tokens rounded up to a 64-slot bucket (128 + 2 -> 192 slots of 520 + 2)."""
    _speed_script().main(["--tiny", "--out", str(tmp_path), "--policies", "fastv", "--budgets", "64", "--backends",
                          "eager", "--no-batch1", "--no-reference", "--repeats", "1", "--warmup", "0"])
    lines = [line for line in (tmp_path / "RESULTS.md").read_text().splitlines() if line.startswith("Long context")]
    assert [line.split("cache budget 128, ")[1].split(")")[0] for line in lines] == ["dynamic cache", "static cache"]
    assert all("(snapkv, 8 images, 520 prompt tokens," in line for line in lines)
    evicted = f"{(1 - (128 + 2) / (520 + 2)) * 100:.1f}% of positions evicted"
    assert f"KV memory saved {evicted.split('%')[0]}% against {evicted}" in lines[0]
    assert f"KV memory saved {(1 - 192 / (520 + 2)) * 100:.1f}% against {evicted}" in lines[1]


def test_speed_matrix_order_puts_the_targets_of_their_own_after_the_first_budget() -> None:
    """Every policy at the first budget and backend; the batch-1 runs (eager with a dynamic cache, its whole forward
    under torch.compile reduce-overhead, a static cache, then inductor's compiled prefill with a static cache); the
    long-context pair; then the rest of the matrix."""
    speed = _speed_script()
    args = argparse.Namespace(policies=["fastv", "visionzip"], budgets=[64, 128], backends=["eager", "inductor"],
                              batch1=True, long_context=True, tiny=False)
    names = [speed.run_name(config) for config in speed.configurations(args, 576)]
    assert names[:8] == ["fastv-64-eager-1img", "visionzip-64-eager-1img", "fastv-64-eager-1img-batch1-dynamic",
                         "fastv-64-eager-1img-batch1-dynamic-compile-reduce-overhead",
                         "fastv-64-eager-1img-batch1-static", "fastv-64-inductor-1img-batch1-static",
                         "snapkv-1024-eager-8img", "snapkv-1024-eager-8img-static"]
    assert names[8:] == [f"{p}-{b}-{backend}-1img" for backend in ("eager", "inductor") for b in (64, 128)
                         for p in ("fastv", "visionzip")][2:]


def test_speed_script_starts_nothing_past_its_minutes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--minutes 0: the first configuration runs (64 tokens first, then the batch-1 and long-context pairs), the
    others are named as not run, and the report holds the one that finished; the JSON says which kernels ran."""
    _speed_script().main(["--tiny", "--out", str(tmp_path), "--policies", "fastv", "visionzip", "--budgets", "64",
                          "128", "--backends", "eager", "--no-reference", "--minutes", "0", "--kernels", "off"])
    assert ("7 configuration(s) not run: visionzip-64-eager-1img, fastv-64-eager-1img-batch1-dynamic, "
            "fastv-64-eager-1img-batch1-static, snapkv-128-eager-8img, snapkv-128-eager-8img-static, "
            "fastv-128-eager-1img, visionzip-128-eager-1img") in capsys.readouterr().out
    runs = list((tmp_path / "runs").glob("*.json"))
    assert [p.name for p in runs] == ["fastv-64-eager-1img.json"]
    assert json.loads(runs[0].read_text())["kernels"] == "eager"


def test_flops_scaling_fits_a_line_through_exact_points() -> None:
    fit = _benchmark_script("flops_scaling").fit
    intercept, throughput, r2 = fit([1e9, 2e9, 4e9], [0.003, 0.005, 0.009])  # 1 ms + FLOPs / 0.5 TFLOP/s
    assert intercept == pytest.approx(0.001) and throughput == pytest.approx(5e11) and r2 == pytest.approx(1.0)


def test_flops_scaling_smoke_run_times_each_count_with_its_report_flops(tmp_path: Path) -> None:
    """--tiny: the tiny model's 64 image tokens scaled as LLaVA's 576, 64 text tokens; FLOPs from the compile
    report's formula for the decoder's layers."""
    from policyc.models.random_tiny import random_model
    from policyc.report import prefill_flops

    result = _benchmark_script("flops_scaling").main(["--tiny", "--json", str(tmp_path / "flops.json")])
    points = result["points"]
    assert [p["image_tokens"] for p in points] == [64, 36, 21, 14, 7, 0]
    adapter = adapt(random_model(banner=False))
    for p in points:
        assert p["rows"] == 64 + p["image_tokens"] and p["seconds"] > 0
        assert p["flops"] == prefill_flops(adapter, [p["rows"]] * 32, 2).llm
    assert points[0]["flops_share"] == 1.0 and json.loads((tmp_path / "flops.json").read_text())["points"] == points


def test_kernel_timings_smoke_run_agrees_with_the_plain_computations() -> None:
    """benchmarks/kernel_timings.py --tiny: every kernel, eager and fused, gives the plain computation's numbers."""
    results = _benchmark_script("kernel_timings").main(["--tiny"])
    assert [r["op"].split(",")[0] for r in results] == ["attention_rows", "attention_rows", "column sums",
                                                         "top_ranked", "kept_rows", "bipartite_match"]
    assert all(r["max_abs_diff"] < 1e-5 and r["fused_recompiles"] == 0 for r in results)

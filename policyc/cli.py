"""The `policyc` command line. Exit codes: 0 ok, 1 policy error, 2 usage error.

`check`, `fmt` and `list` import neither torch nor transformers.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import click

from policyc.errors import PolicyError
from policyc.operators import PluginError
from policyc.terminal import JSON_OPTION

EXIT_POLICY_ERROR = 1


def _fail(error: PolicyError) -> None:
    click.echo(str(error), err=True)


class _Main(click.Group):
    """The command group; a plug-in that cannot be registered (policyc.operators) is an error naming its package,
    not a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except PluginError as error:
            click.echo(f"error: {error}", err=True)
            ctx.exit(EXIT_POLICY_ERROR)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="policyc")
def main() -> None:
    """policyc: compile visual-token compression policies (.tokpol) onto vision-language models."""


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-q", "--quiet", is_flag=True, help="Print errors only.")
def check(files: tuple[Path, ...], quiet: bool) -> None:
    """Parse and validate policy FILES."""
    from policyc.lang import Loader, check_path, check_search_path

    loader = Loader()
    failed = 0
    for path in files:
        try:
            checked = check_path(path, loader)
            searches = check_search_path(path, loader) if not quiet else []
        except PolicyError as error:
            _fail(error)
            failed += 1
            continue
        if not quiet:
            names = ", ".join([c.program.policy.name for c in checked] + [f"search {s.name}" for s in searches])
            names = names or "no policies"
            click.echo(f"ok  {path}  ({names})")
    if failed:
        click.echo(f"{failed} of {len(files)} file{'s' * (len(files) != 1)} failed", err=True)
        sys.exit(EXIT_POLICY_ERROR)


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--check", "check_only", is_flag=True, help="Change nothing; exit 1 if a file is not canonical.")
@click.option("--stdout", is_flag=True, help="Print the canonical form instead of rewriting files.")
def fmt(files: tuple[Path, ...], check_only: bool, stdout: bool) -> None:
    """Rewrite FILES in the canonical form (comments are kept)."""
    from policyc.lang.build import parse
    from policyc.lang.printer import print_file

    status = 0
    for path in files:
        text = path.read_text(encoding="utf-8")
        try:
            canonical = print_file(parse(text, str(path)))
        except PolicyError as error:
            _fail(error)
            status = EXIT_POLICY_ERROR
            continue
        if stdout:
            click.echo(canonical, nl=False)
        elif canonical == text:
            continue
        elif check_only:
            click.echo(f"would reformat {path}", err=True)
            status = EXIT_POLICY_ERROR
        else:
            _replace(path, canonical)
            click.echo(f"reformatted {path}")
    sys.exit(status)


def _replace(path: Path, text: str) -> None:
    """Write `text` to `path` atomically: a crash leaves the old file whole."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@main.command()
@click.argument("policy")
@click.option("--graph", type=click.Choice(["mermaid", "dot"]), help="Print the stage graph in this format.")
@click.option("--json", "as_json", is_flag=True, help="Print the policy's IR as JSON.")
def show(policy: str, graph: str | None, as_json: bool) -> None:
    """Show POLICY (a file, FILE:NAME, or a standard-library name): parameters, stages, requirements."""
    from policyc.show import find_policies, render_policy

    try:
        found = find_policies(policy)
    except PolicyError as error:
        _fail(error)
        sys.exit(EXIT_POLICY_ERROR)
    for checked in found:
        if as_json:
            click.echo(checked.program.policy.model_dump_json(indent=2))
        elif graph is not None:
            from policyc.lang.graph import build_graph

            built = build_graph(checked)
            click.echo(built.to_mermaid() if graph == "mermaid" else built.to_dot(), nl=False)
        else:
            render_policy(checked)


def _assignments(params: tuple[str, ...]) -> dict:
    """`--param NAME=VALUE` options as parameter assignments."""
    from policyc.lang.build import parse_value

    assignments = {}
    for item in params:
        name, sep, text = item.partition("=")
        if not sep:
            raise click.UsageError(f"--param takes NAME=VALUE, not {item!r}")
        assignments[name.strip()] = parse_value(text.strip(), f"--param {name.strip()}")
    return assignments


def _sweep(option: str | None) -> tuple[str, list] | None:
    """`--sweep NAME=V1,V2,...` as a parameter name and its values."""
    from policyc.lang.build import parse_value

    if option is None:
        return None
    name, sep, text = option.partition("=")
    if not sep or not text.strip():
        raise click.UsageError(f"--sweep takes NAME=V1,V2,..., not {option!r}")
    return name.strip(), [parse_value(v.strip(), f"--sweep {name.strip()}") for v in text.split(",")]


_BACKEND = click.option("--backend", type=click.Choice(["eager", "inductor", "fx"]), default="eager",
                        show_default=True,
                        help="eager: the module-level rewrite (the reference semantics); inductor: the LLM "
                             "captured by torch.compile, its prefill graph rewritten by graph passes, compiled by "
                             "inductor; fx: the same rewritten graphs without inductor.")
_PARAM = click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
                      help="Set a parameter, e.g. --param ratio=25%. Repeatable.")


@main.command()
@click.argument("model")
@click.argument("policy")
@click.option("--emit", type=click.Choice(["ir", "plan", "fx"]),
              help="Print the policy's IR (JSON), its plan bound to MODEL, or the LLM graphs the fx "
                   "backend captured and rewrote on a calibration prompt.")
@_BACKEND
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              help="Write a compile artifact (policy, parameters, model reference and config hash, report) to "
                   "this directory; `policyc run DIR` and `policyc.load(DIR)` load it.")
@_PARAM
@JSON_OPTION
def compile(model: str, policy: str, emit: str | None, backend: str, output: Path | None,
            params: tuple[str, ...], json_path: Path | None) -> None:
    """Bind POLICY (a file, FILE:NAME or a standard-library name) to MODEL (a local directory, hub id, or
    `default` for the embedded default model)."""
    from policyc.compile_command import compile_command
    from policyc.lang import Loader

    if emit is None and output is None and json_path is None:
        raise click.UsageError("say what to produce: --emit ir, --emit plan, --emit fx, -o DIR or --json FILE")
    loader = Loader()
    try:
        compile_command(model, policy, emit=emit, backend=backend, output=output, assignments=_assignments(params),
                        json_path=json_path, loader=loader)
    except PolicyError as error:
        _fail(error.with_sources(loader.sources))
        sys.exit(EXIT_POLICY_ERROR)


@main.command()
@click.argument("model", required=False)
@click.argument("policy", required=False)
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The image (default: the example scene shipped with policyc).")
@click.option("--prompt", help="The question about the image (default: the example scene's question, "
                               "'what color is the triangle ?').")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=16, show_default=True)
@_PARAM
@click.option("--show-tokens", type=click.Path(dir_okay=False, path_type=Path),
              help="Draw the prompt's images (every tile, global or base view and crop) with the tokens each stage "
                   "kept and dropped into this PNG.")
@click.option("--device", default="cpu", show_default=True, help="Where to run the model (cpu, cuda, ...).")
@_BACKEND
@JSON_OPTION
def run(model: str | None, policy: str | None, image: Path | None, prompt: str | None, max_new_tokens: int,
        params: tuple[str, ...], show_tokens: Path | None, device: str, backend: str, json_path: Path | None) -> None:
    """Generate from an image and a prompt with POLICY compiled onto MODEL; print the tokens each stage
    kept and the prefill and decode timings.

    MODEL is a hub id, a local directory, a compile artifact (`policyc compile ... -o DIR`) or `default`;
    POLICY a file, FILE:NAME or a standard-library name. `policyc run fastv` runs FastV on the embedded
    default model (random weights), `policyc run` runs that model with no policy.
    """
    from policyc.run import run_command

    try:
        run_command(model, policy, image=image, prompt=prompt, max_new_tokens=max_new_tokens,
                    assignments=_assignments(params), show_tokens=show_tokens, device=device,
                    backend=backend, json_path=json_path)
    except PolicyError as error:
        _fail(error)
        sys.exit(EXIT_POLICY_ERROR)


@main.command(name="eval")
@click.argument("model", required=False)
@click.argument("policy", required=False)
@click.option("--data", default="synthetic", show_default=True,
              help="`synthetic` (policyc's generated scenes) or a JSONL file of {image, question, answer} lines.")
@click.option("--split", type=click.Choice(["train", "validation", "test"]), default="test", show_default=True,
              help="Split of the synthetic scenes.")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate at most this many items (synthetic: 500).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help="Set a parameter (repeatable).")
@click.option("--device", default="cpu", show_default=True, help="Where to run the model (cpu, cuda, ...).")
@JSON_OPTION
@click.option("--sweep", metavar="NAME=V1,V2,...", help="Evaluate POLICY at each of these values of a parameter.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Draw accuracy against FLOPs share to this PNG file.")
@click.option("--lmms", "lmms", multiple=True, metavar="TASK[:METRIC]",
              help="Evaluate lmms-eval tasks instead of --data (repeatable or comma-separated; needs policyc[lmms]).")
def eval_(model: str | None, policy: str | None, data: str, split: str, limit: int | None, batch_size: int,
          params: tuple[str, ...], device: str, json_path: Path | None, sweep: str | None, plot: Path | None,
          lmms: tuple[str, ...]) -> None:
    """Accuracy of POLICY compiled onto MODEL next to the unmodified model: exact match, VQA score,
    retention, image tokens reaching the LLM's last layer and the analytic prefill FLOPs share.

    MODEL and POLICY are read as in `policyc run`; `policyc eval fastv` evaluates FastV on the embedded
    default model and the synthetic test split; `--lmms policyc_synthetic` the same questions through lmms-eval.
    """
    from policyc.eval_command import eval_command

    try:
        eval_command(model, policy, data=data, split=split, limit=limit, batch_size=batch_size,
                     assignments=_assignments(params), device=device, json_path=json_path,
                     sweep=_sweep(sweep), plot=plot, lmms=lmms)
    except PolicyError as error:
        _fail(error)
        sys.exit(EXIT_POLICY_ERROR)


@main.command()
@click.argument("first", metavar="[MODEL] SPACE")
@click.argument("second", required=False, metavar="")
@click.option("--trials", type=click.IntRange(min=1), default=40, show_default=True,
              help="Finished trials the study must hold (all workers together).")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for trials.csv, trials.json, pareto/*.tokpol and pareto.png.")
@click.option("--storage", help="Optuna storage URL shared by workers, e.g. postgresql://user:pw@host/db "
                                "(default: sqlite in the output directory).")
@click.option("--study", help="Study name (default: the search space's name).")
@click.option("--objective", "objectives", multiple=True, default=("accuracy", "flops"), show_default=True,
              type=click.Choice(["accuracy", "vqa_score", "flops", "kv", "latency_ms", "image_tokens"]),
              help="Figures to optimize (repeatable).")
@click.option("--constraint", "constraints", multiple=True, metavar="NAME<=V|NAME>=V",
              help="Keep only trials within a bound, e.g. flops<=0.4 (repeatable).")
@click.option("--data", default="synthetic", show_default=True, help="`synthetic` or a JSONL file, as in eval.")
@click.option("--split", type=click.Choice(["train", "validation", "test"]), default="validation",
              show_default=True, help="Split of the synthetic scenes (search on validation, report on test).")
@click.option("--limit", type=click.IntRange(min=1), default=200, show_default=True, help="Items per trial.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True,
              help="The sampler's seed (give each worker of a shared study its own).")
@click.option("--heartbeat", type=click.IntRange(min=1), default=10, show_default=True,
              help="Seconds between a worker's heartbeats; a trial silent for twice that is marked failed.")
@click.option("--device", default="cpu", show_default=True, help="Where to run the model (cpu, cuda, ...).")
@click.option("--lmms", metavar="TASK[:METRIC]",
              help="Measure accuracy on this lmms-eval task instead of --data, --limit documents per trial.")
@JSON_OPTION
def search(first: str, second: str | None, trials: int, output: Path, storage: str | None, study: str | None,
           objectives: tuple[str, ...], constraints: tuple[str, ...], data: str, split: str, limit: int,
           batch_size: int, seed: int, heartbeat: int, device: str, lmms: str | None, json_path: Path | None) -> None:
    """Search SPACE for the policies with the best trade-off (Optuna; Pareto front of the objectives).

    SPACE is a .tokpol file with a `search` block (FILE:NAME picks one), a policy file (every parameter with a
    domain is searched), or standard-library names (`fastv,pyramiddrop`). MODEL defaults to the embedded
    model. Run the same command again to resume, or on several machines with one --storage to share the work.
    """
    from policyc.search_command import parse_constraints, search_command

    model, space = (None, first) if second is None else (first, second)
    try:
        search_command(model, space, trials=trials, output=output, storage=storage, study=study, data=data,
                       split=split, limit=limit, batch_size=batch_size, objectives=list(objectives),
                       constraints=parse_constraints(constraints), device=device, seed=seed,
                       heartbeat=heartbeat, lmms=lmms, json_path=json_path)
    except PolicyError as error:
        _fail(error)
        sys.exit(EXIT_POLICY_ERROR)


@main.command()
@click.argument("first", metavar="[MODEL] POLICY")
@click.argument("second", required=False, metavar="")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--images", type=click.IntRange(min=1), default=1, show_default=True, help="Images per prompt.")
@click.option("--prompt-len", type=click.IntRange(min=1), default=64, show_default=True, help="Text tokens per prompt.")
@click.option("--gen-len", type=click.IntRange(min=1), default=32, show_default=True, help="New tokens for decode.")
@click.option("--backend", type=click.Choice(["eager", "inductor"]), default="eager", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="bfloat16", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--shapes", help="Build this full-size architecture with random weights instead of loading MODEL "
                               "(llava-1.5-7b, qwen2.5-vl-7b, qwen3-vl-8b, qwen3.5-27b).")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True, help="Timed runs (median).")
@JSON_OPTION
@click.option("--no-reference", is_flag=True, help="Skip the plain reference implementation's row.")
@click.option("--kernels", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="policyc's scoring kernels fused by torch.compile (auto: on CUDA only).")
@click.option("--cache", type=click.Choice(["dynamic", "static"]), default="dynamic", show_default=True,
              help="generate()'s KV cache (static: on CUDA transformers compiles the decode step, CUDA graphs).")
@click.option("--compile", "compile_mode", type=click.Choice(["none", "default", "reduce-overhead"]), default="none",
              show_default=True, help="torch.compile each row's whole forward in this mode (reduce-overhead: CUDA "
              "graphs on CUDA); prefill and TTFT only; with --backend eager.")
@_PARAM
def bench(first: str, second: str | None, batch: int, images: int, prompt_len: int, gen_len: int, backend: str,
          dtype: str, device: str, shapes: str | None, warmup: int, repeats: int, json_path: Path | None,
          no_reference: bool, kernels: str, cache: str, compile_mode: str, params: tuple[str, ...]) -> None:
    """Time POLICY against the unmodified model, the ideal (the unmodified layers fed the policy's token counts)
    and the plain reference implementation: prefill, time to first token, decode tokens/s, memory, KV cache."""
    from policyc.bench import Settings
    from policyc.bench_command import bench_command

    model, policy = (None, first) if second is None else (first, second)
    settings = Settings(batch, images, prompt_len, gen_len, backend, dtype, device, warmup, repeats, kernels=kernels,
                        cache=cache, compile=compile_mode)
    try:
        bench_command(model, policy, settings=settings, shapes=shapes, assignments=_assignments(params),
                      json_path=json_path, no_reference=no_reference)
    except PolicyError as error:
        _fail(error)
        sys.exit(EXIT_POLICY_ERROR)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("first", metavar="[MODEL] POLICY")
@click.argument("rest", nargs=-1, type=click.UNPROCESSED, metavar="[VLLM ARGS]...")
@_PARAM
def serve(first: str, rest: tuple[str, ...], params: tuple[str, ...]) -> None:
    """Serve POLICY on MODEL (default: the embedded model) with vLLM's OpenAI-compatible server: `vllm serve MODEL
    --hf-overrides '{"policyc": ...}'` and the vLLM ARGS (e.g. --port 8000). Needs `pip install 'policyc[vllm]'`;
    the policy's stages must all run before the LLM (docs/howto/serve.md)."""
    from policyc.integrations.vllm.serve import serve_command

    model, policy, args = (first, rest[0], rest[1:]) if rest and not rest[0].startswith("-") else (None, first, rest)
    values = {}
    for item in params:
        name, sep, text = item.partition("=")
        if not sep:
            raise click.UsageError(f"--param takes NAME=VALUE, not {item!r}")
        values[name.strip()] = text.strip()
    try:
        serve_command(model, policy, values, args)
    except PolicyError as error:
        _fail(error)
        sys.exit(EXIT_POLICY_ERROR)


@main.command(name="list")
@click.argument("kind", required=False,
                type=click.Choice(["policies", "hooks", "statements", "sets", "signals", "functions", "schedules",
                                   "selectors", "merges", "caches", "positions"]))
@click.option("--markdown", is_flag=True, help="Print the language catalog as Markdown tables.")
@JSON_OPTION
def list_(kind: str | None, markdown: bool, json_path: Path | None) -> None:
    """List standard-library policies and everything a policy can name (or only KIND)."""
    from policyc.show import catalog_json, catalog_markdown, render_catalog
    from policyc.terminal import console, write_json

    try:
        if markdown:
            click.echo(catalog_markdown(), nl=False)
            return
        tables = console(json_path)
        render_catalog(kind, tables)
        if json_path is not None:
            write_json(json_path, catalog_json(kind), tables)
    except PolicyError as error:
        _fail(error)
        sys.exit(EXIT_POLICY_ERROR)


if __name__ == "__main__":
    main()

"""Compile artifacts: a directory that records a policy compiled for one model, without its weights.

    DIR/manifest.json      format, policy name and hash, parameter values, the model reference
                           (hub id, local directory or the embedded default) and revision, the hash
                           of the model's config, library versions; its own sha256 over the rest
    DIR/policy.tokpol      the policy in canonical form, self-contained (every policy it uses is
                           written out, so the artifact does not depend on other files)
    DIR/model_config.json  the model's config (what the hash covers), to name what differs
    DIR/report.json        the compile report (policyc.report)

`read_artifact` checks every file against the manifest; `compile_artifact` checks the model's config
and compiles the policy onto it. Every problem is a `PolicyError` that says what to do.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policyc.errors import PolicyError
from policyc.lang import CheckedPolicy, check_source, ir
from policyc.lang.build import parse, parse_value
from policyc.lang.printer import print_expr, print_file

FORMAT = "policyc-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
POLICY_FILE = "policy.tokpol"
CONFIG_FILE = "model_config.json"
REPORT_FILE = "report.json"
# Config fields that say how a model was loaded or saved, not what it computes.
_VOLATILE = {"transformers_version", "architectures", "dtype", "torch_dtype", "use_cache", "output_attentions",
             "output_hidden_states", "return_dict"}


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def is_artifact(path: str | Path) -> bool:
    """Whether `path` is a directory holding an artifact manifest."""
    return (Path(path) / MANIFEST).is_file()


def embedded_policy_text(checked: CheckedPolicy) -> str:
    """`checked`'s policy and every policy it uses, in one canonical file with no imports.

    A `use alias.p` (of a file imported `as alias`) becomes `use p`; the root policy comes first.
    """
    policies: list[ir.Policy] = []
    for scope in checked.program.scopes:
        if all(scope.policy is not p for p in policies):
            policies.append(scope.policy)
    names = [p.name for p in policies]
    clash = next((n for n in names if names.count(n) > 1), None)
    if clash is not None:
        raise PolicyError.at(f"policy '{checked.program.policy.name}' uses two different policies named '{clash}'",
                             None, "an artifact holds one file; rename one of them")
    text = print_file(ir.PolicyFile(policies=tuple(_without_aliases(p, checked) for p in policies)))
    embedded = check_source(text, POLICY_FILE)[0]
    if tuple(s.placed.stage for s in embedded.stages) != tuple(s.placed.stage for s in checked.stages):
        raise PolicyError.at(f"policy '{checked.program.policy.name}' cannot be written into one file faithfully",
                             None, "report this as a bug in policyc")
    return text


def _without_aliases(policy: ir.Policy, checked: CheckedPolicy) -> ir.Policy:
    source = checked.sources.get(policy.span.file) if policy.span is not None else None
    aliases = {i.alias for i in parse(source, policy.span.file).imports if i.alias} if source else set()
    uses = tuple(u.model_copy(update={"policy": u.stage, "stage": None}) if u.policy in aliases else u
                 for u in policy.uses)
    return policy.model_copy(update={"uses": uses})


def config_dict(model: Any) -> dict[str, Any]:
    """The model's config as JSON data, without private and load-time fields (see `_VOLATILE`)."""
    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in sorted(value.items()) if not k.startswith("_") and k not in _VOLATILE}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return clean(json.loads(model.config.to_json_string(use_diff=False)))


def config_differences(expected: Mapping[str, Any], actual: Mapping[str, Any], prefix: str = "") -> list[str]:
    """`name: VALUE here, VALUE in the artifact` for every field that differs (dotted names)."""
    found = []
    for key in sorted(set(expected) | set(actual)):
        name, mine, theirs = f"{prefix}{key}", actual.get(key, "<missing>"), expected.get(key, "<missing>")
        if isinstance(mine, dict) and isinstance(theirs, dict):
            found.extend(config_differences(theirs, mine, f"{name}."))
        elif mine != theirs:
            found.append(f"{name}: {json.dumps(mine)} here, {json.dumps(theirs)} in the artifact")
    return found


def library_versions() -> dict[str, str]:
    from importlib.metadata import version

    import torch
    import transformers

    return {"policyc": version("policyc"), "torch": torch.__version__, "transformers": transformers.__version__}


def write_artifact(directory: str | Path, checked: CheckedPolicy, model: Any, model_ref: str,
                   assignments: Mapping[str, ir.Expr], report: Mapping[str, Any]) -> Path:
    """Write the artifact of `checked` compiled for `model` (found again through `model_ref`)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise PolicyError.at(f"cannot write an artifact to '{directory}': it is a file", None)
    if directory.is_dir() and any(directory.iterdir()) and not is_artifact(directory):
        raise PolicyError.at(f"cannot write an artifact to '{directory}': the directory holds other files", None,
                             "pass a new or empty directory (or an artifact directory to replace)")
    policy_text = embedded_policy_text(checked)
    config_text = _canonical_json(config_dict(model))
    report_text = _canonical_json(dict(report))
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "policy": {"name": checked.program.policy.name, "file": POLICY_FILE, "sha256": sha256(policy_text)},
        "params": {name: print_expr(value) for name, value in sorted(assignments.items())},
        "model": {"ref": model_ref, "revision": getattr(model.config, "_commit_hash", None),
                  "config_file": CONFIG_FILE, "config_sha256": sha256(config_text)},
        "report": {"file": REPORT_FILE, "sha256": sha256(report_text)},
        "versions": library_versions(),
    }
    manifest["sha256"] = sha256(_canonical_json(manifest))
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in ((POLICY_FILE, policy_text), (CONFIG_FILE, config_text), (REPORT_FILE, report_text),
                       (MANIFEST, _canonical_json(manifest))):
        (directory / name).write_text(text, encoding="utf-8")
    return directory


@dataclass(frozen=True)
class Artifact:
    """A checked artifact directory."""

    directory: Path
    manifest: Mapping[str, Any]
    policy_text: str
    config: Mapping[str, Any]
    report: Mapping[str, Any]

    @property
    def model_ref(self) -> str:
        return str(self.manifest["model"]["ref"])

    @property
    def policy_name(self) -> str:
        return str(self.manifest["policy"]["name"])

    def assignments(self) -> dict[str, ir.Expr]:
        return {name: parse_value(text, f"{self.directory / MANIFEST}: params.{name}")
                for name, text in self.manifest["params"].items()}

    def checked(self) -> CheckedPolicy:
        found = check_source(self.policy_text, str(self.directory / POLICY_FILE))
        return next(c for c in found if c.program.policy.name == self.policy_name)

    def version_changes(self) -> list[str]:
        """Libraries whose version differs from the one the artifact was written with."""
        recorded = self.manifest.get("versions", {})
        return [f"{name} {recorded.get(name)} -> {now}" for name, now in library_versions().items()
                if recorded.get(name) != now]

    def check_model(self, model: Any) -> None:
        """Fail, naming the fields, when `model`'s config is not the one the artifact was compiled for."""
        differences = config_differences(self.config, config_dict(model))
        if differences:
            shown = "; ".join(differences[:6]) + (f"; and {len(differences) - 6} more" if len(differences) > 6 else "")
            raise PolicyError.at(f"the model does not match the artifact {self.directory}: its config differs "
                                 f"({shown})", None,
                                 f"load the model the artifact was compiled for ({self.model_ref}), or compile "
                                 "the policy again for this model with `policyc compile MODEL POLICY -o DIR`")


def _corrupt(directory: Path, what: str) -> PolicyError:
    return PolicyError.at(f"the artifact {directory} is damaged: {what}", None,
                          "artifacts are written by `policyc compile MODEL POLICY -o DIR` and must not be edited; "
                          "compile again")


def _read(directory: Path, name: str) -> str:
    path = directory / name
    if not path.is_file():
        raise _corrupt(directory, f"{name} is missing")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise _corrupt(directory, f"{name} cannot be read ({error})") from None


def _json(directory: Path, name: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise _corrupt(directory, f"{name} is not valid JSON (line {error.lineno}, column {error.colno}: "
                                  f"{error.msg})") from None


def read_artifact(directory: str | Path) -> Artifact:
    """Read and verify an artifact: every file present, valid and matching the manifest's hashes."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PolicyError.at(f"no artifact at '{directory}': no such directory", None,
                             "write one with `policyc compile MODEL POLICY -o DIR`")
    if not (directory / MANIFEST).is_file():
        raise PolicyError.at(f"'{directory}' is no policyc artifact: it has no {MANIFEST}", None,
                             "write one with `policyc compile MODEL POLICY -o DIR`")
    manifest = _json(directory, MANIFEST, _read(directory, MANIFEST))
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _corrupt(directory, f"{MANIFEST} is not a policyc artifact manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PolicyError.at(f"the artifact {directory} has format version {manifest.get('format_version')!r}; "
                             f"this policyc reads version {FORMAT_VERSION}", None, "compile it again")
    recorded = manifest.pop("sha256", None)
    if recorded != sha256(_canonical_json(manifest)):
        raise _corrupt(directory, f"{MANIFEST} does not match its own sha256 (edited by hand?)")
    manifest["sha256"] = recorded
    try:
        files = {"policy": manifest["policy"]["file"], "config": manifest["model"]["config_file"],
                 "report": manifest["report"]["file"]}
        hashes = {"policy": manifest["policy"]["sha256"], "config": manifest["model"]["config_sha256"],
                  "report": manifest["report"]["sha256"]}
        dict(manifest["params"])
        str(manifest["model"]["ref"])
    except (KeyError, TypeError, AttributeError) as error:
        raise _corrupt(directory, f"{MANIFEST} lacks {error}") from None
    texts = {}
    for part, name in files.items():
        if Path(name).name != name:
            raise _corrupt(directory, f"{MANIFEST} names a file outside the artifact: {name!r}")
        texts[part] = _read(directory, name)
        if sha256(texts[part]) != hashes[part]:
            raise _corrupt(directory, f"{name} does not match the sha256 in {MANIFEST} (edited by hand?)")
    return Artifact(directory, manifest, texts["policy"], _json(directory, files["config"], texts["config"]),
                    _json(directory, files["report"], texts["report"]))


def load_artifact_model(artifact: Artifact, *, device: str = "cpu", dtype: Any = None) -> Any:
    """The model an artifact references: an embedded model, a local directory or a hub id."""
    from policyc.models.bundled import load_reference_model

    return load_reference_model(artifact.model_ref, device, dtype)


def compile_artifact(artifact: Artifact, model: Any) -> Any:
    """Check `model` against the artifact and compile its policy onto it (in place); the CompiledModel."""
    from policyc.runtime import compile_model

    artifact.check_model(model)
    return compile_model(model, artifact.checked(), artifact.assignments())


__all__ = ["Artifact", "compile_artifact", "config_dict", "config_differences", "embedded_policy_text",
           "is_artifact", "load_artifact_model", "read_artifact", "write_artifact"]

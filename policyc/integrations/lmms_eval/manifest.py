"""The `lmms_eval.models` entry point: lmms-eval imports this module each time it imports its model registry, so
it imports nothing but lmms-eval's manifest class and names the model classes as strings."""

from __future__ import annotations

from lmms_eval.models.registry_v2 import ModelManifest

MODEL = "policyc.integrations.lmms_eval.model"


def manifests() -> list[ModelManifest]:
    """`--model policyc`: the chat interface (lmms-eval's default), the simple one with `--force_simple`."""
    return [ModelManifest("policyc", simple_class_path=f"{MODEL}.PolicycSimple",
                          chat_class_path=f"{MODEL}.PolicycChat")]

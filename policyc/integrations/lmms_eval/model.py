"""`--model policyc`: lmms-eval's requests answered by a transformers VLM with a policy compiled onto it.

    lmms-eval --model policyc --model_args pretrained=default,policy=fastv,ratio=25% --tasks TASK --batch_size 8

model_args (lmms-eval adds its `--batch_size` and `--device` unless they are given here):
- `pretrained`: a MODEL as in `policyc run`: `default` (the embedded model), `random`, a directory or a hub id;
- `policy`: a standard-library name or a `.tokpol` file (FILE:NAME for one of several); none: the unmodified model;
- `params`: a JSON object of parameter values, qualified names allowed (`params={"fastv.ratio":"25%"}`); any other
  key is a parameter too (`ratio=25%`, `layer=2`);
- `backend`: eager (default), inductor or fx, as in `policyc.compile`; `dtype`: float32, bfloat16, float16 or auto
  (default: the checkpoint's);
- `max_new_tokens`: when the task's generation kwargs name none (default 128);
- `stats_path`: a JSON file that gets, after every request batch, each sample's image tokens in the LLM's last
  layer, prefill FLOPs share and KV share (policyc.report), and their means per task.

Requests are grouped by task and generation kwargs, taken in document order and answered `batch_size` at a time,
left-padded, through `policyc.evaluation.answer_batch` (the function `policyc eval` uses), so every sample's answer
is its single run's. Generation tasks only (`generate_until`); video inputs are refused.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages
from loguru import logger

from policyc.errors import PolicyError, suggestion
from policyc.evaluation import Answer, answer_batch, render_messages

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Request:
    """One lmms-eval request, read: how to generate, where it comes from, and `content()`, which loads its images
    and builds its user messages (images as `{"type": "image"}`) when its batch runs."""

    generation: dict[str, Any]
    task: str
    split: str
    doc_id: int
    content: Callable[[], tuple[list[Any], list[dict[str, Any]]]]


class PolicycModel(lmms):
    """The shared part of both interfaces; a subclass reads one lmms-eval request (`read`)."""

    def __init__(self, pretrained: str = "default", policy: str | None = None, params: str | dict | None = None,
                 backend: str = "eager", dtype: str | None = None, device: str = "cpu", batch_size: int | str = 1,
                 max_batch_size: int | None = None, max_new_tokens: int = 128, stats_path: str | None = None,
                 *, loaded: tuple[Any, Any] | None = None, **values: Any) -> None:
        """`loaded`: an already loaded (model, processor) to use instead of loading `pretrained` (policyc's own
        commands pass it)."""
        super().__init__()
        import policyc
        from policyc.models.bundled import load_reference_model, load_reference_processor, reference_name

        self.reference = reference_name(str(pretrained))
        if dtype is not None and dtype not in DTYPES:
            raise PolicyError.at(f"lmms-eval model_args: unknown dtype '{dtype}'", None,
                                 suggestion(str(dtype), DTYPES, "dtypes"))
        if loaded is None:
            loaded = (load_reference_model(self.reference, device, dtype),
                      load_reference_processor(self.reference))
        self._model, self.processor = loaded
        if getattr(self.processor, "tokenizer", None) is not None:
            self.processor.tokenizer.padding_side = "left"  # generate() continues every row from its last token
        self._batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.stats_path = Path(stats_path) if stats_path else None
        self.records: list[dict[str, Any]] = []
        self.compiled: Any | None = None  # the CompiledModel answering, or None for the unmodified model
        self.name = "unmodified"
        if policy is not None:
            qualified = _params(params)
            policyc.compile(self._model, policy, qualified, backend=backend, **values)
            self.use(self._model.policyc)
        elif params or values:
            raise PolicyError.at(f"lmms-eval model_args set parameters ({', '.join([*dict(params or {}), *values])}) "
                                 "but name no policy", None, "add policy=NAME, e.g. policy=fastv,ratio=25%")

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> PolicycModel:
        """`--model_args` plus lmms-eval's own `batch_size`, `device`, ...; a key given in `--model_args` wins
        (lmms-eval's default would pass both and fail on the duplicate keyword)."""
        from lmms_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    def use(self, compiled: Any | None, name: str | None = None) -> None:
        """Answer with `compiled` (a CompiledModel on this model), or unmodified with None; `name` labels the
        statistics (default: the policy's name)."""
        self.compiled = compiled
        self.name = name or (compiled.plan.name if compiled is not None else "unmodified")

    @property
    def model(self) -> Any:
        return self._model

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @batch_size.setter
    def batch_size(self, size: int) -> None:
        self._batch_size = int(size)

    @property
    def device(self) -> Any:
        return next(self._model.parameters()).device

    def read(self, request: Instance) -> Request:
        """How the request generates, where it comes from, and how to load its images and messages."""
        raise NotImplementedError

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        read = [self.read(r) for r in requests]
        for batch in _batches(read, self._batch_size):
            images, messages = zip(*(read[i].content() for i in batch), strict=True)
            answers = answer_batch(self._model, self.processor, images,
                                   [render_messages(self.processor, m) for m in messages], self.compiled,
                                   self.name, **_generate_kwargs(read[batch[0]].generation, self.max_new_tokens))
            for i, answer in zip(batch, answers, strict=True):
                text = _until(answer.text, read[i].generation.get("until"))
                results[i] = GenerationResult(text, TokenCounts(input_tokens=answer.prompt_tokens,
                                                                output_tokens=answer.new_tokens))
                self.records.append(_record(read[i], answer))
            self._write_stats()
        if self.stats_path is not None:
            for task, means in self.summary().items():
                logger.info(f"policyc: {self.name} on {task}: {means['image_tokens']:.1f} image tokens in the LLM's "
                            f"last layer, prefill FLOPs share {means['flops_share']:.1%} ({self.stats_path})")
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("policyc's lmms-eval model answers generation tasks only (generate_until): "
                                  "a loglikelihood task cannot run on it yet")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("policyc's lmms-eval model answers single-round generation tasks only")

    def clean(self) -> None:
        """Keep the model: lmms-eval's `evaluate()` ends with `clean()`, which would delete it, while policyc's
        commands evaluate one loaded model many times."""

    def summary(self) -> dict[str, dict[str, float]]:
        """Per task: samples, and mean image tokens (LLM's last layer), FLOPs share and KV share."""
        by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for record in self.records:
            by_task[record["task"]].append(record)
        return {task: {"samples": len(rows), **{key: sum(r[key] for r in rows) / len(rows)
                                                for key in ("image_tokens", "flops_share", "kv_share")}}
                for task, rows in by_task.items()}

    def _write_stats(self) -> None:
        """The side JSON, rewritten after every batch (a run cut short keeps what it measured)."""
        if self.stats_path is None:
            return
        self.stats_path.parent.mkdir(parents=True, exist_ok=True)
        self.stats_path.write_text(json.dumps({"model": self.reference, "policy": self.name,
                                               "summary": self.summary(), "samples": self.records}, indent=1) + "\n")


class PolicycSimple(PolicycModel):
    """lmms-eval's simple interface (`--force_simple`): the task's text after its visuals."""

    is_simple = True

    def read(self, request: Instance) -> Request:
        context, generation, doc_to_visual, doc_id, task, split = request.args

        def content() -> tuple[list[Any], list[dict[str, Any]]]:
            images = [_image(v) for v in doc_to_visual(self.task_dict[task][split][doc_id]) or []]
            items = [{"type": "image"}] * len(images) + [{"type": "text", "text": context}]
            return images, [{"role": "user", "content": items}]

        return Request(dict(generation), task, split, doc_id, content)


class PolicycChat(PolicycModel):
    """lmms-eval's chat interface (its default): the task's messages, in the model's chat template."""

    is_simple = False

    def read(self, request: Instance) -> Request:
        _, doc_to_messages, generation, doc_id, task, split = request.args

        def content() -> tuple[list[Any], list[dict[str, Any]]]:
            chat = ChatMessages(messages=doc_to_messages(self.task_dict[task][split][doc_id]))
            images, videos, audios = chat.extract_media()
            if videos or audios:
                raise PolicyError.at(f"task {task}: policyc's lmms-eval model takes images and text, not "
                                     f"{'videos' if videos else 'audio'} yet", None,
                                     "evaluate image tasks; `policyc run` handles the videos of the families that "
                                     "have them")
            messages = [{"role": m["role"], "content": [item if item["type"] == "text" else {"type": "image"}
                                                        for item in m["content"]]}
                        for m in chat.to_hf_messages()]
            return [_image(i) for i in images], messages

        return Request(dict(generation), task, split, doc_id, content)


def _params(params: str | dict | None) -> dict[str, Any]:
    """`params=` of model_args: a JSON object (lmms-eval passes it as text) or a dict."""
    if not isinstance(params, str):
        return dict(params or {})
    try:
        parsed = json.loads(params)
    except json.JSONDecodeError as error:
        parsed = error
    if not isinstance(parsed, dict):
        raise PolicyError.at(f"lmms-eval model_args: params={params} is not a JSON object", None,
                             'write params={"fastv.ratio":"25%","layer":2} (braces keep its commas in one argument)')
    return parsed


def _image(visual: Any) -> Any:
    """A PIL image in RGB from a PIL image or a path."""
    from PIL import Image

    if isinstance(visual, str | Path):
        return Image.open(visual).convert("RGB")
    if isinstance(visual, Image.Image):
        return visual.convert("RGB")
    raise PolicyError.at(f"policyc's lmms-eval model takes images, not {type(visual).__name__}", None,
                         "evaluate image tasks (video and audio inputs are not supported yet)")


def _batches(requests: Sequence[Request], size: int) -> Iterator[list[int]]:
    """Indices of `requests` in batches of at most `size`: one task and generation setting per batch, in
    document order (so the synthetic task's batches are `policyc eval`'s)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, r in enumerate(requests):
        groups[json.dumps([r.task, r.split, r.generation], sort_keys=True, default=str)].append(index)
    for indices in groups.values():
        ordered = sorted(indices, key=lambda i: requests[i].doc_id)
        for start in range(0, len(ordered), size):
            yield ordered[start:start + size]


def _generate_kwargs(generation: dict[str, Any], max_new_tokens: int) -> dict[str, Any]:
    """generate() arguments of a task's generation kwargs: greedy unless the temperature is above 0 and
    `do_sample` is not false (as lmms-eval's own wrappers read them)."""
    temperature = float(generation.get("temperature") or 0)
    sample = temperature > 0 and generation.get("do_sample") is not False
    kwargs: dict[str, Any] = {"max_new_tokens": int(generation.get("max_new_tokens") or max_new_tokens),
                              "do_sample": sample, "num_beams": int(generation.get("num_beams") or 1)}
    if sample:
        kwargs["temperature"] = temperature
        if generation.get("top_p") is not None:
            kwargs["top_p"] = float(generation["top_p"])
    return kwargs


def _until(text: str, stops: str | list[str] | None) -> str:
    """`text` up to the first of the stop strings."""
    for stop in [stops] if isinstance(stops, str) else stops or []:
        if stop:
            text = text.split(stop)[0]
    return text


def _record(request: Request, answer: Answer) -> dict[str, Any]:
    return {"task": request.task, "doc_id": request.doc_id, "image_tokens": answer.image_tokens,
            "flops_share": answer.flops_share, "kv_share": answer.kv_share, "prompt_tokens": answer.prompt_tokens,
            "new_tokens": answer.new_tokens}

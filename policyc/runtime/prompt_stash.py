"""The question before the LLM (MMTok's `cover`, `text_relevance`): LLaVA's get_image_features never sees the
prompt, so a forward pre-hook on the top-level model stashes input_ids and attention_mask for that forward, and a
wrapper of its generate() does the same (generate() runs get_image_features before any forward). Image i (in
LLaVA's scatter order: its i-th run of image tokens) reads the text tokens after its run in its own prompt row,
up to the row's next image or end, padding left out.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from policyc.errors import PolicyError
from policyc.models import ModelAdapter
from policyc.runtime.patching import replace_attribute
from policyc.runtime.rows import valid_keys


class PromptStash:
    """The prompt of the forward (or generate() call) in progress: input_ids and which positions are real."""

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        self.prompt: tuple[torch.Tensor, torch.Tensor] | None = None  # input_ids, valid [B, L]
        self._undo: list[Callable[[], None]] = []

    def install(self) -> None:
        model = self.adapter.model
        handles = [model.register_forward_pre_hook(self._on_input, with_kwargs=True),
                   model.register_forward_hook(self._on_output)]
        self._undo += [handle.remove for handle in handles]
        generate = model.generate

        @functools.wraps(generate)
        def generate_with_prompt(*args: object, **kwargs: object) -> object:
            self._on_input(model, args, kwargs)
            try:
                return generate(*args, **kwargs)
            finally:
                self.prompt = None

        self._undo.append(replace_attribute(model, "generate", generate_with_prompt))

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self.prompt = None

    def _on_input(self, module: nn.Module, args: tuple, kwargs: dict[str, object]) -> None:
        ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        mask = kwargs.get("attention_mask")
        if isinstance(ids, torch.Tensor):
            valid = valid_keys(mask, ids) if mask is not None else torch.ones_like(ids).bool()  # type: ignore[arg-type]
            self.prompt = (ids, valid)
        else:
            self.prompt = None

    def _on_output(self, module: nn.Module, args: tuple, output: object) -> None:
        self.prompt = None  # a later get_image_features() on its own must not read this prompt

    @torch.no_grad()
    def question_words(self, images: int, tokens: int) -> list[torch.Tensor]:
        """Per image, the LLM input embeddings of the text tokens after its image run in its prompt row, up to
        the row's next image or end, padding left out: [m_i, D] each."""
        if self.prompt is None:
            raise PolicyError.at("the policy reads the question, but this vision forward came without input_ids",
                                 None, "call the model or generate() with input_ids (not inputs_embeds, nor "
                                       "get_image_features alone)")
        ids, valid = self.prompt
        image = ids == self.adapter.image_token_id
        rows, columns = image.nonzero(as_tuple=True)  # row-major: LLaVA's order of image features
        if rows.numel() != images * tokens:
            raise PolicyError.at(f"the prompt holds {rows.numel()} image tokens for {images} images of {tokens} "
                                 "tokens each", None)
        embed = self.adapter.model.get_input_embeddings()
        positions = torch.arange(ids.shape[1], device=ids.device)
        words = []
        for i in range(images):
            row, end = int(rows[i * tokens]), int(columns[(i + 1) * tokens - 1])
            after = positions > end
            later = torch.where(image[row] & after, positions, ids.shape[1]).amin()
            words.append(embed(ids[row][after & (positions < later) & valid[row]]))
        return words


__all__ = ["PromptStash"]

"""The small LLaVA trained on the synthetic scenes (policyc.vqa.scenes), and how samples become batches.

Shapes: a CLIP tower on 96x96 images in 8x8 patches (a 12x12 grid: 144 image tokens after LLaVA drops
CLS), 4 layers of width 128; a 2-layer projector; a 32-layer Llama of width 96 (so the standard library's
layer indices exist, as on LLaVA-1.5-7B); the embedded default's byte-level tokenizer and chat template.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from policyc.models.default import PATCH_SIZE, SPECIAL_TOKENS, VOCAB_SIZE, default_processor
from policyc.vqa.scenes import IMAGE_SIZE, Sample

IGNORE = -100  # label of tokens the loss skips


def vqa_config() -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_hidden_layers=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=128)
    text = LlamaConfig(hidden_size=96, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2,
                       num_hidden_layers=32, vocab_size=VOCAB_SIZE, max_position_embeddings=1024,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=SPECIAL_TOKENS.index("<image>"),
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2, pad_token_id=0)


def vqa_processor() -> Any:
    return default_processor(IMAGE_SIZE)


def prompt_text(processor: Any, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def answer_ids(processor: Any, answer: str) -> list[int]:
    """The tokens the model must generate: ' ANSWER' then end of sequence."""
    tokenizer = processor.tokenizer
    return [*tokenizer(" " + answer, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


def training_batch(processor: Any, batch: Sequence[Sample]) -> dict[str, torch.Tensor]:
    """Prompt and answer tokens, padded on the right (so positions match generation's), with labels on the
    answer tokens only."""
    rows, labels = [], []
    for item in batch:
        prompt = processor(images=item.scene.render(), text=prompt_text(processor, item.question),
                           return_tensors="pt")["input_ids"][0].tolist()
        answer = answer_ids(processor, item.answer)
        rows.append(prompt + answer)
        labels.append([IGNORE] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    pad = processor.tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    label_ids = torch.tensor([x + [IGNORE] * (width - len(x)) for x in labels])
    pixels = processor.image_processor([s.scene.render() for s in batch], return_tensors="pt")["pixel_values"]
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixels, "labels": label_ids}

"""The small LLaVA trained on the synthetic scenes (policyc.vqa.scenes), its tokenizer, and training batches.

Shapes: a CLIP tower on 96x96 images in 8x8 patches (a 12x12 grid: 144 image tokens after LLaVA drops
CLS), 24 layers of width 64 like LLaVA-1.5's CLIP ViT-L (so the standard library's encoder layer indices
exist); a 2-layer projector; an 8-layer Llama of width 64 (the standard library writes layers that scale with
the model relative to its depth: PyramidDrop's quarters are layers 1, 3, 5 here). The tokenizer is word level
(every word of the task is one token, unknown words are `<unk>`), lower-cased, with the embedded default's chat
template `USER: <image>\\n{question} ASSISTANT:`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from policyc.models.random_tiny import CHAT_TEMPLATE, PATCH_SIZE
from policyc.vqa.scenes import IMAGE_SIZE, Scene, vocabulary

IGNORE = -100  # label of tokens the loss skips
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<image>", "<unk>")  # ids 0..4
ROLE_WORDS = ("user", "assistant", ":")  # the chat template's words (lower-cased)
IMAGE_TOKEN_ID = SPECIAL_TOKENS.index("<image>")
# Llama's and the projector's init std: 1/sqrt(width) for width 64. Their default 0.02 suits widths in the
# thousands; at 64 every projection shrinks signals about 6x, and the image barely reaches the answer (measured:
# a 2+2-layer model stayed at the answer priors for 1500 steps with 0.02, and learned with 0.125).
INIT_STD = 0.125
# Attention heads of 32 dimensions with RoPE base 1e6: at 16 dimensions and base 1e4 only 3 of 8 rotary pairs
# turn less than a radian across the ~170 positions of a prompt, too few for an answer token to find an image
# token by its content wherever it lies.
HEAD_DIM = 32
ROPE_THETA = 1e6


def vocab() -> list[str]:
    """Every token: the special ones, the chat template's words, then the task's words."""
    return [*SPECIAL_TOKENS, *ROLE_WORDS, *vocabulary()]


def vqa_config(vision_layers: int = 24, text_layers: int = 8) -> Any:
    """The shipped shape (24 CLIP and 8 Llama layers); other depths for experiments (scripts/train_vqa.py)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                              num_hidden_layers=vision_layers,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=64)
    size = len(vocab())
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=HEAD_DIM, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
                       num_hidden_layers=text_layers, vocab_size=size + (-size) % 16, max_position_embeddings=1024,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=INIT_STD)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2, pad_token_id=0, initializer_range=INIT_STD)


def vqa_tokenizer() -> Any:
    """A word-level tokenizer over `vocab()`: lower-cases, splits on spaces and punctuation; `<s>` first."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab())}, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                             special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left", chat_template=CHAT_TEMPLATE)


def vqa_processor() -> Any:
    """A `LlavaProcessor`: CLIP preprocessing at 96x96 and the word-level tokenizer."""
    import transformers

    image_processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    images = image_processor(size={"shortest_edge": IMAGE_SIZE},
                             crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return transformers.LlavaProcessor(image_processor=images, tokenizer=vqa_tokenizer(), patch_size=PATCH_SIZE,
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                       chat_template=CHAT_TEMPLATE)


def prompt_text(processor: Any, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def _words(processor: Any, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def training_batch(processor: Any, scenes: Sequence[tuple[Scene, Sequence[tuple[str, str]]]]
                   ) -> dict[str, torch.Tensor]:
    """One row per scene: the first question exactly as at inference (the chat template's prompt), its
    answer and `</s>`, then each further question as `USER: question ASSISTANT: answer </s>` (more answers
    supervised per image for the same encoder cost). Padded on the right (positions match generation's);
    labels on the answer and `</s>` tokens only.

    Returns input_ids, attention_mask, labels [rows, width] and pixel_values [rows, 3, 96, 96]."""
    eos = processor.tokenizer.eos_token_id
    rows, labels = [], []
    for scene, questions in scenes:
        prompt = processor(images=scene.render(), text=prompt_text(processor, questions[0][0]),
                           return_tensors="pt")["input_ids"][0].tolist()
        row, label = prompt, [IGNORE] * len(prompt)
        for turn, (question, answer) in enumerate(questions):
            if turn:
                asked = _words(processor, f"USER: {question} ASSISTANT:")
                row, label = row + asked, label + [IGNORE] * len(asked)
            said = [*_words(processor, answer), eos]
            row, label = row + said, label + said
        rows.append(row)
        labels.append(label)
    width = max(len(r) for r in rows)
    pad = processor.tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    label_ids = torch.tensor([x + [IGNORE] * (width - len(x)) for x in labels])
    pixels = processor.image_processor([scene.render() for scene, _ in scenes], return_tensors="pt")["pixel_values"]
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixels, "labels": label_ids}

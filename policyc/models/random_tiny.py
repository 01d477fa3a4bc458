"""The random embedded model (`policyc:random`): a tiny LLaVA with random weights and a processor, built
locally in a second.

Nothing is downloaded. The weights come from a fixed seed, so every build is the same model; they
are random, so the text it generates is noise: it exists to test the compiler end to end (tokens
kept per stage, timings, `--show-tokens`) on any machine and fast; policyc.models.bundled names it and
the trained `policyc:default`. Shapes:

- vision: CLIP, 64x64 images in 8x8 patches (an 8x8 grid, 64 patches + CLS), 24 layers
  like LLaVA-1.5's CLIP ViT-L (so the standard library's encoder layer indices exist), hidden 64;
  LLaVA's "default" strategy drops CLS: 64 image tokens per image.
- LLM: a 32-layer Llama like LLaVA-1.5-7B's (but hidden 64, 4 heads, 2 key/value heads), so the
  standard library's layer indices (FastV's 1, PyramidDrop's 7, 15, 23 and their next layers) exist.
- tokenizer: byte level (one token per UTF-8 byte) built with `tokenizers`, plus `<pad>`, `<s>`,
  `</s>` and `<image>`; its chat template writes `USER: <image>\\n{prompt} ASSISTANT:` (the tokenizer adds `<s>`).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch

SEED = 0
IMAGE_SIZE = 64
PATCH_SIZE = 8
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<image>")  # ids 0..3; bytes follow from id 4
VOCAB_SIZE = 272  # 4 special tokens + 256 bytes, rounded up to a multiple of 16
BANNER = ("policyc:random has RANDOM weights (seed 0): its text is noise. "
          "It shows what a policy keeps and what it costs, not what a trained model answers.")


def chat_template(image_token: str = "<image>") -> str:
    """A chat template writing `USER: {image_token}\\n{prompt} ASSISTANT:` (one image item, then the text)."""
    return ("{% for message in messages %}{{ message['role'] | upper }}: "
            "{% for item in message['content'] %}{% if item['type'] == 'image' %}" + image_token + "\n"
            "{% else %}{{ item['text'] }}{% endif %}{% endfor %} {% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


CHAT_TEMPLATE = chat_template()


def random_config() -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=24,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=64)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                       num_hidden_layers=32, vocab_size=VOCAB_SIZE, max_position_embeddings=1024,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=SPECIAL_TOKENS.index("<image>"),
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2, pad_token_id=0)


def random_model(device: str | torch.device = "cpu", *, banner: bool = True) -> Any:
    """The tiny LLaVA with weights drawn from a fixed seed (the global RNG is left as it was).

    Prints `BANNER` to stderr unless `banner` is false: its weights are random."""
    from transformers import LlavaForConditionalGeneration

    if banner:
        print(f"note: {BANNER}", file=sys.stderr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlavaForConditionalGeneration._from_config(random_config(), attn_implementation="sdpa",
                                                           dtype=torch.float32)
    model.generation_config.pad_token_id = 0
    model.generation_config.bos_token_id = 1
    model.generation_config.eos_token_id = 2
    return model.to(device).eval()


def random_tokenizer(extra_tokens: Sequence[str] = (), named_tokens: Mapping[str, str] | None = None,
                     template: str = CHAT_TEMPLATE) -> Any:
    """A byte-level tokenizer: every UTF-8 byte is one token; `<image>` and the others are special.

    `extra_tokens` (a family's markers, e.g. `<start_of_image>`) are special tokens too, with ids from 260 on in
    order; `named_tokens` names some of them as the family's processor reads them (`{"image_token": ...}` gives
    `tokenizer.image_token` and `tokenizer.image_token_id`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({char: len(SPECIAL_TOKENS) + index for index, char in enumerate(sorted(alphabet))})
    vocab.update({token: len(vocab) + index for index, token in enumerate(extra_tokens)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([*SPECIAL_TOKENS, *extra_tokens])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                             special_tokens=[("<s>", 1)])
    named = {"extra_special_tokens": dict(named_tokens)} if named_tokens else {}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", padding_side="left", chat_template=template, **named)


def random_processor(image_size: int = IMAGE_SIZE) -> Any:
    """A `LlavaProcessor`: CLIP image preprocessing at `image_size` pixels square and the byte-level tokenizer."""
    import transformers

    # transformers >= 5.2x names the PIL-only processor CLIPImageProcessorPil (no torchvision needed)
    image_processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    images = image_processor(size={"shortest_edge": image_size}, crop_size={"height": image_size,
                                                                               "width": image_size})
    return transformers.LlavaProcessor(image_processor=images, tokenizer=random_tokenizer(), patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


__all__ = ["BANNER", "CHAT_TEMPLATE", "chat_template", "random_config", "random_model", "random_processor",
           "random_tokenizer"]

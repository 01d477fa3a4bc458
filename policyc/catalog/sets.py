"""Token sets a policy can name without defining them."""

from policyc.catalog.base import Registry, Spec

ENCODER = frozenset({"encoder", "projector"})
LLM = frozenset({"llm"})

SETS = Registry("set", "token set")
SETS.add(
    Spec("vision", "set", "the image tokens (patches in the encoder, image features in the LLM)", returns="set"),
    Spec("all", "set", "every token at the stage", returns="set"),
    Spec("cls", "set", "the encoder's CLS token (compile fails on models without one)", returns="set",
         stages=ENCODER),
    Spec("text", "set", "the text tokens after the first image (the question)", returns="set", stages=LLM),
    Spec("system", "set", "the tokens before the first image (system prompt)", returns="set", stages=LLM),
    Spec("last", "set", "the last prompt token", returns="set", stages=LLM),
    Spec("last_instruction", "set", "the last token of the user's instruction, before the assistant prefix",
         returns="set", stages=LLM),
    Spec("raters", "set", "text tokens whose relevance to the image is above the mean (SparseVLM raters)",
         returns="set", stages=LLM),
    Spec("dropped", "set", "tokens dropped by the earlier statements of this stage", returns="set",
         stages=frozenset({"encoder", "projector", "llm"})),
)

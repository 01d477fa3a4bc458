"""The `policyc_synthetic` lmms-eval tasks: policyc's synthetic visual questions (policyc.vqa.scenes), scored as
`policyc eval` scores them (the first word of the answer, lower case, without punctuation, against the reference).

A document is {"split", "index", "question", "answer", "kind"}; its image is rendered from (split, index), the same on
every machine. `python utils.py` rewrites the data files from the generator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from policyc.vqa.accuracy import normalize
from policyc.vqa.scenes import sample

FILES = {"test.jsonl": ("test", 500), "validation.jsonl": ("validation", 200)}  # as policyc eval and search default


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    return [sample(doc["split"], doc["index"]).scene.render()]


def doc_to_text(doc: dict[str, Any]) -> str:
    return doc["question"]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"exact_match": float(normalize(results[0]) == normalize(doc["answer"]))}


def documents(split: str, count: int) -> list[dict[str, Any]]:
    """The first `count` samples of `split` as documents."""
    return [{"split": split, "index": i, "question": s.question, "answer": s.answer, "kind": s.kind}
            for i, s in ((i, sample(split, i)) for i in range(count))]


if __name__ == "__main__":
    for name, (split, count) in FILES.items():
        path = Path(__file__).with_name(name)
        path.write_text("".join(json.dumps(d) + "\n" for d in documents(split, count)))
        print(f"wrote {path} ({count} documents)")

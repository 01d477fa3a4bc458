"""Train the small LLaVA (policyc.vqa.model) on synthetic scenes; deterministic for a given seed and device.

    python scripts/train_vqa.py --out runs/v24t8 --text-layers 8 --pretrain-vision 600 --steps 6500 --lr 2e-3
    python scripts/train_vqa.py --out runs/v24t8 ... --resume          # after an interruption
    python scripts/train_vqa.py --out runs/full --text-layers 32 --grow-from runs/v24t8/model --steps 0   # stacked

(docs/howto/evaluate.md gives the run that shipped and its curve).

Each training row is one scene with up to five questions (policyc.vqa.scenes.scene_questions): the first
as at inference, the others as further chat turns.

Writes DIR/model (save_pretrained: config, safetensors weights, processor) whenever validation accuracy
matches or beats its best, DIR/checkpoint.pt (everything --resume needs) at every evaluation, and
DIR/log.jsonl (step, loss, validation accuracy per kind, seconds). Training batches are a function of the
step, so a resumed run sees the batches the interrupted one would have.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

from policyc.vqa.accuracy import accuracy
from policyc.vqa.model import training_batch, vqa_config, vqa_processor
from policyc.vqa.scenes import samples, scene_questions

RESIDUAL_OUTPUTS = ("out_proj", "fc2", "o_proj", "down_proj")  # each block's projections into the residual stream
LAYER_KEY = re.compile(r"^(.*\.layers\.)(\d+)\.(.*)$")  # prefix of a layer list, layer index, rest


def identity_init(model: torch.nn.Module) -> None:
    """Zero each residual block's output projections (CLIP out_proj/fc2, Llama o_proj/down_proj) so the deep,
    narrow stacks start as identity maps and the image reaches the answer from the first step (SkipInit,
    De & Smith 2020); without it the model sits on the answer priors for hundreds of steps."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in RESIDUAL_OUTPUTS:
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()


def thumbnail_init(model: torch.nn.Module) -> None:
    """Start the patch embedding as a colour thumbnail: output channel 3k + c is the mean of colour c over the
    k-th 2x2-pixel block of a 4x4 grid of the patch (48 channels for patch 8 and width >= 48); the other
    channels keep their random init. Each image token then starts out holding its patch's coarse picture,
    which shapes and colours can be read from, instead of a random projection of it."""
    conv = next(m for name, m in model.named_modules() if name.endswith("patch_embedding"))
    out_channels, _, size, _ = conv.weight.shape
    block = size // 4
    with torch.no_grad():
        for k in range(min(16, out_channels // 3)):
            row, column = divmod(k, 4)
            rows, columns = slice(row * block, (row + 1) * block), slice(column * block, (column + 1) * block)
            for c in range(3):
                conv.weight[3 * k + c].zero_()
                conv.weight[3 * k + c, c, rows, columns] = 1 / block**2


PATCH_TARGETS = {"color": 7, "kind": 4, "centre": 2, "cell": 9}  # Scene.patch_labels: classes per target


def pretrain_vision(model: torch.nn.Module, processor: object, steps: int, batch: int, lr: float) -> None:
    """Pretrain the vision tower alone, as LLaVA starts from a pretrained CLIP: linear heads on the features
    LLaVA takes (hidden_states[-2] without CLS, [B, 144, width]) predict each patch's shape colour, shape kind,
    whether a shape's centre lies in it, and its layout cell (Scene.patch_labels). The heads are dropped after."""
    tower = model.model.vision_tower
    device = next(tower.parameters()).device
    width = tower.config.hidden_size
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, n) for k, n in PATCH_TARGETS.items()}).to(device)
    optimizer = torch.optim.AdamW([*tower.parameters(), *heads.parameters()], lr=lr, weight_decay=0.05)
    for step in range(steps):
        scenes = [scene_questions("train", step * batch + row)[0] for row in range(batch)]
        pixels = processor.image_processor([s.render() for s in scenes], return_tensors="pt")["pixel_values"]
        features = tower(pixels.to(device), output_hidden_states=True).hidden_states[-2][:, 1:]
        labels = [scene.patch_labels() for scene in scenes]
        loss, correct = torch.zeros((), device=device), {}
        for name, head in heads.items():
            target = torch.tensor([label[name] for label in labels], device=device)
            logits = head(features)
            loss = loss + torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
            correct[name] = round((logits.argmax(-1) == target).float().mean().item(), 4)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tower.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0 or step + 1 == steps:
            print(json.dumps({"vision_step": step + 1, "loss": round(loss.item(), 4), "patch_accuracy": correct}),
                  flush=True)


def stack_layers(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Load a shallower trained model into a deeper one of the same widths, computing the same function
    (Net2DeeperNet, Chen et al. 2016, with the copies of progressive stacking, Gong et al. 2019): target
    layer j of a stack of depth D is a copy of source layer floor(j * d / D) of depth d; in each run of copies
    only the last writes to the residual stream, the others have their residual output projections zeroed
    (identity blocks whose attention starts as the source layer's). With the live copy last, the penultimate
    hidden state LLaVA reads from the vision tower is the source's too. Everything else is copied."""
    weights = source.state_dict()

    def depths(keys: Iterable[str]) -> dict[str, int]:
        found: dict[str, int] = defaultdict(int)
        for key in keys:
            if match := LAYER_KEY.match(key):
                found[match[1]] = max(found[match[1]], int(match[2]) + 1)
        return found

    shallow, deep = depths(weights), depths(target.state_dict())
    stacked = {}
    for key in target.state_dict():
        match = LAYER_KEY.match(key)
        if match is None:
            stacked[key] = weights[key]
            continue
        prefix, index, rest = match[1], int(match[2]), match[3]
        origin = index * shallow[prefix] // deep[prefix]
        value = weights[f"{prefix}{origin}.{rest}"]
        last_copy = index == -(-(origin + 1) * deep[prefix] // shallow[prefix]) - 1  # ceil((origin + 1) D / d) - 1
        stacked[key] = value if last_copy or rest.split(".")[-2] not in RESIDUAL_OUTPUTS else torch.zeros_like(value)
    target.load_state_dict(stacked)


def save_model(model: torch.nn.Module, processor: object, directory: Path) -> None:
    """What `from_pretrained` loads: config, safetensors weights, tokenizer and processor."""
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def validate(model: torch.nn.Module, processor: object, validation: list) -> dict:
    """Validation accuracy, overall and per question kind."""
    model.eval()
    score, answered = accuracy(model, processor, validation, batch_size=64)
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for item in answered:
        by_kind[item.sample.kind].append(item.correct)
    return {"accuracy": score, "by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-samples", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vision-layers", type=int, default=24)
    parser.add_argument("--text-layers", type=int, default=8)
    parser.add_argument("--pretrain-vision", type=int, default=0, metavar="STEPS",
                        help="first train the vision tower alone on per-patch scene labels for STEPS steps")
    parser.add_argument("--freeze-vision", action="store_true",
                        help="keep the vision tower fixed (implied by --pretrain-vision)")
    parser.add_argument("--grow-from", type=Path,
                        help="start from this shallower trained model (DIR/model), its layers stacked to full depth")
    parser.add_argument("--resume", action="store_true",
                        help="continue from DIR/checkpoint.pt (weights, optimizer, schedule, step, best accuracy)")
    parser.add_argument("--identity-init", action=argparse.BooleanOptionalAction, default=True,
                        help="zero the output projection of every attention and MLP block (each starts as identity)")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    processor = vqa_processor()
    config = vqa_config(args.vision_layers, args.text_layers)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa",
                                                       dtype=torch.float32).to(args.device)
    if args.grow_from:
        stack_layers(LlavaForConditionalGeneration.from_pretrained(args.grow_from, dtype=torch.float32), model)
    elif args.identity_init:
        identity_init(model)
        thumbnail_init(model)
    if args.pretrain_vision and not args.resume:
        pretrain_vision(model, processor, args.pretrain_vision, args.batch, args.lr)
    if args.pretrain_vision or args.freeze_vision:  # LLaVA trains the projector and LLM on a frozen CLIP
        model.model.vision_tower.requires_grad_(False)
    for key, value in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):
        setattr(model.generation_config, key, value)
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.ndim >= 2]
    rest = [p for p in trained if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.98))

    def rate(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, args.steps - args.warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    args.out.mkdir(parents=True, exist_ok=True)
    log = (args.out / "log.jsonl").open("a")
    validation = list(samples("validation", args.eval_samples))
    best, losses, start, first = -1.0, [], time.time(), 0
    checkpoint = args.out / "checkpoint.pt"
    if args.resume:
        state = torch.load(checkpoint, map_location=args.device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        first, best = state["step"], state["best"]
        torch.set_rng_state(state["rng"])
    if args.grow_from and not args.resume:  # what stacking kept, saved before any training at full depth
        record = {"step": 0, **validate(model, processor, validation)}
        print(json.dumps(record), flush=True)
        best = record["accuracy"]
        save_model(model, processor, args.out / "model")
    for step in range(first, args.steps):
        model.train()
        batch = training_batch(processor, [scene_questions("train", step * args.batch + row)
                                           for row in range(args.batch)])
        batch = {k: v.to(args.device) for k, v in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(loss.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            record = {"step": step + 1, "loss": sum(losses) / len(losses), **validate(model, processor, validation),
                      "seconds": round(time.time() - start, 1)}
            losses = []
            print(json.dumps(record), flush=True)
            log.write(json.dumps(record) + "\n")
            log.flush()
            score = record["accuracy"]
            if score >= best:  # ties: the later, longer-trained weights
                best = score
                save_model(model, processor, args.out / "model")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "step": step + 1, "best": best,
                        "rng": torch.get_rng_state()}, checkpoint)


if __name__ == "__main__":
    main()

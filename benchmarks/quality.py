"""Quality of one model on a recipe's held-out split: the loss and perplexity of the reference answers, and the
exact-match accuracy of greedy answers (the task score).

    python -m benchmarks.quality --config CONFIG [overrides ...] [--trained RUN/final] --out FILE.json

Without ``--trained`` it scores the recipe's base model before fine-tuning. With it, the trained model is
rebuilt as it was trained: the full model from its directory, or the base (4-bit for QLoRA, built by the same
code as training) with the adapter on top.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ftcluster import config as C
from ftcluster import models, plan, sources
from ftcluster.data import formatting, reading
from ftcluster.hardware import Hardware


SAY = "scoring: "


def normalize(answer: str) -> str:
    """Exact match forgives surrounding whitespace, a trailing full stop and backticks; nothing else."""
    return " ".join(answer.replace("`", "").strip().rstrip(".").split())


def load_model(cfg: C.RunConfig, trained: Path | None, device: torch.device):
    from transformers import AutoModelForCausalLM

    if trained is not None and cfg.method == "full":
        model = AutoModelForCausalLM.from_pretrained(trained, dtype=models.DTYPES[cfg.model.dtype],
                                                     device_map={"": device})
    else:
        base_cfg = cfg if trained is not None else cfg.model_copy(update={"method": "full"})
        hw = Hardware(device=device.type, device_source="the scoring device")
        model = models.build_base_model(base_cfg, plan.make(base_cfg, hw, read_data=False), device)
        if trained is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, trained)
    model.config.use_cache = True
    return model.eval()


@torch.no_grad()
def answer_loss(model, tokenizer, examples: list[dict], cfg: C.RunConfig, device, batch_size: int) -> float:
    """Token-weighted cross-entropy of the reference answers given their prompts, one unpacked row each."""
    total, count = 0.0, 0
    rows = [formatting.tokenize_example(tokenizer, ex, cfg.data) for ex in examples]
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), formatting.IGNORE, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, r in enumerate(chunk):
            n = len(r["input_ids"])
            ids[j, :n], labels[j, :n], mask[j, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        target = labels[:, 1:].to(device)
        total += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), target.flatten(), ignore_index=formatting.IGNORE,
                                 reduction="sum").item()
        count += int((target != formatting.IGNORE).sum())
    return total / max(count, 1)


@torch.no_grad()
def greedy_answers(model, tokenizer, examples: list[dict], cfg: C.RunConfig, device, batch_size: int) -> list[str]:
    tokenizer.padding_side = "left"  # generation continues from the right edge of every prompt
    prompts = [formatting.prompt_text(tokenizer, ex, cfg.data) for ex in examples]
    longest = max(len(tokenizer(ex["output"], add_special_tokens=False)["input_ids"]) for ex in examples)
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(device)
        # Stop at any special token: chat models end a turn with their own marker (SmolLM2: <|im_end|>), which
        # need not be the tokenizer's eos; without this the model runs on into an imagined next turn.
        gen = model.generate(**enc, do_sample=False, max_new_tokens=longest + 2, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=sorted(special_tokens(tokenizer).values()))
        out += [first_turn(tokenizer, text) for text in
                tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=False)]
        say(f"answers {len(out)}/{len(prompts)}")
    return out


def say(line: str) -> None:
    """A progress line; benchmarks.compare echoes the lines that start with ``scoring:``."""
    print(f"{SAY}{line}", flush=True)


def special_tokens(tokenizer) -> dict[str, int]:
    """Every special token, by text. Read from the added-token table, because ``all_special_tokens`` leaves out
    chat markers in some transformers versions (seen with 5.17: SmolLM2's <|im_end|> missing)."""
    out = {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for name in ("eos_token", "pad_token"):
        token = getattr(tokenizer, name, None)
        if token:
            out[token] = tokenizer.convert_tokens_to_ids(token)
    return out


def first_turn(tokenizer, text: str) -> str:
    """The answer up to the first special token (end of turn, end of text, padding)."""
    cut = min((i for i in (text.find(t) for t in special_tokens(tokenizer)) if i >= 0), default=len(text))
    return text[:cut]


def score(cfg: C.RunConfig, trained: Path | None, max_examples: int | None, batch_size: int) -> dict:
    started = time.perf_counter()
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    tokenizer = sources.load_tokenizer(cfg.model)
    examples = reading.load_examples(cfg.data, cfg.training.seed).evaluation
    examples = examples[:max_examples] if max_examples else examples
    if not examples:
        raise SystemExit(f"data.source {cfg.data.source} has no held-out examples to score")
    torch.manual_seed(cfg.training.seed)  # a random-init base comes out as the worker built it
    say(f"loading {trained or 'the base model ' + cfg.model.name_or_path} on {device}")
    model = load_model(cfg, trained, device)
    say(f"{trained or 'the base model'} loaded in {time.perf_counter() - started:.1f} s; {len(examples)} held-out "
        "examples")
    loss = answer_loss(model, tokenizer, examples, cfg, device, batch_size)
    say(f"answer loss {loss:.4f} ({time.perf_counter() - started:.1f} s); generating answers")
    answers = greedy_answers(model, tokenizer, examples, cfg, device, batch_size)
    hits = [normalize(a) == normalize(ex["output"]) for a, ex in zip(answers, examples)]
    say(f"{sum(hits)}/{len(hits)} answers match ({time.perf_counter() - started:.1f} s)")
    return {
        "eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "task_score": sum(hits) / len(hits),
        "eval_examples": len(examples), "quality_time_s": round(time.perf_counter() - started, 1),
        "samples": [{"prompt": ex["instruction"], "input": ex.get("input") or "", "reference": ex["output"],
                     "answer": a, "match": h}
                    for ex, a, h in list(zip(examples, answers, hits))[:5]],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--trained", type=Path, help="a run's final/ directory; without it, the base model is scored")
    p.add_argument("--max-examples", type=int)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = C.load(args.config, args.overrides)
    result = score(cfg, args.trained, args.max_examples, args.batch_size)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}))


if __name__ == "__main__":
    main()

"""Model directories that hold only an architecture (config.json + a tokenizer) for well-known model shapes, so
speed and memory can be measured with ``model.random_init=true`` where no weights can be downloaded. Their
tokenizer is a small BPE trained here on the builtin datasets (no hub): its ids fit every shape's vocabulary.

    python -m benchmarks.shapes llama-2-7b /tmp/shapes/llama-2-7b --tokenizer DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ftcluster.presets import PRESETS

SHAPES = PRESETS  # the architectures the memory estimator knows


CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def corpus() -> list[str]:
    from ftcluster import pydoc_data

    train, evaluation = pydoc_data.build(0.1)
    return [e["instruction"] + " " + e["output"] for e in train + evaluation]


def build_tokenizer(out: Path, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    return fast


def ensure(shape: str, root: Path) -> Path:
    """``root/<shape>``, written once (with its tokenizer) and reused."""
    out = root / shape
    if not (out / "config.json").exists():
        tok_dir = root / "tokenizer"
        if not (tok_dir / "tokenizer.json").exists():
            build_tokenizer(tok_dir, vocab_size=2048)
        write(shape, out, tok_dir)
    return out


def write(shape: str, out: Path, tokenizer: str | Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer)
    cfg = LlamaConfig(**SHAPES[shape], pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("out", type=Path)
    p.add_argument("--tokenizer", required=True, help="a tokenizer directory (its vocabulary must fit the shape)")
    args = p.parse_args()
    print(write(args.shape, args.out, args.tokenizer))


if __name__ == "__main__":
    main()

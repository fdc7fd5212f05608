"""Model directories that hold only an architecture (config.json + a tokenizer) for well-known model shapes, so
speed and memory can be measured with ``model.random_init=true`` where no weights can be downloaded. Their
tokenizer is a small BPE trained here on the builtin datasets (no hub): its ids fit every shape's vocabulary.

    python -m benchmarks.shapes llama-2-7b /tmp/shapes/llama-2-7b --tokenizer DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=500000.0),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096),
    "llama-1-33b": dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52,
                        num_key_value_heads=52, vocab_size=32000, max_position_embeddings=2048),
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
}


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

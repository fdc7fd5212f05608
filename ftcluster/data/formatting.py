"""Formatting and tokenizing: an example (alpaca, chat or plain text) rendered through the tokenizer's chat template
(or the alpaca template), tokenized, and labelled: -100 on the prompt's tokens unless ``data.train_on_prompt``, and
on every example's first token."""

from __future__ import annotations

from ftcluster.config import DataConfig

IGNORE = -100
ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_TEMPLATE_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def alpaca_messages(ex: dict) -> list[dict]:
    user = ex["instruction"] if not ex.get("input") else f"{ex['instruction']}\n\n{ex['input']}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": ex["output"]}]


def prompt_text(tokenizer, ex: dict, cfg: DataConfig) -> str:
    """The prompt a model sees before its answer (used for training and for generation at eval)."""
    if tokenizer.chat_template:
        msgs = alpaca_messages(ex)[:1] if cfg.format == "alpaca" else ex[cfg.messages_field][:-1]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    template = ALPACA_TEMPLATE_INPUT if ex.get("input") else ALPACA_TEMPLATE
    return template.format(**ex)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _chat_pieces(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation split into (text, is_target) pieces: each assistant turn (with its end-of-turn
    marker) is a target; everything else, including the assistant header, is prompt."""
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    pieces, done = [], ""
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = render(messages[:i], True)
        upto = render(messages[: i + 1], False)
        if not (before.startswith(done) and upto.startswith(before)):
            raise ValueError("the tokenizer's chat template does not render conversations prefix by prefix")
        pieces += [(before[len(done):], False), (upto[len(before):], True)]
        done = upto
    full = render(messages, False)
    if len(full) > len(done):
        pieces.append((full[len(done):], False))
    return pieces


def tokenize_example(tokenizer, ex: dict, cfg: DataConfig) -> dict:
    """input_ids and labels; labels are -100 on prompt tokens unless ``train_on_prompt``."""
    if cfg.format == "text":
        pieces = [(ex[cfg.text_field] + (tokenizer.eos_token or ""), True)]
    elif cfg.format == "chat" and not tokenizer.chat_template:
        raise ValueError(f"data.format=chat: the tokenizer ({tokenizer.name_or_path}) has no chat template to render "
                         "the conversations with. Set model.tokenizer to one that has one (an instruct or chat "
                         "model's), or write the rows in alpaca or text format.")
    elif tokenizer.chat_template:
        msgs = alpaca_messages(ex) if cfg.format == "alpaca" else ex[cfg.messages_field]
        pieces = _chat_pieces(tokenizer, msgs)
    else:
        pieces = [(prompt_text(tokenizer, ex, cfg), False), (ex["output"] + (tokenizer.eos_token or ""), True)]
    input_ids, labels = [], []
    for text, target in pieces:
        ids = _ids(tokenizer, text)
        input_ids += ids
        labels += ids if (target or cfg.train_on_prompt) else [IGNORE] * len(ids)
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        input_ids, labels = [tokenizer.bos_token_id] + input_ids, [IGNORE] + labels
    length = len(input_ids)
    input_ids, labels = input_ids[: cfg.max_seq_len], labels[: cfg.max_seq_len]
    labels[0] = IGNORE  # never predict an example's first token from whatever precedes it in a packed row
    return {"input_ids": input_ids, "labels": labels, "length": length}

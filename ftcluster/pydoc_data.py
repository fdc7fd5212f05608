"""Offline instruction datasets made from the Python standard library's own documentation and signatures.

``builtin:pydoc``: each example asks what a public function or class of a stdlib module does, given its signature, and the answer
is the first sentence of its docstring. It is deterministic for a given Python version, needs no download, and a
small pretrained model answers it poorly before fine-tuning (it must recall the docstring's exact wording).
The held-out split is chosen by a hash of the qualified name, and answers are deduplicated across the whole set,
so no eval answer is also a train answer.

``builtin:required-args``: each example shows a public callable's signature and asks which parameters every
call must pass (no default, not ``*args``/``**kwargs``); the answer is their names in order, comma-separated, or
``none``. The answer follows from the prompt, so a model can learn the task and be scored by exact match on
held-out callables it never saw; before fine-tuning a small instruct model answers in prose and scores ~0.
Split by the same hash; a name + signature seen under two modules is kept once, so no eval prompt is in train.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re

MODULES = (
    "abc argparse array base64 bisect calendar cmath collections colorsys contextlib copy csv datetime decimal "
    "difflib enum fnmatch fractions functools glob gzip hashlib heapq hmac html http.client io ipaddress "
    "itertools json logging math mimetypes operator os os.path pathlib pickle platform pprint queue random re "
    "secrets shlex shutil socket statistics string struct subprocess tarfile tempfile textwrap threading time "
    "timeit tokenize traceback types typing unicodedata urllib.parse uuid warnings weakref zipfile zlib"
).split()

_SENTENCE = re.compile(r"^(.+?[.!?])(\s|$)", re.S)


def _first_sentence(doc: str) -> str | None:
    para = inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ").strip()
    m = _SENTENCE.match(para)
    text = (m.group(1) if m else para).strip()
    signature_line = "->" in text or re.match(r"^[\w.]+\(", text)
    if signature_line or not (12 <= len(text) <= 200) or text.startswith(("Return self", "Initialize self")):
        return None
    return text


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


_LITERALS = (type(None), bool, int, float, complex, str, bytes)


def _signature_text(sig: inspect.Signature) -> str:
    """The signature as text, with every default that is not a literal shown as ``...``: the repr of a default
    object can change from process to process (``<function f at 0x7f...>``; ``logging.shutdown``'s list of the
    handlers registered so far, which Ray adds to), and would make the prompts, and so the rows, differ between the
    driver and the workers."""
    params = [p.replace(default=...) if p.default is not p.empty and not isinstance(p.default, _LITERALS) else p
              for p in sig.parameters.values()]
    return _ADDRESS.sub("", str(sig.replace(parameters=params)))


def _signature(obj) -> str:
    try:
        return _signature_text(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def _public_callables(module_name: str):
    """(name, object) for each public function, builtin or class of a stdlib module, in name order."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return
    public = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    for name in sorted(set(public)):
        obj = getattr(module, name, None)
        if inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj):
            yield name, obj


def _split(examples, key, eval_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, eval) by a hash of each example's id, keeping the first example of each ``key(example)``."""
    seen: set[str] = set()
    train, evaluation = [], []
    for ex in examples:
        if key(ex) in seen:
            continue
        seen.add(key(ex))
        (evaluation if held_out(ex["id"], eval_fraction) else train).append(ex)
    return train, evaluation


def _examples_of(module_name: str):
    for name, obj in _public_callables(module_name):
        doc = getattr(obj, "__doc__", None)
        answer = _first_sentence(doc) if isinstance(doc, str) else None
        if answer is None:
            continue
        kind = "class" if inspect.isclass(obj) else "function"
        yield {
            "id": f"{module_name}.{name}",
            "instruction": f"In Python's standard library, what does the {kind} "
                           f"`{module_name}.{name}{_signature(obj)}` do? Answer with one sentence.",
            "input": "",
            "output": answer,
        }


def held_out(example_id: str, eval_fraction: float) -> bool:
    bucket = int(hashlib.sha1(example_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < eval_fraction


def build(eval_fraction: float = 0.1) -> tuple[list[dict], list[dict]]:
    """(train, eval) examples. Answers shared by several names (aliases, re-exports) are kept once."""
    examples = (ex for module_name in MODULES for ex in _examples_of(module_name))
    return _split(examples, lambda ex: ex["output"], eval_fraction)


def _required_args_examples(module_name: str):
    for name, obj in _public_callables(module_name):
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):
            continue
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        required = [p.name for p in sig.parameters.values() if p.default is p.empty and p.kind not in variadic]
        yield {
            "id": f"{module_name}.{name}",
            "instruction": f"Which parameters must every call to `{module_name}.{name}{_signature_text(sig)}` pass? Answer with "
                           "their names separated by commas, or none.",
            "input": "",
            "output": ", ".join(required) or "none",
        }


def build_required_args(eval_fraction: float = 0.1) -> tuple[list[dict], list[dict]]:
    """(train, eval) examples of the required-arguments task; a callable reachable under two names is kept once."""
    examples = (ex for module_name in MODULES for ex in _required_args_examples(module_name))
    # name + signature, without the module: the same callable re-exported elsewhere is one example
    return _split(examples, lambda ex: ex["instruction"].split("`")[1].split(".")[-1], eval_fraction)


BUILDERS = {"builtin:pydoc": build, "builtin:required-args": build_required_args}

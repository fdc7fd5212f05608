"""The peer recipes' own plumbing (benchmarks.hf_baseline): the random-init checkpoint a path-only loader (Unsloth)
trains from, and the stop where Unsloth cannot run. The peers' timings themselves come from the GPU host."""

import sys

import pytest
import torch

from benchmarks import hf_baseline
from ftcluster import config as C
from ftcluster import models, sources


def random_cfg(model_dir):
    return C.load("configs/bench/tiny.yaml", [f"model.name_or_path={model_dir}", "model.random_init=true",
                                              "method=full", "model.config_overrides={}"])


def test_the_random_checkpoint_holds_the_weights_the_hf_recipe_trains_and_is_written_once(tiny_model, tmp_path,
                                                                                          monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    cfg, cpu = random_cfg(tiny_model), torch.device("cpu")
    torch.manual_seed(7)
    path = hf_baseline.random_checkpoint(cfg, cpu)
    torch.manual_seed(7)
    built = hf_baseline.build(cfg, cpu, "hf").state_dict()

    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    assert loaded.keys() == built.keys()
    for name, tensor in built.items():
        assert torch.equal(loaded[name], tensor), name
    assert len(AutoTokenizer.from_pretrained(path)) == len(sources.load_tokenizer(cfg.model))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no partial write left beside it

    def build_again(*args, **kwargs):
        raise AssertionError("the checkpoint was built a second time")

    monkeypatch.setattr(models, "build_module_by_module", build_again)
    assert hf_baseline.random_checkpoint(cfg, cpu) == path


def test_a_different_shape_gets_its_own_random_checkpoint(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    cpu = torch.device("cpu")
    one = hf_baseline.random_checkpoint(random_cfg(tiny_model), cpu)
    cfg = C.load("configs/bench/tiny.yaml", [f"model.name_or_path={tiny_model}", "model.random_init=true",
                                             "method=full", "model.config_overrides={num_hidden_layers: 1}"])
    two = hf_baseline.random_checkpoint(cfg, cpu)
    assert one != two and (two / "config.json").exists()


def test_the_unsloth_recipe_stops_with_what_to_do_where_unsloth_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "unsloth", None)  # what `import unsloth` meets where it is not installed
    with pytest.raises(ImportError, match=r"--recipe unsloth: Unsloth is not importable.*pip install unsloth"):
        hf_baseline.import_unsloth()

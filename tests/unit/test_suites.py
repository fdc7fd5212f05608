"""Every benchmark suite resolves to valid run configs for every method, before anything is run."""

import pytest

from benchmarks import suites
from benchmarks.compare import ROOT
from ftcluster import config as C


@pytest.mark.parametrize("gpu", [False, True])
@pytest.mark.parametrize("name", suites.SUITES)
def test_every_suite_gives_a_valid_config_for_every_method(name, gpu, tmp_path, monkeypatch):
    monkeypatch.setattr(suites, "SHAPES_ROOT", tmp_path / "shapes")
    suite = suites.get(name, gpu)
    for method in suites.METHODS:
        cfg = C.load(ROOT / suite.recipe, suite.overrides(method))
        assert cfg.method == method
        C.load(ROOT / suite.recipe, [*suite.overrides(method), *suite.peer])  # what the HF recipe's runs read
        if not suite.quality:
            assert cfg.model.random_init  # quality n/a is only for weights that mean nothing
    if name == "default" and not gpu:
        assert C.load(ROOT / suite.recipe, suite.overrides("qlora")).scaling.use_gpu is False


def test_an_unknown_suite_names_the_choices():
    with pytest.raises(SystemExit, match="llama-7b"):
        suites.get("llama-8b", False)


def test_the_hf_recipe_keeps_the_checkpointing_our_llama_1b_recipe_leaves_out(tmp_path, monkeypatch):
    """ftcluster checkpoints only where memory needs it; the HF recipe is the tutorials', which checkpoints."""
    monkeypatch.setattr(suites, "SHAPES_ROOT", tmp_path / "shapes")
    suite = suites.get("llama-1b", True)
    for method in ("full", "lora"):
        assert not C.load(ROOT / suite.recipe, suite.overrides(method)).model.gradient_checkpointing
        assert C.load(ROOT / suite.recipe, [*suite.overrides(method), *suite.peer]).model.gradient_checkpointing

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


def test_the_nemo_shape_suite_is_nemo_automodels_published_lora_setting(tmp_path, monkeypatch):
    """Llama-3-8B, LoRA r=16 on every projection, sequence 4096, micro batch 2, no activation checkpointing; for
    ftcluster and the peers alike, and LoRA only unless --methods says otherwise."""
    from benchmarks import compare

    monkeypatch.setattr(suites, "SHAPES_ROOT", tmp_path / "shapes")
    suite = suites.get("nemo-shape", True)
    for overrides in (suite.overrides("lora"), [*suite.overrides("lora"), *suite.peer]):
        cfg = C.load(ROOT / suite.recipe, overrides)
        assert (cfg.method, cfg.data.max_seq_len, cfg.training.micro_batch_size, cfg.lora.r) == ("lora", 4096, 2, 16)
        assert cfg.lora.target_modules == "all-linear" and not cfg.model.gradient_checkpointing
        assert cfg.model.name_or_path == str(tmp_path / "shapes" / "llama-3-8b") and cfg.model.random_init
    assert compare.methods_of(None, suite) == ["lora"]  # the methods the suite lists, unless --methods says
    assert compare.methods_of(None, suites.get("default", True)) == ["full", "lora", "qlora"]
    assert compare.methods_of("qlora,lora", suite) == ["qlora", "lora"]
    with pytest.raises(SystemExit, match="--methods: unknown"):
        compare.methods_of("lora,qlara", suite)

"""Typed configs: keyword options build them, config= takes them, the plan and blockprune.json record them, and
the work directory's resume key is their result-deciding fields."""

import json

import pytest
from conftest import flux_batches, make_flux

import blockprune
from blockprune import CompressConfig, SandwichConfig, ScoringConfig
from blockprune.errors import BlockpruneError

FAST = {"progress": False, "cache_dir": False}


def _fused_weights(model, name):
    return {k: v.clone() for k, v in model.get_submodule(name).state_dict().items()}


def test_keyword_options_and_config_object_give_the_same_compression():
    by_keyword, by_config = make_flux(), make_flux()
    blockprune.compress(by_keyword, ratio=0.5, calibration=flux_batches(6), ridge=1e-3, sandwich_steps=3,
                        sandwich_lr=1e-3, lora_rank=4, heal_steps=0, **FAST)
    config = CompressConfig(ridge=1e-3, sandwich=SandwichConfig(steps=3, lr=1e-3, lora_rank=4, heal_steps=0))
    blockprune.compress(by_config, ratio=0.5, calibration=flux_batches(6), config=config, **FAST)
    plan_k, plan_c = blockprune.plan(by_keyword), blockprune.plan(by_config)
    assert plan_k.replaced_names == plan_c.replaced_names
    assert plan_c.config["ridge"] == 1e-3 and plan_c.config["sandwich"]["lora_rank"] == 4
    assert plan_k.config == plan_c.config
    for name in plan_k.replaced_names:
        for key, value in _fused_weights(by_keyword, name).items():
            assert value.equal(_fused_weights(by_config, name)[key])


def test_keyword_options_override_the_config_fields_they_name():
    config = CompressConfig(ridge=1e-3, scoring=ScoringConfig(ablation="replace"), sandwich=SandwichConfig(steps=7))
    merged = CompressConfig.from_options({"sandwich_steps": 2, "rescore": "each"}, base=config)
    assert (merged.ridge, merged.scoring.ablation, merged.scoring.rescore) == (1e-3, "replace", "each")
    assert (merged.sandwich.steps, merged.sandwich.lr) == (2, SandwichConfig().lr)
    assert (config.sandwich.steps, config.scoring.rescore) == (7, "once")  # the base is left as it was


@pytest.mark.parametrize("options, message", [
    ({"sandwich_step": 5}, "unknown option 'sandwich_step'; did you mean 'sandwich_steps'\\?"),
    ({"ablaton": "remove"}, "did you mean 'ablation'\\?"),
    ({"ridge": -1.0}, "ridge must be a finite number ≥ 0"),
    ({"ridge": float("nan")}, "ridge must be a finite number ≥ 0"),
    ({"score_batches": 0}, "score_batches must be a positive integer"),
    ({"metric_options": [1, 2]}, "metric_options must be a dict"),
    ({"cache_dir": True}, "cache_dir must be a folder path, None or False"),
    ({"lora_targets": "to_q"}, "lora_targets must be a list of module names"),
    ({"ablation": "drop"}, "unknown ablation 'drop'; use one of 'remove', 'replace'"),
])
def test_bad_options_are_refused_before_any_work(options, message):
    with pytest.raises(BlockpruneError, match=message):
        CompressConfig.from_options(options)


def test_the_saved_model_records_its_config(tmp_path):
    model = make_flux()
    blockprune.compress(model, ratio=0.5, calibration=flux_batches(4), sandwich=False, ridge=1e-4,
                        ablation="replace", **FAST)
    blockprune.save_pretrained(model, tmp_path)
    saved = json.loads((tmp_path / "blockprune.json").read_text())["plan"]["config"]
    assert saved["ridge"] == 1e-4 and saved["scoring"]["ablation"] == "replace"
    assert saved["scoring"]["cache_dir"] is False
    assert blockprune.plan(blockprune.from_pretrained(tmp_path)).config == saved


def test_resume_key_leaves_out_what_does_not_change_the_result():
    base = CompressConfig()
    other_place = CompressConfig.from_options({"workdir": "elsewhere", "keep_activations": True, "offload": True,
                                               "cache_dir": False, "sandwich_activation_budget": 1})
    assert other_place.resume_key(sandwich=True) == base.resume_key(sandwich=True)
    assert CompressConfig(ridge=1e-3).resume_key(sandwich=True)["ridge"] == 1e-3
    assert base.resume_key(sandwich=False)["sandwich"] is None


def test_a_workdir_resumes_with_another_activation_budget_but_not_another_ridge(tmp_path):
    options = {"ratio": 0.5, "calibration": flux_batches(6), "sandwich_steps": 2, "heal_steps": 0, "workdir": tmp_path / "w",
               **FAST}
    blockprune.compress(make_flux(), **options)
    again = make_flux()
    blockprune.compress(again, sandwich_activation_budget=2**20, **options)
    assert len(blockprune.plan(again).replaced) == 2
    with pytest.raises(BlockpruneError, match=r"differs in: ridge"):
        blockprune.compress(make_flux(), ridge=1e-2, **options)

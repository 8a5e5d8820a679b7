"""Importance: combination, metrics, ablation modes, orders, rescoring, the cache."""

import pytest
import torch
from conftest import flux_batches, make_flux

import blockprune
from blockprune.errors import BlockpruneError
from blockprune.scoring import Metric, combine_scores, resolve_metrics
from blockprune.scoring.metrics.fid import frechet_distance


class Up(Metric):
    higher_is_better = True


class Down(Metric):
    higher_is_better = False


def test_combination_by_hand():
    values = {"a": {"b0": 10.0, "b1": 20.0, "b2": 30.0}, "b": {"b0": 0.5, "b1": 0.1, "b2": 0.3}}
    scores = combine_scores(values, {"a": 0.5, "b": 0.5}, {"a": Down(), "b": Up()})
    # a (lower better): q = 1, 0.5, 0; b (higher better): q = 1, 0, 0.5
    assert scores == pytest.approx({"b0": -1.0, "b1": -0.25, "b2": -0.25})


def test_ties_keep_data_flow_order_and_constant_metric_changes_nothing():
    values = {"a": {"b0": 1.0, "b1": 3.0, "b2": 1.0}, "c": {"b0": 7.0, "b1": 7.0, "b2": 7.0}}
    alone = combine_scores({"a": values["a"]}, {"a": 1.0}, {"a": Up()})
    with_constant = combine_scores(values, {"a": 0.5, "c": 0.5}, {"a": Up(), "c": Down()})
    assert alone == {"b0": -0.0, "b1": -1.0, "b2": -0.0}
    assert with_constant == {"b0": -0.5, "b1": -1.0, "b2": -0.5}  # constant: quality 1 for every block
    assert sorted(with_constant, key=with_constant.get) == ["b1", "b0", "b2"]


def test_metric_spec_forms_and_bad_weights():
    assert resolve_metrics("output_mse")[0] == {"output_mse": 1.0}
    assert resolve_metrics(["output_mse", "block_influence"])[0] == {"output_mse": 0.5, "block_influence": 0.5}
    assert resolve_metrics({"output_mse": 3, "block_influence": 1})[0] == {"output_mse": 0.75, "block_influence": 0.25}
    with pytest.raises(BlockpruneError, match="importance weight of 'output_mse' is -1.0; weights must be ≥ 0"):
        resolve_metrics({"output_mse": -1, "block_influence": 2})
    with pytest.raises(BlockpruneError, match="weights sum to zero"):
        resolve_metrics({"output_mse": 0})
    with pytest.raises(BlockpruneError, match="unknown importance metric 'mse'; known metrics: block_influence, clip"):
        resolve_metrics("mse")


def test_frechet_distance_closed_form_for_commuting_covariances():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    d1, d2 = torch.rand(6, dtype=torch.float64) + 0.1, torch.rand(6, dtype=torch.float64) + 0.1
    s1, s2 = q @ torch.diag(d1) @ q.T, q @ torch.diag(d2) @ q.T
    mu1, mu2 = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    expected = float(((mu1 - mu2) ** 2).sum() + ((d1.sqrt() - d2.sqrt()) ** 2).sum())
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_is_finite_for_singular_covariances():
    x = torch.randn(3, 10, dtype=torch.float64)  # 3 samples in 10 dimensions: rank 2
    c = (x - x.mean(0)).T @ (x - x.mean(0)) / 2
    value = frechet_distance(x.mean(0), c, x.mean(0) + 1, c * 2)
    assert value == value and value > 0


def _importance(model=None, **kwargs):
    model = make_flux() if model is None else model
    options = {"calibration": flux_batches(3), "progress": False, **kwargs}
    return model, blockprune.importance(model, **options)


class Position(Metric):
    """The block's place in data-flow order (0, 1, ...), read from the intact model; higher is better."""

    name = "position"
    higher_is_better = True
    ablates = False

    def evaluate(self, context, block, state):
        return float([b.name for b in context.blocks].index(block.name))


class PositionPlugin:
    @blockprune.hookimpl
    def blockprune_register_metrics(self, register):
        register(Position())


@pytest.fixture
def position():
    plugin = PositionPlugin()
    blockprune.register_plugin(plugin)
    yield
    blockprune.unregister_plugin(plugin)


def _block_influence_by_hand(model, batches):
    """Per block: the mean over every text and image token of 1 − cos(block input, block output)."""
    distances = {}

    def keep(name):
        def hook(module, args, kwargs, output):
            text, image = output
            for x, y in ((kwargs["encoder_hidden_states"], text), (kwargs["hidden_states"], image)):
                distances.setdefault(name, []).append((1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)).reshape(-1))

        return hook

    names = [f"transformer_blocks.{i}" for i in range(2)] + [f"single_transformer_blocks.{i}" for i in range(2)]
    handles = [model.get_submodule(n).register_forward_hook(keep(n), with_kwargs=True) for n in names]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()
    return {name: float(torch.cat(distances[name]).mean()) for name in names}


def test_block_influence_is_one_minus_cosine_and_scores_combine_as_weighted_min_max_qualities(position):
    model, table = _importance(importance={"block_influence": 3, "position": 1})
    influence = _block_influence_by_hand(model, flux_batches(3))
    assert table.blocks == list(influence)
    assert table.values["block_influence"] == pytest.approx(influence, rel=1e-5)
    assert table.values["position"] == {name: float(i) for i, name in enumerate(influence)}
    assert table.weights == {"block_influence": 0.75, "position": 0.25}

    low, high = min(influence.values()), max(influence.values())
    expected = {}
    for i, name in enumerate(influence):
        influence_quality = 1 - (influence[name] - low) / (high - low)
        position_quality = i / 3
        expected[name] = -(0.75 * influence_quality + 0.25 * position_quality)
    assert table.scores == pytest.approx(expected, rel=1e-5)
    assert table.order == sorted(expected, key=expected.get)


def test_fit_residual_matches_the_fit_that_compress_makes():
    _, table = _importance(importance="fit_residual", model=make_flux())
    model = make_flux()
    blockprune.compress(model, ratio=0.25, calibration=flux_batches(3), sandwich=False, progress=False,
                        order=["single_transformer_blocks.1"])
    streams = blockprune.plan(model).replaced[0].streams
    expected = sum(r.relative_error * r.tokens for r in streams.values()) / sum(r.tokens for r in streams.values())
    assert table.values["fit_residual"]["single_transformer_blocks.1"] == pytest.approx(expected)


def test_replace_ablation_measures_the_surrogate_not_the_skip():
    _, removed = _importance(importance="output_mse", ablation="remove")
    _, replaced = _importance(importance="output_mse", ablation="replace")
    assert removed.values != replaced.values
    # a least-squares surrogate is at least as good as skipping on most blocks
    better = sum(replaced.values["output_mse"][b] <= removed.values["output_mse"][b] for b in removed.blocks)
    assert better >= len(removed.blocks) - 1


def test_importance_table_is_printed(capsys):
    blockprune.importance(make_flux(), calibration=flux_batches(2), importance=["output_mse", "block_influence"],
                          cache_dir=False)
    out = capsys.readouterr().out
    assert "block importance (ablation: remove)" in out and "output_mse (w=0.50)" in out


def test_cache_skips_scoring_for_same_model_data_and_settings(counting, tmp_path):
    model = make_flux()
    first = blockprune.importance(model, calibration=flux_batches(2), importance="counting", progress=False,
                                  cache_dir=tmp_path)
    assert counting.calls == 4 and first.cached == []
    second = blockprune.importance(model, calibration=flux_batches(2), importance="counting", progress=False,
                                   cache_dir=tmp_path)
    assert counting.calls == 4 and second.cached == ["counting"] and second.values == first.values
    blockprune.compress(model, ratio=0.5, calibration=flux_batches(2), importance="counting", sandwich=False,
                        progress=False, cache_dir=tmp_path)
    assert counting.calls == 4  # compress reused the cached scores
    blockprune.importance(make_flux(), calibration=flux_batches(2, seed=5), importance="counting", progress=False,
                          cache_dir=tmp_path)
    assert counting.calls == 8  # other data: scored again
    blockprune.importance(make_flux(seed=1), calibration=flux_batches(2), importance="counting", progress=False,
                          cache_dir=tmp_path)
    assert counting.calls == 12  # other weights: scored again


def test_rescore_each_scores_the_remaining_blocks_after_every_replacement(counting):
    model = make_flux(double=2, single=4)  # 6 blocks
    blockprune.compress(model, ratio=0.5, calibration=flux_batches(2), importance="counting", sandwich=False,
                        progress=False, rescore="each", cache_dir=False)
    assert counting.calls == 6 + 5 + 4
    # ties between equal name lengths keep data-flow order; names rank by length (shortest first)
    assert blockprune.plan(model).replaced_names == ["transformer_blocks.0", "transformer_blocks.1",
                                                     "single_transformer_blocks.0"]


def test_generation_metric_on_a_bare_transformer_names_what_is_missing():
    with pytest.raises(BlockpruneError, match="cannot generate images from a bare FluxTransformer2DModel: pass the pipeline"):
        _importance(importance="clip", metric_options={"clip_scorer": lambda images, prompts: torch.ones(len(prompts))})


def test_fid_without_an_extractor_explains_how_to_give_one():
    with pytest.raises(BlockpruneError, match="the fid metric needs a feature extractor: pass metric_options"):
        _importance(importance="fid")


def test_clip_without_a_scorer_explains_how_to_give_one():
    with pytest.raises(BlockpruneError, match="clip_model_path"):
        _importance(importance="clip")


def test_bad_ablation_and_rescore():
    with pytest.raises(BlockpruneError, match="unknown ablation 'drop'"):
        _importance(ablation="drop")
    with pytest.raises(BlockpruneError, match="unknown rescore 'always'; use one of 'once', 'each'"):
        _importance(rescore="always")

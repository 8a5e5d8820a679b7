"""Plugins: in-process registration, entry points, the autoload switch, duplicates."""

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import TinyResidualNet, residual_net_batches

import blockprune
from blockprune import plugins
from blockprune.errors import BlockpruneError


class TinyNetAdapter(blockprune.Adapter):
    name = "tinynet"

    def matches(self, model):
        return isinstance(model, TinyResidualNet)

    def block_lists(self, model):
        return ["layers"]

    def block_spec(self, name, block):
        return blockprune.BlockSpec(outputs="x")


class TinyNetPlugin:
    @blockprune.hookimpl
    def blockprune_register_adapters(self, register):
        register(TinyNetAdapter())


@pytest.fixture
def tinynet_plugin():
    plugin = TinyNetPlugin()
    blockprune.register_plugin(plugin, name="tinynet-plugin")
    yield plugin
    blockprune.unregister_plugin(plugin)


def test_in_process_plugin_adapter_compresses_a_custom_model(tinynet_plugin):
    assert "tinynet" in plugins.adapters()
    model = TinyResidualNet(depth=4)
    blockprune.compress(model, ratio=0.5, calibration=residual_net_batches(4), sandwich=False, progress=False)
    plan = blockprune.plan(model)
    assert plan.adapter == "tinynet"  # picked by adapter="auto"
    assert len(plan.replaced) == 2
    assert sum(isinstance(m, blockprune.LinearSurrogate) for m in model.layers) == 2
    assert plugins.plugin_contents()["tinynet-plugin"] == {"adapters": ["tinynet"], "metrics": [], "surrogates": []}


def test_unregistered_plugin_is_gone(tinynet_plugin):
    blockprune.unregister_plugin(tinynet_plugin)
    assert "tinynet" not in plugins.adapters()
    blockprune.register_plugin(tinynet_plugin, name="tinynet-plugin")  # for the fixture's teardown


def test_builtins_register_through_the_same_hooks():
    contents = plugins.plugin_contents()
    assert contents["blockprune_adapters.flux"]["adapters"] == ["flux"]
    assert contents["blockprune_adapters.generic"]["adapters"] == ["generic"]
    assert contents["blockprune.scoring.metrics.output_mse"]["metrics"] == ["output_mse"]


def test_duplicate_adapter_name_is_refused():
    class Clash:
        @blockprune.hookimpl
        def blockprune_register_adapters(self, register):
            register(TinyNetAdapter.__new__(type("Flux2", (TinyNetAdapter,), {"name": "flux"})))

    clash = Clash()
    blockprune.register_plugin(clash)
    try:
        with pytest.raises(BlockpruneError, match="two plugins register an adapter named 'flux'"):
            plugins.adapters()
    finally:
        blockprune.unregister_plugin(clash)


ENTRY_POINT_PLUGIN = '''
import blockprune

class ThirdParty(blockprune.Adapter):
    name = "thirdparty"
    def matches(self, model):
        return False

@blockprune.hookimpl
def blockprune_register_adapters(register):
    register(ThirdParty())
'''


def _adapters_in_subprocess(site, disable):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}
    env.pop("BLOCKPRUNE_DISABLE_PLUGIN_AUTOLOAD", None)
    if disable:
        env["BLOCKPRUNE_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    code = "from blockprune import plugins; print(sorted(plugins.adapters()))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


def test_entry_point_plugins_load_unless_disabled(tmp_path):
    (tmp_path / "bp_thirdparty.py").write_text(ENTRY_POINT_PLUGIN)
    info = tmp_path / "bp_thirdparty-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bp-thirdparty\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("[blockprune]\nthirdparty = bp_thirdparty\n"))
    assert "'thirdparty'" in _adapters_in_subprocess(tmp_path, disable=False)
    disabled = _adapters_in_subprocess(tmp_path, disable=True)
    assert "'thirdparty'" not in disabled and "'flux'" in disabled


class HalfLinear(blockprune.SurrogateKind):
    """The least-squares maps scaled by one half: a kind no built-in provides."""

    name = "half_linear"
    trainable = False

    def build(self, model, block, batches, ridge, device):
        surrogate, reports = plugins.get_surrogate("linear").build(model, block, batches, ridge, device)
        for linear in surrogate.linears.values():
            linear.weight.data.mul_(0.5)
            linear.bias.data.mul_(0.5)
        return surrogate, reports


class HalfLinearPlugin:
    @blockprune.hookimpl
    def blockprune_register_surrogates(self, register):
        register(HalfLinear())


def test_a_plugin_surrogate_kind_is_used_by_compress(tinynet_plugin):
    plugin = HalfLinearPlugin()
    blockprune.register_plugin(plugin, name="half-plugin")
    try:
        assert plugins.plugin_contents()["half-plugin"]["surrogates"] == ["half_linear"]
        fitted, halved = TinyResidualNet(depth=4), TinyResidualNet(depth=4)
        halved.load_state_dict(fitted.state_dict())
        options = {"ratio": 0.5, "order": "start2end", "calibration": residual_net_batches(4), "progress": False}
        blockprune.compress(fitted, surrogate="linear", sandwich=False, **options)
        blockprune.compress(halved, surrogate="half_linear", sandwich=False, **options)
        assert blockprune.plan(halved).surrogate == "half_linear"
        trained = TinyResidualNet(depth=4)
        blockprune.compress(trained, surrogate="half_linear", **options)  # not trainable: sandwich leaves it so
        stages = blockprune.plan(trained).stages
        assert len(stages) == 2 and all(stage.trained_surrogates == [] for stage in stages)
        first = blockprune.plan(fitted).replaced_names[0]
        got, full = halved.get_submodule(first).linears["x"], fitted.get_submodule(first).linears["x"]
        assert got.weight.allclose(0.5 * full.weight) and got.bias.allclose(0.5 * full.bias)
    finally:
        blockprune.unregister_plugin(plugin)
    with pytest.raises(BlockpruneError, match="unknown surrogate 'half_linear'; use one of 'identity', 'linear'"):
        blockprune.compress(TinyResidualNet(depth=4), calibration=residual_net_batches(4), surrogate="half_linear")


def test_an_adapter_overriding_the_old_run_pipeline_name_is_refused():
    with pytest.raises(BlockpruneError, match="renamed call_pipeline"):
        type("OldAdapter", (blockprune.Adapter,), {"run_pipeline": lambda self, *args: None})


def test_a_misspelled_hook_is_an_error_and_the_plugin_is_not_kept():
    class Misspelled:
        @blockprune.hookimpl
        def blockprune_register_adapter(self, register):  # no such hook: the hooks end in "adapters"
            register(TinyNetAdapter())

    plugin = Misspelled()
    with pytest.raises(BlockpruneError, match="blockprune_register_adapter.*fix the hook's name"):
        blockprune.register_plugin(plugin, name="misspelled")
    assert "misspelled" not in plugins.plugin_contents()


def test_import_blockprune_neither_imports_nor_registers_the_toy_package():
    code = ("import sys, blockprune; print(sorted(m for m in sys.modules if m.startswith('blockprune.toy')));"
            "from blockprune import plugins; print('toy_fidelity' in plugins.metrics())")
    env = {**os.environ, "BLOCKPRUNE_DISABLE_PLUGIN_AUTOLOAD": "1"}
    lines = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           check=True).stdout.split()
    assert lines == ["[]", "False"]
    assert set(plugins.plugin_contents()["blockprune.toy.metrics"]["metrics"]) == {
        "toy_fidelity", "toy_accuracy", "toy_frechet"}  # installed: it loads as an entry-point plugin

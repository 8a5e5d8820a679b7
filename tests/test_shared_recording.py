"""Sandwich training's span inputs recorded during the least-squares pass (one forward per batch serves both)."""

import logging

import pytest
import torch
from conftest import MODELS, TinyResidualNet, residual_net_batches

import blockprune
from blockprune import plugins, progressive
from blockprune.brll.recording import record_blocks, riding
from blockprune.discovery.resolve import resolve_blocks
from blockprune.sandwich.data import record_span_inputs, same_samples
from blockprune.sandwich.stage import span_capture

FAST = {"progress": False, "cache_dir": False, "sandwich_steps": 4, "sandwich_eval_every": 2, "heal_steps": 0}


def compress_counting(make, batches, adapter, order, shared=True, monkeypatch=None, **options):
    """The compressed model and how many forwards of the whole model compress ran."""
    if not shared:
        monkeypatch.setattr(progressive, "span_capture", lambda *args, **kwargs: None)
    model = make()
    forwards = []
    handle = model.register_forward_pre_hook(lambda *args: forwards.append(1))
    blockprune.compress(model, adapter=adapter, ratio=0.5, calibration=batches, order=order, **FAST, **options)
    handle.remove()
    monkeypatch.undo() if monkeypatch is not None else None
    return model, len(forwards)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("order", ["end2start", "start2end"])
def test_shared_recording_gives_the_same_model_with_fewer_forwards(name, order, monkeypatch):
    make, make_batches = MODELS[name]
    batches = make_batches(10)
    shared, shared_forwards = compress_counting(make, batches, name, order)
    alone, alone_forwards = compress_counting(make, batches, name, order, shared=False, monkeypatch=monkeypatch)
    got, expected = shared.state_dict(), alone.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    stages = len(blockprune.plan(shared).stages)
    least_squares = 8  # 10 batches, 2 held out; the training batches are the least-squares ones
    assert stages >= 2 and alone_forwards - shared_forwards == stages * (least_squares - 1)  # one batch re-checked


def test_a_split_that_trains_on_fewer_batches_records_the_span_apart(monkeypatch):
    make, make_batches = MODELS["flux"]
    batches = make_batches(10)
    shared, forwards = compress_counting(make, batches, "flux", "end2start", sandwich_split=0.5)
    alone, alone_forwards = compress_counting(make, batches, "flux", "end2start", shared=False,
                                              monkeypatch=monkeypatch, sandwich_split=0.5)
    assert forwards == alone_forwards
    assert all(torch.equal(a, b) for a, b in zip(shared.state_dict().values(), alone.state_dict().values()))


class ContextFromStream(TinyResidualNet):
    """Each block's context is computed from the stream it receives: replacing a block changes later contexts."""

    def forward(self, inputs: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        x = self.embed(inputs)
        for layer in self.layers:
            x = layer(x, scale * (1 + 0.5 * torch.tanh(x.mean())))
        return self.head(x)


def test_inputs_that_differ_from_the_model_as_it_is_now_are_recorded_again(monkeypatch, caplog):
    def make():
        torch.manual_seed(0)
        return ContextFromStream(dim=16, depth=6)

    batches = residual_net_batches(10)
    with caplog.at_level(logging.INFO, logger="blockprune"):
        shared, forwards = compress_counting(make, batches, "generic", ["layers.3", "layers.1", "layers.4"])
    assert "recorded with the least squares differ from the model's; recording again" in caplog.text
    alone, alone_forwards = compress_counting(make, batches, "generic", ["layers.3", "layers.1", "layers.4"], shared=False,
                                              monkeypatch=monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(shared.state_dict().values(), alone.state_dict().values()))
    assert forwards == alone_forwards + 3  # each stage's one-batch check, then the span recorded as before


def tiny_residual_blocks():
    torch.manual_seed(0)
    model = TinyResidualNet(dim=8, depth=4)
    batches = residual_net_batches(3)
    return model, batches, resolve_blocks(model, plugins.get_adapter(model, "generic"), batches[0])


def test_a_capture_rides_only_on_a_pass_over_its_own_batches():
    model, batches, blocks = tiny_residual_blocks()
    by_name = {b.name: b for b in blocks}
    capture = span_capture(blocks, set(), "layers.1", batches, batches, blockprune.SandwichConfig())
    assert [b.name for b in capture.span] == ["layers.0", "layers.1", "layers.2"]
    with riding(capture):
        record_blocks(model, [by_name["layers.1"]], batches[:2])  # other batches: not served
        assert not capture.served and len(capture.store) == 0
        record_blocks(model, [by_name["layers.1"]], batches)
        record_blocks(model, [by_name["layers.1"]], batches)  # served once only
    assert capture.served and len(capture.store) == 3
    expected = record_span_inputs(model, capture.span, batches, 2**30)
    assert all(same_samples(capture.store[i], expected[i]) for i in range(3))
    assert span_capture(blocks, set(), "layers.1", batches[:2], batches, blockprune.SandwichConfig()) is None


def test_a_forward_that_never_reaches_the_span_end_is_an_error():
    _, batches, blocks = tiny_residual_blocks()
    capture = span_capture(blocks, set(), "layers.1", batches, batches, blockprune.SandwichConfig())
    capture.begin()
    with pytest.raises(blockprune.BlockpruneError, match="never reached layers.2, the span's last block"):
        capture.end()

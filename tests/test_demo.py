"""The README's main job: the embedded default compressed, saved and reloaded."""

from blockprune import plan
from blockprune.__main__ import main
from blockprune.demo import flux_batches, run_demo, tiny_flux
from blockprune.serialization import from_pretrained


def test_demo_compresses_saves_and_reloads(tmp_path, capsys):
    result = run_demo(ratio=0.2, output=tmp_path / "out")
    out = capsys.readouterr().out
    assert "blockprune plan: 4 of 20 blocks replaced (flux)" in out
    assert 0 < result["relative_error"] < 0.05
    loaded = from_pretrained(tmp_path / "out")
    assert len(plan(loaded).replaced) == 4


def test_demo_command_line(tmp_path, capsys):
    assert main(["demo", "--ratio", "0.1", "--output", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "2 of 20 blocks replaced" in out
    assert "no image grid: the embedded default has random weights and no pipeline" in out


def test_demo_model_shape():
    model = tiny_flux()
    assert len(model.transformer_blocks) == 6 and len(model.single_transformer_blocks) == 14
    batch = flux_batches(model, 1)[0]
    assert model(**batch).sample.shape == batch["hidden_states"].shape

"""The ``blockprune`` command: every command on tiny real models, exit codes, one-line errors."""

import subprocess
import sys

import pytest
from conftest import flux_batches, make_flux
from test_pipeline import tiny_dit_pipeline

import blockprune
from blockprune import plugins
from blockprune.cli import main

COMMANDS = ["compress", "calibrate", "inspect", "importance", "plugins", "demo"]


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    """A 4-block FLUX transformer saved by diffusers, and calibration batches saved by blockprune.save_calibration."""
    folder = tmp_path_factory.mktemp("flux")
    make_flux().save_pretrained(folder / "model")
    blockprune.save_calibration(flux_batches(4), folder / "batches.safetensors")
    return folder


def run_cli(capsys, *argv):
    """``(exit code, stdout, stderr)`` of ``blockprune argv``."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(capsys, code, *argv):
    """Run a command that must fail with ``code``; return its error, checked to be one line."""
    got, out, err = run_cli(capsys, *argv)
    assert got == code, err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err.strip()


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)], ids=["blockprune", *COMMANDS])
def test_help_on_every_command(capsys, command):
    code, out, _ = run_cli(capsys, *command, "--help")
    assert code == 0
    assert out.startswith(f"usage: {' '.join(['blockprune', *command])}")


def test_python_dash_m_runs_the_same_command():
    result = subprocess.run([sys.executable, "-m", "blockprune", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and all(c in result.stdout for c in COMMANDS)


def test_compress_a_small_model_by_name(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "compress", "flux-random", "-o", tmp_path / "out", "--ratio", 0.1, "--no-sandwich",
                           "--calibration-batches", 5, "--order", "end2start", "--no-progress")
    assert code == 0
    assert "blockprune plan: 2 of 20 blocks replaced (flux)" in out and "saved to" in out
    loaded = blockprune.from_pretrained(tmp_path / "out")
    assert blockprune.plan(loaded).replaced_names == ["single_transformer_blocks.13", "single_transformer_blocks.12"]


def test_compress_a_transformer_folder_with_options(flux_folder, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "compress", flux_folder / "model", "--calibration", flux_folder / "batches.safetensors",
                           "-o", tmp_path / "out", "--ratio", 0.5, "--order", "end2start", "--ridge", 1e-4,
                           "--no-sandwich", "--fuse", "--no-progress")
    assert code == 0
    plan = blockprune.plan(blockprune.from_pretrained(tmp_path / "out"))
    assert plan.order == "end2start"
    assert plan.replaced_names == ["single_transformer_blocks.1", "single_transformer_blocks.0"]
    assert all(r.score is None for r in plan.replaced)  # a fixed order scores nothing
    assert {run.stream for run in plan.fused} == {"hidden_states", "encoder_hidden_states"}  # --fuse: one map each


def test_compress_with_weighted_metrics_and_listed_order(flux_folder, tmp_path, capsys):
    code, _, _ = run_cli(capsys, "compress", flux_folder / "model", "--calibration", flux_folder / "batches.safetensors",
                         "-o", tmp_path / "a", "--ratio", 0.25, "--importance", "output_mse=3,block_influence=1",
                         "--no-sandwich", "--no-progress", "--no-cache")
    assert code == 0
    assert blockprune.plan(blockprune.from_pretrained(tmp_path / "a")).importance == {"output_mse": 0.75, "block_influence": 0.25}
    code, _, _ = run_cli(capsys, "compress", flux_folder / "model", "--calibration", flux_folder / "batches.safetensors",
                         "-o", tmp_path / "b", "--ratio", 0.25, "--order", "transformer_blocks.1", "--no-sandwich",
                         "--no-progress")
    assert code == 0
    assert blockprune.plan(blockprune.from_pretrained(tmp_path / "b")).replaced_names == ["transformer_blocks.1"]


def test_compress_with_sandwich_training_in_a_workdir_then_reuse(tmp_path, capsys):
    model_folder = tmp_path / "model"
    make_flux().save_pretrained(model_folder)
    blockprune.save_calibration(flux_batches(6), tmp_path / "batches.safetensors")
    common = ["compress", model_folder, "--calibration", tmp_path / "batches.safetensors", "--no-progress", "--no-cache"]
    code, out, err = run_cli(capsys, *common, "-o", tmp_path / "high", "--ratio", 0.5, "--sandwich-steps", 3,
                             "--sandwich-width", 1, "--lora-rank", 4, "--heal-steps", 0, "--workdir", tmp_path / "work")
    assert code == 0, err
    assert "sandwich training (held-out batches)" in out
    high = blockprune.plan(blockprune.from_pretrained(tmp_path / "high"))
    assert high.sandwich["steps"] == 3 and high.sandwich["width"] == 1 and high.sandwich["lora_rank"] == 4
    assert high.sandwich["heal_steps"] == 0 and not high.heal
    assert [stage.block for stage in high.stages] == high.replaced_names
    assert (tmp_path / "work" / "manifest.json").is_file() and (tmp_path / "high" / "stages.safetensors").is_file()

    code, out, err = run_cli(capsys, *common, "-o", tmp_path / "low", "--ratio", 0.25, "--reuse-from", tmp_path / "high")
    assert code == 0, err
    low = blockprune.plan(blockprune.from_pretrained(tmp_path / "low"))
    assert low.replaced_names == high.replaced_names[:1] and low.reused_from == str(tmp_path / "high")


def test_every_compress_option_can_be_given_on_the_command_line():
    from blockprune.cli import build_parser
    from blockprune.config import option_names

    compress_parser = build_parser()._subparsers._group_actions[0].choices["compress"]
    destinations = {action.dest for action in compress_parser._actions}
    # metric_options: --clip-model-path, --generation-steps, --generation-seeds; calibration_prompts: --prompts;
    # calibration_call_options: --height, --width
    assert set(option_names()) - destinations == {"metric_options", "calibration_prompts", "calibration_call_options"}


def test_compress_a_pipeline_folder_records_calibration_from_the_prompts_file(tmp_path, capsys):
    tiny_dit_pipeline().save_pretrained(tmp_path / "pipe")
    (tmp_path / "prompts.txt").write_text("# two prompts\na red fox\n\na blue car\n")
    code, _, err = run_cli(capsys, "compress", tmp_path / "pipe", "--prompts", tmp_path / "prompts.txt",
                           "--calibration-steps", 2, "-o", tmp_path / "out", "--ratio", 0.25, "--no-sandwich",
                           "--no-progress", "--no-cache")
    assert code == 0, err
    replaced = blockprune.plan(blockprune.from_pretrained(tmp_path / "out")).replaced[0]
    # 2 prompts × 2 kept steps, each a classifier-free-guidance batch of 2 with 16 tokens
    assert replaced.streams["hidden_states"].tokens == 2 * 2 * 2 * 16


def test_inspect_prints_blocks_streams_parameters_and_flops(flux_folder, capsys):
    code, out, _ = run_cli(capsys, "inspect", flux_folder / "model", "--calibration", flux_folder / "batches.safetensors")
    assert code == 0
    assert "4 residual blocks (flux adapter)" in out
    rows = [line.split() for line in out.splitlines() if "_blocks." in line]
    assert [row[1] for row in rows] == ["transformer_blocks.0", "transformer_blocks.1",
                                        "single_transformer_blocks.0", "single_transformer_blocks.1"]
    assert rows[0][2] == "FluxTransformerBlock" and "encoder_hidden_states" in rows[0]
    assert "blocks hold" in out and "FLOPs per forward" in out


def test_inspect_a_compressed_folder(flux_folder, tmp_path, capsys):
    model = make_flux()
    blockprune.compress(model, ratio=0.5, calibration=flux_batches(4), sandwich=False, progress=False, cache_dir=False)
    blockprune.save_pretrained(model, tmp_path / "out")
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "out")
    assert code == 0 and "blockprune plan: 2 of 4 blocks replaced" in out and "--calibration" in out
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "out", "--calibration", flux_folder / "batches.safetensors")
    assert code == 0 and out.count("LinearSurrogate") == 2


def test_importance_prints_the_ranked_table(flux_folder, capsys):
    code, out, _ = run_cli(capsys, "importance", flux_folder / "model", "--calibration", flux_folder / "batches.safetensors",
                           "--importance", "output_mse,block_influence", "--no-progress", "--no-cache")
    assert code == 0
    assert "output_mse (w=0.50)" in out and "block_influence (w=0.50)" in out
    ranks = [line.split()[0] for line in out.splitlines() if "_blocks." in line]
    assert ranks == ["1", "2", "3", "4"]


def test_plugins_lists_builtins_with_what_they_register(capsys):
    code, out, _ = run_cli(capsys, "plugins")
    assert code == 0
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip().startswith("blockprune")}
    assert rows["blockprune_adapters.flux"] == ["built-in", "flux", "-", "-"]
    assert rows["blockprune.scoring.metrics.output_mse"] == ["built-in", "-", "output_mse", "-"]
    assert rows["blockprune.brll.replacement"][:4] == ["built-in", "-", "-", "linear,"]  # identity wraps below
    assert "identity" in out.split("blockprune.brll.replacement", 1)[1].split("blockprune.toy")[0]


# Bad input: one line, exit code 2.


def test_missing_model_folder(tmp_path, capsys):
    message = error_line(capsys, 2, "compress", tmp_path / "nope", "-o", tmp_path / "out")
    assert f"model folder {tmp_path / 'nope'} does not exist" in message


def test_unknown_small_model_name(tmp_path, capsys):
    message = error_line(capsys, 2, "compress", "flux-huge", "-o", tmp_path / "out")
    assert "unknown small model 'flux-huge'" in message
    assert {"flux-random", "flux-small", "sd3-small"} <= set(message.split("known small models: ")[1].split(", "))


def test_unknown_adapter(tmp_path, capsys):
    message = error_line(capsys, 2, "compress", "flux-random", "-o", tmp_path / "out", "--adapter", "fluxx")
    known = ", ".join(["auto", *sorted(plugins.adapters())])
    assert f"unknown adapter 'fluxx'; known adapters: {known}" in message


@pytest.mark.parametrize("problem", ["missing", "directory", "not utf-8"])
def test_unreadable_prompts_file(tmp_path, capsys, problem):
    path = tmp_path / "prompts.txt"
    if problem == "directory":
        path.mkdir()
    elif problem == "not utf-8":
        path.write_bytes(b"\xff\xfe\xfa a fox\n")
    message = error_line(capsys, 2, "compress", "flux-random", "-o", tmp_path / "out", "--prompts", path)
    assert message.startswith(f"blockprune compress: error: cannot read prompts file {path}")


def test_empty_prompts_file(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("# only a comment\n\n")
    message = error_line(capsys, 2, "compress", "flux-random", "-o", tmp_path / "out", "--prompts", tmp_path / "prompts.txt")
    assert "has no prompts" in message


def test_output_folder_not_empty_is_refused_unless_overwrite(flux_folder, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep")
    message = error_line(capsys, 2, "compress", "flux-random", "-o", tmp_path / "out", "--no-sandwich")
    assert "output folder" in message and "exists and is not empty; pass --overwrite" in message
    code, _, _ = run_cli(capsys, "compress", flux_folder / "model", "--calibration", flux_folder / "batches.safetensors",
                         "-o", tmp_path / "out", "--overwrite", "--ratio", 0.25, "--no-sandwich", "--no-progress")
    assert code == 0 and (tmp_path / "out" / "blockprune.json").is_file()
    assert (tmp_path / "out" / "notes.txt").read_text() == "keep"


def test_bare_transformer_folder_needs_calibration(flux_folder, tmp_path, capsys):
    message = error_line(capsys, 2, "compress", flux_folder / "model", "-o", tmp_path / "out")
    assert "cannot record its own calibration; pass --calibration FILE" in message
    (tmp_path / "p.txt").write_text("a fox\n")
    message = error_line(capsys, 2, "compress", flux_folder / "model", "-o", tmp_path / "out", "--prompts", tmp_path / "p.txt")
    assert "--prompts needs a pipeline" in message


def test_calibration_file_that_is_not_safetensors(flux_folder, tmp_path, capsys):
    (tmp_path / "batches.safetensors").write_text("not a tensor file")
    message = error_line(capsys, 2, "inspect", flux_folder / "model", "--calibration", tmp_path / "batches.safetensors")
    assert "cannot read calibration file" in message


def test_usage_errors_are_one_line_with_exit_code_2(capsys):
    assert "the following arguments are required: -o/--output" in error_line(capsys, 2, "compress", "flux-random")
    assert "invalid float value: 'abc'" in error_line(capsys, 2, "compress", "flux-random", "-o", "x", "--ratio", "abc")
    assert "invalid choice: 'shrink'" in error_line(capsys, 2, "shrink")


def test_bad_values_from_the_core_are_bad_input(tmp_path, capsys):
    message = error_line(capsys, 2, "compress", "flux-random", "-o", tmp_path / "out", "--ratio", 1.5, "--no-sandwich",
                         "--calibration-batches", 1)
    assert "ratio must be a number strictly between 0 and 1" in message


def test_failure_is_exit_code_1_and_debug_shows_the_traceback(tmp_path, capsys):
    folder = tmp_path / "broken"
    make_flux().save_config(folder)  # a config without weights: diffusers fails to load it
    message = error_line(capsys, 1, "inspect", folder)
    assert "(rerun with --debug for the traceback)" in message
    code, _, err = run_cli(capsys, "--debug", "inspect", folder)
    assert code == 1 and "Traceback" in err
    code, _, err = run_cli(capsys, "inspect", folder, "--debug")
    assert code == 1 and "Traceback" in err

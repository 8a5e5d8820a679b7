"""Recording calibration from a pipeline with the caller's call arguments (#19 item 7): ``compress(pipe,
calibration_call_options={...})``, ``record_calibration(call_options=...)`` and ``--height`` / ``--width``."""

import pytest
from test_pipeline import tiny_dit_pipeline
from tiny_pipelines import tiny_flux_pipeline

import blockprune
from blockprune.cli import main
from blockprune.errors import BlockpruneError
from blockprune.toy.small_models import small_model

PROMPTS = ["a red fox", "a blue car"]
QUIET = {"sandwich": False, "order": "start2end", "progress": False, "cache_dir": False}


def _transformer_calls(pipe) -> list:
    """The hidden_states shapes of every transformer forward from now on (the pipeline's and compress's)."""
    shapes = []
    pipe.transformer.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(kwargs["hidden_states"].shape),
                                               with_kwargs=True)
    return shapes


@pytest.mark.parametrize("height, width", [(16, 8), (8, 8)])
def test_compress_records_calibration_at_the_size_and_text_length_passed(height, width):
    pipe = tiny_flux_pipeline()
    options = {"height": height, "width": width, "max_sequence_length": 4, "guidance_scale": 2.0}
    blockprune.compress(pipe, adapter="flux", ratio=0.25, calibration_prompts=PROMPTS, calibration_steps=2,
                        steps_per_prompt=1, calibration_call_options=options, **QUIET)
    streams = blockprune.plan(pipe.transformer).replaced[0].streams
    image_tokens = (height // 2) * (width // 2)  # VAE factor 1, 2 × 2 latent patches
    assert streams["hidden_states"].tokens == len(PROMPTS) * image_tokens  # one batch a prompt, batch size 1
    assert streams["encoder_hidden_states"].tokens == len(PROMPTS) * 4
    assert blockprune.plan(pipe.transformer).config["calibration_call_options"] == options


def test_record_calibration_passes_call_options_with_height_and_width():
    batches = blockprune.record_calibration(tiny_flux_pipeline(), PROMPTS[:1], num_inference_steps=2,
                                            steps_per_prompt=2, height=8, width=16,
                                            call_options={"max_sequence_length": 4}, progress=False)
    assert [b["hidden_states"].shape for b in batches] == [(1, 32, 4)] * 2
    assert all(b["encoder_hidden_states"].shape == (1, 4, 16) for b in batches)


def test_an_argument_the_pipeline_does_not_take_is_refused_with_those_it_takes_before_it_runs():
    pipe = tiny_flux_pipeline()
    calls = _transformer_calls(pipe)
    with pytest.raises(BlockpruneError, match=r"^FluxPipeline takes no argument 'heigth' \(did you mean 'height'\?\); "
                       r"the calibration call options must be among its arguments: .*\bheight, width\b.*"
                       r"\bguidance_scale\b.*\bmax_sequence_length$") as raised:
        blockprune.compress(pipe, adapter="flux", calibration_prompts=PROMPTS, calibration_call_options={"heigth": 16},
                            **QUIET)
    assert "num_inference_steps" not in str(raised.value) and "generator" not in str(raised.value)  # set by blockprune
    assert calls == []  # nothing ran
    with pytest.raises(BlockpruneError, match="ToyPipeline takes no argument 'max_sequence_length'; .*: guidance_scale, "
                       "num_images_per_prompt, height, width$"):
        blockprune.record_calibration(small_model("flux-small").build(), PROMPTS,
                                      call_options={"max_sequence_length": 4}, progress=False)


@pytest.mark.parametrize("value, message", [
    ({"num_inference_steps": 4}, ("calibration_call_options sets 'num_inference_steps', which blockprune sets "
                                  "itself when recording; use the calibration_steps= option instead")),
    ({"generator": None}, "sets 'generator', which blockprune sets itself when recording; leave it out"),
    ({"height": 0}, r"calibration_call_options\['height'\] must be a positive integer, got 0"),
    ([("height", 8)], "calibration_call_options must be a dict of the pipeline call's keyword arguments"),
    ({8: 8}, "calibration_call_options must be a dict of the pipeline call's keyword arguments"),
])
def test_bad_calibration_call_options_are_refused_when_the_config_is_made(value, message):
    with pytest.raises(BlockpruneError, match=message):
        blockprune.CompressConfig(calibration_call_options=value)
    assert blockprune.CompressConfig(calibration_call_options={"height": 8}).calibration_call_options == {"height": 8}


def test_an_adapter_that_passes_no_options_refuses_them_by_name():
    with pytest.raises(BlockpruneError, match="'dit' adapter's call_pipeline takes no guidance_scale"):
        blockprune.compress(tiny_dit_pipeline(), calibration_call_options={"guidance_scale": 2.0}, **QUIET)


def test_compress_height_and_width_flags_reach_the_pipeline(tmp_path, capsys):
    tiny_flux_pipeline().save_pretrained(tmp_path / "pipe")
    (tmp_path / "prompts.txt").write_text("a red fox\na blue car\n")
    common = ["compress", str(tmp_path / "pipe"), "--prompts", str(tmp_path / "prompts.txt"), "--calibration-steps",
              "2", "--steps-per-prompt", "1", "--ratio", "0.25", "--order", "start2end", "--no-sandwich",
              "--no-progress", "--no-cache"]
    assert main([*common, "-o", str(tmp_path / "out"), "--height", "16", "--width", "8"]) == 0, capsys.readouterr().err
    compressed = blockprune.from_pretrained(tmp_path / "out")
    assert blockprune.plan(compressed).replaced[0].streams["hidden_states"].tokens == 2 * 8 * 4
    assert main([*common, "-o", str(tmp_path / "bad"), "--height", "0"]) != 0
    assert "calibration_call_options['height'] must be a positive integer, got 0" in capsys.readouterr().err

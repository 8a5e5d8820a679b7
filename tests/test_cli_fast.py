"""A fast, unambiguous command line (#20 items 6 and 7): --help and --version import neither torch nor diffusers,
each flag name has one meaning."""

import subprocess
import sys

import pytest

import blockprune
from blockprune.cli import COMMANDS, build_parser, main

HEAVY = ("torch", "diffusers", "peft", "transformers")


def _python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("argv", [["--help"], ["--version"]])
def test_help_and_version_import_no_heavy_package(argv):
    out = _python(f"import sys\nfrom blockprune.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
                  f"print('heavy:', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert out.splitlines()[-1] == "heavy: []"


def test_version_prints_the_package_version():
    result = subprocess.run([sys.executable, "-m", "blockprune", "--version"], check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == f"blockprune {blockprune.__version__}"


def test_import_blockprune_is_lazy_and_every_public_name_resolves():
    out = _python("import sys, blockprune\nprint('torch' in sys.modules)\n"
                  "import blockprune.plan, blockprune.compress\n"
                  "print(all(hasattr(blockprune, n) for n in blockprune.__all__), callable(blockprune.plan), "
                  "callable(blockprune.compress), blockprune.plugins.__name__)")
    assert out.split() == ["False", "True", "True", "True", "blockprune.plugins"]


def test_the_command_list_matches_each_commands_own_help():
    for name, summary in COMMANDS.items():
        choices = build_parser([name])._subparsers._group_actions[0]._choices_actions
        assert {action.dest: action.help for action in choices}[name] == summary


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS) and "--version" in out


def test_demo_prompts_is_renamed_num_prompts(capsys):
    assert main(["demo", "--prompts", "16"]) == 2
    err = capsys.readouterr().err
    assert "--prompts was renamed --num-prompts N" in err and err.count("\n") == 1
    assert build_parser(["demo"]).parse_args(["demo", "--num-prompts", "4"]).num_prompts == 4


def test_abbreviated_flags_are_refused(capsys):
    # '--steps' would otherwise be taken for '--steps-per-prompt', '--calib' for '--calibration'
    assert main(["calibrate", "flux-small", "-o", "x.safetensors", "--steps", "3"]) == 2
    assert "unrecognized arguments: --steps 3" in capsys.readouterr().err
    assert main(["compress", "flux-random", "-o", "out", "--calib", "c.safetensors"]) == 2
    assert "unrecognized arguments: --calib" in capsys.readouterr().err


def test_prompts_means_a_file_wherever_it_is_a_flag():
    for name in ("compress", "calibrate", "importance", "inspect"):
        subparser = build_parser([name])._subparsers._group_actions[0].choices[name]
        action = next(a for a in subparser._actions if "--prompts" in a.option_strings)
        assert action.metavar == "FILE" and action.type is None


def test_guidance_scale_reaches_compress_from_the_command_line():
    from blockprune.cli.options import option_values

    args = build_parser(["compress"]).parse_args(["compress", "flux-small", "-o", "out", "--guidance-scale", "3.5"])
    assert option_values(args)["guidance_scale"] == 3.5
    plain = build_parser(["compress"]).parse_args(["compress", "flux-small", "-o", "out"])
    assert "guidance_scale" not in option_values(plain)


def test_sampling_steps_and_finalists_reach_compress_from_the_command_line():
    from blockprune.cli.options import option_values

    args = build_parser(["compress"]).parse_args(["compress", "flux-small", "-o", "out", "--sampling-steps", "28",
                                                  "--auto-finalists", "0"])
    assert (option_values(args)["sampling_steps"], option_values(args)["auto_finalists"]) == (28, 0)
    plain = option_values(build_parser(["compress"]).parse_args(["compress", "flux-small", "-o", "out"]))
    assert "sampling_steps" not in plain and "auto_finalists" not in plain


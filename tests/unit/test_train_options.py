"""``training.options.TrainConfig`` is the trainer's command line: the parser is generated from
it, ``to_argv`` writes a config back as flags that parse into the same config, and the
launcher's torchrun command is one of those (so launch.py and train.py cannot drift apart)."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_navil import launch as L
from megatron_navil.train import build_parser, parse_config
from megatron_navil.training.options import option_fields


def test_every_option_is_a_flag_with_help():
    flags = {a.option_strings[0]: a for a in build_parser()._actions if a.option_strings}
    for _, _, f in option_fields():
        flag = "--" + f.name.replace("_", "-")
        assert flag in flags, flag
        assert flags[flag].help and len(flags[flag].help) > 8, flag
    names = [f.name for _, _, f in option_fields()]
    assert len(names) == len(set(names)), "two groups define the same option"


def test_to_argv_round_trips():
    tc, _ = parse_config(["--data", "a", "--steps", "3"])
    tc.layout.tp, tc.layout.vpp, tc.layout.recompute_llm = 2, 2, "full"
    tc.data.data_weights, tc.data.max_patches = [0.25, 0.75], 512
    tc.optim.lr, tc.optim.min_lr, tc.log.no_progress = 1e-4, 1e-6, True
    tc.eval.eval_data = ["held"]
    again, _ = parse_config(tc.to_argv())
    assert again == tc
    # defaults are left out unless named, None never written
    assert "--pp" not in tc.to_argv() and "--pp" in tc.to_argv(always=("pp",))
    assert "--config" not in tc.to_argv(always=("config",))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
        (["--steps", "2", "--tp", "0"], "argument --tp: must be >= 1, got 0"),
        (["--steps", "2", "--lr", "-1"], "argument --lr: must be a finite number > 0"),
        (["--steps", "2", "--min-lr", "nan"], "argument --min-lr: must be a finite number >= 0"),
        (["--steps", "2", "--loss-weighting", "x"], "argument --loss-weighting: invalid choice"),
        (["--steps", "2"], "the following arguments are required: --data"),
    ],
)
def test_bad_values_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_config(
            argv if "--data" in argv or argv == ["--steps", "2"] else ["--data", "d", *argv]
        )
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_launch_command_parses_as_the_plan():
    """The torchrun command of a 9B S2 plan: its train arguments give a TrainConfig with the
    plan's layout, batch and steps (the paper recipe's TP4 without a --tp)."""
    args = L.build_parser().parse_args(
        ["--config", "navil-9b", "--stage", "s2", "--nnodes", "8", "--data", "/d",
         "--save", "/s", "--", "--eval-iters", "3"]
    )  # fmt: skip
    args.extra = args.extra[1:]  # what launch.main does with the "--"
    plan = L.resolve(args)
    cmd = L.torchrun_command(plan, args)
    tc, _ = parse_config(cmd[cmd.index("megatron_navil.train") + 1 :])
    assert (tc.layout.config, tc.optim.stage, tc.layout.tp, tc.layout.pp) == (
        "navil-9b", "s2", 4, 1,
    )  # fmt: skip
    assert (tc.layout.recompute_llm, tc.layout.recompute_vision) == ("selective", "full")
    assert (tc.data.global_batch, tc.optim.steps, tc.data.max_patches) == (
        plan.global_batch, plan.steps, plan.patches,
    )  # fmt: skip
    assert tc.data.data == ["/d"] and tc.checkpoint.save == "/s" and tc.checkpoint.load is None
    assert tc.checkpoint.save_interval == 1000 and tc.eval.eval_iters == 3
    assert dataclasses.replace(tc.layout, tp=2).tp == 2  # plain dataclasses

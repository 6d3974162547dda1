"""The loop options of python -m megatron_navil.train (--profile-steps, --nvtx,
--manual-gc-interval, the --async-save test hook's spec): bad values are one-line errors before
any process group; the helpers behave as documented."""

from __future__ import annotations

import gc

import pytest

from megatron_navil.checkpoint.async_save import write_delay
from megatron_navil.train import main
from megatron_navil.training.manual_gc import ManualGC
from megatron_navil.training.profiling import check_profile_args, parse_profile_steps

BASE = ["--data", "x", "--steps", "5", "--warmup", "1"]


@pytest.mark.parametrize(
    ("spec", "want"), [(None, None), ("1:1", (1, 1)), ("3:7", (3, 7)), (" 2 : 4 ", (2, 4))]
)
def test_profile_steps_parse(spec, want):
    assert parse_profile_steps(spec) == want


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--profile-steps", "5:3", "--log-dir", "l"], "the last step 3 is before the first"),
        (["--profile-steps", "0:3", "--log-dir", "l"], "steps count from 1"),
        (["--profile-steps", "a:b", "--log-dir", "l"], "expected A:B, two step numbers"),
        (["--profile-steps", "3", "--log-dir", "l"], "expected A:B, two step numbers"),
        (["--profile-steps=-1:3", "--log-dir", "l"], "expected A:B, two step numbers"),
        (["--profile-steps", "1:3"], "--profile-steps writes its trace under --log-dir"),
        (["--nvtx"], "--nvtx needs a GPU"),
        (["--manual-gc-interval", "-1"], "argument --manual-gc-interval: must be >= 0, got -1"),
    ],
)
def test_bad_loop_options_are_one_line(args, message, capsys):
    """Checked before any process group or model exists: in this process (CPU: --nvtx is
    refused)."""
    with pytest.raises(SystemExit) as exit_:
        main(BASE + args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_nvtx_is_accepted_with_a_gpu():
    check_profile_args("2:3", True, None, cuda=True)  # NVTX needs no --log-dir
    check_profile_args(None, True, None, cuda=True)


@pytest.mark.parametrize(
    ("spec", "iteration", "want"),
    [("", 4, 0.0), ("2.5", 4, 2.5), ("2.5", 9, 2.5), ("30@4", 4, 30.0), ("30@4", 2, 0.0)],
)
def test_async_write_delay_spec(spec, iteration, want):
    assert write_delay(iteration, spec) == want


def test_manual_gc_context():
    assert gc.isenabled()
    with ManualGC(0):
        assert gc.isenabled()  # 0: automatic GC untouched
    with ManualGC(3) as manual:
        assert not gc.isenabled()
        manual.after_step(2)  # no collection needed to pass; the loop test counts them
    assert gc.isenabled()  # put back as it was
    with pytest.raises(ValueError, match=">= 0"):
        ManualGC(-1)

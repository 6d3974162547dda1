"""python -m megatron_navil.train: user mistakes are one-line errors with exit code 2; the
image preprocessing the corpus was indexed with becomes the run's (and its checkpoints')."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_navil.config.registry import get_config
from megatron_navil.train import corpus_image_config, main


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "x", "--steps", "5", "--warmup", "9"], "--warmup 9 must be in [0, --steps 5]"),
        (["--data", "x", "--steps", "5"], "--warmup 200 (the stage's default) must be in"),
        (["--data", "x", "--steps", "5", "--stage", "s3"], "unknown stage 's3'"),
        (["--data", "x", "--steps", "5", "--config", "navil-7b"], "unknown config 'navil-7b'"),
        (["--data", "x", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
        (
            ["--data", "x", "--steps", "5", "--warmup", "1", "--init", "/nonexistent"],
            "--init /nonexistent: no complete checkpoint",
        ),
        (
            ["--data", "x", "--steps", "5", "--warmup", "1", "--peak-tflops", "0"],
            "argument --peak-tflops: must be a finite number > 0",
        ),
        (
            ["--data", "x", "--steps", "5", "--warmup", "1", "--cp", "4", "--seq-length", "100"],
            "--seq-length 100 with --cp 4: packed length 100 does not split into 2*cp=8 equal "
            "chunks",
        ),
        (
            [
                "--data",
                "x",
                "--steps",
                "5",
                "--warmup",
                "1",
                "--cp",
                "2",
                "--vision-parallel",
                "dp",
            ],
            "--cp runs the vision tower data-parallel over the CP ranks",
        ),
    ],
)
def test_bad_arguments(args, message, capsys):
    """Checked before any process group or model exists: in this process."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_bad_data_is_one_line_from_the_real_entry():
    """Found after the process group is up (every rank opens the shards): the real entry, no
    traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_navil.train", "--data", "/nonexistent", "--steps", "5",
         "--warmup", "1"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "--data:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_corpus_image_settings_are_adopted():
    cfg = get_config("tiny")
    image = {"patch": 16, "merge": 2, "min_patches": 16, "max_patches": 64, "max_aspect": 200.0,
             "multi_scale": False, "scale_ratio": cfg.image.scale_ratio}  # fmt: skip
    new, changes = corpus_image_config(cfg, [image, dict(image)])
    assert changes == {"multi_scale": False} and new.image.multi_scale is False
    assert new.vision == cfg.vision and new.language == cfg.language
    assert new.image.max_patches == cfg.image.max_patches
    # a blend whose corpora disagree keeps the config's value
    same, changes = corpus_image_config(cfg, [image, {**image, "multi_scale": True}])
    assert changes == {} and same is cfg
    with pytest.raises(ValueError, match="indexed with patch 14, the model's patch is 16"):
        corpus_image_config(cfg, [{**image, "patch": 14}])


@pytest.mark.slow
def test_dry_run_reports_the_corpus_image_settings(tmp_path):
    from megatron_navil.testing import synthetic_corpus as S
    from megatron_navil.testing.loader_corpus import index

    written = S.write_corpus(tmp_path / "src", num_train=4, num_val=0, seed=1, max_side=64)
    shards = index([written["train"]], tmp_path / "shards", written["tokenizer"],
                   "--config", "tiny", "--template", "qwen3-chat", "--no-multi-scale")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_navil.train", "--data", str(shards), "--steps", "5",
         "--warmup", "1", "--dry-run"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["image_from_corpus"] == {"multi_scale": False}, summary
    # the same corpus as an earlier version indexed it (no image rule): a one-line refusal
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["image"]["rule"] == "navil-release"
    del manifest["image"]["rule"], manifest["settings"]["image"]["rule"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_navil.train", "--data", str(shards), "--steps", "5",
         "--warmup", "1", "--dry-run"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "was indexed with the old image rule" in proc.stderr
    assert "re-index it with tools/index_corpus.py" in proc.stderr


def test_corpus_without_samples_is_one_line(tmp_path, capsys):
    """A corpus whose every record was skipped (as an older indexer finalized it: a manifest
    with no shard): refused in one line, exit 2, before any process group or model exists
    (formerly the blend raised deep inside the data loader, a 22-line traceback)."""
    from megatron_navil.testing import synthetic_corpus as S
    from megatron_navil.testing.loader_corpus import index

    written = S.write_corpus(tmp_path / "src", num_train=2, num_val=0, seed=1, max_side=64)
    shards = index([written["train"]], tmp_path / "shards", written["tokenizer"],
                   "--config", "tiny", "--template", "qwen3-chat")  # fmt: skip
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["shards"] = []
    manifest["counts"].update(samples=0, skipped=2, shards=0)
    manifest["datasets"][0]["num_samples"] = 0
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit) as exit_:
        main(["--data", str(shards), "--steps", "5", "--warmup", "1", "--config", "tiny"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"python -m megatron_navil.train: error: --data {shards}: the corpus holds no "
                   "sample (2 records were skipped at indexing; see its manifest.json "
                   "'skipped')"], err  # fmt: skip
    import torch.distributed

    assert not torch.distributed.is_initialized()


def test_eval_data_is_checked_before_any_process_group(tmp_path, capsys):
    """--eval-data: a corpus of another tokenizer, an empty one, bad counts: one line, exit 2,
    before any process group exists."""
    import shutil

    from megatron_navil.testing import synthetic_corpus as S
    from megatron_navil.testing.loader_corpus import index

    written = S.write_corpus(tmp_path / "src", num_train=2, num_val=0, seed=1, max_side=64)
    shards = index([written["train"]], tmp_path / "shards", written["tokenizer"],
                   "--config", "tiny", "--template", "qwen3-chat")  # fmt: skip
    other = tmp_path / "other"
    shutil.copytree(shards, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"].update(fingerprint="0" * 64, copy_fingerprint="1" * 64)
    (other / "manifest.json").write_text(json.dumps(manifest))
    base = ["--data", str(shards), "--steps", "5", "--warmup", "1", "--config", "tiny"]
    for extra, message in (
        (["--eval-data", str(other)], f"--eval-data {other}: corpora {shards} and {other} were "
         "indexed with different tokenizers"),
        (["--eval-data", str(tmp_path / "none")], "--eval-data: "),
        (["--eval-data", str(shards), "--eval-iters", "0"], "--eval-iters: must be >= 1"),
        (["--eval-data", str(shards), "--eval-interval", "-1"], "--eval-interval: must be >= 0"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            main(base + extra)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
    import torch.distributed

    assert not torch.distributed.is_initialized()

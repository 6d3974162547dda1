"""examples/slurm: SLURM job variables -> torchrun's c10d rendezvous (torchrun_env.sh, run in a
fake SLURM environment), the .sbatch files' directives, and shellcheck on every script in
examples/. The real SLURM run is .ci/slurm (opt-in: it starts slurmctld/slurmd/munged)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HELPER = ROOT / "examples" / "slurm" / "torchrun_env.sh"
SBATCH = sorted((ROOT / "examples" / "slurm").glob("*.sbatch"))


def _is_shell(path: Path) -> bool:
    if not path.is_file():
        return False
    first = path.read_bytes().split(b"\n", 1)[0]
    return path.suffix in (".sh", ".sbatch") or (first.startswith(b"#!") and b"sh" in first)


SCRIPTS = sorted(p for p in (ROOT / "examples").rglob("*") if _is_shell(p))


def _run_helper(tmp_path: Path, env: dict[str, str], scontrol: str | None = None):
    """Run torchrun_env.sh with only ``env`` (plus a PATH without SLURM's tools, and a fake
    ``scontrol`` printing ``scontrol`` when given)."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for tool in ("bash", "head", "cat"):
        (bindir / tool).unlink(missing_ok=True)
        (bindir / tool).symlink_to(shutil.which(tool))
    if scontrol is not None:
        fake = bindir / "scontrol"
        fake.write_text(f"#!{shutil.which('bash')}\nprintf '%s\\n' {scontrol}\n")
        fake.chmod(0o755)
    proc = subprocess.run(
        [shutil.which("bash"), str(HELPER)],
        env={"PATH": str(bindir), **env}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    values = dict(line.split("=", 1) for line in proc.stdout.splitlines())
    return proc, values


JOB = {"SLURM_JOB_ID": "4711", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "gpu[003-005,010]"}


def test_rendezvous_from_slurm_variables(tmp_path):
    proc, v = _run_helper(tmp_path, {**JOB, "SLURM_GPUS_ON_NODE": "8"})
    assert proc.returncode == 0, proc.stderr
    assert v == {
        "NNODES": "4", "GPUS_PER_NODE": "8", "MASTER_ADDR": "gpu003", "MASTER_PORT": "24711",
        "PET_NNODES": "4", "PET_NPROC_PER_NODE": "8", "PET_RDZV_BACKEND": "c10d",
        "PET_RDZV_ENDPOINT": "gpu003:24711", "PET_RDZV_ID": "4711",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "scontrol", "addr", "gpus", "port"),
    [
        # scontrol, when present, is the authority on the host list.
        ({}, "node-a node-b", "node-a", "1", "24711"),
        # "type:count" GPU requests; no brackets in the list.
        ({"SLURM_JOB_NODELIST": "n7,n8", "SLURM_GPUS_PER_NODE": "h100:4"}, None,
         "n7", "4", "24711"),
        # The user's own values win.
        ({"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "GPUS_PER_NODE": "2"}, None,
         "10.0.0.1", "2", "29500"),
        ({"SLURM_JOB_ID": "39999"}, None, "gpu003", "1", "39999"),
        ({"SLURM_JOB_ID": "40000"}, None, "gpu003", "1", "20000"),
    ],
)  # fmt: skip
def test_variants(tmp_path, extra, scontrol, addr, gpus, port):
    proc, v = _run_helper(tmp_path, {**JOB, **extra}, scontrol)
    assert proc.returncode == 0, proc.stderr
    assert (v["MASTER_ADDR"], v["PET_NPROC_PER_NODE"], v["MASTER_PORT"]) == (addr, gpus, port)
    assert v["PET_RDZV_ENDPOINT"] == f"{addr}:{port}"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n1"}, "SLURM_JOB_ID is not set"),
        ({**JOB, "SLURM_NTASKS": "four"}, "SLURM_NTASKS='four' is not a number"),
        ({**JOB, "GPUS_PER_NODE": "0"}, "processes per node '0'"),
    ],
)
def test_mistakes_are_one_line_errors(tmp_path, env, message):
    proc, _ = _run_helper(tmp_path, env)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("path", SBATCH, ids=lambda p: p.name)
def test_sbatch_directives(path):
    text = path.read_text()
    directives = dict(
        (m.group(1), m.group(2)) for m in re.finditer(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M)
    )
    assert "requeue" in directives
    assert re.fullmatch(r"B:USR1@\d+", directives.get("signal", "")), directives
    # Directives after the first command are ignored by sbatch: all must come first.
    first_command = min(
        i for i, line in enumerate(text.splitlines()) if line and not line.startswith("#")
    )
    last_directive = max(
        i for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH")
    )
    assert last_directive < first_command
    assert "navil_setup" in text and "navil_srun " in text


def test_what_the_sbatch_files_launch():
    launched = {p.name: re.findall(r"^navil_srun (.*)$", p.read_text(), re.M) for p in SBATCH}
    assert launched["pretrain_navil_2b.sbatch"] == ["bash examples/pretrain_navil_2b.sh"]
    assert launched["pretrain_navil_9b.sbatch"] == ["bash examples/pretrain_navil_9b.sh"]
    tiny = launched["pretrain_navil_tiny.sbatch"]
    assert tiny and tiny[0].startswith("python -m torch.distributed.run -m megatron_navil.train")


def test_shellcheck_clean():
    exe = shutil.which("shellcheck")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail(
                "shellcheck is not installed (.ci/run installs it: apt-get install shellcheck)"
            )
        pytest.skip("shellcheck is not installed (apt-get install shellcheck); CI requires it")
    assert len(SCRIPTS) >= 6, SCRIPTS
    ci = [ROOT / ".ci" / "run", ROOT / ".ci" / "slurm"]
    targets = [str(p.relative_to(ROOT)) for p in [*SCRIPTS, *ci] if p.is_file()]
    proc = subprocess.run(
        [exe, "-x", "--shell=bash", *targets], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

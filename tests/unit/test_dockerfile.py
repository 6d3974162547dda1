"""Dockerfile and .dockerignore, checked without a Docker engine: parse the instructions and check
what a build would depend on (COPY sources exist and are not ignored, pinned versions agree with
the package's pins and megatron-core's declared TransformerEngine range, the install is the one CI
runs, the build-end check names real checks, a non-root user, the entry point exists)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

import megatron_navil
from megatron_navil import env

ROOT = Path(__file__).resolve().parents[2]


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or (stripped.startswith("#") and not pending):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        pending += (" " if pending else "") + stripped.removesuffix("\\").strip()
        if stripped.endswith("\\"):
            continue
        word, _, rest = pending.partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, f"unterminated instruction: {pending}"
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions((ROOT / "Dockerfile").read_text())


def _args(dockerfile) -> dict[str, str]:
    found = {}
    for word, rest in dockerfile:
        if word == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            found[name] = (shlex.split(value) or [""])[0]  # "ARG NAME=": empty
    return found


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; "!" re-includes; a pattern that matches a
    directory excludes everything under it; ``**`` spans directories (also none)."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, p) for p in prefixes):
            ignored = not negate
    return ignored


@pytest.fixture(scope="module")
def ignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [x.strip() for x in lines if x.strip() and not x.startswith("#")]


def test_parser_joins_continuations():
    text = "FROM x\n# c\nRUN a \\\n  # inner\n  && b\nUSER u\n"
    assert instructions(text) == [("FROM", "x"), ("RUN", "a && b"), ("USER", "u")]


def test_copy_sources_exist_and_are_in_the_context(dockerfile, ignore_patterns):
    copies = [rest for word, rest in dockerfile if word in ("COPY", "ADD")]
    assert copies
    for rest in copies:
        words = [w for w in shlex.split(rest) if not w.startswith("--")]
        assert "--from" not in rest, rest
        for src in words[:-1]:
            path = ROOT / src
            assert path.exists(), f"COPY source {src} does not exist"
            assert not _ignored(src.rstrip("/"), ignore_patterns), f"{src} is in .dockerignore"
            files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
            kept = [p for p in files if not _ignored(str(p.relative_to(ROOT)), ignore_patterns)]
            assert kept, f"everything under {src} is ignored"


def test_dockerignore_keeps_data_and_builds_out_but_not_the_package(ignore_patterns):
    ignored = [
        "runs/tiny/ckpt/iter_0000008/x.distcp", "data/synthetic/train.jsonl", "checkpoints/a.pt",
        ".venv/bin/python", "build/temp/x.o", "megatron_navil/_C.cpython-311-x86_64-linux-gnu.so",
        ".git/HEAD", "megatron_navil/__pycache__/env.cpython-311.pyc", "navil-tiny-12.out",
    ]  # fmt: skip
    for path in ignored:
        assert _ignored(path, ignore_patterns), path
    for path in ["megatron_navil/data/loader.py", "megatron_navil/env.py", "csrc/patchify.cpp",
                 "examples/slurm/common.sh", "tools/index_corpus.py", "setup.py"]:  # fmt: skip
        assert not _ignored(path, ignore_patterns), path


def test_pinned_versions_agree(dockerfile):
    args = _args(dockerfile)
    assert args["MCORE_VERSION"] == megatron_navil.MCORE_VERSION
    # setup.py installs exactly the version megatron_navil/__init__.py pins.
    assert "megatron-core=={_const('MCORE_VERSION')}" in (ROOT / "setup.py").read_text()
    base = args["BASE_IMAGE"]  # the GPU path's (and default) base
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base), base
    # The TransformerEngine the base tag carries must be one megatron-core declares support for.
    te_range = env.transformer_engine_range()
    if te_range is None:
        pytest.skip("megatron-core's metadata (its transformer-engine range) is not installed")
    assert env._in_range(args["TE_VERSION"], te_range), (args["TE_VERSION"], te_range)
    assert args["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0"
    env_lines = " ".join(rest for word, rest in dockerfile if word == "ENV")
    assert "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}" in env_lines


def test_install_is_the_ci_install(dockerfile):
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^bash scripts/install\.sh ", ci, re.M), "CI no longer installs this way"
    runs = [rest for word, rest in dockerfile if word == "RUN"]
    # on both paths, as a command of its own (after the CPU path's torch)
    for gpu in ("0", "1"):
        commands = [c.strip() for r in runs for c in re.split(r";|&&", on_path(r, gpu))]
        assert "bash scripts/install.sh --system" in commands, (gpu, runs)
    script = (ROOT / "scripts" / "install.sh").read_text()
    # One pip line installs the package in both modes (venv for CI, --system for the image).
    assert len(re.findall(r'pip_install --no-build-isolation -e "\.\[dev\]"', script)) == 1
    copied = {w.rstrip("/") for word, rest in dockerfile if word == "COPY" for w in rest.split()}
    # What install.sh and setup.py read must be in the image before the install runs.
    for needed in ("setup.py", "pyproject.toml", "scripts", "csrc", "megatron_navil"):
        assert needed in copied, needed


def on_path(run: str, gpu: str) -> str:
    """The shell text of a RUN as the build with NAVIL_GPU=gpu executes it: each
    `if [ "${NAVIL_GPU}" = X ]; then A; [else B;] fi` replaced by the branch taken."""
    pattern = re.compile(
        r'if \[ "\$\{NAVIL_GPU\}" = ([01]) \]; then (.*?)(?:else (.*?))?\bfi\b(?=;|$| )'
    )

    def taken(match: re.Match) -> str:
        value, then, other = match.group(1), match.group(2), match.group(3) or ""
        return then if value == gpu else other

    out = pattern.sub(taken, run)
    assert 'NAVIL_GPU}" =' not in out, out  # every conditional on the path was resolved
    return out


def _required(text: str) -> list[str]:
    """The CHECK names of the one `python -m megatron_navil.env --require ...` in text."""
    (found,) = re.findall(r"python -m megatron_navil\.env --require ([a-z_ ]+)", text)
    return found.split()


def _torch_installs(text: str) -> list[str]:
    """Every `pip install ... torch...` requirement in a shell text (quotes dropped)."""
    found = []
    for command in re.split(r";|&&|\|\|", text):
        words = [w.strip("\"'") for w in command.split()]
        if "pip" in " ".join(words[:4]) and "install" in words:
            found += [w for w in words if re.match(r"torch([=<>~!]|$)", w)]
    return found


def test_parser_resolves_gpu_conditionals():
    run = (
        'a; if [ "${NAVIL_GPU}" = 0 ]; then b; c; fi; d; '
        'if [ "${NAVIL_GPU}" = 1 ]; then e; else f; fi'
    )
    assert on_path(run, "0") == "a; b; c; ; d; f; "
    assert on_path(run, "1") == "a; ; d; e; "
    assert _torch_installs('pip install -q "torch==1+cpu"; python3 -m pip install x') == [
        "torch==1+cpu"
    ]


def test_args_used_after_from_are_in_scope(dockerfile):
    # An ARG declared before FROM is unset after it unless declared again (the image's
    # navil.base-image label was empty until the CPU build showed it).
    start = [w for w, _ in dockerfile].index("FROM")
    declared = {rest.split("=", 1)[0] for w, rest in dockerfile[start:] if w == "ARG"}
    for word, rest in dockerfile[start + 1 :]:
        for name in re.findall(r"\$\{(\w+)\}", rest):
            if word != "RUN" or name in _args(dockerfile):
                assert name in declared, (word, name)


def test_build_args_choose_the_path(dockerfile):
    args = _args(dockerfile)
    assert args["NAVIL_GPU"] == "1"  # the default build is the NGC (GPU) image
    runs = [rest for word, rest in dockerfile if word == "RUN"]
    install = next(r for r in runs if "bash scripts/install.sh --system" in r)
    assert 'case "${NAVIL_GPU}" in 0|1) ;; *)' in install  # a typo'd value fails the build
    env_lines = " ".join(rest for word, rest in dockerfile if word == "ENV")
    assert "NAVIL_SYSTEM_INSTALL=1" in env_lines


def test_build_end_check(dockerfile):
    runs = [rest for word, rest in dockerfile if word == "RUN"]
    final = runs[-1]  # after the install, as the image's user
    assert final.startswith("python -m megatron_navil.env --json > image_env.json && ")
    gpu, cpu = _required(on_path(final, "1")), _required(on_path(final, "0"))
    unknown = (set(gpu) | set(cpu)) - set(env.REQUIREMENTS)
    assert not unknown, unknown
    # The GPU image fails its build unless the whole GPU stack is there.
    assert gpu == ["native_ext", "cuda_ext", "megatron_core_matches_pin",
                   "transformer_engine_in_range", "flash_attn", "apex"]  # fmt: skip
    # The CPU image requires what a CPU build can have, and nothing GPU-only.
    assert cpu == ["native_ext", "megatron_core_matches_pin"]


def _install_script_pin() -> str:
    script = (ROOT / "scripts" / "install.sh").read_text()
    (pin,) = re.findall(r"^\s*pip_install torch==(\S+)$", script, re.M)
    return pin


def test_gpu_path_never_installs_torch(dockerfile, tmp_path):
    runs = [on_path(rest, "1") for word, rest in dockerfile if word == "RUN"]
    for run in runs:
        assert _torch_installs(run) == [], run
        assert "apt-get" not in run and "PIP_CONSTRAINT" not in run, run
    assert any("bash scripts/install.sh --system" in r for r in runs)
    # ... and scripts/install.sh --system itself installs no torch: run it with a stand-in python
    # that records its arguments.
    log = tmp_path / "calls"
    fake = tmp_path / "python3"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    import subprocess

    script = str(ROOT / "scripts" / "install.sh")
    fake_env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake)}
    subprocess.run(["bash", script, "--system"], check=True, env=fake_env, capture_output=True)
    calls = log.read_text().splitlines()
    installs = [c for c in calls if c.startswith("-m pip install")]
    assert any("-e .[dev]" in c for c in installs), calls
    assert _torch_installs("; ".join("pip " + c for c in installs)) == [], installs


def test_cpu_path_installs_exactly_the_ci_torch(dockerfile):
    args = _args(dockerfile)
    # The CPU image's torch is the one CI installs (scripts/install.sh), the +cpu build only.
    assert args["TORCH_VERSION"] == _install_script_pin() == "2.13.0"
    runs = [on_path(rest, "0") for word, rest in dockerfile if word == "RUN"]
    installs = [t for r in runs for t in _torch_installs(r)]
    assert installs == ["torch==${TORCH_VERSION}+cpu"], installs
    (install,) = [r for r in runs if "bash scripts/install.sh --system" in r]
    # pinned for the package install that follows, so nothing can swap in another torch ...
    assert re.search(r'echo "torch==\$\{TORCH_VERSION\}\+cpu" > (\S+);.*export PIP_CONSTRAINT=\1;'
                     r".*bash scripts/install\.sh --system", install)  # fmt: skip
    # ... checked after it, and the compiler is gone before the step's layer is written.
    after = install.split("bash scripts/install.sh --system", 1)[1]
    assert "torch.version.cuda is None" in after
    assert re.search(r"apt-get purge [^;]*g\+\+", after) and "rm -rf /var/lib/apt/lists/*" in after
    assert "rm -rf build /root/.cache" in after


def test_system_install_skips_the_venv(tmp_path):
    import os
    import subprocess

    venv = tmp_path / "venv"
    env_vars = dict(os.environ, NAVIL_SYSTEM_INSTALL="1")
    subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"), str(venv)], check=True,
                   env=env_vars, timeout=30)  # fmt: skip
    assert not venv.exists()


def test_user_workdir_entrypoint(dockerfile):
    words = [w for w, _ in dockerfile]
    assert words[0] in ("ARG", "FROM") and "FROM" in words
    users = [rest for w, rest in dockerfile if w == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "COPY")
    workdir = [rest for w, rest in dockerfile if w == "WORKDIR"][-1]
    entry = [rest for w, rest in dockerfile if w == "ENTRYPOINT"][-1]
    (target,) = json.loads(entry)  # exec form: a JSON list of one path
    assert target.startswith(workdir + "/")
    local = ROOT / target.removeprefix(workdir + "/")
    assert local.is_file() and local.stat().st_mode & 0o111, local


def test_requirement_checks():
    info = {"native_ext": True, "cuda_ext": False, "apex": env.NOT_INSTALLED,
            "transformer_engine_in_range": None, "megatron_core_matches_pin": True,
            "flash_attn": "2.7.4"}  # fmt: skip
    failed = env.missing_requirements(info, sorted(env.REQUIREMENTS))
    assert [f.split("(")[-1] for f in failed] == [
        "apex=not installed)",
        "cuda_ext=False)",
        "transformer_engine_in_range=None)",
    ]
    assert env._in_range("2.10.0+3cd6870c", "<2.12.0,>=2.9.0a0") is True
    assert env._in_range("2.12.0", "<2.12.0,>=2.9.0a0") is False
    assert env._in_range("2.9.0.dev0+abc", "<2.12.0,>=2.9.0a0") is False


def test_entrypoint_runs_examples_by_name_and_commands_as_given(tmp_path):
    import shutil
    import subprocess

    entry = tmp_path / "examples" / "container_entrypoint.sh"
    entry.parent.mkdir()
    shutil.copy(ROOT / "examples" / "container_entrypoint.sh", entry)
    demo = entry.parent / "demo.sh"
    demo.write_text('#!/usr/bin/env bash\necho "demo ran with $*"\n')
    demo.chmod(0o755)

    def run(*args: str) -> str:
        proc = subprocess.run(["bash", str(entry), *args], capture_output=True, text=True,
                              timeout=60, cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    assert run("demo.sh", "a", "b c") == "demo ran with a b c"
    assert run("demo", "x") == "demo ran with x"
    assert run("echo", "plain", "command") == "plain command"
    assert run("./examples/demo.sh", "p") == "demo ran with p"  # a path: run as given

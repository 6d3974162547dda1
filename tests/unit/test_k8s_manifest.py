"""examples/k8s: the PyTorchJob manifest parses and is consistent with itself, the image and the
launch scripts (it was never applied to a cluster here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "examples" / "k8s").glob("*.yaml"))


def _pods(doc: dict) -> dict[str, dict]:
    return doc["spec"]["pytorchReplicaSpecs"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_pytorchjob(path):
    assert MANIFESTS
    doc = yaml.safe_load(path.read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    nproc = int(doc["spec"]["nprocPerNode"])
    pods = _pods(doc)
    assert set(pods) == {"Master", "Worker"} and pods["Master"]["replicas"] == 1
    workdir = "/workspace/megatron_navil/"
    scripts: set[str] = set()
    for role, replica in pods.items():
        spec = replica["template"]["spec"]
        (container,) = spec["containers"]
        assert container["name"] == "pytorch", role  # the training operator's convention
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == nproc
        env = {e["name"]: e["value"] for e in container["env"]}
        assert {"STAGE", "DATA", "SAVE"} <= set(env)
        assert int(env["GPUS_PER_NODE"]) == nproc
        # SIGTERM -> checkpoint must finish before torchrun's SIGKILL, which must come before
        # the kubelet's.
        assert spec["terminationGracePeriodSeconds"] > int(env["PET_SHUTDOWN_TIMEOUT"]) >= 60
        command = " ".join(container["command"] + container["args"])
        entry = re.search(rf"{workdir}(\S+)\s+(\S+)", command)
        assert entry, command
        assert (ROOT / entry.group(1)).is_file()  # examples/container_entrypoint.sh
        script = entry.group(2)
        assert re.fullmatch(r"pretrain_navil_(2b|9b)\.sh", script), script
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert env["SAVE"].startswith(mounts["ckpt"] + "/")
        assert env["DATA"].startswith(mounts["data"] + "/")
        scripts.add(script)
    missing = [s for s in sorted(scripts) if not (ROOT / "examples" / s).is_file()]
    assert not missing, f"the manifest runs examples/{missing}, which do not exist"

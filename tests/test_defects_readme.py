"""Issue 14, a new user's walk through the README: the set-up installs CPU torch on any machine and keeps the
pin, and the examples (run in order by .ci/readme_examples.py in CI) neither collide nor write into the
repository. Fast static checks here; the examples themselves run in the CI step."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _runner():
    spec = importlib.util.spec_from_file_location("readme_examples", ROOT / ".ci" / "readme_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_setup_installs_cpu_torch_that_satisfies_the_pin():
    from packaging.specifiers import SpecifierSet

    setup = _runner().bash_blocks((ROOT / "README.md").read_text())[0][0]
    wanted = re.search(r"torch==(\S+)", setup).group(1)
    assert wanted.endswith("+cpu"), setup  # plain ==2.13.0 resolves to the CUDA build on PyPI
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in setup
    pin = re.search(r'"torch(==[^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert SpecifierSet(pin).contains(wanted), (pin, wanted)


def test_examples_are_found_run_in_order_and_skips_say_why():
    runner = _runner()
    blocks = runner.bash_blocks((ROOT / "README.md").read_text())
    commands = [c for b in blocks[2:] for c in b]
    assert len(commands) >= 10 and any(c.startswith("yolo7-bench") for c in commands)
    assert runner.skip_reason("yolo7-export best.pt --nms efficient --trt") and runner.skip_reason("pip install x")
    assert runner.skip_reason("yolo7-export best.pt --fp16") is None
    text = "```bash\na \\\n  --b\n# comment\n\nc\n```\n```\nnot run\n```\n"
    assert runner.bash_blocks(text) == [["a  --b", "c"]]


def test_examples_write_only_into_ignored_or_scratch_paths():
    commands = [c for b in _runner().bash_blocks((ROOT / "README.md").read_text()) for c in b]
    for c in commands:
        for flag, path in re.findall(r"(-o|--out|--calib-cache|--timing-cache|--triton)\s+(\S+)", c):
            assert not path.startswith(("docs", "tests", "exporter", "runtimes", "benchmarks", ".ci")), c
            assert flag != "--calib-cache" or path.startswith("out/"), c
    readme = (ROOT / "README.md").read_text()
    assert "-o docs/" not in readme and "--calib-cache calib.json" not in readme


SETTING_FLAGS = {"--img": 2, "--imgsz": 2, "--batch": 1, "--dynamic-batch": 0, "--dynamic": 0, "--min-img": 2,
                 "--max-img": 2, "--nms": 1, "--conf": 1, "--iou": 1, "--topk": 1, "--agnostic": 0, "--best-class": 0,
                 "--nms-candidates": 1, "--trt": 0, "--trt-lib": 1, "--version-compatible": 0}


def test_readme_exports_in_one_folder_never_need_overwrite():
    """Run in order, two yolo7-export examples writing the same artifact name into one folder with other
    settings would stop with exit 2 (artifacts.refuse_replacing): each configuration needs its own -o."""
    import shlex

    seen: dict[tuple[str, str, str], tuple[str, str]] = {}
    for block in _runner().bash_blocks((ROOT / "README.md").read_text())[2:]:
        for command in block:
            words = shlex.split(command, comments=True)
            if words[:1] != ["yolo7-export"] or len(words) < 2 or words[1].startswith("-"):
                continue
            out, precision, settings, i = "out", "fp32", [], 2
            while i < len(words):
                w = words[i]
                if w in ("-o", "--out"):
                    out, i = words[i + 1].rstrip("/"), i + 2
                    continue
                if w in ("--fp16", "--int8"):
                    precision = w[2:]
                n = SETTING_FLAGS.get(w)
                if n is not None:
                    values = [v for v in words[i + 1:i + 1 + n] if not v.startswith("-")]
                    settings.append(" ".join([w, *values]))
                    i += 1 + len(values)
                    continue
                i += 1
            key = (out, Path(words[1]).stem, precision)
            value = " ".join(sorted(settings))
            if key in seen:
                assert seen[key][0] == value, (f"{command!r} would be refused: {seen[key][1]!r} wrote "
                                               f"{key[0]}/{key[1]} with other settings; give it its own -o")
            seen[key] = (value, command)
    assert len(seen) >= 5

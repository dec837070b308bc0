"""The scripts in examples/ run for a few steps (in-process, through their ``main(argv)``), and the AT
diffusers loop differs from the plain one by at most 10 lines: the diff the README shows."""

import difflib
import math
import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


pytestmark = pytest.mark.usefixtures("one_thread")


def run_example(name: str, capsys, *argv: str) -> str:
    main = runpy.run_path(str(EXAMPLES / name))["main"]
    capsys.readouterr()
    main([str(a) for a in argv])
    return capsys.readouterr().out


def losses(out: str) -> list[float]:
    values = [float(v) for v in re.findall(r"^step \d+ loss (\S+)", out, flags=re.M)]
    assert values and all(math.isfinite(v) for v in values), out
    return values


def needs(module: str, package: str | None = None):
    return pytest.importorskip(module, reason=f"{package or module} not installed (pip install -e '.[test]')")


SMALL = ["--steps", "2", "--batch-size", "4", "--image-size", "8", "--sample-steps", "2"]


@pytest.mark.parametrize(
    "script,extra",
    [
        ("diffusers_unet2d_plain.py", []),
        ("diffusers_unet2d.py", []),
        ("diffusers_unet2d.py", ["--accelerate", "--prediction-type", "v_prediction"]),
    ],
)
def test_diffusers_examples_run(capsys, tmp_path, script, extra):
    needs("diffusers")
    if "--accelerate" in extra:
        needs("accelerate")
    out = run_example(script, capsys, *SMALL, *extra, "--out", tmp_path / "pipe")
    assert len(losses(out)) == 1 and "sampled 4 images of (8, 8, 3)" in out
    assert (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_lucidrains_example_runs(capsys):
    needs("denoising_diffusion_pytorch", "denoising-diffusion-pytorch")
    out = run_example("lucidrains_unet.py", capsys, *SMALL, "--dim", "8")
    assert "prediction v, mode adv" in out and "'gain'" in out
    assert len(losses(out)) == 1 and "diffusion.sample: (4, 3, 8, 8)" in out


def test_ops_only_example_runs(capsys):
    out = run_example("ops_only_loop.py", capsys, "--steps", "3", "--batch-size", "8")
    assert len(losses(out)) == 1


def code_diff() -> list[str]:
    """The unified diff of the plain loop against the AT loop, module docstrings left out."""

    def code(name: str) -> list[str]:
        text = (EXAMPLES / name).read_text()
        body = text.split('"""', 2)[2]  # after the module docstring
        return body.lstrip("\n").splitlines()

    diff = difflib.unified_diff(
        code("diffusers_unet2d_plain.py"),
        code("diffusers_unet2d.py"),
        "diffusers_unet2d_plain.py",
        "diffusers_unet2d.py",
        lineterm="",
        n=1,
    )
    return list(diff)


def test_at_is_at_most_ten_changed_lines_and_the_readme_shows_the_diff():
    diff = code_diff()
    changed = [ln for ln in diff[2:] if ln[:1] in "+-" and ln[1:].strip()]
    assert 0 < len(changed) <= 10, "\n".join(changed)
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```diff\n(.*?)```", readme, flags=re.S)
    assert block is not None, "the README has no ```diff block"
    assert block.group(1).rstrip("\n").splitlines() == diff, "README's diff is stale:\n" + "\n".join(diff)

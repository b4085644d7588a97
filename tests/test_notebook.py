"""The Colab notebook (experiments/stego_jax_colab.ipynb) runs top to bottom on a CPU with DEMO = True.

Executed with nbclient + ipykernel when both are installed, otherwise cell by cell in one namespace in
a fresh Python process (the notebook has no IPython magics or shell lines, so it is plain Python).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "experiments" / "stego_jax_colab.ipynb"

# Runs each code cell of the notebook (argv[1]) in one namespace; a failure names the cell.
RUNNER = r"""
import json, sys
nb = json.load(open(sys.argv[1]))
ns = {"__name__": "__main__"}
for i, cell in enumerate(nb["cells"]):
    if cell["cell_type"] != "code":
        continue
    src = "".join(cell["source"])
    print(f"--- cell {i}", flush=True)
    exec(compile(src, f"<notebook cell {i}>", "exec"), ns)
print("--- notebook finished", flush=True)
"""


def _cells(kind: str) -> list[str]:
    nb = json.loads(NOTEBOOK.read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == kind]


def test_notebook_structure():
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["nbformat"] == 4
    assert {c["cell_type"] for c in nb["cells"]} == {"markdown", "code"}
    code = _cells("code")
    # One parameter cell first, holding the switch.
    assert re.search(r"^DEMO = True\b", code[0], re.M), "the first code cell must set DEMO = True"
    assert "STEGO_NOTEBOOK_WORKDIR" in code[0]
    # Plain Python: no magics or shell escapes, so the same cells run in a kernel and in a script.
    for src in code:
        for line in src.splitlines():
            assert not line.lstrip().startswith(("!", "%")), f"magic/shell line in the notebook: {line!r}"
        compile(src, "<cell>", "exec")
    joined = "\n".join(code)
    # The real path is the package's public entry points, not a stand-in.
    for needle in ("load_backbone(config.model.backbone", "stego_jax.data.prepare", "knn.run(config)",
                   "train_and_evaluate(config, WORKDIR)", "evaluate(config, WORKDIR", "predict_folder(",
                   "configs/cocostuff27_vits8.py", 'load_config_file("configs/demo.py", "tiny")'):
        assert needle in joined, needle


def _have_kernel() -> bool:
    try:
        import ipykernel  # noqa: F401
        import nbclient  # noqa: F401
        import nbformat  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
def test_notebook_runs_demo_on_cpu(tmp_path):
    workdir = tmp_path / "run"
    env = _env(workdir)
    _execute(NOTEBOOK, env)

    results = (workdir / "results.md").read_text()
    rows = [line for line in results.splitlines() if line.startswith(("| cluster", "| kmeans"))]
    assert rows, results
    for row in rows:  # Acc and mIoU are real numbers in [0, 100]
        nums = [float(x) for x in re.findall(r"\d+\.\d+", row)]
        assert nums and all(0.0 <= x <= 100.0 for x in nums), row
    res = json.loads((workdir / "results.json").read_text())["results"]
    assert {"cluster", "linear", "kmeans"} <= set(res)
    assert sorted((workdir / "overlays").glob("*.png")), "no evaluation overlays"
    assert sorted((workdir / "predictions" / "overlays").glob("*.png")), "no prediction overlays"
    assert len(list((workdir / "predictions" / "labels").glob("*.png"))) == 4


def _env(workdir: Path) -> dict:
    env = dict(os.environ)
    # A plain one-device CPU, as a user's machine: drop the test session's 8 simulated devices.
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    env.update(STEGO_NOTEBOOK_WORKDIR=str(workdir), MPLBACKEND="Agg", JAX_PLATFORMS="cpu",
               TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _execute(notebook: Path, env: dict) -> None:
    if _have_kernel():
        import nbclient
        import nbformat

        nb = nbformat.read(str(notebook), as_version=4)
        old = dict(os.environ)
        os.environ.update(env)
        try:
            nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                    resources={"metadata": {"path": str(ROOT)}}).execute()
        finally:
            os.environ.clear()
            os.environ.update(old)
    else:
        proc = subprocess.run([sys.executable, "-c", RUNNER, str(notebook)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"notebook failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        assert "--- notebook finished" in proc.stdout


# The real path's backbones: a random one-block DINO ViT (npz), and the DINOv2 _reg checkpoint with
# random weights written by the official code (tests/fixtures/make_dinov2_fixtures.py) under its
# own experiment config, patch 14.
REAL_PATH_CASES = {
    "dino": ("configs/cocostuff27_vits8.py", {"data.res": 32, "eval.res": 32}),
    "dinov2": ("configs/cocostuff27_dinov2_vitb14.py",
               {"model.backbone": str(ROOT / "tests" / "fixtures" / "dinov2_swiglu_reg.pth"),
                "model.num_heads": 2, "data.res": 28, "eval.res": 28}),
}


@pytest.mark.slow
@pytest.mark.parametrize("backbone", sorted(REAL_PATH_CASES))
def test_notebook_real_path_on_fake_cocostuff(tmp_path, backbone):
    """DEMO = False end to end (prepare CLI, k-NN, train, evaluate, predict) on a fake 6-image COCO-Stuff
    layout with a random-weight backbone given as a local weights file instead of a download."""
    try:
        from tests.test_reproduce_scripts import _fake_cocostuff, _random_dino
    except ImportError:
        from test_reproduce_scripts import _fake_cocostuff, _random_dino

    _fake_cocostuff(tmp_path / "raw")
    _random_dino(tmp_path / "vit.npz")
    config_file, extra = REAL_PATH_CASES[backbone]
    overrides = {"model.backbone": str(tmp_path / "vit.npz"), "num_steps": 2, "batch_size": 4,
                 "log_every": 1, "eval_every": 2, "checkpoint_every": 2, "eval.batch_size": 2,
                 "data.num_workers": 1, "knn.k": 3, "knn.num_neighbors": 2, **extra}
    nb = json.loads(NOTEBOOK.read_text())
    first = next(c for c in nb["cells"] if c["cell_type"] == "code")
    first["source"] = "".join(first["source"]) + f"""
DEMO = False
CONFIG = {config_file!r}
DATA_RAW = {str(tmp_path / "raw")!r}
DATA_DIR = {str(tmp_path / "prepared")!r}
OVERRIDES = {overrides!r}
"""
    patched = tmp_path / "real.ipynb"
    patched.write_text(json.dumps(nb))
    workdir = tmp_path / "run"
    _execute(patched, _env(workdir))
    assert (tmp_path / "prepared" / "manifest.json").exists()
    assert "| cluster+crf |" in (workdir / "results.md").read_text()
    assert sorted((workdir / "predictions" / "overlays").glob("*.png"))
    run = json.loads((workdir / "config.json").read_text())
    assert (run["model"]["backbone"], run["model"]["patch_size"]) == (overrides["model.backbone"],
                                                                     14 if backbone == "dinov2" else 8)

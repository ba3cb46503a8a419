"""The bad-input catalogue (README, "When something goes wrong"): every case ends in one
line on stderr that names the problem, a non-zero exit code, and no file that looks like
a finished result. Runs the real command line in-process (the same `main` the console
script calls), so each case costs what the failure costs, not an interpreter start."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import yaml

from klbench.cli import main

REPO = Path(__file__).resolve().parents[1]
BASE = [str(REPO / "config" / "config.yaml"), str(REPO / "config" / "smoke.yaml")]


def write_yaml(path: Path, values) -> str:
    path.write_text(yaml.safe_dump(values) if not isinstance(values, str) else values)
    return str(path)


def train(tmp: Path, override=None, dataset="checkerboard", model="vae", config=None, out=None) -> list[str]:
    files = config if config is not None else BASE + ([write_yaml(tmp / "override.yaml", override)] if override else [])
    return ["train", *(a for f in files for a in ("--config", f)), "--dataset", dataset, "--model", model,
            "--seed", "0", "--out", str(out or tmp / "run"), "--no-progress"]


def below_a_file(tmp: Path) -> Path:
    """A run directory that cannot be created, even by root: its parent is a regular file."""
    (tmp / "a-file").write_text("")
    return tmp / "a-file" / "run"


def idx_folder(tmp: Path, truncate: bool) -> Path:
    """MNIST-named IDX files of 4 images; optionally the training images cut short."""
    folder = tmp / "idx"
    folder.mkdir()
    images = np.zeros((4, 28, 28), dtype=np.uint8)
    labels = np.arange(4, dtype=np.uint8)
    for prefix in ("train", "t10k"):
        image_bytes = bytes([0, 0, 8, 3]) + np.array([4, 28, 28], ">i4").tobytes() + images.tobytes()
        if truncate and prefix == "train":
            image_bytes = image_bytes[:500]
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(image_bytes)
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as handle:
            handle.write(bytes([0, 0, 8, 1]) + np.array([4], ">i4").tobytes() + labels.tobytes())
    return folder


def a_finished_run(tmp: Path) -> Path:
    """A real finished run (a few steps) to corrupt."""
    run = tmp / "done"
    override = write_yaml(tmp / "short.yaml", {"train": {"steps": 6}, "tracking_uri": f"sqlite:///{tmp}/mlflow.db"})
    assert main(["train", *(a for f in [*BASE, override] for a in ("--config", f)), "--dataset", "checkerboard",
                 "--model", "vae", "--seed", "0", "--out", str(run), "--no-progress"]) == 0
    return run


# (id, argv builder(tmp) -> list[str], expected words in the one line)
CASES = [
    ("unknown-dataset", lambda t: train(t, dataset="mnist9k"), "unknown dataset 'mnist9k'; known datasets:"),
    ("unknown-model", lambda t: train(t, model="vea"), "unknown model 'vea'"),
    ("unknown-config-key", lambda t: train(t, override={"trian": {"steps": 2}}), "unknown config key 'trian'"),
    ("wrong-type", lambda t: train(t, override={"train": {"steps": "ten"}}), "config key 'train.steps'"),
    ("negative-steps", lambda t: train(t, override={"train": {"steps": -5}}), "config key 'train.steps'"),
    ("beta-not-positive", lambda t: train(t, override={"models": {"vae": {"params": {"beta": 0.0}}}}),
     "models.vae"),
    ("seeds-not-integers", lambda t: train(t, override={"seeds": ["a", 1]}), "config key 'seeds.0'"),
    ("iwae-k-not-dividing", lambda t: train(t, override={"families": {"vae": {"evaluate": {"iwae_k": [1, 3, 64]}}}}),
     "every iwae_k must divide the largest"),
    ("unknown-dataset-option", lambda t: train(t, override={"datasets": {"checkerboard": {"options": {"n_trian": 9}}}}),
     "has no option 'n_trian'"),
    ("missing-config-file", lambda t: train(t, config=[str(t / "nope.yaml")]), "cannot read config file"),
    ("invalid-yaml", lambda t: train(t, config=[write_yaml(t / "bad.yaml", "train: [steps: 3\n")]),
     "is not valid YAML"),
    ("bad-spec-json", lambda t: ["train", "--spec", "{not json", "--out", str(t / "run")], "--spec is not valid JSON"),
    ("missing-idx-file", lambda t: train(t, dataset="mnist", override={"datasets": {"mnist": {"options": {
        "path": str((t / "empty").mkdir() or t / "empty")}}}}), "train-images-idx3-ubyte"),
    ("truncated-idx-file", lambda t: train(t, dataset="mnist", override={"datasets": {"mnist": {"options": {
        "path": str(idx_folder(t, truncate=True))}}}}), "train-images-idx3-ubyte"),
    ("unwritable-results-dir", lambda t: train(t, override={"tracking_uri": f"sqlite:///{t}/mlflow.db"},
                                               out=below_a_file(t)), "cannot write the run directory"),
    ("unreachable-tracking-uri", lambda t: train(t, override={"tracking_uri": "http://127.0.0.1:9"}),
     "cannot use MLflow tracking store http://127.0.0.1:9"),
    ("corrupt-tracking-db", lambda t: train(t, override={"tracking_uri": f"sqlite:///{garbage(t / 'mlflow.db')}"}),
     "cannot use MLflow tracking store"),
    # on the model: it beats the dataset and family budgets of the default (config/README.md)
    ("diverging-loss", lambda t: train(t, override={"models": {"vae": {"train": {"lr": 1e12}}},
                                                     "tracking_uri": f"sqlite:///{t}/mlflow.db"}),
     "NaN/inf"),
    ("corrupt-checkpoint", lambda t: ["evaluate", str(corrupt(a_finished_run(t)))], "cannot load checkpoint"),
    ("not-a-run-dir", lambda t: ["verify", str(t)], "is not a finished run"),
]


def garbage(path: Path) -> Path:
    path.write_bytes(b"this is not an SQLite database" * 100)
    return path


def corrupt(run: Path) -> Path:
    (run / "model.pt").write_bytes(b"\x80\x02not a zip archive")
    (run / "ledger.json").unlink()  # what remains of the run must not look complete to the assertion below
    return run


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_naming_the_problem_and_leaves_no_result(case, tmp_path, monkeypatch, capsys):
    _, argv, expected = case
    monkeypatch.chdir(tmp_path)
    args = argv(tmp_path)
    capsys.readouterr()  # drop what building the case printed
    status = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status != 0
    assert len(lines) == 1 and lines[0].startswith("klbench: error: "), err
    assert expected in lines[0]
    # (MLflow's artifact copies of the finished run that a case corrupts do not count)
    results = [p for p in tmp_path.rglob("ledger.json") if "mlruns" not in p.parts]
    assert not results, "a failed command left a result that looks complete"
    assert not list(tmp_path.rglob(".staging"))

"""Where a result came from: code version, library versions, device."""

import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

import klbench

PACKAGES = ("torch", "numpy", "mlflow", "snakemake", "pandas", "scikit-learn")


def git_state() -> dict[str, str | bool]:
    """Commit and dirty flag of the git checkout that holds the klbench source, if any."""
    source = Path(klbench.__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(source), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": False}
    return {"git_commit": commit, "git_dirty": dirty}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "klbench": klbench.__version__}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {platform.processor() or 'unknown'})"

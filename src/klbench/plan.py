"""What the workflow schedules, computed from a config and cached, so that parsing the
Snakefile does not import torch.

The workflow needs the validated config, the grid of runs, each job's resolved run configs
(its `params`, whose change re-runs it) and the planned figures. Computing them imports the
model families, and with them torch: about 1.5 s of every `snakemake` call, including a
no-op one. `workflow_plan` computes them once and keeps them in a JSON file keyed by the
config and by the contents of klbench's own source files, so any change to either computes
them again; a config error is raised, never cached.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parent


def source_hash() -> str:
    """A hash of every source and schema file of the installed klbench package."""
    digest = hashlib.sha256()
    for path in sorted(p for p in PACKAGE.rglob("*") if p.suffix in (".py", ".yaml") and p.is_file()):
        digest.update(str(path.relative_to(PACKAGE)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def block_label(block: tuple[int, ...] | list[int]) -> str:
    return "_".join(map(str, block))


def job_spec(bench: Mapping[str, Any], dataset: str, model: str, block: tuple[int, ...] | list[int]) -> str:
    """A training job's `--spec`: the resolved run configs of its seeds, as compact JSON."""
    from klbench.config import resolve_run

    return json.dumps([resolve_run(bench, dataset, model, seed).to_dict() for seed in block],
                      sort_keys=True, separators=(",", ":"))


def compute_plan(raw_config: Mapping[str, Any]) -> dict[str, Any]:
    """The plan of a config (imports every family): ConfigError for a bad config."""
    from dataclasses import asdict

    from klbench.config import expand_models, job_resources, run_grid, seed_blocks, validate_config
    from klbench.figures import plan_figures
    from klbench.models import get_family
    from klbench.run import RUN_FILES

    bench = validate_config(raw_config)
    grid = run_grid(bench)
    variants = expand_models(bench)
    pairs = list(dict.fromkeys((d, m) for d, m, _ in grid))
    blocks = seed_blocks(bench["seeds"], bench["seeds_per_job"])
    specs = {f"{d}/{m}/{block_label(block)}": job_spec(bench, d, m, block) for d, m in pairs for block in blocks}
    figures = plan_figures([(d, get_family(variants[m]["family"])) for d, m in pairs])
    return {"bench": bench, "grid": [list(point) for point in grid], "blocks": [list(b) for b in blocks],
            "families": {m: variants[m]["family"] for _, m in pairs}, "specs": specs,
            "figures": [asdict(figure) for figure in figures], "run_files": list(RUN_FILES),
            "resources": {d: job_resources(bench, d) for d in dict.fromkeys(d for d, _ in pairs)}}


def workflow_plan(raw_config: Mapping[str, Any], cache_dir: Path) -> dict[str, Any]:
    """The plan of a config, from cache_dir if it was computed for this config and this code."""
    key = hashlib.sha256(json.dumps([raw_config, source_hash()], sort_keys=True, default=str).encode()).hexdigest()
    path = Path(cache_dir) / f"plan-{key[:24]}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    text = json.dumps(compute_plan(raw_config))
    plan = json.loads(text)  # what a cache hit returns: the same lists and dicts either way
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)  # parallel parses (cluster jobs) never see half a file
    except OSError:
        pass  # a read-only folder: no cache, the plan is still right
    return plan

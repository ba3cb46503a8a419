# Config validation, the grid and input getters. No math here.
import json
import sys
from pathlib import Path

from klbench.config import expand_models, resolve_run, run_grid, seed_blocks, validate_config
from klbench.errors import ConfigError
from klbench.figures import plan_figures
from klbench.forkserver import start_server, stop_server
from klbench.run import RUN_FILES
from klbench.models import get_family

try:
    BENCH = validate_config(config)
except ConfigError as error:
    # sys.exit prints just this line; a WorkflowError would add the Snakefile's traceback
    sys.exit(f"klbench config error: {error}")

RESULTS = BENCH["results_dir"]
GRID = run_grid(BENCH)
VARIANTS = expand_models(BENCH)
RUN_DIR = RESULTS + "/runs/{dataset}/{model}/seed{seed}"
SEED_BLOCKS = seed_blocks(BENCH["seeds"], BENCH["seeds_per_job"])
# the comparison figures, as the families of the grid declare them (name, drawing, report category)
FIGURES = plan_figures([(d, get_family(VARIANTS[m]["family"])) for d, m, _ in dict.fromkeys((d, m, 0) for d, m, _ in GRID)])
# (family, dataset, model) of every trained pair: its first seed's figure goes into the report
PAIRS = list(dict.fromkeys((VARIANTS[m]["family"], d, m) for d, m, _ in GRID))


wildcard_constraints:
    family="[^/]+",
    dataset="[^/]+",
    model="[^/]+",
    seed=r"\d+",


def run_specs(wildcards, block):
    """The resolved run configs of a job's seeds as JSON: a change to them re-runs just that job
    (params trigger)."""
    runs = [resolve_run(BENCH, wildcards.dataset, wildcards.model, seed).to_dict() for seed in block]
    return json.dumps(runs, sort_keys=True, separators=(",", ":"))


def all_ledgers():
    return [
        RUN_DIR.format(dataset=d, model=m, seed=s) + "/ledger.json" for d, m, s in GRID
    ]


def tracking_args():
    uri = BENCH["tracking_uri"]
    families = sorted({VARIANTS[m]["family"] for _, m, _ in GRID})
    return " ".join(([f"--uri {uri}"] if uri else []) + [f"--experiment {f}" for f in families])


FORK_SERVER = {}


onstart:
    # A new SQLite store crashes when parallel jobs create it at once: create it first.
    shell(f"klbench init-tracking {tracking_args()}")
    # One process holds torch, klbench and MLflow imported; every training job forks from it
    # (src/klbench/forkserver.py) instead of paying ~4 s of CPU for the imports.
    if BENCH["fork_server"]:
        FORK_SERVER["socket"] = start_server(Path(RESULTS) / "logs" / "fork_server.log")


onsuccess:
    stop_server(FORK_SERVER.get("socket"))


onerror:
    stop_server(FORK_SERVER.get("socket"))

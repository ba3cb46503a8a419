# Config validation, the grid and input getters. No math here.
import json
import os
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

from klbench.errors import ConfigError
from klbench.forkserver import start_server, stop_server
from klbench.config import job_resources
from klbench.plan import block_label, job_spec, workflow_plan

try:
    # validated config, grid, each job's run configs, figures: cached per config and klbench
    # source, so that a parse (a no-op run included) does not import torch
    PLAN = workflow_plan(config, Path(".snakemake") / "klbench")
except ConfigError as error:
    # sys.exit prints just this line; a WorkflowError would add the Snakefile's traceback
    sys.exit(f"klbench config error: {error}")

BENCH = PLAN["bench"]
RESULTS = BENCH["results_dir"]
GRID = [tuple(point) for point in PLAN["grid"]]
FAMILY_OF = PLAN["families"]  # model variant -> family
RUN_DIR = RESULTS + "/runs/{dataset}/{model}/seed{seed}"
RUN_FILES = PLAN["run_files"]
SEED_BLOCKS = [tuple(block) for block in PLAN["blocks"]]
# the comparison figures, as the families of the grid declare them (name, drawing, report category)
FIGURES = [SimpleNamespace(**figure) for figure in PLAN["figures"]]
# (family, dataset, model) of every trained pair: its first seed's figure goes into the report
PAIRS = list(dict.fromkeys((FAMILY_OF[m], d, m) for d, m, _ in GRID))
# what a training job asks a cluster scheduler for, per dataset (config `resources`)
TRAIN_RESOURCES = PLAN["resources"]
# Aggregation, figures and the report read results files in seconds to minutes: they run on
# the submitting machine (localrules), and these are what they declare there.
LOCAL_RESOURCES = {"mem_mb": 2000, "runtime": 30}
# Run locally, at most one training job per CPU at a time, whatever --cores says: the jobs are
# single-threaded torch on small MLPs, and more of them than CPUs only share the CPUs and
# their caches (on 2 CPUs the default benchmark's jobs took a third less CPU time two at a time
# than eight at a time: README, "Cores"). `--resources cpus=N` overrides it. A cluster executor places jobs on its own nodes and gets no such limit.
CPU_LIMIT = {}
if workflow.local_exec:
    CPU_LIMIT["cpus"] = lambda wildcards, threads: threads
    if "cpus" not in workflow.global_resources:
        workflow.register_resource("cpus", os.cpu_count() or 1)


localrules:
    all,
    summary,
    figures,
    run_figure,
    mlflow_summary,


def train_resource(name):
    """A training job's resource `name` for its dataset, as a Snakemake resource callable."""
    def resource(wildcards):
        return (TRAIN_RESOURCES.get(wildcards.dataset) or job_resources(BENCH, wildcards.dataset))[name]
    return resource


wildcard_constraints:
    family="[^/]+",
    dataset="[^/]+",
    model="[^/]+",
    seed=r"\d+",


def run_specs(wildcards, block):
    """The resolved run configs of a job's seeds as JSON: a change to them re-runs just that job
    (params trigger). A pair outside the grid (a file asked for by hand) is resolved here."""
    key = f"{wildcards.dataset}/{wildcards.model}/{block_label(block)}"
    if key not in PLAN["specs"]:
        try:
            return job_spec(BENCH, wildcards.dataset, wildcards.model, block)
        except ConfigError as error:
            sys.exit(f"klbench config error: {error}")
    return PLAN["specs"][key]


def all_ledgers():
    return [
        RUN_DIR.format(dataset=d, model=m, seed=s) + "/ledger.json" for d, m, s in GRID
    ]


def tracking_args():
    uri = BENCH["tracking_uri"]
    families = sorted({FAMILY_OF[m] for _, m, _ in GRID})
    return " ".join(([f"--uri {uri}"] if uri else []) + [f"--experiment {f}" for f in families])


FORK_SERVER = {}


onstart:
    # (a cluster executor has no --cores: its jobs run on other machines)
    if workflow.local_exec and workflow.cores > (os.cpu_count() or 1):
        print(f"klbench: --cores {workflow.cores} on {os.cpu_count()} CPUs: training jobs run one per CPU "
              "at a time (README, 'Cores')", file=sys.stderr)
    # A new SQLite store crashes when parallel jobs create it at once: create it first.
    shell(f"klbench init-tracking {tracking_args()}")
    # One process holds torch, klbench and MLflow imported; every training job forks from it
    # (src/klbench/forkserver.py) instead of paying ~4 s of CPU for the imports. Only for local
    # execution: a cluster job must run under its scheduler's limits, on its own node.
    if BENCH["fork_server"] and workflow.local_exec:
        FORK_SERVER["socket"] = start_server(Path(RESULTS) / "logs" / "fork_server.log")


onsuccess:
    stop_server(FORK_SERVER.get("socket"))


onerror:
    stop_server(FORK_SERVER.get("socket"))

"""Command line: `klbench train | evaluate | verify | aggregate | plot | summary-run | grid | schema | settings | init-tracking | fork-server`.

User errors (KlbenchError) end in one line on stderr and exit code 2; the traceback is
kept for bugs only.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

from klbench.errors import CheckpointError, ConfigError, DataError, KlbenchError


def _run_configs(args: argparse.Namespace) -> list:
    """The runs of one job: --spec (one run config as JSON, or a list of the seeds of one
    job), or --config with --dataset, --model and one or more --seed."""
    from klbench.config import RunConfig, load_config, resolve_run, validate_config

    if args.spec:
        try:
            spec = json.loads(args.spec)
        except json.JSONDecodeError as error:
            raise ConfigError(f"--spec is not valid JSON: {error}") from None
        return [RunConfig.from_dict(one) for one in (spec if isinstance(spec, list) else [spec])]
    if not (args.config and args.dataset and args.model and args.seed):
        raise ConfigError("give --spec JSON, or --config FILE with --dataset, --model and --seed")
    # Any dataset/model/seed may be run by hand, in the grid or not; resolve_run checks the names.
    config = validate_config(load_config(args.config))
    return [resolve_run(config, args.dataset, args.model, seed) for seed in args.seed]


def cmd_train(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from klbench.run import execute_runs

    runs = _run_configs(args)
    if args.threads:
        runs = [replace(run, threads=args.threads) for run in runs]
    if args.out and len(args.out) != len(runs):
        raise ConfigError(f"give one --out per run: {len(runs)} runs, {len(args.out)} --out")
    outs = ([Path(out) for out in args.out] if args.out else
            [Path("results/runs") / run.dataset / run.model / f"seed{run.seed}" for run in runs])
    execute_runs(runs, outs, progress=args.progress)


def cmd_evaluate(args: argparse.Namespace) -> None:
    import torch

    from klbench.config import RunConfig
    from klbench.data import load_dataset
    from klbench.evaluate import evaluate
    from klbench.models import get_family
    from klbench.train import seed_everything

    run_dir = Path(args.run_dir)
    try:
        run = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {run_dir / 'config.json'}: {error}") from None
    # the training split the model was built on: without the validation cut (BBB's N, say) it would differ
    dataset = load_dataset(run.dataset, **run.dataset_options).with_validation(run.train.validation)
    family = get_family(run.family)
    model = family.build(run.params, dataset)
    checkpoint = run_dir / "model.pt"
    try:
        # weights_only: a checkpoint is data, never code to unpickle
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a corrupt file
        # (not torch's own message: it suggests weights_only=False, i.e. running untrusted code)
        raise CheckpointError(f"cannot load checkpoint {checkpoint}: not a readable state_dict "
                              f"({type(error).__name__}); re-run the training job to rebuild it") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {checkpoint} does not fit the model in config.json: "
                              f"{str(error).splitlines()[0]}") from None
    torch.set_num_threads(run.threads)
    seed_everything(run.seed)
    with tempfile.TemporaryDirectory() as scratch:  # diagnostics' files are not wanted here
        result = evaluate(model, family, dataset, run.evaluate, Path(scratch), run.params)
    print(json.dumps(result.ledger, indent=2))


def cmd_verify(args: argparse.Namespace) -> int:
    from klbench.verify import verify_run

    result = verify_run(Path(args.run_dir))
    job = (f"re-run in its job with seeds {', '.join(map(str, result.job_seeds))}"
           + (", stacked" if result.stacked else ", one by one"))
    if result.identical:
        print(f"{args.run_dir}: identical (ledger.json byte for byte; {job})")
        return 0
    print(f"{args.run_dir}: {job}")
    print(f"{args.run_dir}: differs in {len(result.differences)} value(s):")
    for difference in result.differences:
        print(f"  {difference.describe()}")
    return 1


def cmd_aggregate(args: argparse.Namespace) -> None:
    from klbench.aggregate import write_summary, write_tables

    table = write_summary([Path(p) for p in args.ledgers], Path(args.out))
    print(f"wrote {args.out}: {len(table)} runs", file=sys.stderr)
    if args.tables:
        baselines = dict(pair.split("=", 1) for pair in args.baseline)
        server = Path(args.fork_server_info) if args.fork_server_info else None
        server_startup = json.loads(server.read_text())["startup_cpu_s"] if server and server.exists() else 0.0
        published = json.loads(args.published) if args.published else []
        paths = write_tables(table, Path(args.tables), baselines, server_startup, published)
        print(f"wrote {', '.join(p.stem for p in paths.values())} tables (CSV and Markdown) to {args.tables}",
              file=sys.stderr)


def cmd_plot(args: argparse.Namespace) -> None:
    import pandas as pd

    from klbench.figures import plan_figures, plot_results
    from klbench.models import get_family

    try:
        pairs = pd.read_csv(args.summary, usecols=["dataset", "family"]).drop_duplicates()
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read the summary table {args.summary}: {error}") from None
    plan = plan_figures([(d, get_family(f)) for d, f in pairs.itertuples(index=False)])
    captions = plot_results(Path(args.summary), Path(args.runs), Path(args.out), plan)
    print(f"wrote {len(captions)} figures (PNG and PDF) to {args.out}", file=sys.stderr)


def cmd_summary_run(args: argparse.Namespace) -> None:
    import pandas as pd

    from klbench.provenance import git_state
    from klbench.run import write_json
    from klbench.tracking import log_pipeline_summary, resolve_tracking_uri

    summary = pd.read_csv(args.summary)
    folders = {name: sorted(p for p in Path(folder).iterdir() if p.is_file())
               for name, folder in (("tables", args.tables), ("figures", args.figures)) if folder}
    tags = {**git_state(), "datasets": ",".join(sorted(summary["dataset"].unique())),
            "models": ",".join(sorted(summary["model"].unique()))}
    metrics = {"runs": len(summary), "datasets": summary["dataset"].nunique(), "models": summary["model"].nunique(),
               "dirty_runs": int(summary["git_dirty"].astype(bool).sum())}
    where = log_pipeline_summary(resolve_tracking_uri(args.uri), folders, tags, metrics)
    write_json(Path(args.out), where)
    print(f"MLflow summary run {where['run_id']} holds {sum(map(len, folders.values()))} files", file=sys.stderr)


def cmd_grid(args: argparse.Namespace) -> None:
    from klbench.config import load_config, run_grid, validate_config

    for dataset, model, seed in run_grid(validate_config(load_config(args.config))):
        print(f"{dataset}/{model}/seed{seed}")


def cmd_schema(args: argparse.Namespace) -> None:
    import yaml

    from klbench.config import config_schema

    print(yaml.safe_dump(config_schema(), sort_keys=False, width=100), end="")


def cmd_settings(args: argparse.Namespace) -> None:
    from klbench.config import EvalConfig, TrainConfig
    from klbench.models import FAMILIES
    from klbench.settings import settings_table

    sections = [("train", TrainConfig), ("evaluate", EvalConfig)]
    for name, family in FAMILIES.items():
        sections += [(f"families.{name}.params", family.config), (f"families.{name}.evaluate", family.evaluate)]
    print("\n".join(f"`{where}`:\n\n{settings_table(cls)}" for where, cls in sections), end="")


def cmd_fork_server(args: argparse.Namespace) -> None:
    from klbench.forkserver import serve

    serve(Path(args.socket), idle=args.idle, info=Path(args.info) if args.info else None)


def cmd_init_tracking(args: argparse.Namespace) -> None:
    from klbench.tracking import init_store, resolve_tracking_uri

    uri = resolve_tracking_uri(args.uri)
    init_store(uri, args.experiment)
    print(f"MLflow tracking store ready: {uri}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="klbench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train, evaluate and track the seeds of one (dataset, model)")
    train.add_argument("--spec", help="the resolved run config as JSON, or a list of them for several seeds "
                                      "(what the workflow passes)")
    train.add_argument("--config", action="append", help="config YAML (repeat to merge, later wins)")
    train.add_argument("--dataset")
    train.add_argument("--model")
    train.add_argument("--seed", type=int, action="append", help="a seed (repeat: several in one process)")
    train.add_argument("--threads", type=int, help="torch threads (default: the config's)")
    train.add_argument("--out", action="append",
                       help="run directory, one per run (default results/runs/{dataset}/{model}/seed{seed})")
    train.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bar (default: when stderr is a terminal)")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("evaluate", help="re-evaluate a finished run from its model.pt; print JSON")
    evaluate.add_argument("run_dir")
    evaluate.set_defaults(func=cmd_evaluate)

    verify = commands.add_parser("verify", help="re-run a finished run in a temporary folder; is ledger.json identical?")
    verify.add_argument("run_dir")
    verify.set_defaults(func=cmd_verify)

    aggregate = commands.add_parser("aggregate", help="ledger.json files -> summary CSV (one row per run)")
    aggregate.add_argument("ledgers", nargs="+")
    aggregate.add_argument("--out", required=True, help="the summary CSV (one row per run)")
    aggregate.add_argument("--tables", help="folder for the comparison tables over seeds")
    aggregate.add_argument("--baseline", action="append", default=[], metavar="FAMILY=MODEL",
                           help="paired comparisons against this model of the family (repeatable)")
    aggregate.add_argument("--published", help="published figures to show beside the runs' (JSON: the config's "
                           "`published` list)")
    aggregate.add_argument("--fork-server-info", help="the fork server's JSON (its start-up CPU joins the timing "
                                                      "table); a missing file counts as no server")
    aggregate.set_defaults(func=cmd_aggregate)

    plot = commands.add_parser("plot", help="summary CSV + run directories -> comparison figures (no training)")
    plot.add_argument("summary", help="results/tables/summary.csv")
    plot.add_argument("--runs", default="results/runs", help="the run directories (default results/runs)")
    plot.add_argument("--out", required=True, help="folder for the figures and captions.json")
    plot.set_defaults(func=cmd_plot)

    summary_run = commands.add_parser("summary-run", help="log the tables and figures as one MLflow summary run")
    summary_run.add_argument("--summary", required=True, help="results/tables/summary.csv")
    summary_run.add_argument("--tables", help="folder of tables to attach")
    summary_run.add_argument("--figures", help="folder of figures to attach")
    summary_run.add_argument("--uri", help="tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    summary_run.add_argument("--out", required=True, help="JSON file saying where the summary run is")
    summary_run.set_defaults(func=cmd_summary_run)

    grid = commands.add_parser("grid", help="list the runs a config asks for")
    grid.add_argument("--config", action="append", required=True)
    grid.set_defaults(func=cmd_grid)

    schema = commands.add_parser("schema", help="print the whole config schema (family sections included) as YAML")
    schema.set_defaults(func=cmd_schema)

    settings = commands.add_parser("settings", help="print every setting with its default and limits (Markdown)")
    settings.set_defaults(func=cmd_settings)

    fork = commands.add_parser("fork-server", help="serve training jobs from one process holding the imports "
                                                   "(the workflow starts it; see klbench/forkserver.py)")
    fork.add_argument("--socket", required=True, help="Unix socket to listen on")
    fork.add_argument("--idle", type=float, default=120.0, help="exit after this many seconds with no job")
    fork.add_argument("--info", help="JSON file for the server's own start-up CPU seconds")
    fork.set_defaults(func=cmd_fork_server)

    init = commands.add_parser("init-tracking", help="create the MLflow store and experiments before parallel jobs")
    init.add_argument("--uri", help="tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    init.add_argument("--experiment", action="append", default=[])
    init.set_defaults(func=cmd_init_tracking)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from klbench.forkserver import run_via_server

        status = run_via_server(argv)  # a child of the pipeline's fork server, if there is one
        if status is not None:
            return status
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
    except KlbenchError as error:
        print(f"klbench: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("klbench: interrupted", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())

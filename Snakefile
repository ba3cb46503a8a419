# klbench: every model variant x dataset x seed, each run's KL ledger tracked in MLflow,
# then aggregated. Run `snakemake --cores 8`; settings in config/config.yaml.
import os

from snakemake.utils import min_version

min_version("9.0")


# Found next to this Snakefile, so `snakemake -d OTHER_DIR` works too; --configfile
# files are merged on top of it (config/smoke.yaml states only what it changes).
configfile: os.path.join(workflow.basedir, "config", "config.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        rules.summary.output,
        rules.figures.output,
        [f"{RESULTS}/figures/runs/{f}/{d}/{m}.png" for f, d, m in PAIRS],
        rules.mlflow_summary.output,

# klbench: every model variant x dataset x seed, each run's KL ledger tracked in MLflow,
# then aggregated. Run `snakemake --cores 8`; settings in config/config.yaml.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/aggregate.smk"


rule all:
    input:
        rules.summary.output,

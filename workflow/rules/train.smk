# One job per (dataset, model) and block of seeds (config `seeds_per_job`): one process
# trains the block's seeds, stacked where train.stack_seeds allows. Snakemake outputs cannot
# depend on a wildcard's value, so each block of seeds gets a rule of its own.
for block in SEED_BLOCKS:
    label = block_label(block)

    rule:
        name:
            f"train_seeds_{label}"
        output:
            [RUN_DIR.replace("{seed}", str(seed)) + f"/{name}" for seed in block for name in RUN_FILES],
        log:
            RESULTS + f"/logs/train/{{dataset}}/{{model}}/seeds{label}.log",
        params:
            spec=lambda wildcards, block=block: run_specs(wildcards, block),
            out=lambda wildcards, block=block: " ".join(
                f"--out {RUN_DIR.format(dataset=wildcards.dataset, model=wildcards.model, seed=seed)}"
                for seed in block),
        threads: BENCH["threads"]
        resources:
            mem_mb=train_resource("mem_mb"),
            runtime=train_resource("runtime"),
            gpu=train_resource("gpu"),
            **CPU_LIMIT,
        shell:
            "klbench train --spec {params.spec:q} --threads {threads} {params.out} --no-progress > {log} 2>&1"

rule train:
    output:
        ledger=RUN_DIR + "/ledger.json",
        history=RUN_DIR + "/history.csv",
        config=RUN_DIR + "/config.json",
        model=RUN_DIR + "/model.pt",
        samples=RUN_DIR + "/samples.png",
        mlflow=RUN_DIR + "/mlflow.json",
        timing=RUN_DIR + "/timing.json",
    log:
        RESULTS + "/logs/train/{dataset}/{model}/seed{seed}.log",
    params:
        spec=run_spec,
        out=RUN_DIR,
    threads: BENCH["threads"]
    shell:
        "klbench train --spec {params.spec:q} --threads {threads} --out {params.out} --no-progress > {log} 2>&1"

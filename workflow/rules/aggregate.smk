rule summary:
    input:
        ledgers=all_ledgers(),
    output:
        RESULTS + "/tables/summary.csv",
    log:
        RESULTS + "/logs/summary.log",
    shell:
        "klbench aggregate {input.ledgers} --out {output} > {log} 2>&1"

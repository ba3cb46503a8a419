rule summary:
    input:
        ledgers=all_ledgers(),
    output:
        summary=RESULTS + "/tables/summary.csv",
        tables=multiext(RESULTS + "/tables/", "ledger.csv", "ledger.md", "paired.csv", "paired.md",
                        "ranking.csv", "ranking.md", "cross_family.csv", "cross_family.md"),
    params:
        baselines=" ".join(f"--baseline {f}={m}" for f, m in BENCH["baselines"].items()),
    log:
        RESULTS + "/logs/summary.log",
    shell:
        "klbench aggregate {input.ledgers} --out {output.summary} --tables {RESULTS}/tables {params.baselines}"
        " > {log} 2>&1"

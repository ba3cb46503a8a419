rule summary:
    input:
        ledgers=all_ledgers(),
    output:
        summary=RESULTS + "/tables/summary.csv",
        tables=[report(f"{RESULTS}/tables/{name}.csv", caption="../report/tables.rst", category="tables")
                for name in ("ledger", "paired", "ranking", "cross_family", "timing")],
        markdown=multiext(RESULTS + "/tables/", "ledger.md", "paired.md", "ranking.md", "cross_family.md", "timing.md"),
    params:
        baselines=" ".join(f"--baseline {f}={m}" for f, m in BENCH["baselines"].items()),
        published=f"--published {shlex.quote(json.dumps(BENCH['published']))}" if BENCH["published"] else "",
    resources:
        **LOCAL_RESOURCES,
    log:
        RESULTS + "/logs/summary.log",
    shell:
        "klbench aggregate {input.ledgers} --out {output.summary} --tables {RESULTS}/tables {params.baselines}"
        " {params.published}"
        " --fork-server-info {RESULTS}/logs/fork_server.json"
        " > {log} 2>&1"

# Figures, the per-run figures the report shows, and the MLflow summary run. They read
# results files only: regenerating them never retrains anything.

def figure_report(figure):
    """report() flag of a planned comparison figure: its drawing's caption, and the category
    (the families it shows) and subcategory that its plan gives."""
    return report(
        f"{RESULTS}/figures/{figure.name}.png",
        caption=f"../report/{figure.kind}.rst",
        category=figure.category,
        subcategory=figure.subcategory,
    )


rule figures:
    input:
        summary=rules.summary.output.summary,
    output:
        png=[figure_report(figure) for figure in FIGURES],
        pdf=[f"{RESULTS}/figures/{figure.name}.pdf" for figure in FIGURES],
        captions=f"{RESULTS}/figures/captions.json",
    resources:
        **LOCAL_RESOURCES,
    log:
        f"{RESULTS}/logs/figures.log",
    shell:
        "klbench plot {input.summary} --runs {RESULTS}/runs --out {RESULTS}/figures > {log} 2>&1"


rule run_figure:
    input:
        lambda w: RUN_DIR.format(dataset=w.dataset, model=w.model, seed=BENCH["seeds"][0]) + "/samples.png",
    output:
        report(
            RESULTS + "/figures/runs/{family}/{dataset}/{model}.png",
            caption="../report/run_figure.rst",
            category="{family}",
            subcategory="{dataset}",
            labels={"model": "{model}", "dataset": "{dataset}"},
        ),
    resources:
        **LOCAL_RESOURCES,
    shell:
        "cp {input} {output}"


rule mlflow_summary:
    input:
        summary=rules.summary.output.summary,
        tables=rules.summary.output.tables,
        figures=rules.figures.output,
    output:
        f"{RESULTS}/mlflow_summary.json",
    params:
        uri=f"--uri {BENCH['tracking_uri']}" if BENCH["tracking_uri"] else "",
    resources:
        **LOCAL_RESOURCES,
    log:
        f"{RESULTS}/logs/mlflow_summary.log",
    shell:
        "klbench summary-run --summary {input.summary} --tables {RESULTS}/tables --figures {RESULTS}/figures"
        " {params.uri} --out {output} > {log} 2>&1"

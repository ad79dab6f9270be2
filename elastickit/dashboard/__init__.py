"""elastickit.dashboard: the cluster health dashboard of a run (`elastickit dashboard`, `top`).

    logs.py            the run directory's logs, read incrementally (RunSources, RunReader)
    records.py         typed views of the event records (Recovery, CheckpointRecord)
    windows.py         per-rank step summaries cut into incarnations and steps
    job.py goodput.py  the job panel: step, layout, rate, ETTR and badput, alerts
    heatmap.py         ranks x steps: how long the others waited for each rank
    links.py           src x dst time per operation, slow links
    incidents.py       each failure, its attribution and its cost by phase
    checkpoints.py     per-tier recovery points; recovery_point.py: the per-node what-if
    curves.py events.py
    summary.py         every panel at once (pure), and the cached Dashboard
    server.py          the HTTP server (standard library) and static/ (page, script, styles)
    store.py           the live view: every rank's heartbeat from the job's TCPStore

Every panel is a pure function of recorded logs (and, for the what-if, of the tiers' contents
on disk), so it is unit-tested on a recorded run; the server only routes and serialises.
"""

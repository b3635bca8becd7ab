"""Studies: arms x seeds x budgets, derived by the planner, trained, and reported (no torch at import).

- `spec`: the study file ([study] table) and its checks.
- `design`: the arms and runs a spec derives (pure: no side effects).
- `records`: the typed records read back from disk: study.json (the study record), each run's result and
  metrics, results.json.
- `datacheck`: each run's data built and described before anything trains.
- `studydir`: the study directory on disk: study.json's writer, run status, the lock, run.json attempts,
  log.jsonl events and slurm.json submissions.
- `runner`: `study run`, every (arm, seed) in a fresh trainer process, resumable.
- `slurm`: `study launch --slurm`, sbatch scripts and job submission.
- `stats`: mean, std and Student-t intervals over seeds, paired gaps, how often an ordering of arms holds, the
  fitted optimum over a grid with a seed-bootstrap interval.
- `report`: tables and results.json from a study directory, written with its plots (`plots`).
- `report_er`: the equal-resources part of the report: loss against r_a, the fitted optimum r_a*, tokens and
  epochs per arm.
- `plots`: the report's PNG plots (matplotlib).
"""

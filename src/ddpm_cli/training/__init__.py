"""Training: the loop, EMA and optimizer, reporting through callbacks (`train`); the state that
resumes a run exactly (`train_state`); a run directory with its data, checkpoints, grids and
metrics (`run`, `run_files`).

It may import every layer below it (generation too, for a run's sample grids); never
evaluation or the CLI.
"""

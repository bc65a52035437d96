"""One training stage's run, built from the engine (the step, losses, numerics) and scored by
inference: `setup` (model, loader, engine), `epochs` (validate, keep the best, resume),
`progress` (the epoch line and the time limit) and `outputs` (checkpoint, logs, MLflow). The
stage `pipeline.stages.train` wires them."""

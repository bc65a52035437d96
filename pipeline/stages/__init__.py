"""The DVC stages, one module each, run as `python -m pipeline.stages.<stage>` (dvc.yaml):
download -> preprocess -> train (unet, unetpp) -> prune -> report."""

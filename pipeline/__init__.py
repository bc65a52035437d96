"""Reproducible UNet / UNet++ segmentation pipeline (DVC stages, MLflow tracking).

The modules at this level are the commands users type, `python -m pipeline.<command>`: plan,
preset, autoconf, predict, export, baseline. Everything else is a package: stages (what
dvc.yaml runs), data, models, engine, training, inference, report, tracking, serving, core.
"""

"""Reproducible UNet / UNet++ segmentation pipeline (DVC stages, MLflow tracking)."""

"""Tracking: MLflow runs (`runs`: one parent per pipeline execution, a child per stage) and
the DVC and git context they are tagged with (`dvc`)."""

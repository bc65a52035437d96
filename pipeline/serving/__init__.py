"""The served model: `segmenter` (image files in, label maps out, as evaluation predicts) and
`pyfunc` (the MLflow pyfunc model around it, as `mlflow models serve` and the registry use it)."""

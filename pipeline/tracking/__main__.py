"""`python -m pipeline.tracking init`: create the MLflow store and experiment once, before
stages fan out (queued experiments would otherwise race to create them)."""

from __future__ import annotations

import argparse
import logging

from pipeline.core.common import run_cli
from pipeline.core.config import load_params
from pipeline.tracking.runs import init_store, tracking_uri

log = logging.getLogger("pipeline.tracking")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Set up the MLflow store the stages log to.")
    parser.add_argument("command", choices=["init"], help="init: create the store and experiment")
    parser.parse_args(argv)
    params = load_params()
    if not params.mlflow.enabled:
        log.info("mlflow.enabled is false: nothing to set up")
        return
    exp_id = init_store(params)
    log.info(
        "MLflow store %s, experiment %r (id %s)",
        tracking_uri(params),
        params.mlflow.experiment,
        exp_id,
    )


if __name__ == "__main__":
    run_cli(main)

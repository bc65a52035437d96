"""Latency of the served segmenter: `mlflow models serve` answering REST requests of 1..N images.

Starts `mlflow models serve -m <model> --env-manager local` on a free 127.0.0.1 port against
the repository's store (or --tracking-uri), sends --runs requests per batch size (after one
warm-up request) with copies of one image (default: data/processed/example.png, a raw test
image), and reports the median wall time per request and per image, next to the in-process
`pyfunc.predict` of one image (no HTTP, no JSON). Run it after `dvc repro`:

    uv run python bench/serve_latency.py                          # the champion of the dataset
    uv run python bench/serve_latency.py --model models:/unet-family-drive@champion --runs 5
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import torch

from bench.benchlib import environment, out_stem, write_outputs
from bench.servers import OPENER, model_server

NAME = "serving"
ROOT = Path(__file__).resolve().parents[1]
COLUMNS = {
    "batch": "images per request",
    "request_ms": "ms per request (median)",
    "image_ms": "ms per image",
    "images_per_s": "images/s",
}


def request(url: str, images: list[bytes]) -> float:
    """One POST /invocations; its wall time in ms."""
    body = {
        "dataframe_split": {
            "columns": ["image"],
            "data": [[base64.b64encode(i).decode()] for i in images],
        }
    }
    req = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    start = time.perf_counter()
    with OPENER.open(req, timeout=600) as response:
        answer = json.loads(response.read())
    ms = (time.perf_counter() - start) * 1000
    if len(answer["predictions"]) != len(images):
        sys.exit(f"{len(images)} images sent, {len(answer['predictions'])} masks back")
    return ms


def in_process_ms(model: str, tracking_uri: str, image: bytes, runs: int) -> float:
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(tracking_uri)
    loaded = mlflow.pyfunc.load_model(model)
    frame = pd.DataFrame({"image": [image]})
    loaded.predict(frame)  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        loaded.predict(frame)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def default_model() -> str:
    from pipeline.core.common import PipelineError
    from pipeline.core.config import load_params
    from pipeline.data.manifest import load_manifest
    from pipeline.tracking.registry import registered_name

    try:
        return f"models:/{registered_name(load_params(), load_manifest().dataset)}@champion"
    except PipelineError as exc:  # no processed data yet: no dataset, no champion
        sys.exit(f"{exc}; or pass --model")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model URI (default: the dataset's champion)")
    parser.add_argument(
        "--tracking-uri", help="default: the pipeline's (params, MLFLOW_TRACKING_URI)"
    )
    parser.add_argument("--image", type=Path, default=ROOT / "data/processed/example.png")
    parser.add_argument("--batches", default="1,4,8", help="images per request")
    parser.add_argument("--runs", type=int, default=5, help="timed requests per batch (median)")
    parser.add_argument("--out", help="output path stem (default reports/benchmarks/" + NAME + ")")
    args = parser.parse_args(argv)
    model = args.model or default_model()
    if args.tracking_uri is None:
        from pipeline.core.config import load_params
        from pipeline.tracking.runs import tracking_uri

        args.tracking_uri = tracking_uri(load_params())
    image = args.image.read_bytes()
    rows = []
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(model_server(model, args.tracking_uri, timeout=300.0))
        except (RuntimeError, TimeoutError) as exc:  # it exited, or never answered /ping
            sys.exit(f"mlflow models serve -m {model}: {exc}")
        request(url, [image])  # warm-up: the first request loads lazily imported code
        for batch in [int(b) for b in args.batches.split(",")]:
            ms = statistics.median(request(url, [image] * batch) for _ in range(args.runs))
            rows.append(
                {
                    "batch": batch,
                    "request_ms": round(ms, 1),
                    "image_ms": round(ms / batch, 1),
                    "images_per_s": round(1000 * batch / ms, 2),
                }
            )
    direct = in_process_ms(model, args.tracking_uri, image, args.runs)
    given = sys.argv[1:] if argv is None else argv
    env = environment([torch.device("cpu")], ["bench/serve_latency.py", *given])
    from PIL import Image

    with Image.open(args.image) as img:
        size = f"{img.width}x{img.height} {img.mode}"
    env.update(model=model, image=f"{args.image.name} ({size})", in_process_ms=round(direct, 1))
    notes = (
        f"Model `{model}`, image {env['image']}; `mlflow models serve --env-manager local`, one "
        f"worker, on this machine's CPU; median of {args.runs} requests after one warm-up. The "
        f"same image predicted in-process by `pyfunc.predict` (no HTTP): {direct:.1f} ms. Rows "
        "of a request are predicted one after another, so a batch saves round trips, not compute."
    )
    md = write_outputs(out_stem(args.out, NAME), "Serving latency", env, rows, COLUMNS, notes)
    print(md)
    return {**env, "rows": rows}


if __name__ == "__main__":
    main()

"""What a tracking server costs a pipeline: one request's time and the requests of one run.

Starts `mlflow server` twice on a scratch sqlite store, plain and with basic auth
(`--app-name basic-auth`), and times --runs GET requests to each (the median; basic auth checks
the password's hash on every request). Then, unless --no-pipeline, runs the default pipeline at
tiny sizes (`dvc repro` in a scratch copy of this project) against the plain server and counts
the REST requests it made, by endpoint, from the server's access log. Figures for
docs/team.md's advice on `--workers`:

    uv run python bench/tracking_requests.py
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from base64 import b64encode
from pathlib import Path

import torch

from bench.benchlib import environment, out_stem, parse_sets, write_outputs
from bench.servers import ADMIN, OPENER, PASSWORD, mlflow_server

NAME = "tracking_requests"
ROOT = Path(__file__).resolve().parents[1]
COLUMNS = {"what": "what", "count": "requests", "ms": "ms per request (median)"}
TINY = [  # `dvc exp run -S`-style overrides: the default pipeline in seconds
    "epochs=2",
    "dataset.num_images=10",
    "dataset.image_size=64",
    "dataset.val_count=2",
    "dataset.test_count=2",
    "preprocess.crop_size=32",
    "preprocess.crop_stride=32",
    "unet.base_channels=4",
    "unetpp.base_channels=4",
    "pruning.latency_runs=2",
    "pruning.latency_warmup=1",
]
SEARCH = "api/2.0/mlflow/experiments/search?max_results=1"


def request_ms(url: str, runs: int, login: bool) -> float:
    """The median wall time of `runs` GET requests (after one warm-up)."""
    req = urllib.request.Request(f"{url}/{SEARCH}")
    if login:
        token = b64encode(f"{ADMIN}:{PASSWORD}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    times = []
    for _ in range(runs + 1):
        start = time.perf_counter()
        with OPENER.open(req, timeout=60) as response:
            response.read()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times[1:])


def pipeline_requests(url: str, scratch: Path) -> collections.Counter:
    """The REST requests of one tiny `dvc repro` (in a clone of this repository) against
    `url`, by endpoint."""
    from pipeline.preset import apply  # as `dvc exp run -S` writes them, checked

    repo = scratch / "project"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    (repo / "dvc.lock").unlink(missing_ok=True)
    apply(parse_sets(TINY), repo / "params.yaml")
    log = max(Path(tempfile.gettempdir()).glob("mlflow-server-*/server.log"), key=os.path.getmtime)
    before = log.stat().st_size
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(
        MLFLOW_TRACKING_URI=url, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    )
    subprocess.run(["dvc", "repro", "-q"], cwd=repo, env=env, check=True)
    with log.open("rb") as f:
        f.seek(before)
        text = f.read().decode(errors="replace")
    paths = re.findall(r'"(?:GET|POST|PUT|PATCH|DELETE) (/api/[^ ?]*)', text)
    ids = re.compile(r"(m-)?[0-9a-f]{32}")
    files = re.compile(r"(/mlflow-artifacts/artifacts)/.*")  # one upload or download per file
    return collections.Counter(files.sub(r"\1/<file>", ids.sub("<id>", p)) for p in paths)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="timed requests per server")
    parser.add_argument("--no-pipeline", action="store_true", help="only time one request")
    parser.add_argument("--out", help="output path stem (default reports/benchmarks/" + NAME + ")")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as tmp:
        scratch = Path(tmp)
        store, users = f"sqlite:///{scratch / 'auth-store.db'}", f"sqlite:///{scratch / 'auth.db'}"
        with mlflow_server(store, scratch / "art-auth", auth_db=users) as url:
            auth_ms = request_ms(url, args.runs, login=True)
        # artifacts through the server (mlflow-artifacts:/), as with a bucket behind it
        artifacts = (scratch / "art").as_uri()
        with mlflow_server(f"sqlite:///{scratch / 'store.db'}", artifacts) as url:
            plain_ms = request_ms(url, args.runs, login=False)
            counts = collections.Counter() if args.no_pipeline else pipeline_requests(url, scratch)
    rows.append({"what": "one request, plain server", "count": 1, "ms": round(plain_ms, 1)})
    rows.append({"what": "one request, basic auth", "count": 1, "ms": round(auth_ms, 1)})
    if counts:
        rows.append({"what": "tiny `dvc repro`, all requests", "count": sum(counts.values())})
        rows += [{"what": f"`{path}`", "count": n} for path, n in counts.most_common(5)]
    given = sys.argv[1:] if argv is None else argv
    env = environment([torch.device("cpu")], ["bench/tracking_requests.py", *given])
    env.update(threads=torch.get_num_threads(), cores=os.cpu_count())
    notes = (
        f"`mlflow server` on a sqlite store, one worker, on this machine; median of {args.runs} "
        "GET requests after one warm-up, plain and with `--app-name basic-auth` (which checks "
        "the password's hash on every request). The pipeline's requests are counted from the "
        f"plain server's access log during one `dvc repro` with {', '.join(TINY)}."
    )
    title = "Tracking server requests"
    md = write_outputs(out_stem(args.out, NAME), title, env, rows, COLUMNS, notes)
    print(md)
    return {**env, "rows": rows}


if __name__ == "__main__":
    main()

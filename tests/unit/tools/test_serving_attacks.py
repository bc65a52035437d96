"""pipeline.serving.pyfunc under hostile requests, as `mlflow models serve` answers them: every
request goes through MLflow's own scoring app (`mlflow.pyfunc.scoring_server.init`, the FastAPI
app the server runs) in-process, over ASGI: no server process, no port.

A bad image or param is an HTTP 400 whose JSON `message` is one line naming the row, with no
stack trace; what MLflow refuses before the model runs keeps MLflow's own answer."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.unit.tools.test_predict import png_claiming, save_image, save_model


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A UNet++ (heads at depths 1 and 2) logged by `log_segmenter`, loaded as the server loads
    it, and the server's app; once for the module. The tracking URI is put back at once."""
    import mlflow
    from mlflow.pyfunc import scoring_server
    from mlflow.tracking._tracking_service import utils

    from pipeline.serving.pyfunc import log_segmenter

    tmp = tmp_path_factory.mktemp("served")
    env, uri = os.environ.get("MLFLOW_TRACKING_URI"), utils._tracking_uri
    try:
        mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
        experiment = mlflow.create_experiment("attacks", (tmp / "artifacts").as_uri())
        save_model(tmp / "model.pt", arch="unetpp")
        save_image(tmp / "a.png", (32, 40))
        with mlflow.start_run(experiment_id=experiment):
            model = mlflow.pyfunc.load_model(log_segmenter(tmp / "model.pt", tmp / "a.png"))
    finally:
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env
        utils._tracking_uri = uri
    app = scoring_server.init(model)
    return SimpleNamespace(model=model, app=app, png=(tmp / "a.png").read_bytes())


async def _request(app, body: bytes, content_type: str, stall: bool = False):
    """(status, body) of one POST /invocations; `stall`: the body never finishes arriving."""
    chunks = [{"type": "http.request", "body": body, "more_body": stall}]
    sent, never = [], asyncio.Event()

    async def receive():
        if chunks:
            return chunks.pop(0)
        await never.wait()  # a client that neither sends more nor hangs up

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/invocations",
        "raw_path": b"/invocations",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", content_type.encode())],
        "client": ("client", 1234),
        "server": ("server", 80),
    }
    try:
        await app(scope, receive, send)
    except Exception:  # after the answer went out, uvicorn logs it: the stalled body's
        if not sent:  # reader, cancelled by the timeout, raises ClientDisconnect
            raise
    (start,) = [m for m in sent if m["type"] == "http.response.start"]
    return start["status"], b"".join(m.get("body", b"") for m in sent[1:])


def post(app, body: bytes, content_type: str = "application/json") -> tuple[int, bytes]:
    return asyncio.run(_request(app, body, content_type))


def split(*images: bytes, **params) -> bytes:
    """A JSON request, images base64-encoded in `dataframe_split` (what MLflow decodes)."""
    rows = [[base64.b64encode(data).decode()] for data in images]
    request = {"dataframe_split": {"columns": ["image"], "data": rows}}
    return json.dumps({**request, "params": params} if params else request).encode()


def refusal(status: int, body: bytes) -> str:
    """The message of a 400 from the model: one line, no stack trace."""
    assert status == 400, body[:300]
    answer = json.loads(body)
    assert answer["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "stack_trace" not in answer
    assert "\n" not in answer["message"]
    return answer["message"]


def _gif_of_two_frames() -> bytes:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _float_tiff(value: float) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16), value, np.float32)).save(buf, format="TIFF")
    return buf.getvalue()


BAD_IMAGES = {  # issue 30's images: bytes -> the message's exact text or its start
    "text": (lambda png: b"hello world", "image 1: text (11 bytes), not an image file"),
    "empty": (lambda png: b"", "image 1: empty (0 bytes), not an image file"),
    "half a PNG": (
        lambda png: png[: len(png) // 2],
        "image 1: unreadable or corrupt image (image file is truncated)",
    ),
    "15000x15000 PNG": (
        lambda png: png_claiming(15000, 15000),
        "image 1: ",  # read_image's words for a decompression bomb
    ),
    "animated GIF": (
        lambda png: _gif_of_two_frames(),
        "image 1: 2 frames (a stack or an animation); give one image per file",
    ),
    "float TIFF out of range": (
        lambda png: _float_tiff(3.5),
        "image 1: float image with values in [3.5, 3.5]: float images must hold intensities "
        "in [0, 1]",
    ),
}


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_a_bad_image_is_a_400_with_one_line_naming_its_row(served, case):
    make, expected = BAD_IMAGES[case]
    message = refusal(*post(served.app, split(served.png, make(served.png))))
    if expected.endswith(": "):
        assert message.startswith(expected) and "pixel" in message, message
    else:
        assert message == expected


def test_a_csv_body_is_a_400_saying_images_go_base64_in_json(served):
    csv = b"image\n" + base64.b64encode(served.png) + b"\n"
    message = refusal(*post(served.app, csv, "text/csv"))
    assert message.startswith("image 0: text, not the bytes of an image file: send images ")
    assert "dataframe_split" in message and "a CSV body carries text only" in message


def test_a_csv_body_without_an_image_column_keeps_mlflows_400(served):
    """MLflow checks the table against the signature before the model runs: its message (which
    quotes the input) is the answer."""
    status, body = post(served.app, b"a,b\n1,2\n", "text/csv")
    assert status == 400
    assert "Model is missing inputs ['image']" in json.loads(body)["message"]


def test_base64_left_encoded_in_an_inputs_body_is_a_400_saying_where_mlflow_decodes(served):
    request = {"inputs": {"image": [base64.b64encode(served.png).decode()]}}
    message = refusal(*post(served.app, json.dumps(request).encode()))
    assert message == (
        f"image 0: base64 text ({len(base64.b64encode(served.png))} bytes), not the bytes of an "
        "image file: MLflow decodes base64 in dataframe_split and dataframe_records bodies only, "
        "not in inputs or instances"
    )


def test_the_depth_param_prunes_per_request_and_a_missing_head_is_a_400(served):
    status, body = post(served.app, split(served.png, depth=1))
    assert status == 200
    (row,) = json.loads(body)["predictions"]
    table = pd.DataFrame({"image": [served.png]})
    pruned = served.model.predict(table, params={"depth": 1})["mask"][0]
    assert base64.b64decode(row["mask"]) == pruned != served.model.predict(table)["mask"][0]

    message = refusal(*post(served.app, split(served.png, depth=3)))
    assert message == "params.depth 3: no head at depth 3; heads: [1, 2]"


def test_concurrent_requests_at_other_depths_answer_as_one_at_a_time(served):
    """The server predicts requests in threads: the per-depth pruning is made once, under a
    lock, and no request sees another's model."""
    bodies = [split(served.png, depth=d) for d in (2, 1, 2, 1)] + [split(served.png)]

    async def together():
        return await asyncio.gather(*(_request(served.app, b, "application/json") for b in bodies))

    answers = asyncio.run(together())  # depth 2's pruned model is first made here
    assert answers == [post(served.app, body) for body in bodies]
    assert all(status == 200 for status, _ in answers)


def test_a_content_type_other_than_json_csv_or_parquet_keeps_mlflows_415(served):
    status, body = post(served.app, served.png, "image/png")
    assert status == 415
    assert body.startswith(b"This predictor only supports the following content types")


def test_a_client_that_stalls_mid_body_gets_mlflows_504_after_the_timeout(served, monkeypatch):
    from mlflow.pyfunc import scoring_server

    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "1")
    app = scoring_server.init(served.model)  # the timeout is read when the app is made
    status, body = asyncio.run(_request(app, split(served.png)[:20], "application/json", True))
    assert (status, body) == (504, b"Request processing time exceeded limit")

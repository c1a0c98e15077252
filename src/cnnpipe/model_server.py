"""`cnnpipe serve`: a registered model over HTTP, as MLflow's scoring server answers for it
(the same `/invocations` requests and answers as `mlflow models serve`), with two changes:

- an error is a JSON message without MLflow's `stack_trace` (which a request that MLflow
  itself cannot parse, such as malformed JSON, would otherwise carry);
- a CSV body is refused at once with a message that says what to send: the model's `image`
  cells are encoded files or pixel arrays, which CSV cannot carry (MLflow's own CSV parser
  fails on such a column with a stack trace).
"""

from __future__ import annotations

import json

CSV = "text/csv"
CSV_REFUSED = {
    "error_code": "BAD_REQUEST",
    "message": (
        "CSV bodies cannot carry images: send JSON (dataframe_split, dataframe_records, "
        "instances or inputs, each `image` cell an encoded image file in base64 or an "
        "H x W x 3 pixel array) or Parquet with an `image` column of image files"
    ),
}


def serve(model_uri: str, host: str, port: int) -> None:
    """Serve `model_uri` until Ctrl-C. Its MLmodel is checked first (`serving.load`): only a
    model loaded by cnnpipe's own code is imported."""
    import mlflow
    import uvicorn
    from mlflow.pyfunc import scoring_server

    from cnnpipe import serving

    serving.load(model_uri)
    model = mlflow.pyfunc.load_model(model_uri)
    app = without_stack_traces(scoring_server.init(model))
    uvicorn.run(app, host=host, port=port, log_level="warning", workers=1)


def without_stack_traces(app):
    """`app` (ASGI), with CSV requests refused and `stack_trace` taken out of JSON errors."""

    async def serving_app(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        headers = dict(scope["headers"])
        if headers.get(b"content-type", b"").split(b";")[0].strip().decode() == CSV:
            return await answer(send, 415, CSV_REFUSED)
        await app(scope, receive, errors_cleaned(send))

    return serving_app


def errors_cleaned(send):
    """`send`, with each JSON error body that has a `stack_trace` sent without it."""
    start, parts = {}, []

    async def sending(message):
        if message["type"] == "http.response.start":
            start.update(message)
            if message["status"] < 400:
                await send(message)
            return
        if start["status"] < 400:
            return await send(message)
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            await answer(send, start["status"], without_trace(b"".join(parts)), start)

    return sending


def without_trace(body: bytes) -> dict | bytes:
    try:
        error = json.loads(body)
    except ValueError:
        return body
    if isinstance(error, dict):
        error.pop("stack_trace", None)
    return error


async def answer(send, status: int, body: dict | bytes, start: dict | None = None) -> None:
    """Send one whole response: `body` as JSON (a dict) or as it is, with `start`'s headers
    other than its length."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = [(k, v) for k, v in (start or {}).get("headers", []) if k != b"content-length"]
    if start is None:
        headers.append((b"content-type", b"application/json"))
    headers.append((b"content-length", str(len(data)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})

"""`cnnpipe serve`: a registered model over HTTP, as MLflow's scoring server answers for it
(the same `/invocations` requests and answers as `mlflow models serve`), except for errors:

- each is JSON, without MLflow's `stack_trace` (which a request MLflow itself cannot parse,
  such as malformed JSON, carries) and without its quote of the whole request (megabytes for
  large images): at most `MAX_MESSAGE` characters;
- a request that makes the app fail (JSON nested too deeply to read) gets a JSON answer, and
  the server's log one line instead of a traceback;
- a CSV body is refused at once with what to send: the model's `image` cells are encoded
  files or pixel arrays, which CSV cannot carry (MLflow's own parser fails on them).
"""

from __future__ import annotations

import json
import sys

CSV = "text/csv"
MAX_MESSAGE = 500  # characters of an error message
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
    """`app` (ASGI), with CSV requests refused, `stack_trace` taken out of JSON errors, and a
    request that makes the app fail answered in JSON and logged in one line (not a traceback)."""

    async def serving_app(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        headers = dict(scope["headers"])
        if headers.get(b"content-type", b"").split(b";")[0].strip().lower() == CSV.encode():
            return await answer(send, 415, CSV_REFUSED)
        held = HeldErrors(send)
        try:
            await app(scope, receive, held)
        except Exception as err:  # answered already by the app with a bare 500: replaced
            print(f"cnnpipe serve: a request failed ({reason(err)})", file=sys.stderr)
            await held.replace(*failure(err))
        else:
            await held.release()

    return serving_app


class HeldErrors:
    """The `send` of one request: a success passes through; an error response is held until
    the app is done with the request, then sent without a stack trace, or replaced."""

    def __init__(self, send):
        self.send, self.start, self.parts = send, None, []

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            self.start = message
            if message["status"] < 400:
                await self.send(message)
        elif self.start is not None and self.start["status"] < 400:
            await self.send(message)
        else:
            self.parts.append(message.get("body", b""))

    async def release(self) -> None:
        if self.start is not None and self.start["status"] >= 400:
            body = cleaned(b"".join(self.parts))
            await answer(self.send, self.start["status"], body, self.start)

    async def replace(self, status: int, error: dict) -> None:
        if self.start is None or self.start["status"] >= 400:  # nothing of it sent yet
            await answer(self.send, status, error)


def failure(err: Exception) -> tuple[int, dict]:
    """The answer to a request that made the app fail: the status and the JSON error."""
    if isinstance(err, RecursionError):
        message = "the request's JSON is nested too deeply to read: send an image as base64 text"
        message += " or as an H x W x 3 pixel array"
        return 400, {"error_code": "BAD_REQUEST", "message": message}
    return 500, {"error_code": "INTERNAL_ERROR", "message": f"the request failed ({reason(err)})"}


def reason(err: Exception) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:200]


def cleaned(body: bytes) -> dict | bytes:
    """An error body as it is sent: without a `stack_trace`, and with a message of at most
    `MAX_MESSAGE` characters. MLflow quotes the whole request in the message of an error raised
    while predicting ("Failed to predict data '<the request>'. Error: ..."), megabytes for a
    request of large images; only its reason is kept."""
    try:
        error = json.loads(body)
    except ValueError:
        return body
    if not isinstance(error, dict):
        return body
    error.pop("stack_trace", None)
    message = str(error.get("message", ""))
    quoted, separator, reason = message.partition("\nError: ")
    if separator and quoted.startswith("Failed to predict data"):
        message = f"Failed to predict: {reason}"
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 1] + "…"
    return error | {"message": message}


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

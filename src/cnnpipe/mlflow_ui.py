"""The MLflow UI as `cnnpipe ui` serves it: MLflow's own app, opening in its Model training view.

MLflow 3.17 keeps the choice between its GenAI and Model training views in the browser
(localStorage) and starts every new browser in GenAI, where our experiment opens on a traces
overview and the evaluate run shows as a GenAI evaluation; it also opens its chat assistant
over the runs table on the first visit. The start page this app serves gives a browser that
has no choice yet Model training and a closed assistant; a user's own later choice is kept.
MLflow loads it as a server app (`mlflow ui --app-name cnnpipe`, registered under the
`mlflow.app` entry points in pyproject.toml).
"""

from __future__ import annotations

import json

FIRST_VISIT = {  # the UI's localStorage keys (`<key>_v<version>`) and their JSON values
    "mlflow.workflowType_v1": "machine_learning",
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True,
}
FIRST_VISIT_JSON = json.dumps(FIRST_VISIT, separators=(",", ":"))
FIRST_VISIT_SCRIPT = (
    f"<script>try{{for(const[k,v]of Object.entries({FIRST_VISIT_JSON}))"
    "localStorage.getItem(k)===null&&localStorage.setItem(k,JSON.stringify(v))}catch(e){}"
    "</script>"
).encode()
CONDITIONAL_HEADERS = {b"if-none-match", b"if-modified-since"}


def create_app():
    """MLflow's server app, its start page given the first-visit defaults (an ASGI app)."""
    from mlflow.server.fastapi_app import app as mlflow_app

    async def app(scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/":
            return await mlflow_app(scope, receive, send)
        # The page is always sent whole (never "not modified"), so the defaults are in it.
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in CONDITIONAL_HEADERS]
        await mlflow_app({**scope, "headers": headers}, receive, with_first_visit_defaults(send))

    return app


def with_first_visit_defaults(send):
    """`send`, with the first-visit defaults put first in the <head> of the HTML page it sends."""
    start, parts = {}, []

    async def sending(message):
        if message["type"] == "http.response.start":
            start.update(message)
            return
        parts.append(message.get("body", b""))
        if message["type"] != "http.response.body" or message.get("more_body"):
            return
        body = b"".join(parts).replace(b"<head>", b"<head>" + FIRST_VISIT_SCRIPT, 1)
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return sending

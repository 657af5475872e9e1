"""The HTTP stage: the API, the live sockets and the review page (the `http` extra).

`stage.py` runs uvicorn on a named thread; `app.py` builds the FastAPI application
(errors, request ids, tokens, docs, health, metrics); the routes are split by noun:
`recordings.py`, `speakers.py`, `uploads.py` (tasks and the listening switch) and
`live.py` (the WebSocket event stream and live audio). Every operation that MQTT and the
CLI also offer runs through the shared command table (`meraudiod.commands`).
"""

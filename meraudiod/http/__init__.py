"""The HTTP stage: the API, the live sockets and the review page (the `http` extra).

`stage.py` runs uvicorn on a named thread; `app.py` builds the FastAPI application
(errors, request ids, tokens, docs, health, metrics); the routes are split by noun:
`recordings.py`, `speakers.py`, `uploads.py` (tasks and the listening switch) and
`live.py` (the WebSocket event stream and live audio). Every operation that MQTT and the
CLI also offer runs through the shared command table (`meraudiod.commands`).
"""

import sys

# FastAPI asks of every route's types (and of a value it cannot encode) whether they are
# pydantic v1 models, importing pydantic.v1 to find out: 1.5 MB of the daemon's resident
# memory, for models this project never has and FastAPI refuses anyway. With the import
# refused, FastAPI's check answers no, as it does where pydantic.v1 cannot load (Python
# 3.14). This package comes before any module that imports FastAPI.
sys.modules.setdefault("pydantic.v1", None)  # type: ignore[arg-type]

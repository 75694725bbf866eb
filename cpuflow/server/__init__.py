"""`cpuflow serve`: a local web page and JSON API (needs the ``serve`` extra).

    >>> from cpuflow.server import create_app
    >>> app = create_app({"default": None})        # the shipped model
    >>> # uvicorn.run(app, host="127.0.0.1", port=7860)

See :mod:`cpuflow.server.app` for the routes and :mod:`cpuflow.server.security`
for what every request must pass.
"""
from __future__ import annotations


def create_app(*args, **kwargs):
    from .app import create_app as _create_app
    return _create_app(*args, **kwargs)


__all__ = ["create_app"]

"""`cpuflow serve`: the local web page and HTTP API.

Safe by default: it listens on 127.0.0.1 only, answers only to local Host names,
refuses cross-site requests, and will not listen on any other address unless an
access token is set (``--token`` or ``CPUFLOW_TOKEN``).
"""
from __future__ import annotations

import errno
import re
import secrets
import socket
import sys
from pathlib import Path

import click

from .errors import InvalidArgument, MissingDependency

MIN_TOKEN_CHARS = 16

EXAMPLES_SERVE = """
\b
Examples:
  cpuflow serve                                   # the shipped model, http://127.0.0.1:7860/
  cpuflow serve --model exported/sd15 --model exported/sd21 --port 8000
  CPUFLOW_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(24))') \\
      cpuflow serve --host 0.0.0.0 --allow-host mybox.local    # reachable from the LAN
"""


def _need_serve_deps():
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise MissingDependency("cpuflow serve needs fastapi and uvicorn",
                                hint="pip install 'cpuflow[serve]'") from None
    return uvicorn


def model_ids(paths) -> dict[str, Path | None]:
    """Server-made ids from folder names (slugged, made unique). No model: the shipped one."""
    if not paths:
        return {"default": None}
    out: dict[str, Path | None] = {}
    for p in paths:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(p).resolve().name).strip("-.")[:48] or "model"
        mid, k = base, 2
        while mid in out:
            mid, k = f"{base}-{k}", k + 1
        out[mid] = Path(p)
    return out


def check_bind(host: str, token: str | None) -> None:
    from .server.security import is_loopback
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise InvalidArgument(f"the access token must have at least {MIN_TOKEN_CHARS} characters",
                              hint="make one with: python -c 'import secrets; print(secrets.token_urlsafe(24))'")
    if not is_loopback(host) and not token:
        raise InvalidArgument(f"refusing to listen on {host} without an access token: anyone who can reach "
                              "this address could use the server",
                              hint="set --token or CPUFLOW_TOKEN, or keep the default --host 127.0.0.1")


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket listening on (host, port), made before the address is printed (uvicorn
    serves on it), so a port in use is one clear error and no "open" line is shown."""
    try:
        family, kind, proto, _name, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
    except OSError as e:
        hint = "another program (or another cpuflow serve) uses it; pick another --port" \
            if getattr(e, "errno", None) == errno.EADDRINUSE else None
        raise InvalidArgument(f"cannot listen on {host}:{port}: {e.strerror or e}", hint=hint) from None
    return sock


@click.command("serve", epilog=EXAMPLES_SERVE)
@click.option("--model", "-m", "models", multiple=True, type=click.Path(path_type=Path),
              help="Exported model folder; repeat for several (default: the model shipped with cpuflow).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but a loopback address needs --token.")
@click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True)
@click.option("--token", envvar="CPUFLOW_TOKEN", default=None,
              help="Access token (or CPUFLOW_TOKEN): API calls need 'Authorization: Bearer TOKEN'; "
                   "the browser logs in once at /?token=TOKEN. Use 'random' to have one made.")
@click.option("--allow-host", multiple=True,
              help="Another Host name the server answers to (e.g. mybox.local or mybox.local:8000).")
@click.option("--max-queue", type=click.IntRange(0, 1000), default=8, show_default=True,
              help="Jobs that may wait behind the running one; more get HTTP 429.")
@click.option("--backend", type=click.Choice(["openvino", "onnxruntime"]), default="openvino", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "bf16", "f32"]), default="auto", show_default=True)
@click.option("--threads", type=int, default=None, help="CPU threads (default: all physical cores).")
@click.option("--embedding", "embeddings", multiple=True, metavar="FILE[:TOKEN]",
              help="A textual-inversion embedding requests may use (by name, in their \"embeddings\" list). "
                   "Repeatable.")
@click.option("--embeddings-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              metavar="DIR", help="A folder of textual-inversion embeddings (.pt, .safetensors, .bin): the page "
                                  "lists them; requests name them by file name (without extension).")
@click.option("--max-session-memory", type=click.FloatRange(0.001, None), default=None, metavar="GIB",
              help="Memory for compiled sessions (one per component and image size); the least recently "
                   "used are freed beyond it (default: half the RAM).")
def serve_command(models, host, port, token, allow_host, max_queue, backend, precision, threads, embeddings,
                  embeddings_dir, max_session_memory):
    """Serve a web page and a JSON API for generating images on this machine."""
    token = token or None            # an empty CPUFLOW_TOKEN is no token
    if token == "random":
        token = secrets.token_urlsafe(24)
    check_bind(host, token)
    uvicorn = _need_serve_deps()
    from .server.app import create_app
    from .server.security import default_allowed_hosts

    sock = listen_socket(host, port)   # a port in use fails here, before the models load
    ids = model_ids(models)
    load = {"backend": backend, "precision": precision, "threads": threads}
    if max_session_memory is not None:
        load["max_session_bytes"] = int(max_session_memory * 2**30)
    app = create_app(ids, token=token, allowed_hosts=default_allowed_hosts(port, host, allow_host), port=port,
                     max_queue=max_queue, load_options=load, embeddings=embeddings,
                     embeddings_dir=embeddings_dir)
    shown = host if host not in ("0.0.0.0", "::") else "127.0.0.1"
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    url = f"http://{shown}:{port}/"
    # printed once the socket listens: connections wait in its backlog until uvicorn takes them
    click.echo(f"cpuflow serve: models {', '.join(ids)}", err=True)
    click.echo(f"open {url}?token={token}" if token else f"open {url}", err=True)
    if host in ("0.0.0.0", "::") and not allow_host:
        click.echo("note: other machines must use a name given with --allow-host (the Host header is checked)",
                   err=True)
    sys.stderr.flush()
    uvicorn.run(app, host=host, port=port, fd=sock.fileno(), log_level="warning", server_header=False,
                proxy_headers=False, limit_concurrency=64, timeout_keep_alive=5)

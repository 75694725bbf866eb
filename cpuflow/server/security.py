"""The server's front door: one ASGI middleware that every request passes.

Hand-written, not Starlette's TrustedHostMiddleware: that one drops the port (so
``127.0.0.1:7861`` or a port-less ``localhost`` pass) and answers in plain text,
not with this server's JSON ``bad_host`` error; tests/test_server_security.py
checks both.

Checks, in order (the first that fails answers with a JSON error and the
request goes no further):

1. **Host allow-list** (DNS rebinding): the ``Host`` header must be one of
   ``localhost``, ``127.0.0.1`` or ``[::1]`` *with the server's port*, the
   address the server was bound to (when it is a concrete one), or a name the
   operator allowed with ``--allow-host``. Else 400 ``bad_host``.
2. **Body size**: a ``Content-Length`` over the cap is refused before reading
   (413); a chunked body is counted while it streams and cut off at the cap.
3. **Cross-site requests** (403 ``cross_site``):
   * ``Origin`` present: it must be ``http(s)://<the Host header>``;
     ``Origin: null`` (sandboxed frames, ``file:`` pages, some redirects) is refused;
   * ``Sec-Fetch-Site`` on anything but a top-level GET of the page must be
     ``same-origin`` or ``none`` (typed URL / bookmark). ``cross-site`` *and*
     ``same-site`` are refused: another port on localhost is same-site but is a
     different application.
4. **Token** (only when the server has one): ``Authorization: Bearer <token>``
   or the session cookie that ``GET /?token=<token>`` sets (HttpOnly,
   SameSite=Strict; its value is an HMAC of the token, not the token). Every
   comparison is constant-time (:func:`hmac.compare_digest`). Else 401.
5. **JSON only**: POST / PUT / PATCH need ``Content-Type: application/json``
   (415). Together with the Origin check this keeps HTML forms from other sites
   out: they cannot send that type without a CORS preflight, which this server
   never grants (it sends no ``Access-Control-*`` header at all).

Every response gets security headers (CSP with no outside source, nosniff,
no-referrer, frame-ancestors 'none' / X-Frame-Options DENY, CORP same-origin).
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from typing import Iterable
from urllib.parse import parse_qs

COOKIE_NAME = "cpuflow_session"
LOCAL_NAMES = ("localhost", "127.0.0.1", "[::1]")
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
BODY_METHODS = ("POST", "PUT", "PATCH")


def is_loopback(host: str) -> bool:
    """True for names/addresses that only this machine can reach."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _host_entry(host: str, port: int) -> str:
    h = host.strip().lower()
    if ":" in h and not h.startswith("["):
        h = f"[{h}]"  # a bare IPv6 address
    return f"{h}:{port}"


def default_allowed_hosts(port: int, bind_host: str | None = None, extra: Iterable[str] = ()) -> list[str]:
    """The exact ``Host`` header values the server answers to.

    ``extra`` entries without a port get the server's port; ``name:port``
    entries are kept as given. Port 80 also allows the bare name (browsers
    leave the default port out)."""
    names = list(LOCAL_NAMES)
    if bind_host and bind_host not in ("0.0.0.0", "::", ""):
        names.append(bind_host)
    out: list[str] = []
    for n in names:
        out.append(_host_entry(n, port))
    for e in extra:
        e = e.strip().lower()
        if not e:
            continue
        if e.startswith("[") and "]:" in e or (not e.startswith("[") and e.count(":") == 1):
            out.append(e)
        else:
            out.append(_host_entry(e, port))
    if port == 80:
        out += [h.rsplit(":", 1)[0] for h in list(out) if h.endswith(":80")]
    return list(dict.fromkeys(out))


def session_value(token: str) -> str:
    """The cookie value for a token: HMAC-SHA256(token, label). A leaked
    cookie works as a login for this server only and does not reveal the token."""
    return hmac.new(token.encode(), b"cpuflow-session-v1", hashlib.sha256).hexdigest()


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "surrogateescape"), b.encode("utf-8", "surrogateescape"))


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def security_headers(csp: str = API_CSP) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-security-policy", csp.encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"x-frame-options", b"DENY"),
        (b"cross-origin-resource-policy", b"same-origin"),
        (b"cross-origin-opener-policy", b"same-origin"),
        (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
    ]


class SecurityMiddleware:
    """Pure ASGI middleware (so it also guards streaming responses)."""

    def __init__(self, app, *, allowed_hosts: Iterable[str], token: str | None = None,
                 max_body: int = 16 * 1024 * 1024, page_csp: str = API_CSP):
        self.app = app
        self.allowed = {h.lower() for h in allowed_hosts}
        self.token = token or None
        self.cookie = session_value(token) if token else None
        self.max_body = int(max_body)
        self.page_csp = page_csp

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if scope["type"] != "http":  # no websockets here
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        headers = _headers(scope)
        method = scope["method"].upper()
        path = scope.get("path", "")

        host = headers.get("host", "").lower()
        if host not in self.allowed:
            return await _reply(send, 400, "bad_host",
                                "this server does not answer to that Host name; "
                                "open it as http://127.0.0.1:PORT/ or start it with --allow-host NAME")

        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return await _reply(send, 400, "bad_request", "Content-Length is not a number")
            if int(length) > self.max_body:
                return await _reply(send, 413, "too_large",
                                    f"the request body is over the limit of {self.max_body} bytes")

        origin = headers.get("origin")
        if origin is not None:
            if origin.strip().lower() == "null":
                return await _reply(send, 403, "cross_site", "requests from an opaque origin (Origin: null) "
                                    "are refused")
            if origin.lower() not in (f"http://{host}", f"https://{host}"):
                return await _reply(send, 403, "cross_site", "cross-origin requests are refused")
        is_page = method in ("GET", "HEAD") and path == "/"
        site = headers.get("sec-fetch-site")
        if site is not None and not is_page and site.lower() not in ("same-origin", "none"):
            return await _reply(send, 403, "cross_site", "requests from other sites are refused")

        if self.token:
            if is_page and method == "GET":
                given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
                if given is not None:
                    return await self._login(send, given[0])
            if not self._authorised(headers):
                if is_page:
                    return await _reply_page(send, 401, _LOGIN_PAGE)
                return await _reply(send, 401, "unauthorized",
                                    "this server needs its access token: send 'Authorization: Bearer TOKEN' "
                                    "or open /?token=TOKEN once in the browser",
                                    extra=[(b"www-authenticate", b'Bearer realm="cpuflow"')])

        if method in BODY_METHODS:
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return await _reply(send, 415, "unsupported_media_type",
                                    "request bodies must be JSON (Content-Type: application/json)")

        csp = self.page_csp if is_page else API_CSP
        if method in BODY_METHODS:
            # Read the (capped) body here, so that an oversized chunked body is
            # answered with a clean 413 before any route sees it.
            body = await _read_body(receive, self.max_body)
            if body is None:
                return await _reply(send, 413, "too_large",
                                    f"the request body is over the limit of {self.max_body} bytes")
            receive = _replay(body, receive)

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                hs = [(k, v) for k, v in message.get("headers", [])
                      if not k.lower().startswith(b"access-control-") and k.lower() != b"server"]
                present = {k.lower() for k, _ in hs}
                hs += [(k, v) for k, v in security_headers(csp) if k not in present]
                if path.startswith("/api/") and b"cache-control" not in present:
                    hs.append((b"cache-control", b"no-store"))
                message = dict(message, headers=hs)
            await send(message)

        await self.app(scope, receive, send_wrapper)

    def _authorised(self, headers: dict) -> bool:
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value and _same(value.strip(), self.token):
            return True
        cookie = _cookies(headers.get("cookie", "")).get(COOKIE_NAME)
        return cookie is not None and _same(cookie, self.cookie)

    async def _login(self, send, given: str):
        if not _same(given, self.token):
            return await _reply_page(send, 401, _LOGIN_PAGE)
        cookie = f"{COOKIE_NAME}={self.cookie}; Path=/; HttpOnly; SameSite=Strict"
        # 303 to the bare page: the token leaves the address bar and the history.
        await send({"type": "http.response.start", "status": 303,
                    "headers": [(b"location", b"/"), (b"set-cookie", cookie.encode()),
                                (b"cache-control", b"no-store"), (b"content-length", b"0")]
                    + security_headers()})
        await send({"type": "http.response.body", "body": b""})


async def _read_body(receive, limit: int) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = [False]

    async def wrapped():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return wrapped


_LOGIN_PAGE = (b"<!doctype html><meta charset=utf-8><title>cpuflow: token needed</title>"
               b"<h1>This cpuflow server needs its access token</h1>"
               b"<p>Open the address that <code>cpuflow serve</code> printed (it ends in "
               b"<code>/?token=...</code>).</p>")


def _headers(scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in scope.get("headers", []):
        name = k.decode("latin-1").lower()
        value = v.decode("latin-1")
        # a repeated Host / Origin / Content-Length is suspicious: keep a value no check accepts
        out[name] = value if name not in out else (out[name] + ", " + value)
    return out


def _cookies(header: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in header.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k not in out:
            out[k] = v
    return out


async def _reply(send, status: int, code: str, message: str, extra=()):
    body = error_body(code, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store"), *extra] + security_headers()})
    await send({"type": "http.response.body", "body": body})


async def _reply_page(send, status: int, body: bytes):
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/html; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()), (b"cache-control", b"no-store")]
                + security_headers()})
    await send({"type": "http.response.body", "body": body})

"""`cpuflow serve` security (shared/reliability.md items 16-20).

Host allow-list (DNS rebinding), Origin / Sec-Fetch-Site / ``Origin: null``,
JSON-only bodies, no CORS, the access token, body / pixel / prompt / queue caps,
path traversal against a real uvicorn server (raw request targets, so no client
normalises them), error hygiene, and the `serve` command's bind rules.
"""
from __future__ import annotations

import base64
import http.client
import json
import socket
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
from click.testing import CliRunner  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from cpuflow.errors import InvalidArgument, MissingDependency  # noqa: E402
from cpuflow.server.app import Limits, create_app  # noqa: E402
from cpuflow.server.security import default_allowed_hosts, is_loopback, session_value  # noqa: E402
from test_server import BASE, FakePipeline, b64png, submit, wait  # noqa: E402

TOKEN = "tok-0123456789abcdef-SECRET"


def client(**kw) -> TestClient:
    pipe = kw.pop("pipe", None) or FakePipeline()
    return TestClient(create_app({"fake": pipe}, **kw), base_url=BASE)


def is_error(r, status, code=None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) >= {"code", "message"} and isinstance(err["message"], str)
    if code:
        assert err["code"] == code, err
    return err


# --- Host header (DNS rebinding) ----------------------------------------------------
@pytest.mark.parametrize("host, ok", [
    ("127.0.0.1:7860", True), ("localhost:7860", True), ("[::1]:7860", True), ("LOCALHOST:7860", True),
    ("evil.example:7860", False), ("evil.example", False), ("127.0.0.1:7861", False), ("localhost", False),
    ("127.0.0.1.evil.example:7860", False), ("localhost:7860.evil.example", False), ("", False),
    ("127.0.0.1:7860, evil.example", False), ("mybox.local:7860", False),
])
def test_host_allow_list(host, ok):
    c = client()
    r = c.get("/api/models", headers={"Host": host})
    if ok:
        assert r.status_code == 200
    else:
        is_error(r, 400, "bad_host")
        assert "evil" not in r.text


def test_allow_host_option_and_defaults():
    hosts = default_allowed_hosts(8000, "192.168.1.5", ["mybox.local", "other:9000"])
    assert hosts == ["localhost:8000", "127.0.0.1:8000", "[::1]:8000", "192.168.1.5:8000", "mybox.local:8000",
                     "other:9000"]
    assert default_allowed_hosts(80) == ["localhost:80", "127.0.0.1:80", "[::1]:80", "localhost", "127.0.0.1",
                                         "[::1]"]
    c = client(allowed_hosts=default_allowed_hosts(7860, extra=["mybox.local"]))
    assert c.get("/api/models", headers={"Host": "mybox.local:7860"}).status_code == 200
    is_error(c.get("/api/models", headers={"Host": "mybox.local:80"}), 400, "bad_host")


# --- cross-site requests ---------------------------------------------------------------
def _image_url(c) -> str:
    return wait(c, submit(c, seed=1, steps=1)["id"])["images"][0]["url"]


@pytest.mark.parametrize("headers, ok", [
    ({"Origin": "http://127.0.0.1:7860"}, True),
    ({"Origin": "https://127.0.0.1:7860"}, True),
    ({"Origin": "http://evil.example"}, False),
    ({"Origin": "http://localhost:7860"}, False),           # another origin than the Host asked for
    ({"Origin": "http://127.0.0.1:7861"}, False),
    ({"Origin": "null"}, False),
    ({"Sec-Fetch-Site": "cross-site"}, False),
    ({"Sec-Fetch-Site": "same-site"}, False),                # another port on localhost is another app
    ({"Sec-Fetch-Site": "same-origin"}, True),
    ({"Sec-Fetch-Site": "none"}, True),
    ({"Origin": "http://127.0.0.1:7860", "Sec-Fetch-Site": "cross-site"}, False),
])
def test_cross_site_requests_refused(headers, ok):
    c = client()
    url = _image_url(c)
    for method, path, kw in (("POST", "/api/generate", {"json": {"prompt": "x", "steps": 1}}),
                             ("GET", url, {}), ("GET", "/api/models", {}),
                             ("POST", "/api/jobs/" + "A" * 22 + "/cancel", {"json": {}})):
        r = c.request(method, path, headers=headers, **kw)
        if ok:
            assert r.status_code in (200, 202, 404), (method, path, r.text)
        else:
            is_error(r, 403, "cross_site")


def test_page_navigation_from_another_site_is_allowed_but_not_framed():
    c = client()
    r = c.get("/", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"})
    assert r.status_code == 200
    assert r.headers["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in r.headers["content-security-policy"]
    is_error(c.get("/", headers={"Origin": "null"}), 403, "cross_site")


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                   "application/json-patch+json", "text/json"])
def test_json_bodies_only(ctype):
    c = client()
    headers = {} if ctype is None else {"Content-Type": ctype}
    r = c.post("/api/generate", content=b'{"prompt": "x"}', headers=headers)
    is_error(r, 415, "unsupported_media_type")
    assert c.post("/api/generate", content=b'{"prompt": "x"}',
                  headers={"Content-Type": "application/json; charset=utf-8"}).status_code == 202


def test_no_cors_headers_ever():
    c = client()
    responses = [
        c.options("/api/generate", headers={"Origin": "http://127.0.0.1:7860",
                                            "Access-Control-Request-Method": "POST",
                                            "Access-Control-Request-Headers": "content-type"}),
        c.options("/api/generate", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}),
        c.get("/api/models", headers={"Origin": "http://127.0.0.1:7860"}),
        c.get("/"), c.post("/api/generate", json={"prompt": "x"}),
    ]
    for r in responses:
        assert not [h for h in r.headers if h.lower().startswith("access-control-")], r.headers
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert "server" not in {k.lower() for k in r.headers} or "uvicorn" not in r.headers.get("server", "")


# --- the access token ---------------------------------------------------------------------
def test_token_required_everywhere_when_set():
    c = client(token=TOKEN)
    for method, path in (("GET", "/api/models"), ("GET", "/api/jobs"), ("GET", "/api/openapi.json"),
                         ("GET", "/api/images/" + "A" * 22), ("POST", "/api/generate")):
        r = c.request(method, path, json={"prompt": "x"} if method == "POST" else None)
        is_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"].startswith("Bearer")
    r = c.get("/")
    assert r.status_code == 401 and "token" in r.text and 'id="prompt"' not in r.text
    for bad in ("Bearer wrong", "Bearer " + TOKEN[:-1], "Bearer " + TOKEN + "x", "Basic " + TOKEN, TOKEN, ""):
        is_error(c.get("/api/models", headers={"Authorization": bad}), 401)
    assert c.get("/api/models", headers={"Authorization": "Bearer " + TOKEN}).status_code == 200
    assert c.get("/api/models", headers={"Authorization": "bearer " + TOKEN}).status_code == 200


def test_token_login_sets_a_strict_httponly_cookie():
    c = client(token=TOKEN)
    r = c.get("/?token=wrong", follow_redirects=False)
    assert r.status_code == 401 and "set-cookie" not in r.headers
    r = c.get("/?token=" + TOKEN, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"       # the token leaves the address bar
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    assert session_value(TOKEN) in cookie
    # the cookie now opens the page, the API, images and the event stream
    assert 'id="prompt"' in c.get("/").text
    job = wait(c, submit(c, seed=2, steps=2)["id"])
    assert c.get(job["images"][0]["url"]).status_code == 200
    with c.stream("GET", f"/api/jobs/{job['id']}/events") as s:
        assert s.status_code == 200
    c.cookies.clear()
    c.cookies.set("cpuflow_session", session_value("another-token-xxxxxxxx"))
    is_error(c.get("/api/models"), 401)
    # cross-site requests stay refused even with a valid cookie
    c.cookies.set("cpuflow_session", session_value(TOKEN))
    is_error(c.post("/api/generate", json={"prompt": "x"}, headers={"Sec-Fetch-Site": "cross-site"}), 403)


# --- caps ------------------------------------------------------------------------------------
def test_body_size_cap_content_length_and_chunked():
    c = client(limits=Limits(max_body=2000))
    big = json.dumps({"prompt": "x", "init_image": "A" * 4000}).encode()
    is_error(c.post("/api/generate", content=big, headers={"Content-Type": "application/json"}), 413, "too_large")

    def chunks():
        for _ in range(10):
            yield b" " * 500
        yield b'{"prompt": "x"}'
    r = c.post("/api/generate", content=chunks(), headers={"Content-Type": "application/json"})
    is_error(r, 413, "too_large")
    is_error(c.post("/api/generate", content=b"{}", headers={"Content-Type": "application/json",
                                                             "Content-Length": "abc"}), 400)
    assert c.post("/api/generate", json={"prompt": "x", "steps": 1}).status_code == 202


def test_pixel_prompt_sample_and_queue_caps():
    c = client(limits=Limits(max_pixels=64 * 64, max_prompt_chars=50, max_samples=2, max_queue=1),
               pipe=FakePipeline(step_delay=0.05))
    is_error(c.post("/api/generate", json={"prompt": "x", "width": 128, "height": 64}), 413, "too_large")
    is_error(c.post("/api/generate", json={"prompt": "x" * 51}), 413, "too_large")
    is_error(c.post("/api/generate", json={"prompt": "x", "negative_prompt": "y" * 51}), 413, "too_large")
    is_error(c.post("/api/generate", json={"prompt": "x", "n_samples": 3}), 413, "too_large")
    # an init image is worked at the model's area unless width / height say more: here 128 -> 128x128
    is_error(c.post("/api/generate", json={"prompt": "x", "init_image": b64png((128, 128)), "width": 128}),
             413, "too_large")
    a = submit(c, steps=100)
    b = submit(c, steps=1)
    r = c.post("/api/generate", json={"prompt": "x"})
    is_error(r, 429, "queue_full")
    assert r.headers["retry-after"].isdigit()
    c.post(f"/api/jobs/{a['id']}/cancel", json={})
    assert wait(c, b["id"])["status"] == "done"


@pytest.mark.parametrize("body", [
    {"prompt": "x", "unknown": 1},
    {"prompt": "x", "model_path": "/etc"},
    {"prompt": "x", "init_image_path": "/etc/passwd"},
    {"prompt": "x", "init_image_url": "http://example.com/a.png"},
    {"prompt": "x", "output": "../../x.png"},
    {"prompt": "x", "cache_dir": "/tmp"},
    {"prompt": "x", "backend": "onnxruntime"},
    [{"prompt": "x"}],
    "x",
    {},
])
def test_unknown_fields_and_wrong_shapes_rejected(body):
    c = client()
    err = is_error(c.post("/api/generate", json=body), 422)
    assert err["code"] == "invalid_request"
    assert "/etc" not in err["message"] and "http" not in err["message"]


def test_no_paths_urls_or_files_taken_from_requests():
    c = client()
    # a model is chosen by a server-made id only
    for model in ("/tmp", "../default", "file:///etc", "http://example.com/model", "fake/../fake"):
        err = is_error(c.post("/api/generate", json={"prompt": "x", "model": model}), 422, "invalid_argument")
        assert "fake" in err["message"]          # names the valid ids
    # an init image is base64 bytes, never a path or URL
    for image in ("/etc/passwd", "file:///etc/passwd", "http://127.0.0.1:7860/api/models", "../pyproject.toml"):
        is_error(c.post("/api/generate", json={"prompt": "x", "init_image": image}), 422, "invalid_image")


# --- path traversal against a real server ----------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live():
    import uvicorn
    port = _free_port()
    app = create_app({"fake": FakePipeline()}, port=port, max_queue=16)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    t0 = time.time()
    while not server.started:
        assert time.time() - t0 < 20, "uvicorn did not start"
        time.sleep(0.02)
    yield port
    server.should_exit = True
    th.join(5)
    app.state.jobs.stop()


def raw(port: int, target: str, method: str = "GET", headers: dict | None = None, body: bytes = b""):
    """Send a request target exactly as given (no client-side normalisation)."""
    hs = {"Host": f"127.0.0.1:{port}", "Connection": "close", **(headers or {})}
    if body:
        hs["Content-Length"] = str(len(body))
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hs.items()) + "\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head.encode("latin-1") + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, content = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, head.decode("latin-1"), content


def _live_image(port) -> str:
    st, _, body = raw(port, "/api/generate", "POST", {"Content-Type": "application/json"},
                      json.dumps({"prompt": "x", "seed": 1, "steps": 1}).encode())
    assert st == 202
    job_id = json.loads(body)["id"]
    for _ in range(500):
        job = json.loads(raw(port, f"/api/jobs/{job_id}")[2])
        if job["status"] == "done":
            return job["images"][0]["id"]
        time.sleep(0.01)
    raise AssertionError("no image")


TRAVERSALS = [
    "/api/images/../../pyproject.toml", "/api/images/..%2f..%2fpyproject.toml", "/api/images/..%2F..%2Fetc%2Fpasswd",
    "/api/images/%2e%2e/%2e%2e/etc/passwd", "/api/images/%2e%2e%2f%2e%2e%2fpyproject.toml",
    "/api/images/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd", "/api/images/..\\..\\pyproject.toml",
    "/api/images/..%5c..%5cpyproject.toml", "/api/images/%252e%252e%252fpyproject.toml",
    "/api/images/%25252e%25252e%25252fetc%25252fpasswd", "/api/images/..%252f..%252fetc%252fpasswd",
    "/api/images/%2fetc%2fpasswd", "/api/images//etc/passwd", "/api/images/%2Fetc%2Fpasswd",
    "/api/images/C:%5cWindows%5cwin.ini", "/api/images/C:\\Windows\\win.ini", "/api/images/file:%2f%2f%2fetc%2fpasswd",
    "/api/images/%00", "/api/images/{id}%00", "/api/images/{id}%00.png", "/api/images/..%00/pyproject.toml",
    "/api/images/%c0%ae%c0%ae%c0%afetc%c0%afpasswd", "/api/images/..%c0%af..%c0%afpyproject.toml",
    "/api/images/%e0%80%ae%e0%80%ae/pyproject.toml", "/api/images/....//....//etc/passwd",
    "/api/images/x/../{id}", "/api/images/{id}/..", "/api/images/{id}/", "/api/images/{id}.png",
    "/api/images/..", "/api/images/.", "/api/images/%2e%2e", "/api/images/%2e", "/api/images/{ID}",
    "/api/images/{id}%2f..%2f{id}", "/api/images/{id};.png", "/api/images/~root",
    "/..%2f..%2fpyproject.toml", "/%2e%2e/%2e%2e/pyproject.toml", "/../../pyproject.toml",
    "/static/..%2f..%2fserver%2fapp.py", "/cpuflow/server/app.py", "/page.html", "/server/page.html",
    "/api/jobs/..%2f..%2fpyproject.toml", "/api/jobs/{id}/../../../pyproject.toml", "/api/../pyproject.toml",
    "/api/models/..%2f..%2fpyproject.toml", "/favicon.ico", "/docs", "/redoc",
]


def test_path_traversal_spellings_all_404(live):
    image_id = _live_image(live)
    st, head, body = raw(live, f"/api/images/{image_id}")
    assert st == 200 and body.startswith(b"\x89PNG")
    for spelling in TRAVERSALS:
        target = spelling.replace("{id}", image_id).replace("{ID}", image_id.swapcase())
        st, head, body = raw(live, target)
        assert st == 404, (target, st, body[:200])
        err = json.loads(body)["error"]
        assert err["code"] == "not_found", target
        for leak in (b"root:", b"[project]", b"import ", b"Traceback", b"/work", b"\x89PNG"):
            assert leak not in body, (target, leak)


def test_concurrent_http_requests_give_the_serial_images(live):
    def image_for(seed):
        conn = http.client.HTTPConnection("127.0.0.1", live, timeout=30)
        conn.request("POST", "/api/generate", json.dumps({"prompt": "a cat", "seed": seed, "steps": 2}),
                     {"Content-Type": "application/json"})
        job = json.loads(conn.getresponse().read())
        while job["status"] not in ("done", "failed", "cancelled"):
            time.sleep(0.01)
            conn.request("GET", f"/api/jobs/{job['id']}")
            job = json.loads(conn.getresponse().read())
        conn.request("GET", job["images"][0]["url"])
        png = conn.getresponse().read()
        conn.close()
        from PIL import Image
        import io
        return Image.open(io.BytesIO(png)).tobytes()

    seeds = list(range(100, 108))
    serial = {s: image_for(s) for s in seeds}
    parallel: dict = {}
    threads = [threading.Thread(target=lambda s=s: parallel.__setitem__(s, image_for(s))) for s in seeds]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert parallel == serial


# --- error hygiene ---------------------------------------------------------------------------------
def test_error_responses_never_carry_traces_paths_or_tokens():
    c = client(token=TOKEN, limits=Limits(max_body=5000, max_queue=0), pipe=FakePipeline(step_delay=0.05))
    auth = {"Authorization": "Bearer " + TOKEN}
    submit_r = c.post("/api/generate", json={"prompt": "x", "steps": 100}, headers=auth)
    assert submit_r.status_code == 202
    responses = [
        c.get("/api/models"),                                            # 401
        c.get("/api/models", headers={"Authorization": "Bearer " + TOKEN + "x"}),
        c.get("/api/models", headers={"Host": "evil.example", **auth}),   # 400
        c.get("/api/models", headers={"Origin": "null", **auth}),        # 403
        c.get("/nope/../../etc/passwd", headers=auth),                   # 404
        c.put("/api/models", headers=auth, json={}),                     # 405
        c.post("/api/generate", content=b"x", headers={"Content-Type": "text/plain", **auth}),   # 415
        c.post("/api/generate", content=b"{" * 6000, headers={"Content-Type": "application/json", **auth}),  # 413
        c.post("/api/generate", content=b"{not json", headers={"Content-Type": "application/json", **auth}),  # 422
        c.post("/api/generate", json={"prompt": "x", "init_image": base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()},
               headers=auth),                                            # 422 damaged image
        c.post("/api/generate", json={"prompt": "x"}, headers=auth),     # 429
        c.post("/api/jobs/" + "B" * 22 + "/cancel", json={}, headers=auth),   # 404
    ]
    statuses = {r.status_code for r in responses}
    assert statuses >= {400, 401, 403, 404, 405, 413, 415, 422, 429}, statuses
    for r in responses:
        err = r.json()["error"]
        assert set(err) == {"code", "message"}, r.text
        for leak in ("Traceback", 'File "', "/work", "/tmp", "/home", "site-packages", TOKEN, "cpuflow/"):
            assert leak not in r.text, (r.status_code, leak, r.text)
    c.post(f"/api/jobs/{submit_r.json()['id']}/cancel", json={}, headers=auth)


# --- the serve command --------------------------------------------------------------------------------
def test_is_loopback():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]", "LOCALHOST"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.2", "example.com", "10.0.0.1"))


@pytest.fixture
def fake_serve(monkeypatch):
    import uvicorn
    import cpuflow.server.app as app_mod
    calls = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.setdefault("run", kw))
    monkeypatch.setattr(app_mod, "create_app", lambda models, **kw: calls.setdefault("app", (models, kw)))
    monkeypatch.delenv("CPUFLOW_TOKEN", raising=False)
    import socket

    import cpuflow.serve_cli as serve_cli   # no real port: 7860 may be in use on the machine running the suite
    monkeypatch.setattr(serve_cli, "listen_socket", lambda host, port: calls.setdefault("socket", socket.socket()))
    return calls


def test_serve_binds_localhost_by_default(fake_serve):
    from cpuflow.serve_cli import serve_command
    r = CliRunner().invoke(serve_command, [])
    assert r.exit_code == 0, r.output
    assert fake_serve["run"]["host"] == "127.0.0.1" and fake_serve["run"]["port"] == 7860
    models, kw = fake_serve["app"]
    assert models == {"default": None} and kw["token"] is None
    assert set(kw["allowed_hosts"]) == {"localhost:7860", "127.0.0.1:7860", "[::1]:7860"}


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "example.com"])
def test_serve_refuses_other_addresses_without_token(fake_serve, host):
    from cpuflow.serve_cli import serve_command
    r = CliRunner().invoke(serve_command, ["--host", host])
    assert isinstance(r.exception, InvalidArgument) and "token" in str(r.exception)
    assert "run" not in fake_serve


def test_serve_with_token_from_env_or_option(fake_serve, tmp_path):
    from cpuflow.serve_cli import serve_command
    (tmp_path / "sd15").mkdir()
    r = CliRunner().invoke(serve_command, ["--host", "0.0.0.0", "--allow-host", "mybox.local",
                                           "--model", str(tmp_path / "sd15"), "--model", str(tmp_path / "sd15")],
                           env={"CPUFLOW_TOKEN": TOKEN})
    assert r.exit_code == 0, r.output
    models, kw = fake_serve["app"]
    assert list(models) == ["sd15", "sd15-2"] and kw["token"] == TOKEN
    assert "mybox.local:7860" in kw["allowed_hosts"] and fake_serve["run"]["host"] == "0.0.0.0"
    r = CliRunner().invoke(serve_command, ["--host", "0.0.0.0", "--token", "short"])
    assert isinstance(r.exception, InvalidArgument)
    r = CliRunner().invoke(serve_command, ["--host", "0.0.0.0", "--token", "random"])
    assert r.exit_code == 0 and "?token=" in r.output


def test_serve_without_fastapi_names_the_extra(monkeypatch):
    from cpuflow.serve_cli import serve_command
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    r = CliRunner().invoke(serve_command, [])
    assert isinstance(r.exception, MissingDependency) and "cpuflow[serve]" in str(r.exception)


def test_serve_is_mounted_on_the_cli():
    import cpuflow.cli
    from cpuflow.serve_cli import serve_command
    if "serve" not in cpuflow.cli.main.commands:
        pytest.skip("`cpuflow serve` is not mounted on cpuflow.cli.main yet (main.add_command(serve_command))")
    assert cpuflow.cli.main.commands["serve"] is serve_command
    r = CliRunner().invoke(cpuflow.cli.main, ["serve", "--host", "0.0.0.0"], env={"CPUFLOW_TOKEN": ""})
    assert r.exit_code == 2 and "token" in r.output and "Traceback" not in r.output

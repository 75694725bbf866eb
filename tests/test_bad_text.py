"""Issue 17 items 3 and 4: text UTF-8 cannot hold (a lone surrogate from JSON,
bytes that are not UTF-8 on a command line) is refused up front, by the one
GenerationRequest check the CLI, the API and the server share."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cpuflow.config import GenerationRequest
from cpuflow.errors import InvalidArgument


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
@pytest.mark.parametrize("text, said", [("\ud800 x", r"lone surrogate \ud800"),
                                        ("a red \udcff circle", r"byte \xff")])
def test_request_refuses_text_utf8_cannot_hold(field, text, said):
    kw = {"prompt": "x", field: text}
    with pytest.raises(InvalidArgument, match=f"{field} is not valid text.*{said.replace(chr(92), chr(92) * 2)}"):
        GenerationRequest(**kw)
    GenerationRequest(prompt="emoji 🦊, RTL שלום, e\u0301, NUL \x00")   # odd but valid text still passes


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_server_refuses_a_lone_surrogate_before_queueing(field):
    pytest.importorskip("fastapi")
    from test_server import make_client
    c = make_client()
    body = '{"prompt": "a red circle", "%s": "\\ud800 x"}' % field     # the JSON escape, as a client sends it
    r = c.post("/api/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_argument" and f"{field} is not valid text" in err["message"]
    assert c.get("/api/jobs").json()["jobs"] == []                    # nothing was queued


def test_cli_refuses_bytes_that_are_not_utf8_before_generating(tmp_path):
    out = tmp_path / "never.png"
    p = subprocess.run([sys.executable, "-m", "cpuflow.cli", "generate", b"a red \xff circle", "--out", str(out),
                        "-q"], capture_output=True, timeout=120, env=dict(os.environ, LC_ALL="C.UTF-8"))
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode == 2, err
    assert err.strip().count("\n") == 0 and err.startswith("error: prompt is not valid text") and r"\xff" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []

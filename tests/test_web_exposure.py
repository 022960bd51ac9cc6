"""The web page is not exposed without a word: --share needs --auth, a bind beyond loopback without auth warns,
and the page's server takes no uploads."""

import subprocess
import sys
import urllib.error
import urllib.request

import gradio as gr
import pytest
from conftest import REPO, free_port

from qwen.scripts import is_loopback, warn_if_exposed
from qwen.webui import launch_page


def test_share_without_auth_is_refused():
    done = subprocess.run([sys.executable, "web_demo.py", "--share"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "--share needs --auth USER:PASSWORD" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("host, auth, warned", [
    ("0.0.0.0", False, True), ("192.168.1.5", False, True), ("::", False, True),
    ("0.0.0.0", True, False), ("127.0.0.1", False, False), ("localhost", False, False), ("::1", False, False),
])
def test_listening_beyond_loopback_without_auth_warns(capsys, host, auth, warned):
    warn_if_exposed(host, auth, "--auth USER:PASSWORD")
    err = capsys.readouterr().err
    assert ("WARNING: listening on" in err and "--auth USER:PASSWORD" in err) == warned


def test_loopback_names():
    assert all(map(is_loopback, ["127.0.0.1", "127.8.0.1", "localhost", "LOCALHOST.", "a.localhost", "::1", "[::1]"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "example.com", "localhost.example.com", "10.0.0.1", ""]))


def test_the_page_refuses_uploads():
    """gradio stores any upload and serves it back; the page uses none, so its server takes none."""
    with gr.Blocks() as demo:
        gr.Markdown("page")
    port = free_port()
    launch_page(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    try:
        boundary = "qwenboundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.txt\"\r\n"
                f"Content-Type: text/plain\r\n\r\n").encode() + b"x" * 20_000 + f"\r\n--{boundary}--\r\n".encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/gradio_api/upload", data=body, method="POST",
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 413
    finally:
        demo.close()

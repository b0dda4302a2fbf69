"""`cifarlab serve`: the page end to end in headless Chromium on a real image, and the bad requests a
learner's browser (or anyone on the machine) can send, each a clear 4xx while the server keeps serving."""
from __future__ import annotations

import io
import json
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cifarlab.serve as serve_module
from cifarlab.cli import main
from cifarlab.evaluation import run_split
from cifarlab.explain import explain_tensor, topk
from cifarlab.serve import ExplainServer
from test_report import _chromium, _headless


@pytest.fixture(scope="module")
def server(shared_images: Path, tmp_path_factory: pytest.TempPathFactory):
    """A server (port chosen by the system) for a seed CNN trained 1 epoch on 1,000 real images."""
    root = tmp_path_factory.mktemp("serve")
    for class_dir in sorted(shared_images.iterdir()):
        (root / "train" / class_dir.name).mkdir(parents=True)
        for path in sorted(class_dir.iterdir())[:100]:
            (root / "train" / class_dir.name / path.name).write_bytes(path.read_bytes())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CIFARLAB_CACHE", str(root / "cache"))
        assert main(["train", "--data", str(root / "train"), "--epochs", "1", "--batch-size", "32", "--lr", "2e-3",
                     "--val-split", "100", "--out", str(root / "run")]) == 0
        httpd = ExplainServer(root / "run", port=0)
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        try:
            yield httpd, root
        finally:
            httpd.shutdown()
            httpd.server_close()
            thread.join(timeout=10)


def _url(httpd: ExplainServer, path: str) -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}{path}"


def _request(httpd: ExplainServer, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(_url(httpd, path), data=body, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _real_jpeg(root: Path) -> bytes:
    return sorted((root / "train" / "ship").iterdir())[0].read_bytes()


def test_binds_this_machine_only(server) -> None:
    httpd, _ = server
    assert httpd.server_address[0] == "127.0.0.1"


def test_page_shows_the_prediction_of_a_real_image_in_chromium(server, tmp_path: Path) -> None:
    """The page fetches validation image 3 and uploads it through its own upload code; the top-5 it shows
    are the model's."""
    httpd, root = server
    chromium = _chromium()
    dom = _headless(chromium, tmp_path / "profile", "--virtual-time-budget=30000", "--dump-dom",
                    _url(httpd, "/?example=3"))
    image = run_split(httpd.explainer.info.config).images[3]
    expected = topk(explain_tensor(httpd.explainer, image, ()))
    title = re.search(r"<title>(.*?)</title>", dom.stdout)
    assert title and title.group(1) == f"prediction:{expected[0]['label']}", (title, dom.stderr[-2000:])
    shown = re.findall(r"<tr><td>(\w+)</td><td class=\"num\">([\d.]+)%</td></tr>", dom.stdout)
    assert [label for label, _ in shown] == [t["label"] for t in expected]
    assert [float(p) for _, p in shown] == [round(100 * t["probability"], 1) for t in expected]
    assert dom.stdout.count("<div class=\"layer\">") == len(httpd.explainer.layers)  # every conv and pool
    assert [line for line in dom.stderr.splitlines() if ":CONSOLE" in line] == []


def test_an_upload_gets_top5_gradcam_and_feature_maps(server) -> None:
    httpd, root = server
    status, body = _request(httpd, "/explain", _real_jpeg(root))
    result = json.loads(body)
    assert status == 200 and len(result["topk"]) == 5
    assert result["layer"] == httpd.explainer.default_layer == "feature_extractor.10"
    assert abs(sum(t["probability"] for t in result["topk"]) - 1) < 0.5  # 5 of 10 classes: most of the mass
    assert result["gradcam"].startswith("data:image/png;base64,") and len(result["layers"]) == 7
    assert result["layers"][0]["label"] == "feature_extractor.0 (Conv2d) 32x32x32"


@pytest.mark.parametrize("path, body, status, message", [
    ("/explain", b"not an image at all", 400, "not a readable image"),
    ("/explain", "truncated", 400, "not a readable image"),
    ("/explain", "oversized", 413, "the limit is 1,000"),
    ("/../../etc/passwd", None, 404, "not found: /../../etc/passwd"),
    ("/%2e%2e/%2e%2e/etc/passwd", None, 404, "not found"),
    ("/example/12.png", None, 404, "not found"),
    ("/serve.py", None, 404, "not found"),
    ("/elsewhere", b"x", 404, "not found"),
])
def test_bad_requests_are_a_clear_4xx_and_the_server_keeps_serving(server, monkeypatch, path, body, status,
                                                                   message) -> None:
    httpd, root = server
    if body == "truncated":
        body = _real_jpeg(root)[:400]
    if body == "oversized":
        monkeypatch.setattr(serve_module, "MAX_UPLOAD", 1000)
        body = _real_jpeg(root) + bytes(1000)
    got, answer = _request(httpd, path, body)
    assert got == status and message in json.loads(answer)["error"]
    good, result = _request(httpd, "/explain", _real_jpeg(root))
    assert good == 200 and json.loads(result)["topk"]


def test_examples_are_the_runs_validation_images(server) -> None:
    httpd, _ = server
    status, png = _request(httpd, "/example/0.png")
    image = torch.from_numpy(np.array(Image.open(io.BytesIO(png)))).permute(2, 0, 1)
    assert status == 200 and torch.equal(image, run_split(httpd.explainer.info.config).images[0])

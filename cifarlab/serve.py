"""`cifarlab serve RUN_DIR`: a local page where a learner drops or picks an image and sees the top-5
classes, the Grad-CAM overlay and the feature maps of every layer.

The standard library's threading HTTP server: a classroom tool for one machine needs no web framework,
and nothing to install beyond the package (Grad-CAM needs the `explain` extra, as `cifarlab explain`).
It binds 127.0.0.1 unless told otherwise. Routes: GET / (the page), POST /explain (the image's bytes as
the body; JSON back), GET /example/N.png (the run's N-th validation image, to try without a file).
Anything else is a 404; an unreadable or truncated image a 400; a body over MAX_UPLOAD a 413. Every
error is one JSON line {"error": ...} and the server goes on serving.
"""
from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cifarlab.data.sources import decode_image
from cifarlab.errors import CifarlabError
from cifarlab.explain import Explainer, captum_attr, explain_tensor, open_explainer, topk
from cifarlab.explain_draw import heat_overlay, layer_rows

MAX_UPLOAD = 8 * 1024 * 1024  # bytes: a phone photo fits; the model sees 32x32 anyway
EXAMPLES = 12  # validation images offered to try
PAGE = (Path(__file__).parent / "serve_page.html")


def png_uri(array: np.ndarray, scale: int = 1) -> str:
    """A uint8 HxW(x3) array as a data: URI, scaled up by pixel repetition (crisp, not blurred)."""
    image = Image.fromarray(array)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # fast: these are small and go over a local socket
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def answer(explainer: Explainer, data: bytes) -> dict:
    """The page's JSON for one uploaded image: top-5, the image, its Grad-CAM overlay and the feature maps."""
    size = explainer.info.image_size
    array, _ = decode_image(data, size, "the upload")
    arrays = explain_tensor(explainer, torch.from_numpy(array.copy()).permute(2, 0, 1), ("gradcam",))
    rows = [{"label": label, "tiles": [png_uri(t) for t in tiles]} for label, tiles in layer_rows(arrays)]
    return {"topk": topk(arrays), "layer": str(arrays["gradcam_layer"]), "image": png_uri(arrays["image"], 4),
            "gradcam": png_uri(heat_overlay(arrays["image"], arrays["attr:gradcam"]), 4), "layers": rows}


class Handler(BaseHTTPRequestHandler):
    """One request: the page, an explanation or an example image; a clear 4xx for anything else."""

    server: "ExplainServer"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
        pass  # a classroom page: no access log on the terminal

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send(status, json.dumps({"error": message}).encode(), "application/json")

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?")[0]
        if path == "/":
            return self._send(200, self.server.page, "text/html; charset=utf-8")
        name = path.removeprefix("/example/").removesuffix(".png")
        if path.startswith("/example/") and name.isdigit() and int(name) < EXAMPLES:
            try:
                image = self.server.example(int(name))
            except CifarlabError as error:
                return self._error(404, str(error))
            return self._send(200, base64.b64decode(png_uri(image).split(",")[1]), "image/png")
        self._error(404, f"not found: {path[:200]} (this server answers /, /example/0-{EXAMPLES - 1}.png and "
                         "POST /explain)")

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/explain":
            return self._error(404, f"not found: {self.path[:200]}")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._error(411, "send the image as the request body, with its Content-Length")
        if length > MAX_UPLOAD:
            self.close_connection = True  # the unread body is not left on the socket
            return self._error(413, f"the upload is {length:,} bytes; the limit is {MAX_UPLOAD:,}")
        data = self.rfile.read(length)
        try:
            with self.server.lock:  # one model, hooks on its layers: one explanation at a time
                result = answer(self.server.explainer, data)
        except CifarlabError as error:
            return self._error(400, str(error))
        self._send(200, json.dumps(result).encode(), "application/json")


class ExplainServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, run_dir: Path, host: str = "127.0.0.1", port: int = 8000) -> None:
        captum_attr()  # a missing package is one line before the server starts
        self.explainer = open_explainer(run_dir)
        self.lock = threading.Lock()
        self.page = PAGE.read_bytes()
        self._examples: torch.Tensor | None = None
        super().__init__((host, port), Handler)

    def example(self, n: int) -> np.ndarray:
        """The run's n-th validation image (read from its source on first use), HxWx3 uint8."""
        from cifarlab.evaluation import run_split

        with self.lock:
            if self._examples is None:
                self._examples = run_split(self.explainer.info.config).images[:EXAMPLES]
        return self._examples[n].permute(1, 2, 0).numpy()


def serve(run_dir: Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted."""
    server = ExplainServer(run_dir, host, port)
    print(f"serving {run_dir} on http://{host}:{server.server_address[1]}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()

"""A small explanation service on the standard library: POST an image, get back the predicted
class, its name, its score and the map that explains it, from one forward + one backward pass.

    python examples/serve.py                               # EfficientNet-Lite0 (ImageNet), saliency, port 8000
    python examples/serve.py --model zoo:digits --method grad_cam --port 8080   (default layer, said)
    python examples/serve.py --model torchvision:resnet18 --weights r18.pth --method grad_cam --layer layer4

    curl --data-binary @cat.jpg -H 'Content-Type: image/jpeg' 'localhost:8000/explain?overlay=1'
    curl -d '{"pixels": [[0.0, 0.1, ...], ...]}' -H 'Content-Type: application/json' localhost:8000/explain

Request (POST /explain): PNG or JPEG bytes (any size up to MAX_PIXELS: fitted to the model's
input size by the package's one preprocessing policy, :mod:`cnnviz_fast.core.images`, as the
CLI and report do), or JSON ``{"pixels": [H][W] or [C][H][W] values in [0, 1]}``.
Response (JSON): ``class``, ``label`` (the class name: ImageNet's for 1000-class models),
``score`` (the class's pre-softmax output), ``probability``, ``map`` (``[h][w]``, at most
``--map-size`` pixels a side, averaged down; one map per image by the method's registry map
rule), ``map_npy`` (the full-resolution map as a base64 ``.npy`` float32 file) and, with
``?overlay=1``, ``overlay_png``. Errors: JSON ``{"error": ...}`` with status 400 (bad
request), 405 (other verbs), 408 (a body that does not arrive within ``TIMEOUT`` seconds),
413 (too large) or 500. ``GET /health`` says which model and method run.

Requests are handled in threads (``ThreadingHTTPServer``); the one :class:`cnnviz_fast.Explainer`
is built at start-up and runs one call at a time on the model (see its docstring).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional, Sequence
from urllib.parse import parse_qs, urlparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import cnnviz_fast as cv
from cnnviz_fast import registry
from cnnviz_fast.core.images import fit_pixels
from cnnviz_fast.loading import DEFAULT_MODEL, MODEL_HELP, class_names, decode_file, load_model

MAX_BODY = 16 * 2**20  # bytes
MAX_PIXELS = 4096 * 4096  # per image, checked from the header before decoding
TIMEOUT = 30.0  # seconds a connection may stall while sending its request


class Service:
    """The model, its input format and the Explainer, built once."""

    def __init__(self, model: nn.Module, normalize, size: int, method: str = "saliency",
                 labels: Optional[Sequence[str]] = None, map_size: int = 32, resize: str = "crop", **arguments):
        self.model, self.size, self.map_size, self.resize = model, size, map_size, resize
        self.channels = normalize.channels if hasattr(normalize, "channels") else 3
        self.labels = labels
        self.method = method
        self.map_rule = registry.get_method(method).map_rule
        self.explainer = cv.Explainer(model, method, normalize=normalize, **arguments)

    def pixels_from_image(self, data: bytes) -> torch.Tensor:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                width, height = image.size
        except Exception as error:  # PIL raises several kinds for undecodable bytes
            raise ValueError(f"the body is not a readable PNG or JPEG image ({type(error).__name__})") from None
        if width * height > MAX_PIXELS:
            raise ValueError(f"the image has {width}×{height} pixels; at most {MAX_PIXELS} are accepted")
        try:
            array = decode_file(data, self.size, self.channels, self.resize)
        except Exception as error:  # truncated data, decoder errors
            raise ValueError(f"the body is not a readable PNG or JPEG image ({type(error).__name__})") from None
        return torch.from_numpy(array).permute(2, 0, 1).float().div_(255)[None]

    def pixels_from_json(self, data: bytes) -> torch.Tensor:
        usage = 'JSON body must be {"pixels": [H][W] or [C][H][W] numbers}'
        try:
            pixels = torch.tensor(json.loads(data)["pixels"], dtype=torch.float32)
        except (ValueError, KeyError, TypeError, RecursionError) as error:
            raise ValueError(f"{usage} ({type(error).__name__})") from None
        if pixels.dim() == 2:
            pixels = pixels[None]
        if pixels.dim() != 3 or pixels.shape[0] not in (1, self.channels) or 0 in pixels.shape:
            raise ValueError(f"pixels must be [H][W] or [{self.channels}][H][W] with H, W >= 1, got shape "
                             f"{tuple(pixels.shape)}")
        if pixels.shape[1] * pixels.shape[2] > MAX_PIXELS:
            raise ValueError(f"at most {MAX_PIXELS} pixels are accepted")
        if not bool(torch.isfinite(pixels).all()) or pixels.min() < 0 or pixels.max() > 1:
            raise ValueError("pixels must be finite numbers in [0, 1]")
        return fit_pixels(pixels.expand(self.channels, -1, -1)[None], self.size, self.resize)

    def explain(self, pixels: torch.Tensor, overlay: bool = False) -> dict:
        """The response for one image ``[1, C, H, W]`` in [0, 1]."""
        output, maps = self.explainer(pixels)
        heatmap = registry.to_map(maps, self.map_rule)[0].float()  # [H, W]
        probabilities = output.float().softmax(1)[0]
        predicted = int(probabilities.argmax())
        small = heatmap
        if max(heatmap.shape) > self.map_size:
            scale = self.map_size / max(heatmap.shape)
            shape = (max(1, round(heatmap.shape[0] * scale)), max(1, round(heatmap.shape[1] * scale)))
            small = F.adaptive_avg_pool2d(heatmap[None, None], shape)[0, 0]
        npy = io.BytesIO()
        np.save(npy, heatmap.cpu().numpy().astype(np.float32))
        response = {
            "class": predicted,
            "label": (self.labels or class_names(None, output.shape[1]))[predicted],
            "score": float(output[0, predicted]),
            "probability": float(probabilities[predicted]),
            "method": self.method,
            "map": small.cpu().tolist(),
            "map_npy": base64.b64encode(npy.getvalue()).decode("ascii"),
        }
        if overlay:
            png = io.BytesIO()
            cv.to_pil(cv.heatmap_overlay(pixels[0], heatmap / heatmap.max().clamp_min(1e-12))).save(png, "PNG")
            response["overlay_png"] = base64.b64encode(png.getvalue()).decode("ascii")
        return response


def make_handler(service: Service, stall_timeout: float = TIMEOUT) -> Callable:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = stall_timeout  # socket timeout: a stalled request does not hold its thread forever

        def _reply(self, status: int, body: dict, headers: Optional[dict] = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            if urlparse(self.path).path == "/health":
                self._reply(HTTPStatus.OK, {"status": "ok", "explainer": repr(service.explainer)})
            else:
                self._reply(HTTPStatus.NOT_FOUND, {"error": "GET /health or POST /explain"})

        def _not_allowed(self):
            self.close_connection = True
            self._reply(HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{self.command} is not supported: GET /health or "
                                                                  f"POST /explain"}, {"Allow": "GET, POST"})

        do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # noqa: N815

        def _body(self) -> Optional[bytes]:
            """The request body, or None after replying with the reason it cannot be read."""
            self.close_connection = True  # one request per connection past an error
            text = self.headers.get("Content-Length")
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or text is None:
                self._reply(HTTPStatus.LENGTH_REQUIRED, {"error": "send the body with a Content-Length"})
                return None
            if not text.strip().isdigit():
                self._reply(HTTPStatus.BAD_REQUEST, {"error": f"Content-Length must be a number, got {text!r}"})
                return None
            length = int(text)
            if not 0 < length <= MAX_BODY:
                status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE if length > MAX_BODY else HTTPStatus.BAD_REQUEST
                self._reply(status, {"error": f"send an image of 1 byte to {MAX_BODY} bytes"})
                return None
            try:
                body = self.rfile.read(length)
            except (socket.timeout, TimeoutError):
                self._reply(HTTPStatus.REQUEST_TIMEOUT, {"error": f"the body did not arrive within {self.timeout} s"})
                return None
            if len(body) < length:
                self._reply(HTTPStatus.BAD_REQUEST, {"error": "the body ended before Content-Length bytes"})
                return None
            self.close_connection = False
            return body

        def do_POST(self):  # noqa: N802
            url = urlparse(self.path)
            if url.path != "/explain":
                self.close_connection = True
                self._reply(HTTPStatus.NOT_FOUND, {"error": "POST /explain"})
                return
            body = self._body()
            if body is None:
                return
            overlay = parse_qs(url.query).get("overlay", ["0"])[0] not in ("0", "false", "")
            try:
                if self.headers.get("Content-Type", "").startswith("application/json"):
                    pixels = service.pixels_from_json(body)
                else:
                    pixels = service.pixels_from_image(body)
                response = service.explain(pixels, overlay)
            except ValueError as error:
                self._reply(HTTPStatus.BAD_REQUEST, {"error": str(error)})
                return
            except Exception as error:  # noqa: BLE001 - the client gets an answer, the log the traceback
                self.log_error("explain failed: %r", error)
                self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(error).__name__}: {error}"})
                return
            self._reply(HTTPStatus.OK, response)

        def log_message(self, format, *args):  # quiet unless asked (--verbose)
            if getattr(self.server, "verbose", False):
                super().log_message(format, *args)

    return Handler


def make_server(service: Service, host: str = "127.0.0.1", port: int = 8000,
                verbose: bool = False, timeout: float = TIMEOUT) -> ThreadingHTTPServer:
    """The HTTP server (not started: call ``serve_forever()``; port 0 picks a free one);
    ``timeout``: seconds a connection may stall while sending its request."""
    server = ThreadingHTTPServer((host, port), make_handler(service, timeout))
    server.daemon_threads = True
    server.verbose = verbose
    return server


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"{MODEL_HELP} (default {DEFAULT_MODEL})")
    parser.add_argument("--weights", help="a state dict file (loaded with weights_only=True)")
    parser.add_argument("--method", default="saliency", choices=registry.attribution_methods())
    parser.add_argument("--layer", help="the layer of methods that need one (default: the registry's rule)")
    parser.add_argument("--resize", default="crop", choices=("crop", "squash", "pad"),
                        help="how images become the model's input size (default crop, as the CLI)")
    parser.add_argument("--map-size", type=int, default=32, help="largest side of the 'map' list (default 32)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    try:
        loaded = load_model(args.model, args.weights)
        arguments = {"layer": args.layer} if args.layer else {}
        service = Service(loaded.model, loaded.normalize, loaded.size, args.method, labels=loaded.classes,
                          map_size=args.map_size, resize=args.resize, **arguments)
    except ValueError as error:  # bad --model / --weights / --layer: one line, no traceback
        print(f"serve.py: error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    for message in loaded.warnings:
        print(f"serve.py: warning: {message}", file=sys.stderr)
    server = make_server(service, args.host, args.port, args.verbose)
    print(f"serving {service.explainer!r} on http://{args.host}:{server.server_port}/explain", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

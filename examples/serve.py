"""A small explanation service on the standard library: POST an image, get back the predicted
class, its score and the map that explains it, from one forward + one backward pass.

    python examples/serve.py                               # the zoo digits CNN, saliency, port 8000
    python examples/serve.py --method grad_cam --layer features.conv3 --port 8080
    python examples/serve.py --model resnet18 --method grad_cam --layer layer4

    curl --data-binary @digit.png -H 'Content-Type: image/png' 'localhost:8000/explain?overlay=1'
    curl -d '{"pixels": [[0.0, 0.1, ...], ...]}' -H 'Content-Type: application/json' localhost:8000/explain

Request (POST /explain): PNG or JPEG bytes (any size: converted to the model's channels and
resized to its input size), or JSON ``{"pixels": [H][W] or [C][H][W] values in [0, 1]}``.
Response (JSON): ``class``, ``label``, ``score`` (the class's pre-softmax output),
``probability``, ``map`` (``[h][w]``, at most ``--map-size`` pixels a side, averaged down),
``map_npy`` (the full-resolution map as a base64 ``.npy`` float32 file) and, with
``?overlay=1``, ``overlay_png`` (base64 PNG of the map over the image). Errors: status 400
with ``{"error": ...}``. ``GET /health`` says which model and method run.

Requests are handled in threads (``ThreadingHTTPServer``); the one :class:`cnnviz_fast.Explainer`
is built at start-up and runs one call at a time on the model (see its docstring).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional, Sequence
from urllib.parse import parse_qs, urlparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import cnnviz_fast as cv
from cnnviz_fast.cli import MODEL_HELP, load_model
from cnnviz_fast.pipeline import to_map

MAX_BODY = 16 * 2**20  # bytes


class Service:
    """The model, its input format and the Explainer, built once."""

    def __init__(self, model: nn.Module, normalize, size: int, method: str = "saliency",
                 labels: Optional[Sequence[str]] = None, map_size: int = 32, **arguments):
        self.model, self.size, self.map_size = model, size, map_size
        self.channels = normalize.channels if hasattr(normalize, "channels") else 3
        self.labels = labels
        self.method = method
        self.explainer = cv.Explainer(model, method, normalize=normalize, **arguments)

    def pixels_from_image(self, data: bytes) -> torch.Tensor:
        from PIL import Image

        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except Exception as error:  # PIL raises several kinds for undecodable bytes
            raise ValueError(f"the body is not a readable PNG or JPEG image ({error})") from None
        image = image.convert("L" if self.channels == 1 else "RGB")
        array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)
        pixels = array[None] if array.dim() == 2 else array.permute(2, 0, 1)
        return self._resized(pixels[None])

    def pixels_from_json(self, data: bytes) -> torch.Tensor:
        try:
            pixels = torch.tensor(json.loads(data)["pixels"], dtype=torch.float32)
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f'JSON body must be {{"pixels": [H][W] or [C][H][W] numbers}} ({error})') from None
        if pixels.dim() == 2:
            pixels = pixels[None]
        if pixels.dim() != 3 or pixels.shape[0] not in (1, self.channels):
            raise ValueError(f"pixels must be [H][W] or [{self.channels}][H][W], got shape {tuple(pixels.shape)}")
        if not bool(torch.isfinite(pixels).all()) or pixels.min() < 0 or pixels.max() > 1:
            raise ValueError("pixels must be finite numbers in [0, 1]")
        return self._resized(pixels.expand(self.channels, -1, -1)[None])

    def _resized(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-2:] != (self.size, self.size):
            pixels = F.interpolate(pixels, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return pixels.contiguous()

    def explain(self, pixels: torch.Tensor, overlay: bool = False) -> dict:
        """The response for one image ``[1, C, H, W]`` in [0, 1]."""
        output, maps = self.explainer(pixels)
        heatmap = to_map(maps)[0].float()                       # [H, W]
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
            "label": self.labels[predicted] if self.labels else str(predicted),
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


def make_handler(service: Service) -> Callable:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            if urlparse(self.path).path == "/health":
                self._reply(HTTPStatus.OK, {"status": "ok", "explainer": repr(service.explainer)})
            else:
                self._reply(HTTPStatus.NOT_FOUND, {"error": "GET /health or POST /explain"})

        def do_POST(self):  # noqa: N802
            url = urlparse(self.path)
            if url.path != "/explain":
                self._reply(HTTPStatus.NOT_FOUND, {"error": "POST /explain"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY:
                self.close_connection = True
                self._reply(HTTPStatus.BAD_REQUEST, {"error": f"send an image of 1 byte to {MAX_BODY} bytes"})
                return
            body = self.rfile.read(length)
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
            self._reply(HTTPStatus.OK, response)

        def log_message(self, format, *args):  # quiet unless asked (--verbose)
            if getattr(self.server, "verbose", False):
                super().log_message(format, *args)

    return Handler


def make_server(service: Service, host: str = "127.0.0.1", port: int = 8000,
                verbose: bool = False) -> ThreadingHTTPServer:
    """The HTTP server (not started: call ``serve_forever()``; port 0 picks a free one)."""
    server = ThreadingHTTPServer((host, port), make_handler(service))
    server.daemon_threads = True
    server.verbose = verbose
    return server


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits",
                        help=f"{MODEL_HELP} (default digits)")
    parser.add_argument("--weights", help="a state dict file (loaded with weights_only=True)")
    parser.add_argument("--method", default="saliency", choices=cv.explainer.METHODS)
    parser.add_argument("--layer", help="the layer of grad_cam / guided_grad_cam")
    parser.add_argument("--map-size", type=int, default=32, help="largest side of the 'map' list (default 32)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    model, normalize, size = load_model(args.model, args.weights)
    arguments = {"layer": args.layer} if args.layer else {}
    labels = cv.zoo.DIGITS_CLASSES if args.model.removeprefix("zoo:").startswith("digits") else None
    service = Service(model, normalize, size, args.method, labels=labels, map_size=args.map_size, **arguments)
    server = make_server(service, args.host, args.port, args.verbose)
    print(f"serving {service.explainer!r} on http://{args.host}:{server.server_port}/explain", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()

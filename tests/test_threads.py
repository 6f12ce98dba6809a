"""Occlusion's exact mode captures the model with torch.fx while other threads explain
other models (issue 22, item 1): those threads must see nothing of the capture, and every
result must equal the single-threaded one."""
import sys
import threading

import pytest
import torch
from torch import fx, nn

import cnnviz_fast as cv
from cnnviz_fast import Explainer, zoo

pytestmark = pytest.mark.usefixtures("one_thread")

NORM = zoo.DIGITS_NORMALIZE
WAIT = 60  # seconds; only reached when a thread is stuck


class GatedCapture(nn.Module):
    """A CNN whose forward, while torch.fx captures it (its input is a Proxy), signals
    ``capturing`` and waits for ``resume``: other threads then run during the capture,
    whatever the scheduler does."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.features = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
        self.capturing, self.resume = threading.Event(), threading.Event()

    def forward(self, x):
        if isinstance(x, fx.Proxy):
            self.capturing.set()
            self.resume.wait(WAIT)
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def x():
    return NORM(zoo.digits("test")[0][:2])


def other_calls(x):
    """Calls on models other than the one being captured: ``{name: () -> result}``."""
    digits, functional = zoo.digits_cnn(), zoo.digits_cnn(relu="functional")
    explainer = Explainer(zoo.digits_cnn(), "grad_cam", layer="features.conv3")
    return {
        "saliency": lambda: cv.saliency(digits, x, [3, 5]),
        "grad_cam": lambda: cv.grad_cam(digits, x, "features.conv4", [3, 5]),
        "guided_backprop": lambda: cv.guided_backprop(functional, x, [3, 5]),
        "explainer": lambda: tuple(explainer(x)),
    }


def assert_equal_results(got, expected):
    for name in expected:
        want = expected[name] if isinstance(expected[name], tuple) else (expected[name],)
        have = got[name] if isinstance(got[name], tuple) else (got[name],)
        for a, b in zip(have, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_calls_during_a_capture_see_nothing_of_it(x):
    """Deterministic: the other calls run while the capture is paused half-way."""
    model = GatedCapture()
    model.resume.set()
    occlusion = lambda: cv.occlusion(model, x, [3, 5], window=4, stride=2)  # noqa: E731
    expected_occlusion = occlusion()
    assert model.capturing.is_set()  # the exact mode did capture this model
    calls = other_calls(x)
    expected = {name: call() for name, call in calls.items()}

    model.capturing.clear()
    model.resume.clear()
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("occlusion", occlusion()))
    worker.start()
    got, errors = {}, {}
    try:
        assert model.capturing.wait(WAIT)
        for name, call in calls.items():
            try:
                got[name] = call()
            except Exception as error:  # reported below with every other failure
                errors[name] = f"{type(error).__name__}: {error}"
    finally:
        model.resume.set()
        worker.join(WAIT)
    assert not errors, errors
    assert_equal_results(got, expected)
    torch.testing.assert_close(result["occlusion"], expected_occlusion)


def test_occlusion_beside_other_methods_in_threads_on_other_models(x):
    """Occlusion (exact mode, captured on every call) in two threads on two copies of a
    model, beside gradient methods on other models in three threads; repeated."""
    occluded = [zoo.digits_cnn(), zoo.digits_cnn()]
    others = other_calls(x)
    jobs = {f"occlusion{i}": (lambda m=m: cv.occlusion(m, x, [3, 5], window=6, stride=3)) for i, m in enumerate(occluded)}
    jobs.update({name: others[name] for name in ("saliency", "guided_backprop", "explainer")})
    expected = {name: job() for name, job in jobs.items()}
    rounds = 10
    results = {name: [] for name in jobs}
    errors = []
    start = threading.Barrier(len(jobs))

    def work(name):
        try:
            start.wait()
            for _ in range(rounds):
                results[name].append(jobs[name]())
        except BaseException as error:  # reported below, in the main thread
            errors.append(f"{name}: {type(error).__name__}: {error}")

    threads = [threading.Thread(target=work, args=(name,)) for name in jobs]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads take turns often: captures overlap the other calls
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    for round_ in range(rounds):
        assert_equal_results({name: results[name][round_] for name in jobs}, expected)


def test_two_captures_at_once_both_exact():
    """Two threads capturing two gated models at the same time: the second waits for the
    first (fx's patches are one stack per process), neither fails, both equal alone."""
    models = [GatedCapture(), GatedCapture()]
    x = torch.randn(1, 1, 12, 12)
    for m in models:
        m.resume.set()
    expected = [cv.occlusion(m, x, 1, window=4, stride=4) for m in models]
    results, errors = {}, []

    def work(i):
        try:
            results[i] = cv.occlusion(models[i], x, 1, window=4, stride=4)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert not errors, errors
    for i in range(2):
        torch.testing.assert_close(results[i], expected[i])

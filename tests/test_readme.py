"""The README's quick start runs as written (no placeholder features)."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(tmp_path, monkeypatch):
    text = README.read_text()
    section = text[text.index("## Quick start"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)  # it writes cam.png
    namespace = {}
    exec(compile(code, "README quick start", "exec"), namespace)
    assert (tmp_path / "cam.png").stat().st_size > 0
    assert namespace["maps"].shape == namespace["x"].shape and namespace["logits"].shape == (8, 10)

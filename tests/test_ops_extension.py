"""An extension built from older sources runs as if it were missing, with the reason."""
from cnnviz_fast.ops import _extension


def test_every_declared_op_is_checked_and_a_missing_one_is_found(monkeypatch):
    schema = (_extension.__file__.rsplit("cnnviz_fast", 1)[0] + "csrc/cnnviz.cpp")
    text = open(schema).read()
    for name in _extension.OPS:
        assert f'"{name}(' in text, name
    monkeypatch.setattr(_extension, "OPS", ("occlude", "no_such_op_in_any_build"))
    missing = _extension._missing_ops()
    assert "no_such_op_in_any_build" in missing
    if _extension.LOADED:
        assert missing == ["no_such_op_in_any_build"]

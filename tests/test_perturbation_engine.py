"""The perturbation family's shared machinery: batch norm folded into the convolutions for
the masked passes, feature ablation's segments through the incremental engine, and the
measured rows per pass."""
import importlib

import pytest
import torch
from torch import nn

from cnnviz_fast.attribution.perturbation import feature_ablation, grid_segments, kernel_shap, shapley_sampling

folding = importlib.import_module("cnnviz_fast.attribution.occlusion.folding")
local_segments = importlib.import_module("cnnviz_fast.attribution.perturbation.local_segments")
incremental = importlib.import_module("cnnviz_fast.attribution.occlusion.incremental")


class Branchy(nn.Module):
    """Foldable pairs, and pairs that must stay: a convolution read twice, a batch norm on
    batch statistics, a Conv2d subclass, a hooked batch norm."""

    class ScaledConv(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    def __init__(self, batch_statistics=True):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)  # conv2 read twice
        self.conv3, self.bn3 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6, track_running_stats=not batch_statistics)
        self.conv4, self.bn4 = self.ScaledConv(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv5, self.bn5 = nn.Conv2d(6, 6, 3, padding=1, groups=2), nn.BatchNorm2d(6, affine=False)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        y = self.conv2(x)
        x = torch.relu(self.bn2(y)) + y
        x = self.bn3(self.conv3(x))
        x = self.bn4(self.conv4(x))
        x = torch.relu(self.bn5(self.conv5(x)))
        return self.head(x.mean((2, 3)))


def branchy(batch_statistics=True):
    """Branchy in float64, eval mode, with non-trivial running statistics (``batch_statistics``:
    bn3 normalises by the batch's statistics, so a row's score depends on its batch)."""
    torch.manual_seed(0)
    model = Branchy(batch_statistics)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    return model.double().eval()


def smooth_images(n=2, size=24):
    x = torch.rand(n, 3, size // 4, size // 4, dtype=torch.float64)
    return nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) * 4 - 2


def test_folded_model_computes_the_same_and_leaves_the_model_alone():
    model = branchy()
    model.bn4.register_forward_hook(lambda *a: None)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    folded = folding.folded_model(model)
    names = [n for n, _ in folded.named_modules() if n.startswith("_folded_conv_")]
    assert len(names) == 2  # conv1+bn1, conv5+bn5 (affine=False); the others are not foldable
    called = {n.target for n in folded.graph.nodes if n.op == "call_module"}
    assert {"bn2", "bn3", "bn4", "conv2", "conv3"} <= called and not {"bn1", "bn5"} & called
    x = smooth_images()
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), rtol=0, atol=1e-12)
    assert dict(model.named_modules()) == modules
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_folded_graph_is_kept_until_the_model_changes():
    import gc
    import weakref
    model = branchy()
    x = smooth_images()
    folded = folding.folded_model(model)
    assert folding.folded_model(model) is folded  # a repeated call reuses the graph
    with torch.no_grad():
        model.bn1.running_mean.add_(0.25)  # written in place
    again = folding.folded_model(model)
    assert again is not folded
    with torch.no_grad():
        assert torch.allclose(again(x), model(x), rtol=0, atol=1e-12)
    model.conv5.weight = nn.Parameter(model.conv5.weight.detach() * 2)  # replaced
    replaced = folding.folded_model(model)
    assert replaced is not again
    model.bn1.eps = 0.5  # a setting the folded convolution copied
    tuned = folding.folded_model(model)
    assert tuned is not replaced
    with torch.no_grad():
        assert torch.allclose(tuned(x), model(x), rtol=0, atol=1e-12)
    model.conv1.register_forward_hook(lambda *a: None)  # hooked: conv1 + bn1 no longer fold
    hooked = folding.folded_model(model)
    assert "conv1" in {n.target for n in hooked.graph.nodes if n.op == "call_module"}
    gone = weakref.ref(model)
    del model, folded, again, replaced, tuned, hooked
    gc.collect()
    assert gone() is None  # the cache does not keep the model alive


def test_nothing_to_fold_or_untraceable_gives_none():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    assert folding.folded_model(plain) is None

    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y.mean((2, 3)) if y.sum() > 0 else -y.mean((2, 3))

    assert folding.folded_model(DataDependent().eval()) is None


def test_a_neuron_target_or_half_precision_runs_the_model_itself():
    from cnnviz_fast.core.targets import Neuron
    model = branchy()
    x = smooth_images(1)  # bn3 uses the batch's statistics: a batch of one, as the check runs it
    scores = model(x)[:, 1].detach()
    assert isinstance(folding.checked_folded_model(model, x, 1, scores), torch.fx.GraphModule)
    assert folding.checked_folded_model(model, x, Neuron("bn1", 0), scores) is model
    # a folded graph that does not reproduce the clean score is not used
    assert folding.checked_folded_model(model, x, 1, scores + 1) is model
    half = branchy().half()
    assert folding.checked_folded_model(half, x.half(), 1, scores.half()) is half


@pytest.mark.parametrize("segments", ["grid:4", "slic:12"])
def test_feature_ablation_through_the_engine_equals_full_passes(segments, monkeypatch):
    model = branchy(batch_statistics=False)
    x = smooth_images()
    scored = []
    original = incremental.IncrementalOcclusion.scores

    def spy(self, *args, **kwargs):
        scored.append(len(args[0]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(incremental.IncrementalOcclusion, "scores", spy)
    engine = feature_ablation(model, x, [0, 2], segments=segments)
    assert sum(scored) > 0  # segments went through the engine
    full = feature_ablation(model, x, [0, 2], segments=segments, incremental=False)
    assert torch.allclose(engine, full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("big_box, profitable", [(1.0, 0.5), (local_segments.BIG_BOX_FRACTION, float("inf"))])
def test_unprofitable_segments_go_to_full_passes(big_box, profitable, monkeypatch):
    """Once an engine pass costs too much (big_box 1: every box is tried), or straight away
    for boxes over BIG_BOX_FRACTION of the image (no pass is too costly)."""
    model = branchy(batch_statistics=False)
    x = smooth_images(1)
    segments = grid_segments(24, 24, 3)
    segments[:, :] = torch.where(segments == 4, 4, torch.where(segments < 4, 0, 1))  # two big, one small segment
    segments = torch.unique(segments, return_inverse=True)[1]
    monkeypatch.setitem(local_segments.ENGINE_ROWS, "cpu", 1)
    monkeypatch.setitem(local_segments.PROFITABLE_FRACTION, "cpu", profitable)  # 0.5: the big ones cost more
    monkeypatch.setattr(local_segments, "BIG_BOX_FRACTION", big_box)
    rows = []
    original = local_segments.SegmentScorer.scores
    monkeypatch.setattr(local_segments.SegmentScorer, "scores",
                        lambda self, tables: rows.append(sum(0 if t is None else len(t) for t in tables))
                        or original(self, tables))
    engine = feature_ablation(model, x, 3, segments=segments)
    assert rows and 0 < rows[0] < 3  # some segments by full passes, not all
    full = feature_ablation(model, x, 3, segments=segments, incremental=False)
    assert torch.allclose(engine, full, rtol=0, atol=1e-10)


def test_segment_boxes():
    labels = torch.tensor([[0, 0, 1], [2, 1, 1], [2, 2, 1]])
    assert local_segments.segment_boxes(labels, 3).tolist() == [[0, 1, 0, 2], [0, 3, 1, 3], [1, 3, 0, 2]]


def test_measured_rows_per_pass_give_the_values_of_one_row_per_pass():
    model = branchy(batch_statistics=False)
    x = smooth_images(2, 16)
    torch.manual_seed(0)
    perms = torch.stack([torch.randperm(16) for _ in range(3)])
    a = shapley_sampling(model, x, 1, segments="grid:4", permutations=perms)
    b = shapley_sampling(model, x, 1, segments="grid:4", permutations=perms, batch_size=1)
    assert torch.allclose(a, b, rtol=0, atol=1e-10)
    c = kernel_shap(model, x, 1, segments="grid:4", samples=40, seed=3)
    d = kernel_shap(model, x, 1, segments="grid:4", samples=40, seed=3, batch_size=7)
    assert torch.allclose(c, d, rtol=0, atol=1e-8)


def test_engine_and_folding_leave_the_model_as_found():
    model = branchy(batch_statistics=False).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    feature_ablation(model, smooth_images(), 0, segments="grid:3")
    assert model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

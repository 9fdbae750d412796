import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from misbench.pruning.audit import audit
from misbench.models.checkpoint import load_checkpoint_dict
from misbench.cli.main import cli
from misbench.errors import MisbenchError
from misbench.models.loading import load_model
from misbench.pruning import PruneSettings, apply_masks, compute_masks, sparsity_of
from misbench.pruning.masks import keep_fraction, prunable_layers
from misbench.pruning.run import partial_checkpoint_path, produce_checkpoint
from misbench.pruning.training import TrainSettings


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5))


def randomise_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)


def test_global_unstructured_hits_the_rate_and_prunes_the_smallest():
    loaded = load_model("mini_inception", num_classes=10)
    settings = PruneSettings("unstructured", 0.37)
    masks = compute_masks(loaded.model, settings, keep_fraction(0.37, 1, 1), ())
    layers = prunable_layers(loaded.model)
    weights = torch.cat([m.weight.detach().flatten() for m in layers.values()])
    keep = torch.cat([masks[f"{n}.weight"].flatten() for n in layers])
    assert abs(int((~keep).sum()) - round(0.37 * weights.numel())) <= 1
    assert weights[~keep].abs().max() <= weights[keep].abs().min()
    apply_masks(loaded.model, masks)
    assert sparsity_of(masks) == pytest.approx(0.37, abs=1 / weights.numel())
    local = compute_masks(loaded.model, PruneSettings("unstructured", 0.5, scope="local"), 0.5, ())
    for n, m in layers.items():
        assert abs(int((~local[f"{n}.weight"]).sum()) - round(0.5 * m.weight.numel())) <= 1


@pytest.mark.parametrize("method,dim", [("structured", 0), ("connection", 1)])
@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_channel_methods_zero_the_counted_smallest_channels(method, dim, criterion):
    loaded = load_model("mini_inception", num_classes=10)
    masks = compute_masks(loaded.model, PruneSettings(method, 0.3, criterion=criterion), 0.7, ())
    assert "fc.weight" not in masks  # the classifier is prunable only by unstructured
    for name, conv in prunable_layers(loaded.model, method).items():
        w = conv.weight.detach()
        other = tuple(d for d in range(4) if d != dim)
        kept_channels = masks[f"{name}.weight"].all(dim=other)
        assert (masks[f"{name}.weight"] == kept_channels.view([-1 if d == dim else 1 for d in range(4)])).all()
        # structured: round(R C) as torch.nn.utils.prune counts; connection: the seed's int(R C)
        count = round(0.3 * w.shape[dim]) if method == "structured" else int(0.3 * w.shape[dim])
        assert int((~kept_channels).sum()) == min(count, w.shape[dim] - 1)
        norm = w.abs().sum(other) if criterion == "l1" else w.pow(2).sum(other).sqrt()
        if (~kept_channels).any():
            assert norm[~kept_channels].max() <= norm[kept_channels].min()
    if method == "structured":
        assert masks["inception3a.branch1.bn.weight"].shape == (8,)  # the following BN is masked too


def test_structured_pruning_equals_physical_removal():
    model = small_net()
    randomise_bn(model)
    model.eval()
    masks = compute_masks(model, PruneSettings("structured", 0.5, criterion="l2"), 0.5, ())
    assert set(masks) == {"0.weight", "1.weight", "1.bias", "3.weight", "4.weight", "4.bias"}
    apply_masks(model, masks)
    k1 = masks["1.weight"].nonzero().flatten()
    k2 = masks["4.weight"].nonzero().flatten()
    small = nn.Sequential(nn.Conv2d(3, len(k1), 3, padding=1, bias=False), nn.BatchNorm2d(len(k1)), nn.ReLU(),
                          nn.Conv2d(len(k1), len(k2), 3, padding=1, bias=False), nn.BatchNorm2d(len(k2)), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(len(k2), 5)).eval()
    with torch.no_grad():
        small[0].weight.copy_(model[0].weight[k1])
        small[3].weight.copy_(model[3].weight[k2][:, k1])
        for big_bn, small_bn, keep in ((model[1], small[1], k1), (model[4], small[4], k2)):
            for attr in ("weight", "bias", "running_mean", "running_var"):
                getattr(small_bn, attr).copy_(getattr(big_bn, attr)[keep])
        small[8].weight.copy_(model[8].weight[:, k2])
        small[8].bias.copy_(model[8].bias)
        x = torch.randn(6, 3, 16, 16)
        torch.testing.assert_close(model(x), small(x), atol=1e-5, rtol=1e-5)


def test_iterative_schedule_keep_fractions_and_seeded_random():
    model = small_net()
    settings = PruneSettings("unstructured", 0.8, schedule="iterative", steps=4, criterion="random")
    masks, total = {}, sum(m.weight.numel() for m in prunable_layers(model).values())
    for step in range(1, 5):
        new = compute_masks(model, settings, keep_fraction(0.8, step, 4), (), masks, torch.Generator().manual_seed(step))
        if masks:  # pruned stays pruned
            assert all((~masks[k] <= ~new[k]).all() for k in masks)
        masks = new
        apply_masks(model, masks)
        assert abs(sparsity_of(masks) * total - round((1 - 0.2 ** (step / 4)) * total)) <= 1
    again = compute_masks(small_net(), settings, 0.5, (), None, torch.Generator().manual_seed(7))
    same = compute_masks(small_net(), settings, 0.5, (), None, torch.Generator().manual_seed(7))
    other = compute_masks(small_net(), settings, 0.5, (), None, torch.Generator().manual_seed(8))
    assert all(torch.equal(again[k], same[k]) for k in again)
    assert not all(torch.equal(again[k], other[k]) for k in again)


@pytest.fixture
def tiny_train(tmp_path):
    from conftest import make_image_folder

    return str(make_image_folder(tmp_path / "train", classes=3, per_class=12, size=32))


def test_masks_survive_retraining_with_momentum_and_weight_decay(tmp_path, tiny_train):
    loaded = load_model("mini_inception", num_classes=3)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    out = produce_checkpoint(loaded, PruneSettings("connection", 0.5), TrainSettings(epochs=2, batch_size=8, lr=0.05,
                             weight_decay=1e-2), tmp_path / "c.pt", data=tiny_train, val_data=tiny_train)
    ckpt = load_checkpoint_dict(out)
    state, masks = ckpt["state_dict"], ckpt["masks"]
    assert ckpt["pruning"]["achieved_sparsity"] == pytest.approx(sparsity_of(masks))
    for name, mask in masks.items():
        assert (state[name][~mask] == 0).all(), name
        assert not torch.equal(state[name][mask], before[name][mask]), name  # kept weights trained
    # trained channels-last; stored in the standard layout that any torch code expects
    assert loaded.model.conv1.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(t.is_contiguous() for t in state.values())
    assert [h["epoch"] for h in ckpt["training"]["history"]] == [0, 1, 2]
    assert ckpt["training"]["momentum"] == 0.9 and ckpt["parent"]["model"] == "mini_inception"
    reloaded = load_model(str(out))
    assert audit(reloaded)["consistent"] is True
    torch.load(out, weights_only=True)  # the contract: plain tensors and primitives only


def test_resume_reaches_the_same_weights(tmp_path, tiny_train):
    settings = TrainSettings(epochs=3, batch_size=8, lr=0.02)
    prune = PruneSettings("unstructured", 0.5, schedule="iterative", steps=2)
    def fresh():
        torch.manual_seed(0)
        return load_model("mini_inception", num_classes=3)

    full = produce_checkpoint(fresh(), prune, settings, tmp_path / "full.pt", data=tiny_train)

    class Stop(Exception):
        pass

    def interrupt(step, epoch, done, total):
        if step == 2 and epoch == 2 and done == 2:
            raise Stop

    target = tmp_path / "resumed.pt"
    with pytest.raises(Stop):
        produce_checkpoint(fresh(), prune, settings, target, data=tiny_train, progress=interrupt)
    assert not target.exists() and partial_checkpoint_path(target).exists()
    with pytest.raises(MisbenchError, match="pass resume=True to continue"):
        produce_checkpoint(fresh(), prune, settings, target, data=tiny_train)
    produce_checkpoint(fresh(), prune, settings, target, data=tiny_train, resume=True)
    a, b = load_checkpoint_dict(full), load_checkpoint_dict(target)
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert a["training"]["history"] == b["training"]["history"]
    assert not partial_checkpoint_path(target).exists()


def test_audit_exposes_regrown_weights(tmp_path):
    out = produce_checkpoint(load_model("mini_inception", num_classes=3), PruneSettings("connection", 0.8),
                             TrainSettings(epochs=0), tmp_path / "c.pt")
    ckpt = load_checkpoint_dict(out)
    ckpt["state_dict"]["inception3a.branch1.conv.weight"].normal_()  # what unmasked retraining does
    torch.save(ckpt, tmp_path / "regrown.pt")
    r = CliRunner().invoke(cli, ["audit", str(tmp_path / "regrown.pt"), "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert result["consistent"] is False and result["target"]["rate"] == 0.8
    row = next(l for l in result["layers"] if l["name"] == "inception3a.branch1.conv")
    assert set(row) == {"name", "weights", "zeros", "sparsity", "zero_out_channels", "zero_in_channels"}
    assert row["zeros"] == 0
    r = CliRunner().invoke(cli, ["audit", str(out)])
    assert r.exit_code == 0 and "audit: consistent" in r.output
    sd = tmp_path / "plain.pt"
    torch.save(ckpt["state_dict"], sd)
    r = CliRunner().invoke(cli, ["audit", str(sd), "--arch", "mini_inception", "--num-classes", "3", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["consistent"] is None


def test_bad_pruning_input_is_refused(tmp_path, tiny_train):
    for kwargs, message in (({"rate": 1.0}, "in \\(0, 1\\)"), ({"rate": 0.0}, "in \\(0, 1\\)"),
                            ({"method": "magnitude"}, "expected one of unstructured"),
                            ({"criterion": "l3"}, "expected one of l1, l2, random")):
        args = {"method": "unstructured", "rate": 0.5, **kwargs}
        with pytest.raises(MisbenchError, match=message):
            PruneSettings(**args)
    loaded = load_model("mini_inception", num_classes=3)
    with pytest.raises(MisbenchError, match="training data"):
        produce_checkpoint(loaded, PruneSettings("unstructured", 0.5), TrainSettings(epochs=1), tmp_path / "x.pt")
    with pytest.raises(MisbenchError, match="inception3a.branch1"):
        produce_checkpoint(loaded, PruneSettings("unstructured", 0.5, exclude=("inception3a.brnch1",)),
                           TrainSettings(epochs=0), tmp_path / "x.pt")
    r = CliRunner().invoke(cli, ["prune", "mini_inception", "--num-classes", "3", "--method", "structured", "--rate", "2",
                                 "--out", str(tmp_path / "y.pt")])
    assert r.exit_code == 1 and "--rate must be a fraction" in r.output
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "y.pt").exists()


def test_googlenet_default_exclusions():
    loaded = load_model("googlenet:random", num_classes=10)
    from misbench.pruning.masks import default_exclude

    exclude = default_exclude("googlenet", loaded.model)
    assert exclude == ("conv1", "conv2", "conv3")  # no aux heads in this model
    layers = prunable_layers(loaded.model, "structured", exclude)
    assert "conv1.conv" not in layers and "conv3.conv" not in layers and "inception3a.branch1.conv" in layers
    assert "fc" not in layers and "fc" in prunable_layers(loaded.model, "unstructured", exclude)


def test_retraining_does_not_depend_on_loader_workers(tmp_path, tiny_train):
    """Augmentations are seeded per image (seed, step, epoch, index): worker processes change nothing."""
    states = []
    for workers in (0, 2):
        torch.manual_seed(0)
        loaded = load_model("mini_inception", num_classes=3)
        out = produce_checkpoint(loaded, PruneSettings("unstructured", 0.5, schedule="iterative", steps=2),
                                 TrainSettings(epochs=1, batch_size=8, workers=workers), tmp_path / f"w{workers}.pt",
                                 data=tiny_train)
        states.append(load_checkpoint_dict(out)["state_dict"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def _l1_within_group(w, groups):
    """Brute force: L1 norm of each (group, input channel) connection of a grouped conv weight."""
    per_out = w.shape[0] // groups
    return torch.stack([torch.stack([w[g * per_out:(g + 1) * per_out, j].abs().sum() for j in range(w.shape[1])])
                        for g in range(groups)])


def test_connection_pruning_ranks_within_groups_and_keeps_every_layer_alive():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(6, 8, 3, groups=2), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 7, 1),
                        nn.Conv2d(7, 4, 1), nn.Conv2d(2, 4, 1))
    masks = compute_masks(net, PruneSettings("connection", 0.6), 0.4, ())
    grouped = masks["0.weight"].reshape(2, 4, 3, 3, 3)
    kept = grouped.all(dim=(1, 3, 4))  # [group, input channel]
    assert (grouped == kept[:, None, :, None, None]).all()
    norms = _l1_within_group(net[0].weight.detach(), 2)
    for g in range(2):  # int(3 * 0.6) = 1 per group, the lowest within the group
        assert (~kept[g]).sum() == 1 and norms[g][~kept[g]].max() <= norms[g][kept[g]].min()
    assert masks["1.weight"].all()  # depthwise: one input per group, never removed
    assert (~masks["3.weight"].all(dim=(0, 2, 3))).sum() == int(7 * 0.6) == 4  # the seed's int, not round
    assert (~masks["4.weight"].all(dim=(0, 2, 3))).sum() == 1
    extreme = compute_masks(net, PruneSettings("connection", 0.99), 0.01, ())
    assert all(m.any() for m in extreme.values())  # never a layer's last connection


def test_connection_pruning_of_mobilenet_v2_leaves_no_dead_layer():
    import torchvision

    from misbench.models.loading import LoadedModel
    from misbench.models.preprocess import IMAGENET_PREPROCESS

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    masks = compute_masks(model, PruneSettings("connection", 0.8), 0.2, ())
    apply_masks(model, masks)
    depthwise = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 17 and all(masks[f"{n}.weight"].all() for n in depthwise)
    report = audit(LoadedModel(model, "mobilenet_v2:random", "mobilenet_v2", {}, 1000, IMAGENET_PREPROCESS))
    assert report["empty_layers"] == [] and report["consistent"] is None
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
    # inputs still reach the logits (a dead layer makes every input give exactly the same output)
    assert (out[0] - out[1]).abs().max() > 1e-2 * out.abs().max()
    # grouped input channels are counted per group: 32 for the first depthwise conv
    row = next(l for l in report["layers"] if l["name"] == depthwise[0])
    assert row["zero_in_channels"] == 0
    with torch.no_grad():
        dict(model.named_modules())[depthwise[0]].weight[3] = 0  # channel 3's only connection
    row = next(l for l in audit(LoadedModel(model, "m", "mobilenet_v2", {}, 1000, IMAGENET_PREPROCESS))["layers"]
               if l["name"] == depthwise[0])
    assert row["zero_in_channels"] == 1


def test_audit_flags_a_fully_pruned_layer(tmp_path):
    loaded = load_model("mini_inception", num_classes=3)
    out = produce_checkpoint(loaded, PruneSettings("connection", 0.5), TrainSettings(), tmp_path / "c.pt")
    assert audit(load_model(str(out)))["consistent"] is True
    ckpt = load_checkpoint_dict(out)
    ckpt["state_dict"]["inception3a.branch2.1.conv.weight"].zero_()
    torch.save(ckpt, tmp_path / "dead.pt")
    report = audit(load_model(str(tmp_path / "dead.pt")))
    assert report["empty_layers"] == ["inception3a.branch2.1.conv"] and report["consistent"] is False
    assert any("100% sparse" in p for p in report["problems"])
    r = CliRunner().invoke(cli, ["audit", str(tmp_path / "dead.pt"), "--json"])
    assert json.loads(r.output)["empty_layers"] == ["inception3a.branch2.1.conv"]


def test_global_unstructured_population_is_recorded(tmp_path):
    loaded = load_model("mini_inception", num_classes=3)
    out = produce_checkpoint(loaded, PruneSettings("unstructured", 0.5), TrainSettings(), tmp_path / "u.pt")
    population = load_checkpoint_dict(out)["pruning"]["population"]
    layers = [m for m in loaded.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert population["weights"] == sum(m.weight.numel() for m in layers)  # biases and BN not ranked
    assert population["tensors"] == len(layers) and "biases" in population["description"]

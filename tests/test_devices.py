"""The CUDA fast paths (channels-last, pinned memory, FAISS GPU index, AMP) run the same code as the
CPU paths; these tests run on every device present (CPU here, CUDA where there is one)."""

import numpy as np
import pytest
import torch

from conftest import DEVICES, write_acts
from misbench.extract import ExtractSettings, extract
from misbench.models import load_model
from misbench.scoring import ScoreSettings, score
from misbench.store import open_activations


@pytest.mark.parametrize("device", DEVICES)
def test_extraction_on_device_equals_cpu_forward(tmp_path, image_folder, device):
    torch.manual_seed(0)
    loaded = load_model("mini_inception", num_classes=3)
    state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    out = extract(loaded, str(image_folder), tmp_path / "a.h5",
                  ExtractSettings(layers=("softmax", "conv1.bn"), device=device, batch_size=8))
    reference = load_model("mini_inception", num_classes=3)
    reference.model.load_state_dict(state)
    ref = extract(reference, str(image_folder), tmp_path / "b.h5", ExtractSettings(layers=("softmax", "conv1.bn"),
                                                                                    device="cpu", batch_size=8))
    with open_activations(out) as a, open_activations(ref) as b:
        np.testing.assert_allclose(a.activations("conv1.bn"), b.activations("conv1.bn"), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_scoring_on_device_matches_the_pairwise_reference(property_folder, tmp_path, device):
    root, props = property_folder
    acts = write_acts(tmp_path / "acts.h5", root, {"v": np.stack([props["brightness"], props["hue"]], 1)})
    base = dict(similarity="pixel", image_size=16, n_boot=20, tasks=5)
    score(acts, ["v"], ScoreSettings(**base, device=device), tmp_path / "d.csv", tasks_out=tmp_path / "d.h5")
    score(acts, ["v"], ScoreSettings(**base, device="cpu", engine="pairwise"), tmp_path / "p.csv")
    d = [line.split(",")[3] for line in (tmp_path / "d.csv").read_text().splitlines()]
    p = [line.split(",")[3] for line in (tmp_path / "p.csv").read_text().splitlines()]
    assert d == p

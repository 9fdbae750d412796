"""Controls of a dictionary comparison (issue 24 item 4): activations permuted across images score at chance."""

import h5py
import numpy as np
import pytest

from conftest import write_acts
from misbench.activations.store import add_permuted_layers, open_activations
from misbench.errors import MisbenchError
from misbench.scoring.run import ScoreSettings, score


def test_permuted_control_scores_at_chance(property_folder, tmp_path):
    root, props = property_folder
    rng = np.random.default_rng(3)
    n = len(props["hue"])
    # 30 units that see what the pixel backend sees best (brightness), mixed with some hue, stripes and noise
    base = np.stack([props["brightness"], props["hue"], props["stripes"]], 1)
    weights = np.vstack([np.ones(30), 0.2 * rng.normal(size=(2, 30))])
    visible = base @ weights + 0.05 * rng.normal(size=(n, 30))
    acts = write_acts(tmp_path / "acts.h5", root, {"visible": visible.astype(np.float32)})
    ctrl = tmp_path / "acts_ctrl.h5"
    assert add_permuted_layers(acts, ctrl, ["visible"], seed=0) == ["visible_permuted"]
    with open_activations(ctrl) as a:
        assert a.layer_names == ["visible", "visible_permuted"]
        orig, perm = a.activations("visible"), a.activations("visible_permuted")
    # the same values per unit, each unit in its own row order
    assert np.array_equal(np.sort(orig, 0), np.sort(perm, 0))
    rank = np.argsort(np.argsort(perm, 0), 0)
    assert not (rank == rank[:, :1]).all() and abs(np.corrcoef(orig[:, 0], perm[:, 0])[0, 1]) < 0.2
    meta = score(ctrl, ["all"], ScoreSettings(similarity="pixel", image_size=16, device="cpu", n_boot=500),
                 tmp_path / "mis.csv")
    trained, control = meta["layers"]["visible"], meta["layers"]["visible_permuted"]
    low, high = control["mis_ci"]
    assert low <= 0.5 <= high, control  # chance
    assert trained["mis"] > 0.8 and trained["mis_ci"][0] > high


def test_permuted_control_refusals(property_folder, tmp_path):
    root, props = property_folder
    acts = write_acts(tmp_path / "acts.h5", root, {"a": np.random.default_rng(0).normal(size=(450, 3))})
    with pytest.raises(MisbenchError, match="'b' is not in"):
        add_permuted_layers(acts, tmp_path / "c.h5", ["b"])
    add_permuted_layers(acts, tmp_path / "c.h5", ["a"])
    with pytest.raises(MisbenchError, match="already has a layer 'a_permuted'"):
        add_permuted_layers(tmp_path / "c.h5", tmp_path / "d.h5", ["a"])
    with h5py.File(acts, "r") as h5:  # the source is untouched
        assert list(h5["layers"]) == ["a"]

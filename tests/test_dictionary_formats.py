"""Public dictionary files (issue 24 item 3): each format, recognised by content, encodes as its library does.

Two kinds of reference. Where the library is installed (make install: overcomplete, dictionary_learning and saev;
make test-interop: sae_lens), the tests at the end build the library's own SAE objects with random weights, save
them the way the library does, and compare misbench's features with the library's own encode. The tests before
them write each layout and encode from the library's source, which also covers what the registry's releases
cannot: saev's later checkpoints (schema 1/2, TopK; PyPI has only saev 0.1.0) and every format where a library
is absent. docs/formats.md says which is which."""

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types
import json
import struct

import pytest
import torch
import torch.nn.functional as F

from misbench.activations.dictionary import encode, load_dictionary
from misbench.errors import MisbenchError

D, K = 12, 40


@pytest.fixture
def x():
    return torch.randn(64, D, generator=torch.Generator().manual_seed(0)) * 2 + 0.5


def _params(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"W": torch.randn(K, D, generator=g) * 0.5, "b": torch.randn(K, generator=g) * 0.3,
            "b_dec": torch.randn(D, generator=g), "threshold": torch.rand(K, generator=g) * 0.5}


def _check(path, x, reference, fmt):
    dic = load_dictionary(path)
    assert dic.format == fmt
    ours = encode(x, dic)
    assert (ours != 0).any() and torch.allclose(ours, reference, atol=1e-5, rtol=0), (ours - reference).abs().max()


def test_dictionary_learning_standard_and_topk(tmp_path, x):
    p = _params()
    # AutoEncoder: encode = ReLU(encoder(x - bias))
    torch.save({"bias": p["b_dec"], "encoder.weight": p["W"], "encoder.bias": p["b"],
                "decoder.weight": p["W"].T.clone()}, tmp_path / "ae.pt")
    _check(tmp_path / "ae.pt", x, F.relu(F.linear(x - p["b_dec"], p["W"], p["b"])), "dictionary_learning")
    # AutoEncoderTopK: post_relu = ReLU(encoder(x - b_dec)); its top k per input, scattered into zeros
    (tmp_path / "topk").mkdir()
    torch.save({"k": torch.tensor(3, dtype=torch.int), "threshold": torch.tensor(0.2), "b_dec": p["b_dec"],
                "encoder.weight": p["W"], "encoder.bias": p["b"], "decoder.weight": p["W"].T.clone()},
               tmp_path / "topk" / "ae.pt")
    post = F.relu(F.linear(x - p["b_dec"], p["W"], p["b"]))
    top = post.topk(3, dim=-1)
    # AutoEncoderTopK and BatchTopKSAE save the same keys: without the training's config.json, refused, not guessed
    with pytest.raises(MisbenchError, match=r"AutoEncoderTopK or BatchTopKSAE .* no config.json beside it"):
        load_dictionary(tmp_path / "topk" / "ae.pt")
    (tmp_path / "topk" / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoderTopK"}}))
    _check(tmp_path / "topk" / "ae.pt", x, torch.zeros_like(post).scatter(-1, top.indices, top.values),
           "dictionary_learning-topk")
    # BatchTopKSAE (config.json says so): post_relu * (post_relu > threshold)
    (tmp_path / "topk" / "config.json").write_text(json.dumps({"trainer": {"dict_class": "BatchTopKSAE"}}))
    _check(tmp_path / "topk" / "ae.pt", x, post * (post > 0.2), "dictionary_learning-topk")


def _saev_file(path, header, p):
    with open(path, "wb") as handle:
        handle.write((json.dumps(header) + "\n").encode())
        torch.save({"W_enc": p["W"].T.contiguous(), "b_enc": p["b"], "W_dec": p["W"].clone(), "b_dec": p["b_dec"]},
                   handle)


def test_saev_checkpoints(tmp_path, x):
    p = _params(2)
    # the first releases (no schema): h = (x - b_dec) W_enc + b_enc, ReLU
    _saev_file(tmp_path / "old.pt", {"d_vit": D, "exp_factor": K // D}, p)
    _check(tmp_path / "old.pt", x, F.relu((x - p["b_dec"]) @ p["W"].T + p["b"]), "saev")
    # schema 2: h = x W_enc + b_enc; TopK keeps the k largest values of h as they are
    header = {"schema": 2, "cfg": {"d_vit": D, "exp_factor": 3, "activation": {"cls": "TopK", "params": {"top_k": 4}}}}
    p_shift = {**p, "b": p["b"] - 3.0}  # shifted so that some kept values are negative
    _saev_file(tmp_path / "topk.pt", header, p_shift)
    h = x @ p["W"].T + p_shift["b"]
    idx = h.topk(4, dim=-1).indices
    _check(tmp_path / "topk.pt", x, torch.zeros_like(h).scatter(-1, idx, torch.ones_like(h)) * h, "saev")
    assert (encode(x, load_dictionary(tmp_path / "topk.pt")) < 0).any()
    header["cfg"]["activation"] = {"cls": "Relu", "params": {}}
    _saev_file(tmp_path / "relu.pt", header, p)
    _check(tmp_path / "relu.pt", x, F.relu(x @ p["W"].T + p["b"]), "saev")
    # a header whose first key is cfg: '{"cfg": {' has a '{' as its 9th byte, as a safetensors file has
    _saev_file(tmp_path / "cfg_first.pt", {"cfg": header["cfg"], "schema": 2}, p)
    assert (tmp_path / "cfg_first.pt").read_bytes()[8:9] == b"{"
    _check(tmp_path / "cfg_first.pt", x, F.relu(x @ p["W"].T + p["b"]), "saev")


def _safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_saelens_weights_with_cfg(tmp_path, x, arch):
    p = _params(3)
    tensors = {"W_enc": p["W"].T, "b_enc": p["b"], "W_dec": p["W"], "b_dec": p["b_dec"]}
    if arch == "jumprelu":
        tensors["threshold"] = p["threshold"]
    _safetensors(tmp_path / "sae_weights.safetensors", tensors)
    cfg = {"architecture": arch, "d_in": D, "d_sae": K, "apply_b_dec_to_input": True, "normalize_activations": "none",
           "k": 5}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    h = (x - p["b_dec"]) @ p["W"].T + p["b"]
    if arch == "standard":
        ref = F.relu(h)
    elif arch == "jumprelu":  # JumpReLU: ReLU(h) where h exceeds the feature's threshold
        ref = F.relu(h) * (h > p["threshold"])
    else:
        top = h.topk(5, dim=-1)
        ref = torch.zeros_like(h).scatter(-1, top.indices, F.relu(top.values))
    _check(tmp_path / "sae_weights.safetensors", x, ref, "saelens")


def test_bad_dictionary_files(tmp_path):
    p = _params()
    torch.save({"weight": p["W"]}, tmp_path / "unknown.pt")
    with pytest.raises(MisbenchError, match=r"unknown.pt holds \['weight'\]; unknown dictionary format: expected"):
        load_dictionary(tmp_path / "unknown.pt")
    torch.save({"W_enc": p["W"].clone().index_fill_(0, torch.tensor([3]), float("nan")), "b_enc": p["b"]},
               tmp_path / "nan.pt")
    with pytest.raises(MisbenchError, match=r"nan.pt \(misbench format\): W_enc holds non-finite values \(NaN or inf: 12\)"):
        load_dictionary(tmp_path / "nan.pt")
    torch.save(torch.nn.Linear(D, K), tmp_path / "module.pt")  # a whole pickled module
    with pytest.raises(MisbenchError, match=r"module.pt is a pickled Python object.*--trust-pickle"):
        load_dictionary(tmp_path / "module.pt")
    with pytest.raises(MisbenchError, match="unknown dictionary format"):  # trusted, read, but still not a dictionary
        load_dictionary(tmp_path / "module.pt", trust_pickle=True)
    _safetensors(tmp_path / "sae_weights.safetensors", {"W_enc": p["W"].T, "b_enc": p["b"], "b_dec": p["b_dec"]})
    with pytest.raises(MisbenchError, match="needs its cfg.json beside it"):
        load_dictionary(tmp_path / "sae_weights.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(MisbenchError, match="cannot read .*junk.pt"):
        load_dictionary(tmp_path / "junk.pt")


def test_non_finite_jumprelu_thresholds_are_refused_and_a_native_threshold_is_read(tmp_path):
    # a NaN/inf threshold makes `pre > theta` false everywhere: every feature 0, silently, unless refused
    w, b = torch.randn(6, 4), torch.zeros(6)
    for theta in ("nan", "inf"):
        torch.save({"W_enc": w, "b_enc": b, "activation": f"jumprelu:{theta}"}, tmp_path / "j.pt")
        with pytest.raises(MisbenchError, match="finite"):
            load_dictionary(tmp_path / "j.pt")
    # dictionary_learning BatchTopKSAE whose learned threshold diverged
    torch.save({"encoder.weight": w, "encoder.bias": b, "decoder.weight": w.T.clone(), "b_dec": torch.zeros(4),
                "k": torch.tensor(2), "threshold": torch.tensor(float("nan"))}, tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "BatchTopKSAE"}}))
    with pytest.raises(MisbenchError, match="finite"):
        load_dictionary(tmp_path / "ae.pt")
    # a native file's per-feature threshold [K] is used (the 'jumprelu' error asks for exactly this)
    theta = torch.linspace(-1, 1, 6)
    torch.save({"W_enc": w, "b_enc": b, "activation": "jumprelu", "threshold": theta}, tmp_path / "t.pt")
    x = torch.randn(5, 4)
    pre = x @ w.T
    assert torch.equal(encode(x, load_dictionary(tmp_path / "t.pt")), pre * (pre > theta) * (pre > 0))
    torch.save({"W_enc": w, "b_enc": b, "activation": "jumprelu", "threshold": torch.full((6,), float("nan"))},
               tmp_path / "n.pt")
    with pytest.raises(MisbenchError, match="non-finite"):
        load_dictionary(tmp_path / "n.pt")


def _overcomplete_state(p, jump=False, archetypal=False):
    """An Overcomplete SAE's state_dict with the default 'linear' encoder, as its modules name and shape it
    (overcomplete/sae/modules.py MLPEncoder(nb_blocks=0, norm_layer=Identity): final_block = Linear(D, K),
    Identity; dictionary.py DictionaryLayer: _weights [K, D], multiplier buffer; archetypal_dictionary.py:
    C, W, Relax, multiplier; jump_sae.py: thresholds [K], the log of the JumpReLU thresholds)."""
    state = {"encoder.final_block.0.weight": p["W"].clone(), "encoder.final_block.0.bias": p["b"].clone()}
    if archetypal:
        state.update({"dictionary.C": torch.randn(30, D), "dictionary.W": torch.eye(K, 30),
                      "dictionary.Relax": torch.zeros(K, D), "dictionary.multiplier": torch.tensor(0.0)})
    else:
        state.update({"dictionary._weights": torch.randn(K, D), "dictionary.multiplier": torch.tensor(0.0)})
    if jump:
        state["thresholds"] = torch.log(p["threshold"] + 0.05)
    return state


def _overcomplete_codes(p, x):
    # MLPEncoder.forward with no hidden block: pre_z = final_block(x) (Linear, Identity); z = ReLU(pre_z)
    return torch.relu(x @ p["W"].T + p["b"])


def test_overcomplete_state_dicts(tmp_path, x):
    p = _params(5)
    codes = _overcomplete_codes(p, x)
    # JumpSAE (and RAJumpSAE): JumpReLU.forward zeroes the ReLU codes below exp(thresholds); recognised by its key
    for archetypal in (False, True):
        torch.save(_overcomplete_state(p, jump=True, archetypal=archetypal), tmp_path / "jump.pt")
        t = torch.exp(torch.log(p["threshold"] + 0.05))
        ref = codes.clone()
        ref[codes < t] = 0
        _check(tmp_path / "jump.pt", x, ref, "overcomplete")
    # TopKSAE.encode: torch.topk of the codes, scattered into zeros; k from the added `activation` entry
    torch.save({**_overcomplete_state(p), "activation": "topk:6"}, tmp_path / "topk.pt")
    top = torch.topk(codes, 6, dim=-1)
    _check(tmp_path / "topk.pt", x, torch.zeros_like(codes).scatter(-1, top.indices, top.values), "overcomplete")
    # BatchTopKSAE.encode at inference: codes * (codes >= running_threshold)
    torch.save({**_overcomplete_state(p), "activation": "jumprelu:0.4"}, tmp_path / "batch.pt")
    _check(tmp_path / "batch.pt", x, codes * (codes >= 0.4).float(), "overcomplete")
    # SAE: the ReLU codes
    torch.save({**_overcomplete_state(p, archetypal=True), "activation": "relu"}, tmp_path / "sae.pt")
    _check(tmp_path / "sae.pt", x, codes, "overcomplete")
    # a bare state_dict does not say its encode: refused, naming the classes that share its keys and the fix
    torch.save(_overcomplete_state(p), tmp_path / "bare.pt")
    with pytest.raises(MisbenchError, match=r"records neither its class nor top_k \(SAE, TopKSAE and BatchTopKSAE "
                                            r"save the same keys\): add the encode"):
        load_dictionary(tmp_path / "bare.pt")
    # other encoders and QSAE are named as not read
    for extra, named in (({"encoder.final_block.1.weight": torch.ones(K)}, "encoder.final_block.1.weight"),
                         ({"Q": torch.randn(8)}, "key Q")):
        torch.save({**_overcomplete_state(p, jump=True), **extra}, tmp_path / "other.pt")
        with pytest.raises(MisbenchError) as err:
            load_dictionary(tmp_path / "other.pt")
        assert named in str(err.value) and "QSAE" in str(err.value) and "MpSAE" in str(err.value)
    # a whole pickled module never loads without --trust-pickle
    torch.save(torch.nn.Linear(D, K), tmp_path / "module.pt")
    with pytest.raises(MisbenchError, match="pickled Python object"):
        load_dictionary(tmp_path / "module.pt")


# --- the libraries' own code --------------------------------------------------------------------------------------

def _library(package: str, module: str):
    """`package.module` as installed. Skipped where the library is absent, except that a name listed in
    MISBENCH_REQUIRE_LIBRARIES (set by `make test` and `make test-interop`) fails instead, so an install step that
    stops working cannot turn these tests into skips. overcomplete's and dictionary_learning's package __init__
    imports what their SAE modules never use (overcomplete: cv2, scikit-image and matplotlib.cm.get_cmap, removed in
    matplotlib 3.9; dictionary_learning: nnsight for its ActivationBuffer), so an empty package object stands in for
    it: every module that runs is the library's own file, unchanged."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        if package in os.environ.get("MISBENCH_REQUIRE_LIBRARIES", "").split():
            pytest.fail(f"{package} is not installed but MISBENCH_REQUIRE_LIBRARIES requires it (make install)")
        pytest.skip(f"{package} is not installed (make install / make test-interop)")
    if package not in sys.modules and package in ("overcomplete", "dictionary_learning"):
        bare = types.ModuleType(package)
        bare.__spec__ = importlib.machinery.ModuleSpec(package, None, is_package=True)
        bare.__spec__.submodule_search_locations = bare.__path__ = list(spec.submodule_search_locations)
        sys.modules[package] = bare
    return importlib.import_module(f"{package}.{module}")


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Every floating-point parameter random (the libraries initialise some to zero, e.g. biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _same(path, x, theirs, fmt):
    dic = load_dictionary(path)
    assert dic.format == fmt, dic.format
    ours = encode(x, dic)
    theirs = theirs.detach().float()
    assert (theirs != 0).any() and (theirs == 0).any()  # a sparse code, not all zero
    assert (ours - theirs).abs().max() <= 1e-5, (ours - theirs).abs().max()
    return ours


@pytest.mark.parametrize("kind", ["sae", "topk", "batchtopk", "jump", "ratopk", "rajump"])
def test_overcomplete_library(tmp_path, x, kind):
    sae_mod = _library("overcomplete", "sae")
    torch.manual_seed(0)
    points = torch.randn(30, D)
    make = {"sae": lambda: sae_mod.SAE(D, K), "topk": lambda: sae_mod.TopKSAE(D, K, top_k=6),
            "batchtopk": lambda: sae_mod.BatchTopKSAE(D, K, top_k=6),
            "jump": lambda: sae_mod.JumpSAE(D, K), "ratopk": lambda: sae_mod.RATopKSAE(D, K, points, top_k=6),
            "rajump": lambda: sae_mod.RAJumpSAE(D, K, points)}
    sae = make[kind]()
    _randomize(sae, 7)
    if kind in ("jump", "rajump"):
        with torch.no_grad():  # thresholds exp(t) around the codes' scale, so the jump zeroes some codes
            sae.thresholds.copy_(torch.log(torch.rand(K, generator=torch.Generator().manual_seed(1)) + 0.05))
    if kind == "batchtopk":  # a training step on other inputs sets running_threshold; eval mode applies it (a code
        sae.train()          # exactly at the threshold is kept by Overcomplete, >=, dropped by misbench: only ties)
        sae.encode(torch.randn(64, D, generator=torch.Generator().manual_seed(4)) * 2)
        sae.eval()
    # the state_dict, plus the entry naming its encode where the state does not (docs/formats.md)
    entry = {"sae": "relu", "topk": f"topk:{getattr(sae, 'top_k', 0)}", "ratopk": f"topk:{getattr(sae, 'top_k', 0)}",
             "batchtopk": f"jumprelu:{float(getattr(sae, 'running_threshold', 0) or 0)!r}"}
    state = sae.state_dict()
    if kind in entry:
        state = {**state, "activation": entry[kind]}
    torch.save(state, tmp_path / "sae.pt")
    _same(tmp_path / "sae.pt", x, sae.encode(x)[1], "overcomplete")


def _dl_trained(kind: str):
    """A dictionary_learning trainer's autoencoder and the config its training writes (trainers/*.py)."""
    common = {"steps": 5000, "activation_dim": D, "dict_size": K, "layer": 0, "lm_name": "none", "device": "cpu"}
    trainers = _library("dictionary_learning", "trainers")
    if kind == "matryoshka":
        mod = _library("dictionary_learning", "trainers.matryoshka_batch_top_k")
        return mod.MatryoshkaBatchTopKSAE(D, K, 3, [10, 30]), {"dict_class": "MatryoshkaBatchTopKSAE"}
    trainer = {"standard": lambda: trainers.StandardTrainer(**common),
               "topk": lambda: trainers.TopKTrainer(k=3, **common),
               "batchtopk": lambda: trainers.BatchTopKTrainer(k=3, **common),
               "jumprelu": lambda: trainers.JumpReluTrainer(**common)}[kind]()
    return trainer.ae, trainer.config


@pytest.mark.parametrize("kind,fmt", [("standard", "dictionary_learning"), ("topk", "dictionary_learning-topk"),
                                      ("batchtopk", "dictionary_learning-topk"),
                                      ("jumprelu", "dictionary_learning-jumprelu"),
                                      ("matryoshka", "dictionary_learning-matryoshka")])
def test_dictionary_learning_library(tmp_path, x, kind, fmt):
    ae, config = _dl_trained(kind)
    _randomize(ae, 11)
    with torch.no_grad():
        if kind == "jumprelu":
            ae.threshold.copy_(torch.rand(K, generator=torch.Generator().manual_seed(2)))
        if kind in ("batchtopk", "matryoshka"):  # the threshold training learns (-1, unset, is plain ReLU)
            ae.threshold.fill_(0.4)
    # training.py's save: config.json with {"trainer": trainer.config}, then ae.pt with the state dict on the CPU
    (tmp_path / "config.json").write_text(json.dumps({"trainer": config}, indent=4))
    torch.save({k: v.cpu() for k, v in ae.state_dict().items()}, tmp_path / "ae.pt")
    _same(tmp_path / "ae.pt", x, ae.encode(x), fmt)
    if kind == "batchtopk":  # before training sets it, the threshold is -1: the encode is ReLU alone
        ae.threshold.fill_(-1.0)
        torch.save({k: v.cpu() for k, v in ae.state_dict().items()}, tmp_path / "ae.pt")
        _same(tmp_path / "ae.pt", x, ae.encode(x), fmt)


def test_saev_library(tmp_path, x):
    nn = _library("saev", "nn")
    config = _library("saev", "config")
    sae = nn.SparseAutoencoder(config.SparseAutoencoder(d_vit=D, exp_factor=3))
    _randomize(sae, 13)
    nn.dump(str(tmp_path / "ckpt" / "sae.pt"), sae)  # one JSON line (the config), then torch.save of the state
    loaded = nn.load(str(tmp_path / "ckpt" / "sae.pt"))
    _same(tmp_path / "ckpt" / "sae.pt", x, sae(x)[1], "saev")
    assert torch.equal(loaded(x)[1], sae(x)[1])


@pytest.mark.parametrize("kind", ["standard", "standard-no-b-dec", "topk", "topk-rescaled", "jumprelu",
                                  "batchtopk"])
def test_saelens_library(tmp_path, x, kind):
    saes = _library("sae_lens", "saes")
    if kind.startswith("standard"):
        sae = saes.StandardSAE(saes.StandardSAEConfig(d_in=D, d_sae=K, apply_b_dec_to_input=kind == "standard"))
    elif kind.startswith("topk"):
        sae = saes.TopKSAE(saes.TopKSAEConfig(d_in=D, d_sae=K, k=5,
                                              rescale_acts_by_decoder_norm=kind == "topk-rescaled"))
    elif kind == "jumprelu":
        sae = saes.JumpReLUSAE(saes.JumpReLUSAEConfig(d_in=D, d_sae=K))
    else:  # trained as batch top-k, saved for inference as a JumpReLU SAE at its learned threshold
        sae = saes.BatchTopKTrainingSAE(saes.BatchTopKTrainingSAEConfig(d_in=D, d_sae=K, k=5))
    _randomize(sae, 17)
    with torch.no_grad():
        if kind == "jumprelu":
            sae.threshold.copy_(torch.rand(K, generator=torch.Generator().manual_seed(3)))
        if kind == "batchtopk":
            sae.topk_threshold.fill_(0.6)
    if kind == "batchtopk":
        sae.save_inference_model(tmp_path)
        sae = saes.SAE.load_from_disk(tmp_path)  # the library's own loader: a JumpReLUSAE
        assert isinstance(sae, saes.JumpReLUSAE)
    else:
        sae.save_model(tmp_path)  # sae_weights.safetensors + cfg.json
    _same(tmp_path / "sae_weights.safetensors", x, sae.encode(x), "saelens")


# --- hostile files: each a one-line error naming the file and what was expected, or the library's own encode -------

def _refused(path, pattern, **kwargs):
    with pytest.raises(MisbenchError, match=pattern) as err:
        load_dictionary(path, **kwargs)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_dictionary_learning_topk_needs_its_config_and_finds_it_above_checkpoints(tmp_path, x):
    """training.py saves checkpoints as DIR/checkpoints/ae_STEP.pt with config.json in DIR; AutoEncoderTopK and
    BatchTopKSAE save the same keys, so a file whose config is missing or names another class is refused, not
    guessed (a BatchTopKSAE read as top-k gives other features, silently)."""
    p = _params(6)
    state = {"k": torch.tensor(3, dtype=torch.int), "threshold": torch.tensor(0.4), "b_dec": p["b_dec"],
             "encoder.weight": p["W"], "encoder.bias": p["b"], "decoder.weight": p["W"].T.clone()}
    (tmp_path / "checkpoints").mkdir()
    torch.save(state, tmp_path / "checkpoints" / "ae_100.pt")
    _refused(tmp_path / "checkpoints" / "ae_100.pt", "no config.json beside it")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "BatchTopKSAE", "k": 3}}))
    post = F.relu(F.linear(x - p["b_dec"], p["W"], p["b"]))  # BatchTopKSAE.encode: ReLU where above threshold
    _check(tmp_path / "checkpoints" / "ae_100.pt", x, post * (post > 0.4), "dictionary_learning-topk")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "GatedAutoEncoder"}}))
    _refused(tmp_path / "checkpoints" / "ae_100.pt", "whose trainer.dict_class is 'GatedAutoEncoder'")
    # the config.json of another run (another trainer_N's, copied beside it)
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "BatchTopKSAE", "k": 3,
                                                                  "dict_size": 2 * K, "activation_dim": D}}))
    _refused(tmp_path / "checkpoints" / "ae_100.pt", rf"describes another dictionary \(dict_size {2 * K} \(the file: "
                                                     rf"{K}\)\)")
    for broken in ("{ not json", "[1, 2]"):
        (tmp_path / "config.json").write_text(broken)
        _refused(tmp_path / "checkpoints" / "ae_100.pt", r"config.json .*JSON")


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
def test_damaged_and_mistaken_files_are_one_line_errors(tmp_path):
    p = _params(7)
    saelens = {"W_enc": p["W"].T, "b_enc": p["b"], "W_dec": p["W"], "b_dec": p["b_dec"]}
    _safetensors(tmp_path / "sae_weights.safetensors", saelens)
    whole = (tmp_path / "sae_weights.safetensors").read_bytes()
    (tmp_path / "cfg.json").write_text('{"architecture": "standard",')  # damaged cfg.json
    _refused(tmp_path / "sae_weights.safetensors", r"cannot read .*cfg.json .*JSONDecodeError.*SAELens config")
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "jumprelu"}))  # no threshold in the weights
    _refused(tmp_path / "sae_weights.safetensors", "a saelens file without its 'threshold' entry")
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": D, "d_sae": 2 * K, "k": 5}))
    _refused(tmp_path / "sae_weights.safetensors", rf"the cfg.json beside it describes another SAE \(d_sae {2 * K} "
                                                   rf"\(the weights: {K}\)\)")
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "topk", "k": K + 1}))  # torch.topk refuses k > K
    _refused(tmp_path / "sae_weights.safetensors", rf"keeps k = {K + 1} features per input but the dictionary has "
                                                   rf"K = {K}; expected k <= K")
    (tmp_path / "sae_weights.safetensors").write_bytes(whole[:len(whole) // 2])  # truncated in the data
    _refused(tmp_path / "sae_weights.safetensors", "truncated")
    (tmp_path / "sae_weights.safetensors").write_bytes(whole[:40])  # truncated in the header
    _refused(tmp_path / "sae_weights.safetensors", "header runs past the end of the file")
    # config.json given instead of the weights: starts with '{' like a saev checkpoint
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}, indent=4))
    _refused(tmp_path / "config.json", "a config file .* is not a dictionary: give the weights file beside it")
    _refused(tmp_path, "is a directory")
    # tensors without data (saved from the meta device) or sparse; float64 beyond float32's range
    torch.save({"W_enc": torch.empty(K, D, device="meta"), "b_enc": torch.empty(K, device="meta")}, tmp_path / "m.pt")
    _refused(tmp_path / "m.pt", "W_enc is a meta")
    torch.save({"W_enc": p["W"].to_sparse(), "b_enc": p["b"]}, tmp_path / "s.pt")
    _refused(tmp_path / "s.pt", "W_enc is a torch.sparse_coo tensor")
    torch.save({"W_enc": p["W"].double() * 1e300, "b_enc": p["b"].double()}, tmp_path / "big.pt")
    _refused(tmp_path / "big.pt", r"W_enc holds non-finite values \(NaN or inf: 480\)")
    torch.save({"W_enc": p["W"], "b_enc": p["b"], "activation": f"topk:{K + 1}"}, tmp_path / "k.pt")
    _refused(tmp_path / "k.pt", "expected k <= K")
    # saev: a header whose activation is not {"cls", "params"} is refused, not read as ReLU
    _saev_file(tmp_path / "saev.pt", {"schema": 2, "cfg": {"activation": "TopK"}}, p)
    _refused(tmp_path / "saev.pt", "saev header cfg.activation is 'TopK'")
    _saev_file(tmp_path / "saev.pt", {"schema": 2, "cfg": {"activation": {"cls": "TopK", "params": {"top_k": K + 1}}}},
               p)
    _refused(tmp_path / "saev.pt", "expected k <= K")


def test_saelens_legacy_log_threshold_is_its_exp(tmp_path, x):
    """SAELens' earlier JumpReLU files hold log_threshold; SAELens loads them as threshold = exp(log_threshold)."""
    p = _params(8)
    _safetensors(tmp_path / "sae_weights.safetensors", {"W_enc": p["W"].T, "b_enc": p["b"], "W_dec": p["W"],
                                                       "b_dec": p["b_dec"], "log_threshold": torch.log(p["threshold"])})
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "apply_b_dec_to_input": True}))
    h = (x - p["b_dec"]) @ p["W"].T + p["b"]
    _check(tmp_path / "sae_weights.safetensors", x, F.relu(h) * (h > p["threshold"]), "saelens")


class _Payload:
    """Unpickling it runs a shell command that writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_never_runs_without_trust_and_a_trusted_module_gives_its_weights(tmp_path, x):
    p = _params(9)
    marker = tmp_path / "ran"
    torch.save({"W_enc": p["W"], "b_enc": p["b"], "extra": _Payload(marker)}, tmp_path / "evil.pt")
    _refused(tmp_path / "evil.pt", "pickled Python object.*--trust-pickle")
    with open(tmp_path / "evil_saev.pt", "wb") as handle:  # behind a saev JSON line
        handle.write(b'{"d_vit": 12}\n')
        torch.save({"W_enc": p["W"].T, "b_enc": p["b"], "W_dec": p["W"], "b_dec": p["b_dec"], "x": _Payload(marker)},
                   handle)
    _refused(tmp_path / "evil_saev.pt", "pickled Python object")
    assert not marker.exists()
    # a whole module saved with torch.save(module), trusted: read as its state_dict
    module = torch.nn.Module()
    module.W_enc, module.b_enc = torch.nn.Parameter(p["W"]), torch.nn.Parameter(p["b"])
    torch.save(module, tmp_path / "module.pt")
    _refused(tmp_path / "module.pt", "pickled Python object")
    dic = load_dictionary(tmp_path / "module.pt", trust_pickle=True)
    assert torch.equal(encode(x, dic), F.relu(x @ p["W"].T + p["b"]))


def test_saelens_topk_decoder_norm_rescaling_in_the_library_order(tmp_path):
    """TopKSAE.encode (SAELens' training default rescale_acts_by_decoder_norm): hidden_pre = (x - b_dec) W_enc +
    b_enc, then times |W_dec row|; folding the norm into W_enc instead rounds differently in float32."""
    p = _params(10)
    w_dec = p["W"] * torch.linspace(0.5, 3, K)[:, None]
    _safetensors(tmp_path / "sae_weights.safetensors", {"W_enc": p["W"].T.contiguous(), "b_enc": p["b"], "W_dec": w_dec,
                                                       "b_dec": p["b_dec"]})
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "topk", "k": 5, "apply_b_dec_to_input": True,
                                                   "rescale_acts_by_decoder_norm": True}))
    x = torch.randn(256, D, generator=torch.Generator().manual_seed(1)) * 20
    h = ((x - p["b_dec"]) @ p["W"].T.contiguous() + p["b"]) * w_dec.norm(dim=-1)
    top = h.topk(5, dim=-1)
    ref = torch.zeros_like(h).scatter(-1, top.indices, F.relu(top.values))
    ours = encode(x, load_dictionary(tmp_path / "sae_weights.safetensors"))
    assert (ours - ref).abs().max() <= 1e-5, (ours - ref).abs().max()  # folded: 1e-4 apart (values up to 865)


def test_known_layouts_of_another_form_are_refused_by_name(tmp_path):
    p = _params(11)
    torch.save({"decoder_bias": p["b_dec"], "encoder.weight": p["W"], "r_mag": p["b"], "gate_bias": p["b"],
                "mag_bias": p["b"], "decoder.weight": p["W"].T.clone()}, tmp_path / "ae.pt")
    _refused(tmp_path / "ae.pt", "dictionary_learning GatedAutoEncoder")
    # Overcomplete MpSAE / OMPSAE (0.3.0) save their dictionary only: no encoder, not one act(x W^T + b)
    torch.save({"dictionary._weights": p["W"], "dictionary.multiplier": torch.tensor(0.0), "activation": "relu"},
               tmp_path / "mp.pt")
    _refused(tmp_path / "mp.pt", "an Overcomplete SAE without an encoder")
    _safetensors(tmp_path / "sae_weights.safetensors", {"W_enc": p["W"].T, "b_gate": p["b"], "b_mag": p["b"],
                                                       "r_mag": p["b"], "W_dec": p["W"], "b_dec": p["b_dec"]})
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "gated"}))
    _refused(tmp_path / "sae_weights.safetensors", "SAELens gated SAE")
    # SAELens' batch top-k training file (save_model): its inference form is save_inference_model's jumprelu file
    _safetensors(tmp_path / "sae_weights.safetensors", {"W_enc": p["W"].T, "b_enc": p["b"], "W_dec": p["W"],
                                                       "b_dec": p["b_dec"], "topk_threshold": torch.tensor(0.5)})
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "batchtopk", "k": 5}))
    _refused(tmp_path / "sae_weights.safetensors", "save it with save_inference_model")


def test_resume_refuses_a_dictionary_file_changed_since_the_extraction_started(tmp_path):
    """Rows written with the old dictionary and rows to come with the new one would mix silently (the layer's
    recorded sha256 being the old one's)."""
    from conftest import make_image_folder
    from misbench.activations.extract import ExtractSettings, extract
    from misbench.models.loading import load_model

    folder = make_image_folder(tmp_path / "images", per_class=2, size=16)
    torch.manual_seed(0)
    loaded = load_model("mini_inception", num_classes=3, arch_kwargs={"width": 8})
    g = torch.Generator().manual_seed(0)
    torch.save({"W_enc": torch.randn(24, 8, generator=g), "b_enc": torch.zeros(24)}, tmp_path / "d.pt")
    settings = ExtractSettings(layers=("conv1.bn",), features=(f"f=conv1.bn:{tmp_path / 'd.pt'}",), batch_size=3,
                               resize=16, crop=16)

    class Stop(Exception):
        pass

    def stop(done, total):
        if done >= 3:
            raise Stop

    with pytest.raises(Stop):
        extract(loaded, str(folder), tmp_path / "a.h5", settings, progress=stop)
    torch.save({"W_enc": torch.randn(24, 8, generator=g), "b_enc": torch.zeros(24)}, tmp_path / "d.pt")
    with pytest.raises(MisbenchError, match=r"cannot resume .*a.h5.partial: the dictionary file .*d.pt of feature "
                                            r"layer 'f' changed since the extraction started"):
        extract(loaded, str(folder), tmp_path / "a.h5", settings, resume=True)


def test_study_dry_run_checks_the_extract_features_files(tmp_path):
    """A dictionary file that is missing, unreadable or of another width than its layer is named by the dry run,
    before the training steps that a real run would finish first."""
    from click.testing import CliRunner

    from conftest import TINY_ARCH, write_study
    from misbench.cli.main import cli

    (tmp_path / "images").mkdir()
    torch.save({"W_enc": torch.randn(24, 20), "b_enc": torch.zeros(24)}, tmp_path / "wide.pt")
    torch.save({"W_enc": torch.randn(24, 8), "b_enc": torch.zeros(24)}, tmp_path / "good.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    specs = [f"a=conv1.bn:{tmp_path / 'wide.pt'}", f"b=conv1.bn:{tmp_path / 'good.pt'}",
             f"c=conv1.bn:{tmp_path / 'junk.pt'}", f"d=conv1.bn:{tmp_path / 'nope.pt'}"]
    config = write_study(tmp_path / "s.toml", model=TINY_ARCH, data={"train": str(tmp_path / "images"),
                                                                      "val": str(tmp_path / "images")},
                         train={"epochs": 1}, extract={"features": specs})
    r = CliRunner().invoke(cli, ["study", str(config), "--out", str(tmp_path / "out"), "--dry-run"])
    assert r.exit_code == 1
    errors = [line for line in r.output.splitlines() if line.startswith("Error: config [extract] features")]
    assert len(errors) == 3, r.output
    assert any("a=conv1.bn" in e and "W_enc is [24, 20] ([K, D], D = 20) but layer 'conv1.bn' has D = 8" in e
               for e in errors), errors
    assert any("cannot read" in e and "junk.pt" in e for e in errors), errors
    assert any("nope.pt does not exist" in e for e in errors), errors


LEGACY_SAELENS_CFG = {"d_in": D, "d_sae": K, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 5},
                      "normalize_activations": False, "apply_b_dec_to_input": True, "dtype": "float32",
                      "device": "cpu", "hook_name": "blocks.0.hook_resid_post"}


def test_saelens_cfg_from_before_6_is_read_as_saelens_6_reads_it(tmp_path, x):
    """No sae_lens_version: activation_fn_str 'topk' with activation_fn_kwargs k is a top-k SAE (read as ReLU
    before, silently), a boolean normalize_activations False is 'none' (refused before)."""
    p = _params(12)
    _safetensors(tmp_path / "sae_weights.safetensors", {"W_enc": p["W"].T, "b_enc": p["b"], "W_dec": p["W"],
                                                       "b_dec": p["b_dec"]})
    (tmp_path / "cfg.json").write_text(json.dumps(LEGACY_SAELENS_CFG))
    h = (x - p["b_dec"]) @ p["W"].T + p["b"]
    top = h.topk(5, dim=-1)
    _check(tmp_path / "sae_weights.safetensors", x, torch.zeros_like(h).scatter(-1, top.indices, F.relu(top.values)),
           "saelens")
    for change, refused in (({"normalize_activations": True}, "normalize_activations='expected_average_only_in'"),
                            ({"activation_fn_str": "tanh-relu"}, "activation_fn 'tanh-relu'")):
        (tmp_path / "cfg.json").write_text(json.dumps({**LEGACY_SAELENS_CFG, **change}))
        _refused(tmp_path / "sae_weights.safetensors", refused)
    # the same cfg from SAELens 6 on (its version recorded) keeps its architecture: standard, ReLU
    (tmp_path / "cfg.json").write_text(json.dumps({**LEGACY_SAELENS_CFG, "architecture": "standard",
                                                   "normalize_activations": "none",
                                                   "metadata": {"sae_lens_version": "6.54.12"}}))
    _check(tmp_path / "sae_weights.safetensors", x, F.relu(h), "saelens")


def test_saelens_library_reads_a_cfg_from_before_6(tmp_path, x):
    saes = _library("sae_lens", "saes")
    sae = saes.StandardSAE(saes.StandardSAEConfig(d_in=D, d_sae=K))
    _randomize(sae, 19)
    sae.save_model(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps(LEGACY_SAELENS_CFG))  # as an earlier release wrote it
    sae = saes.SAE.load_from_disk(tmp_path)
    assert isinstance(sae, saes.TopKSAE)
    _same(tmp_path / "sae_weights.safetensors", x, sae.encode(x), "saelens")


def test_an_unreadable_file_and_a_tilde_path_are_one_line_errors(tmp_path, monkeypatch):
    from misbench.activations import dictionary_formats

    torch.save({"W_enc": torch.randn(K, D), "b_enc": torch.zeros(K)}, tmp_path / "d.pt")

    def denied(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(dictionary_formats, "open", denied, raising=False)  # as for a file of another user
    _refused(tmp_path / "d.pt", r"cannot read .*d.pt \(Permission denied\)")
    monkeypatch.undo()
    with pytest.raises(MisbenchError, match=r"~/no-such-sae.pt does not exist \(a ~ inside NAME=LAYER:FILE is not "):
        load_dictionary("~/no-such-sae.pt")


def test_a_threshold_the_activation_would_ignore_and_nested_weights_are_named(tmp_path):
    w, b = torch.randn(K, D), torch.zeros(K)
    torch.save({"W_enc": w, "b_enc": b, "threshold": torch.rand(K)}, tmp_path / "t.pt")  # activation defaults to relu
    _refused(tmp_path / "t.pt", "a per-feature threshold with activation 'relu'; only activation 'jumprelu' uses it")
    torch.save({"W_enc": w, "b_enc": b, "threshold": torch.rand(K), "activation": "topk:3"}, tmp_path / "t.pt")
    _refused(tmp_path / "t.pt", "with activation 'topk:3'")
    torch.save({"state_dict": {"W_enc": w, "b_enc": b}, "epoch": 3}, tmp_path / "ckpt.pt")
    _refused(tmp_path / "ckpt.pt", r"unknown dictionary format \(its weights look nested .*save the SAE's own state_dict")
    torch.save({"module.W_enc": w, "module.b_enc": b}, tmp_path / "ddp.pt")
    _refused(tmp_path / "ddp.pt", "prefixed by DDP")


@pytest.mark.parametrize("kind", ["overcomplete-topk", "overcomplete-batchtopk", "dl-batchtopk"])
def test_a_trusted_pickled_module_is_read_with_its_class(tmp_path, x, kind):
    """torch.save(sae) of the whole module, read only with trust_pickle: its class and attributes say the encode
    that its state_dict alone does not (Overcomplete's top_k and running_threshold; dictionary_learning's
    AutoEncoderTopK or BatchTopKSAE, with no config.json needed)."""
    if kind.startswith("overcomplete"):
        sae_mod = _library("overcomplete", "sae")
        sae = sae_mod.TopKSAE(D, K, top_k=6) if kind.endswith("-topk") else sae_mod.BatchTopKSAE(D, K, top_k=6)
        _randomize(sae, 21)
        if kind.endswith("batchtopk"):
            sae.train()
            sae.encode(torch.randn(64, D, generator=torch.Generator().manual_seed(4)) * 2)
            sae.eval()
        theirs, fmt = sae.encode(x)[1], "overcomplete"
    else:
        ae, _ = _dl_trained("batchtopk")
        _randomize(ae, 22)
        with torch.no_grad():
            ae.threshold.fill_(0.4)
        sae, theirs, fmt = ae, ae.encode(x), "dictionary_learning-topk"
    torch.save(sae, tmp_path / "sae.pt")
    _refused(tmp_path / "sae.pt", "pickled Python object")
    dic = load_dictionary(tmp_path / "sae.pt", trust_pickle=True)
    assert dic.format == fmt and (encode(x, dic) - theirs.detach()).abs().max() <= 1e-5


def test_weights_saved_on_a_gpu_or_in_half_precision_are_read_as_float32_on_the_cpu(tmp_path, x, monkeypatch):
    """A file written on a GPU records each storage's device ('cuda:0'), as faked here through torch's own
    location tag; map_location puts it on the CPU. float16/bfloat16 weights encode as their float32 values."""
    import torch.serialization

    p = _params(13)
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save({"W_enc": p["W"], "b_enc": p["b"], "b_dec": p["b_dec"]}, tmp_path / "gpu.pt")
    assert b"cuda:0" in (tmp_path / "gpu.pt").read_bytes()
    _check(tmp_path / "gpu.pt", x, F.relu((x - p["b_dec"]) @ p["W"].T + p["b"]), "misbench")
    for dtype in (torch.float16, torch.bfloat16):
        half = {k: v.to(dtype) for k, v in {"W_enc": p["W"], "b_enc": p["b"]}.items()}
        torch.save(half, tmp_path / "half.pt")
        dic = load_dictionary(tmp_path / "half.pt")
        assert dic.W_enc.dtype == torch.float32
        assert torch.equal(encode(x, dic), F.relu(x @ half["W_enc"].float().T + half["b_enc"].float()))


def test_a_dictionary_trained_on_another_layer_of_the_same_width_is_said(tmp_path, caplog):
    """train-dictionary's record names the layer it learned from: applied to another layer of the same width
    (nothing in the shapes tells), the extraction warns; on its own layer it does not."""
    from misbench.activations.dictionary import resolve_features
    from misbench.models.loading import load_model

    torch.manual_seed(0)
    model = load_model("mini_inception", num_classes=3, arch_kwargs={"width": 8}).model.eval()
    g = torch.Generator().manual_seed(0)
    torch.save({"W_enc": torch.randn(24, 8, generator=g), "b_enc": torch.zeros(24),
                "training": {"layer": "conv1.bn", "steps": 10}}, tmp_path / "d.pt")
    probe = torch.zeros(1, 3, 16, 16)
    for layer, warned in (("conv1.bn", False), ("inception3a.branch2.1.bn", True)):
        caplog.clear()
        found = resolve_features(model, [f"f={layer}:{tmp_path / 'd.pt'}"], [], probe)
        assert found["f"][0] == layer and found["f"][1].trained_layer == "conv1.bn"
        said = [r.getMessage() for r in caplog.records if "was trained on layer" in r.getMessage()]
        assert len(said) == warned and (not warned or f"'conv1.bn', not '{layer}'" in said[0]), caplog.text

"""Official PyTorch checkpoints load without torch (fixture written by tests/make_torch_checkpoint.py)."""

import os
import pickle
import zipfile

import numpy as np
import pytest
from theorax.third_party import torch_pickle
from theorax.third_party.scaling_mlps import CheckpointError, convert_state_dict, load_checkpoint

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def test_tiny_official_checkpoint_logits_match_torch():
    model, params = load_checkpoint(os.path.join(FIXTURES, "tiny_bmlp.pt"))
    io = np.load(os.path.join(FIXTURES, "tiny_bmlp_io.npz"))
    assert (model.depth, model.width, model.expansion, model.num_classes) == (2, 16, 4, 7)
    assert model.input_shape == (8, 8, 3)
    np.testing.assert_allclose(model.apply(params, io["images"]), io["logits"], atol=1e-5)


def state():
    return dict(torch_pickle.load(os.path.join(FIXTURES, "tiny_bmlp.pt")))


def test_missing_tensor_is_named():
    s = state()
    del s["layernorms.1.weight"]
    with pytest.raises(CheckpointError, match=r"missing \['layernorms.1.weight'\]"):
        convert_state_dict(s)


def test_misshaped_tensor_is_named():
    s = state()
    s["blocks.0.block.2.bias"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError, match="blocks.0.block.2.bias"):
        convert_state_dict(s)


def test_prefixed_and_wrapped_state_dicts_load():
    s = {"_orig_mod." + k: v for k, v in state().items()}
    model, _ = convert_state_dict({"model": s})
    assert model.depth == 2


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(b"not a zip")
    with pytest.raises(torch_pickle.TorchFileError, match="zip"):
        load_checkpoint(str(path))


def test_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        torch_pickle.load(str(path))


@pytest.mark.interop
def test_fresh_torch_checkpoint_round_trip(tmp_path):
    pytest.importorskip("torch")
    from tests.scaled_mlp.make_torch_checkpoint import main

    main(str(tmp_path))
    model, params = load_checkpoint(str(tmp_path / "tiny_bmlp.pt"))
    io = np.load(tmp_path / "tiny_bmlp_io.npz")
    np.testing.assert_allclose(model.apply(params, io["images"]), io["logits"], atol=1e-5)

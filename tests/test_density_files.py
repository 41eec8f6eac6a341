"""DensityEstimator files: save and load, every kind of option, options and files that must be
refused, and files written by earlier format versions."""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np
import pytest
import torch
from density_data import SMALL, as_tensor, gaussian_data, log_scale_bounds
from torch import nn

import pyroflows as pf
from pyroflows.density import DensityEstimator, persistence, pipeline
from pyroflows.testing import randomize_parameters_, tolerances
from pyroflows.transforms import TriangularAffine

pytestmark = pytest.mark.usefixtures("one_thread")  # small networks (see conftest)


# ---- save and load ---------------------------------------------------------------------------
def test_save_is_atomic_and_overwrites(device, dtype, tmp_path):
    x, _, _ = gaussian_data(100, seed=14)
    est = DensityEstimator("maf", dtype=dtype, seed=0, **SMALL).fit(x, max_epochs=2,
                                                                    progress=False)
    path = tmp_path / "est.pt"
    path.write_bytes(b"old")
    est.save(str(path))
    assert os.listdir(tmp_path) == ["est.pt"]  # no temporary file left behind
    loaded = DensityEstimator.load(path)
    assert torch.equal(loaded.log_prob(x), est.log_prob(x).cpu())
    assert loaded.history_ == est.history_ and loaded.get_params() == est.get_params()
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(Exception):  # noqa: B017 - torch's unpickling error type varies
        DensityEstimator.load(tmp_path / "junk.pt")
    # a symbolic link is written through, as open(path, "wb") writes: the link stays
    link = tmp_path / "latest.pt"
    link.symlink_to(path)
    est.fit(x, max_epochs=1, progress=False).save(link)
    assert link.is_symlink() and os.path.realpath(link) == os.path.realpath(path)
    assert torch.equal(DensityEstimator.load(path).log_prob(x), est.log_prob(x).cpu())


def _tanh_factory() -> nn.Module:
    """A module-level activation factory: saved by import name, loaded only when trusted."""
    return nn.Tanh()


@pytest.mark.parametrize("flow", ["maf", "realnvp"])
def test_every_option_kind_survives_save_and_load(flow, device, dtype, tmp_path, monkeypatch):
    """Options of every kind a user can pass (tuples, numpy arrays and scalars, tensors, classes,
    functools.partial) come back equal after save/load, and the rebuilt network really uses
    them: the activation is not in the state dict, so a lost option would change log_prob."""
    x, _, _ = gaussian_data(120, seed=16)
    order_key = "order" if flow == "maf" else "mask"
    order = np.array([2, 0, 1]) if flow == "maf" else torch.tensor([True, False, True])
    flow_options = {
        "activation": functools.partial(nn.LeakyReLU, 0.1),
        order_key: order,
        "log_scale_bound": np.float64(3.0),
        "permutation": "random",
        "affine": True,
    }
    tabak_options = {"width": (0.05, 0.3), "max_steps": np.int64(30), "check_every": 10}
    est = DensityEstimator(flow, precondition="tabak", dtype=dtype, seed=0, **SMALL,
                           flow_options=flow_options, tabak_options=tabak_options)
    est.fit(as_tensor(x, device, dtype), max_epochs=2, progress=False)
    path = tmp_path / "options.pt"
    est.save(path)
    loaded = DensityEstimator.load(path, device=device)
    assert torch.equal(loaded.log_prob(x), est.log_prob(x))
    got = loaded.get_params()
    act = got["flow_options"]["activation"]
    assert isinstance(act, functools.partial) and act.func is nn.LeakyReLU and act.args == (0.1,)
    np.testing.assert_array_equal(np.asarray(got["flow_options"][order_key]), np.asarray(order))
    assert got["flow_options"]["log_scale_bound"] == 3.0
    assert got["tabak_options"] == {"width": (0.05, 0.3), "max_steps": 30, "check_every": 10}
    slopes = {m.negative_slope for m in loaded._model.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.1} and not any(isinstance(m, nn.ReLU) for m in loaded._model.modules())

    # A module-level function that pyroflows does not know loads once registered.
    est = DensityEstimator(flow, dtype=dtype, seed=0, **SMALL,
                           flow_options={"activation": _tanh_factory})
    est.fit(as_tensor(x, device, dtype), max_epochs=1, progress=False)
    est.save(path)
    with pytest.raises(ValueError, match="register_callable"):
        DensityEstimator.load(path)
    monkeypatch.setattr(persistence, "_REGISTERED", {})
    assert pf.density.register_callable(_tanh_factory) is _tanh_factory
    loaded = DensityEstimator.load(path, device=device)
    assert loaded.get_params()["flow_options"]["activation"] is _tanh_factory
    assert torch.equal(loaded.log_prob(x), est.log_prob(x))


def test_options_that_cannot_be_saved_are_rejected_up_front(tmp_path):
    for kwargs, match in [
        ({"flow_options": {"activation": lambda: nn.Tanh()}}, "lambda"),
        ({"flow_options": {"activation": nn.Tanh()}}, "module instance"),
        ({"flow_options": {"num_layers": 3}}, "DensityEstimator argument"),
        ({"flow_options": {"hidden_dims": (8,)}}, "DensityEstimator argument"),
        ({"flow_options": {"mask": [True, False]}}, "unknown option 'mask'"),  # MAF: 'order'
        ({"tabak_options": {"widht": 0.1}}, "unknown option 'widht'"),
    ]:
        with pytest.raises(ValueError, match=match):
            DensityEstimator("maf", **kwargs)
    # A crafted file naming an arbitrary function is refused, not imported and called.
    x, _, _ = gaussian_data(60, seed=17)
    est = DensityEstimator("maf", seed=0, **SMALL).fit(x, max_epochs=0, progress=False)
    est.save(tmp_path / "ok.pt")
    payload = torch.load(tmp_path / "ok.pt", weights_only=True)
    payload["params"]["flow_options"] = {
        "activation": {"__pyroflows_option__": "callable", "name": "os:getcwd"}}
    torch.save(payload, tmp_path / "crafted.pt")
    with pytest.raises(ValueError, match="'os:getcwd', which pyroflows does not know"):
        DensityEstimator.load(tmp_path / "crafted.pt")
    # Files of format version 1 (plain options only) still load.
    payload["version"], payload["params"]["flow_options"] = 1, {"permutation": "reverse"}
    torch.save(payload, tmp_path / "v1.pt")
    assert torch.equal(DensityEstimator.load(tmp_path / "v1.pt").log_prob(x), est.log_prob(x))


# ---- files of earlier versions ---------------------------------------------------------------
def test_saved_files_keep_their_log_scale_bound(device, dtype, tmp_path, monkeypatch):
    """A file written before the estimator had a default bound (format version 2, default
    flow_options {}) was built with the layers' bound 5 and must load with it, reproducing its
    log_prob, not silently become a bound-2 model; a current file keeps the defaults it was
    built with even if the module's default changes later; explicit options still win."""
    x, _, _ = gaussian_data(200, seed=19)
    xt = as_tensor(x, device, dtype)
    old = DensityEstimator("maf", dtype=dtype, seed=0, **SMALL,
                           flow_options={"log_scale_bound": 5.0})
    old.fit(xt, max_epochs=0, progress=False)
    randomize_parameters_(old._model.flow, scale=3.0, seed=2)
    old.save(tmp_path / "new.pt")
    payload = torch.load(tmp_path / "new.pt", weights_only=True)
    # What version 2 wrote for DensityEstimator("maf") with these weights.
    del payload["flow_defaults"]
    payload["version"], payload["params"]["flow_options"] = 2, {}
    torch.save(payload, tmp_path / "v2.pt")
    loaded = DensityEstimator.load(tmp_path / "v2.pt", device=device)
    assert log_scale_bounds(loaded) == {5.0} and loaded.get_params()["flow_options"] == {}
    assert torch.equal(loaded.log_prob(xt * 4.0), old.log_prob(xt * 4.0))
    # The same weights under the current default are another model (the check above can fail).
    payload["version"], payload["flow_defaults"] = 3, {"log_scale_bound": 2.0}
    torch.save(payload, tmp_path / "v3.pt")
    assert not torch.equal(DensityEstimator.load(tmp_path / "v3.pt", device=device)
                           .log_prob(xt * 4.0), old.log_prob(xt * 4.0))
    # A current default-bound file keeps bound 2 if the default moves; options still win.
    new = DensityEstimator("maf", dtype=dtype, seed=0, **SMALL).fit(xt, max_epochs=0,
                                                                    progress=False)
    randomize_parameters_(new._model.flow, scale=3.0, seed=3)
    new.save(tmp_path / "default.pt")
    monkeypatch.setitem(pipeline.FLOW_DEFAULTS, "maf", {"log_scale_bound": 4.0})
    loaded = DensityEstimator.load(tmp_path / "default.pt", device=device)
    assert log_scale_bounds(loaded) == {2.0}
    assert torch.equal(loaded.log_prob(xt * 4.0), new.log_prob(xt * 4.0))
    assert log_scale_bounds(DensityEstimator.load(tmp_path / "new.pt", device=device)) == {5.0}


@pytest.mark.parametrize("flow,precondition", [("maf", "standardize"), ("realnvp", "whiten")])
def test_files_with_per_layer_conditioners_load(flow, precondition, device, dtype, tmp_path,
                                                monkeypatch):
    """A file saved before the flow's networks shared one parameter tensor (written here by
    the estimator with the stacking switched off: keys ``flow.{i}.conditioner.flat_parameters``,
    shifted by one behind the whitening layer) loads into the stacked flow with the same
    log_prob; saved again, the file holds the stacked tensor once and loads back."""
    x, _, _ = gaussian_data(200, seed=21)
    xt = as_tensor(x, device, dtype)
    with monkeypatch.context() as m:
        m.setitem(pf.flows.FAMILIES, flow, dataclasses.replace(
            pf.flows.FAMILIES[flow], stacked_conditioners=False))
        old = DensityEstimator(flow, dtype=dtype, seed=0, precondition=precondition, **SMALL)
        old.fit(xt, max_epochs=0, progress=False)
    randomize_parameters_(old._model.flow, scale=0.5, seed=2)
    old.save(tmp_path / "old.pt")
    keys = torch.load(tmp_path / "old.pt", weights_only=True)["state_dict"]
    first = 1 if isinstance(old._model.flow[0], TriangularAffine) else 0
    assert f"flow.{first}.conditioner.flat_parameters" in keys
    loaded = DensityEstimator.load(tmp_path / "old.pt", device=device)
    assert len(list(loaded._model.flow.parameters())) == len(list(old._model.flow.parameters())) - 1
    torch.testing.assert_close(loaded.log_prob(xt), old.log_prob(xt), **tolerances(dtype))
    loaded.save(tmp_path / "new.pt")
    state = torch.load(tmp_path / "new.pt", weights_only=True)["state_dict"]
    banks = [v for k, v in state.items() if k.endswith("stacked.flat_parameters")]
    assert len(banks) == 2 and banks[0].untyped_storage().data_ptr() == \
        banks[1].untyped_storage().data_ptr()  # one tensor under both layers' keys
    again = DensityEstimator.load(tmp_path / "new.pt", device=device)
    assert torch.equal(again.log_prob(xt), loaded.log_prob(xt))


def test_whiten_kind_is_saved_and_old_files_load_as_learned(device, dtype, tmp_path,
                                                            monkeypatch):
    """A file written before the kind was saved (format version 3) holds the learned-base
    pipeline and loads as it, with the same log_prob; a current file keeps its kind when the
    module's default changes."""
    x, _, _ = gaussian_data(200, seed=33)
    xt = as_tensor(x, device, dtype)
    with monkeypatch.context() as m:
        m.setattr(pipeline, "WHITEN", "learned")
        old = DensityEstimator("maf", dtype=dtype, seed=0, **SMALL).fit(xt, max_epochs=0,
                                                                        progress=False)
    randomize_parameters_(old._model.flow, scale=0.5, seed=5)
    old.save(tmp_path / "learned.pt")
    payload = torch.load(tmp_path / "learned.pt", weights_only=True)
    del payload["whiten"]  # what version 3 wrote
    payload["version"] = 3
    torch.save(payload, tmp_path / "v3.pt")
    for kind in pipeline.WHITEN_KINDS:
        monkeypatch.setattr(pipeline, "WHITEN", kind)
        loaded = DensityEstimator.load(tmp_path / "v3.pt", device=device)
        assert loaded._whiten == "learned"
        assert torch.equal(loaded.log_prob(xt), old.log_prob(xt))
    for kind in pipeline.WHITEN_KINDS:
        monkeypatch.setattr(pipeline, "WHITEN", kind)
        est = DensityEstimator("realnvp", dtype=dtype, seed=0, **SMALL).fit(
            xt, max_epochs=0, progress=False)
        randomize_parameters_(est._model.flow, scale=0.5, seed=6)
        est.save(tmp_path / f"{kind}.pt")
        other = next(k for k in pipeline.WHITEN_KINDS if k != kind)
        monkeypatch.setattr(pipeline, "WHITEN", other)
        loaded = DensityEstimator.load(tmp_path / f"{kind}.pt", device=device)
        assert loaded._whiten == kind
        assert torch.equal(loaded.log_prob(xt), est.log_prob(xt))

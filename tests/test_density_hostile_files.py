"""DensityEstimator.load on hostile files: each gets a ValueError that says what is wrong, and
no file makes load import a module or call anything it names."""

from __future__ import annotations

import io
import re
import sys
import zipfile

import numpy as np
import pytest
import torch
from density_data import SMALL, gaussian_data

from pyroflows.density import DensityEstimator, persistence

pytestmark = pytest.mark.usefixtures("one_thread")  # small networks (see conftest)

CALLABLE = "__pyroflows_option__"


class NotAPyroflowsObject:
    """A class torch.save pickles by reference: weights_only loading must refuse it."""


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[bytes, DensityEstimator, np.ndarray]:
    """A good file's bytes, its estimator and some rows."""
    x, _, _ = gaussian_data(60, seed=40)
    est = DensityEstimator("maf", seed=0, **SMALL).fit(x, max_epochs=1, progress=False)
    path = tmp_path_factory.mktemp("good") / "good.pt"
    est.save(path)
    return path.read_bytes(), est, x


def _payload(good: bytes) -> dict:
    return torch.load(io.BytesIO(good), weights_only=True)


def _write(tmp_path, payload: dict) -> str:
    path = tmp_path / "crafted.pt"
    torch.save(payload, path)
    return str(path)


def _broken_zip(good: bytes) -> bytes:
    """The good archive with its data.pkl overwritten by garbage of the same length."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(good)) as zin, zipfile.ZipFile(out, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("data.pkl"):
                data = bytes(np.random.default_rng(0).integers(0, 256, len(data), np.uint8))
            zout.writestr(item, data)
    return out.getvalue()


def _flipped(good: bytes) -> bytes:
    """The good archive with one byte of its largest tensor's storage changed in place (the
    archive's CRC-32 of it left as it was)."""
    with zipfile.ZipFile(io.BytesIO(good)) as archive:
        item = max((i for i in archive.infolist() if "/data/" in i.filename),
                   key=lambda i: i.file_size)
    header = good[item.header_offset:item.header_offset + 30]
    start = (item.header_offset + 30 + int.from_bytes(header[26:28], "little")
             + int.from_bytes(header[28:30], "little"))
    data = bytearray(good)
    data[start + item.file_size // 2] ^= 0x40
    return bytes(data)


@pytest.mark.parametrize("case,match", [
    ("empty", r"is empty: not a pyroflows file"),
    ("random bytes", r"is not a pyroflows file \(or is damaged\)"),
    ("wrong magic", r"is not a pyroflows file \(or is damaged\)"),
    ("truncated", r"is damaged \(truncated or corrupted\)"),
    ("garbage inside the archive", r"is (damaged|not a pyroflows file)"),
    ("another object pickled", r"holds objects that a pyroflows file never does"),
    ("a torch file of something else", r"is a torch file but not a saved pyroflows"),
    ("a newer format version", r"format version 99 was written by a newer pyroflows"),
    ("an unknown format version", r"format version 'x' is unknown"),
    ("a field missing", r"is damaged: KeyError: 'dim'"),
    ("a foreign dtype name", r"is damaged: KeyError: 'load'"),
    ("weights of another shape", r"is damaged: RuntimeError: .*size mismatch"),
    ("a history that is not a dict", r"is damaged: TypeError: its history is a list"),
    ("an option that is not a constructor argument", r"is damaged: TypeError"),
    ("a byte of the weights flipped", r"is damaged .* does not match its checksum"),
    ("a million layers", r"num_layers=1000000.* need more numbers than the \d+ it saved"),
    ("a hidden width of a billion", r"hidden_dims=\(1000000000,.* need more numbers"),
    ("a student of a million layers", r"num_layers=1000000.* need more numbers"),
])
def test_damaged_and_foreign_files_say_what_is_wrong(case, match, saved, tmp_path):
    good, est, x = saved
    path = tmp_path / "bad.pt"
    payload = _payload(good)
    if case == "empty":
        path.write_bytes(b"")
    elif case == "random bytes":
        path.write_bytes(np.random.default_rng(1).bytes(2000))
    elif case == "wrong magic":
        path.write_bytes(b"XX" + good[2:])
    elif case == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif case == "garbage inside the archive":
        path.write_bytes(_broken_zip(good))
    elif case == "a byte of the weights flipped":  # (torch.load read it without a word)
        path.write_bytes(_flipped(good))
    elif case == "another object pickled":
        torch.save({"format": persistence.FORMAT, "x": NotAPyroflowsObject()}, path)
    elif case == "a torch file of something else":
        torch.save(est._model.state_dict(), path)
    else:
        if case == "a newer format version":
            payload["version"] = 99
        elif case == "an unknown format version":
            payload["version"] = "x"
        elif case == "a field missing":
            del payload["dim"]
        elif case == "a foreign dtype name":
            payload["dtype"] = "load"  # was getattr(torch, ...): torch.load as a dtype
        elif case == "weights of another shape":
            key = next(k for k, v in payload["state_dict"].items() if v.dim() == 2)
            payload["state_dict"][key] = torch.zeros(3, 3, dtype=torch.float64)
        elif case == "a history that is not a dict":
            payload["history"] = [1, 2]
        elif case == "an option that is not a constructor argument":
            payload["params"]["shell"] = "rm -rf /"
        elif case == "a million layers":  # (took minutes to build before it was refused)
            payload["params"]["num_layers"] = 10**6
        elif case == "a hidden width of a billion":  # (ran out of memory building it)
            payload["params"]["hidden_dims"] = (10**9, 8)
        elif case == "a student of a million layers":
            config = {"dim": payload["dim"], "num_layers": 10**6, "hidden_dims": [8],
                      "context_dim": None, "log_scale_bound": 2.0}
            payload["student"] = {"config": config, "state_dict": {}}
        torch.save(payload, path)
    with pytest.raises(ValueError, match=match):
        DensityEstimator.load(path)
    # the good file still loads and scores as saved
    good_path = tmp_path / "good.pt"
    good_path.write_bytes(good)
    assert torch.equal(DensityEstimator.load(good_path).log_prob(x), est.log_prob(x))


def _with_activation(good: bytes, option: dict) -> dict:
    payload = _payload(good)
    payload["params"]["flow_options"] = {"activation": option}
    return payload


def test_a_named_callable_pyroflows_does_not_know_is_refused_before_anything_runs(
        saved, tmp_path, monkeypatch):
    """Options naming os.system (with the command as a partial's argument), pyroflows'
    command line (``pyroflows.__main__``, which runs the demo when imported) or a module with
    import side effects: load refuses each with a ValueError that names the callable and tells
    how to allow it, and never imports the module or calls anything."""
    good, _, _ = saved
    marker = tmp_path / "imported.txt"
    (tmp_path / "sidefx_probe.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n"
        "import torch\n"
        "class Act(torch.nn.Tanh):\n"
        "    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("sidefx_probe", None)
    sys.modules.pop("pyroflows.__main__", None)
    command = tmp_path / "ran.txt"
    cases = {
        "os:system": {CALLABLE: "partial", "func": {CALLABLE: "callable", "name": "os:system"},
                      "args": (f"touch {command}",), "keywords": {}},
        "pyroflows.__main__:main": {CALLABLE: "callable", "name": "pyroflows.__main__:main"},
        "sidefx_probe:Act": {CALLABLE: "callable", "name": "sidefx_probe:Act"},
        # an attribute path through a known module to something it imported
        "torch.nn.modules.activation:torch.save": {
            CALLABLE: "callable", "name": "torch.nn.modules.activation:torch.save"},
        "no colon": {CALLABLE: "callable", "name": "os.system"},
    }
    for name, option in cases.items():
        path = _write(tmp_path, _with_activation(good, option))
        named = name if name != "no colon" else "os.system"
        with pytest.raises(ValueError, match=re.escape(repr(named)) + ".*register_callable"):
            DensityEstimator.load(path)
    assert not marker.exists() and "sidefx_probe" not in sys.modules
    assert "pyroflows.__main__" not in sys.modules
    assert not command.exists()


def test_registered_callables_load_and_nothing_else_is_added(saved, tmp_path, monkeypatch):
    """The activations pyroflows knows load from a file without any step; a callable of the
    user's loads once registered (before: refused), and registering a lambda or an instance is
    an error."""
    good, _, x = saved
    for activation in ("torch.nn.modules.activation:Tanh",
                       "torch.nn.modules.activation:LeakyReLU"):
        path = _write(tmp_path, _with_activation(good, {CALLABLE: "callable",
                                                        "name": activation}))
        loaded = DensityEstimator.load(path)
        expected = getattr(torch.nn, activation.split(":")[1])
        assert loaded.get_params()["flow_options"]["activation"] is expected
    monkeypatch.setattr(persistence, "_REGISTERED", {})
    path = _write(tmp_path, _with_activation(
        good, {CALLABLE: "callable", "name": f"{__name__}:NotAPyroflowsObject"}))
    with pytest.raises(ValueError, match="register_callable"):
        DensityEstimator.load(path)
    persistence.register_callable(NotAPyroflowsObject)
    assert DensityEstimator.load(path).get_params()["flow_options"]["activation"] is \
        NotAPyroflowsObject
    for bad in (lambda: None, torch.nn.Tanh(), "torch.nn.Tanh"):
        with pytest.raises(ValueError, match="not a module-level class or function"):
            persistence.register_callable(bad)


def test_one_entry_without_its_checksum_is_still_checked(saved, tmp_path):
    """Only an archive whose every CRC-32 is 0 goes unchecked: one entry's zeroed (and its
    contents changed) among checked ones is damage."""
    good, _, _ = saved
    data = bytearray(_flipped(good))
    with zipfile.ZipFile(io.BytesIO(good)) as archive:
        item = max((i for i in archive.infolist() if "/data/" in i.filename),
                   key=lambda i: i.file_size)
    name = item.filename.encode()
    start = 0
    while True:  # this entry's central-directory record (its name follows 46 bytes of header)
        start = data.index(b"PK\x01\x02", start)
        length = int.from_bytes(data[start + 28:start + 30], "little")
        if data[start + 46:start + 46 + length] == name:
            break
        start += 46
    data[start + 16:start + 20] = bytes(4)  # its CRC-32: 0
    path = tmp_path / "zeroed.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its checksum"):
        DensityEstimator.load(path)


def test_a_file_saved_without_checksums_loads(saved, tmp_path):
    """torch writes CRC-32 0 after ``set_crc32_options(False)``: unchecked, not 'damaged'."""
    _, est, x = saved
    torch.serialization.set_crc32_options(False)
    try:
        est.save(tmp_path / "no-crc.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert torch.equal(DensityEstimator.load(tmp_path / "no-crc.pt").log_prob(x), est.log_prob(x))

"""The README's Python examples run as written, in order, in one namespace (as a reader pastes
them), on the suite's device-free defaults."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_readme_examples_run(tmp_path, monkeypatch, fresh_param_store, one_thread):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)  # the density example saves a file
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["draws"].shape == (500, 2)
    assert set(namespace["posterior"]) >= {"mu", "tau"}
    assert (tmp_path / "density.pt").exists()
    assert namespace["report"].khat == namespace["report"].khat  # a number, not NaN
    import pyro

    z = pyro.poutine.trace(namespace["plain_guide"]).get_trace(namespace["images"]).nodes["z"]
    assert z["value"].shape == (64, 2) and z["fn"].batch_shape == (64,)

"""The documentation's generated config reference (docs/config.md) matches the config dataclasses."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference():
    """scripts/config_reference.py, loaded as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def committed_page() -> str:
    return (ROOT / "docs" / "config.md").read_text(encoding="utf-8")


def test_config_reference_is_current(reference):
    assert reference.render() == committed_page(), (
        "docs/config.md is out of date: run `python scripts/config_reference.py` and commit it")


def test_config_reference_covers_every_key(reference):
    page = committed_page()
    config = reference.config_module()

    def keys(cls, prefix=""):
        for name, tp in typing.get_type_hints(cls).items():
            if dataclasses.is_dataclass(tp):
                yield from keys(tp, f"{prefix}{name}.")
            else:
                yield prefix + name

    names = list(keys(config.Config))
    assert {"data.val_size", "optimizer.lr", "scheduler.warmup_factor", "model"} <= set(names)
    for name in names:
        assert f"| `{name}` |" in page, name


def test_a_changed_default_makes_the_page_stale(reference, monkeypatch):
    config = reference.config_module()
    epochs = config.Config.__dataclass_fields__["epochs"]
    lr = config.OptimizerConfig.__dataclass_fields__["lr"]
    monkeypatch.setattr(epochs, "default", epochs.default + 1)
    page = reference.render()
    assert page != committed_page()
    assert f"| `epochs` | int | `{epochs.default}` |" in page
    monkeypatch.undo()
    monkeypatch.setattr(lr, "default", 0.5)  # a nested section's key
    page = reference.render()
    assert page != committed_page()
    assert "| `optimizer.lr` | float | `0.5` |" in page


def test_a_changed_comment_makes_the_page_stale(reference):
    config = reference.config_module()
    source = inspect.getsource(config)
    comment = "# early stopping on validation accuracy; 0 switches it off"
    assert comment in source  # the comment on `patience`'s line; update this test if it is reworded
    page = reference.render(source=source.replace(comment, "# a reworded comment"))
    assert page != committed_page()
    assert "| `patience` | int | `10` | >= 0 | a reworded comment |" in page


def test_check_exits_1_on_a_stale_page(reference, tmp_path, capsys):
    page = tmp_path / "config.md"
    page.write_text(committed_page().replace("| `epochs` | int | `50` |", "| `epochs` | int | `49` |"))
    assert reference.main(["--check", "--path", str(page)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert reference.main(["--path", str(page)]) == 0
    assert reference.main(["--check", "--path", str(page)]) == 0
    assert page.read_text() == committed_page()

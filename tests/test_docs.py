"""The documentation matches the code: the generated config reference (docs/config.md) and its hand-written
sections (where a config comes from, exit codes, the keys that depend on each other), the exit codes on the
commands page, and the comments in the preset files that list a key's values."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import re
import signal
import typing
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from cifarcnn.base.config import load_preset
from cifarcnn.base.errors import ConfigError, UsageError
from cifarcnn.base.storage import StorageError
from cifarcnn.cli import build_parser, config_from_args, main
from cifarcnn.data.dataset import DataError
from cifarcnn.training.interrupt import EXIT_CODES
from cifarcnn.training.train import DivergedError
from cifarcnn.use.export import ExportError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference():
    """scripts/config_reference.py, loaded as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("config_reference",
                                                  ROOT / "scripts" / "config_reference.py")
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
    comment = "# early stopping on the monitored validation metric; 0 switches it off"
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


# The sources `A run's config comes from ...` names on the page, by the text in their backticks.
SOURCES = {"--config FILE": "config", "--preset NAME": "preset", "./config.yaml": "here", "seed": "seed"}


def stated_search_order(page: str) -> list[str]:
    sentence = re.search(r"A run's config comes from (.*?);", " ".join(page.split()))
    assert sentence, "the config reference no longer says where a run's config comes from: update this test"
    return [SOURCES.get(name, name) for name in re.findall(r"`([^`]+)`", sentence[1])]


def test_the_search_order_on_the_page_is_the_command_lines(reference, tmp_path, monkeypatch):
    """Every combination of --config, --preset and ./config.yaml (the two options together are an error)
    resolves to the first source present in the order the page states, the packaged seed last."""
    order = stated_search_order(reference.render())
    assert sorted(order) == sorted(SOURCES.values()), order
    monkeypatch.chdir(tmp_path)
    (tmp_path / "other.yaml").write_text("epochs: 3\n")
    epochs = {"config": 3, "preset": load_preset("quick").epochs, "here": 7,
              "seed": load_preset("seed").epochs}
    assert len(set(epochs.values())) == 4
    options = {"config": ["--config", "other.yaml"], "preset": ["--preset", "quick"]}
    for present in ({"config"}, {"preset"}, {"here"}, set(), {"config", "here"}, {"preset", "here"}):
        (tmp_path / "config.yaml").unlink(missing_ok=True)
        if "here" in present:
            (tmp_path / "config.yaml").write_text("epochs: 7\n")
        argv = ["check", *(arg for source in sorted(present) for arg in options.get(source, []))]
        expected = next(source for source in order if source in present | {"seed"})
        assert config_from_args(build_parser().parse_args(argv)).epochs == epochs[expected], (present, order)


def dependent_key_checks(config: ModuleType) -> set[tuple[int, int]]:
    """The lines (first, last) of each `raise ConfigError` that make_config reaches, outside the key-by-key
    checks the page's introduction covers (unknown keys, types, ranges: _build; override syntax:
    apply_overrides)."""
    functions = {node.name: node for node in ast.parse(inspect.getsource(config)).body
                 if isinstance(node, ast.FunctionDef)}
    todo, seen, raises = ["make_config"], {"_build", "apply_overrides"}, set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.walk(functions[name]):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in functions:
                todo.append(node.func.id)
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and \
                    getattr(node.exc.func, "id", None) == "ConfigError":
                raises.add((node.lineno, node.end_lineno))
    return raises


def raised_at(error: pytest.ExceptionInfo, path: str) -> int:
    """The line of `path` the exception was raised from (its last frame in that file)."""
    tb, line = error.tb, 0
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == path:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def test_each_rule_on_the_page_is_a_check_of_the_config_and_each_check_is_on_the_page(reference):
    """Every example of a stated rule stops make_config at a check of keys that depend on each other, and
    every such check is reached by some rule's example: a new check without its rule on the page fails, as
    does a rule the code does not enforce."""
    config = reference.config_module()
    checks = dependent_key_checks(config)
    assert len(checks) >= 5
    page, reached = reference.render(), set()
    for text, overrides in reference.rule_examples(config):
        assert f"- {text}\n" in page
        with pytest.raises(config.ConfigError) as error:
            config.make_config({}, overrides)
        line = raised_at(error, inspect.getsourcefile(config))
        check = next((c for c in checks if c[0] <= line <= c[1]), None)
        assert check, f"{overrides} ({text!r}) stops at line {line}, outside the checks of dependent keys"
        reached.add(check)
    assert reached == checks, f"checks with no rule on the page, at lines {sorted(checks - reached)}"


def test_the_exit_code_of_a_config_error_on_the_page_is_the_code(reference, monkeypatch):
    config = reference.config_module()
    assert f"(exit code {config.ConfigError.exit_code})" in " ".join(reference.render().split())
    monkeypatch.setattr(config.ConfigError, "exit_code", 7)
    assert "(exit code 7)" in " ".join(reference.render().split())


def test_the_exit_codes_on_the_commands_page_are_the_code(capsys):
    section = (ROOT / "docs" / "commands.md").read_text(encoding="utf-8").split("## Exit codes", 1)[1]
    text = " ".join(section.split("\n## ", 1)[0].split())
    stated = re.search(r"what is allowed, exit code (\d+), and nothing is written\. Errors in data or files "
                       r"exit (\d+); usage errors exit (\d+); a training stopped by SIGINT or SIGTERM exits "
                       r"(\d+) or (\d+)\.", text)
    assert stated, "docs/commands.md's exit codes were reworded: update this test"
    config_code, data_code, usage_code, sigint_code, sigterm_code = map(int, stated.groups())
    assert ConfigError.exit_code == config_code
    for error in (DataError, StorageError, ExportError, DivergedError):
        assert error.exit_code == data_code, error
    assert UsageError.exit_code == usage_code
    assert main(["predict", "run", "x.png", "--batch-size", "0"]) == usage_code  # checked by cli.main itself
    with pytest.raises(SystemExit) as exit_:
        main(["no-such-command"])  # argparse
    assert exit_.value.code == usage_code
    assert (EXIT_CODES[signal.SIGINT], EXIT_CODES[signal.SIGTERM]) == (sigint_code, sigterm_code)
    capsys.readouterr()


def choice_keys(config: ModuleType) -> dict[str, set[str]]:
    """Each key with a fixed set of values (dotted) -> those values; `model`: the model registry's names."""
    def walk(cls: type, prefix: str) -> Iterator[tuple[str, set[str]]]:
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name]):
                yield from walk(typing.get_type_hints(cls)[f.name], f"{prefix}{f.name}.")
            elif f.metadata.get("choices"):
                yield f"{prefix}{f.name}", set(f.metadata["choices"])

    from cifarcnn.models.registry import MODELS

    return {**dict(walk(config.Config, "")), "model": set(MODELS)}


def key_comments(text: str) -> Iterator[tuple[str, str]]:
    """(dotted key, the comment ending its line) for each key line of a preset's YAML that has a comment."""
    section = ""
    for line in text.splitlines():
        match = re.fullmatch(r"( *)([A-Za-z_]\w*):([^#]*)(?:#(.*))?", line)
        if not match:
            continue
        indent, key, value, comment = match.groups()
        if not indent:
            section = "" if value.strip() else f"{key}."
        name = f"{section}{key}" if indent else key
        if comment:
            yield name, comment.strip()


def resolves(dotted: str) -> bool:
    """Whether `package.module.NAME` names something that exists."""
    module, _, attribute = dotted.rpartition(".")
    try:
        return hasattr(importlib.import_module(module), attribute)
    except ImportError:
        return False


def test_preset_comments_that_list_choices_list_every_choice_and_name_what_exists(reference):
    """A comment on a key with fixed values that names two of them names all (`adam | adamw | sgd` without
    muon fails), its `a | b` lists hold only real values, and the code and pages it points to exist."""
    choices = choice_keys(reference.config_module())
    listed = set()
    for path in sorted((ROOT / "cifarcnn" / "presets").glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        for key, comment in key_comments(text):
            named = set(re.findall(r"\w+", comment)) & choices.get(key, set())
            if len(named) >= 2:
                missing = choices[key] - named
                assert not missing, f"{path.name}: the comment on {key} leaves out {sorted(missing)}"
                listed.add((path.name, key))
            for items in re.findall(r"\w+(?: \| \w+)+", comment):
                assert set(items.split(" | ")) <= choices.get(key, set()), f"{path.name}, {key}: {items}"
        for dotted in re.findall(r"\bcifarcnn(?:\.\w+)+", text):
            assert resolves(dotted), f"{path.name} names {dotted}, which does not exist"
        for page in re.findall(r"\bdocs/[\w-]+\.md", text):
            assert (ROOT / page).is_file(), f"{path.name} names {page}"
    assert {("seed.yaml", key) for key in ("model", "optimizer.name", "scheduler.name")} <= listed

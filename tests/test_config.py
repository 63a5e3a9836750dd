"""Config files, presets, overrides and validation; where the command line takes its config from."""

from importlib import metadata
from pathlib import Path

import pytest
import yaml

import cifarcnn
from cifarcnn.base.config import (
    Config,
    apply_overrides,
    load_config,
    load_preset,
    make_config,
    parse_yaml,
    preset_description,
    preset_names,
    preset_text,
)
from cifarcnn.base.errors import ConfigError, UsageError
from cifarcnn.cli import build_parser, config_from_args, main, parse_args

ROOT = Path(__file__).resolve().parents[1]


def test_seed_preset_matches_the_defaults_and_every_key_is_known():
    values = yaml.safe_load(preset_text("seed"))
    cfg = make_config(values)
    assert cfg == Config() == load_preset("seed")
    assert cfg.optimizer.lr == 1e-3 and cfg.batch_size == 128 and cfg.epochs == 50 and cfg.patience == 10


def test_root_config_is_the_packaged_seed_preset():
    root_config = ROOT / "config.yaml"
    assert root_config.is_symlink()
    assert root_config.resolve() == ROOT / "cifarcnn" / "presets" / "seed.yaml"
    assert root_config.read_text() == preset_text("seed")


def test_every_preset_loads_and_starts_with_its_one_line_description():
    assert preset_names() == sorted(p.stem for p in (ROOT / "cifarcnn" / "presets").glob("*.yaml"))
    for name in preset_names():
        assert preset_text(name).startswith(f"# {name}: "), name
        description = preset_description(name)
        assert description and "\n" not in description and not description.startswith(name)
        assert isinstance(load_preset(name), Config)
    assert load_preset("fast", ["epochs=3"]).epochs == 3 and load_preset("fast").model == "fastnet"


def test_an_unknown_preset_is_a_usage_error_naming_the_presets(capsys):
    with pytest.raises(UsageError, match="best, fast, quick, resnet18, seed"):
        load_preset("nope")
    assert main(["train", "--preset", "nope"]) == 2
    assert "'nope'" in capsys.readouterr().err


def test_presets_command_lists_each_preset_with_its_description(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == preset_names()
    for name, line in zip(preset_names(), lines):
        assert line.split(None, 1)[1] == preset_description(name)


@pytest.mark.parametrize("command", ["train", "bench", "check", "show-batch"])
def test_help_of_every_config_command_lists_the_presets(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in preset_names():
        assert f"  {name}  " in out and preset_description(name) in out
    assert "cifarcnn presets" in out  # the --preset help


def test_version_comes_from_the_installed_metadata(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"cifarcnn {metadata.version('cifarcnn')}\n"
    assert cifarcnn.__version__ == metadata.version("cifarcnn")


def resolved(*argv: str) -> Config:
    """The config `cifarcnn check ARGV` would use."""
    return config_from_args(build_parser().parse_args(["check", *argv]))


def test_config_comes_from_config_then_preset_then_the_current_folder_then_seed(tmp_path, monkeypatch, capsys,
                                                                                edited_seed_preset):
    # Each source sets its own number of epochs: the packaged seed (a changed copy) 11, ./config.yaml 7,
    # --config other.yaml 3; only ./config.yaml sets model: fastnet.
    edited_seed_preset("epochs: 50", "epochs: 11")
    monkeypatch.chdir(tmp_path)
    # no ./config.yaml: the packaged seed
    assert resolved() == load_preset("seed") and resolved().epochs == 11
    local = preset_text("seed").replace("epochs: 11", "epochs: 7").replace("model: simple_cnn",
                                                                           "model: fastnet")
    (tmp_path / "config.yaml").write_text(local)
    assert (resolved().epochs, resolved().model) == (7, "fastnet")  # ./config.yaml
    assert main(["check"]) == 0 and "model:      fastnet" in capsys.readouterr().out
    (tmp_path / "other.yaml").write_text("epochs: 3\n")
    # --config wins over ./config.yaml, and nothing of ./config.yaml leaks in
    assert (resolved("--config", "other.yaml").epochs,
            resolved("--config", "other.yaml").model) == (3, "simple_cnn")
    assert (main(["check", "--config", "other.yaml"]) == 0
            and "model:      simple_cnn" in capsys.readouterr().out)
    assert resolved("--preset", "seed").epochs == 11  # the packaged seed, not ./config.yaml
    assert resolved("--preset", "fast") == load_preset("fast")
    assert resolved("--preset", "seed", "epochs=2").epochs == 2


def test_config_and_preset_errors_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["check", "--config", "missing.yaml"]) == 2
    assert "file not found" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("epochs: 2\n")
    assert main(["check", "--config", "c.yaml", "--preset", "fast"]) == 2
    assert "not both" in capsys.readouterr().err


def test_yaml_errors_name_their_source():
    with pytest.raises(ConfigError, match="preset x is not valid YAML"):
        parse_yaml("epochs: [1, 2\n", "preset x")
    with pytest.raises(ConfigError, match="preset x must hold a mapping"):
        parse_yaml("- a list\n", "preset x")
    assert parse_yaml("", "preset x") == {}


def test_overrides_are_typed_and_nested():
    cfg = make_config({}, ["epochs=2", "optimizer.lr=1e-2", "augment.flip=none", "scheduler.epochs=null"])
    assert cfg.epochs == 2 and isinstance(cfg.epochs, int)
    assert cfg.optimizer.lr == 0.01 and isinstance(cfg.optimizer.lr, float)
    assert cfg.augment.flip == "none"
    assert cfg.scheduler.epochs is None


def test_integer_accepted_for_a_float_key():
    assert make_config({}, ["optimizer.weight_decay=0"]).optimizer.weight_decay == 0.0


def test_overrides_do_not_mutate_their_input():
    values = {"optimizer": {"lr": 0.5}}
    apply_overrides(values, ["optimizer.lr=0.1"])
    assert values == {"optimizer": {"lr": 0.5}}


@pytest.mark.parametrize("override, key", [
    ("not_a_key=1", "not_a_key"),
    ("optimizer.momentun=0.9", "optimizer.momentun"),
    ("epochs=-1", "epochs"),
    ("epochs=1.5", "epochs"),
    ("epochs=true", "epochs"),
    ("batch_size=0", "batch_size"),
    ("optimizer.lr=-0.1", "optimizer.lr"),
    ("optimizer.lr=0", "optimizer.lr"),
    ("optimizer.lr=fast", "optimizer.lr"),
    ("optimizer.name=rmsprop", "optimizer.name"),
    ("data.val_size=50000", "data.val_size"),
    ("augment.flip=3", "augment.flip"),
    ("augment.flip=sideways", "augment.flip"),
    ("tta=3", "tta"),
    ("model=resnet999", "model"),
    ("epochs.inner=1", "epochs"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        make_config({}, [override])
    assert f"'{key}'" in str(e.value)


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="key=value"):
        make_config({}, ["epochs"])


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


@pytest.mark.parametrize("override", ["not_a_key=1", "epochs=-1", "batch_size=0", "optimizer.lr=-1",
                                      "data.val_size=60000"])
def test_cli_config_errors_exit_2_with_one_line_and_write_nothing(override, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", override, "--runs-dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert override.split("=")[0] in err[0]
    assert not (tmp_path / "runs").exists()


def test_val_size_at_least_the_training_set_is_refused_before_anything_is_written(cifar_root, tmp_path,
                                                                                   capsys):
    # 600 synthetic training images: a val_size the config allows, but the data cannot.
    code = main(["train", "data.val_size=600", "--data-dir", str(cifar_root), "--runs-dir",
                 str(tmp_path / "runs")])
    assert code == 2
    assert "data.val_size" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["train", "bench", "show-batch", "check"])
def test_overrides_stand_anywhere_among_the_options(command):
    args = parse_args([command, "seed=1", "--preset", "quick", "epochs=2", "--data-dir", "d", "seed=3"]
                      if command != "check"
                      else [command, "seed=1", "--preset", "quick", "epochs=2", "seed=3"])
    assert args.overrides == ["seed=1", "epochs=2", "seed=3"]  # typed order: the later seed wins
    cfg = config_from_args(args)
    assert (cfg.seed, cfg.epochs) == (3, 2)


def test_the_issue_command_line_parses_and_unknown_options_still_fail(capsys):
    args = parse_args(["train", "epochs=1", "--test", "seed=3"])
    assert args.overrides == ["epochs=1", "seed=3"] and args.test
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["train", "epochs=1", "--test", "--bogus", "seed=3"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["evaluate", "run", "epochs=1"])  # evaluate takes no overrides


def test_a_late_override_reaches_the_command(capsys):
    assert main(["check", "epochs=1", "--preset", "quick", "model=simple_cnn"]) == 0
    assert "model:      simple_cnn" in capsys.readouterr().out

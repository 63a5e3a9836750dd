from pathlib import Path

import pytest
import yaml

from cifarcnn.cli import main
from cifarcnn.config import Config, apply_overrides, load_config, make_config
from cifarcnn.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_root_config_matches_the_defaults_and_every_key_is_known():
    values = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg = make_config(values)
    assert cfg == Config()
    assert cfg.optimizer.lr == 1e-3 and cfg.batch_size == 128 and cfg.epochs == 50 and cfg.patience == 10


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


def test_val_size_at_least_the_training_set_is_refused_before_anything_is_written(cifar_root, tmp_path, capsys):
    # 600 synthetic training images: a val_size the config allows, but the data cannot.
    code = main(["train", "data.val_size=600", "--data-dir", str(cifar_root), "--runs-dir", str(tmp_path / "runs")])
    assert code == 2
    assert "data.val_size" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()

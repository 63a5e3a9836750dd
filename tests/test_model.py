import pytest
import torch

from cifarcnn.cli import main
from cifarcnn.model import MODELS, SimpleCNN, SimpleCNNConfig, build_model, count_parameters


def test_simple_cnn_shapes_and_parameter_count():
    model = build_model("simple_cnn", num_classes=10)
    assert isinstance(model, SimpleCNN)
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)
    assert count_parameters(model) == (1_147_914, 1_147_914)
    assert [b.conv.out_channels for b in model.blocks] == [32, 64, 128]
    assert (model.fc1.in_features, model.fc1.out_features, model.fc2.out_features) == (2048, 512, 10)


def test_num_classes_changes_the_head():
    assert build_model("simple_cnn", num_classes=7)(torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("num_classes, image_size", [(100, 32), (20, 64), (3, 16), (5, 45)])
def test_every_registered_model_builds_for_any_class_count_and_image_size(name, num_classes, image_size):
    model = build_model(name, num_classes, image_size)
    assert model(torch.randn(2, 3, image_size, image_size)).shape == (2, num_classes)


def test_simple_cnn_first_fc_layer_follows_the_image_size():
    assert build_model("simple_cnn", 10, 64).fc1.in_features == 128 * 8 * 8
    assert build_model("simple_cnn", 10, 45).fc1.in_features == 128 * 5 * 5  # 45 -> 22 -> 11 -> 5
    assert build_model("simple_cnn", 10, 32).fc1.in_features == 2048


def test_check_command_reports_classes_and_image_size(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["check", "data.dataset=cifar100", "data.labels=coarse"]) == 0
    out = capsys.readouterr().out
    assert "20 classes, 32x32" in out and "(4, 20)" in out
    for name in ("cat", "dog", "fox"):
        (tmp_path / "pics" / "train" / name).mkdir(parents=True)
        (tmp_path / "pics" / "train" / name / "a.png").write_bytes(b"x")  # check reads no image
    assert main(["check", "model=fastnet", "data.dataset=folder", "data.path=pics", "data.image_size=48"]) == 0
    out = capsys.readouterr().out
    assert "3 classes, 48x48" in out and "(4, 3, 48, 48)" in out and "(4, 3)" in out


def test_every_parameter_gets_a_gradient():
    model = build_model("simple_cnn")
    torch.nn.functional.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.arange(8)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_unknown_model_name():
    with pytest.raises(ValueError, match="simple_cnn"):
        build_model("nope")


def test_registry_lists_simple_cnn():
    assert "simple_cnn" in MODELS


def test_check_command_prints_shapes_and_counts(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "(4, 3, 32, 32)" in out and "(4, 10)" in out and "1,147,914 total, 1,147,914 trainable" in out


def test_check_command_fails_when_a_parameter_gets_no_gradient(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def with_dead_layer(num_classes, image_size):
        model = SimpleCNN(SimpleCNNConfig(num_classes=num_classes, image_size=image_size))
        model.unused = torch.nn.Linear(3, 3)  # registered but never called in forward
        return model

    monkeypatch.setitem(MODELS, "simple_cnn", with_dead_layer)
    assert main(["check"]) == 1
    assert "unused.weight" in capsys.readouterr().out

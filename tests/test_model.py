import pytest
import torch

from cifarcnn.cli import main
from cifarcnn.models.contract import ClassifierHead, Model
from cifarcnn.models.registry import MODELS, build_model, count_parameters
from cifarcnn.models.simple_cnn import SimpleCNN, SimpleCNNConfig


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



@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_keeps_the_contract_with_the_trainer(name):
    """A Model holding one ClassifierHead (fine-tuning finds the classifier by it), whose parameters trained
    for their first epochs only are trainable ones."""
    model = build_model(name)
    assert isinstance(model, Model)
    assert sum(isinstance(m, ClassifierHead) for m in model.modules()) == 1
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(model.train_epochs) <= trainable and all(e > 0 for e in model.train_epochs.values())
    assert model.init_image_count >= 0


def test_a_model_declares_nothing_unless_it_says_so():
    model = Model()
    assert model.train_epochs == {} and model.init_image_count == 0
    model.init_from_data(torch.zeros(1, 3, 4, 4))  # does nothing
    fastnet, quicknet = build_model("fastnet"), build_model("quicknet")
    assert fastnet.train_epochs == {"whiten.bias": 3} and fastnet.init_image_count == 5000
    assert quicknet.train_epochs == {} and not quicknet.whiten.bias.requires_grad


def test_the_trainer_initializes_a_model_from_as_many_images_as_it_asks_for(monkeypatch):
    from cifarcnn.base.config import make_config
    from cifarcnn.data.dataset import MEAN, STD, normalize_
    from cifarcnn.training.build import make_model

    seen = []

    class Recording(SimpleCNN):
        def init_from_data(self, images):
            seen.append(images)

    def recording(count):
        def build(num_classes, image_size):
            model = Recording(SimpleCNNConfig(num_classes=num_classes, image_size=image_size))
            model.init_image_count = count
            return model
        return build

    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    monkeypatch.setitem(MODELS, "simple_cnn", recording(4))
    make_model(make_config({}), 10, images, torch.device("cpu"))
    assert len(seen) == 1 and torch.equal(seen[0], normalize_(images[:4].float() / 255, MEAN, STD))
    monkeypatch.setitem(MODELS, "simple_cnn", recording(0))
    make_model(make_config({}), 10, images, torch.device("cpu"))
    assert len(seen) == 1

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
    assert main(["check", "model=fastnet", "data.dataset=folder", "data.path=pics",
                 "data.image_size=48"]) == 0
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


def resnet18_parameters(num_classes: int) -> int:
    """ResNet-18 for CIFAR counted by hand: convs have no bias, each BatchNorm has a weight and a bias."""
    def conv(c_in, c_out, k=3):
        return c_in * c_out * k * k

    def block(c_in, c_out):  # two 3x3 convs + BN, and a 1x1 conv + BN shortcut where the shape changes
        shortcut = conv(c_in, c_out, 1) + 2 * c_out if c_in != c_out else 0
        return conv(c_in, c_out) + conv(c_out, c_out) + 4 * c_out + shortcut

    stem = conv(3, 64) + 2 * 64
    stages = sum(block(a, b) + block(b, b) for a, b in [(64, 64), (64, 128), (128, 256), (256, 512)])
    return stem + stages + 512 * num_classes + num_classes


def test_resnet18_is_the_cifar_variant_with_11_2m_parameters():
    model = build_model("resnet18")
    assert count_parameters(model) == (11_173_962, 11_173_962) == (resnet18_parameters(10),) * 2
    assert abs(count_parameters(model)[0] - 11.2e6) <= 0.05e6
    assert model.stem[0].kernel_size == (3, 3) and model.stem[0].stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    sides = []
    for stage in model.stages:
        stage.register_forward_hook(lambda m, i, out: sides.append((out.shape[1], out.shape[2])))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sides == [(64, 32), (128, 16), (256, 8), (512, 4)]
    assert [len(stage) for stage in model.stages] == [2, 2, 2, 2]
    assert count_parameters(build_model("resnet18", num_classes=100))[0] == resnet18_parameters(100)


def fastnet96_parameters(widths=(128, 384, 512), whiten=24, num_classes=10) -> tuple[int, int]:
    """(total, trainable) for fastnet96 by hand: the whitening conv (weight frozen, bias trained), per block
    a conv and a BatchNorm then one residual pair of two convs and two BatchNorms (BN scales frozen), a
    bias-free head."""
    total = trainable = 0
    for c_in, c_out in zip((whiten, *widths), widths):
        convs = c_in * c_out * 9 + 2 * c_out * c_out * 9
        total += convs + 3 * 2 * c_out
        trainable += convs + 3 * c_out
    whiten_weight = whiten * 3 * 2 * 2
    head = widths[-1] * num_classes
    return total + whiten_weight + whiten + head, trainable + whiten + head


def test_fastnet96_is_a_wider_fastnet_with_residual_pairs():
    from cifarcnn.models.fastnet import FastNet, ResidualPair

    torch.manual_seed(0)
    model = build_model("fastnet96")
    assert isinstance(model, FastNet) and model.train_epochs == {"whiten.bias": 3}
    assert count_parameters(model) == fastnet96_parameters() == (9_918_776, 9_915_416)
    assert [b.conv.out_channels for b in model.blocks] == [128, 384, 512]
    assert [len(b.pairs) for b in model.blocks] == [1, 1, 1] and not model.whiten.bias.any()
    assert not model.whiten.weight.requires_grad and not model.blocks[0].pairs[0].norm1.weight.requires_grad
    images = torch.randn(64, 3, 32, 32)
    model.init_from_data(images)  # FastNet's whitening, reused
    assert model(images[:4]).shape == (4, 10)
    assert build_model("fastnet96", num_classes=3)(images[:2]).shape == (2, 3)
    pair = ResidualPair(8, 0.1).eval()  # identity convs and fresh BatchNorms: GELU(x + GELU(x))
    x = torch.randn(2, 8, 6, 6)
    gelu = torch.nn.functional.gelu
    assert torch.allclose(pair(x), gelu(x + gelu(x)), atol=1e-5)

"""Per machine: the precision (the auto rule, forced settings, where the choice is recorded, the fp32 head).
How a CPU allocates memory is tests/test_memory.py's."""

import json

import pytest
import torch

from cifarcnn.base import precision
from cifarcnn.base.config import make_config
from cifarcnn.base.errors import ConfigError
from cifarcnn.models.registry import build_model
from cifarcnn.training.optimizers import build_optimizer
from cifarcnn.training.step import TrainStep
from cifarcnn.training.train import train

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("instructions, expected", [([], "fp32"), (["AVX-512 BF16"], "bf16"),
                                                    (["AMX", "AVX-512 BF16"], "bf16")])
def test_auto_on_a_cpu_follows_its_bf16_instructions(monkeypatch, instructions, expected):
    monkeypatch.setattr(precision, "cpu_bf16_instructions", lambda: instructions)
    choice = precision.choose("auto", CPU)
    assert choice.name == expected
    assert all(name in choice.reason for name in instructions)


def test_auto_is_bf16_on_cuda_and_a_setting_wins_everywhere(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_instructions", lambda: ["AMX"])
    assert precision.choose("auto", CUDA).name == "bf16"
    assert precision.choose("auto", torch.device("mps")).name == "fp32"
    assert precision.choose("fp32", CPU) == precision.Choice("fp32", "set in the config (precision)")
    assert precision.choose("bf16", CPU).name == "bf16"
    with pytest.raises(ConfigError, match="precision"):
        make_config({}, ["precision=fp16"])


@pytest.mark.parametrize("setting, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_the_training_step_computes_in_the_chosen_precision(setting, dtype):
    cfg = make_config({}, [f"precision={setting}"])
    model = build_model("simple_cnn")
    step = TrainStep(model, build_optimizer(cfg, model, CPU), cfg, CPU, setting)
    seen = []
    model.blocks[0].conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    loss, logits, _ = step(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    assert seen == [dtype] and step.precision == setting
    assert logits.dtype == torch.float32  # the head runs in fp32 either way


def test_the_classifier_head_gives_fp32_logits_under_bf16_autocast():
    model = build_model("fastnet").eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        hidden = model.blocks(torch.nn.functional.gelu(model.whiten(x)))
    assert logits.dtype == torch.float32 and hidden.dtype == torch.bfloat16
    pooled = torch.nn.functional.adaptive_max_pool2d(hidden, 1).flatten(1).float()
    expected = pooled @ model.head.weight.T * model.config.logit_scale  # fp32 arithmetic on the bf16 features
    assert torch.allclose(logits, expected, atol=1e-5)


def test_the_run_records_and_prints_its_precision(tmp_path, cifar_root, small_overrides, capsys):
    train(make_config({}, [*small_overrides, "epochs=1", "precision=bf16"]), tmp_path / "r",
          data_dir=cifar_root, device="cpu")
    assert "precision: bf16 (set in the config (precision))" in capsys.readouterr().out
    session = json.loads((tmp_path / "r" / "environment.json").read_text())["sessions"][0]
    assert session["precision"] == "bf16" and session["precision_reason"] == "set in the config (precision)"

"""Fine-tuning (`init_from`, `finetune`): what is loaded, what is new, what a linear probe leaves alone, the
errors, resume, and the commands that read a run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from cifarcnn.base.config import load_preset, make_config
from cifarcnn.base.errors import ConfigError
from cifarcnn.cli import main
from cifarcnn.models.registry import build_model
from cifarcnn.training import finetune
from cifarcnn.training import train as train_module
from cifarcnn.training.checkpoint import load_checkpoint
from cifarcnn.training.finetune import Source, load_matching, start_from, train_mode, weights_digest
from cifarcnn.training.optimizers import build_optimizer
from cifarcnn.training.step import TrainStep, restored_afterwards
from cifarcnn.training.train import train
from cifarcnn.use.evaluate import evaluate
from tests.conftest import FOLDER_CLASSES, write_image_folder
from tests.test_train import metrics_of, read_metrics

QUICK = ["batch_size=32", "eval_batch_size=50", "log_every=2", "tta=0"]


@pytest.fixture(scope="module")
def source_run(cifar_root, tmp_path_factory):
    """A quicknet (the quick preset: lookahead and a weight average) trained 1 epoch on the synthetic
    CIFAR-10."""
    run_dir = tmp_path_factory.mktemp("source") / "run"
    train(load_preset("quick", [*QUICK, "epochs=1", "data.val_size=100"]), run_dir, data_dir=cifar_root,
          device="cpu")
    return run_dir


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A 3-class folder dataset (cat, dog, fox) with a test/ folder."""
    return write_image_folder(tmp_path_factory.mktemp("folder"), per_class=16, test_per_class=4)


def finetune_config(folder, source_run, *more):
    return load_preset("quick", [*QUICK, "epochs=2", "data.dataset=folder", f"data.path={folder}",
                                 "data.val_size=8", f"init_from={source_run}", *more])


def test_loading_copies_every_tensor_whose_name_and_shape_match():
    source = build_model("simple_cnn", 10)
    state = {k: v + 1 for k, v in source.state_dict().items()}
    state["fc1.weight"] = torch.ones(7, 7)  # the right name, another shape
    state["elsewhere.weight"] = torch.ones(3)  # a name the model does not have
    del state["blocks.0.bn.running_var"]
    model = build_model("simple_cnn", 4)  # another number of classes: fc2 has other shapes
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loaded, new = load_matching(model, state, new_head=True)
    assert sorted(new) == ["blocks.0.bn.running_var", "fc1.weight", "fc2.bias", "fc2.weight"]
    after = model.state_dict()
    assert sorted(loaded) == sorted(set(after) - set(new))
    assert all(torch.equal(after[k], state[k]) for k in loaded)
    assert all(torch.equal(after[k], before[k]) for k in new)


def test_the_same_number_of_classes_under_other_names_gets_a_new_head(source_run, capsys):
    checkpoint = load_checkpoint(source_run / "best.pt")
    source = Source(source_run / "best.pt", checkpoint)
    cfg = make_config({}, ["model=quicknet", f"init_from={source_run}"])
    for classes, head_is_new in ((checkpoint["classes"], False), ([f"c{i}" for i in range(10)], True)):
        torch.manual_seed(0)
        model = build_model("quicknet", 10)
        record = start_from(model, source, classes, cfg)
        state = model.state_dict()
        assert torch.equal(state["head.weight"], checkpoint["model_state"]["head.weight"]) != head_is_new
        assert record["new"] == (["head.weight"] if head_is_new else [])
        assert all(torch.equal(state[k], checkpoint["model_state"][k]) for k in state if k != "head.weight")
    assert "loaded 44 of 45 tensors; new: head.weight (the class names differ)" in capsys.readouterr().out


def test_a_finetuned_run_keeps_the_source_whitening_records_its_origin_and_normalization(
        source_run, folder, tmp_path):
    source = load_checkpoint(source_run / "best.pt")
    state = train(finetune_config(folder, source_run), tmp_path / "ft", device="cpu")
    assert state["init_from"] == {"path": str((source_run / "best.pt").resolve()), "finetune": "all",
                                  "sha256": weights_digest(source["model_state"]), "loaded": 44,
                                  "new": ["head.weight"]}
    saved = load_checkpoint(tmp_path / "ft" / "best.pt")
    assert saved["init_from"] == state["init_from"] and saved["classes"] == list(FOLDER_CLASSES)
    # the frozen whitening layer: the source's, not one computed from the new images
    assert torch.equal(saved["model_state"]["whiten.weight"], source["model_state"]["whiten.weight"])
    assert (saved["mean"], saved["std"]) == (source["mean"], source["std"])


class _SimulatedGraph:
    """A CUDA graph's behaviour on the CPU: replay runs the step recorded at capture, with every module in the
    mode it had then, whatever the modes at replay (a real graph replays the recorded kernels)."""

    def __init__(self, step: TrainStep, x: torch.Tensor, y: torch.Tensor):
        self.step, self.modes = step, [m.training for m in step.model.modules()]
        self.x, self.y = x.clone(), y.clone()
        with restored_afterwards(step.model, step.optimizer):  # the outputs' tensors, as a capture makes them
            self.outputs = step._step(self.x, self.y)

    def replay(self) -> None:
        modules = list(self.step.model.modules())
        now = [m.training for m in modules]
        for module, mode in zip(modules, self.modes):
            module.training = mode
        for static, fresh in zip(self.outputs, self.step._step(self.x, self.y)):
            static.copy_(fresh)
        for module, mode in zip(modules, now):
            module.training = mode


@pytest.fixture
def simulated_graphs(monkeypatch):
    """TrainStep on the CPU as on one GPU: warm-up captures and training replays (simulated) graphs; returns
    the captured graphs."""
    captured = []
    init = TrainStep.__init__

    def graphs_on(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.use_graphs = True

    def capture(self, x, y):
        captured.append(_SimulatedGraph(self, x, y))
        return captured[-1], captured[-1].x, captured[-1].y, captured[-1].outputs, []

    monkeypatch.setattr(TrainStep, "__init__", graphs_on)
    monkeypatch.setattr(TrainStep, "_capture", capture)
    return captured


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_finetune_head_trains_the_head_and_moves_no_other_weight_nor_batchnorm_statistic(
        source_run, folder, tmp_path, monkeypatch, request, graphs):
    captured = request.getfixturevalue("simulated_graphs") if graphs else None
    initial = {}  # the model's tensors once the source is loaded, before the first step

    def start_and_keep(model, *args, **kwargs):
        record = finetune.start_from(model, *args, **kwargs)
        initial.update({k: v.clone() for k, v in model.state_dict().items()})
        return record

    monkeypatch.setattr(train_module, "start_from", start_and_keep)
    source = load_checkpoint(source_run / "best.pt")["model_state"]
    # lookahead every 2 of the 4 steps: a run shorter than lookahead_steps ends on the weights it started from
    cfg = finetune_config(folder, source_run, "finetune=head", "optimizer.lookahead_steps=2")
    train(cfg, tmp_path / "probe", device="cpu")
    saved = load_checkpoint(tmp_path / "probe" / "last.pt")
    groups = saved["optimizer_state"]["param_groups"]
    assert sum(len(g["params"]) for g in groups) == 1  # the head alone: nothing else decays or has momentum
    body = [k for k in initial if k != "head.weight"]
    kinds = {k.rsplit(".", 1)[1] for k in body}
    assert kinds >= {"running_mean", "running_var", "num_batches_tracked", "weight"}
    assert all(torch.equal(initial[k], source[k]) for k in body)  # the body starts as the source's
    for key in ("model_state", "train_model_state"):  # the weight average and the trained weights
        state = saved[key]
        assert (state["head.weight"] - initial["head.weight"]).abs().max() > 1e-3, key  # the head trained
        moved = [k for k in body if not torch.equal(state[k], initial[k])]
        assert moved == [], key  # running means, variances and batch counts included
    if graphs:  # every graph (warm-up's included) was captured with the modes training runs in
        assert captured and all(not mode for g in captured
                                for m, mode in zip(g.step.model.modules(), g.modes) if _is_norm(m))


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.modules.batchnorm._BatchNorm)


def test_the_graph_of_a_step_is_keyed_on_every_module_mode(source_run):
    """A graph captured with BatchNorm in train mode updates its running statistics on each replay: it must
    not be replayed for a step with BatchNorm in eval mode (`finetune: head`)."""
    cfg = make_config({}, ["model=quicknet", f"init_from={source_run}", "finetune=head"])
    model = build_model("quicknet", 3)
    step = TrainStep(model, build_optimizer(cfg, model, torch.device("cpu")), cfg, torch.device("cpu"),
                     "fp32")
    x = torch.zeros(4, 3, 32, 32)
    model.train()
    trained = step.graph_key(x)
    train_mode(model, cfg)
    assert step.graph_key(x) != trained
    model.train()
    assert step.graph_key(x) == trained
    next(m for m in model.modules() if _is_norm(m)).eval()  # one submodule's mode
    assert step.graph_key(x) != trained


@pytest.mark.parametrize("more, words", [
    (["model=simple_cnn"], "holds a quicknet, the config asks for simple_cnn: set model=quicknet"),
    (["data.image_size=40"], "trained on 32x32 images, the dataset gives 40x40: set data.image_size=32"),
    (["init_from=no/such/run"], "no/such/run: no such run folder or checkpoint file"),
])
def test_a_source_that_does_not_fit_is_an_error_and_nothing_is_written(source_run, folder, tmp_path, capsys,
                                                                       monkeypatch, more, words):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--preset", "quick", *QUICK, "data.dataset=folder", f"data.path={folder}",
            "data.val_size=8", f"init_from={source_run}", *more, "--device", "cpu", "--name", "ft"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_finetune_head_needs_init_from():
    with pytest.raises(ConfigError, match="set init_from="):
        make_config({}, ["finetune=head"])


def test_resume_of_a_finetuned_run_is_exact_and_does_not_reload_the_source(source_run, folder, tmp_path):
    own_source = tmp_path / "source"
    shutil.copytree(source_run, own_source)
    cfg = finetune_config(folder, own_source, "epochs=3")
    full = train(cfg, tmp_path / "full", device="cpu")
    interrupted = train(cfg, tmp_path / "resumed", device="cpu",
                        on_epoch_end=lambda metrics: metrics["epoch"] == 1)
    assert len(interrupted["history"]) == 1
    shutil.rmtree(own_source)  # resume reads the run's own checkpoint only
    cfg = make_config(load_checkpoint(tmp_path / "resumed" / "last.pt")["config"])
    resumed = train(cfg, tmp_path / "resumed", device="cpu", resume=True)
    assert metrics_of(resumed["history"]) == metrics_of(full["history"])
    assert metrics_of(read_metrics(tmp_path / "resumed")) == metrics_of(full["history"])
    assert resumed["init_from"] == full["init_from"]
    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    for key in ("model_state", "train_model_state"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_the_split_check_counts_the_test_images_the_source_model_trained_on(tmp_path, capsys):
    """A source trained on the same folder with another split_seed trained on some of the fine-tuned run's
    validation and test images: the run says so at the start, and evaluate and predict leave the test ones
    out."""
    root = write_image_folder(tmp_path / "pics", per_class=20, test_per_class=None)  # a hashed test split
    common = [*QUICK, "epochs=1", "data.dataset=folder", f"data.path={root}"]
    train(load_preset("quick", [*common, "data.val_size=0", "data.split_seed=1"]), tmp_path / "source",
          device="cpu")
    capsys.readouterr()
    run_dir = tmp_path / "ft"
    cfg = load_preset("quick", [*common, "data.val_size=8", "data.split_seed=2",
                                f"init_from={tmp_path / 'source'}"])
    tested = train(cfg, run_dir, device="cpu", test=True)["test"]
    started = capsys.readouterr().out
    source = load_checkpoint(tmp_path / "source" / "best.pt")["split"]
    split = load_checkpoint(run_dir / "best.pt")["split"]
    # by path, not by the pixels the check uses: the images here that were training images there
    theirs = source["train"]["ids"].numpy()
    val_hits, test_hits = (np.isin(split[side]["ids"].numpy(), theirs) for side in ("val", "test"))
    vals, tests = len(val_hits), len(test_hits)
    val_by_source, by_source = int(val_hits.sum()), int(test_hits.sum())
    assert 0 < by_source < tests and 0 < val_by_source < vals
    recorded = split["source_train"]
    assert recorded["count"] == source["train"]["count"] and recorded["split_seed"] == 1
    assert (f"WARNING: the source model trained on {by_source} of the {tests} test images and "
            f"{val_by_source} of the {vals} validation images (the same pictures): validation accuracy "
            f"counts them; evaluate and predict leave the test ones out") in started
    assert "train with data.split_seed=1 to keep its split" in started

    results = evaluate(run_dir, device="cpu", out_dir=tmp_path / "eval")
    # one rule for --test and evaluate
    assert results["num_images"] == tested["test_images"] == tests - by_source
    assert results["split"]["trained_on_by_source"] == results["split"]["trained_on_left_out"] == by_source
    printed = capsys.readouterr().out
    assert f"split: {by_source} of the {tests} test images are images the source model (init_from)" in printed

    shutil.rmtree(tmp_path / "source")  # a resume keeps the record without reading the source again
    train(make_config(load_checkpoint(run_dir / "last.pt")["config"], ["epochs=2"]), run_dir, device="cpu",
          resume=True)
    resumed = load_checkpoint(run_dir / "last.pt")["split"]["source_train"]
    assert torch.equal(resumed["pixels"], split["source_train"]["pixels"]) and resumed["split_seed"] == 1

    out = tmp_path / "predictions.json"  # every image of the folder: the run's and its source's left out
    assert main(["predict", str(run_dir), str(root / "train"), "--labels-from-folders", "-q", "--device",
                 "cpu", "--output", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["num_files"] == split["train"]["count"] + vals + tests
    assert summary["trained_on_left_out"] == split["train"]["count"] + val_by_source + by_source
    assert summary["accuracy"]["num_images"] == vals - val_by_source + tests - by_source


def test_evaluate_predict_export_and_report_work_on_a_finetuned_run(source_run, folder, tmp_path, capsys):
    run_dir = tmp_path / "ft"
    train(finetune_config(folder, source_run, "epochs=1"), run_dir, device="cpu")
    assert main(["evaluate", str(run_dir), "--device", "cpu"]) == 0
    assert main(["predict", str(run_dir), str(folder / "test"), "--labels-from-folders", "-q", "--device",
                 "cpu"]) == 0
    assert main(["export", str(run_dir), "--output", str(tmp_path / "m.onnx")]) == 0
    assert main(["report", str(run_dir), "--device", "cpu"]) == 0
    page = (run_dir / "report.html").read_text()
    digest = load_checkpoint(run_dir / "last.pt")["init_from"]["sha256"]
    assert "Fine-tuned (<code>finetune: all</code>)" in page and digest in page
    assert str((source_run / "best.pt").resolve()) in page
    out = capsys.readouterr().out
    assert "test accuracy" in out

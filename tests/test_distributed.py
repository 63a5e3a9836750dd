"""Scale-out under torchrun: DistributedDataParallel over 2 CPU processes (gloo) on 127.0.0.1."""

import json
import os
import signal
from collections import Counter
from pathlib import Path

import pytest
import torch

from cifarcnn.base.calibration import fit_temperature
from cifarcnn.base.config import DataConfig, make_config
from cifarcnn.base.errors import ConfigError
from cifarcnn.base.inference import predict_logits, settings_for
from cifarcnn.base.metrics import classification_metrics
from cifarcnn.data.cifar import load_cifar10
from cifarcnn.data.loader import Loader, training_split
from cifarcnn.training.checkpoint import load_checkpoint, model_from_checkpoint
from cifarcnn.training.distributed import Dist, setup
from cifarcnn.training.train import evaluate_split, train

from .helpers import (
    finish,
    free_port,
    position_text,
    read_metrics,
    settled_position,
    start,
    wait_for_checkpoint,
)

pytestmark = pytest.mark.distributed

RECIPE = ["epochs=2", "batch_size=50", "eval_batch_size=30", "data.val_size=100", "log_every=2",
          "checkpoint_every_steps=3"]
STEPS_PER_EPOCH = 10  # 500 training images in global batches of 50
NO_AUGMENT = ["augment.flip=none", "augment.crop_padding=0", "augment.brightness=0", "augment.contrast=0"]
PROBE = Path(__file__).parent / "shard_probe.py"


def global_step(where: tuple[int, int]) -> int:
    return where[0] * STEPS_PER_EPOCH + where[1]


def torchrun(restarts: int = 0) -> list[str]:
    return ["--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"127.0.0.1:{free_port()}", "--max-restarts", str(restarts)]


def train_args(cifar_root, runs: Path, name: str) -> list[str]:
    return ["train", *RECIPE, "--data-dir", str(cifar_root), "--device", "cpu", "--runs-dir", str(runs),
            "--name", name]


@pytest.fixture(scope="module")
def ddp_run(cifar_root, tmp_path_factory):
    """The recipe trained once by 2 processes: (run folder, output)."""
    runs = tmp_path_factory.mktemp("ddp")
    code, output = finish(start(train_args(cifar_root, runs, "run"), runs, torchrun()))
    assert code == 0, output
    return runs / "run", output


def workers(launcher_pid: int) -> dict[int, int]:
    """rank -> PID of the worker processes torchrun started."""
    ranks = {}
    for task in Path(f"/proc/{launcher_pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next((v.split(b"=")[1] for v in environ if v.startswith(b"RANK=")), None)
            if rank is not None:
                ranks[int(rank)] = int(pid)
    return ranks


def test_two_processes_train_on_disjoint_shards_and_evaluate_each_image_once(ddp_run, cifar_root, tmp_path):
    run_dir, output = ddp_run
    assert output.count("training simple_cnn") == 1 and "2 processes" in output  # only rank 0 prints
    assert output.count("epoch   2/2") == 1
    history = read_metrics(run_dir)
    assert [m["epoch"] for m in history] == [1, 2]
    # Over the two ranks, each epoch trained on each of the 500 training images once and validated each of the
    # 100 validation images once (a rank working through the whole set would double the counts).
    assert [(m["train_images"], m["val_images"]) for m in history] == [(500, 100), (500, 100)]

    # Validation accuracy as reduced over the ranks == one process evaluating the saved model on the whole
    # set.
    checkpoint = load_checkpoint(run_dir / "last.pt")
    model = model_from_checkpoint(checkpoint).to(memory_format=torch.channels_last)
    data = load_cifar10(cifar_root)
    _, (val_x, val_y) = training_split(data, DataConfig(val_size=100))
    loader = Loader(val_x, val_y, 100, device="cpu", memory_format=torch.channels_last)
    settings = settings_for({"tta": 0}, torch.device("cpu"))  # precision auto, as the run chose
    val_loss, val_acc, _, matrix = evaluate_split(model, loader, Dist(), "val", settings)
    assert history[-1]["val_acc"] == val_acc
    assert history[-1]["val_balanced_acc"] == classification_metrics(matrix)["balanced_accuracy"]
    # The loss too: the model gets every validation image right, so only the loss tells the shards apart.
    assert history[-1]["val_loss"] == pytest.approx(val_loss, rel=1e-5)
    # The temperature was fitted on every validation image once, gathered from both ranks' shards: the one a
    # single process fits on the whole set.
    best = load_checkpoint(run_dir / "best.pt")
    record = best["calibration"]
    assert record["images"] == 100 and record["tta"] == 0
    best_model = model_from_checkpoint(best).to(memory_format=torch.channels_last)
    fitted = fit_temperature(*predict_logits(best_model, loader, settings))
    assert record["temperature"] == pytest.approx(fitted, rel=1e-3)

    # The configured batch is the global one: as many optimizer steps per epoch as a single process takes.
    single = train(make_config({}, [*RECIPE, "epochs=1"]), tmp_path / "single", data_dir=cifar_root,
                   device="cpu")
    steps = [state["step"] for state in checkpoint["optimizer_state"]["state"].values()]
    single_steps = [s["step"] for s in single["optimizer_state"]["state"].values()]
    assert {float(s) for s in steps} == {2.0 * STEPS_PER_EPOCH}
    assert {float(s) for s in single_steps} == {1.0 * STEPS_PER_EPOCH}


def image_counts(images: torch.Tensor) -> Counter:
    return Counter(bytes(image.contiguous().numpy()) for image in images)


def test_each_rank_trains_and_validates_on_its_own_shard(cifar_root, tmp_path):
    """The images each rank's trainer handed its training step and its validation (recorded by
    shard_probe.py): each rank half of them, and together each training and each validation image exactly
    once."""
    args = ["train", *RECIPE, "epochs=1", *NO_AUGMENT, "--data-dir", str(cifar_root), "--device", "cpu",
            "--runs-dir", str(tmp_path), "--name", "run"]
    code, output = finish(start(args, tmp_path, torchrun(), program=(str(PROBE), str(tmp_path / "seen"))))
    assert code == 0, output
    seen = [torch.load(tmp_path / "seen" / f"rank{rank}.pt") for rank in (0, 1)]
    data = load_cifar10(cifar_root)
    (train_x, _), (val_x, _) = training_split(data, DataConfig(val_size=100))
    for key, images in (("train epoch 1", train_x), ("epoch 1/1 val", val_x)):
        assert [len(s[key]) for s in seen] == [len(images) // 2] * 2, key
        got, want = image_counts(torch.cat([s[key] for s in seen])), image_counts(images)
        assert (key, (want - got).total(), (got - want).total()) == (key, 0, 0)  # (images missed, extra)


def test_the_ranks_shards_are_disjoint_and_cover_each_batch():
    images, labels = torch.zeros(103, 3, 32, 32, dtype=torch.uint8), torch.arange(103)
    single = Loader(images, labels, 20, device="cpu", shuffle=True, seed=3)
    shards = [Loader(images, labels, 20, device="cpu", shuffle=True, seed=3, rank=r, world_size=3)
              for r in range(3)]
    assert all(len(shard) == len(single) for shard in shards)
    for batches in zip(single.epoch(1), *(shard.epoch(1) for shard in shards)):
        whole, parts = batches[0][1], [y for _, y in batches[1:]]
        assert sorted(torch.cat(parts).tolist()) == sorted(whole.tolist())


def test_an_elastic_restart_after_a_killed_worker_resumes_from_the_last_checkpoint(ddp_run, cifar_root,
                                                                                   tmp_path):
    proc = start(train_args(cifar_root, tmp_path, "run"), tmp_path, torchrun(restarts=1))
    run_dir = tmp_path / "run"
    reached = wait_for_checkpoint(proc, run_dir / "last.pt", lambda where: global_step(where) >= 6)
    os.kill(workers(proc.pid)[1], signal.SIGKILL)
    # What the restarted group will find: rank 0 cannot save again without its peer, and the restart saves its
    # first checkpoint only after starting two new processes and training checkpoint_every_steps steps.
    saved = settled_position(run_dir / "last.pt")
    code, output = finish(proc)
    assert code == 0, output
    assert "torchrun restart 1: resuming" in output
    assert global_step(saved) >= global_step(reached) and saved != (0, 0)
    assert f"resuming from {run_dir / 'last.pt'} {position_text(saved)}" in output, output
    sessions = json.loads((run_dir / "environment.json").read_text())["sessions"]
    assert [s["first_epoch"] for s in sessions] == [1, saved[0] + 1]
    assert read_metrics(run_dir) == read_metrics(ddp_run[0])


def test_sigterm_to_torchrun_saves_a_checkpoint_and_resume_finishes_the_run(ddp_run, cifar_root, tmp_path):
    proc = start(train_args(cifar_root, tmp_path, "run"), tmp_path, torchrun())
    run_dir = tmp_path / "run"
    wait_for_checkpoint(proc, run_dir / "last.pt", lambda where: where[1] > 0)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to every worker
    code, output = finish(proc)
    assert code != 0 and "interrupted by SIGTERM" in output and "resume with: torchrun" in output, output
    line = next(line for line in output.splitlines() if "interrupted by SIGTERM" in line)
    saved = load_checkpoint(run_dir / "last.pt")
    assert 0 < global_step((saved["epoch"], saved["step"])) < 2 * STEPS_PER_EPOCH
    assert f"interrupted by SIGTERM {position_text((saved['epoch'], saved['step']))}; saved" in line
    resume = ["train", "--resume", str(run_dir), "--data-dir", str(cifar_root), "--device", "cpu"]
    code, output = finish(start(resume, tmp_path, torchrun()))
    assert code == 0, output
    assert read_metrics(run_dir) == read_metrics(ddp_run[0])


def test_the_quick_preset_trains_under_torchrun_and_validates_its_weight_average(cifar_root, tmp_path):
    # Stopped halfway through its schedule, where the average has not yet met the trained weights.
    args = ["train", "--preset", "quick", *RECIPE[:4], "scheduler.epochs=4", "--data-dir", str(cifar_root),
            "--device", "cpu", "--runs-dir", str(tmp_path), "--name", "quick"]
    code, output = finish(start(args, tmp_path, torchrun()))
    assert code == 0, output
    assert output.count("training quicknet") == 1 and "2 processes" in output
    history = read_metrics(tmp_path / "quick")
    assert [(m["train_images"], m["val_images"]) for m in history] == [(500, 100), (500, 100)]
    # The saved model is the weight average, not the trained weights, and it is what was validated over the
    # ranks (by the loss: on this easy synthetic set both models classify every validation image right).
    checkpoint = load_checkpoint(tmp_path / "quick" / "last.pt")
    data = load_cifar10(cifar_root)
    _, (val_x, val_y) = training_split(data, DataConfig(val_size=100))
    loader = Loader(val_x, val_y, 100, device="cpu", memory_format=torch.channels_last)
    settings = settings_for({"tta": 2}, torch.device("cpu"))  # precision auto, as the run chose
    losses = []
    for weights in ("model_state", "train_model_state"):
        model = model_from_checkpoint({**checkpoint, "model_state": checkpoint[weights]})
        losses.append(evaluate_split(model.to(memory_format=torch.channels_last), loader, Dist(), "val",
                                     settings)[0])
    assert history[-1]["val_loss"] == pytest.approx(losses[0], rel=1e-5)
    assert history[-1]["val_loss"] != pytest.approx(losses[1], rel=1e-3)


def test_sync_batchnorm_on_the_cpu_is_a_config_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="sync_batchnorm"):
        setup("cpu", sync_batchnorm=True)

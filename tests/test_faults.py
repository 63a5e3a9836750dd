"""Runs that survive: SIGKILL at random moments, SIGINT/SIGTERM, a diverging loss, a full disk, a second
writer."""

import contextlib
import errno
import os
import random
import shlex
import signal
import subprocess
import sys

import pytest
import torch

from cifarcnn.cli import main
from cifarcnn.training.checkpoint import load_checkpoint
from cifarcnn.training.interrupt import StopRequest

from .helpers import child_env, finish, position, read_metrics, start, wait_for_checkpoint

pytestmark = pytest.mark.faults

STEPS_PER_EPOCH = 20  # 500 training images (600 - 100 validation) in batches of 25
EPOCHS = 3
RECIPE = [f"epochs={EPOCHS}", "batch_size=25", "eval_batch_size=50", "data.val_size=100", "log_every=4",
          "checkpoint_every_steps=5"]


def train_args(cifar_root, runs, name):
    return ["train", *RECIPE, "--data-dir", str(cifar_root), "--device", "cpu", "--runs-dir", str(runs),
            "--name", name]


def resume_args(cifar_root, run_dir):
    return ["train", "--resume", str(run_dir), "--data-dir", str(cifar_root), "--device", "cpu"]


@pytest.fixture(scope="module")
def uninterrupted(cifar_root, tmp_path_factory):
    """Per-epoch metrics of the recipe trained in one go (in a child process, like the runs it is compared
    to)."""
    runs = tmp_path_factory.mktemp("uninterrupted")
    code, output = finish(start(train_args(cifar_root, runs, "full"), runs))
    assert code == 0, output
    return read_metrics(runs / "full")


def global_step(where):
    return where[0] * STEPS_PER_EPOCH + where[1]


def test_sigkill_at_three_random_moments_then_resume_gives_the_uninterrupted_metrics(cifar_root, tmp_path,
                                                                                     uninterrupted):
    # Checkpoints land every 5 optimizer steps mid-epoch and at every epoch end; kill the process right after
    # one of them appears (it has then moved on, somewhere in the next steps or writing the next checkpoint).
    total = EPOCHS * STEPS_PER_EPOCH
    mid_epoch = [s for s in range(5, total, 5) if s % STEPS_PER_EPOCH]
    rng = random.Random(5)
    targets = sorted({rng.choice(mid_epoch[:3]), *rng.sample(range(8, total - 4), 2)})
    while len(targets) < 3:
        targets = sorted({*targets, rng.randrange(8, total - 4)})
    run_dir, killed_at = tmp_path / "run", []
    for n, target in enumerate(targets):
        args = train_args(cifar_root, tmp_path, "run") if n == 0 else resume_args(cifar_root, run_dir)
        proc = start(args, tmp_path)
        wait_for_checkpoint(proc, run_dir / "last.pt", lambda where, t=target: global_step(where) >= t)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_at.append(position(run_dir / "last.pt"))  # what the next session resumes from
    assert any(step for _, step in killed_at), f"no kill left a mid-epoch checkpoint: {killed_at}"
    assert [global_step(w) for w in killed_at] == sorted(global_step(w) for w in killed_at)
    code, output = finish(start(resume_args(cifar_root, run_dir), tmp_path))
    assert code == 0, output
    assert read_metrics(run_dir) == uninterrupted
    assert not list(run_dir.glob(".*"))  # no lock or temp file left behind


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_mid_epoch_checkpoint_and_prints_the_resume_command(signum, code, cifar_root,
                                                                             tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    proc = start(train_args(cifar_root, tmp_path, "run"), tmp_path)
    wait_for_checkpoint(proc, run_dir / "last.pt", lambda where: where[1] > 0)  # in epoch 1, mid-way
    proc.send_signal(signum)
    exit_code, output = finish(proc)
    assert exit_code == code, output
    assert "Traceback" not in output
    line = next(line for line in output.splitlines() if "resume with:" in line)
    assert f"interrupted by {signal.Signals(signum).name}" in line
    saved = load_checkpoint(run_dir / "last.pt")
    assert 0 < saved["step"] < STEPS_PER_EPOCH and len(saved["order"]) == 500  # a mid-epoch position
    assert f"epoch {saved['epoch'] + 1}, step {saved['step']}" in line
    if signum == signal.SIGTERM:
        return
    command = shlex.split(line.split("resume with:", 1)[1])
    assert command[:3] == [sys.executable, "-m", "cifarcnn"]
    resumed = subprocess.run(command, cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                             timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert read_metrics(run_dir) == uninterrupted


def test_a_diverging_learning_rate_stops_the_run_and_keeps_the_best_checkpoint(cifar_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    common = ["--data-dir", str(cifar_root), "--device", "cpu"]
    recipe = ["batch_size=50", "eval_batch_size=50", "data.val_size=100", "log_every=2", "optimizer.name=sgd",
              "optimizer.lr=0.05", "scheduler.name=constant"]
    assert main(["train", *recipe, "epochs=1", "--runs-dir", str(tmp_path), "--name", "run", *common]) == 0
    best, last = (run_dir / "best.pt").read_bytes(), (run_dir / "last.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "epochs=3", "optimizer.lr=1e12", *common]) == 1
    err = capsys.readouterr().err
    assert ("diverged" in err and "epoch 2, step 2" in err and "end of epoch 1" in err
            and "Traceback" not in err)
    assert len([line for line in err.splitlines() if "error:" in line]) == 1
    assert (run_dir / "best.pt").read_bytes() == best and (run_dir / "last.pt").read_bytes() == last
    assert len(load_checkpoint(run_dir / "best.pt")["history"]) == 1


def test_a_full_disk_during_a_checkpoint_write_keeps_the_previous_checkpoint(cifar_root, tmp_path, capsys,
                                                                             monkeypatch):
    run_dir = tmp_path / "run"
    real_fdopen = os.fdopen
    writes = {"last.pt": 0}

    class FullDisk:
        """A file that runs out of space after a few kilobytes."""

        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith(".last.pt."):
            writes["last.pt"] += 1
            if writes["last.pt"] >= 2:  # the first epoch's checkpoint goes through, the second one fails
                return FullDisk(f)
        return f

    monkeypatch.setattr("cifarcnn.base.storage.os.fdopen", fdopen)
    args = ["train", "epochs=3", "batch_size=100", "eval_batch_size=50", "data.val_size=100", "--runs-dir",
            str(tmp_path), "--name", "run", "--data-dir", str(cifar_root), "--device", "cpu"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert ("No space left on device" in err and "last.pt" in err and "unchanged" in err
            and "Traceback" not in err)
    monkeypatch.undo()
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1
    assert not list(run_dir.glob(".*.tmp"))


def test_an_unwritable_run_folder_fails_before_training(cifar_root, tmp_path, capsys):
    (tmp_path / "runs").write_text("a file where the runs folder should be")
    args = ["train", "epochs=1", "data.val_size=100", "--runs-dir", str(tmp_path / "runs"), "--name", "run",
            "--data-dir", str(cifar_root), "--device", "cpu"]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "not writable" in captured.err and str(tmp_path / "runs" / "run") in captured.err
    assert "training simple_cnn" not in captured.out


@contextlib.contextmanager
def lock_held_by_another_process(run_dir):
    """A child process holding RUN/.lock, as a training there would; killed (without releasing it) on exit."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from cifarcnn.training.runlock import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)", str(run_dir)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def quick_run(cifar_root, runs, name="run"):
    return ["train", "epochs=1", "batch_size=100", "data.val_size=100", "--runs-dir", str(runs), "--name",
            name, "--data-dir", str(cifar_root), "--device", "cpu"]


def test_a_second_training_on_a_folder_in_use_is_refused(cifar_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = quick_run(cifar_root, tmp_path)
    with lock_held_by_another_process(run_dir) as holder:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert str(run_dir) in err and f"PID {holder.pid}" in err and "in use" in err
    # The holder died without releasing anything: its lock file is still there, and is taken over.
    assert (run_dir / ".lock").read_text().split()[0] == str(holder.pid)
    assert main(args) == 0
    assert not (run_dir / ".lock").exists()


def test_a_resume_of_a_folder_in_use_is_refused(cifar_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(quick_run(cifar_root, tmp_path)) == 0
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    resume = ["train", "--resume", str(run_dir), "epochs=2", "--data-dir", str(cifar_root), "--device", "cpu"]
    capsys.readouterr()
    with lock_held_by_another_process(run_dir) as holder:
        assert main(resume) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert (len(err) == 1 and str(run_dir) in err[0] and f"PID {holder.pid}" in err[0]
                and "in use" in err[0])
        after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"}
        assert after == before  # nothing written, nothing removed
    assert main(resume) == 0
    assert position(run_dir / "last.pt") == (2, 0)


def test_stale_temp_files_are_removed_on_resume(cifar_root, tmp_path):
    run_dir = tmp_path / "run"
    assert main(quick_run(cifar_root, tmp_path)) == 0
    # what atomic writes killed half way leave behind (storage.atomic_write's temp names)
    stale = [run_dir / ".last.pt.k2x9q1.tmp", run_dir / ".metrics.jsonl.0p3c7a.tmp",
             run_dir / ".best.pt.zz.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    other = run_dir / ".notes"  # not a temp file: left alone
    other.write_text("mine")
    assert main(["train", "--resume", str(run_dir), "epochs=2", "--data-dir", str(cifar_root), "--device",
                 "cpu"]) == 0
    assert [path.name for path in stale if path.exists()] == []
    assert other.read_text() == "mine"
    assert position(run_dir / "last.pt") == (2, 0)


def test_checkpoints_load_with_weights_only(cifar_root, tmp_path, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    args = ["train", "epochs=1", "batch_size=100", "data.val_size=100", "--runs-dir", str(tmp_path), "--name",
            "run", "--data-dir", str(cifar_root), "--device", "cpu"]
    assert main(args) == 0
    assert main(["evaluate", str(tmp_path / "run"), "--data-dir", str(cifar_root), "--device", "cpu"]) == 0
    assert calls and all(flag is True for flag in calls)


def test_a_signal_during_training_is_noted_and_the_second_one_is_not_held_back():
    sigint_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite was started in the background
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # a second SIGTERM would end the process
    assert signal.getsignal(signal.SIGINT) is sigint_before  # put back as it was

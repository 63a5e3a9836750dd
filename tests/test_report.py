"""`cifarcnn report RUN`: a self-contained HTML page, checked as text and rendered in headless Chromium."""

import html
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from cifarcnn.base.config import make_config
from cifarcnn.cli import main
from cifarcnn.data.cifar import CLASSES
from cifarcnn.reports.report import SECTIONS, report
from cifarcnn.training.environment import read_sessions
from cifarcnn.training.train import train
from cifarcnn.use.evaluate import evaluate

SECTION_IDS = [key for key, _ in SECTIONS]


@pytest.fixture(scope="module")
def evaluated_run(trained_run_dir, cifar_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(trained_run_dir, run_dir, ignore=shutil.ignore_patterns("eval"))
    evaluate(run_dir, data_dir=cifar_root, device="cpu")
    return run_dir


@pytest.fixture(scope="module")
def page(evaluated_run):
    path = report(evaluated_run)
    return path, path.read_text()


def test_the_page_is_self_contained_with_every_section(page, evaluated_run):
    path, text = page
    assert path == evaluated_run / "report.html"
    for key in SECTION_IDS:
        assert f'<section id="{key}">' in text
    images = re.findall(r'<img src="([^"]*)"', text)
    # 4 curves, the confusion matrix, the misclassified grid, the reliability diagram
    assert len(images) == 7 and all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # nothing fetched from a network
    assert "<script" not in text and "<link" not in text
    assert 'name="viewport"' in text


def test_the_page_shows_the_run(page, evaluated_run):
    _, text = page
    metrics = json.loads((evaluated_run / "eval" / "test_metrics.json").read_text())
    assert f"{metrics['test_accuracy']:.2%}" in text
    table = text.split('id="per-class-table"')[1].split("</table>")[0]
    assert table.count("<tr>") == 1 + len(CLASSES)
    for name in CLASSES:
        assert f"<td>{name}</td>" in table
    assert html.escape((evaluated_run / "config.yaml").read_text()) in text
    seconds = [json.loads(line)["seconds"]
               for line in (evaluated_run / "metrics.jsonl").read_text().splitlines()]
    assert "over 2 epoch(s)" in text and f"{sum(seconds) / 2:.1f} s per epoch" in text
    hardware = text.split('<section id="hardware">')[1]
    assert "training from epoch 1" in hardware and "CPU" in hardware and "torch 2." in hardware


def test_the_page_shows_calibration_before_and_after(page, evaluated_run):
    _, text = page
    scores = json.loads((evaluated_run / "eval" / "test_metrics.json").read_text())["calibration"]
    section = text.split('<section id="calibration">')[1].split("</section>")[0]
    assert scores["calibrated"] and 'alt="reliability diagram"' in section
    for when in ("before", "after"):
        assert (f'<td class="num">{scores[f"ece_{when}"]:.2%}</td><td class="num">{scores[f"nll_{when}"]:.4f}'
                f'</td>') in section
    assert f"temperature {scores['temperature']:.3f}" in section


def test_training_records_the_hardware_of_each_session(cifar_root, tmp_path):
    base = ["batch_size=200", "data.val_size=100"]
    train(make_config({}, [*base, "epochs=1"]), tmp_path / "run", data_dir=cifar_root, device="cpu")
    train(make_config({}, [*base, "epochs=2"]), tmp_path / "run", data_dir=cifar_root, device="cpu",
          resume=True)
    sessions = read_sessions(tmp_path / "run")
    assert [s["first_epoch"] for s in sessions] == [1, 2]
    assert all(s["device"] == "cpu" and s["torch"] and s["cpu_count"] for s in sessions)


def test_an_unevaluated_run_is_evaluated_first(trained_run_dir, cifar_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run_dir, run_dir, ignore=shutil.ignore_patterns("eval"))
    assert main(["report", str(run_dir), "--no-evaluate"]) == 2
    err = capsys.readouterr().err
    assert f"cifarcnn evaluate {run_dir}" in err and not (run_dir / "report.html").exists()
    assert main(["report", str(run_dir), "--data-dir", str(cifar_root), "--device", "cpu", "--out",
                 str(tmp_path / "r.html")]) == 0
    assert "has not been evaluated yet; evaluating it now" in capsys.readouterr().out
    assert (run_dir / "eval" / "test_metrics.json").exists() and (tmp_path / "r.html").stat().st_size > 10_000


def test_report_errors(trained_run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("cifarcnn.data.cifar.URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run_dir, run_dir, ignore=shutil.ignore_patterns("eval"))
    assert main(["report", str(run_dir), "--data-dir", str(tmp_path / "no-data")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cifarcnn evaluate" in err[0] and "--data-dir" in err[0]
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["report", str(run_dir / "best.pt")]) == 2
    assert "not a run folder" in capsys.readouterr().err


# --------------------------------------------------------------------------- a real browser

PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const result = {
    images: images.length,
    loaded: images.filter(i => i.complete && i.naturalWidth > 0).length,
    sections: [...document.querySelectorAll("section")].map(s => s.id),
    visible: [...document.querySelectorAll("section")]
      .filter(s => s.getBoundingClientRect().height > 40).length,
    pageWidth: document.documentElement.scrollWidth,
    viewportWidth: window.innerWidth,
  };
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>"""


@pytest.fixture
def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("CI is set but Chromium is not installed (.ci/run installs Debian's chromium package)")
    pytest.skip("Chromium is not installed (apt-get install chromium)")


def run_chromium(chromium, profile, *args, timeout=120):
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--hide-scrollbars", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_headless_chromium_renders_every_section_and_image(chromium, page, tmp_path):
    path, text = page
    probe_page = tmp_path / "probe.html"
    probe_page.write_text(text.replace("</body>", PROBE + "</body>"))
    for width, height in ((1280, 900), (390, 844)):  # a laptop, a phone
        done = run_chromium(chromium, tmp_path / f"profile-dom-{width}", f"--window-size={width},{height}",
                            "--virtual-time-budget=10000", "--dump-dom", probe_page.as_uri())
        found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
        assert found, f"no probe output from Chromium (exit {done.returncode}): {done.stderr[-2000:]}"
        result = json.loads(html.unescape(found.group(1)))
        assert result["sections"] == SECTION_IDS and result["visible"] == len(SECTION_IDS)
        assert result["images"] == 7 and result["loaded"] == 7, result
        assert result["pageWidth"] <= result["viewportWidth"], f"page scrolls sideways at {width}px: {result}"

    # Screenshots of the report itself, kept in this test's temp folder as build artifacts.
    for name, size in (("report-desktop.png", "1280,2600"), ("report-phone.png", "390,2600")):
        shot = tmp_path / name
        done = run_chromium(chromium, tmp_path / f"profile-{name}", f"--window-size={size}",
                            f"--screenshot={shot}", path.as_uri())
        assert shot.exists(), f"Chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
        pixels = np.asarray(Image.open(shot).convert("RGB"))
        assert pixels.shape[:2] == tuple(int(v) for v in reversed(size.split(",")))
        assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500  # a real page
        print(f"screenshot: {shot}")

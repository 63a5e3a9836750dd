"""`cifarcnn report RUN`: one self-contained HTML page (images inlined as data URIs, no scripts, no network)
with a run's training curves, test results, misclassified examples, config, hardware and time."""

from __future__ import annotations

import base64
import html
import json
from datetime import datetime
from pathlib import Path

from ..base.errors import UsageError, UserError
from ..base.metrics import classification_metrics, describe_counts, is_imbalanced
from ..base.plots import ANNOTATED_CLASSES, training_curve_pngs
from ..base.storage import atomic_write_text
from ..data.dataset import DataError
from ..data.sources import dataset_of_checkpoint
from ..data.splits import SCHEME, compare_split
from ..training.checkpoint import load_checkpoint
from ..training.environment import read_sessions
from ..use.evaluate import confusion_count, evaluate, top_confusions

SECTIONS = (("summary", "Summary"), ("curves", "Training curves"), ("per-class", "Per-class accuracy"),
            ("confusion", "Confusion matrix"), ("misclassified", "Misclassified examples"),
            ("calibration", "Calibration"),
            ("config", "Config"), ("hardware", "Hardware and time"))

CSS = """
:root { color-scheme: light; --ink: #1d2430; --muted: #5b6677; --line: #d9dee7; --accent: #2563eb; }
* { box-sizing: border-box; }
body { margin: 0; font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       background: #f5f7fa; }
main { max-width: 980px; margin: 0 auto; padding: 16px; }
header h1 { font-size: 1.6rem; margin: 8px 0 4px; overflow-wrap: anywhere; }
header p { margin: 0; color: var(--muted); }
nav { display: flex; flex-wrap: wrap; gap: 6px 14px; margin: 12px 0 4px; font-size: 0.9rem; }
nav a { color: var(--accent); text-decoration: none; }
section { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 14px 16px; \
margin: 14px 0; }
h2 { font-size: 1.2rem; margin: 0 0 10px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(140px, 1fr)); gap: 10px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px; }
.card .value { font-size: 1.4rem; font-weight: 600; }
.card .label { font-size: 0.8rem; color: var(--muted); }
figure { margin: 0; }
figure img { display: block; width: 100%; max-width: 100%; height: auto; }
figure.narrow img { max-width: 680px; margin: 0 auto; }
figcaption, .caption { font-size: 0.85rem; color: var(--muted); margin-top: 6px; }
.curves { display: grid; grid-template-columns: 1fr 1fr; gap: 10px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 0.92rem; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.bar { background: #e6ecf7; border-radius: 4px; height: 10px; min-width: 60px; }
.bar span { display: block; height: 100%; border-radius: 4px; background: var(--accent); }
pre { background: #f3f5f9; border-radius: 6px; padding: 10px; font-size: 0.85rem; white-space: pre-wrap;
      overflow-wrap: anywhere; margin: 0; }
.note { background: #fff7e0; border: 1px solid #f0d48a; border-radius: 6px; padding: 8px 10px; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 4px 14px; margin: 0; }
dt { color: var(--muted); }
dd { margin: 0; overflow-wrap: anywhere; }
@media (max-width: 600px) { main { padding: 8px; } section { padding: 10px; } body { font-size: 15px; }
  .curves { grid-template-columns: 1fr; }
  dl { grid-template-columns: 1fr; } dd { margin-bottom: 6px; } .bar-cell { display: none; } }
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def read_history(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise UserError(f"{path}: line {number} is not valid JSON") from None
        if isinstance(row, dict) and "test" in row and "epoch" not in row:
            continue  # --test's result on the kept model, after the epochs
        if not isinstance(row, dict) or "epoch" not in row:
            raise UserError(f"{path}: line {number} is not an epoch record")
        rows.append(row)
    if not rows:
        raise UserError(f"{path} has no epochs yet; train the run first")
    return rows


def load_test_metrics(run_dir: Path, *, evaluate_if_missing: bool, data_dir: str | Path | None,
                      device: str | None) -> dict:
    """RUN/eval/test_metrics.json, running `cifarcnn evaluate RUN` first when it is missing and allowed."""
    path = run_dir / "eval" / "test_metrics.json"
    how = f"cifarcnn evaluate {run_dir}" + (f" --data-dir {data_dir}" if data_dir else "")
    if not path.exists():
        if not evaluate_if_missing:
            raise UsageError(f"{run_dir} has not been evaluated yet: run `{how}` first (or leave out "
                             f"--no-evaluate to let report do it)")
        print(f"{run_dir} has not been evaluated yet; evaluating it now ({how})")
        try:
            evaluate(run_dir, data_dir=data_dir, device=device)
        except DataError as e:
            raise UserError(f"{run_dir} has not been evaluated yet and evaluating it failed: {e}. "
                            f"Evaluate it with `{how}` (pointing --data-dir at the CIFAR files), then run "
                            f"report again") from None
    try:
        metrics = json.loads(path.read_text())
        metrics["test_accuracy"], metrics["classes"], metrics["confusion_matrix"]  # noqa: B018
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}: {e}); run `{how}` again") from None
    return metrics


def _figure(path: Path, alt: str, caption: str, narrow: bool = False) -> str:
    if not path.exists():
        return (f'<p class="note">{_e(path)} is missing; run <code>cifarcnn evaluate</code> again to draw '
                f'it.</p>')
    css_class = ' class="narrow"' if narrow else ""
    return (f'<figure{css_class}><img src="{_data_uri(path.read_bytes())}" alt="{_e(alt)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _card(value: str, label: str) -> str:
    return f'<div class="card"><div class="value">{_e(value)}</div><div class="label">{_e(label)}</div></div>'


def _class_counts(metrics: dict) -> str:
    """The class counts per side (train and validation as the checkpoint recorded them, test as evaluated),
    and a note when the training classes are imbalanced above 3:1."""
    classes, counts = metrics["classes"], metrics.get("class_counts") or {}
    if not counts:
        return ""
    sides = "; ".join(f"{side} {describe_counts(classes, n)}" for side, n in counts.items())
    note = ""
    if is_imbalanced(counts.get("train", [])):
        note = ('<p class="note">The training classes are imbalanced (above 3:1): read balanced accuracy and '
                'the per-class recall, not accuracy alone; <code>data.balance</code> trains through it.</p>')
    return f"<p>Class counts: {_e(sides)}.</p>{note}"


def _percent(value: float | None, digits: int = 1) -> str:
    return f"{value:.{digits}%}" if value is not None else "-"


def _per_class_table(metrics: dict) -> str:
    """One row per class, the best recall (per-class accuracy) first (classes without test images last):
    recall, precision, F1, correct, support, training images, the class most often predicted instead."""
    classes, matrix = metrics["classes"], metrics["confusion_matrix"]
    scores = classification_metrics(matrix)
    train = (metrics.get("class_counts") or {}).get("train") or ["-"] * len(classes)
    support, recall = scores["support"], [r or 0.0 for r in scores["recall"]]
    rows = []
    for i in sorted(range(len(classes)), key=lambda i: (not support[i], -recall[i])):
        wrong = [(count, classes[j]) for j, count in enumerate(matrix[i]) if j != i and count]
        confused = max(wrong)[1] if wrong else "-"
        rows.append(f'<tr><td>{_e(classes[i])}</td><td class="num">{_percent(scores["recall"][i])}</td>'
                    f'<td class="bar-cell"><div class="bar"><span style="width:{recall[i] * 100:.1f}%">'
                    f'</span></div></td><td class="num">{_percent(scores["precision"][i])}</td>'
                    f'<td class="num">{_percent(scores["f1"][i])}</td><td class="num">{matrix[i][i]}</td>'
                    f'<td class="num">{support[i]}</td><td class="num">{train[i]}</td>'
                    f'<td>{_e(confused)}</td></tr>')
    return (_class_counts(metrics) + '<div class="scroll"><table id="per-class-table"><thead><tr>'
            '<th>class</th><th class="num">recall</th><th class="bar-cell"></th>'
            '<th class="num">precision</th><th class="num">F1</th><th class="num">correct</th>'
            '<th class="num">support</th>'
            '<th class="num">train images</th><th>most often predicted instead</th></tr></thead><tbody>'
            + "".join(rows) + '</tbody></table></div><p class="caption">Recall is the share of a class\'s '
            "test images predicted as it (its accuracy), precision the share of the images predicted as it "
            "that are it; support counts its test images.</p>")


def _top_confusions(metrics: dict) -> str:
    classes = metrics["classes"]
    pairs = top_confusions(metrics["confusion_matrix"], classes, confusion_count(len(classes)))
    if not pairs:
        return ""
    items = "".join(f"<li>{_e(t)} &rarr; {_e(p)}: {n} images</li>" for n, t, p in pairs)
    return f"<p>Most frequent confusions (true &rarr; predicted):</p><ul>{items}</ul>"


def _balanced_cards(metrics: dict) -> list[str]:
    """Balanced accuracy and macro-F1 (recomputed from the confusion matrix: an older test_metrics.json lacks
    them)."""
    scores = classification_metrics(metrics["confusion_matrix"])
    return [_card(_percent(scores["balanced_accuracy"], 2), "test balanced accuracy (mean per-class recall)"),
            _card(_percent(scores["macro_f1"], 2), "test macro-F1")]


def _hardware(run_dir: Path, history: list[dict]) -> str:
    seconds = [row["seconds"] for row in history if isinstance(row.get("seconds"), (int, float))]
    total = sum(seconds)
    parts = ["<dl>",
             f"<dt>training time</dt><dd>{_duration(total)} over {len(history)} epoch(s), "
             f"{total / max(len(seconds), 1):.1f} s per epoch on average (sum of the per-epoch "
             f"<code>seconds</code> in metrics.jsonl: training and validation, not checkpoint writes)</dd>"]
    sessions = read_sessions(run_dir)
    if not sessions:
        parts.append("<dt>hardware</dt><dd>not recorded: this run was trained by a cifarcnn version that did "
                     "not write environment.json</dd>")
    for s in sessions:
        label = f"training from epoch {s.get('first_epoch', '?')}"
        device = str(s.get("device", "?"))
        accelerator = "" if device == "cpu" else f"{_e(device)} &mdash; {_e(s.get('device_name', '?'))}; "
        if isinstance(s.get("processes"), int) and s["processes"] > 1:
            accelerator += f"{s['processes']} processes (torchrun); "
        detail = (f"{accelerator}CPU {_e(s.get('cpu', '?'))} "
                  f"({_e(s.get('cpu_count', '?'))} cores, {_e(s.get('torch_threads', '?'))} torch threads); "
                  f"torch {_e(s.get('torch', '?'))}, Python {_e(s.get('python', '?'))}, "
                  f"{_e(s.get('platform', '?'))}; started {_e(s.get('started', '?'))}")
        parts.append(f"<dt>{_e(label)}</dt><dd>{detail}</dd>")
    parts.append("</dl>")
    return "".join(parts)


def _test_caption(metrics: dict) -> str:
    left_out = (metrics.get("split") or {}).get("trained_on_left_out", 0)
    if left_out:
        return (f"test accuracy on the {metrics.get('num_images', '?')} test images not trained on "
                f"({left_out} trained-on image(s) LEFT OUT: moved to the test side since training, or copies "
                f"of training images)")
    return f"test accuracy ({metrics.get('num_images', '?')} images)"


def _calibration(metrics: dict, eval_dir: Path) -> str:
    """The test set's calibration figures (before and after the temperature) and the reliability diagram."""
    scores = metrics.get("calibration")
    if not scores:
        return ('<p class="note">These test results predate calibration figures: run <code>cifarcnn evaluate'
                '</code> again.</p>')
    rows = [("plain softmax", "before")] + ([(f"temperature {scores['temperature']:.3f}", "after")]
                                           if scores.get("calibrated") else [])
    table = "".join(f'<tr><td>{_e(name)}</td><td class="num">{scores[f"ece_{when}"]:.2%}</td>'
                    f'<td class="num">{scores[f"nll_{when}"]:.4f}</td>'
                    f'<td class="num">{scores[f"mean_confidence_{when}"]:.2%}</td></tr>'
                    for name, when in rows)
    note = ("" if scores.get("calibrated") else
            '<p class="note">This checkpoint is uncalibrated: its probabilities are the plain softmax. '
            "<code>cifarcnn calibrate RUN</code> fits a temperature on the validation split.</p>")
    caption = (f"Test images binned by top-1 probability ({scores['bins']} bins): the bars are the share "
               "right, the red marks the mean probability; on the diagonal a probability of 80% is right 80% "
               "of the time.")
    return (note + '<div class="scroll"><table><thead><tr><th>probabilities</th><th class="num">ECE</th>'
            '<th class="num">NLL</th><th class="num">mean top-1</th></tr></thead>'
            f"<tbody>{table}</tbody></table></div>"
            + _figure(eval_dir / "reliability.png", "reliability diagram", caption))


def _origin(run_dir: Path) -> str:
    """For a fine-tuned run (`init_from`), the model it started from: path, weights digest, what was
    loaded."""
    path = next((run_dir / name for name in ("last.pt", "best.pt") if (run_dir / name).exists()), None)
    if path is None:
        return ""
    try:
        origin = load_checkpoint(path).get("init_from")
    except UserError:
        return ""
    if not origin:
        return ""
    new = ", ".join(origin.get("new") or []) or "none"
    return (f"<p>Fine-tuned (<code>finetune: {_e(origin.get('finetune', '?'))}</code>) from "
            f"<code>{_e(origin.get('path', '?'))}</code>, weights sha256 "
            f"<code>{_e(origin.get('sha256', '?'))}</code>: {_e(origin.get('loaded', '?'))} tensors loaded, "
            f"new: {_e(new)}.</p>")


def build_html(run_dir: Path, history: list[dict], metrics: dict, config_text: str) -> str:
    """The whole page as a string; every image inlined."""
    eval_dir = run_dir / "eval"
    key = "val_balanced_acc" if metrics.get("monitor") == "balanced_accuracy" else "val_acc"
    validated = [row for row in history if row.get(key) is not None]
    # Without a validation set (data.val_size=0) the last epoch is the run's best checkpoint.
    best = max(validated, key=lambda row: row[key]) if validated else history[-1]
    notes = []
    if metrics.get("epoch") is not None and str(metrics.get("checkpoint", "")).endswith("best.pt") \
            and metrics["epoch"] != best["epoch"]:
        notes.append(f"The test results are from epoch {metrics['epoch']}, but the best validation epoch is "
                     f"now {best['epoch']}: run <code>cifarcnn evaluate {_e(run_dir)}</code> to refresh "
                     f"them.")
    if metrics.get("split"):
        notes.append(_e(metrics["split"]["description"]))
    total_seconds = sum(row.get("seconds", 0) for row in history)
    cards = "".join([
        _card(f"{metrics['test_accuracy']:.2%}", _test_caption(metrics)),
        *_balanced_cards(metrics),
        _card(f"{best[key]:.2%}", f"best validation {'balanced ' if key != 'val_acc' else ''}accuracy "
                                  f"(epoch {best['epoch']})") if validated
        else _card("-", "no validation set"),
        _card(str(history[-1]["epoch"]), "epochs trained"),
        _card(_duration(total_seconds), "training time"),
        _card(f"{metrics['test_loss']:.3f}" if "test_loss" in metrics else "-", "test loss"),
    ])
    nav = "".join(f'<a href="#{key}">{_e(title)}</a>' for key, title in SECTIONS)
    body = {
        "summary": (f'<div class="cards">{cards}</div>'
                    + "".join(f'<p class="note">{n}</p>' for n in notes)
                    + f"<p>Evaluated checkpoint: <code>{_e(metrics.get('checkpoint', '?'))}</code> "
                      f"(epoch {_e(metrics.get('epoch', '?'))}).</p>" + _origin(run_dir)),
        "curves": ('<div class="curves">'
                   + "".join(f'<figure><img src="{_data_uri(png)}" alt="{_e(title)} per epoch"></figure>'
                             for title, png in training_curve_pngs(history))
                   + "</div><p class=\"caption\">Per epoch, from metrics.jsonl: train and validation loss "
                   "and accuracy, validation balanced accuracy, the learning rate at the start of the epoch, "
                   "and the mean total gradient norm.</p>"),
        "per-class": _per_class_table(metrics),
        "confusion": (_figure(eval_dir / "confusion_matrix.png", "confusion matrix",
                              "Rows are true classes, columns predicted classes; cells count test images."
                              + ("" if len(metrics["classes"]) <= ANNOTATED_CLASSES else
                                 f" With {len(metrics['classes'])} classes the cells carry no numbers and "
                                 "the colour scale is a square root; the list below names the most frequent "
                                 "confusions."),
                              narrow=len(metrics["classes"]) <= ANNOTATED_CLASSES)
                      + _top_confusions(metrics)),
        "misclassified": _figure(eval_dir / "misclassified.png", "misclassified test images",
                                 f"The most confident mistakes among the "
                                 f"{metrics.get('num_misclassified', '?')} misclassified test images."),
        "calibration": _calibration(metrics, eval_dir),
        "config": f"<pre>{_e(config_text)}</pre>",
        "hardware": _hardware(run_dir, history),
    }
    sections = "".join(f'<section id="{key}"><h2>{_e(title)}</h2>{body[key]}</section>'
                       for key, title in SECTIONS)
    generated = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>cifarcnn report: {_e(run_dir.name)}</title><style>{CSS}</style></head><body><main>"
            f"<header><h1>{_e(metrics.get('dataset', 'CIFAR-10'))} run {_e(run_dir.name)}</h1>"
            f"<p>{_e(run_dir)} &middot; report generated {_e(generated)}</p><nav>{nav}</nav></header>"
            f"{sections}</main></body></html>\n")


def _current_split(run_dir: Path, metrics: dict, evaluate_if_missing: bool, data_dir: str | Path | None,
                   device: str | None) -> dict:
    """For a folder dataset whose checkpoint records its split: how many images changed sides since training,
    as the dataset is now. Test results measured on another split than today's are measured again (or
    refused)."""
    checkpoint_path = run_dir / "best.pt"
    if not checkpoint_path.exists():
        return metrics
    checkpoint = load_checkpoint(checkpoint_path)
    if (checkpoint.get("split") or {}).get("scheme") != SCHEME:
        return metrics
    change = compare_split(checkpoint["split"], dataset_of_checkpoint(checkpoint, data_dir))
    print(change.describe())
    measured = (metrics.get("split") or {}).get("test_digest")  # the test images (paths, pixels) it counted
    if measured == change.test_digest:
        return metrics
    saved = run_dir / "eval"
    why = (f"the test images (their files or pixels) changed since {saved} was measured" if measured
           else f"{saved} does not record which test images it measured (an earlier cifarcnn wrote it)")
    if not evaluate_if_missing:
        raise UserError(f"{run_dir}: {why}: run `cifarcnn evaluate {run_dir}` again, then report")
    print(f"{why}; evaluating again")
    evaluate(run_dir, data_dir=data_dir, device=device)
    return load_test_metrics(run_dir, evaluate_if_missing=False, data_dir=data_dir, device=device)


def report(run: str | Path, output: str | Path | None = None, *, data_dir: str | Path | None = None,
           device: str | None = None, evaluate_if_missing: bool = True) -> Path:
    """The `report` command: write RUN/report.html (or `output`) and return its path."""
    run_dir = Path(run)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: not a run folder (pass the folder `cifarcnn train` wrote, e.g. "
                         f"runs/NAME)")
    if not (run_dir / "metrics.jsonl").exists():
        raise UsageError(f"{run_dir}: not a run folder (no metrics.jsonl); pass the folder `cifarcnn train` "
                         f"wrote")
    output = Path(output) if output else run_dir / "report.html"
    if not output.parent.is_dir():
        raise UsageError(f"--out {output}: folder {output.parent} does not exist")
    history = read_history(run_dir)
    metrics = load_test_metrics(run_dir, evaluate_if_missing=evaluate_if_missing, data_dir=data_dir,
                                device=device)
    metrics = _current_split(run_dir, metrics, evaluate_if_missing, data_dir, device)
    config_path = run_dir / "config.yaml"
    config_text = (config_path.read_text() if config_path.exists()
                   else "(config.yaml missing from the run folder)")
    atomic_write_text(output, build_html(run_dir, history, metrics, config_text))
    print(f"wrote {output}")
    return output

"""The audit's page, `audit.html`: the class counts and, per kind of issue, a thumbnail of each flagged image
with its name, given and suggested class and score; copies are shown beside the images they copy.
Self-contained (thumbnails inline as PNG data URIs); at most MAX_SHOWN images per section (audit.csv lists
them all)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import torch
from PIL import Image

from ..base.storage import atomic_write_text
from .findings import ISSUES, Audit, Finding

MAX_SHOWN = 200
THUMB = 64  # CSS pixels: small images are scaled up without smoothing

STYLE = """
body { font-family: system-ui, sans-serif; margin: 0; background: #f6f7f9; color: #222; }
main { max-width: 1100px; margin: auto; padding: 16px; }
section { background: #fff; border-radius: 8px; padding: 16px; margin-bottom: 16px; }
table { border-collapse: collapse; } td, th { padding: 2px 12px; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; width: 140px; font-size: 12px; overflow-wrap: anywhere; }
figure img { width: 64px; height: 64px; image-rendering: pixelated; display: block; }
.group { display: flex; gap: 4px; border: 1px solid #ddd; border-radius: 6px; padding: 4px; }
.group figure { width: 100px; }
.note { color: #8a4b00; }
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def thumbnail(image: torch.Tensor) -> str:
    """A uint8 (3, S, S) image as a PNG data URI, at most THUMB pixels a side."""
    picture = Image.fromarray(image.permute(1, 2, 0).numpy())
    if picture.width > THUMB:
        picture = picture.resize((THUMB, THUMB), Image.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(image: torch.Tensor | None, f: Finding) -> str:
    img = (f'<img src="{thumbnail(image)}" alt="{_e(f.path)}">' if image is not None
           else "<div>(no image)</div>")
    suggested = f" &rarr; {_e(f.suggested)}" if f.suggested and f.suggested != f.given else ""
    return (f'<figure class="finding" data-issue="{_e(f.issue)}">{img}<figcaption><b>{_e(f.given)}'
            f'</b>{suggested}<br>{_e(f.path)}<br>score {f.score:.3f}</figcaption></figure>')


def _section(result: Audit, issue: str, title: str, names: list[str], images: torch.Tensor) -> str:
    found = [f for f in result.findings if f.issue == issue]
    if not found:
        return f'<section id="{issue}"><h2>{_e(title)}: none</h2></section>'
    groups = {i: g for g in result.groups for i in g}
    parts = []
    for f in found[:MAX_SHOWN]:
        image = images[f.index] if f.index >= 0 else None
        if f.index in groups and issue not in ("label_issue", "outlier"):
            copies = "".join(_copy(images[j], names[j], result.classes, result.labels[j])
                             for j in groups[f.index] if j != f.index)
            parts.append(f'<div class="group">{_figure(image, f)}{copies}</div>')
        else:
            parts.append(_figure(image, f))
    more = (f'<p class="note">showing {MAX_SHOWN} of {len(found)}; audit.csv lists them all</p>'
            if len(found) > MAX_SHOWN else "")
    return (f'<section id="{issue}"><h2>{_e(title)}: {len(found)}</h2>{more}<div class="grid">'
            f'{"".join(parts)}</div></section>')


def _copy(image: torch.Tensor, name: str, classes: list[str], label: int) -> str:
    return (f'<figure class="copy"><img src="{thumbnail(image)}" alt="{_e(name)}"><figcaption>copy: '
            f'<b>{_e(classes[label])}</b><br>{_e(name)}</figcaption></figure>')


def build_page(result: Audit, names: list[str], images: torch.Tensor) -> str:
    rows = "".join(f"<tr><td>{_e(c)}</td><td>{result.counts['train'][i]}</td><td>{result.counts['test'][i]}"
                   f"</td></tr>" for i, c in enumerate(result.classes))
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in result.notes)
    summary = "".join(f"<tr><td>{_e(text)}</td><td>{result.shown_count(issue)}</td></tr>"
                      for issue, text in ISSUES.items())
    sections = "".join(_section(result, issue, text, names, images) for issue, text in ISSUES.items())
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport "
            f"content='width=device-width, initial-scale=1'><title>audit of {_e(result.name)}</title>"
            f"<style>{STYLE}</style></head><body><main><h1>Audit of {_e(result.name)}</h1>"
            f"<section id=summary><h2>Summary</h2>{notes}<table>{summary}</table></section>"
            f"<section id=counts><h2>Images per class</h2><table><tr><th>class</th><th>train</th>"
            f"<th>test</th></tr>{rows}</table><p>imbalance (largest / smallest training class): "
            f"{result.imbalance:.1f}:1</p></section>{sections}</main></body></html>")


def write_page(path: Path, result: Audit, names: list[str], images: torch.Tensor) -> None:
    atomic_write_text(path, build_page(result, names, images))

"""Fine-tuning: a new run whose model starts from a trained model's weights (`init_from`), then trains every
layer (`finetune: all`) or only the classifier (`finetune: head`, a linear probe: the rest frozen, BatchNorm
statistics included).

Every tensor whose name and shape match is copied, the data-initialized layers (FastNet's whitening) included;
the classifier starts new when the classes differ (their number or their names). Inputs are normalized with
the source model's mean and std (NORMALIZATION; measured against the new dataset's own in
benchmarks/finetune_protocol.py, docs/finetune.md): the loaded layers keep seeing inputs scaled as in
training.

The run's split record keeps the pixel identities of the images the source model (and the models it started
from) trained on, `source_train`: the split check counts a test image the source trained on as one the model
trained on (another split of the same folder would otherwise test the model on its source's training images).
A source trained on CIFAR-10 records no pixels, so nothing is recorded for it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..base.config import Config
from ..base.errors import ConfigError, UserError
from ..data.dataset import Dataset
from ..data.sources import checkpoint_dataset
from ..data.splits import SCHEME
from ..models.contract import ClassifierHead
from .checkpoint import load_checkpoint, resolve_checkpoint

NORMALIZATION = "source"  # "source": the source model's mean and std; "target": the new dataset's own


@dataclass
class Source:
    """The checkpoint a fine-tuning run starts from."""

    path: Path
    checkpoint: dict

    @property
    def digest(self) -> str:
        return weights_digest(self.checkpoint["model_state"])


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_source(cfg: Config) -> Source:
    """The checkpoint `init_from` names, checked against the config's model; a mistake is a ConfigError."""
    try:
        path = resolve_checkpoint(cfg.init_from)
        checkpoint = load_checkpoint(path)
    except UserError as e:
        raise ConfigError(f"config key 'init_from': {e}") from None
    if checkpoint["model"] != cfg.model:
        raise ConfigError(f"config key 'init_from': the checkpoint {path} holds a {checkpoint['model']}, the "
                          f"config asks for {cfg.model}: set model={checkpoint['model']}")
    return Source(path.resolve(), checkpoint)


def check_size(source: Source, data: Dataset, cfg: Config) -> None:
    """The source model's image size must be the dataset's."""
    theirs, ours = checkpoint_dataset(source.checkpoint)["image_size"], data.image_size
    if theirs == ours:
        return
    fix = (f"set data.image_size={theirs}" if cfg.data.dataset == "folder"
           else f"{data.name} images are {ours}x{ours}: start from a model trained at that size")
    raise ConfigError(f"config key 'init_from': the checkpoint {source.path} was trained on "
                      f"{theirs}x{theirs} images, the dataset gives {ours}x{ours}: {fix}")


def normalized_like(data: Dataset, checkpoint: dict, resumed: bool) -> Dataset:
    """`data` with the mean and std a fine-tuning run uses: the source model's (`checkpoint`), unless
    NORMALIZATION says the dataset's own; on resume (`checkpoint` is the run's own) those it recorded."""
    if not resumed and NORMALIZATION != "source":
        return data
    info = checkpoint_dataset(checkpoint)
    return dataclasses.replace(data, mean=tuple(info["mean"]), std=tuple(info["std"]))


def head_names(model: nn.Module) -> set[str]:
    """The parameter names of the model's classifier (its ClassifierHead)."""
    return {f"{prefix}.{name}" if prefix else name for prefix, module in model.named_modules()
            if isinstance(module, ClassifierHead) for name, _ in module.named_parameters(recurse=False)}


@torch.no_grad()
def load_matching(model: nn.Module, state: dict[str, torch.Tensor], new_head: bool
                  ) -> tuple[list[str], list[str]]:
    """Copy every tensor of `state` whose name and shape match the model's (the classifier's only when not
    `new_head`); returns the names (loaded, left as initialized)."""
    head, loaded, new = head_names(model), [], []
    for name, tensor in model.state_dict().items():
        value = state.get(name)
        if value is None or value.shape != tensor.shape or (new_head and name in head):
            new.append(name)
            continue
        tensor.copy_(value)
        loaded.append(name)
    return loaded, new


def start_from(model: nn.Module, source: Source, classes: list[str], cfg: Config, announce: bool = True
               ) -> dict:
    """Load the source weights into `model`, say what was loaded in one line, and return what the checkpoint
    records: the source's path and weights digest, the fine-tuning mode, and the tensors loaded and made new.
    """
    theirs = list(source.checkpoint["classes"])
    new_head = theirs != list(classes)
    loaded, new = load_matching(model, source.checkpoint["model_state"], new_head)
    why = ""
    if new_head:
        why = (f" ({len(theirs)} classes there, {len(classes)} here)" if len(theirs) != len(classes)
               else " (the class names differ)")
    norm = "its" if NORMALIZATION == "source" else "the dataset's"
    if announce:  # once under torchrun: rank 0
        print(f"init_from {source.path}: loaded {len(loaded)} of {len(loaded) + len(new)} tensors; new: "
              f"{', '.join(new) or 'none'}{why}; finetune: {cfg.finetune}; inputs normalized with "
              f"{norm} mean and std")
    return {"path": str(source.path), "sha256": source.digest, "finetune": cfg.finetune,
            "loaded": len(loaded), "new": new}


def freeze_body(model: nn.Module) -> None:
    """`finetune: head`: no gradient, hence no update, weight decay or optimizer state, for any parameter but
    the classifier's."""
    head = head_names(model)
    for name, p in model.named_parameters():
        if name not in head:
            p.requires_grad_(False)


def train_mode(model: nn.Module, cfg: Config) -> None:
    """The model in training mode, except under `finetune: head`, where BatchNorm layers stay in eval mode:
    they normalize with the loaded statistics and do not update them."""
    model.train()
    if cfg.init_from and cfg.finetune == "head":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def with_source_images(split: dict, checkpoint: dict, resumed: bool) -> dict:
    """This run's `split` record with `source_train`: the pixel identities of every image the source model
    (`checkpoint`) trained on, the ones its own source recorded included, with its folder and split_seed; on
    resume (`checkpoint` is the run's own) the ones it recorded. Unchanged when the source recorded none."""
    if resumed:
        source = (checkpoint.get("split") or {}).get("source_train")
        return {**split, "source_train": source} if source else split
    theirs = checkpoint.get("split") or {}
    parts = [s["pixels"] for s in (theirs.get("train"), theirs.get("source_train")) if s and "pixels" in s]
    if theirs.get("scheme") != SCHEME or not parts:
        return split
    pixels = torch.unique(torch.cat(parts))
    data = checkpoint["config"]["data"]
    return {**split, "source_train": {
        "count": len(pixels), "digest": hashlib.sha256(pixels.numpy().tobytes()).hexdigest()[:16],
        "pixels": pixels, "path": data.get("path"), "split_seed": data.get("split_seed")}}


def source_overlap(split: dict, cfg: Config) -> str | None:
    """A warning when the source model trained on images of this run's validation or test side (the same
    pictures, by pixels), with the fix when it was trained on this folder with another split_seed; or None."""
    source = split.get("source_train")
    if not source or split.get("scheme") != SCHEME:
        return None
    theirs = source["pixels"].numpy()
    val, test = (int(np.isin(split[side]["pixels"].numpy(), theirs).sum()) for side in ("val", "test"))
    if not val and not test:
        return None
    same_folder = source["path"] == cfg.data.path and source["split_seed"] != cfg.data.split_seed
    fix = (f"; the source was trained on this folder with data.split_seed={source['split_seed']}: train with "
           f"data.split_seed={source['split_seed']} to keep its split") if same_folder else ""
    vals = f" and {val} of the {split['val']['count']} validation images" if split["val"]["count"] else ""
    counted = "validation accuracy counts them; " if val else ""
    return (f"init_from: WARNING: the source model trained on {test} of the {split['test']['count']} test "
            f"images{vals} (the same pictures): {counted}evaluate and predict leave the test ones out" + fix)

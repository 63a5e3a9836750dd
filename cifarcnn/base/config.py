"""Typed configuration: dataclasses, YAML files, the packaged presets and `key=value` overrides, validated in
one place."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, UsageError
from .storage import atomic_write_text

CIFAR_TRAIN_SIZE = 50_000  # CIFAR-10 and CIFAR-100 alike
DATASETS = ("cifar10", "cifar100", "folder")
PRECISIONS = ("auto", "fp32", "bf16")
MONITORS = ("auto", "accuracy", "balanced_accuracy")  # auto: balanced_accuracy when training is imbalanced
BALANCE = ("auto", "none", "weighted_loss", "sampling", "logit_adjust")  # training/balance.py: what each does


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
           choices: tuple[str, ...] | None = None, special: str | None = None) -> dict:
    return {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "choices": choices,
            "special": special}


def _field(default: Any, **limits: Any) -> Any:
    return field(default=default, metadata=_range(**limits))


@dataclass
class DataConfig:
    dataset: str = _field(
        "cifar10", choices=DATASETS)  # cifar10, cifar100, or a folder of your own images (path)
    path: str | None = None  # the folder of a folder dataset (DIR/train/<class>/..., DIR/test/<class>/...)
    labels: str = _field("fine", choices=("fine", "coarse"))  # cifar100: 100 fine classes or 20 superclasses
    image_size: int = _field(32, lo=16, hi=512)  # folder datasets: side of the square images decoded
    test_fraction: float = _field(
        0.2, lo=0, hi=1, lo_open=True, hi_open=True)  # folder without test/: held out
    val_size: int | float | str = _field("auto", special="val_size")  # auto: a tenth (CIFAR 5,000); 0: none
    split_seed: int = _field(
        0, lo=0)  # keys the validation split (and a folder's test split): change it to draw again
    balance: str = _field(
        "auto", choices=BALANCE)  # imbalanced classes; auto: logit adjustment above 3:1, else none
    exclude: str | None = None  # a file of images to leave out: paths one a line, or an audit.csv


@dataclass
class AugmentConfig:
    flip: str = _field(
        "random", choices=("random", "alternate", "none"))  # mirror left-right; none for digits, text
    crop_padding: int = _field(4, lo=0, hi=16)  # random crops of the image padded by this many pixels; 0: off
    padding_mode: str = _field("zeros", choices=("zeros", "reflect"))  # what the crop padding holds
    brightness: float = _field(0.2, lo=0, hi=1)  # each image scaled by a factor in [1 - b, 1 + b]; 0: off
    contrast: float = _field(
        0.2, lo=0, hi=1)  # each image pulled to or from its mean by [1 - c, 1 + c]; 0: off
    cutout: int = _field(0, lo=0, hi=32)  # side of the square set to the mean colour, one per image; 0: off


@dataclass
class OptimizerConfig:
    name: str = _field(
        "adam", choices=("adam", "adamw", "sgd", "muon"))  # sgd, muon use momentum and nesterov
    lr: float = _field(1e-3, lo=0, lo_open=True)  # the peak learning rate the scheduler starts from
    weight_decay: float = _field(
        1e-4, lo=0)  # L2 for adam and sgd (added to the gradient), decoupled for adamw
    momentum: float = _field(0.9, lo=0, hi=1, hi_open=True)  # sgd and muon only
    nesterov: bool = False  # sgd and muon only
    bias_lr_scale: float = _field(
        1.0, lo=0, lo_open=True)  # BatchNorm's (muon: every 1-D parameter): lr x this, decay / this
    muon_lr: float = _field(
        0.05, lo=0, lo_open=True)  # muon only: conv filters' peak rate (no decay: fixed norm)
    muon_momentum: float = _field(0.6, lo=0, hi=1, hi_open=True)  # muon only: conv filters' momentum
    lookahead_steps: int = _field(0, lo=0)  # every N steps pull the weights to their running average; 0: off


@dataclass
class SchedulerConfig:
    name: str = _field("cosine", choices=("cosine", "linear", "constant"))  # how lr falls to min_lr
    epochs: int | None = _field(None, lo=1)  # decay length in epochs; None: the training epochs
    min_lr: float = _field(0.0, lo=0)  # the rate at the end of the decay
    warmup_epochs: float = _field(0.0, lo=0)  # linear warm-up from warmup_factor x lr to lr
    warmup_factor: float = _field(0.0, lo=0, hi=1)  # the warm-up starts at this fraction of lr


@dataclass
class Config:
    model: str = "simple_cnn"  # the architecture, by its name in the model registry (cifarcnn check shows it)
    seed: int = _field(0, lo=0)  # weights, batch order and augmentation: the same seed gives the same run
    epochs: int = _field(50, lo=1)  # passes over the training images (early stopping may end the run sooner)
    min_steps: int = _field(
        0, lo=0)  # step budget: fewer steps raise epochs (presets: CIFAR's steps); epochs=N sets 0
    batch_size: int = _field(128, lo=1)  # images per optimizer step (the global batch under torchrun)
    eval_batch_size: int = _field(1000, lo=1)  # images per forward pass in validation and test (memory only)
    patience: int = _field(10, lo=0)  # early stopping on the monitored validation metric; 0 switches it off
    monitor: str = _field(
        "auto", choices=MONITORS)  # what best.pt and early stopping follow; auto: balanced_accuracy above 3:1
    log_every: int = _field(10, lo=1)  # batches between progress-bar refreshes and per-step loss logs
    label_smoothing: float = _field(
        0.0, lo=0, hi=1, hi_open=True)  # share of the target spread over all classes
    tta: int = _field(
        0, lo=0, hi=2)  # test-time augmentation for validation and test: 0 none, 1 flip, 2 flip+shift
    calibrate: bool = True  # fit a temperature on the validation split after training (calibration)
    compile: bool = False  # torch.compile the model (warm-up is done before training starts)
    precision: str = _field("auto", choices=PRECISIONS)  # auto: bf16 on CUDA and bf16 CPUs, else fp32
    ema_decay: float = _field(
        0.0, lo=0, hi=1, hi_open=True)  # > 0: validate, test and save a weight average (EMA)
    checkpoint_every_steps: int = _field(
        0, lo=0)  # also save last.pt every N optimizer steps mid-epoch; 0: off
    sync_batchnorm: bool = False  # under torchrun on GPUs: BatchNorm statistics over the global batch
    init_from: str | None = field(
        default=None)  # start from a trained model: a run folder (its best.pt) or a checkpoint file
    finetune: str = _field(
        "all", choices=("all", "head"))  # with init_from: train every layer, or the classifier only
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    name = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(base, str(base))
    return name + (" or null" if type(None) in typing.get_args(tp) else "")


def _val_size(key: str, value: Any) -> int | float | str:
    """data.val_size: "auto", a whole number of images >= 0, or a fraction strictly between 0 and 1."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    if isinstance(value, float) and 0 < value < 1:
        return value
    raise ConfigError(f"config key '{key}' must be auto (a tenth of the training images), a number of images "
                      f">= 0 or a fraction between 0 and 1, got {value!r}")


def _coerce(key: str, value: Any, tp: Any, limits: dict) -> Any:
    if limits.get("special") == "val_size":
        return _val_size(key, value)
    optional = isinstance(tp, types.UnionType) and type(None) in typing.get_args(tp)
    base = next(a for a in typing.get_args(tp) if a is not type(None)) if optional else tp
    if value is None and optional:
        return None
    ok = False
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif base is str:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if limits.get("choices") and value not in limits["choices"]:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(limits['choices'])}; got {value!r}")
    lo, hi = limits.get("lo"), limits.get("hi")
    too_low = lo is not None and (value <= lo if limits["lo_open"] else value < lo)
    too_high = hi is not None and (value >= hi if limits["hi_open"] else value > hi)
    if too_low or too_high:
        parts = []
        if lo is not None:
            parts.append(f"{'>' if limits['lo_open'] else '>='} {lo}")
        if hi is not None:
            parts.append(f"{'<' if limits['hi_open'] else '<='} {hi}")
        raise ConfigError(f"config key '{key}' must be {' and '.join(parts)}, got {value!r}")
    return value


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, "
                          f"got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        known = ", ".join(prefix + name for name in fields)
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (known keys: {known})")
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, value, tp, dict(fields[name].metadata))
    return cls(**kwargs)


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings to a nested dict (values parsed as YAML scalars)."""
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. epochs=2 or "
                              f"optimizer.lr=0.01)")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        *parents, leaf = key.split(".")
        node = values
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"unknown config key '{key}': '{'.'.join(parents[:i + 1])}' is not a "
                                  f"section")
            node[part] = child = dict(child)
            node = child
        node[leaf] = value
    return values


def parse_yaml(text: str, source: str) -> dict:
    """The mapping in YAML `text`; `source` (e.g. "config file x.yaml") names it in errors."""
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {str(e).splitlines()[0]}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{source} must hold a mapping of keys to values")
    return values


def read_yaml(path: Path) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    return parse_yaml(text, f"config file {path}")


def _preset_files() -> dict[str, Any]:
    """Preset name -> its packaged YAML resource (cifarcnn/presets/NAME.yaml)."""
    folder = resources.files("cifarcnn") / "presets"
    if not folder.is_dir():
        return {}
    return {item.name.removesuffix(".yaml"): item for item in folder.iterdir() if item.name.endswith(".yaml")}


def preset_names() -> list[str]:
    """The packaged presets, sorted by name."""
    return sorted(_preset_files())


def preset_text(name: str) -> str:
    """The YAML text of a packaged preset; an unknown name is a UsageError listing the presets."""
    files = _preset_files()
    if name not in files:
        raise UsageError(f"no preset named {name!r}; presets: {', '.join(sorted(files)) or 'none installed'}")
    return files[name].read_text(encoding="utf-8")


def preset_description(name: str) -> str:
    """A preset's one-line description: its first line, `# NAME: description`."""
    first = (preset_text(name).splitlines() or [""])[0]
    if not first.startswith("#"):
        return ""
    description = first.lstrip("#").strip()
    return description.removeprefix(f"{name}:").strip()


def load_preset(name: str, overrides: list[str] = ()) -> Config:
    """A packaged preset (e.g. "seed", "fast") with overrides applied."""
    return make_config(parse_yaml(preset_text(name), f"preset {name}"), overrides)


def make_config(values: dict | None = None, overrides: list[str] = ()) -> Config:
    """Build a validated Config from a (possibly partial) nested dict plus overrides."""
    from ..models.registry import MODELS

    overrides = list(overrides)
    named = {item.partition("=")[0] for item in overrides}
    if "epochs" in named and "min_steps" not in named:  # epochs set by hand are trained as set
        overrides.append("min_steps=0")
    cfg = _build(Config, apply_overrides(values or {}, overrides))
    if cfg.model not in MODELS:
        raise ConfigError(f"config key 'model' must be one of {', '.join(sorted(MODELS))}; got {cfg.model!r}")
    _check_data(cfg.data)
    if cfg.finetune == "head" and not cfg.init_from:
        raise ConfigError("config key 'finetune' is head, which trains only the classifier of a model loaded "
                          "with init_from: set init_from=RUN_DIR (or a .pt file), or finetune=all")
    return cfg


def data_config(values: dict) -> DataConfig:
    """The `data` section of a config (e.g. a checkpoint's), validated."""
    data = _build(DataConfig, values, "data.")
    _check_data(data)
    return data


def _check_data(data: DataConfig) -> None:
    """The data keys that depend on each other: a folder needs its path, the CIFAR sets have fixed sizes."""
    if data.dataset == "folder":
        if not data.path:
            raise ConfigError("config key 'data.path' is required with data.dataset=folder: the folder "
                              "holding train/<class>/ (and optionally test/<class>/), e.g. "
                              "data.path=~/pictures")
        return
    name = "CIFAR-10" if data.dataset == "cifar10" else "CIFAR-100"
    if isinstance(data.val_size, int) and data.val_size >= CIFAR_TRAIN_SIZE:
        raise ConfigError(f"config key 'data.val_size' must be < {CIFAR_TRAIN_SIZE} ({name} has "
                          f"{CIFAR_TRAIN_SIZE:,} training images), got {data.val_size}")
    if data.image_size != 32:
        raise ConfigError(f"config key 'data.image_size' is {data.image_size}, but {name} images are 32x32; "
                          f"it applies to data.dataset=folder only")
    if data.labels != "fine" and data.dataset != "cifar100":
        raise ConfigError(f"config key 'data.labels' applies to data.dataset=cifar100 only (got "
                          f"data.labels={data.labels} with data.dataset={data.dataset})")


def load_config(path: Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config file (or the built-in defaults when `path` is None) and apply overrides."""
    return make_config(read_yaml(path) if path is not None else {}, overrides)


def flat_keys(values: dict, prefix: str = "") -> dict:
    """A nested config dict (`Config.to_dict()`) as dotted keys -> values, as overrides name them."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def closest_preset(config: dict) -> tuple[str | None, dict]:
    """The packaged preset a checkpoint's config differs from in the fewest keys, and those keys with the
    checkpoint's values (a checkpoint does not record the preset it was trained from)."""
    mine = flat_keys(config)
    best: tuple[str | None, dict] = (None, mine)
    for name in preset_names():
        theirs = flat_keys(load_preset(name).to_dict())
        changed = {k: v for k, v in mine.items() if k in theirs and theirs[k] != v}
        if best[0] is None or len(changed) < len(best[1]):
            best = (name, changed)
    return best


def save_config(cfg: Config, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

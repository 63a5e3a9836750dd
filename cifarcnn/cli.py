"""Command line: `cifarcnn train | evaluate | calibrate | bench | predict | serve | export | report | audit |
show-batch | check | presets`; config overrides as key=value."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from . import __version__
from .base.config import Config, load_config, load_preset, preset_description, preset_names
from .base.errors import UsageError, UserError
from .training.interrupt import Interrupted

PRESET_HELP = "a packaged recipe (list: cifarcnn presets), e.g. fast; seed is the default recipe"


def config_from_args(args: argparse.Namespace) -> Config:
    """--config FILE, else --preset NAME, else ./config.yaml when the current folder has one, else the seed
    preset."""
    if args.config is not None and args.preset is not None:
        raise UsageError("give either --config or --preset, not both")
    if args.config is not None:
        if not Path(args.config).is_file():
            raise UsageError(f"--config {args.config}: file not found")
        return load_config(args.config, args.overrides)
    if args.preset is not None:
        return load_preset(args.preset, args.overrides)
    if Path("config.yaml").is_file():
        return load_config(Path("config.yaml"), args.overrides)
    return load_preset("seed", args.overrides)


def presets_table() -> str:
    """One line per packaged preset: its name and its one-line description."""
    names = preset_names()
    width = max(map(len, names), default=0)
    return "\n".join(f"{name:<{width}}  {preset_description(name)}" for name in names)


def cmd_presets(args: argparse.Namespace) -> int:
    table = presets_table()
    if not table:
        raise UserError("no presets installed: cifarcnn/presets/*.yaml is missing from the package")
    print(table)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .training.distributed import launched_by_torchrun, restart_count
    from .training.train import default_run_dir, resume_config, train

    resume = bool(args.resume)
    if resume:
        run_dir = Path(args.resume)
        if not (run_dir / "last.pt").exists():
            raise UsageError(f"--resume {run_dir}: no last.pt there; pass the folder of an earlier run")
        cfg = resume_config(run_dir, args.overrides)
    else:
        if launched_by_torchrun() and not args.name:
            raise UsageError("under torchrun, give --name: every process, and an elastic restart, must use "
                             "the same run folder")
        cfg = config_from_args(args)
        run_dir = default_run_dir(args.runs_dir, args.name)
        if restart_count() and (run_dir / "last.pt").exists():  # torchrun restarted the job after a failure
            print(f"torchrun restart {restart_count()}: resuming {run_dir} from its last checkpoint")
            resume, cfg = True, resume_config(run_dir, args.overrides)
    train(cfg, run_dir, data_dir=args.data_dir, device=args.device, resume=resume, test=args.test)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .reports.bench import bench, report

    cfg = config_from_args(args)
    result = bench(cfg, data_dir=args.data_dir, device=args.device, steps=args.steps, warmup=args.warmup,
                   rounds=args.rounds)
    report(result, args.out)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .use.evaluate import evaluate

    evaluate(args.target, data_dir=args.data_dir, device=args.device, out_dir=args.out,
             batch_size=args.batch_size)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .use.calibrate import calibrate

    calibrate(args.target, data_dir=args.data_dir, device=args.device, batch_size=args.batch_size)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .use.runtime import is_onnx, predict_onnx

    if is_onnx(args.target):  # through ONNX Runtime: torch is not imported
        predict = predict_onnx
    else:
        from .use.predict import predict

    return predict(args.target, args.paths, device=args.device, batch_size=args.batch_size, top_k=args.top_k,
                   output=args.output, labels_from_folders=args.labels_from_folders, quiet=args.quiet,
                   workers=args.workers, tta=args.tta)


def cmd_serve(args: argparse.Namespace) -> int:
    from .use.serve import ServeOptions, serve

    options = ServeOptions(host=args.host, port=args.port, max_batch=args.max_batch,
                           max_wait_ms=args.max_wait_ms, token=args.token, max_body_mb=args.max_body_mb,
                           max_uploads=args.max_uploads)
    return serve(args.target, options, device=args.device, tta=args.tta)


def cmd_export(args: argparse.Namespace) -> int:
    from .use.export import export

    export(args.target, args.format, args.output, data_dir=args.data_dir, check=args.check, int8=args.int8)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .reports.report import report

    report(args.run, args.out, data_dir=args.data_dir, device=args.device, evaluate_if_missing=args.evaluate)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from .reports.audit import audit

    if args.data is not None and "=" in args.data and not Path(args.data).exists():
        args.overrides, args.data = [args.data, *args.overrides], None  # an override, not a folder
    if args.data is not None:
        args.overrides = ["data.dataset=folder", f"data.path={args.data}", *args.overrides]
    if args.config is None and args.preset is None:
        args.preset = "quick"
    if args.folds < 2:
        raise UsageError(f"--folds must be at least 2, got {args.folds}")
    audit(config_from_args(args), data_dir=args.data_dir, device=args.device, folds=args.folds,
          out_dir=args.out)
    return 0


def cmd_show_batch(args: argparse.Namespace) -> int:
    from .base.device import select_device
    from .base.plots import save_image_grid
    from .data.dataset import denormalize
    from .data.loader import Loader, training_split
    from .data.sources import load_dataset

    cfg = config_from_args(args)
    device = select_device(args.device)
    data = load_dataset(cfg.data, args.data_dir, device=device)
    (train_x, train_y), _ = training_split(data, cfg.data)
    loader = Loader(train_x, train_y, args.count, device=device, augment=cfg.augment, shuffle=True,
                    seed=cfg.seed, mean=data.mean, std=data.std)
    x, y = next(loader.epoch(0))
    save_image_grid(denormalize(x, data.mean, data.std), [data.classes[i] for i in y.tolist()], args.out,
                    title=f"augmented {data.name} training batch (epoch 1)")
    print(f"wrote {args.out} ({len(y)} augmented training images)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    import torch

    from .data.sources import dataset_shape
    from .models.registry import build_model, count_parameters

    cfg = config_from_args(args)
    num_classes, image_size = dataset_shape(cfg.data)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes, image_size)
    x = torch.randn(4, 3, image_size, image_size)
    out = model(x)
    total, trainable = count_parameters(model)
    print(f"model:      {cfg.model}")
    print(f"dataset:    {cfg.data.dataset}: {num_classes} classes, {image_size}x{image_size} images")
    print(f"input:      {tuple(x.shape)}")
    print(f"output:     {tuple(out.shape)}")
    print(f"parameters: {total:,} total, {trainable:,} trainable")
    out.logsumexp(1).sum().backward()
    no_grad = [name for name, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    if no_grad:
        print(f"no gradient reached {len(no_grad)} parameter(s): {', '.join(no_grad)}")
        return 1
    print("backward:   every trainable parameter received a gradient")
    return 0


def _with_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="CIFAR-10/100 folder (default: $CIFAR10_DIR or $CIFAR100_DIR, else "
                                      "./data); a folder dataset is data.path=DIR")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the fastest available)")


def _config_command(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    """A subcommand that reads a config: KEY=VALUE overrides, --config, --preset, and the presets in its
    help."""
    epilog = (f"presets (--preset NAME):\n{textwrap.indent(presets_table() or '(none installed)', '  ')}\n\n"
              "config: --config FILE, else --preset NAME, else ./config.yaml when the current folder has "
              "one,\nelse the seed preset; KEY=VALUE overrides apply on top")
    p = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. epochs=2 optimizer.lr=0.01")
    p.add_argument("--config", type=Path,
                   help="YAML config file (default: ./config.yaml if present, else seed)")
    p.add_argument("--preset", help=PRESET_HELP)
    return p


def _add_training_commands(sub: argparse._SubParsersAction) -> None:
    p = _config_command(sub, "train", "train a model (the seed recipe unless a config or preset is given)")
    _with_data(p)
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where run folders go (default: runs)")
    p.add_argument("--name", help="run folder name (default: the current date and time)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--test", action="store_true", help="after the last epoch, also measure test accuracy")
    p.set_defaults(func=cmd_train)

    p = _config_command(sub, "bench",
                        "training throughput (full pipeline vs compute only) and evaluation speed")
    _with_data(p)
    p.add_argument("--steps", type=int, default=30, help="timed steps per round (default: 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default: 5)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median counts (default: 3)")
    p.add_argument("--out", type=Path, default=Path("bench.json"), help="JSON results (default: bench.json)")
    p.set_defaults(func=cmd_bench)


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="test accuracy, per-class table and plots for a trained model")
    p.add_argument("target", metavar="RUN_DIR_OR_CHECKPOINT")
    _with_data(p)
    p.add_argument("--out", type=Path, help="output folder (default: eval/ beside the checkpoint)")
    p.add_argument("--batch-size", type=int, default=1000)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("calibrate", help="fit the temperature that calibrates a trained model's "
                                         "probabilities on its validation split; store it in its checkpoints")
    p.add_argument("target", metavar="RUN_DIR_OR_CHECKPOINT")
    _with_data(p)
    p.add_argument("--batch-size", type=int, default=1000)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("predict",
                       help="classify image files (PNG, JPEG, BMP, GIF, WebP) with a trained model")
    p.add_argument("target", metavar="RUN_DIR_CHECKPOINT_OR_ONNX")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="image files, folders (searched recursively) or globs")
    p.add_argument("--top-k", type=int, default=1, help="classes to report per image (default: 1)")
    p.add_argument("--output", type=Path, help="also write one record per file to a .csv or .json file")
    p.add_argument("--labels-from-folders", action="store_true",
                   help="take the true class from folder names (.../<class>/<file>) and report accuracy")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the fastest available)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, help="threads decoding images (default: CPU cores, at most 8)")
    p.add_argument("--tta", type=int, metavar="LEVEL",
                   help="test-time augmentation: 0 none, 1 mirror, 2 mirror + 1-pixel shifts (default: the "
                        "checkpoint's tta, as evaluate uses)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no per-file table, only errors and the summary")
    p.set_defaults(func=cmd_predict)

    _add_serve_command(sub)

    p = sub.add_parser("export",
                       help="export a trained model to ONNX (checked with ONNX Runtime when installed)")
    p.add_argument("target", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--format", default="onnx", choices=("onnx",), help="export format (default: onnx)")
    p.add_argument("--output", type=Path, help="output file (default: the checkpoint's name with .onnx)")
    p.add_argument("--data-dir", help="CIFAR-10/100 folder for the check (default: $CIFAR10_DIR or "
                                      "$CIFAR100_DIR, else ./data)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip comparing ONNX Runtime with PyTorch on the test set")
    p.add_argument("--int8", action="store_true",
                   help="write the int8 model instead (static quantization calibrated on training images; "
                        "refused when it scores over 1 point below the float model on the test images)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="write a self-contained HTML report of a run")
    p.add_argument("run", metavar="RUN_DIR")
    _with_data(p)
    p.add_argument("--out", type=Path, help="output file (default: RUN_DIR/report.html)")
    p.add_argument("--no-evaluate", dest="evaluate", action="store_false",
                   help="fail instead of evaluating a run that has no eval/test_metrics.json")
    p.set_defaults(func=cmd_report)

    _add_audit_command(sub)


def _add_audit_command(sub: argparse._SubParsersAction) -> None:
    text = ("find what is wrong with a dataset: class counts, unreadable files, duplicates, likely wrong "
            "labels and outliers (wrong labels and outliers need the audit extra: pip install "
            "'cifarcnn[audit]')")
    p = sub.add_parser("audit", help=text, description=text)
    p.add_argument("data", nargs="?", metavar="DATA",
                   help="an image folder (DIR/train/<class>/..., optionally DIR/test/<class>/...); without "
                        "it, the dataset the config names (CIFAR-10 by default, with --data-dir)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides for the cross-validated models, e.g. epochs=3")
    p.add_argument("--config", type=Path, help="YAML config of the cross-validated models")
    p.add_argument("--preset", help="the recipe the cross-validated models train with (default: quick)")
    _with_data(p)
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default: 5)")
    p.add_argument("--out", type=Path, default=Path("audit"),
                   help="output folder for audit.csv and audit.html (default: ./audit)")
    p.set_defaults(func=cmd_audit)


def _add_serve_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a trained model over HTTP: a JSON API (/v1/predict) and a page "
                                     "at / (needs the serve extra: pip install 'cifarcnn[serve]')")
    p.add_argument("target", metavar="RUN_DIR_CHECKPOINT_OR_ONNX")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1; any other needs a token)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--max-batch", type=int, default=64,
                   help="most images in one forward pass, gathered from concurrent requests (default: 64)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="longest an image waits for others to join its batch, in ms (default: 5)")
    p.add_argument("--token", help="require 'Authorization: Bearer TOKEN' on /v1 requests (default: "
                                   "$CIFARCNN_TOKEN); required on an address other than loopback")
    p.add_argument("--max-body-mb", type=float, default=20.0,
                   help="largest request body in MB; a larger one gets 413 (default: 20)")
    p.add_argument("--max-uploads", type=int, default=32,
                   help="most request bodies in progress at once; more get 503 (default: 32)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the fastest available)")
    p.add_argument("--tta", type=int, metavar="LEVEL",
                   help="test-time augmentation: 0 none, 1 mirror, 2 mirror + 1-pixel shifts (default: the "
                        "checkpoint's tta, as predict and evaluate use)")
    p.set_defaults(func=cmd_serve)


def _add_inspection_commands(sub: argparse._SubParsersAction) -> None:
    p = _config_command(sub, "show-batch", "write a PNG grid of augmented training images")
    _with_data(p)
    p.add_argument("--out", type=Path, default=Path("batch.png"))
    p.add_argument("--count", type=int, default=64, help="number of images (default: 64)")
    p.set_defaults(func=cmd_show_batch)

    p = _config_command(sub, "check", "shapes, parameter counts and gradient flow of the configured model")
    p.set_defaults(func=cmd_check)


def build_parser() -> argparse.ArgumentParser:
    """The `cifarcnn` argument parser: --version and every subcommand."""
    parser = argparse.ArgumentParser(
        prog="cifarcnn", description="Train, evaluate and inspect CNN image classifiers on CIFAR-10, "
                                     "CIFAR-100 or your own image folders.")
    parser.add_argument("--version", action="version", version=f"cifarcnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_training_commands(sub)
    _add_model_commands(sub)
    _add_inspection_commands(sub)
    p = sub.add_parser("presets", help="list the packaged presets (--preset NAME) with their descriptions")
    p.set_defaults(func=cmd_presets)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line. KEY=VALUE overrides may stand anywhere among the options (argparse alone takes
    them only in one run); they keep the order they were typed in, so a later one wins."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):
        late = [a for a in extra if "=" in a and not a.startswith("-")]
        args.overrides = [*args.overrides, *late]
        extra = [a for a in extra if a not in late]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _own_process_memory(args: argparse.Namespace) -> None:
    """The commands that run a model (those with --device) own this process: on a CPU, malloc keeps freed
    memory for reuse (`base.device.keep_freed_memory`; CIFARCNN_KEEP_FREED_MEMORY=0 turns it off)."""
    from .use.runtime import is_onnx

    if hasattr(args, "device") and not is_onnx(getattr(args, "target", "")):  # ONNX Runtime: no torch
        from .base.device import keep_freed_memory, select_device

        keep_freed_memory(select_device(args.device))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for option in ("batch_size", "count", "steps", "rounds", "workers"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            print(f"error: --{option.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    try:
        _own_process_memory(args)
        return args.func(args)
    except Interrupted as e:
        print(e, file=sys.stderr)
        return e.exit_code
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

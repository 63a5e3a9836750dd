"""`finetune: head` leaves the frozen body as the source model had it, BatchNorm running statistics included,
on the device given: on one CUDA GPU the step is a replayed CUDA graph, which must have been captured with
BatchNorm in eval mode (issue 27, point 5). Exit code 1, naming the tensors, when any moved.

    python benchmarks/finetune_head_check.py [--preset quick] [--data-dir DIR] [--device cuda] [KEY=VALUE ...]

Trains a source model for one epoch, then its classifier alone for one epoch on the same data (`init_from`,
`finetune=head`), and compares every tensor of the fine-tuned checkpoint (the trained weights and the weight
average) with the source's; the head must have moved (a check of an untrained head would prove nothing).
"""

from __future__ import annotations

import contextlib
import io
import sys

import torch
from recipe_args import recipe_parser

from cifarcnn.base.config import load_preset
from cifarcnn.base.storage import atomic_write_json
from cifarcnn.models.registry import build_model
from cifarcnn.training.checkpoint import load_checkpoint
from cifarcnn.training.finetune import head_names
from cifarcnn.training.train import train


def main() -> int:
    parser = recipe_parser(__doc__, "cifarcnn-finetune-check-", "finetune_head.json")
    parser.set_defaults(preset="quick")
    args = parser.parse_args()
    common = ["data.val_size=0", "epochs=1", *args.overrides]
    source_dir, probe_dir = args.runs_dir / "source", args.runs_dir / "probe"
    train(load_preset(args.preset, common), source_dir, data_dir=args.data_dir, device=args.device)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train(load_preset(args.preset, [*common, f"init_from={source_dir}", "finetune=head"]), probe_dir,
              data_dir=args.data_dir, device=args.device)
    print(printed.getvalue(), end="")
    source = load_checkpoint(source_dir / "best.pt")["model_state"]
    probe = load_checkpoint(probe_dir / "last.pt")
    head = head_names(build_model(probe["model"], probe["num_classes"]))
    body = [name for name in source if name not in head]
    states = [probe[key] for key in ("model_state", "train_model_state") if probe.get(key)]
    moved = sorted({name for state in states for name in body if not torch.equal(state[name], source[name])})
    head_change = min(max(float((state[n] - source[n]).abs().max()) for n in head) for state in states)
    graphs = "CUDA graph capture" in printed.getvalue() and "capture failed" not in printed.getvalue()
    result = {"device": str(args.device), "cuda_graphs": graphs, "body_tensors": len(body),
              "batchnorm_buffers": sum(n.endswith(("running_mean", "running_var", "num_batches_tracked"))
                                       for n in body), "moved": moved, "head_change": head_change}
    atomic_write_json(args.out, result)
    if moved or not head_change:
        print(f"finetune head: FAILED: {len(moved)} of the {len(body)} frozen tensors MOVED "
              f"({', '.join(moved)}); the head by up to {head_change:.3g}")
        return 1
    print(f"finetune head: none of the {len(body)} frozen tensors moved ({result['batchnorm_buffers']} "
          f"BatchNorm buffers among them), the head by up to {head_change:.3g}; "
          f"CUDA graphs: {'yes' if graphs else 'no'}")
    return 0

if __name__ == "__main__":
    sys.exit(main())

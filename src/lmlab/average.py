"""``lmlab-average``: average the weights of several checkpoints of one run into a new checkpoint.

    lmlab-average logs/mt/runs/.../checkpoints/step_*.ckpt --out averaged.ckpt
    lmlab-translate ckpt_path=averaged.ckpt input=test.de

Keep several checkpoints with ``callbacks.model_checkpoint.save_top_k=5``. The output is a regular
lmlab checkpoint (evaluate it with ``lmlab-eval``); it is not meant for resuming training.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lmlab.checkpoint import average_checkpoints
from lmlab.runtime import user_errors


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="lmlab-average", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoints", nargs="+", help="checkpoint files of one run")
    parser.add_argument("--out", required=True, help="where to write the averaged checkpoint")
    args = parser.parse_args()
    out = Path(args.out)
    with user_errors():
        averaged = average_checkpoints(args.checkpoints)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(averaged, out)
    print(f"averaged {len(args.checkpoints)} checkpoints into {out}")


if __name__ == "__main__":
    main()

"""``lmlab-average``: average the weights of several checkpoints of one run into a new checkpoint.

    lmlab-average logs/mt/runs/.../checkpoints/step_*.ckpt --out averaged.ckpt
    lmlab-translate ckpt_path=averaged.ckpt input=test.de

Keep several checkpoints with ``callbacks.model_checkpoint.save_top_k=5``. The output is a regular
lmlab checkpoint (evaluate it with ``lmlab-eval``); it is not meant for resuming training. It records the
checkpoints it averages, and is written whole or not at all; an existing ``--out`` is replaced only if it is
an earlier average, so a training checkpoint or any other file is never overwritten by mistake.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lmlab.run.checkpoint import average_checkpoints
from lmlab.run.checkpoint_io import write_atomically
from lmlab.run.runtime import user_errors
from lmlab.run.safe_output import check_file

#: the key of a checkpoint's ``lmlab`` section that lists the checkpoints it is the average of
AVERAGED_FROM = "averaged_from"


def is_average(path: Path) -> bool:
    """Whether ``path`` is a checkpoint this command wrote (its tensors are mapped, not read)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # torch raises many types for a file that is not a checkpoint
        return False
    return isinstance(ckpt, dict) and isinstance(ckpt.get("lmlab"), dict) and AVERAGED_FROM in ckpt["lmlab"]


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="lmlab-average", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoints", nargs="+", help="checkpoint files of one run")
    parser.add_argument(
        "--out", required=True, help="where to write the averaged checkpoint (replaces only an earlier average)"
    )
    args = parser.parse_args()
    with user_errors():
        out = check_file(args.out, "--out", replaceable=is_average, what="an earlier lmlab-average output")
        averaged = average_checkpoints(args.checkpoints)
        sources = [str(Path(p).expanduser().resolve()) for p in args.checkpoints]
        averaged["lmlab"] = {**averaged["lmlab"], AVERAGED_FROM: sources}
        write_atomically(averaged, out)
    print(f"averaged {len(args.checkpoints)} checkpoints into {out}")


if __name__ == "__main__":
    main()

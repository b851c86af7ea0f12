"""Generation speed of an exported model: lmlab's sampler against ``transformers``' ``generate`` on the same
weights and prompt, in one process.

Exports the checkpoint with ``lmlab-export`` (GPT-2 or Llama), then decodes greedily from the same prompt with
both, several times each, alternating, and prints the median tokens/s of each, their ratio, and whether they
chose the same tokens (greedy decoding of equal logits must).

    python scripts/bench_export_generation.py --ckpt logs/.../checkpoints/last.ckpt --new-tokens 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a language model checkpoint that lmlab-export writes")
    parser.add_argument("--prompt", default="ROMEO:\n", help="the text both continue")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from lmlab.export import export
    from lmlab.inference.generation import generate
    from lmlab.run.checkpoint import load_language_model

    model, _ = load_language_model(args.ckpt)
    net = model.net.eval()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "hf"
        cfg = OmegaConf.create({"ckpt_path": args.ckpt, "out": str(out), "overwrite": False, "check_atol": 1e-4})
        export(cfg)
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    prompt = torch.tensor([model.tokenizer.encode(args.prompt)])
    new = min(args.new_tokens, net.block_size - prompt.size(1))

    def lmlab_side() -> torch.Tensor:
        return generate(net, prompt, new, temperature=0.0)

    def hf_side() -> torch.Tensor:
        mask = torch.ones_like(prompt)
        return hf.generate(prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)

    timings: dict[str, list[float]] = {"lmlab": [], "transformers": []}
    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        lmlab_side(), hf_side()  # warm-up
        for _ in range(args.repeats):
            for name, side in (("lmlab", lmlab_side), ("transformers", hf_side)):
                start = time.perf_counter()
                outputs[name] = side()
                timings[name].append(time.perf_counter() - start)
    speed = {name: new / statistics.median(times) for name, times in timings.items()}
    result = {
        "checkpoint": args.ckpt,
        "architecture": type(hf).__name__,
        "new_tokens": new,
        "threads": torch.get_num_threads(),
        "tokens_per_sec": {k: round(v, 1) for k, v in speed.items()},
        "ratio_lmlab_to_transformers": round(speed["lmlab"] / speed["transformers"], 3),
        "same_tokens": torch.equal(outputs["lmlab"], outputs["transformers"]),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Training throughput of a GPT through lmlab (Lightning) against a plain PyTorch loop.

Both paths train the same ``lmlab.models.GPT`` on the same batches (random tokens, fixed seed)
with AdamW, gradient clipping at 1.0 and the same precision; the ratio of their tokens/s is the
platform's overhead. Model FLOPs utilization (MFU) is reported against the matrix-multiply rate
measured on the same device in the same run (nanoGPT's estimate: 6N + 12·L·H·Q·T FLOPs per token).

GPT-2 124M shape on a GPU:
    python scripts/bench_gpt_throughput.py --device cuda --precision bf16-mixed --compile
nanoGPT's CPU configuration (Tiny Shakespeare characters), single-threaded:
    OMP_NUM_THREADS=1 python scripts/bench_gpt_throughput.py --device cpu --precision 32-true --n-layer 4 \
        --n-head 4 --n-embd 128 --block-size 64 --vocab-size 65 --batch-size 12 --steps 300 --warmup 20 --repeats 3
A quick CPU check of the script itself:
    python scripts/bench_gpt_throughput.py --device cpu --precision 32-true --n-layer 2 --n-head 2 \
        --n-embd 64 --block-size 64 --vocab-size 512 --batch-size 4 --steps 10 --warmup 3
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lmlab.models import GPT
from lmlab.tasks.lm import LanguageModelingTask


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, reps: int = 10) -> float:
    """Measured FLOP/s of an n x n x n matrix product on random data."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def flops_per_token(model: GPT, n_layer: int, n_head: int, n_embd: int, block_size: int) -> float:
    n_params = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    return 6 * n_params + 12 * n_layer * n_head * (n_embd // n_head) * block_size


def make_loader(args: argparse.Namespace, n_batches: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(args.vocab_size, (n_batches * args.batch_size, args.block_size + 1), generator=g)
    data = TensorDataset(tokens[:, :-1], tokens[:, 1:])
    return DataLoader(data, batch_size=args.batch_size, shuffle=False, drop_last=True, pin_memory=args.device == "cuda")


def model_kwargs(args: argparse.Namespace) -> dict:
    return dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, dropout=0.0, bias=True)


def plain_loop(args: argparse.Namespace, device: torch.device) -> float:
    """Tokens/s of a hand-written training loop (timed after warm-up steps)."""
    torch.manual_seed(0)
    model = GPT(vocab_size=args.vocab_size, block_size=args.block_size, **model_kwargs(args)).to(device)
    step_fn = torch.compile(model) if args.compile else model
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=6e-4,
        betas=(0.9, 0.95),
        fused=True if device.type == "cuda" else None,  # as lmlab's optimizer=adamw (fused: null) chooses
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16-mixed" else nullcontext()
    start = None
    for i, (x, y) in enumerate(make_loader(args, args.steps + args.warmup)):
        if i == args.warmup:
            sync(device)
            start = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            logits = step_fn(x)[0]
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    return args.steps * args.batch_size * args.block_size / (time.perf_counter() - start)


class _StepTimer(L.Callback):
    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device, self.start, self.end = warmup, device, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            sync(self.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        sync(self.device)
        self.end = time.perf_counter()


def lightning_loop(args: argparse.Namespace, device: torch.device) -> float:
    """Tokens/s of the same training through lmlab's LanguageModelingTask and Lightning's Trainer."""
    torch.manual_seed(0)
    task = LanguageModelingTask(
        model={"_target_": "lmlab.models.GPT", **model_kwargs(args)},
        data_info={"vocab_size": args.vocab_size, "block_size": args.block_size},
        optimizer={
            "_target_": "torch.optim.AdamW",
            "lr": 6e-4,
            "betas": [0.9, 0.95],
            "weight_decay": 0.1,
            "fused": None,
        },
        compile=args.compile,
    )
    timer = _StepTimer(args.warmup, device)
    trainer = L.Trainer(
        accelerator=device.type if device.type != "cuda" else "gpu",
        devices=1,
        precision=args.precision,
        max_steps=args.steps + args.warmup,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(task, train_dataloaders=make_loader(args, args.steps + args.warmup))
    return args.steps * args.batch_size * args.block_size / (timer.end - timer.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "32-true"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--n-head", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--vocab-size", type=int, default=50304)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--matmul-n", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each loop, alternating; medians reported")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    dtype = torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32
    peak = matmul_rate(device, dtype, args.matmul_n if device.type == "cuda" else min(args.matmul_n, 1024))
    probe = GPT(vocab_size=args.vocab_size, block_size=args.block_size, **model_kwargs(args))
    fpt = flops_per_token(probe, args.n_layer, args.n_head, args.n_embd, args.block_size)
    n_params = sum(p.numel() for p in probe.parameters())
    del probe

    runs: dict[str, list[float]] = {"plain": [], "lmlab": []}
    for _ in range(args.repeats):
        runs["plain"].append(plain_loop(args, device))
        runs["lmlab"].append(lightning_loop(args, device))
    results = {name: sorted(rates)[len(rates) // 2] for name, rates in runs.items()}
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "lightning": L.__version__,
        "params": n_params,
        "args": vars(args),
        "matmul_tflops": peak / 1e12,
        "flops_per_token": fpt,
    }
    for name, tps in results.items():
        report[f"{name}_tokens_per_sec"] = tps
        report[f"{name}_tokens_per_sec_runs"] = runs[name]
        report[f"{name}_mfu"] = tps * fpt / peak
    report["lmlab_over_plain"] = results["lmlab"] / results["plain"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

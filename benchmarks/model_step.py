"""Where a CM-ARR training step spends its time: arithmetic or per-op overhead.

    python benchmarks/model_step.py [--device cpu|cuda] [--steps 20] [--models default,tiny]
                                    [--compile [--compile-mode reduce-overhead]]

Times one training step as the trainer's resident path runs it (``FoldRecipe.train_step``:
condition sampling, forward on pooled inputs without per-step value checks, bf16 autocast
on CUDA, backward, fused Adam) at batch 16, for the default model and for the same
architecture at tiny widths, and counts the aten operators one step runs (torch profiler):
all of them including those nested inside others, the outermost calls, and the outermost
calls that are not views (each of these launches at least one kernel on a GPU). When the
tiny model is nearly as slow as the default one, the step is bound by the number of
operators (Python, dispatcher, kernel launches), not by FLOPs: that is what CUDA graphs or
fewer, larger operators fix.

``--compile`` adds, per model, the same step with the model under ``torch.compile``
(inductor), compile time excluded; the
operator count is then what still runs through the dispatcher (the compiled region's
generated kernels are not aten operators).
"""
from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table
from torch.profiler import ProfilerActivity, profile

from cmarr.model import CMARR, MODALITIES, CMARRConfig
from cmarr.pipelines.conditions import sample_conditions

#: aten operators that return a view (no kernel on a GPU)
VIEWS = {"aten::" + n for n in (
    "view", "reshape", "_unsafe_view", "_reshape_alias", "as_strided", "transpose", "permute", "unsqueeze",
    "squeeze", "expand", "expand_as", "slice", "select", "t", "detach", "alias", "split", "split_with_sizes",
    "unbind", "narrow", "diagonal", "unflatten", "flatten", "chunk", "view_as", "movedim", "lift_fresh",
    "numpy_T", "resolve_conj", "resolve_neg")}
#: aten operators that are free when nothing needs converting (then they call nothing)
MAYBE_NOOP = {"aten::to", "aten::contiguous", "aten::type_as"}


def batch_inputs(cfg: CMARRConfig, device: str, lead: tuple[int, ...]):
    """Random pooled inputs of shape ``lead + (seq_len, D_m)``, all modalities present, and
    labels ``lead``."""
    feats = {m: torch.randn(*lead, cfg.seq_len, cfg.dims[m], device=device) for m in MODALITIES}
    masks = {m: torch.ones(*lead, cfg.seq_len, dtype=torch.bool, device=device) for m in MODALITIES}
    present = torch.ones(*lead, 3, dtype=torch.bool, device=device)
    labels = torch.randint(0, cfg.num_classes, lead, device=device)
    return feats, masks, present, labels


def generator(device: str, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def make_step(cfg: CMARRConfig, device: str, batch: int = 16, compile_mode: str | None = None):
    torch.manual_seed(0)
    model = CMARR(cfg).to(device)
    net = model if compile_mode is None else torch.compile(model, mode=compile_mode, dynamic=False)
    feats, masks, present, labels = batch_inputs(cfg, device, (batch,))
    gen = generator(device, 0)
    amp = torch.device(device).type == "cuda"  # the trainer's optim.amp="auto"
    opt = torch.optim.Adam(model.parameters(), 1e-4, fused=True)  # as the trainer

    def step():
        available = sample_conditions(present, "missing", gen)  # (B, 3), as the trainer
        if compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp):
            out = net(feats, masks, available, present, labels, pooled=True,  # as the trainer's resident path
                      validate=False)
        out.losses["total"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def measure(step, device: str, steps: int) -> float:
    for _ in range(3):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def count_ops(step) -> tuple[int, int, int]:
    """(aten operators including nested ones, outermost aten calls, outermost calls that are
    not views) of one step."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.events() if e.name.startswith("aten::")]

    def outermost(e) -> bool:
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("aten::"):
                return False
            p = p.cpu_parent
        return True

    top = [e for e in events if outermost(e)]
    kernels = [e for e in top if e.name not in VIEWS and (e.name not in MAYBE_NOOP or e.cpu_children)]
    return len(events), len(top), len(kernels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--models", default="default,tiny", help="which of: default, tiny")
    ap.add_argument("--compile", action="store_true", help="also time the step under torch.compile (inductor)")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode (default, reduce-overhead, ...)")
    args = ap.parse_args()
    wanted = {m.strip() for m in args.models.split(",")}
    configs = {
        "default (d_model 128, seq_len 32)": CMARRConfig(),
        "tiny (widths 8-16, seq_len 4)": CMARRConfig(dims={"speech": 8, "text": 8, "video": 8}, d_model=16, seq_len=4,
                                                     umc_heads=2, fusion_heads=2, flow_hidden=8, rcan_reduction=4),
    }
    tab = Table(title=f"CM-ARR training step, batch 16, on {args.device} ({torch.get_num_threads()} CPU threads)")
    for col in ("model", "step", "parameters", "aten ops / step (nested)", "outermost", "outermost, not views",
                "ms / step", "steps/s", "compile s"):
        tab.add_column(col, justify="left" if col in ("model", "step") else "right")
    for name, cfg in configs.items():
        if name.split()[0] not in wanted:
            continue
        n_params = sum(p.numel() for p in CMARR(cfg).parameters())
        for mode in ([None] + ([args.compile_mode] if args.compile else [])):
            step = make_step(cfg, args.device, compile_mode=mode)
            t0 = time.perf_counter()
            if mode is not None:
                step()  # compiles
            compile_s = time.perf_counter() - t0
            sec = measure(step, args.device, args.steps)
            n_all, n_top, n_kernels = count_ops(step)
            tab.add_row(name, "eager" if mode is None else f"compiled ({mode})", f"{n_params:,}",
                        f"{n_all:,}", f"{n_top:,}", f"{n_kernels:,}", f"{sec * 1e3:.1f}", f"{1 / sec:.1f}",
                        "" if mode is None else f"{compile_s:.0f}")
    Console(width=200).print(tab)


if __name__ == "__main__":
    main()

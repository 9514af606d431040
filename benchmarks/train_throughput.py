"""Training throughput (images/s) of both stages, on the CPU or a CUDA GPU.

A step is what `laray.training.stages` does per batch: stage 1, auto-encoder forward, MSE,
backward, SGD step; stage 2, encoder forward, LA loss against a memory bank,
backward, SGD step, bank update (reclustering, once per epoch, is left out: see
benchmarks/la_step.py). On CUDA the step runs as in training: bf16 autocast and
channels_last. FLOPs per step are counted with torch's FlopCounterMode, so the
achieved rate and its fraction of the GPU's dense bf16 peak are reported.

    python benchmarks/train_throughput.py                 # CPU: demo settings and vgg16_bn at 224 px
    python benchmarks/train_throughput.py --device cuda   # the same on a GPU
    python benchmarks/train_throughput.py --quick         # tiny, seconds (what the tests run)
    python benchmarks/train_throughput.py --encode-flops  # GFLOP of one evaluation encode, vgg16_bn at 224 px
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from laray.method.la import LocalAggregationLoss, MemoryBank
from laray.method.models import AutoEncoderVGG, EncoderVGGMerged
from laray.settings.config import AutoEncoderConfig, LAConfig
from laray.settings.defaults import demo_configs
from laray.training.stages import make_optimizer

# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets, in FLOP/s.
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def stage_steps(ae_cfg: AutoEncoderConfig, la_cfg: LAConfig, batch: int, n_bank: int, device: torch.device):
    """Two closures running one training step of each stage on a fixed random batch."""
    fast = device.type == "cuda"
    fmt = torch.channels_last if fast else torch.contiguous_format
    x = torch.randn(batch, 3, ae_cfg.image_size, ae_cfg.image_size, device=device).contiguous(memory_format=fmt)

    autoencoder = AutoEncoderVGG(ae_cfg.arch, None, ae_cfg.width).to(device, memory_format=fmt)
    ae_opt, _ = make_optimizer(autoencoder.parameters(), ae_cfg)

    def ae_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast):
            out = autoencoder(x)
        loss = F.mse_loss(out.float(), x)
        ae_opt.zero_grad(set_to_none=True)
        loss.backward()
        ae_opt.step()

    encoder = EncoderVGGMerged(ae_cfg.arch, None, ae_cfg.width, la_cfg.merger).to(device, memory_format=fmt)
    bank = MemoryBank(n_bank, encoder.code_dim(ae_cfg.image_size), la_cfg.mixing_rate, device=device)
    loss_fn = LocalAggregationLoss(
        bank,
        la_cfg.temperature,
        min(la_cfg.k_neighbours, n_bank - 1),
        la_cfg.clustering_repeats,
        min(la_cfg.n_centroids, n_bank),
    )
    loss_fn.recluster()
    la_opt, _ = make_optimizer(encoder.parameters(), la_cfg)
    indices = torch.randperm(n_bank, device=device)[:batch]

    def la_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast):
            v = encoder(x)
        loss = loss_fn(v.float(), indices)
        la_opt.zero_grad(set_to_none=True)
        loss.backward()
        la_opt.step()
        bank.update(indices, v.detach())

    return {"autoencoder": ae_step, "local aggregation": la_step}


def measure(step, steps: int, device: torch.device) -> tuple[float, float]:
    """(seconds per step, FLOPs per step), after one warm-up step."""
    with FlopCounterMode(display=False) as counter:
        step()  # warm-up and FLOP count in one
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps, float(counter.get_total_flops())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="demo settings only, 2 steps (seconds)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, when not in the built-in table")
    parser.add_argument(
        "--encode-flops",
        action="store_true",
        help="only count one evaluation encode (the encoder's forward pass) of vgg16_bn at 224 px",
    )
    args = parser.parse_args(argv)
    if args.encode_flops:
        cfg = AutoEncoderConfig()
        encoder = EncoderVGGMerged(cfg.arch, None, cfg.width, "mean").eval()
        with torch.no_grad(), FlopCounterMode(display=False) as count:
            encoder(torch.randn(1, 3, cfg.image_size, cfg.image_size))
        print(f"encode ({cfg.arch}, {cfg.image_size} px): {count.get_total_flops() / 1e9:.2f} GFLOP per image")
        return 0
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = (
        args.peak_tflops * 1e12
        if args.peak_tflops
        else next((v for k, v in BF16_PEAK.items() if gpu and k in gpu), None)
    )

    demo_ae, demo_la = demo_configs()
    full_ae, full_la = AutoEncoderConfig(), LAConfig()  # vgg16_bn, width 1, 224 px, k=500, R=6, C=100
    on_gpu = device.type == "cuda"
    settings = [("demo (digits)", demo_ae, demo_la, 64, 1797, args.steps or (2 if args.quick else 10))]
    if not args.quick:
        settings.append(
            (
                f"{full_ae.arch} {full_ae.image_size} px",
                full_ae,
                full_la,
                64 if on_gpu else 8,
                5400,
                args.steps or (20 if on_gpu else 2),
            )
        )

    print(
        f"device {gpu or 'cpu'}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
        + (", bf16 autocast + channels_last" if on_gpu else ", float32")
    )
    print(
        f"{'setting':<18} {'stage':<18} {'batch':>5} {'ms/step':>9} {'images/s':>9} {'GFLOP/img':>10} "
        f"{'TFLOP/s':>8}" + (f" {'of peak':>8}" if peak else "")
    )
    for name, ae_cfg, la_cfg, batch, n_bank, steps in settings:
        torch.manual_seed(0)
        for stage, step in stage_steps(ae_cfg, la_cfg, batch, n_bank, device).items():
            seconds, flops = measure(step, steps, device)
            rate = flops / seconds
            print(
                f"{name:<18} {stage:<18} {batch:>5} {seconds * 1e3:>9.1f} {batch / seconds:>9.1f} "
                f"{flops / batch / 1e9:>10.2f} {rate / 1e12:>8.3f}" + (f" {rate / peak:>8.1%}" if peak else "")
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Another user's job on the GPU: holds memory and keeps the GPU busy until killed.

Run as ``python -m tests.helpers.gpu_occupier GIB``; prints ``ready`` once the memory is taken and the
first kernels ran, so a test knows NVML will see it.
"""

from __future__ import annotations

import sys

import torch


def main() -> None:
    gib = float(sys.argv[1]) if len(sys.argv) > 1 else 4.0
    hold = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    hold.fill_(1)
    a = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):
        a = torch.tanh(a @ a)
    torch.cuda.synchronize()
    print("ready", flush=True)
    while True:  # busy, as a training job would be
        for _ in range(50):
            a = torch.tanh(a @ a)
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()

"""Scenario B2c: a LoRA fine-tune pages its optimizer state to NVMe and back every step.

Llama-3-8B's adapters train on GPU 0 of the workstation, in virtual time: each step's
page-out waits for the forward pass (train_sem step*3+1) and runs on PCIe and NVMe
during the backward pass; the optimizer step waits for the backward pass and the
page-in (page_sem P+1). The code is asyncfront/scenarios/finetune_paging.py; the same
fine-tune for real, on a small GPT-2, is examples/finetune_paging.py.

Run: python examples/scenarios/finetune_paging.py [--steps N] [--trace PATH]
"""

from __future__ import annotations

from _run import main

if __name__ == "__main__":
    main("finetune_paging")

"""Estimated GPU memory of each stage's model states on ONE GPU, full fine-tuning vs LoRA (benchmark/README.md,
"Fewer GPUs"). Counts bytes per parameter; activations come on top (see the README for how to bound them).

    python benchmark/memory_estimate.py                        # Pythia 160m, 1b, 2.8b, 6.9b at LoRA rank 16
    python benchmark/memory_estimate.py --lora_r 64 --frozen_bytes 2
    python benchmark/memory_estimate.py --gpus 2                # per GPU, the trained models under DeepSpeed ZeRO-2

The method (per GPU; one process, no sharding, on one GPU):
* a trained model (full): 16 bytes per parameter: fp32 weights 4 + fp32 gradients 4 + AdamW's two fp32 moments 8
  (bf16 autocast keeps the fp32 weights; DeepSpeed bf16 holds bf16 weights 2 + bf16 gradients 2 + fp32 master and
  moments 12: also 16); with `--gpus K` > 1, DeepSpeed ZeRO-2 bf16 (`--deepspeed`): 2 + 14 / K (the bf16 weights
  whole on every GPU, gradients and optimizer states split over the K GPUs);
* a frozen model: `--frozen_bytes` per parameter (4: FROZEN_DTYPE fp32, this code's default; 2 with a bf16
  `--frozen_models_config`);
* a LoRA-trained model: its frozen base weights (4 bytes, TRAINED_DTYPE fp32) + 16 bytes per adapter (and head)
  parameter; the reference policy costs nothing (the policy with its adapters off);
* stages: SFT and RM train one model; DPO trains the policy + a frozen reference; PPO trains the policy and the
  critic + a frozen reference and reward model.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

PYTHIA = {  # hidden, layers, heads, intermediate (the Pythia suite's configs), vocabulary rows 50,304
    "pythia-160m": (768, 12, 12, 3072),
    "pythia-1b": (2048, 16, 8, 8192),
    "pythia-2.8b": (2560, 32, 32, 10240),
    "pythia-6.9b": (4096, 32, 32, 16384),
}
GIB = 2**30


@dataclass
class Args:
    lora_r: int = 16
    """LoRA rank on query_key_value, dense, dense_h_to_4h, dense_4h_to_h (lora.py's default targets)"""
    frozen_bytes: int = 4
    """bytes per parameter of a frozen model (4: fp32, the default FROZEN_DTYPE; 2: bf16 engines)"""
    gpus: int = 1
    """GPUs of the run: >1 splits a fully trained model's gradients and optimizer states (DeepSpeed ZeRO-2 bf16)"""


def parameters(hidden: int, layers: int, intermediate: int, vocab: int = 50304) -> int:
    """GPT-NeoX parameters: untied input and output embeddings, per layer attention (qkv + dense, with biases), MLP
    (with biases) and two layer norms, and the final norm."""
    per_layer = (3 * hidden * hidden + 3 * hidden) + (hidden * hidden + hidden) + 2 * hidden * intermediate + intermediate + hidden + 4 * hidden
    return 2 * vocab * hidden + layers * per_layer + 2 * hidden


def lora_parameters(hidden: int, layers: int, intermediate: int, r: int) -> int:
    """A (r x d_in) and B (d_out x r) on the four linear layers of each block."""
    per_layer = r * (hidden + 3 * hidden) + r * (hidden + hidden) + r * (hidden + intermediate) + r * (intermediate + hidden)
    return layers * per_layer


def stage_bytes(n: int, n_scalar: int, n_lora: int, frozen: int, head: int, gpus: int = 1) -> dict[str, tuple[float, float]]:
    """(full, LoRA) bytes per GPU of the model states of each stage; `n` parameters of the causal LM, `n_scalar` of a
    ScalarModel (the backbone without the output embedding, + the head)."""
    trained, base = (16 if gpus == 1 else 2 + 14 / gpus), 4
    return {
        "SFT": (trained * n, base * n + trained * n_lora),
        "RM": (trained * n_scalar, base * n_scalar + trained * (n_lora + head)),
        "DPO": (trained * n + frozen * n, base * n + trained * n_lora),
        "PPO": (trained * (n + n_scalar) + frozen * (n + n_scalar),
                base * (n + n_scalar) + frozen * n_scalar + trained * (2 * n_lora + head)),
    }


def main(args: Args) -> str:
    rows = []
    for name, (hidden, layers, _heads, intermediate) in PYTHIA.items():
        n, n_lora = parameters(hidden, layers, intermediate), lora_parameters(hidden, layers, intermediate, args.lora_r)
        stages = stage_bytes(n, n - 50304 * hidden + hidden + 1, n_lora, args.frozen_bytes, hidden + 1, args.gpus)
        rows.append([name, f"{n / 1e9:.3f}B", f"{n_lora / 1e6:.2f}M ({100 * n_lora / n:.2f}%)",
                     *[f"{full / GIB:.1f} / {lora / GIB:.1f}" for full, lora in stages.values()]])
    trained = "ZeRO-2 bf16" if args.gpus > 1 else "fp32 + AdamW"
    table = common.markdown_table(["size", "parameters", f"LoRA r {args.lora_r} parameters",
                                   *[f"{s} GiB per GPU, {args.gpus} GPU(s): full ({trained}) / LoRA" for s in stages]], rows)
    print(table)
    return table


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))

"""Fewer GPUs: LoRA adapters (through `peft`) and gradient checkpointing for the trained models of every stage.

Not a paper detail: the paper fine-tunes every weight, which `--lora_r 0` (the default) keeps. With `--lora_r R`
each target linear layer W of a trained model gets W + (alpha / R) B A (A: R x d_in, B: d_out x R, B = 0 at the
start, so the adapted model starts equal to the one it was loaded from); only A and B train, and a reward model's
or critic's scalar head (new weights) trains fully. The adapters are injected into the model in place
(`peft.inject_adapter_in_model`): the model keeps its class, so every forward path (`logits_to_keep`,
`--skip_left_padding`, the scalar head, accelerate / DeepSpeed) runs unchanged.

The reference policy of DPO (and PPO's, where it is the policy's starting model) is the policy with its adapters
switched off (`reference`): a LoRA run holds one copy of the SFT weights, not two.

Saved checkpoints (`save`): `{run}/model` holds the adapters in peft's format (`adapter_config.json`, whose
`base_model_name_or_path` names the model the adapters sit on, and `adapter_model.safetensors`) plus the
tokenizer, and for a reward model its config.json (bias and normalisation, Detail 15); `--merge_lora` also writes
`{run}/model_merged`, the merged weights as a plain checkpoint. Every loader (`training.load_causal_lm`,
`ScalarModel.from_pretrained` / `from_backbone`, hence every later stage, judge.py and visualize_tokens.py)
reads either: an adapter folder (recognised by its adapter_config.json) loads its base and merges the adapters in.

`--gradient_checkpointing` recomputes each layer's activations in the backward instead of storing them
(transformers' `activation_checkpointing_enable`, non-reentrant): less memory, about a third more compute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from summarize_from_feedback_details.core import UserInputError, looks_like_local_path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
"""the key prefix of peft's saved adapter weights (as `PeftModel.save_pretrained` writes them)"""
PYTHIA_TARGET_MODULES = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
"""every linear layer of a GPT-NeoX (Pythia) block: attention in and out, MLP in and out"""
SCALAR_HEAD = "scalar_head"
"""the reward model's / critic's head (modeling.ScalarModel): trained fully, saved with the adapters"""


@dataclasses.dataclass
class LoraArgs:
    """Memory-saving fields of every training stage (not in the paper, which trains every weight)."""

    lora_r: int = 0
    """LoRA rank of the adapters on each target layer of the trained models; 0: full fine-tuning (the paper)"""
    lora_alpha: float = 16.0
    """LoRA scaling: the adapters' update is multiplied by lora_alpha / lora_r"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input; 0 as every dropout (Detail 7: log-probs must be reproducible)"""
    lora_target_modules: tuple[str, ...] = PYTHIA_TARGET_MODULES
    """names of the linear layers that get adapters (GPT-NeoX / Pythia: query_key_value, dense, dense_h_to_4h, dense_4h_to_h)"""
    merge_lora: bool = False
    """with --lora_r: also save `{run}/model_merged`, the adapters merged into the weights (a plain checkpoint)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward instead of storing them (less memory, ~1/3 more compute)"""


def check_args(args: LoraArgs) -> None:
    """One UserInputError for a LoRA setting that cannot work (numbers are checked by `core.validate_numbers`)."""
    if args.merge_lora and args.lora_r == 0:
        raise UserInputError("--merge_lora needs adapters to merge: pass --lora_r (e.g. --lora_r 16) or leave --merge_lora out")
    if args.lora_r and not args.lora_target_modules:
        raise UserInputError("--lora_target_modules is empty: name the layers to adapt, e.g. --lora_target_modules "
                             + " ".join(PYTHIA_TARGET_MODULES))


def lora_config(args: LoraArgs, base_model: str, scalar_head: bool = False) -> Any:
    """peft's LoraConfig for `args`; `base_model` (made absolute when local) is where the adapted weights come from."""
    from peft import LoraConfig

    if looks_like_local_path(base_model):
        base_model = str(Path(base_model).resolve())
    return LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=list(args.lora_target_modules),
        bias="none", task_type=None if scalar_head else "CAUSAL_LM", base_model_name_or_path=base_model,
        modules_to_save=[SCALAR_HEAD] if scalar_head else None,
    )


def prepare_trained(model: Any, args: LoraArgs, base_model: str) -> Any:
    """A trained model (a causal LM, or a ScalarModel: reward model or critic) as `args` ask: gradient
    checkpointing on its transformer, LoRA adapters on its target layers with everything else frozen except a
    scalar head. `base_model`: the checkpoint it was loaded from (recorded in the adapters' config)."""
    scalar_head = hasattr(model, SCALAR_HEAD)
    transformer = model.backbone if scalar_head else model
    if args.gradient_checkpointing:
        # transformers 5's name for gradient_checkpointing_enable; non-reentrant: works with frozen inputs (LoRA)
        transformer.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if not args.lora_r:
        return model
    from peft import inject_adapter_in_model

    config = lora_config(args, base_model, scalar_head)
    config.modules_to_save = None  # the head trains as it is; `save` writes it as peft's modules_to_save
    missing = [name for name in args.lora_target_modules if not any(n.rsplit(".", 1)[-1] == name for n, _ in model.named_modules())]
    if missing:
        raise UserInputError(f"--lora_target_modules {missing} name no layer of {base_model!r}; its linear layers are "
                             f"{sorted({n.rsplit('.', 1)[-1] for n, m in model.named_modules() if type(m).__name__ == 'Linear'})}")
    inject_adapter_in_model(config, model)
    model.sffd_lora_config = lora_config(args, base_model, scalar_head)  # what `save` writes
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name or name.startswith(f"{SCALAR_HEAD}."))
    return model


def has_adapters(model: Any) -> bool:
    return hasattr(model, "sffd_lora_config")


def _tuner_layers(model: Any) -> list[tuple[str, Any]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(model: Any) -> Iterator[Any]:
    """`model` computing as the model its adapters were added to (every adapter skipped), restored afterwards."""
    layers = [module for _, module in _tuner_layers(model)]
    for module in layers:
        module.enable_adapters(False)
    try:
        yield model
    finally:
        for module in layers:
            module.enable_adapters(True)  # also makes the adapters trainable again


@contextlib.contextmanager
def reference(frozen: Any, policy: Any) -> Iterator[Any]:
    """The reference policy to compute log-probs with: `frozen` (a separate copy), or, for a LoRA run that loaded
    none (`frozen` None), the unwrapped `policy` with its adapters switched off: the SFT model, exactly."""
    if frozen is not None:
        yield frozen
    else:
        with adapters_disabled(policy) as base:
            yield base


def adapter_state_dict(model: Any) -> dict[str, Any]:
    """The adapters' weights (and a scalar head's) under peft's saved key names."""
    from peft import get_peft_model_state_dict

    state = {PEFT_PREFIX + k: v for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}
    if hasattr(model, SCALAR_HEAD):
        state.update({f"{PEFT_PREFIX}{SCALAR_HEAD}.{k}": v for k, v in getattr(model, SCALAR_HEAD).state_dict().items()})
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def merged_state_dict(model: Any) -> dict[str, Any]:
    """The plain model's state dict with every adapter merged into its layer's weight (W + alpha / r B A); the
    model itself is left as it is."""
    layers = dict(_tuner_layers(model))
    state = {}
    for key, value in model.state_dict().items():
        if "lora_" in key:
            continue
        module_name, _, leaf = key.rpartition(".base_layer.")
        if module_name in layers and leaf == "weight":
            value = value + layers[module_name].get_delta_weight("default").to(value.dtype)
        state[key.replace(".base_layer.", ".")] = value.detach()
    return state


def save(model: Any, folder: Path) -> None:
    """The adapters of `model` (and a scalar head, and a ScalarModel's config: bias, normalisation) into
    `folder` in peft's format."""
    from safetensors.torch import save_file

    model.sffd_lora_config.save_pretrained(str(folder))
    save_file(adapter_state_dict(model), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    if hasattr(model, SCALAR_HEAD):
        model.config.save_pretrained(str(folder))


def save_merged(model: Any, folder: Path) -> None:
    """`model` with its adapters merged in, as a plain checkpoint (loads without peft)."""
    model.save_pretrained(str(folder), state_dict=merged_state_dict(model), safe_serialization=True)


def is_adapter_folder(path: str | Path) -> bool:
    return looks_like_local_path(str(path)) and (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> str:
    """The checkpoint the adapters in `path` were trained on (their `base_model_name_or_path`)."""
    base = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise UserInputError(f"{path!r} holds LoRA adapters without base_model_name_or_path in {ADAPTER_CONFIG}; "
                             "set it to the model the adapters were trained on")
    return base


def load_merged(path: str | Path, load_base: Any) -> Any:
    """The model of the adapter folder `path`: its base loaded by `load_base(checkpoint)` (a base that is itself an
    adapter folder, e.g. a LoRA PPO run's policy on a LoRA SFT run, is merged first) with the adapters merged in."""
    base = adapter_base(path)
    return merge_adapters(load_merged(base, load_base) if is_adapter_folder(base) else load_base(base), path)


def merge_adapters(base: Any, path: str | Path) -> Any:
    """`base` (the model the adapters in `path` were trained on, loaded) with the adapters merged in: a plain model."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(path), is_trainable=False).merge_and_unload()


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(parameters that train, all parameters) of `model`."""
    return (sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters()))

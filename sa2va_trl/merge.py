"""Merge LoRA adapters saved by sa2va-trl into a standalone native Sa2VA model that `from_pretrained` loads.

    python -m sa2va_trl.merge outputs/cycle outputs/cycle-merged                  # base from adapter_config.json
    python -m sa2va_trl.merge outputs/cycle/ema_model outputs/cycle-ema-merged    # the EMA adapters
    python -m sa2va_trl.merge outputs/run OUT --base-model builtin:tiny --seed 0  # a base that is no directory
    python -m sa2va_trl.merge outputs/remote-run OUT --backend remote            # a published (remote-code) base

The adapter folder is one written by a LoRA run (`use_peft: true`): the top level of `output_dir`, its `ema_model/`,
or a checkpoint. The base model is loaded on the CPU from the path in ``adapter_config.json`` (or ``--base-model``:
a directory, ``builtin:tiny-warm``, or ``builtin:tiny`` with the run's ``--seed``; with ``--backend remote`` a
published checkpoint directory, loaded with its own code, whose ``save_pretrained`` then writes that code next to the
merged weights), the adapters (LoRA and the
``modules_to_save`` parts trained in full) are applied with peft and merged into the weights, and the result is
saved with the tokenizer (the adapter folder's, else the base model's). The training process is never touched, so
this also works at the end of a run (`save_merged_model: true`) without a second copy of the model on the device.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

logger = logging.getLogger(__name__)

__all__ = ["load_base_model", "merge_lora"]

BUILTIN_TINY = "builtin:tiny"
BUILTIN_TINY_WARM = "builtin:tiny-warm"


def load_base_model(name: str, seed: int = 0, dtype="auto", backend: str = "native"):
    """(model, tokenizer) of a base model: a native Sa2VA directory, ``builtin:tiny-warm``, or ``builtin:tiny``
    (the tiny random model, rebuilt from ``seed``); ``backend="remote"``: a published checkpoint directory, loaded with
    its own code (`sa2va_trl.models.remote.load_published_sa2va`; that runs the checkpoint's Python files)."""
    import transformers

    from sa2va_trl.models.modeling_sa2va import Sa2VAModel

    if backend == "remote":
        from sa2va_trl.models.remote import load_published_sa2va

        return load_published_sa2va(name, dtype=dtype), transformers.AutoTokenizer.from_pretrained(
            name, trust_remote_code=True)
    if backend != "native":
        raise ValueError(f"backend must be 'native' or 'remote', got {backend!r}.")
    if name == BUILTIN_TINY:
        from sa2va_trl.models.tiny import build_tiny_model

        return build_tiny_model(seed=seed)
    if name == BUILTIN_TINY_WARM:
        from sa2va_trl.sft import tiny_warm_start_path

        name = tiny_warm_start_path()
    if not os.path.isdir(name):
        raise FileNotFoundError(
            f"base model {name!r} is not a local directory: pass --base-model (a native Sa2VA directory, "
            f"{BUILTIN_TINY_WARM}, or {BUILTIN_TINY} with the run's --seed)."
        )
    model = Sa2VAModel.from_pretrained(name, dtype=dtype)
    return model, transformers.AutoTokenizer.from_pretrained(name)


def merge_lora(adapter_dir: str, output_dir: str, base_model: str | None = None, seed: int = 0, dtype="auto",
               backend: str = "native") -> str:
    """Merge the adapters of ``adapter_dir`` into their base model and save the standalone model to ``output_dir``.

    Args:
        adapter_dir: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        output_dir: where the merged model and the tokenizer go.
        base_model: overrides ``base_model_name_or_path`` of the adapter config (see `load_base_model`).
        seed: the seed of a ``builtin:tiny`` base.
        dtype: weight dtype of the base model (``"auto"``: as saved).
        backend: ``"native"`` or ``"remote"`` (the run's `model_backend`).

    Returns:
        ``output_dir``.
    """
    import transformers
    from peft import PeftConfig, PeftModel

    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise FileNotFoundError(
            f"{adapter_dir!r} has no adapter_config.json: it is not a LoRA folder (a full model needs no merging)."
        )
    config = PeftConfig.from_pretrained(adapter_dir)
    name = base_model or config.base_model_name_or_path
    if not name:
        raise ValueError(f"{adapter_dir}/adapter_config.json names no base model: pass base_model (--base-model).")
    model, tokenizer = load_base_model(name, seed=seed, dtype=dtype, backend=backend)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    os.makedirs(output_dir, exist_ok=True)
    merged.save_pretrained(output_dir)
    if os.path.isfile(os.path.join(adapter_dir, "tokenizer_config.json")):
        tokenizer = transformers.AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=backend == "remote")
    tokenizer.save_pretrained(output_dir)
    logger.info("Merged %s into %s: %s", adapter_dir, name, output_dir)
    return output_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sa2va_trl.merge", description=__doc__.split("\n")[0])
    parser.add_argument("adapter_dir", help="a LoRA folder written by sa2va-trl (output_dir, ema_model/, checkpoint)")
    parser.add_argument("output_dir", help="where the merged standalone model goes")
    parser.add_argument("--base-model", default=None, help="base model (default: adapter_config.json's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a builtin:tiny base model")
    parser.add_argument("--backend", default="native", choices=["native", "remote"],
                        help="the run's model_backend (remote: the base is loaded with its own code)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s - %(name)s - %(message)s")
    merge_lora(args.adapter_dir, args.output_dir, base_model=args.base_model, seed=args.seed, backend=args.backend)
    print(args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Memory per GPU for the 8-GPU recipes, computed on paper from parameter counts.

Nothing here is measured: these machines have no GPU. Parameter counts are computed from the
published architectures' config values (listed below), not quoted, so the arithmetic can be checked.

Model states per GPU with mixed-precision AdamW (bf16 weights and gradients, fp32 master weights
and two fp32 Adam moments = 12 bytes per trainable parameter), N data-parallel ranks:

    ZeRO-2:  2 * P_all            + (2 + 12) * P_train / N  + 4 * P_train      (EMA replicated)
    ZeRO-3: (2 * P_all            + (2 + 12) * P_train) / N + 4 * P_train / N  (EMA sharded)

P_all is every parameter (frozen ones included, held in bf16), P_train the trainable ones. The EMA
is our fp32 shadow of the trainable parameters; it is also the cycle partner and the KL
reference, so no second model copy is held. Activations, the generation KV cache and framework
buffers come on top and depend on G, batch and sequence length; the KV column gives the cache of
one generation batch as a guide. Under ZeRO-3, generation gathers the full bf16 model
(`ds3_gather_for_generation`, TRL's default), a transient 2 * P_all on every GPU: the last column.
Each log-prob forward (training, old and reference log-probs) holds its completion logits: rows x (completion
length + 1) x vocabulary, in bf16 and twice in fp32 for the tempered log-softmax (~10 bytes per element,
`logits_chunk_GiB`); the trainer takes TRL's `batch_size` rows at a time (8 in recipes/cycle.yaml, 97 steps).

    python benchmarks/memory_on_paper.py [--gpus 8] [--json benchmarks/results/memory_on_paper.json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3


@dataclass(frozen=True)
class LLMShape:
    """Decoder-only LM shape (Qwen2 / InternLM2 style: GQA attention, SwiGLU MLP, RMSNorm)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool
    qkv_bias: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of every linear layer of one decoder block (the LoRA targets)."""
        kv = self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    def params(self) -> int:
        per_layer = sum(a * b for a, b in self.linear_shapes())
        if self.qkv_bias:
            per_layer += self.hidden + 2 * self.kv_heads * self.head_dim
        per_layer += 2 * self.hidden  # two RMSNorms
        embed = self.vocab * self.hidden
        head = 0 if self.tied_embeddings else self.vocab * self.hidden
        return self.layers * per_layer + embed + head + self.hidden

    def lora_params(self, rank: int) -> int:
        return self.layers * sum(rank * (a + b) for a, b in self.linear_shapes())

    def kv_cache_bytes(self, sequences: int, tokens: int, bytes_per: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * sequences * tokens * bytes_per


def vit_params(hidden: int, intermediate: int, layers: int, patch: int, image: int) -> int:
    """InternViT-style encoder: qkv + proj, fc1/fc2, two LayerNorms, two layer scales per block."""
    block = 4 * hidden * hidden + 4 * hidden + 2 * hidden * intermediate + intermediate + hidden
    block += 4 * hidden + 2 * hidden
    patches = (image // patch) ** 2
    embed = 3 * patch * patch * hidden + hidden + (patches + 1) * hidden + hidden
    return layers * block + embed


def mlp1_params(vit_hidden: int, llm_hidden: int) -> int:
    d = 4 * vit_hidden  # after the 0.5 pixel shuffle
    return 2 * d + d * llm_hidden + llm_hidden + llm_hidden * llm_hidden + llm_hidden


def text_hidden_fcs_params(llm_hidden: int, out: int = 256) -> int:
    return llm_hidden * llm_hidden + llm_hidden + llm_hidden * out + out


# Published configurations (values from the models' config.json files).
QWEN25_3B = LLMShape("Qwen2.5-3B-Instruct", 2048, 11008, 36, 16, 2, 151936, True, True)
INTERNLM25_7B = LLMShape("internlm2_5-7b-chat", 4096, 14336, 32, 32, 8, 92544, False, False)
INTERNVIT_300M = dict(hidden=1024, intermediate=4096, layers=24, patch=14, image=448)
SAM2_HIERA_L = 224_400_000  # about 224M (notes/sa2va.md); mask decoder about 4.2M of it
SAM2_MASK_DECODER = 4_200_000
LORA_RANK = 128  # the published SFT recipe: r 128, alpha 256


def model_counts(llm: LLMShape) -> dict[str, int]:
    vit = vit_params(**INTERNVIT_300M)
    return {
        "vision_model": vit,
        "mlp1": mlp1_params(INTERNVIT_300M["hidden"], llm.hidden),
        "language_model": llm.params(),
        "grounding_encoder": SAM2_HIERA_L,
        "text_hidden_fcs": text_hidden_fcs_params(llm.hidden),
    }


# One log-prob chunk of recipes/cycle.yaml: per_device_train_batch_size rows, max_completion_length 96; bf16 logits,
# their fp32 copy divided by the temperature and logsumexp's fp32 exp (2 + 4 + 4 bytes per element).
CHUNK_ROWS, MAX_COMPLETION, LOGIT_BYTES = 8, 96, 10


def per_gpu_gib(p_all: int, p_train: int, gpus: int, stage: int) -> float:
    if stage == 2:
        total = 2 * p_all + (2 + 12) * p_train / gpus + 4 * p_train
    elif stage == 3:
        total = (2 * p_all + (2 + 12) * p_train) / gpus + 4 * p_train / gpus
    else:
        raise ValueError(f"ZeRO stage {stage} not tabulated")
    return total / GIB


def table(gpus: int) -> list[dict]:
    rows = []
    for model, llm in (("Sa2VA-4B", QWEN25_3B), ("Sa2VA-8B", INTERNLM25_7B)):
        counts = model_counts(llm)
        p_all = sum(counts.values())
        heads = counts["mlp1"] + counts["text_hidden_fcs"] + SAM2_MASK_DECODER
        trainable = {
            "LoRA": llm.lora_params(LORA_RANK) + heads,
            "full": p_all - counts["vision_model"] - (SAM2_HIERA_L - SAM2_MASK_DECODER),
        }
        # One generation batch per GPU: 8 sequences (G = 8) of ~1,400 tokens (1 tile + text).
        kv = llm.kv_cache_bytes(sequences=8, tokens=1400) / GIB
        logits = LOGIT_BYTES * CHUNK_ROWS * (MAX_COMPLETION + 1) * llm.vocab / GIB
        for mode, p_train in trainable.items():
            for stage in (2, 3):
                rows.append(
                    {
                        "model": model,
                        "training": mode,
                        "zero": stage,
                        "params_total_B": round(p_all / 1e9, 3),
                        "params_trainable_B": round(p_train / 1e9, 3),
                        "model_states_GiB_per_gpu": round(per_gpu_gib(p_all, p_train, gpus, stage), 1),
                        "kv_cache_G8_GiB": round(kv, 2),
                        "logits_chunk_GiB": round(logits, 2),
                        "zero3_generation_gather_GiB": round(2 * p_all / GIB, 1) if stage == 3 else 0.0,
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--json", default="benchmarks/results/memory_on_paper.json")
    args = parser.parse_args()
    rows = table(args.gpus)
    header = (f"{'model':9} {'train':5} {'ZeRO':4} {'P_all (B)':>9} {'P_train (B)':>11} {'GiB/GPU':>8} {'KV G=8':>7} "
              f"{'Z3 gather':>9} {'logits':>7}")
    print(f"Model states per GPU, {args.gpus} GPUs, bf16 + AdamW + fp32 EMA (on paper)")
    print(header)
    for r in rows:
        print(
            f"{r['model']:9} {r['training']:5} {r['zero']:4} {r['params_total_B']:9.3f} "
            f"{r['params_trainable_B']:11.3f} {r['model_states_GiB_per_gpu']:8.1f} {r['kv_cache_G8_GiB']:7.2f} "
            f"{r['zero3_generation_gather_GiB']:9.1f} {r['logits_chunk_GiB']:7.2f}"
        )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"gpus": args.gpus, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

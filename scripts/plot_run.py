"""Pictures of a GRPO run for people who would rather look than read: reward curves and the
weak-signal metrics per loop, and the last sample overlay, read from the run's TensorBoard log.

    python scripts/plot_run.py outputs/demo --out docs/images/demo

writes `<out>_rewards.png` (needs matplotlib: `pip install matplotlib`, in the `dev` extra) and
`<out>_overlay.png` (the last `samples/*` image the overlay callback logged).
"""

from __future__ import annotations

import argparse
from pathlib import Path

CURVES = {
    "loop 1 (mask -> caption): cycle IoU": "train/rewards/mask_to_caption/cycle_iou/mean",
    "loop 1: caption METEOR": "train/rewards/mask_to_caption/caption_meteor/mean",
    "loop 2 (caption -> mask): cycle METEOR": "train/rewards/caption_to_mask/cycle_meteor/mean",
    "loop 2: mask IoU": "train/rewards/caption_to_mask/mask_iou/mean",
}
SIGNAL = {
    "loop 1 frac_reward_zero_std": "train/loops/mask_to_caption/frac_reward_zero_std",
    "loop 2 frac_reward_zero_std": "train/loops/caption_to_mask/frac_reward_zero_std",
    "loop 2 fraction without [SEG]": "train/loops/caption_to_mask/frac_no_seg",
    "KL to the EMA": "train/kl",
}


def _event_dirs(run_dir: Path) -> list[Path]:
    return sorted({p.parent for p in run_dir.rglob("events.out.tfevents.*")})


def load_scalars(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], object]:
    """All scalars of the newest event directory under `run_dir`, and its accumulator (for images)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dirs = _event_dirs(run_dir)
    if not dirs:
        raise SystemExit(f"no TensorBoard events under {run_dir} (was report_to tensorboard?)")
    acc = EventAccumulator(str(dirs[-1]), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return scalars, acc


def _smooth(values: list[float], window: int = 5) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def plot(scalars: dict, out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, group, heading in ((axes[0], CURVES, "rewards (mean, 5-step moving average)"), (axes[1], SIGNAL, "signal")):
        for label, tag in group.items():
            if tag in scalars:
                steps, values = zip(*scalars[tag])
                ax.plot(steps, _smooth(list(values)) if ax is axes[0] else values, label=label)
        ax.set_title(heading)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = out.with_name(out.name + "_rewards.png")
    fig.savefig(path, dpi=110)
    return path


def save_last_overlay(acc, out: Path) -> Path | None:
    tags = [t for t in acc.Tags().get("images", []) if t.startswith("samples/")]
    if not tags:
        return None
    event = max((acc.Images(t)[-1] for t in tags), key=lambda e: e.step)
    path = out.with_name(out.name + "_overlay.png")
    path.write_bytes(event.encoded_image_string)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the run's output_dir (TensorBoard events under it)")
    parser.add_argument("--out", type=Path, default=Path("docs/images/run"), help="output path prefix")
    parser.add_argument("--title", default="sa2va-trl cycle GRPO")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    scalars, acc = load_scalars(args.run_dir)
    print("wrote", plot(scalars, args.out, args.title))
    overlay = save_last_overlay(acc, args.out)
    if overlay:
        print("wrote", overlay)


if __name__ == "__main__":
    main()

"""Can flattening move DP-SGD on this recipe? The signal, the noise and the AWP step of one update, measured.

    python examples/flatness_diagnostics.py --config examples/configs/movie_reviews_prompt_dp.yaml --epsilons 8 1

Reads only the recipe's public split (``public_fraction`` > 0), at the prefix as initialised. Per prefix layer
``l`` (``d_l`` values) it measures:

- the signal of a DP-SGD update: ``g_l``, the mean over examples of the clipped per-example gradients (clip ``C``
  on the whole gradient, as the recipe clips), and the noise DP-SGD adds to that mean, ``sigma * C / B *
  sqrt(d_l)`` (``B`` the expected logical batch; ``sigma`` calibrated for each epsilon to the recipe's sampling
  rate and steps, as a run would). Their ratio is the update's signal-to-noise ratio; the cosine between the
  released gradient and the signal follows from the totals, ``||g|| / sqrt(||g||^2 + ||noise||^2)``;
- AWP's perturbation ``gamma * ||w_l||`` next to one optimizer step (Adam moves a coordinate by about ``lr``,
  a layer by about ``lr * sqrt(d_l)``), and the loss rise it causes on the public batch along the clean
  gradient (the paper's raw-gradient AWP), along released gradients (strict AWP's direction: the signal plus
  one noise draw per epsilon) and along a random direction (what pure noise would do);
- with ``--prune_layers``, the loss with the prefix removed from those layers (what layer selection's pruning
  costs the initialised prefix).

Writes ``--out`` (JSON) and prints a summary.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Dict, List

import torch

from pflat_lightning import PrivacyConfig
from pflat_lightning.privacy.engine import DPSGDEngine
from pflat_lightning.runs import load_run


def example_gradients(model, batch: Dict, params: List[torch.nn.Parameter]) -> List[List[torch.Tensor]]:
    """Each example's gradient, one backward pass per example."""
    size = next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
    grads = []
    for i in range(size):
        one = {k: v[i:i + 1] if torch.is_tensor(v) else v for k, v in batch.items()}
        grads.append([g.detach() for g in torch.autograd.grad(model.example_losses(one).sum(), params)])
    return grads


def mean_clipped(grads: List[List[torch.Tensor]], clip: float) -> List[torch.Tensor]:
    total = [torch.zeros_like(g) for g in grads[0]]
    for per_example in grads:
        norm = torch.sqrt(sum(g.pow(2).sum() for g in per_example))
        scale = min(1.0, clip / (float(norm) + 1e-12))
        for t, g in zip(total, per_example):
            t.add_(g, alpha=scale)
    return [t / len(grads) for t in total]


@torch.no_grad()
def loss_along(model, batch: Dict, layers: Dict[str, List[torch.nn.Parameter]], direction: Dict[str, List[torch.Tensor]],
               gamma: float) -> float:
    """Mean loss on ``batch`` at ``w + v``, ``v_l = gamma * ||w_l|| * d_l / ||d_l||`` (AWP's step); weights restored."""
    saved = {name: [p.detach().clone() for p in params] for name, params in layers.items()}
    for name, params in layers.items():
        w_norm = torch.sqrt(sum(p.pow(2).sum() for p in params))
        d_norm = torch.sqrt(sum(d.pow(2).sum() for d in direction[name]))
        for p, d in zip(params, direction[name]):
            p.add_(d, alpha=float(gamma * w_norm / (d_norm + 1e-12)))
    loss = float(model.example_losses(batch).mean())
    for name, params in layers.items():
        for p, s in zip(params, saved[name]):
            p.copy_(s)
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", type=Path, required=True, help="the recipe's config file(s)")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 3.0, 1.0])
    parser.add_argument("--gammas", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    parser.add_argument("--examples", type=int, default=64, help="public examples for the gradients and losses")
    parser.add_argument("--prune_layers", type=int, nargs="+", action="append", default=[],
                        help="prefix layers to remove for the pruning measurement (e.g. those a selection pruned); "
                             "repeat the option to measure several sets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/diagnostics/flatness.json"))
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model, data, trainer = load_run([str(p) for p in args.config], overrides=["--data.public_fraction", "0.1"])
    data.setup("fit")
    batch = next(iter(data.public_dataloader(batch_size=args.examples)))
    model.eval()
    layers = model.layer_groups()
    params = [p for group in layers.values() for p in group]
    clip = model.privacy.max_grad_norm
    grads = example_gradients(model, batch, params)
    norms = [float(torch.sqrt(sum(g.pow(2).sum() for g in e))) for e in grads]
    signal = mean_clipped(grads, clip)
    by_layer, start = {}, 0
    for name, group in layers.items():
        by_layer[name] = signal[start:start + len(group)]
        start += len(group)
    sizes = {name: sum(p.numel() for p in group) for name, group in layers.items()}
    signal_norm = {name: float(torch.sqrt(sum(g.pow(2).sum() for g in gs))) for name, gs in by_layer.items()}
    weight_norm = {name: float(torch.sqrt(sum(p.detach().pow(2).sum() for p in group))) for name, group in layers.items()}
    total_signal = math.sqrt(sum(v ** 2 for v in signal_norm.values()))

    dataset_size, batch_size = len(data.train_dataset), data.batch_size
    steps = trainer.max_epochs * math.ceil(dataset_size / batch_size)
    lr = model.optimizer_factory.keywords.get("lr") if hasattr(model.optimizer_factory, "keywords") else None
    base_loss = float(model.example_losses(batch).mean().detach())
    clean = {name: by_layer[name] for name in layers}
    random = {name: [torch.randn_like(g) for g in gs] for name, gs in by_layer.items()}
    result = {"config": [str(p) for p in args.config], "public_examples": len(grads), "clip": clip,
              "per_example_norm": {"median": sorted(norms)[len(norms) // 2], "min": min(norms), "max": max(norms)},
              "clipped_fraction": sum(n > clip for n in norms) / len(norms), "training_examples": dataset_size,
              "expected_batch": batch_size, "steps": steps, "lr": lr, "base_loss": base_loss,
              "signal_norm": total_signal, "layers": {}, "epsilons": {}, "awp": {}}
    for name in layers:
        result["layers"][name] = {"values": sizes[name], "signal": signal_norm[name], "weight": weight_norm[name]}
    for epsilon in args.epsilons:
        engine = DPSGDEngine(PrivacyConfig(target_epsilon=epsilon, max_grad_norm=clip))
        engine.plan(dataset_size=dataset_size, expected_batch_size=batch_size, planned_steps=steps)
        std = engine.noise_multiplier * clip / batch_size  # per coordinate, on the mean gradient
        noise_norm = {name: std * math.sqrt(sizes[name]) for name in layers}
        total_noise = math.sqrt(sum(v ** 2 for v in noise_norm.values()))
        released = {name: [g + std * torch.randn_like(g) for g in gs] for name, gs in by_layer.items()}
        result["epsilons"][str(epsilon)] = {
            "noise_multiplier": engine.noise_multiplier, "noise_norm": total_noise,
            "signal_to_noise": total_signal / total_noise,
            "cosine_released_signal": total_signal / math.hypot(total_signal, total_noise),
            "layer_signal_to_noise": {name: signal_norm[name] / noise_norm[name] for name in layers},
            "awp_loss_rise": {str(g): loss_along(model, batch, layers, released, g) - base_loss for g in args.gammas},
        }
    for gamma in args.gammas:
        result["awp"][str(gamma)] = {
            "perturbation_over_adam_step": (sum((gamma * weight_norm[n]) ** 2 for n in layers) ** 0.5
                                            / (lr * math.sqrt(sum(sizes.values()))) if lr else None),
            "loss_rise_clean": loss_along(model, batch, layers, clean, gamma) - base_loss,
            "loss_rise_random": loss_along(model, batch, layers, random, gamma) - base_loss,
        }
    result["pruned"] = []
    for pruned in args.prune_layers:
        keep = [i not in pruned for i in range(len(model.prefix_layer_mask()))]
        model.set_prefix_layer_mask(keep)
        with torch.no_grad():
            result["pruned"].append({"layers": pruned, "loss": float(model.example_losses(batch).mean())})
        model.set_prefix_layer_mask([True] * len(keep))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(grads)} public examples: per-example gradient norm median {result['per_example_norm']['median']:.3g} "
          f"(clip {clip}, {result['clipped_fraction']:.0%} clipped); mean clipped gradient {total_signal:.3g}; "
          f"base loss {base_loss:.4f}")
    for epsilon, row in result["epsilons"].items():
        snr = sorted(row["layer_signal_to_noise"].values())
        print(f"epsilon {epsilon}: sigma {row['noise_multiplier']:.3f}, noise {row['noise_norm']:.3g}, SNR "
              f"{row['signal_to_noise']:.3f} (layers {snr[0]:.3f}-{snr[-1]:.3f}), cosine(released, signal) "
              f"{row['cosine_released_signal']:.3f}, AWP loss rise along the released gradient "
              + ", ".join(f"gamma {g}: {v:+.4f}" for g, v in row["awp_loss_rise"].items()))
    for gamma, row in result["awp"].items():
        ratio = row["perturbation_over_adam_step"]
        print(f"AWP gamma {gamma}: perturbation / Adam step {ratio if ratio is None else f'{ratio:.3g}'}; loss rise "
              f"along the clean gradient {row['loss_rise_clean']:+.4f}, along a random direction "
              f"{row['loss_rise_random']:+.4f}")
    for row in result["pruned"]:
        print(f"prefix removed from layers {row['layers']}: loss {row['loss']:.4f} (base {base_loss:.4f})")
    print(f"Written to {args.out}")


if __name__ == "__main__":
    main()

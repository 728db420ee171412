"""Sharpness and loss-landscape measures of any module that follows :mod:`pflat_lightning.protocol`.

Every measure looks at the parameters the module names in ``layer_groups()`` (for
``PrefixTunedClassifier``: each active prefix layer, the parameters of the paper's curves; for a plain
LightningModule: its trainable parameters grouped by owning submodule) and at the task loss only: the
mean of ``example_losses(batch)`` over every example of the evaluation batches, with the module's
``loss_terms`` (teacher distillation) temporarily emptied, the module in eval mode and Opacus'
per-example hooks disabled. Afterwards the weights, the training/eval mode of every submodule, the
loss terms and the hooks are exactly as before (see :func:`measuring`); the global random state is
never touched (random directions use their own seeded generator). A module without ``example_losses``
gets one ``TypeError`` listing what it lacks (:func:`~pflat_lightning.protocol.check_contract`).

The measures:

- :func:`paper_curve`: the paper's flatness indicator, the loss at ``w + alpha * radius * d`` along a
  unit-norm direction ``d``; its sharpness is ``max_alpha L(w + alpha * radius * d) - L(w)``.
- :func:`sam_sharpness`: the largest loss increase within a per-layer radius ``rho * ||w_l||``
  (the AWP/SAM neighbourhood), found by projected gradient ascent.
- :func:`random_slice`: 1-D and 2-D filter-normalised random slices (Li et al. 2018).

Batches are collections of tensors with one row per example (the batches of every pflat datamodule);
their size is their first tensor's length (:func:`~pflat_lightning.protocol.num_examples`).
Results are plain dicts of floats, lists and strings, ready for ``json.dump``.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn
from torch.utils.data import DataLoader

from pflat_lightning.checks import check_choice, check_count
from pflat_lightning.protocol import (
    PerExampleLosses,
    check_contract,
    layer_groups,
    num_examples,
    privacy_engine,
    task_loss_mode,
)

Batch = Dict[str, Any]
Groups = Dict[str, List[nn.Parameter]]

#: The paper's grid: alpha = 0, 0.1, ..., 1.0.
DEFAULT_ALPHAS = [round(0.1 * i, 1) for i in range(11)]
#: ``"gradient"``: the normalised gradient of the evaluation loss; ``"released"``: the last released
#: (noised) DP gradient, ``engine.released_gradient``.
DIRECTIONS = ("gradient", "released")
#: How a 1-D parameter (bias, LayerNorm) enters a random slice: not moved, or as one filter.
ONE_DIM = ("zero", "filter")
#: The evaluation data a measurement reads; ``"private"`` is the private training split.
DATA_SPLITS = ("validation", "test", "public", "private")
#: Batch size of the sequential loader over the training split when the datamodule names none.
DEFAULT_EVAL_BATCH_SIZE = 64
#: The name of the measurement in the privacy report and the ledger.
SECTION = "LossLandscape"
#: Ledger detail of a measurement on the private training split (status ``"evaluation"``).
PRIVATE_EVALUATION = ("loss landscape and sharpness measured on private training examples after training: the "
                      "model's guarantee is unaffected, the reported numbers are not private")


# ---------------------------------------------------------------------- argument checks
def check_alphas(alphas: Sequence[float]) -> List[float]:
    """``alphas`` as a list; it must start at 0 (the unperturbed loss) and hold finite values >= 0."""
    values = [float(a) for a in alphas]
    if not values or values[0] != 0 or any(not math.isfinite(a) or a < 0 for a in values):
        raise ValueError(f"alphas must start at 0 (the unperturbed loss) and hold finite values >= 0, got {alphas}.")
    return values


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}.")


def _check_slice(dims: int, points: int, span: float, one_dim: str) -> None:
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 or 2, got {dims}.")
    check_count("points", points, 2)
    _check_positive("span", span)
    check_choice("one_dim", one_dim, ONE_DIM)


# ---------------------------------------------------------------------- data
def collect_batches(
    batches: Iterable[Batch], num_batches: Optional[int] = None, device: Optional[torch.device] = None
) -> List[Batch]:
    """The non-empty batches of ``batches`` (the first ``num_batches`` of them, or all), on ``device``.

    Every measure evaluates the same batches many times: collect them once from a loader.
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be None (all) or an integer >= 1, got {num_batches}.")
    collected: List[Batch] = []
    for batch in batches:
        if num_examples(batch) == 0:
            continue
        collected.append(batch if device is None else move_data_to_device(batch, device))
        if num_batches is not None and len(collected) == num_batches:
            break
    if not collected:
        raise ValueError("The evaluation data holds no examples.")
    return collected


def split_loader(datamodule: Any, data: str, *, batch_size: Optional[int] = None) -> Iterable[Batch]:
    """The loader of evaluation split ``data`` of ``datamodule``.

    ``"validation"``, ``"test"`` and ``"public"`` are the datamodule's ``val_dataloader()``,
    ``test_dataloader()`` and ``public_dataloader()`` (the first loader where it returns several).
    ``"private"`` is a sequential, evaluation-style loader over the dataset of ``train_dataloader()``
    with its collate function (never the Poisson sampler), in batches of ``batch_size`` (default: the
    datamodule's ``eval_batch_size``, else :data:`DEFAULT_EVAL_BATCH_SIZE`). For the other splits a
    ``batch_size`` other than their loader's rebatches the same examples, in order.
    """
    check_choice("data", data, DATA_SPLITS)
    if data == "private":
        train = datamodule.train_dataloader()
        size = batch_size or getattr(datamodule, "eval_batch_size", None) or DEFAULT_EVAL_BATCH_SIZE
        return DataLoader(train.dataset, batch_size=size, shuffle=False, collate_fn=train.collate_fn)
    method = {"validation": "val_dataloader", "test": "test_dataloader", "public": "public_dataloader"}[data]
    if not hasattr(datamodule, method):
        raise ValueError(f"data={data!r} needs a datamodule with {method}(), got {type(datamodule).__name__}.")
    loader = getattr(datamodule, method)()
    if isinstance(loader, (list, tuple)):
        if not loader:
            raise ValueError(f"data={data!r}: the datamodule has no {data} split.")
        loader = loader[0]
    if batch_size is not None and getattr(loader, "batch_size", None) != batch_size:
        loader = DataLoader(loader.dataset, batch_size=batch_size, shuffle=False, collate_fn=loader.collate_fn)
    return loader


# ---------------------------------------------------------------------- parameters and state
def landscape_groups(module: nn.Module, groups: Optional[Groups] = None) -> Groups:
    """``groups``, or the module's ``layer_groups()`` (see :mod:`pflat_lightning.protocol`)."""
    groups = layer_groups(module) if groups is None else groups
    if not any(groups.values()):
        raise ValueError(f"{type(module).__name__} has no parameters to measure: its layer groups are empty.")
    return groups


def _flat(groups: Groups) -> List[nn.Parameter]:
    return [p for params in groups.values() for p in params]


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@contextmanager
def measuring(module: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[List[Tensor]]:
    """Evaluate the task loss of ``module`` and move ``params`` freely; restore everything on exit.

    Inside: :func:`~pflat_lightning.protocol.task_loss_mode` (every submodule in eval mode,
    ``module.loss_terms`` empty) and Opacus' hooks (of ``module.engine``) disabled. On exit ``params`` get
    their saved values back bit for bit and the mode of each submodule, the loss-term list and the hooks'
    state are restored. Yields copies of the weights ``w`` of ``params``.
    """
    weights = [p.detach().clone() for p in params]
    engine = privacy_engine(module)
    hooks = engine.hooks if engine is not None else None
    hooks_enabled = hooks is not None and hooks.hooks_enabled
    if hooks_enabled:
        hooks.disable_hooks()
    try:
        with task_loss_mode(module):
            yield weights
    finally:
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)
        if hooks_enabled:
            hooks.enable_hooks()


def _place(params: Sequence[nn.Parameter], weights: Sequence[Tensor], directions: Sequence[Sequence[Tensor]],
           coefficients: Sequence[float]) -> None:
    """``params <- weights + sum_k coefficients[k] * directions[k]``."""
    with torch.no_grad():
        for i, (p, w) in enumerate(zip(params, weights)):
            point = w.clone()
            for c, d in zip(coefficients, directions):
                if c != 0:
                    point.add_(d[i], alpha=c)
            p.copy_(point)


def _examples(batches: Sequence[Batch]) -> int:
    return sum(num_examples(b) for b in batches)


def _mean_loss(module: nn.Module, batches: Sequence[Batch]) -> float:
    with torch.no_grad():
        total = sum(float(module.example_losses(b).sum()) for b in batches)
    return total / _examples(batches)


def _loss_and_gradient(module: nn.Module, batches: Sequence[Batch], params: Sequence[nn.Parameter]
                       ) -> Tuple[float, List[Tensor]]:
    """The mean loss over ``batches`` and its gradient (zeros for parameters that need no gradient)."""
    count = _examples(batches)
    gradient = [torch.zeros_like(p) for p in params]
    index = [i for i, p in enumerate(params) if p.requires_grad]
    total = 0.0
    with torch.enable_grad():
        for batch in batches:
            losses = module.example_losses(batch)
            total += float(losses.detach().sum())
            if not index or not losses.requires_grad:
                continue
            parts = torch.autograd.grad(losses.sum() / count, [params[i] for i in index], allow_unused=True)
            for i, part in zip(index, parts):
                if part is not None:
                    gradient[i] += part
    return total / count, gradient


def _norm(tensors: Iterable[Tensor]) -> float:
    return math.sqrt(sum(float((t.detach().double() ** 2).sum()) for t in tensors))


def _unit(direction: Sequence[Tensor]) -> Tuple[List[Tensor], float]:
    """``direction / ||direction||`` (all zeros for a zero direction) and ``||direction||``."""
    norm = _norm(direction)
    if norm == 0:
        return [torch.zeros_like(d) for d in direction], 0.0
    return [d / norm for d in direction], norm


# ---------------------------------------------------------------------- directions
def gradient_direction(module: nn.Module, batches: Iterable[Batch], *, groups: Optional[Groups] = None) -> List[Tensor]:
    """The unit-norm gradient of the mean task loss over ``batches`` (all zeros where it vanishes),
    one tensor per parameter of ``groups`` in order."""
    check_contract(module, PerExampleLosses, who="gradient_direction")
    params = _flat(landscape_groups(module, groups))
    batches = collect_batches(batches, device=_device(module))
    with measuring(module, params):
        _, gradient = _loss_and_gradient(module, batches, params)
    return _unit(gradient)[0]


def released_direction(module: nn.Module, *, groups: Optional[Groups] = None) -> Optional[List[Tensor]]:
    """The last released (noised) DP gradient ``module.engine.released_gradient`` restricted to the
    parameters of ``groups`` and normalised to unit norm; ``None`` when there is none (a non-private
    module, or an engine that kept none: set ``engine.keep_released_gradient = True`` before training).
    Using it is post-processing of a release: it costs no privacy."""
    released = _released(module, _flat(landscape_groups(module, groups)))
    return None if released is None else released[0]


def _released(module: nn.Module, params: Sequence[nn.Parameter]) -> Optional[Tuple[List[Tensor], float]]:
    engine = privacy_engine(module)
    if engine is None or engine.released_gradient is None:
        return None
    released = dict(zip(engine.optimizer.params, engine.released_gradient))
    return _unit([released.get(p, torch.zeros_like(p)).to(p.device) for p in params])


def _direction(module: nn.Module, batches: Sequence[Batch], params: Sequence[nn.Parameter],
               direction: Union[str, Sequence[Tensor]]) -> Tuple[str, List[Tensor], float]:
    """(label, unit direction, norm before normalising) for :func:`paper_curve`."""
    if isinstance(direction, str):
        check_choice("direction", direction, DIRECTIONS)
        if direction == "gradient":
            return (direction, *_unit(_loss_and_gradient(module, batches, params)[1]))
        released = _released(module, params)
        if released is None:
            raise ValueError(
                "direction='released' needs the last released DP gradient (module.engine.released_gradient), and "
                f"{type(module).__name__} holds none: use direction='gradient', or a private module trained with "
                "engine.keep_released_gradient = True."
            )
        return (direction, *released)
    given = list(direction)
    if len(given) != len(params) or any(d.shape != p.shape for d, p in zip(given, params)):
        raise ValueError(
            f"direction must be 'gradient', 'released' or one tensor per measured parameter with its shape "
            f"({[tuple(p.shape) for p in params]}), got {[tuple(d.shape) for d in given]}."
        )
    return ("given", *_unit([d.to(p.device, p.dtype) for d, p in zip(given, params)]))


# ---------------------------------------------------------------------- the paper's curve
def paper_curve(
    module: nn.Module,
    batches: Iterable[Batch],
    *,
    alphas: Optional[Sequence[float]] = None,
    radius: float = 1.0,
    direction: Union[str, Sequence[Tensor]] = "gradient",
    groups: Optional[Groups] = None,
) -> Dict[str, Any]:
    """The paper's flatness indicator: the mean loss at ``w + alpha * radius * d`` for each ``alpha``.

    ``d`` is a unit-norm direction over the parameters of ``groups`` (default: the module's layer
    groups): the normalised gradient of the mean loss over ``batches`` (``"gradient"``), the last
    released DP gradient (``"released"``, see :func:`released_direction`), or given tensors (one per
    parameter, normalised here). The **sharpness** is ``max_alpha L(w + alpha * radius * d) - L(w)``:
    how much the loss can rise along ``d`` within distance ``radius`` (the paper used alpha = 0, 0.1,
    ..., 1 and radius 1); it is 0 when the loss never rises above ``L(w)`` on the grid.

    Args:
        module: follows the protocol (``example_losses``; ``layer_groups`` optional).
        batches: evaluation batches (a loader or a list; see :func:`collect_batches`).
        alphas: the grid, starting at 0 (default :data:`DEFAULT_ALPHAS`).
        radius: distance from ``w`` at ``alpha = 1``.
        direction: ``"gradient"``, ``"released"`` or one tensor per parameter.
        groups: the parameters to move (default: ``layer_groups(module)``).

    Returns:
        ``{"alphas", "radius", "losses", "loss", "sharpness", "direction", "direction_norm",
        "examples"}``: ``losses[i]`` is the loss at ``alphas[i]``, ``loss`` the loss at ``w``,
        ``direction_norm`` the norm of the direction before normalising (the gradient norm for
        ``"gradient"``; 0 means the curve is flat by construction).

    Example::

        curve = paper_curve(model, datamodule.val_dataloader(), radius=1.0)
        print(curve["sharpness"])
    """
    check_contract(module, PerExampleLosses, who="paper_curve")
    alphas = check_alphas(DEFAULT_ALPHAS if alphas is None else alphas)
    _check_positive("radius", radius)
    params = _flat(landscape_groups(module, groups))
    batches = collect_batches(batches, device=_device(module))
    with measuring(module, params) as weights:
        label, unit, norm = _direction(module, batches, params, direction)
        losses = []
        for alpha in alphas:
            _place(params, weights, [unit], [alpha * radius])
            losses.append(_mean_loss(module, batches))
    return {"alphas": alphas, "radius": float(radius), "losses": losses, "loss": losses[0],
            "sharpness": max(losses) - losses[0], "direction": label, "direction_norm": norm,
            "examples": _examples(batches)}


# ---------------------------------------------------------------------- SAM sharpness
def sam_perturbation(
    module: nn.Module,
    batches: Iterable[Batch],
    *,
    rho: float = 0.05,
    steps: int = 5,
    step_size: float = 0.5,
    groups: Optional[Groups] = None,
) -> Tuple[List[Tensor], Dict[str, Any]]:
    """The perturbation behind :func:`sam_sharpness` (one tensor per parameter of ``groups``) and its result.

    The feasible set is the AWP neighbourhood: layer group ``l`` may move by ``e_l`` with
    ``||e_l|| <= r_l = rho * ||w_l||`` (norms over all of the group's parameters together). The ascent
    starts with the single normalised-gradient step ``e_l = r_l * g_l / ||g_l||`` (AWP's and SAM's one
    step; it maximises the first-order increase over that set), then takes ``steps`` projected
    gradient-ascent steps ``e_l <- P(e_l + step_size * r_l * g_l / ||g_l||)`` with ``g`` the gradient
    at ``w + e`` and ``P`` the projection of each group onto its ball. The iterate with the highest
    loss (or ``e = 0``, if none raises the loss) is returned. It is a local search: a lower bound on
    the true maximum, and 0 at a point where the gradient vanishes.
    """
    check_contract(module, PerExampleLosses, who="sam_sharpness")
    _check_positive("rho", rho)
    check_count("steps", steps, 0)
    _check_positive("step_size", step_size)
    groups = landscape_groups(module, groups)
    params = _flat(groups)
    spans, start = [], 0
    for group in groups.values():
        spans.append(range(start, start + len(group)))
        start += len(group)
    batches = collect_batches(batches, device=_device(module))
    with measuring(module, params) as weights:
        radii = [rho * _norm(weights[i] for i in span) for span in spans]
        base, gradient = _loss_and_gradient(module, batches, params)
        zero = [torch.zeros_like(w) for w in weights]
        best_loss, best = base, zero
        perturbation = _ascent_step(zero, gradient, spans, radii, 1.0)
        for step in range(steps + 1):
            _place(params, weights, [perturbation], [1.0])
            if step < steps:
                loss, gradient = _loss_and_gradient(module, batches, params)
            else:
                loss = _mean_loss(module, batches)
            if loss > best_loss:
                best_loss, best = loss, perturbation
            if step < steps:
                perturbation = _ascent_step(perturbation, gradient, spans, radii, step_size)
    result = {
        "rho": float(rho), "steps": steps, "step_size": float(step_size), "loss": base, "perturbed_loss": best_loss,
        "sharpness": best_loss - base, "examples": _examples(batches),
        "groups": {
            name: {"weight_norm": radius / rho, "radius": radius, "perturbation_norm": _norm(best[i] for i in span)}
            for name, span, radius in zip(groups, spans, radii)
        },
    }
    return best, result


def _ascent_step(perturbation: List[Tensor], gradient: List[Tensor], spans: List[range], radii: List[float],
                 step_size: float) -> List[Tensor]:
    """One projected step: each group moves ``step_size * r_l`` along its normalised gradient, then is
    projected back onto its ball of radius ``r_l``."""
    moved = [e.clone() for e in perturbation]
    for span, radius in zip(spans, radii):
        g_norm = _norm(gradient[i] for i in span)
        if g_norm > 0:
            for i in span:
                moved[i].add_(gradient[i], alpha=step_size * radius / g_norm)
        e_norm = _norm(moved[i] for i in span)
        if e_norm > radius:
            for i in span:
                moved[i].mul_(radius / e_norm)
    return moved


def sam_sharpness(
    module: nn.Module,
    batches: Iterable[Batch],
    *,
    rho: float = 0.05,
    steps: int = 5,
    step_size: float = 0.5,
    groups: Optional[Groups] = None,
) -> Dict[str, Any]:
    """SAM sharpness: the largest rise of the mean loss when each layer group ``l`` may move by at most
    ``rho * ||w_l||`` (relative radius, as in AWP), found by projected gradient ascent (see
    :func:`sam_perturbation` for the steps), reported as the increase over ``L(w)``.

    Args:
        module: follows the protocol (``example_losses``; ``layer_groups`` optional).
        batches: evaluation batches (a loader or a list).
        rho: relative radius of each group's perturbation.
        steps: projected ascent steps after the first normalised-gradient step (0: that step only).
        step_size: length of an ascent step, as a fraction of each group's radius.
        groups: the parameters to perturb (default: ``layer_groups(module)``).

    Returns:
        ``{"rho", "steps", "step_size", "loss", "perturbed_loss", "sharpness", "examples", "groups"}``
        with, per group, ``weight_norm``, ``radius`` (``rho * weight_norm``) and the
        ``perturbation_norm`` of the maximiser found.

    Example::

        print(sam_sharpness(model, val_batches, rho=0.05)["sharpness"])
    """
    return sam_perturbation(module, batches, rho=rho, steps=steps, step_size=step_size, groups=groups)[1]


# ---------------------------------------------------------------------- random slices
def filter_normalized_direction(params: Sequence[nn.Parameter], generator: torch.Generator, *,
                                one_dim: str = "zero") -> List[Tensor]:
    """A random direction with Li et al.'s (2018) filter normalisation, one tensor per parameter.

    Each parameter draws ``z = torch.randn(p.shape, generator=generator)`` (float32, on the CPU, one
    draw per parameter in order, whatever ``one_dim``). A **filter** is a slice ``p[i]`` along the first
    dimension of a parameter with two or more dimensions: one row of a linear layer's weight (an output
    unit's incoming weights), one row of an embedding table (for a prefix layer: one virtual token's
    keys and values), one output filter of a convolution. Each filter of ``z`` is rescaled to the norm
    of the matching filter of ``w``: ``d[i] = z[i] / ||z[i]|| * ||w[i]||`` (a zero filter of ``w``
    gives a zero filter of ``d``). A 1-D parameter (bias, LayerNorm weight) or scalar is not moved
    (``one_dim="zero"``, as Li et al. do for biases and batch-norm parameters) or treated as one filter
    (``one_dim="filter"``: ``d = z / ||z|| * ||w||``).
    """
    check_choice("one_dim", one_dim, ONE_DIM)
    direction = []
    for p in params:
        z = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device, p.dtype)
        w = p.detach()
        if w.dim() <= 1 and one_dim == "zero":
            direction.append(torch.zeros_like(w))
            continue
        rows = 1 if w.dim() <= 1 else w.shape[0]
        z_rows, w_rows = z.reshape(rows, -1), w.reshape(rows, -1)
        scale = w_rows.norm(dim=1, keepdim=True) / z_rows.norm(dim=1, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny)
        direction.append((z_rows * scale).reshape(w.shape))
    return direction


def random_slice(
    module: nn.Module,
    batches: Iterable[Batch],
    *,
    dims: int = 1,
    points: int = 21,
    span: float = 1.0,
    seed: int = 0,
    one_dim: str = "zero",
    groups: Optional[Groups] = None,
) -> Dict[str, Any]:
    """The loss on a 1-D line or a 2-D plane through ``w`` along filter-normalised random directions.

    ``dims`` directions ``d1`` (and ``d2``) are drawn in that order from ``torch.Generator().manual_seed(seed)``
    by :func:`filter_normalized_direction`; the coordinates are ``points`` evenly spaced values from
    ``-span`` to ``span`` (``w`` itself is on the grid when ``points`` is odd).

    Args:
        module: follows the protocol (``example_losses``; ``layer_groups`` optional).
        batches: evaluation batches (a loader or a list).
        dims: 1 (a line) or 2 (a plane).
        points: grid points per axis.
        span: the grid reaches ``+-span`` times each direction (1: a filter-sized step, Li et al.'s plots).
        seed: seed of the random directions.
        one_dim: how 1-D parameters move: ``"zero"`` or ``"filter"``.
        groups: the parameters to move (default: ``layer_groups(module)``).

    Returns:
        ``{"dims", "x", "losses", "loss", "span", "seed", "one_dim", "examples"}`` and, for 2-D, ``"y"``:
        1-D: ``losses[j]`` is the loss at ``w + x[j] * d1``; 2-D: ``losses[i][j]`` is the loss at
        ``w + x[j] * d1 + y[i] * d2`` (rows follow ``y``, as matplotlib's ``contour`` expects);
        ``loss`` is the loss at ``w``.

    Example::

        plane = random_slice(model, val_batches, dims=2, points=11)
    """
    check_contract(module, PerExampleLosses, who="random_slice")
    _check_slice(dims, points, span, one_dim)
    params = _flat(landscape_groups(module, groups))
    batches = collect_batches(batches, device=_device(module))
    coordinates = [-span + 2 * span * i / (points - 1) for i in range(points)]
    generator = torch.Generator().manual_seed(seed)
    directions = [filter_normalized_direction(params, generator, one_dim=one_dim) for _ in range(dims)]
    with measuring(module, params) as weights:
        loss = _mean_loss(module, batches)

        def at(*coefficients: float) -> float:
            _place(params, weights, directions, coefficients)
            return _mean_loss(module, batches)

        if dims == 1:
            losses: List[Any] = [at(x) for x in coordinates]
        else:
            losses = [[at(x, y) for x in coordinates] for y in coordinates]
    result = {"dims": dims, "x": coordinates, "losses": losses, "loss": loss, "span": float(span), "seed": seed,
              "one_dim": one_dim, "examples": _examples(batches)}
    if dims == 2:
        result["y"] = coordinates
    return result


# ---------------------------------------------------------------------- the full measurement
@dataclass(frozen=True)
class LandscapeSettings:
    """What :func:`measure_landscape` computes (the callback's and ``pflat landscape``'s settings).

    Args:
        alphas: grid of the paper's curve (starts at 0).
        radius: length of the curve's step at ``alpha = 1``.
        direction: the curve's direction, ``"gradient"`` (comparable across private and non-private
            runs) or ``"released"`` (the last released DP gradient).
        sam_rho: relative radius of SAM sharpness.
        sam_steps: projected ascent steps of SAM sharpness.
        slice_1d_points: grid points of the 1-D random slice (0: no 1-D slice).
        slice_2d_points: grid points per axis of the 2-D random slice (0: no 2-D slice).
        span: extent of the random slices.
        seed: seed of the random slices' directions.
    """

    alphas: Sequence[float] = field(default_factory=lambda: list(DEFAULT_ALPHAS))
    radius: float = 1.0
    direction: str = "gradient"
    sam_rho: float = 0.05
    sam_steps: int = 5
    slice_1d_points: int = 21
    slice_2d_points: int = 11
    span: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "alphas", check_alphas(self.alphas))
        _check_positive("radius", self.radius)
        check_choice("direction", self.direction, DIRECTIONS)
        _check_positive("sam_rho", self.sam_rho)
        check_count("sam_steps", self.sam_steps, 0)
        for name in ("slice_1d_points", "slice_2d_points"):
            value = getattr(self, name)
            if value != 0 and value < 2:
                raise ValueError(f"{name} must be 0 (no slice) or an integer >= 2, got {value}.")
        _check_positive("span", self.span)


def measure_landscape(module: nn.Module, batches: Iterable[Batch], settings: Optional[LandscapeSettings] = None, *,
                      data: Optional[str] = None) -> Dict[str, Any]:
    """Every measure at once: the paper's curve, SAM sharpness and the random slices of ``settings``.

    Returns ``{"data", "examples", "groups", "loss", "sharpness", "sam_sharpness", "curve", "sam"}`` plus
    ``"slice_1d"`` / ``"slice_2d"`` when their points are not 0; ``sharpness`` is the curve's.
    """
    settings = settings or LandscapeSettings()
    groups = landscape_groups(module)
    batches = collect_batches(batches, device=_device(module))
    curve = paper_curve(module, batches, alphas=settings.alphas, radius=settings.radius,
                        direction=settings.direction, groups=groups)
    sam = sam_sharpness(module, batches, rho=settings.sam_rho, steps=settings.sam_steps, groups=groups)
    result = {"data": data, "examples": curve["examples"], "groups": list(groups), "loss": curve["loss"],
              "sharpness": curve["sharpness"], "sam_sharpness": sam["sharpness"], "curve": curve, "sam": sam}
    for dims, points in ((1, settings.slice_1d_points), (2, settings.slice_2d_points)):
        if points:
            result[f"slice_{dims}d"] = random_slice(module, batches, dims=dims, points=points, span=settings.span,
                                                    seed=settings.seed, groups=groups)
    return result


def landscape_section(result: Dict[str, Any]) -> Dict[str, Any]:
    """The numbers of a :func:`measure_landscape` result that go into the privacy report."""
    curve, sam = result["curve"], result["sam"]
    return {"data": result["data"], "examples": result["examples"], "loss": result["loss"],
            "sharpness": result["sharpness"], "radius": curve["radius"], "direction": curve["direction"],
            "sam_sharpness": result["sam_sharpness"], "sam_rho": sam["rho"]}

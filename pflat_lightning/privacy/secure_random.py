"""Random draws from the operating system's CSPRNG, for ``PrivacyConfig(secure_mode=True)``.

Every draw reads fresh bytes from ``os.urandom`` (the kernel's cryptographically secure generator): there
is no seed and no generator state, so nothing in a checkpoint, a config or the code lets anyone regenerate
a noise draw or a Poisson mask. This defends against the attack on seeded pseudo-random noise (whoever
knows the seed or the generator state subtracts the noise from a released gradient).

What it does not defend against: floating-point attacks on the Gaussian sampler (the gaps and biases of
floating-point Gaussians that let an observer of the exact released values distinguish neighbouring
datasets, Mironov 2012, Jin et al. 2021) are not addressed beyond drawing in float64 from 53-bit uniforms
(Box-Muller) and rounding once to the parameters' dtype; timing side channels are not addressed either.
Both functions are slower than torch's generators (the bytes come through a system call and the
transform runs on the CPU).
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch

_MANTISSA = 53  # a float64 holds every multiple of 2**-53 in [0, 1) exactly


def uniform(count: int) -> torch.Tensor:
    """``count`` independent uniform draws in ``[0, 1)`` (float64 multiples of ``2**-53``) from ``os.urandom``."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}.")
    if count == 0:  # torch.frombuffer refuses an empty buffer
        return torch.zeros(0, dtype=torch.float64)
    words = torch.frombuffer(bytearray(os.urandom(8 * count)), dtype=torch.int64)
    return (words & ((1 << _MANTISSA) - 1)).to(torch.float64) * 2.0**-_MANTISSA


def gaussian(shape: Sequence[int], std: float, *, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """A tensor of independent ``N(0, std**2)`` draws: float64 Box-Muller on :func:`uniform` draws, scaled by
    ``std`` in float64 and then cast to ``dtype`` on ``device``."""
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}.")
    count = math.prod(shape)
    pairs = (count + 1) // 2
    draws = uniform(2 * pairs)
    radius = torch.sqrt(-2.0 * torch.log1p(-draws[:pairs]))  # 1 - u is in (0, 1]: the log is finite
    angle = (2.0 * math.pi) * draws[pairs:]
    normal = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:count]
    return (normal * std).reshape(tuple(shape)).to(dtype=dtype, device=device)

"""Sky-subtraction methods by name: ``supersky`` and ``pca`` (the pipeline baselines), ``smi`` and
``smi-safe`` (SMI with the sky-fibre cross-validation safety net of :mod:`jaxlab.sky.safety`).

``estimate_sky(plate, "pca")`` is what ``python -m jaxlab sky subtract --method pca`` runs; the
command's ``choices`` are :data:`METHODS`' names. SMI needs a model trained beforehand
(:func:`jaxlab.sky.train_smi`, or ``sky train``); :func:`training_plates` simulates plates to train
one on.

Letters: F fibres, W wavelength pixels.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxlab.errors import UserError
from jaxlab.registry import Registry
from jaxlab.sky.baselines import pca_clean, super_sky
from jaxlab.sky.plate import Plate
from jaxlab.sky.simulate import simulate_plate

__all__ = ["SkyMethod", "METHODS", "estimate_sky", "training_plates"]


@dataclasses.dataclass(frozen=True)
class SkyMethod:
    """``estimate(plate, model) -> sky [F, W]``; ``needs_model``: it takes a trained model."""

    estimate: Callable[[Plate, Any], np.ndarray]
    needs_model: bool = False
    description: str = ""


METHODS: Registry[SkyMethod] = Registry("sky method")


def _smi(plate: Plate, model) -> np.ndarray:
    from jaxlab.sky.smi import load_smi, smi_sky

    if isinstance(model, str | os.PathLike):
        model = load_smi(model)
    return smi_sky(model, plate)


METHODS.register(
    "supersky",
    SkyMethod(lambda plate, model: super_sky(plate), description="LAMOST's Super Sky baseline"),
)
METHODS.register(
    "pca",
    SkyMethod(lambda plate, model: pca_clean(plate), description="Super Sky + PCA residual clean"),
)
METHODS.register(
    "smi", SkyMethod(_smi, needs_model=True, description="SMI networks (a trained model)")
)


def _smi_safe(plate: Plate, model) -> np.ndarray:
    from jaxlab.sky.safety import safe_sky
    from jaxlab.sky.smi import load_smi, smi_level_candidates

    if isinstance(model, str | os.PathLike):
        model = load_smi(model)
    sky, report = safe_sky(plate, smi_level_candidates(model))
    LAST_REPORT.clear()
    LAST_REPORT.update(report)
    return sky


LAST_REPORT: dict = {}  # the safety net's report for the last `smi-safe` plate

METHODS.register(
    "smi-safe",
    SkyMethod(
        _smi_safe,
        needs_model=True,
        description="SMI blended towards the better of Super Sky and PCA by sky-fibre "
        "cross-validation (jaxlab.sky.safety), with each band's per-fibre level model "
        "(throughput power 1, 0.5, 0) chosen the same way",
    ),
)


def estimate_sky(plate: Plate, method: str = "supersky", *, model=None) -> np.ndarray:
    """The sky of every fibre ``[F, W]`` by the named method.

    Args:
      plate: the plate (sky fibres flagged).
      method: a name in :data:`METHODS`.
      model: for methods that need one (``smi``): an :class:`~jaxlab.sky.SMIModel` or the
        directory :func:`~jaxlab.sky.save_smi` wrote.
    """
    spec = METHODS.get(method)
    if spec.needs_model and model is None:
        raise UserError(
            f"sky method {method!r} needs a trained model (train one with jaxlab.sky.train_smi "
            "or `python -m jaxlab sky train`)"
        )
    if not spec.needs_model and model is not None:
        raise UserError(f"sky method {method!r} takes no model")
    return spec.estimate(plate, model)


def training_plates(n: int, seed: int, like: Plate | None = None) -> list[Plate]:
    """``n`` simulated plates (seeds ``seed`` .. ``seed + n - 1``) to train SMI on, with the fibre
    and sky-fibre counts of ``like`` (default 250 fibres, 20 of them sky)."""
    return [
        simulate_plate(
            seed + i,
            n_fibers=like.n_fibers if like is not None else 250,
            n_sky=int(like.is_sky.sum()) if like is not None else 20,
        )
        for i in range(n)
    ]

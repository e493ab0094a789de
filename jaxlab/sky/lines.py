"""Wavelengths of the sky: night-sky emission lines, light-pollution lines, stellar and galaxy
features of the simulated objects, and the windows and regions the metrics use.

All wavelengths are vacuum Angstrom. One module so that the simulator, the baselines, the SMI model
and the metrics agree on the same lines.
"""

from __future__ import annotations

__all__ = [
    "BLUE_RED_SPLIT",
    "ANCHOR_LINES",
    "LINE_GROUPS",
    "PARAMETRIC_SKY_LINES",
    "POLLUTION_LINES",
    "STAR_ABSORPTION_LINES",
    "GALAXY_EMISSION_LINES",
    "CONTINUUM_WINDOWS",
]

BLUE_RED_SPLIT = 4500.0  # Angstrom: the "blue end" of the metrics is below it, the red end above

# Strong isolated sky lines used as anchors for line scaling and shift estimates.
ANCHOR_LINES = (
    4047.7,
    4359.6,
    5462.3,
    5578.9,
    5891.6,
    6302.0,
    6365.5,
    7915.9,
    8346.9,
    8401.5,
    8829.5,
    8888.2,
)

# Line groups that vary independently over the focal plane: name -> (lo, hi) Angstrom ranges.
LINE_GROUPS: dict[str, tuple[tuple[float, float], ...]] = {
    "oi5577": ((5570.0, 5588.0),),
    "oi6300": ((6294.0, 6312.0), (6357.0, 6374.0)),
    "nad": ((5884.0, 5905.0),),
    "oh_red": ((7700.0, 9200.0),),
    "oh_mid": ((6100.0, 6294.0), (6312.0, 6357.0), (6374.0, 7700.0)),
}

# Parametric night sky (the simulator's fallback when the measured spectrum is not installed):
# wavelength -> peak relative to the dark continuum at R ~ 1800.
PARAMETRIC_SKY_LINES = {
    4359.6: 0.0,  # Hg I lines belong to the pollution component
    5578.9: 9.0,
    5891.6: 1.2,
    5897.6: 1.0,
    6302.0: 3.0,
    6365.5: 1.0,
    6865.8: 0.6,
    6925.1: 0.5,
    7276.4: 0.9,
    7318.3: 0.8,
    7342.9: 0.8,
    7371.4: 0.7,
    7715.0: 0.7,
    7751.1: 0.8,
    7794.1: 0.9,
    7823.8: 0.8,
    7853.2: 0.7,
    7915.9: 1.2,
    7967.3: 1.0,
    7993.3: 1.3,
    8290.2: 1.5,
    8346.9: 1.8,
    8401.5: 2.4,
    8432.2: 1.5,
    8467.6: 1.6,
    8495.4: 1.7,
    8760.6: 1.6,
    8829.5: 2.3,
    8888.2: 2.2,
    8921.9: 1.8,
    8958.1: 2.0,
    8988.4: 1.5,
    9003.0: 1.5,
}

# Light pollution (Xinglong): Hg I and Na I lines, peak relative to the dark continuum at R ~ 1800.
POLLUTION_LINES = {4047.7: 0.8, 4359.6: 1.6, 5462.3: 1.4, 5771.2: 0.3, 5792.3: 0.3}

# Stellar absorption features of simulated stars: (wavelength, depth as a fraction of the
# continuum, width in Angstrom). Balmer series, Ca H and K, Mg b, Na D, Ca II triplet.
STAR_ABSORPTION_LINES = (
    (6564.6, 0.5, 4.0),
    (4862.7, 0.5, 4.0),
    (4341.7, 0.45, 3.5),
    (4102.9, 0.4, 3.5),
    (3934.8, 0.5, 3.0),
    (3969.6, 0.45, 3.0),
    (5185.0, 0.3, 3.0),
    (5891.6, 0.3, 2.0),
    (5897.6, 0.3, 2.0),
    (8500.4, 0.3, 3.0),
    (8544.4, 0.35, 3.0),
    (8664.5, 0.35, 3.0),
)

# Emission lines of simulated galaxies (rest frame): (wavelength, relative strength).
# [O II], H beta, [O III], H alpha, [N II].
GALAXY_EMISSION_LINES = (
    (3728.5, 2.0),
    (4862.7, 1.0),
    (5008.2, 1.5),
    (6564.6, 3.0),
    (6585.3, 1.0),
)

# 100 A windows free of strong sky lines, for the continuum residual metric.
CONTINUUM_WINDOWS = (
    (4000.0, 4100.0),
    (4400.0, 4500.0),
    (5200.0, 5300.0),
    (6000.0, 6100.0),
    (6700.0, 6800.0),
    (8100.0, 8200.0),
)

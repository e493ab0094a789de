"""SMI: the sky background of every fibre from all fibres of a plate (Flax NNX + optax).

The paper (papers.md #9) fixes the structure, not the architecture; jaxlab's SMI is:

1. Wavelength calibration (`WavelengthCalibration`): an MLP reads each fibre's high-passed windows
   around strong sky lines and predicts its wavelength shift. It is trained self-supervised, anchored
   on the lines' laboratory positions: the fibre's windows must be fitted by line profiles (one free
   amplitude each) centred at the vacuum wavelengths plus the predicted shift. Spectra are resampled
   differentiably (Keys cubic) into the common frame, and the sky estimate back into each fibre's.
2. Sky decoder: a linear basis B [K+1, W] over the aligned sky, the mean and K principal components
   of the training plates' aligned sky fibres: fibre i's sky is c_i B shifted to its frame.
3. Incremental training of the codes c_i:
   (a) common: a shared encoder E_s maps every fibre's sky-line features (high-passed pixels on sky
       lines, where objects contribute little) to a code; it is trained to reconstruct those features
       while maximising the mutual information (InfoNCE) between codes of different fibres of the
       same plate, so the code holds what the plate's fibres share: the sky. The plate's common code
       s is the mean over all its fibres.
   (b) individual: with E_s frozen, c_i = t_i field(x_i) (1 + 0.1 tanh z_i). The field is s plus a
       closed-form ridge fit, over the focal plane, of the sky fibres' full-spectrum codes divided by
       their throughputs (the local environment: moonlight and continuum gradients that only sky
       fibres show); t_i is fibre i's sky-line throughput against the field; z_i, from an individual
       encoder E_z (sky-line features, the field's prediction, position), is a bounded correction.
       E_z is trained to reconstruct every fibre while minimising the mutual information (CLUB,
       with a Gaussian q trained alongside) between z of adjoining fibres (nearest on the focal
       plane), which pushes what neighbours share into s and the smooth field, leaving z the truly
       individual part (throughput, local line strengths).
Applying a trained model to a plate is a forward pass plus two small least-squares solves.
`smi_sky(..., throughput_power=p)` changes how a fibre's level follows its sky-line throughput
(t_i^p field_p(x_i); p = 1 as trained, 0 the field alone): on cloudy or moonlit plates the blue
continuum (scattered light) does not dim with the emission lines, and `smi-safe` picks p per band
by held-out sky fibres (`smi_level_candidates`, `jaxlab.sky.safety.safe_sky`).

Training is self-supervised (no truth is read), so it can run on the user's own plates, and
`train_smi(..., init=model)` continues from a trained model (incremental training on a night's
plates). Stability: AdamW with gradient clipping and a warmup-cosine schedule in every stage, CLUB on
the bounded corrections with a variance-floored q, and a non-finite value stops training with
`jaxlab.optim.NonFiniteError`. A model does not transfer between unlike skies; `jaxlab.sky.safety`
blends it towards the better of Super Sky and PCA where held-out sky fibres say it is worse.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import ndimage

from jaxlab.errors import OutputExistsError, UserError
from jaxlab.optim import NonFiniteError, make_optimizer
from jaxlab.progress import progress as progress_bar
from jaxlab.sky import mi
from jaxlab.sky.baselines import sky_line_pixels
from jaxlab.sky.lines import ANCHOR_LINES
from jaxlab.sky.plate import Plate, SkyFormatError


@dataclasses.dataclass(frozen=True)
class SMIConfig:
    n_basis: int = 12
    hidden: int = 128
    shift_hidden: int = 64
    window: int = 7  # pixels either side of an anchor line for the calibration network
    max_shift_pix: float = 3.0
    highpass_sigma: float = 10.0  # pixels; the high-pass removes continua before line features
    focal_radius_mm: float = 875.0
    spatial_degree: int = 2
    ridge: float = 1e-2
    steps_shift: int = 300
    steps_shared: int = 300
    steps_individual: int = 300
    learning_rate: float = 2e-3
    mi_weight: float = 0.05
    club_weight: float = 0.05
    fibers_per_plate: int = 64  # fibres sampled per plate and step
    seed: int = 0
    # Stability: every stage's optimizer is AdamW with global-norm clipping and a linear warmup
    # then cosine decay over the stage (jaxlab.optim.make_optimizer); CLUB's q has a variance
    # floor and a bounded mean, and is applied to the bounded individual corrections tanh(z).
    grad_clip: float = 1.0
    warmup_steps: int = 20
    club_var_floor: float = 0.05

    def __post_init__(self):
        from jaxlab.config import check, check_positive

        check_positive(self, "n_basis", "hidden", "shift_hidden", "window", "max_shift_pix")
        check_positive(self, "highpass_sigma", "focal_radius_mm", "learning_rate")
        check_positive(self, "fibers_per_plate", "grad_clip", "club_var_floor")
        for name in ("steps_shift", "steps_shared", "steps_individual", "warmup_steps"):
            check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        check(
            self.spatial_degree >= 0, "spatial_degree", f"must be >= 0, got {self.spatial_degree}"
        )
        check(self.ridge >= 0, "ridge", f"must be >= 0, got {self.ridge}")
        check(self.fibers_per_plate >= 2, "fibers_per_plate", "must be >= 2 (InfoNCE pairs)")

    def with_steps(self, steps: int) -> SMIConfig:
        """This config with `steps` optimizer steps in each of the three training stages."""
        return dataclasses.replace(
            self, steps_shift=steps, steps_shared=steps, steps_individual=steps
        )


# -- differentiable resampling ---------------------------------------------------------------------


def _keys_weights(t: jax.Array) -> jax.Array:
    """Keys (a = -0.5) cubic convolution weights for taps -1, 0, 1, 2 at fraction t: [..., 4]."""
    a = -0.5
    t2, t3 = t * t, t * t * t
    w0 = a * (t3 - 2 * t2 + t)
    w1 = (a + 2) * t3 - (a + 3) * t2 + 1
    w2 = -(a + 2) * t3 + (2 * a + 3) * t2 - a * t
    w3 = -a * (t3 - t2)
    return jnp.stack([w0, w1, w2, w3], -1)


def resample(x: jax.Array, shift: jax.Array) -> jax.Array:
    """Values of x [N, W] at positions k + shift (pixels; [N] or [N, W]), Keys cubic, edges clamped."""
    w_pix = x.shape[-1]
    shift = shift[:, None] if shift.ndim == 1 else shift
    pos = jnp.arange(w_pix, dtype=jnp.float32)[None, :] + shift
    base = jnp.floor(pos)
    weights = _keys_weights(pos - base)  # [N, W, 4]
    idx = jnp.clip(base.astype(jnp.int32)[..., None] + jnp.arange(-1, 3), 0, w_pix - 1)
    taps = jnp.take_along_axis(x[:, None, :], idx.reshape(x.shape[0], 1, -1), axis=-1)
    return jnp.sum(taps.reshape(idx.shape) * weights, -1)


# -- networks --------------------------------------------------------------------------------------


class _MLP(nnx.Module):
    def __init__(self, sizes: Sequence[int], *, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jax.nn.gelu(layer(x))
        return self.layers[-1](x)


class WavelengthCalibration(nnx.Module):
    """Per-fibre wavelength shift (pixels) from normalised windows around the anchor sky lines."""

    def __init__(self, n_lines: int, window: int, hidden: int, max_shift: float, *, rngs):
        self.net = _MLP([n_lines * (2 * window + 1), hidden, hidden, 1], rngs=rngs)
        self.max_shift = max_shift

    def __call__(self, windows: jax.Array) -> jax.Array:
        """windows [N, L, 2w+1] (high-passed flux) -> shift [N] in Angstrom."""
        norm = windows / (jnp.linalg.norm(windows, axis=-1, keepdims=True) + 1e-6)
        return self.max_shift * jnp.tanh(
            self.net(norm.reshape(norm.shape[0], -1))[:, 0] / self.max_shift
        )


class SMIModel(nnx.Module):
    """All learned parts of SMI. Build with `SMIModel.create`, train with `train_smi`."""

    def __init__(
        self, config: SMIConfig, n_pix: int, line_pixels: np.ndarray, anchors: np.ndarray, *, rngs
    ):
        k = config.n_basis
        self.config = config
        n_lines = len(anchors)
        self.anchor_pix = nnx.Variable(jnp.asarray(anchors, jnp.float32))
        # Pixels per Angstrom at every pixel of the log-linear grid (set by `train_smi`).
        self.pix_per_angstrom = nnx.Variable(jnp.ones((n_pix,), jnp.float32))
        self.line_pixels = nnx.Variable(jnp.asarray(line_pixels, jnp.int32))
        self.calibration = WavelengthCalibration(
            n_lines, config.window, config.shift_hidden, config.max_shift_pix, rngs=rngs
        )
        # Decoder: sky = code @ basis; row 0 is the mean sky, so a throughput scales the whole code.
        self.basis = nnx.Param(jnp.zeros((k + 1, n_pix), jnp.float32))
        n_feat = len(line_pixels)
        self.hp_basis = nnx.Variable(jnp.zeros((k + 1, n_feat), jnp.float32))
        self.shared = _MLP([n_feat, config.hidden, k + 1], rngs=rngs)
        self.individual = _MLP([2 * n_feat + 2, config.hidden, k + 1], rngs=rngs)
        last = self.individual.layers[-1]  # z starts at 0: stage (b) refines the closed-form sky
        last.kernel[...] = jnp.zeros_like(last.kernel[...])
        self.critic = mi.SeparableCritic(k + 1, k + 1, embed_dim=32, hidden=(64,), rngs=rngs)
        self.club = mi.GaussianConditional(
            k + 1, k + 1, hidden=(64,), var_floor=config.club_var_floor, mean_bound=1.0, rngs=rngs
        )


# -- plate preparation (numpy) ---------------------------------------------------------------------


def _anchor_pixels(plate: Plate, window: int) -> np.ndarray:
    """Fractional pixel positions of the anchor lines that lie inside the grid (with margin)."""
    loglam = np.log10(np.asarray(ANCHOR_LINES))
    pix = (loglam - plate.coeff0) / plate.coeff1
    return pix[(pix > window + 4) & (pix < plate.n_pix - window - 5)]


def _highpass(x: np.ndarray, sigma: float) -> np.ndarray:
    return x - ndimage.gaussian_filter1d(x, sigma, axis=-1, mode="nearest")


def _spatial_features(pos: np.ndarray | jax.Array, degree: int):
    xp = jnp if isinstance(pos, jax.Array) else np
    x, y = pos[..., 0], pos[..., 1]
    cols = [xp.ones_like(x)]
    for d in range(1, degree + 1):
        for i in range(d + 1):
            cols.append(x ** (d - i) * y**i)
    return xp.stack(cols, -1)


@dataclasses.dataclass
class _Prepared:
    scale: float
    flux: np.ndarray  # [F, W] normalised
    ivar: np.ndarray
    highpass: np.ndarray
    pos: np.ndarray  # [F, 2] in units of the focal-plane radius
    is_sky: np.ndarray
    neighbour: np.ndarray  # [F] index of the nearest other fibre on the focal plane


def _prepare(plate: Plate, config: SMIConfig) -> _Prepared:
    is_sky = plate.is_sky
    if is_sky.sum() < 3:
        raise UserError(
            f"SMI needs >= 3 sky fibres (OBJTYPE == 'SKY'), the plate has {is_sky.sum()}"
        )
    pos = plate.positions / config.focal_radius_mm
    if not np.isfinite(pos).all():
        raise UserError("SMI needs focal-plane positions (FIBERMAP X, Y) for every fibre")
    flux = plate.flux.astype(np.float64)
    scale = float(np.median(np.median(flux[is_sky], axis=1)))
    if not scale > 0:
        raise UserError("the sky fibres' median flux is not positive; cannot normalise the plate")
    ivar = np.where((plate.mask == 0) & np.isfinite(plate.ivar), plate.ivar, 0.0) * scale**2
    flux = np.where(ivar > 0, flux / scale, 0.0)
    d2 = np.sum((pos[:, None] - pos[None]) ** 2, -1)
    np.fill_diagonal(d2, np.inf)
    return _Prepared(
        scale=scale,
        flux=flux.astype(np.float32),
        ivar=ivar.astype(np.float32),
        highpass=_highpass(flux, config.highpass_sigma).astype(np.float32),
        pos=pos.astype(np.float32),
        is_sky=is_sky,
        neighbour=np.argmin(d2, 1),
    )


def _windows(highpass: jax.Array, anchors: jax.Array, window: int) -> jax.Array:
    """[N, W] -> [N, L, 2w+1] windows centred on the nearest pixel of each anchor."""
    idx = jnp.round(anchors).astype(jnp.int32)[:, None] + jnp.arange(-window, window + 1)
    return highpass[:, idx]


def _calibration_loss(calibration, anchors, anchor_ppa, window, windows, wivar) -> jax.Array:
    """Self-supervised: windows fitted by Gaussian line profiles at anchor + predicted shift."""
    shift = calibration(windows)[:, None] * anchor_ppa[None, :]  # [N, L] pixels
    pix = jnp.round(anchors)[:, None] + jnp.arange(-window, window + 1)  # [L, 2w+1]
    sigma = jnp.sqrt(1.02**2 + 1.0 / 12.0)
    prof = jnp.exp(-0.5 * ((pix[None] - anchors[None, :, None] - shift[..., None]) / sigma) ** 2)
    prof = prof - prof.mean(-1, keepdims=True)
    amp = jnp.sum(wivar * windows * prof, -1) / (jnp.sum(wivar * prof**2, -1) + 1e-9)
    resid = windows - amp[..., None] * prof
    return jnp.sum(wivar * resid**2) / jnp.sum(wivar > 0)


def _flat_windows(prepared: Sequence[_Prepared], anchors: np.ndarray, window: int):
    idx = np.round(anchors).astype(int)[:, None] + np.arange(-window, window + 1)
    hp = np.concatenate([p.highpass[:, idx] for p in prepared])
    iv = np.concatenate([p.ivar[:, idx] for p in prepared])
    return hp, iv


# -- training --------------------------------------------------------------------------------------


def _optimizer(model, config: SMIConfig, steps: int, wrt):
    """AdamW with global-norm clipping, linear warmup and cosine decay over the stage's steps."""
    warmup = min(config.warmup_steps, max(steps // 4, 0))
    tx = make_optimizer(
        lr=config.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1),
        grad_clip=config.grad_clip,
    )
    return nnx.Optimizer(model, tx, wrt=wrt)


def _aligned(model: SMIModel, prep: _Prepared):
    """Shift (pixels), aligned flux, ivar and high-pass for one plate, as jax arrays."""
    anchors = model.anchor_pix[...]
    w = model.config.window
    shift_a = model.calibration(_windows(jnp.asarray(prep.highpass), anchors, w))
    shift = shift_a[:, None] * model.pix_per_angstrom[...][None, :]
    flux = resample(jnp.asarray(prep.flux), shift)
    ivar = jnp.clip(resample(jnp.asarray(prep.ivar), shift), 0.0, None)
    hp = resample(jnp.asarray(prep.highpass), shift)
    return shift, flux, ivar, hp


@nnx.jit
def _aligned_jit(model, highpass, flux, ivar):
    """`_aligned` of one plate's arrays, jitted (same-shaped plates compile once)."""
    prep = _Prepared(1.0, flux, ivar, highpass, None, None, None)  # type: ignore[arg-type]
    return _aligned(model, prep)


_sky_codes_jit = jax.jit(lambda basis, flux, ivar: _sky_codes(basis, flux, ivar))


def _highpass_jax(x: jax.Array, sigma: float) -> jax.Array:
    radius = int(4 * sigma)
    t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    kern = jnp.exp(-0.5 * (t / sigma) ** 2)
    kern = kern / kern.sum()
    pad = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(radius, radius)], mode="edge")
    smooth = jax.vmap(lambda r: jnp.convolve(r, kern, mode="valid"))(pad.reshape(-1, pad.shape[-1]))
    return x - smooth.reshape(x.shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _PlateTensors:
    """One training plate after calibration: everything stage (a) / (b) need, as jax arrays."""

    features: jax.Array  # [F, P] aligned high-pass on line pixels
    ivar_lines: jax.Array  # [F, P]
    pos: jax.Array
    neighbour: jax.Array
    sky_codes: jax.Array  # [S, K] full-spectrum least-squares codes of the sky fibres
    sky_rows: jax.Array


def _sky_codes(basis, flux, ivar, ridge=1e-6):
    """Inverse-variance least-squares codes of spectra flux [N, W] on the basis [K+1, W]: [N, K+1]."""
    a = jnp.einsum("kw,nw,jw->nkj", basis, ivar, basis) + ridge * jnp.eye(basis.shape[0])
    b = jnp.einsum("kw,nw->nk", basis, ivar * flux)
    return jnp.linalg.solve(a, b[..., None])[..., 0]


def _field(prior, sky_codes, phi, rows, ridge):
    """Smooth field of codes over the focal plane: prior + phi beta, beta fitted on the sky fibres."""
    phi_s = phi[rows]
    lhs = phi_s.T @ phi_s + ridge * jnp.eye(phi.shape[1])
    beta = jnp.linalg.solve(lhs, phi_s.T @ (sky_codes - prior[None]))
    return prior[None] + phi @ beta


def _throughput(pred, features, ivar):
    """Per-fibre scale of the observed sky-line features against the predicted ones [F]."""
    t = jnp.sum(ivar * pred * features, -1) / (jnp.sum(ivar * pred * pred, -1) + 1e-9)
    return jnp.clip(t, 0.5, 1.5)


def _codes(
    model: SMIModel,
    t: _PlateTensors,
    *,
    individual: bool,
    degree: int | None = None,
    power: jax.Array | float = 1.0,
):
    """Sky codes [F, K+1] of every fibre, the individual codes z (None at stage a), the shared ones.

    Stage (a): each fibre's own shared code. Stage (b): c_i = t_i * field(x_i) + z_i, where the
    field is the plate's common code plus a smooth fit over the sky fibres (their codes divided
    by their throughputs) and t_i is fibre i's sky-line throughput against the field. `degree`
    overrides the config's `spatial_degree` of the field's polynomial. `power` (scalar, default 1)
    is the exponent p of the level: c_i = t_i^p field_p(x_i) (1 + 0.1 tanh z_i), with field_p fitted
    to the sky fibres' codes divided by t^p, so p = 0 is the field alone (the continuum does not
    follow the sky lines) and p < 0 a continuum that rises where the lines fade (scattered light
    under a cloud); z is the same for every p.
    """
    shared = model.shared(t.features)
    if not individual:
        return shared, None, shared
    hpb = model.hp_basis[...]
    common = jnp.mean(shared, 0)
    phi = _spatial_features(t.pos, model.config.spatial_degree if degree is None else degree)
    rows, ridge = t.sky_rows, model.config.ridge
    field = _field(common, t.sky_codes, phi, rows, ridge)
    thr = _throughput(field @ hpb, t.features, t.ivar_lines)
    field = _field(common, t.sky_codes / thr[rows, None], phi, rows, ridge)
    pred = field @ hpb
    thr = _throughput(pred, t.features, t.ivar_lines)
    z = model.individual(jnp.concatenate([t.features, thr[:, None] * pred, t.pos], -1))
    # Individual corrections are relative and bounded (+-10 % of each code entry): unbounded ones
    # diverged on some training sets and undid the field.
    base = thr[:, None] * field
    if not (isinstance(power, float | int) and power == 1.0):
        level = thr**power
        base = level[:, None] * _field(common, t.sky_codes / level[rows, None], phi, rows, ridge)
    return base * (1.0 + 0.1 * jnp.tanh(z)), z, shared


def _line_loss(codes, t: _PlateTensors, hpb):
    pred = codes @ hpb
    return jnp.sum(t.ivar_lines * (t.features - pred) ** 2) / jnp.sum(t.ivar_lines > 0)


def train_smi(
    plates: Sequence[Plate],
    config: SMIConfig | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    init: SMIModel | None = None,
) -> tuple[SMIModel, dict]:
    """Train SMI on `plates` (sky fibres flagged; truth layers, if any, are never read).

    Training is self-supervised: it needs no truth, so `plates` can be the user's own plates (the
    plates of a night). `init` continues from a trained model ("incremental training"): its
    calibration network, encoders, critic and CLUB q are the starting point and its sky-line pixels
    are kept, while the decoder basis is re-derived from `plates`' sky fibres, so the model follows
    the night's sky; `config` must have the same network sizes as `init`'s.

    Returns (model, history) with per-stage losses and seconds.
    """
    config = config or SMIConfig()
    say = log or (lambda s: None)
    if not plates:
        raise UserError("train_smi needs at least one plate")
    grid = (plates[0].coeff0, plates[0].coeff1, plates[0].n_pix)
    for p in plates:
        if (p.coeff0, p.coeff1, p.n_pix) != grid:
            raise UserError(
                "all training plates must share one wavelength grid (COEFF0, COEFF1, NPIX)"
            )
    if init is not None:
        arch = ("n_basis", "hidden", "shift_hidden", "window", "highpass_sigma")
        diff = [a for a in arch if getattr(init.config, a) != getattr(config, a)]
        if diff or init.basis.shape[1] != grid[2]:
            what = f"config fields {diff}" if diff else f"{init.basis.shape[1]} pixels"
            raise UserError(f"cannot continue training from the given model: {what} differ")
    rngs = nnx.Rngs(config.seed)
    rng = np.random.default_rng(config.seed)
    prepared = [_prepare(p, config) for p in plates]
    anchors = _anchor_pixels(plates[0], config.window)
    history: dict = {}
    start = time.perf_counter()

    # Stage 0: wavelength calibration, self-supervised on anchor lines.
    model = SMIModel(config, grid[2], np.zeros(1, int), anchors, rngs=rngs)
    if init is not None:
        if init.anchor_pix.shape != model.anchor_pix.shape:
            raise UserError("cannot continue training: the plates' grid holds other anchor lines")
        nnx.update(model.calibration, nnx.state(init.calibration))
    windows, wivar = _flat_windows(prepared, anchors, config.window)
    opt = _optimizer(model.calibration, config, config.steps_shift, nnx.Param)

    ppa = 1.0 / (plates[0].wavelength * np.log(10.0) * plates[0].coeff1)
    model.pix_per_angstrom[...] = jnp.asarray(ppa, jnp.float32)
    anchor_ppa = jnp.asarray(np.interp(anchors, np.arange(grid[2]), ppa), jnp.float32)
    anchors_j = jnp.asarray(anchors, jnp.float32)

    @nnx.jit
    def cal_step(calibration, opt, win, iv):
        def loss_fn(cal):
            return _calibration_loss(cal, anchors_j, anchor_ppa, config.window, win, iv)

        loss, grads = nnx.value_and_grad(loss_fn)(calibration)
        opt.update(calibration, grads)
        return loss

    def calibration_step(_):
        rows = rng.choice(len(windows), min(1024, len(windows)), replace=False)
        win, iv = jnp.asarray(windows[rows]), jnp.asarray(wivar[rows])
        return {"loss": cal_step(model.calibration, opt, win, iv)}

    history["calibration"] = _run_stage(
        config.steps_shift, calibration_step, "SMI wavelength calibration", progress, say
    )

    # Decoder basis: PCA of the aligned sky fibres of all training plates.
    t0 = time.perf_counter()
    aligned = [_aligned_jit(model, p.highpass, p.flux, p.ivar) for p in prepared]
    sky_spec = np.concatenate([np.asarray(a[1])[p.is_sky] for a, p in zip(aligned, prepared)])
    mean = sky_spec.mean(0)
    _, _, vt = np.linalg.svd(sky_spec - mean, full_matrices=False)
    basis = np.concatenate([mean[None], vt[: config.n_basis]])
    line_pix = np.nonzero(sky_line_pixels(mean, threshold=0.05))[0]
    if init is not None:  # the encoders read these pixels: keep them
        line_pix = np.asarray(init.line_pixels[...])
    model = _rebuild(model, config, grid[2], line_pix, anchors, basis, rngs)
    if init is not None:
        for name in ("shared", "individual", "critic", "club"):
            nnx.update(getattr(model, name), nnx.state(getattr(init, name)))
    hpb = _highpass_jax(jnp.asarray(basis, jnp.float32), config.highpass_sigma)[:, line_pix]
    model.hp_basis[...] = hpb
    tensors = []
    for (_, flux, ivar, hp), p in zip(aligned, prepared):
        rows = np.nonzero(p.is_sky)[0]
        codes = _sky_codes_jit(jnp.asarray(basis, jnp.float32), flux[rows], ivar[rows])
        tensors.append(
            _PlateTensors(
                features=hp[:, line_pix],
                ivar_lines=ivar[:, line_pix],
                pos=jnp.asarray(p.pos),
                neighbour=jnp.asarray(p.neighbour),
                sky_codes=codes,
                sky_rows=jnp.asarray(rows),
            )
        )
    history["basis_seconds"] = time.perf_counter() - t0

    # Stage (a): common code, InfoNCE between fibres of the same plate.
    shared_wrt = _select("shared", "critic")
    opt = _optimizer(model, config, config.steps_shared, shared_wrt)
    n_plate = len(tensors)
    m = min(config.fibers_per_plate, min(t.features.shape[0] for t in tensors))
    same = len({t.features.shape for t in tensors}) == 1
    if same:  # all plates alike: sample the fibres inside the jitted step (no per-plate gathers)
        all_feats = jnp.stack([t.features for t in tensors])  # [P, F, n_feat]
        all_ivars = jnp.stack([t.ivar_lines for t in tensors])

    @nnx.jit
    def gather(feats, ivars, rows):
        take = jax.vmap(lambda x, r: x[r])
        return take(feats, rows), take(ivars, rows)

    @nnx.jit
    def shared_step(model, opt, feats, ivars, pair_a, pair_b):
        def loss_fn(model):
            codes = model.shared(feats.reshape(-1, feats.shape[-1])).reshape(*feats.shape[:2], -1)
            pred = codes @ hpb
            rec = jnp.sum(ivars * (feats - pred) ** 2) / jnp.sum(ivars > 0)
            a = codes[jnp.arange(codes.shape[0]), pair_a]
            b = codes[jnp.arange(codes.shape[0]), pair_b]
            nce = mi.infonce_lower_bound(model.critic(a, b))
            return rec - config.mi_weight * nce, (rec, nce)

        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, shared_wrt), has_aux=True)
        (loss, aux), grads = grad_fn(model)
        opt.update(model, grads)
        return loss, aux

    def common_step(_):
        rows = [rng.choice(t.features.shape[0], m, replace=False) for t in tensors]
        if same:
            feats, ivars = gather(all_feats, all_ivars, jnp.asarray(np.stack(rows)))
        else:
            feats = jnp.stack([t.features[r] for t, r in zip(tensors, rows)])
            ivars = jnp.stack([t.ivar_lines[r] for t, r in zip(tensors, rows)])
        pa = jnp.asarray(rng.integers(0, m, n_plate))
        pb = (pa + jnp.asarray(rng.integers(1, m, n_plate))) % m
        _, (rec, nce) = shared_step(model, opt, feats, ivars, pa, pb)
        return {"reconstruction": rec, "infonce": nce}

    history["common"] = _run_stage(
        config.steps_shared, common_step, "SMI common code (max MI)", progress, say
    )

    # Stage (b): individual codes, CLUB between adjoining fibres, smooth field from sky fibres.
    z_wrt, q_wrt = _select("individual"), _select("club")
    opt = _optimizer(model, config, config.steps_individual, z_wrt)
    opt_q = _optimizer(model, config, config.steps_individual, q_wrt)

    @nnx.jit
    def individual_step(model, opt, opt_q, t: _PlateTensors):
        # First the variational q(z_neighbour | z) is fitted to the current codes (maximum
        # likelihood, z held fixed), then the encoder steps against that q. The other order (encoder
        # against last step's q) let q's variance collapse and the CLUB term diverge to NaN.
        # CLUB acts on the bounded corrections u = tanh(z) in [-1, 1] (what the sky uses), with a
        # q whose mean is bounded and variance floored: the estimate cannot run away (it reached
        # ~1e28 on z itself with an unfloored q).
        _, z, _ = _codes(model, t, individual=True)
        zs = jax.lax.stop_gradient(jnp.tanh(z))

        def q_loss(model):
            return -model.club.log_likelihood(zs, zs[t.neighbour])

        _, gq = nnx.value_and_grad(q_loss, argnums=nnx.DiffState(0, q_wrt))(model)
        opt_q.update(model, gq)

        def loss_fn(model):
            codes, z, _ = _codes(model, t, individual=True)
            rec = _line_loss(codes, t, hpb)
            u = jnp.tanh(z)
            club = model.club.club(u, u[t.neighbour])
            return rec + config.club_weight * club, (rec, club)

        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, z_wrt), has_aux=True)
        (_, (rec, club)), grads = grad_fn(model)
        opt.update(model, grads)
        return rec, club

    def individual_stage_step(step):
        rec, club = individual_step(model, opt, opt_q, tensors[step % n_plate])
        return {"reconstruction": rec, "club": club}

    history["individual"] = _run_stage(
        config.steps_individual,
        individual_stage_step,
        "SMI individual codes (min MI)",
        progress,
        say,
    )
    history["seconds"] = time.perf_counter() - start
    return model, history


def _run_stage(
    steps: int,
    step_fn: Callable[[int], dict],
    desc: str,
    progress: bool,
    say: Callable[[str], None],
) -> dict:
    """Runs `step_fn(step) -> {name: scalar}` `steps` times with a progress bar, then says each
    quantity's first and last value; returns per-name histories and the stage's seconds."""
    t0 = time.perf_counter()
    hist: dict = {}
    bar = progress_bar(range(steps), desc=desc, enabled=progress)
    for step in bar:
        for k, v in step_fn(step).items():
            v = float(v)
            if not np.isfinite(v):
                raise NonFiniteError(
                    f"{desc}: step {step}: {k} = {v} is not finite; training stopped (nothing was "
                    "saved). Lower SMIConfig.learning_rate or grad_clip, or check the plates for "
                    "NaN/inf flux with IVAR > 0"
                )
            hist.setdefault(k, []).append(v)
        bar.set_postfix({k: f"{v[-1]:.3f}" for k, v in hist.items()})
    hist["seconds"] = time.perf_counter() - t0
    trend = ", ".join(f"{k} {v[0]:.3f} -> {v[-1]:.3f}" for k, v in hist.items() if k != "seconds")
    say(f"{desc}: {trend or 'no steps'} ({hist['seconds']:.1f} s)")
    return hist


def _select(*names: str):
    """An nnx filter for the Params under the named top-level attributes."""

    def pred(path, value):
        return isinstance(value, nnx.Param) and bool(path) and path[0] in names

    return pred


def _rebuild(model, config, n_pix, line_pix, anchors, basis, rngs) -> SMIModel:
    new = SMIModel(config, n_pix, line_pix, anchors, rngs=rngs)
    new.calibration = model.calibration
    new.pix_per_angstrom[...] = model.pix_per_angstrom[...]
    new.basis[...] = jnp.asarray(basis, jnp.float32)
    return new


# -- applying --------------------------------------------------------------------------------------


def smi_sky(
    model: SMIModel,
    plate: Plate,
    *,
    spatial_degree: int | None = None,
    throughput_power: float = 1.0,
) -> np.ndarray:
    """Sky estimate [F, W] (counts, each fibre in its own wavelength frame) for a new plate.

    `spatial_degree` overrides the model's degree of the focal-plane field (fitted in closed form
    on the plate's sky fibres, so any degree applies to a trained model; >= 0, and the plate needs
    more sky fibres than the polynomial has terms for it to be determined by more than the ridge).
    `throughput_power` p sets how fibre i's level follows its sky-line throughput t_i: the sky is
    t_i^p field_p(x_i) with field_p fitted to the sky fibres' codes over t^p (see `_codes`); 1, the
    default, is SMI as trained, 0 the focal-plane field alone. `smi_level_candidates` gives the
    skies for several p, for a per-band choice by held-out sky fibres (`jaxlab.sky.safety`).
    """
    config = model.config
    prep = _prepare(plate, config)
    if plate.n_pix != model.basis.shape[1]:
        raise UserError(
            f"the model was trained on {model.basis.shape[1]} pixels, the plate has {plate.n_pix}"
        )
    if spatial_degree is not None and spatial_degree < 0:
        raise UserError(f"spatial_degree must be >= 0, got {spatial_degree}")
    if not np.isfinite(throughput_power):
        raise UserError(f"throughput_power must be finite, got {throughput_power}")
    return np.asarray(_apply(model, prep, spatial_degree, throughput_power)) * prep.scale


def smi_level_candidates(
    model: SMIModel,
    powers: Sequence[float] = (1.0, 0.5, 0.0),
    neighbour_length: float | None = 0.3,
) -> dict[str, Callable[[Plate], np.ndarray]]:
    """name -> plate -> SMI sky [F, W]: each throughput power p of `smi_sky` (first: p = 1), and
    with `neighbour_length` each of them times `neighbour_level` at that kernel length (plate radii).

    For `jaxlab.sky.safety.safe_sky(plate, smi_level_candidates(model))`: per wavelength band the
    held-out sky fibres pick the level model (and baseline blend) that predicts them best, so a band
    whose continuum does not follow the sky-line throughput gets its own per-fibre level.
    """
    out = {
        f"smi p={p:g}": (lambda plate, p=float(p): smi_sky(model, plate, throughput_power=p))
        for p in powers
    }
    if neighbour_length is not None:
        radius = model.config.focal_radius_mm
        for name, est in list(out.items()):
            out[f"{name} + neighbours"] = lambda plate, est=est: neighbour_level(
                plate, est(plate), neighbour_length, focal_radius_mm=radius
            )
    return out


def neighbour_level(
    plate: Plate,
    sky: np.ndarray,
    length: float,
    band_edges: Sequence[float] = (4500.0, 5700.0, 7000.0),
    focal_radius_mm: float = 875.0,
    shrink: float = 1.0,
    clip: float = 0.3,
) -> np.ndarray:
    """`sky` [F, W] times a per-fibre, per-band level from the neighbouring sky fibres.

    For sky fibre j and band b, r_jb = sum_b (flux - sky) / sum_b sky (good pixels, clipped to
    +-clip); fibre i's factor is 1 + sum_j K_ij r_jb / (sum_j K_ij + shrink), with a Gaussian kernel
    K_ij = exp(-|x_i - x_j|^2 / 2 length^2) over the focal plane (positions in units of
    `focal_radius_mm`), so a fibre far from every sky fibre keeps its level. What the sky's smooth
    field cannot follow (a cloud patch between sky fibres) is taken from the sky fibres near it.
    """
    good = (plate.mask == 0) & (plate.ivar > 0) & np.isfinite(plate.flux)
    flux = np.where(good, plate.flux, 0.0).astype(np.float64)
    est = np.where(good, sky, 0.0)
    rows = np.nonzero(plate.is_sky)[0]
    pos = plate.positions / focal_radius_mm
    d2 = np.sum((pos[:, None] - pos[None, rows]) ** 2, -1)
    kern = np.exp(-0.5 * d2 / length**2)  # [F, S]
    bounds = [-np.inf, *band_edges, np.inf]
    out = np.array(sky, np.float64)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        m = (plate.wavelength >= lo) & (plate.wavelength < hi)
        num = (flux[rows][:, m] - est[rows][:, m]).sum(1)
        den = est[rows][:, m].sum(1)
        r = np.clip(np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0), -clip, clip)
        out[:, m] *= (1.0 + kern @ r / (kern.sum(1) + shrink))[:, None]
    return out


@nnx.jit(static_argnames=("degree",))
def _apply_jit(model, flux, ivar, highpass, pos, sky_rows, neighbour, power, degree=None):
    prep = _Prepared(1.0, flux, ivar, highpass, pos, None, neighbour)  # type: ignore[arg-type]
    shift, a_flux, a_ivar, a_hp = _aligned(model, prep)
    lp = model.line_pixels[...]
    basis = model.basis[...]
    codes_sky = _sky_codes(basis, a_flux[sky_rows], a_ivar[sky_rows])
    t = _PlateTensors(a_hp[:, lp], a_ivar[:, lp], pos, neighbour, codes_sky, sky_rows)
    codes, _, _ = _codes(model, t, individual=True, degree=degree, power=power)
    sky_ref = codes @ basis
    return resample(sky_ref, -shift), shift


def _apply(model: SMIModel, prep: _Prepared, degree: int | None = None, power: float = 1.0):
    sky, _ = _apply_jit(
        model,
        jnp.asarray(prep.flux),
        jnp.asarray(prep.ivar),
        jnp.asarray(prep.highpass),
        jnp.asarray(prep.pos),
        jnp.asarray(np.nonzero(prep.is_sky)[0]),
        jnp.asarray(prep.neighbour),
        jnp.asarray(power, jnp.float32),
        degree=degree,
    )
    return sky


def smi_shifts(model: SMIModel, plate: Plate) -> np.ndarray:
    """Per-fibre wavelength shifts in Angstrom predicted by the calibration network [F]."""
    prep = _prepare(plate, model.config)
    win = _windows(jnp.asarray(prep.highpass), model.anchor_pix[...], model.config.window)
    return np.asarray(model.calibration(win), np.float64)


# -- persistence (Orbax) ---------------------------------------------------------------------------


def save_smi(model: SMIModel, directory: str | Path, history: dict | None = None) -> Path:
    """Write the model (Orbax) with its config and shapes; returns the directory."""
    from jaxlab.checkpoint import Checkpointer

    directory = Path(directory)
    extra = {
        "config": dataclasses.asdict(model.config),
        "n_pix": int(model.basis.shape[1]),
        "n_line_pixels": int(model.line_pixels.shape[0]),
        "n_anchors": int(model.anchor_pix.shape[0]),
        "history": _summary(history) if history else {},
    }
    if directory.exists():  # a model directory holds one model: replace an earlier one
        entries = list(directory.iterdir()) if directory.is_dir() else [directory]
        if not all(e.is_dir() and e.name.isdigit() for e in entries):
            raise OutputExistsError(f"{directory}: exists and is not an SMI model directory")
        shutil.rmtree(directory)
    with Checkpointer(directory, async_save=False, keep=1) as ckpt:
        ckpt.save(0, model=nnx.state(model), extra=extra, force=True)
    return directory


def load_smi(directory: str | Path) -> SMIModel:
    """Rebuild a model written by `save_smi`."""
    from jaxlab.checkpoint import Checkpointer

    directory = Path(directory)
    if not directory.is_dir():
        raise SkyFormatError(f"{directory}: no such SMI model directory")
    with Checkpointer(directory, async_save=False, read_only=True) as ckpt:  # changes nothing
        _, restored = ckpt.restore()
        extra = restored.get("extra")
        keys = ("config", "n_pix", "n_line_pixels", "n_anchors")
        if not isinstance(extra, dict) or any(k not in extra for k in keys):
            raise SkyFormatError(
                f"{directory}: not an SMI model (a checkpoint without the SMI config and shapes; "
                "write one with `python -m jaxlab sky train --out DIR`)"
            )
        try:
            config = SMIConfig(**extra["config"])
        except (TypeError, ValueError) as e:
            raise SkyFormatError(f"{directory}: not an SMI model config: {e}") from None
        model = SMIModel(
            config,
            extra["n_pix"],
            np.zeros(extra["n_line_pixels"], int),
            np.zeros(extra["n_anchors"]),
            rngs=nnx.Rngs(0),
        )
        state = nnx.state(model)
        _, out = ckpt.restore(model=state)
        nnx.update(model, out["model"])
    return model


def _summary(history: dict) -> dict:
    out = {}
    for k, v in history.items():
        if isinstance(v, dict):
            out[k] = {kk: (vv[-1] if isinstance(vv, list) and vv else vv) for kk, vv in v.items()}
        else:
            out[k] = v
    json.dumps(out)
    return out

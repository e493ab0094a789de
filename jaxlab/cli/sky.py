"""``sky simulate | train | subtract | evaluate`` over the plate FITS format (docs/sky_format.md)."""

from __future__ import annotations

import json
import math
import time

from jaxlab.cli._common import (
    Command,
    add_overwrite_arg,
    add_parser,
    check_outputs,
    positive_int,
    registry_option,
)
from jaxlab.errors import UserError

__all__ = ["COMMAND"]


def _run_sky(args):
    {
        "simulate": _simulate,
        "train": _train,
        "subtract": _subtract,
        "evaluate": _evaluate,
    }[args.sky_command](args)


def _simulate(args):
    from jaxlab.sky import simulate_plate, write_plate

    check_outputs(args, args.out)
    t0 = time.perf_counter()
    plate = simulate_plate(args.seed, n_fibers=args.fibers, n_sky=args.sky_fibers)
    write_plate(plate, args.out, overwrite=args.overwrite)
    print(
        f"wrote {args.out}: {plate.n_fibers} fibres ({int(plate.is_sky.sum())} sky) x "
        f"{plate.n_pix} pixels, {plate.wavelength[0]:.0f}-{plate.wavelength[-1]:.0f} Å, sky "
        f"source {plate.meta['SKYSRC']}, moon {plate.meta['MOON']:.2f} x dark continuum "
        f"({time.perf_counter() - t0:.1f} s)"
    )


def _train(args):
    from jaxlab.sky import SMIConfig, load_smi, read_plate, save_smi, train_smi, training_plates

    check_outputs(args, args.out, kind="dir")
    init = load_smi(args.init) if args.init else None
    t0 = time.perf_counter()
    if args.plates:
        plates = [read_plate(p) for p in args.plates]
        print(f"training SMI on {len(plates)} plate file(s)")
    else:
        last = args.seed + args.simulate - 1
        print(f"simulating {args.simulate} training plates (seeds {args.seed}..{last})")
        plates = training_plates(args.simulate, args.seed)
    config = SMIConfig().with_steps(args.steps)
    if init is not None:  # keep the model's network sizes, take the steps from the command line
        config = init.config.with_steps(args.steps)
        print(f"continuing from {args.init} (incremental training)")
    model, history = train_smi(plates, config, progress=not args.quiet, log=print, init=init)
    save_smi(model, args.out, history)
    print(
        f"saved the SMI model to {args.out} (training {history['seconds']:.1f} s, total "
        f"{time.perf_counter() - t0:.1f} s)"
    )


def _subtract(args):
    from jaxlab.sky import METHODS, estimate_sky, load_smi, read_plate, write_plate

    method = METHODS.get(args.method)
    if method.needs_model and not args.model:
        raise UserError(
            f"sky subtract --method {args.method} needs --model DIR, a model trained with "
            "`python -m jaxlab sky train --out DIR`"
        )
    if args.model and not method.needs_model:
        raise UserError(f"--model is for methods that need one; {args.method!r} does not")
    check_outputs(args, args.out)
    plate = read_plate(args.plate)
    model = load_smi(args.model) if args.model else None
    t0 = time.perf_counter()
    sky = estimate_sky(plate, args.method, model=model)
    seconds = time.perf_counter() - t0
    write_plate(plate.with_sky(sky, args.method), args.out, overwrite=args.overwrite)
    print(
        f"{args.method}: sky of {plate.n_fibers} fibres in {seconds:.2f} s -> {args.out} "
        "(SKY, SKYSUB)"
    )
    if args.method == "smi-safe":
        from jaxlab.sky.methods import LAST_REPORT as rep

        bands = ", ".join(
            f"{lo:.0f}-{hi:.0f} Å {w:.2f} ({lvl}; else {b})"
            for (lo, hi), w, b, lvl in zip(
                rep["bands_angstrom"], rep["weights"], rep["baselines"], rep["learned"]
            )
        )
        print(
            f"safety net: SMI weight per band {bands}; fallback to a baseline in "
            f"{100 * rep['fallback_fraction_pixels']:.0f} % of the pixels (held-out sky fibres: "
            f"{rep['held_out_fibres']}); object-fibre bands whose level was clipped to their "
            "nearest sky fibres' range: "
            + ", ".join(f"{n} {100 * x:.0f} %" for n, x in rep["level_clipped_fraction"].items())
        )


def _evaluate(args):
    from jaxlab.sky import evaluate_sky, read_plate
    from jaxlab.sky.plots import fiber_row, plot_sky

    plots = [None] * len(args.plates)
    if args.plot:
        plots = [
            args.plot if len(args.plates) == 1 else args.plot.replace(".png", f"_{i + 1}.png")
            for i in range(len(args.plates))
        ]
    if args.fiber is not None and not args.plot:
        raise UserError("--fiber chooses the fibre of --plot; give --plot too")
    check_outputs(args, args.json, *plots)
    reports = {}
    for path, target in zip(args.plates, plots):
        plate = read_plate(path)
        row = None if args.fiber is None else fiber_row(plate, args.fiber)
        rep = evaluate_sky(plate)
        rep["method"] = plate.meta.get("SKYMETH", "?")
        reports[path] = rep
        print(
            f"{path} [{rep['method']}]"
            + ("" if rep["has_truth"] else " (no truth: sky fibres only)")
        )
        for key in (
            "sky_error_pct",
            "sky_rms_error_pct",
            "chi2_per_pixel",
            "line_residual_pct",
            "continuum_residual_pct",
        ):
            if key in rep:
                v = rep[key]
                print(
                    f"  {key:24s} blue {v['blue']:7.3f}  red {v['red']:7.3f}  all {v['all']:7.3f}"
                )
        if target:
            plot_sky(plate, target, fiber=row)
            print(f"  plot: {target}")
    if args.json:
        with open(args.json, "w") as f:
            report = reports if len(reports) > 1 else next(iter(reports.values()))
            json.dump(_no_nan(report), f, indent=2, allow_nan=False)
        print(f"metrics: {args.json}")


def _no_nan(value):
    """JSON has no NaN: a metric with nothing to measure in a region (no sky line there) is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_no_nan(v) for v in value]
    return value


def _sky_args(p):
    sub = p.add_subparsers(
        dest="sky_command", metavar="{simulate,train,subtract,evaluate}", required=True
    )
    s = add_parser(sub, "simulate", "write a simulated LAMOST-like plate with truth layers")
    s.add_argument("--out", required=True, help="plate FITS file to write (docs/sky_format.md)")
    s.add_argument("--seed", type=int, default=0, help="simulation seed")
    s.add_argument("--fibers", type=positive_int, default=250, help="fibres on the plate")
    s.add_argument("--sky-fibers", type=positive_int, default=20, help="of which sky fibres")
    add_overwrite_arg(s)
    t = add_parser(sub, "train", "train an SMI model (on plate files, or on simulated plates)")
    t.add_argument("--out", required=True, help="directory for the Orbax checkpoint")
    t.add_argument("--plates", nargs="*", help="training plate FITS files (default: simulate)")
    t.add_argument(
        "--simulate", type=positive_int, default=24, help="number of simulated training plates"
    )
    t.add_argument("--seed", type=int, default=1000, help="seed of the first simulated plate")
    t.add_argument(
        "--steps", type=positive_int, default=300, help="optimizer steps per training stage"
    )
    t.add_argument(
        "--init",
        help="continue from this SMI model directory (incremental training on --plates: a night)",
    )
    t.add_argument("--quiet", action="store_true", help="no progress report")
    add_overwrite_arg(t)
    u = add_parser(sub, "subtract", "estimate every fibre's sky; write SKY and SKYSUB")
    u.add_argument("plate", help="plate FITS file")
    registry_option(
        u, "--method", "jaxlab.sky.methods:METHODS", default="supersky", help="sky method"
    )
    u.add_argument("--out", required=True, help="plate FITS file to write")
    u.add_argument("--model", help="SMI model directory from `sky train` (needed by smi)")
    add_overwrite_arg(u)
    e = add_parser(sub, "evaluate", "metrics (blue / red / all) of subtracted plate(s)")
    e.add_argument("plates", nargs="+", help="plate FITS files written by `sky subtract`")
    e.add_argument("--json", help="write the metrics as JSON")
    e.add_argument(
        "--plot",
        help="PNG with a fibre's spectrum, residuals and error by wavelength "
        "(several plates: NAME_1.png, NAME_2.png, ...)",
    )
    e.add_argument(
        "--fiber",
        type=int,
        help="FIBERID of the fibre to plot (default: the faintest object fibre)",
    )
    add_overwrite_arg(e)


COMMAND = Command(
    "sky",
    "sky subtraction: `sky simulate | train | subtract | evaluate` (SMI, Super Sky, PCA)",
    _sky_args,
    _run_sky,
)

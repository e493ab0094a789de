"""``config show`` (a config with overrides applied) and ``config kinds``."""

from __future__ import annotations

from jaxlab.cli._common import Command, add_config_args
from jaxlab.errors import UserError

__all__ = ["COMMAND"]


def _run_config(args):
    import yaml

    from jaxlab.config import config_kind_of, config_kinds, load_config, to_dict

    if args.action == "kinds":
        for kind, cls in config_kinds().items():
            print(f"{kind}: {cls.__module__}.{cls.__name__}")
        return
    if args.config is None:
        raise UserError("config show needs --config FILE")
    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump({"kind": config_kind_of(cfg), **to_dict(cfg)}, sort_keys=False), end="")


def _config_args(p):
    p.add_argument(
        "action",
        choices=["show", "kinds"],
        help="show: print the resolved config; kinds: list them",
    )
    add_config_args(p, None)


COMMAND = Command(
    "config",
    "show a config with overrides applied, or list config kinds",
    _config_args,
    _run_config,
)

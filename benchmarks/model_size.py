"""Parameter counts and GMAC per 224x224 patch of every model (batch 1, one forward pass).

Usage: python benchmarks/model_size.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json

from qpcell.models import count_parameters, create_model, gmacs

CONFIGS = [
    ("s-drdin", {}), ("s-drdin-gradient", {}), ("drdin-detection", {}),
    ("drdin-classification", {}), ("unet", {}),
    ("mtl-ihc", {"backbone": "resnet18", "aux": ()}),
    ("mtl-ihc", {"backbone": "resnet50", "aux": ()}),
    ("mtl-ihc", {"backbone": "resnet101", "aux": ()}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--size", type=int, default=224, help="patch side in px")
    args = parser.parse_args()
    rows = []
    for n_classes in (6, 3):
        for name, kwargs in CONFIGS:
            model = create_model(name, n_classes, **kwargs).eval()
            label = name if name != "mtl-ihc" else f"mtl-ihc {kwargs['backbone']}"
            rows.append({"model": label, "classes": n_classes,
                         "parameters": count_parameters(model),
                         "gmac": round(gmacs(model, args.size), 3)})
            print(f"{label:42s} C={n_classes}  {rows[-1]['parameters']:>11,d} params  "
                  f"{rows[-1]['gmac']:7.3f} GMAC / {args.size}x{args.size}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"size": args.size, "models": rows}, handle, indent=2)


if __name__ == "__main__":
    main()

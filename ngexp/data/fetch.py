"""``python -m ngexp.data.fetch NAME [ROOT]``: download a data set with torchvision."""

from __future__ import annotations

import sys

from ngexp.data.images import IMAGE_DATASETS, load_image_splits


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in IMAGE_DATASETS:
        print(f"usage: python -m ngexp.data.fetch NAME [ROOT]; NAME one of "
              f"{', '.join(IMAGE_DATASETS)}", file=sys.stderr)
        return 2
    root = argv[1] if len(argv) > 1 else "data"
    train, test = load_image_splits(argv[0], root, download=True)
    print(f"{argv[0]}: {len(train)} training and {len(test)} test examples under {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""Stage `download`: put the raw dataset under data/raw/<name>/.

The default dataset, `synthetic`, is generated offline and deterministically from the seed, in
DRIVE's three-file layout: images/<stem>.png (RGB), manual/<stem>.png (vessel tracing, 0/255)
and mask/<stem>.png (field of view, 0/255).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from pipeline import paths
from pipeline.common import atomic_path, run_cli, write_json
from pipeline.config import Params, load_params
from pipeline.synthetic import generate

log = logging.getLogger(__name__)


def download(params: Params) -> Path:
    ds = params.dataset
    target = paths.raw_dir(ds.name)
    log.info(
        "generating %d synthetic %dx%d images (seed %d)",
        ds.num_images,
        ds.image_size,
        ds.image_size,
        params.seed,
    )
    with atomic_path(target) as tmp:
        for sub in ("images", "manual", "mask"):
            (tmp / sub).mkdir(parents=True)
        samples = generate(params.seed, ds.num_images, ds.image_size)
        for i, sample in enumerate(tqdm(samples, desc="synthetic", unit="img", delay=2)):
            stem = f"{i:03d}"
            Image.fromarray(sample.image).save(tmp / "images" / f"{stem}.png")
            Image.fromarray(sample.vessels).save(tmp / "manual" / f"{stem}.png")
            Image.fromarray(sample.fov).save(tmp / "mask" / f"{stem}.png")
        write_json(
            tmp / "source.json",
            {
                "dataset": ds.name,
                "seed": params.seed,
                "num_images": ds.num_images,
                "size": ds.image_size,
            },
        )
    log.info("wrote %s", target.relative_to(paths.ROOT))
    return target


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    download(load_params())


if __name__ == "__main__":
    run_cli(main)

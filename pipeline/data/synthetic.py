"""A small DRIVE-like retinal vessel dataset, generated deterministically from a seed.

Each sample mimics a fundus photograph: a circular field of view (FOV) with an uneven, noisy,
textured background, a bright optic disc, distracting blobs, and a tree of thin dark vessels that
branch and narrow away from the disc. Like DRIVE it comes as three files per sample: the RGB
image, the manual vessel tracing (0/255) and the FOV mask (0/255).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # (H, W, 3) uint8
    vessels: np.ndarray  # (H, W) uint8, 255 = vessel
    fov: np.ndarray  # (H, W) uint8, 255 = inside the field of view


def _smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Band-limited noise in [-1, 1]: a Gaussian blur of white noise, radius `scale` pixels."""
    noise = rng.standard_normal((size, size))
    # separable Gaussian blur with reflected borders
    radius = int(3 * scale) + 1
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / scale) ** 2)
    kernel /= kernel.sum()
    pad = np.pad(noise, radius, mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view
    pad = windows(pad, kernel.size, axis=0) @ kernel  # blur columns
    out = (windows(pad, kernel.size, axis=1) @ kernel).astype(np.float32)  # then rows
    return out / (np.abs(out).max() + 1e-6)


def _grow_vessel(rng, points, y, x, angle, width, length, level, size):
    """Random-walk a vessel from (y, x), appending (y, x, radius) centre-line points to `points`
    and spawning thinner branches along the way (recursive)."""
    curvature = rng.normal(0, 0.012)
    for i in range(int(length)):
        angle += curvature + rng.normal(0, 0.035)
        y += np.sin(angle)
        x += np.cos(angle)
        if not (0 <= y < size and 0 <= x < size):
            return
        points.append((y, x, max(width * (1 - 0.6 * i / length), 0.5) / 2))
        if level < 2 and i > 8 and rng.random() < 0.025:
            side = rng.choice([-1.0, 1.0])
            _grow_vessel(
                rng,
                points,
                y,
                x,
                angle + side * rng.uniform(0.5, 1.1),
                width * rng.uniform(0.5, 0.75),
                length * rng.uniform(0.3, 0.55),
                level + 1,
                size,
            )


def _render(points: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Coverage (anti-aliased, defines the label) and darkening of the vessels, both (H, W).

    Thin vessels are fainter, as in fundus images: contrast grows with the radius.
    """
    reach = int(np.ceil(points[:, 2].max(initial=0) + 1))
    off = np.arange(-reach, reach + 1)
    pad = reach + 1  # draw on a padded canvas so every patch fits
    cover = np.zeros((size + 2 * pad, size + 2 * pad), np.float32)
    shade = np.zeros_like(cover)
    for y, x, r in points:
        iy, ix = int(y), int(x)
        d = np.hypot((iy + off - y)[:, None], (ix + off - x)[None, :])
        win = np.s_[
            iy + pad - reach : iy + pad + reach + 1, ix + pad - reach : ix + pad + reach + 1
        ]
        np.maximum(cover[win], np.clip(r + 0.5 - d, 0, 1), out=cover[win])
        np.maximum(shade[win], min(1.0, 0.4 + 0.4 * r) * np.clip(r + 0.8 - d, 0, 1), out=shade[win])
    return cover[pad:-pad, pad:-pad], shade[pad:-pad, pad:-pad]


def make_sample(rng: np.random.Generator, size: int = 128) -> Sample:
    c = (size - 1) / 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    # field of view: a slightly off-centre disc, like the camera aperture in DRIVE
    fov_r = size * rng.uniform(0.43, 0.48)
    fy, fx = c + rng.normal(0, size * 0.01, 2)
    fov = np.hypot(yy - fy, xx - fx) <= fov_r

    # vessel tree: a few trunks leave the optic disc and branch as they go
    disc_angle = rng.uniform(0, 2 * np.pi)
    dy, dx = fy + 0.55 * fov_r * np.sin(disc_angle), fx + 0.55 * fov_r * np.cos(disc_angle)
    points: list[tuple[float, float, float]] = []
    for k in range(rng.integers(4, 7)):
        angle = disc_angle + np.pi + rng.normal(0, 1.0) + (k % 2) * 0.3
        _grow_vessel(
            rng,
            points,
            dy,
            dx,
            angle,
            rng.uniform(2.2, 3.4) * size / 128,
            size * rng.uniform(0.6, 1.0),
            0,
            size,
        )
    cover, shade = _render(np.asarray(points, np.float32).reshape(-1, 3), size)
    vessels = (cover >= 0.5) & fov

    # background: uneven illumination, low-frequency texture and fine noise
    illum = (
        0.55
        + 0.25 * (1 - np.hypot(yy - fy, xx - fx) / fov_r)
        + 0.08 * _smooth_noise(rng, size, size / 6)
    )
    texture = 0.06 * _smooth_noise(rng, size, 2.0) + 0.05 * _smooth_noise(rng, size, 6.0)
    optic = np.exp(-((yy - dy) ** 2 + (xx - dx) ** 2) / (2 * (fov_r * 0.12) ** 2))
    base = illum + texture + 0.35 * optic
    # distractors: dark haemorrhage-like and bright exudate-like blobs that are not vessels
    blobs = np.zeros((size, size), np.float32)
    for _ in range(rng.integers(3, 9)):
        by, bx = rng.uniform(0, size, 2)
        blobs += (
            rng.choice([-1, 1])
            * rng.uniform(0.08, 0.2)
            * np.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / (2 * rng.uniform(1.5, 4.0) ** 2))
        )
    contrast = rng.uniform(0.22, 0.32)
    lum = base + blobs - contrast * shade * base
    lum = lum + rng.normal(0, rng.uniform(0.03, 0.05), lum.shape)

    # fundus colours: red dominant, vessels most visible in green, little blue
    tint = np.array([0.95, 0.55, 0.28], np.float32) * rng.uniform(0.9, 1.1, 3)
    rgb = lum[..., None] * tint
    rgb[~fov] = rng.uniform(0.0, 0.03, (int((~fov).sum()), 3))
    image = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
    return Sample(image, vessels.astype(np.uint8) * 255, fov.astype(np.uint8) * 255)


def generate(seed: int, count: int, size: int) -> list[Sample]:
    """`count` samples; the same (seed, count, size) always gives the same bytes."""
    root = np.random.SeedSequence(seed)
    return [make_sample(np.random.default_rng(s), size) for s in root.spawn(count)]

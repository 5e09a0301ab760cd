"""Cheap checks that a reconstruction keeps its source image's main attributes, and sample grids.

    python -m metamorph.decoder.metrics     # scores a render against itself and a recoloured copy

No model needed (the evaluate stage's judge is the thorough check): an image's **background** is
the median of its border pixels; the **object colour** is the mean of the pixels farthest from it
(none if nothing is farther than ``OBJECT_THRESH`` in RGB, 0-255); the **object region** is every
pixel at least half-way from the background to the object colour. Colours are read
as the nearest toy-world palette entry (``metamorph.world.attributes``). The truth comes from the
sample's toy-world meta (``meta["scene"]``) when it carries exactly one object, else from the
same reading of the true image (so the check also runs on real data, where it is coarser).

* ``colour_agreement``: reconstruction's object colour == true object colour.
* ``background_agreement``: reconstruction's background == true background.
* ``object_iou``: IoU of the two object regions (shape, size and position together).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from metamorph.world import attributes as A

OBJECT_THRESH = 60.0  # RGB distance from the background below which an image has no object;
# object colours sit >= 94 from every background (purple on gray), JPEG noise well under 60


def _rgb(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.float32)


def background_colour(arr_HWC: np.ndarray) -> np.ndarray:
    border = np.concatenate([arr_HWC[0], arr_HWC[-1], arr_HWC[:, 0], arr_HWC[:, -1]])
    return np.median(border, axis=0)


def object_region(arr_HWC: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(mask of pixels at least half covered by the object, object colour or None).

    The colour is the mean of the pixels farthest from the background (the object's core, free
    of anti-aliased edges); a pixel's coverage is its projection onto background->colour, so a
    faint object and a saturated one split their edges at the same 50%."""
    bg = background_colour(arr_HWC)
    diff_HWC = arr_HWC - bg
    dist_HW = np.linalg.norm(diff_HWC, axis=-1)
    if dist_HW.max() <= OBJECT_THRESH:
        return np.zeros(dist_HW.shape, dtype=bool), None
    colour = arr_HWC[dist_HW >= 0.8 * dist_HW.max()].mean(axis=0)
    axis = colour - bg
    coverage_HW = diff_HWC @ axis / float(axis @ axis)
    return coverage_HW > 0.5, colour


def nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    d = np.linalg.norm(np.asarray([palette[n] for n in names], dtype=np.float32) - rgb, axis=-1)
    return names[int(np.argmin(d))]


def read_image(img: Image.Image) -> dict[str, Any]:
    """{background, colour (None if no object region), mask} of an image."""
    arr = _rgb(img)
    mask, rgb = object_region(arr)
    colour = nearest(rgb, A.COLOURS) if rgb is not None else None
    return {"background": nearest(background_colour(arr), A.BACKGROUNDS), "colour": colour, "mask": mask}


def scene_truth(meta: Optional[dict[str, Any]]) -> dict[str, str]:
    """{colour, background} from a toy-world sample meta (``scene``), when it has one object."""
    scene = (meta or {}).get("scene")
    if not isinstance(scene, dict):
        return {}
    out = {}
    if scene.get("background") in A.BACKGROUNDS:
        out["background"] = scene["background"]
    objs = scene.get("objects") or []
    if len(objs) == 1 and objs[0].get("colour") in A.COLOURS:
        out["colour"] = objs[0]["colour"]
    return out


def reconstruction_agreement(
    truths: Sequence[Image.Image], recons: Sequence[Image.Image], metas: Optional[Sequence[dict]] = None
) -> dict[str, float]:
    """Mean agreement of reconstructions with their sources (see the module docstring)."""
    if len(truths) != len(recons) or not truths:
        raise ValueError("need as many reconstructions as true images, and at least one")
    metas = metas or [{}] * len(truths)
    colour, background, iou, from_meta = [], [], [], 0
    for truth, recon, meta in zip(truths, recons, metas):
        t, r = read_image(truth.resize(recon.size, Image.Resampling.BICUBIC)), read_image(recon)
        known = scene_truth(meta)
        from_meta += "colour" in known
        colour.append(float(r["colour"] is not None and r["colour"] == known.get("colour", t["colour"])))
        background.append(float(r["background"] == known.get("background", t["background"])))
        union = (t["mask"] | r["mask"]).sum()
        iou.append(float((t["mask"] & r["mask"]).sum() / union) if union else 1.0)
    return {
        "colour_agreement": float(np.mean(colour)),
        "background_agreement": float(np.mean(background)),
        "object_iou": float(np.mean(iou)),
        "truth_from_meta": from_meta / len(truths),
    }


def image_grid(rows: Sequence[Sequence[Image.Image]], pad: int = 2, scale: int = 2) -> Image.Image:
    """Images laid out row by row (e.g. row 0 true images, row 1 reconstructions), upscaled x scale."""
    rows = [list(r) for r in rows if len(r)]
    side = max(im.size[0] for r in rows for im in r) * scale
    ncol = max(len(r) for r in rows)
    grid = Image.new("RGB", (ncol * (side + pad) + pad, len(rows) * (side + pad) + pad), (40, 40, 40))
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            tile = im.convert("RGB").resize((side, side), Image.Resampling.NEAREST)
            grid.paste(tile, (pad + j * (side + pad), pad + i * (side + pad)))
    return grid


def pair_rows(truths: Sequence[Image.Image], recons: Sequence[Image.Image], per_row: int = 8) -> list[list[Image.Image]]:
    """Alternating rows of true images and their reconstructions, ``per_row`` pairs a row."""
    rows = []
    for i in range(0, len(truths), per_row):
        rows += [list(truths[i : i + per_row]), list(recons[i : i + per_row])]
    return rows


if __name__ == "__main__":
    from metamorph.world.render import render, sample_scene, with_object

    scene = with_object(sample_scene(np.random.default_rng(0), image_size=32, n_objects=1), 0, colour="red")
    meta = {"scene": scene.to_meta()}
    print("self     ", reconstruction_agreement([render(scene)], [render(scene)], [meta]))
    print("recolour ", reconstruction_agreement([render(scene)], [render(with_object(scene, 0, colour="blue"))], [meta]))

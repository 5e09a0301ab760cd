"""Throughput of `curate_generation` (Ray Data) against a plain single-process PIL loop, same run.

    python bench/curate.py --n 3000 --world-size 512 --out-size 256 --num-cpus 2

Both sides read the same toy-world img2dataset tars and do the same per-image work: JPEG decode,
resize to ``--out-size`` (center crop), PNG encode, write into a tar. The stage also does what
the loop skips (validation, pHash/sha256/thumbnail, the id sort, index/quarantine files), so the
ratio understates the raw parallel speed-up. Both run with the same malloc thresholds
(``keep_image_buffers``: without them every image buffer is page-faulted in anew). Ray starts
before any timing. The stage's first run is reported apart (``cold``: Ray's worker processes
start); then the loop and the stage alternate ``--repeats`` times and the best of each is
compared (timeit's rule: on a shared machine the minimum is the run least disturbed by other
processes). Target on 2 cores: >= 1.5x.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from metamorph.data.imageproc import keep_image_buffers, resize  # noqa: E402
from metamorph.data.readers import SourceConfig  # noqa: E402
from metamorph.world import WorldConfig, write_world  # noqa: E402


def baseline(gen_dir: Path, out: Path, size: int) -> int:
    """The single-process loop: decode, resize, encode, write; no checks, no hashes. It gets the
    allocator setting the stage's workers use (``keep_image_buffers``), so the ratio measures
    the parallel work, not the page faults the setting saves."""
    keep_image_buffers()
    n = 0
    with tarfile.open(out, "w") as dst:
        for tar_path in sorted(gen_dir.glob("*.tar")):
            with tarfile.open(tar_path) as src:
                for m in src:
                    if not m.name.endswith(".jpg"):
                        continue
                    img = Image.open(io.BytesIO(src.extractfile(m).read()))
                    if min(img.size) >= 2 * size:  # the same DCT-domain downscale the stage uses
                        scale = size / min(img.size)
                        img.draft("RGB", (int(img.size[0] * scale + 0.999), int(img.size[1] * scale + 0.999)))
                    img = img.convert("RGB")
                    buf = io.BytesIO()
                    resize(img, size, "center_crop").save(buf, format="PNG", compress_level=6)
                    data = buf.getvalue()
                    ti = tarfile.TarInfo(m.name.replace(".jpg", ".png"))
                    ti.size = len(data)
                    dst.addfile(ti, io.BytesIO(data))
                    n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000, help="toy-world generation images")
    ap.add_argument("--world-size", type=int, default=512, help="side of the rendered JPEGs (px)")
    ap.add_argument("--out-size", type=int, default=256, help="curated side (px)")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--records-per-task", type=int, default=None, help="default: the stage config's default")
    ap.add_argument("--cpus-per-task", type=float, default=None, help="default: the stage config's default")
    ap.add_argument("--repeats", type=int, default=5, help="alternating loop/stage runs; the best of each is compared")
    ap.add_argument("--workdir", default=None, help="default: a temporary directory")
    args = ap.parse_args()
    for k, v in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}.items():
        os.environ.setdefault(k, v)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_curate_"))
    world = work / "world"
    if not (world / "generation").exists():
        wc = WorldConfig(image_size=args.world_size, n_generation=args.n, n_understanding=0, n_videoqa=0, n_video=0,
                         n_visual_thinking=0, n_image_edit=0, shard_size=1000)
        t = time.perf_counter()
        write_world(world, wc, seed=0)
        print(f"fixture: {args.n} toy-world JPEGs of {args.world_size} px in {time.perf_counter() - t:.1f} s -> {world}")

    import ray

    from pipelines.testing import run_stage
    from stages.curate_generation import CurateGeneration, CurateGenerationConfig

    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, object_store_memory=512 * 2**20, log_to_driver=False)
    cfg = CurateGenerationConfig(
        sources=[SourceConfig(name="bench", format="img2dataset", path=str(world / "generation"))],
        image_size=args.out_size,
        **({"records_per_task": args.records_per_task} if args.records_per_task else {}),
        **({"cpus_per_task": args.cpus_per_task} if args.cpus_per_task else {}),
    )

    def stage(label: str) -> float:
        t = time.perf_counter()
        _, stats = run_stage(CurateGeneration(), cfg, root=work / "runs")
        secs = time.perf_counter() - t
        print(f"  curate_generation ({label}): {int(stats['images_decoded'])} images in {secs:.2f} s = {stats['images_decoded'] / secs:.0f} images/s "
              f"(out {int(stats['samples_out'])}, quarantined {int(stats['quarantined'])}; process {stats['seconds_process']:.2f} s, "
              f"decide {stats['seconds_decide']:.2f} s, sort+write {stats['seconds_write']:.2f} s)")
        return stats["images_decoded"] / secs

    def loop() -> float:
        t = time.perf_counter()
        n = baseline(world / "generation", work / "baseline.tar", args.out_size)
        secs = time.perf_counter() - t
        print(f"  single-process PIL loop: {n} images in {secs:.2f} s = {n / secs:.0f} images/s")
        return n / secs

    cold = stage("cold")
    stage_rates, loop_rates = [], []
    for _ in range(args.repeats):
        loop_rates.append(loop())
        stage_rates.append(stage("warm"))
    ray.shutdown()
    best_stage, best_loop = max(stage_rates), max(loop_rates)
    print(f"best of {args.repeats}: curate_generation {best_stage:.0f} images/s, PIL loop {best_loop:.0f} images/s")
    print(f"ratio: {best_stage / best_loop:.2f}x (cold first run: {cold / best_loop:.2f}x; target >= 1.5x on {args.num_cpus} cores)")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} (other processes share these cores)")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

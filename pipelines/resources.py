"""Checks for `metamorph run --dry-run`: config, paths, storage, tracking and cluster resources.

    metamorph run --preset cluster --dry-run                 # against the cluster ray.address names
    metamorph run --preset cluster --dry-run --address 10.0.0.1:6379

Everything here is read-only: nothing is written under run_root, no stage runs. Each check
returns a list of problems (strings that name the config key and the fix); the dry run prints
them all at once rather than stopping at the first, so one pass fixes a whole preset.

``training_estimates`` is the per-training-stage table (samples and tokens per step, steps,
warmup, peak LR, memory per GPU for the FSDP2 layout), computed from the configs alone: it needs
neither the checkpoint (a checkpoint's config.json is read when present, else the ``llm`` fields
describe the architecture) nor the tokenized data (``train.expected_samples`` and
``train.expected_samples_per_row`` stand in for it), so it prints before any path check fails.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

# Config fields that name something a stage reads: checked to exist before any work starts.
# Output locations are never config fields (stages write under ctx.output), so anything here is
# an input: a checkpoint dir, an annotation file, an image root.
PATH_FIELD_NAMES = ("path", "image_root", "video_root")
PATH_FIELD_SUFFIXES = ("_path",)
WORLD_PREFIX = "world:"  # curation sources inside the toy-world artifact: produced by the run

# Filesystem types every host of a cluster can share (from /proc/mounts). A run_root on anything
# else is local to one host, which breaks a cluster spanning several: checkpoints, shards and
# manifests must be visible to every node.
SHARED_FS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "ceph", "cephfs", "glusterfs", "wekafs",
             "cifs", "smb3", "9p", "virtiofs", "efs", "fuse")
LOCAL_FS = ("ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "vfat", "f2fs", "ramfs")


# ------------------------------------------------------------------ config walking
def walk_config(obj: Any, prefix: str) -> Iterator[tuple[str, str, Any]]:
    """(dotted key, field name, value) for every leaf of a (nested) config dataclass."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _walk_value(getattr(obj, f.name), f"{prefix}.{f.name}", f.name)


def _walk_value(value: Any, key: str, name: str) -> Iterator[tuple[str, str, Any]]:
    if dataclasses.is_dataclass(value):
        yield from walk_config(value, key)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _walk_value(v, f"{key}[{i}]", name)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _walk_value(v, f"{key}.{k}", name)
    else:
        yield key, name, value


def is_path_field(name: str) -> bool:
    return name in PATH_FIELD_NAMES or name.endswith(PATH_FIELD_SUFFIXES)


def _exists(value: str) -> tuple[bool | None, str]:
    """(exists?, detail): None when the location cannot be checked from here."""
    if "://" in value and not value.startswith("file://"):
        try:
            import pyarrow.fs as pafs

            fs, inner = pafs.FileSystem.from_uri(value)
            info = fs.get_file_info(inner)
            return info.type != pafs.FileType.NotFound, ""
        except Exception as e:  # noqa: BLE001 - no credentials, no network, unknown scheme
            return None, f"{type(e).__name__}: {e}"
    return Path(value.removeprefix("file://")).expanduser().exists(), ""


# ------------------------------------------------------------------ checks
def check_stage_configs(engine, plan) -> list[str]:
    """Every planned stage's own ``validate(cfg)`` (paths it reads, codecs, cross-field rules)."""
    problems = []
    for it in plan:
        if it.action != "run":
            continue
        try:
            engine.dag.stages[it.name].validate(engine.stage_cfgs[it.name])
        except (ValueError, OSError) as e:
            problems.append(f"stage {it.name!r}: {e}")
    return problems


def check_paths(engine, plan, already: list[str] = ()) -> tuple[list[str], list[str]]:
    """Input paths in stage configs (``*.path``, ``*_path``, ``image_root``, ``video_root``) exist.

    Returns (problems, warnings); a path a stage's own validate already reported is not repeated,
    and a remote URI that cannot be checked from the driver is a warning."""
    problems, warnings = [], []
    for it in plan:
        if it.action != "run":
            continue
        for key, name, value in walk_config(engine.stage_cfgs[it.name], f"stages.{it.name}"):
            if not (is_path_field(name) and isinstance(value, str) and value):
                continue
            if value.startswith(WORLD_PREFIX):
                continue
            if any(msg.startswith(f"stage {it.name!r}:") and value in msg for msg in already):
                continue  # this stage's own validate reported it
            ok, detail = _exists(value)
            if ok is None:
                warnings.append(f"{key}={value!r}: cannot check from the driver ({detail})")
            elif not ok:
                problems.append(f"{key}={value!r} does not exist (stage {it.name!r} reads it)")
    return problems, warnings


def check_cross_stage(engine) -> list[str]:
    """Values two stages must agree on that neither can check alone."""
    problems = []
    cfgs = engine.stage_cfgs
    tok, conn = cfgs.get("tokenize"), cfgs.get("train_connector")
    llm = getattr(getattr(conn, "model", None), "llm", None)
    max_length = getattr(tok, "max_length", None)
    if llm is not None and max_length and llm.path is None and llm.max_position < max_length:
        problems.append(
            f"stages.train_connector.model.llm.max_position={llm.max_position} < "
            f"stages.tokenize.max_length={max_length}: packed rows would run past the position range"
        )
    return problems


def _fs_type(path: Path) -> str:
    """Filesystem type of the mount holding ``path`` (longest mount-point prefix)."""
    best, fstype = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return fstype
    p = str(path)
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, fstype = mnt, parts[2]
    return fstype


def check_run_root(run_root: str, n_hosts: int) -> tuple[list[str], list[str]]:
    """run_root is creatable/writable and, on a cluster of several hosts, on shared storage."""
    problems, warnings = [], []
    if "://" in run_root:
        warnings.append(f"run_root={run_root!r}: stages write with local file APIs; mount the bucket (e.g. a FUSE "
                        "mount) and give its path")
        return problems, warnings
    root = Path(run_root).expanduser().absolute()
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        problems.append(f"run_root={run_root!r}: {existing} is not writable by this user (the pipeline creates "
                        f"{root} and everything under it)")
    if n_hosts > 1:
        fstype = _fs_type(existing.resolve())
        base = fstype.split(".")[0]
        if base in LOCAL_FS:
            problems.append(f"run_root={run_root!r} is on a local {fstype} filesystem but the cluster spans {n_hosts} "
                            "hosts: every node reads and writes under run_root; point it at shared storage")
        elif base not in SHARED_FS:
            warnings.append(f"run_root={run_root!r} is on a {fstype} filesystem: make sure every host sees it")
    return problems, warnings


def check_tracking(uri: str | None, n_hosts: int) -> tuple[list[str], list[str]]:
    """An MLflow server answers; a file/sqlite store is only safe when every writer shares a host."""
    problems, warnings = [], []
    if uri and uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
                if r.status != 200:
                    problems.append(f"tracking.uri={uri!r}: /health answered HTTP {r.status}")
        except (urllib.error.URLError, OSError) as e:
            problems.append(f"tracking.uri={uri!r} is not reachable from the driver ({e}); start the MLflow server "
                            "or fix the URI")
    elif n_hosts > 1:
        warnings.append(f"tracking.uri={uri or 'sqlite in run_root'!r}: training workers on other hosts log to it; "
                        "an MLflow server (http://...) is the safe choice on a multi-host cluster")
    return problems, warnings


def worker_bundles(cfg: Any) -> list[tuple[int, dict[str, float]]]:
    """(count, per-worker resources) of every Ray Train worker group a stage config describes:
    any nested config with ``num_workers`` and ``cpus_per_worker`` (a training stage's
    ``scaling``, and configs shaped like it)."""
    out = []
    todo = [cfg]
    while todo:
        c = todo.pop()
        if not dataclasses.is_dataclass(c):
            continue
        if hasattr(c, "num_workers") and hasattr(c, "cpus_per_worker"):
            b = {"CPU": float(c.cpus_per_worker)}
            if getattr(c, "use_gpu", False):
                b["GPU"] = float(getattr(c, "gpus_per_worker", 1.0))
            out.append((int(c.num_workers), b))
        todo.extend(getattr(c, f.name) for f in dataclasses.fields(c))
    return out


def _fits_per_node(count: int, bundle: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many of ``count`` bundles the nodes hold (each bundle must sit on one node)."""
    placed = 0
    for node in nodes:
        per = min((math.floor(node.get(r, 0.0) / a + 1e-9) if a > 0 else count) for r, a in bundle.items())
        placed += per
    return min(placed, count)


def check_resources(engine, plan, totals: dict[str, float] | None = None,
                    nodes: list[dict[str, float]] | None = None) -> list[str]:
    """Problems (empty if none): a stage asking for more of a resource than the cluster has, or a
    worker group whose per-worker bundle does not fit the cluster's nodes."""
    if totals is None or nodes is None:
        import ray

        totals = ray.cluster_resources()
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    problems = []
    for it in plan:
        if it.action != "run":
            continue
        stage = engine.dag.stages[it.name]
        cfg = engine.stage_cfgs[it.name]
        short = False
        for res, amount in stage.resources(cfg).items():
            have = totals.get(res, 0.0)
            if amount > have + 1e-9:
                short = True
                problems.append(f"stage {it.name!r} needs {amount:g} {res}, the cluster has {have:g}")
        for count, bundle in ([] if short else worker_bundles(cfg)):  # a total shortfall says enough
            placed = _fits_per_node(count, bundle, nodes)
            if placed < count:
                problems.append(
                    f"stage {it.name!r}: {count} workers of {bundle} do not fit the cluster's nodes "
                    f"(only {placed} can be placed; each worker sits on one node)"
                )
    return problems


# ------------------------------------------------------------------ training steps and memory
# Which parameters each LLM training stage trains (metamorph.model.modeling.set_trainable).
TRAIN_STAGES = {"train_connector": "connector", "train_vpit": "vpit"}
GB = 1e9  # memory figures are in decimal GB, as cards are sold ("80 GB"): conservative vs GiB
# CUDA context, NCCL buffers, allocator caching/fragmentation: a fixed allowance per GPU.
RUNTIME_OVERHEAD_GB = 3.0


@dataclasses.dataclass(frozen=True)
class LLMShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @property
    def block_params(self) -> int:
        d = self.hidden
        return 2 * d * d + 2 * d * self.kv_dim + 3 * d * self.intermediate + 2 * d  # q,o k,v mlp 2 norms

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden


def llm_shape(model_cfg: Any) -> LLMShape:
    """The LLM's architecture: the checkpoint's config.json when ``llm.path`` holds one (its vocab
    + the two image tokens), else the ``llm`` fields (the cluster preset fills them with
    Llama-3.1-8B's so the estimate works before the checkpoint is downloaded)."""
    llm = model_cfg.llm
    conf = Path(str(llm.path)) / "config.json" if llm.path else None
    if conf is not None and conf.is_file():
        c = json.loads(conf.read_text())
        return LLMShape(
            hidden=int(c["hidden_size"]), layers=int(c["num_hidden_layers"]), heads=int(c["num_attention_heads"]),
            kv_heads=int(c.get("num_key_value_heads") or c["num_attention_heads"]),
            intermediate=int(c["intermediate_size"]), vocab=int(llm.vocab_size or int(c["vocab_size"]) + 2),
            tied=bool(c.get("tie_word_embeddings", False)),
        )
    return LLMShape(hidden=llm.hidden_size, layers=llm.num_layers, heads=llm.num_heads, kv_heads=llm.num_kv_heads,
                    intermediate=llm.intermediate_size, vocab=llm.vocab_size, tied=llm.tie_word_embeddings)


def param_counts(model_cfg: Any, shape: LLMShape, trainable: str) -> tuple[int, int]:
    """(all parameters, trainable parameters) of MetaMorphForCausalLM (without the frozen vision
    encoder, which is not part of it: features are precomputed by tokenize)."""
    d, dv = shape.hidden, model_cfg.vision_dim
    projector = dv * d + d + d * d + d  # Linear(D, d) - GELU - Linear(d, d)
    vision_head = d * d + d + d * dv + dv  # Linear(d, d) - GELU - Linear(d, D)
    head = 0 if shape.tied else shape.embed_params
    total = shape.embed_params + shape.layers * shape.block_params + d + head + projector + vision_head
    # stage 1: the projector and the input-embedding matrix (requires_grad is per weight: only its
    # two new rows get a gradient, but the whole matrix has gradient and AdamW state)
    return total, (total if trainable == "vpit" else projector + shape.embed_params)


@dataclasses.dataclass
class TrainEstimate:
    stage: str
    samples_per_step: float
    rows_per_step: float
    tokens_per_step: float  # positions (packed rows x max_length, padding included)
    steps_per_epoch: int | None  # None: train.expected_samples not set
    total_steps: int | None
    warmup_steps: int | None
    peak_lr: float
    memory_gb: dict[str, float]  # params, grads, optimizer, activations, overhead, total (per GPU)
    gpu_memory_gb: float | None  # the budget it must fit (GPU runs only)
    params: int
    trainable: int

    @property
    def fits(self) -> bool:
        return self.gpu_memory_gb is None or self.memory_gb["total"] <= self.gpu_memory_gb

    def row(self) -> tuple[str, ...]:
        def n(v):
            return "-" if v is None else f"{v:,}"

        m = self.memory_gb
        budget = "" if self.gpu_memory_gb is None else f" / {self.gpu_memory_gb:g}"
        return (
            self.stage, f"{self.samples_per_step:,.0f}", f"{self.rows_per_step:,.1f}", f"{self.tokens_per_step:,.0f}",
            n(self.steps_per_epoch), n(self.total_steps), n(self.warmup_steps), f"{self.peak_lr:.3g}",
            f"{m['params']:.1f} / {m['grads']:.1f} / {m['optimizer']:.1f} / {m['activations']:.1f}",
            f"{m['total']:.1f}{budget}",
        )


TRAIN_COLUMNS = ("stage", "samples/step", "rows/step", "tokens/step", "steps/epoch", "total steps", "warmup",
                 "peak LR", "GB/GPU params/grads/optim/act", "GB/GPU total")


def memory_per_gpu(shape: LLMShape, params: int, trainable: int, train: Any, seq_len: int, scaling: Any) -> dict[str, float]:
    """Estimated bytes per GPU (in GB) of one training worker.

    FSDP2 (``fully_shard`` per decoder block, then the root) over ``scaling.num_workers``: fp32 master
    parameters, fp32 gradients (reduce fp32) and AdamW's two fp32 moments sharded 1/N; plus the
    bf16 copies gathered for compute (two blocks, the current and the prefetched one, and the root
    module's own weights: embeddings, LM head, projector, vision head). DDP: all of it replicated.
    Activations at ``micro_batch_size`` rows of ``seq_len`` positions, per layer per position
    (SDPA/flash attention: no L x L score matrix is kept): the saved inputs of the norms, q/k/v,
    attention output, o_proj, and the SwiGLU's gate/up/act/product, ~(8d + 2 kv_dim + 4 I) values;
    with activation checkpointing only each block's input (d) is kept plus one block recomputed.
    The logits add V values per position three times (bf16 logits, fp32 for the loss, fp32 grad).
    """
    shard = scaling.num_workers if train.strategy == "fsdp2" else 1
    act = 2 if (train.precision == "bf16" and scaling.use_gpu) else 4
    p_bytes = 4 * params / shard
    if train.strategy == "fsdp2" and act == 2:
        root = params - shape.layers * shape.block_params
        p_bytes += 2 * (2 * shape.block_params + root)
    g_bytes = 4 * trainable / shard
    o_bytes = 8 * trainable / shard
    tokens = train.micro_batch_size * seq_len
    per_layer = (8 * shape.hidden + 2 * shape.kv_dim + 4 * shape.intermediate) * act
    if train.grad_checkpointing:
        a_bytes = tokens * (shape.layers * shape.hidden * act + per_layer)
    else:
        a_bytes = tokens * shape.layers * per_layer
    a_bytes += tokens * shape.vocab * (act + 4 + 4)
    overhead = RUNTIME_OVERHEAD_GB * GB if scaling.use_gpu else 0.0
    mem = {"params": p_bytes, "grads": g_bytes, "optimizer": o_bytes, "activations": a_bytes, "overhead": overhead}
    mem = {k: v / GB for k, v in mem.items()}
    mem["total"] = sum(mem.values())
    return mem


def _model_cfg(engine, stage: str):
    cfg = engine.stage_cfgs[stage]
    if getattr(cfg, "model", None) is not None:
        return cfg.model
    # train_vpit builds from train_connector's export: its model is train_connector's
    for other in engine.stage_cfgs.values():
        if getattr(getattr(other, "model", None), "llm", None) is not None:
            return other.model
    return None


def training_estimates(engine, plan) -> tuple[list[TrainEstimate], list[str]]:
    """The table rows for every planned LLM training stage, and the problems (memory over budget)."""
    estimates, problems = [], []
    tok = engine.stage_cfgs.get("tokenize")
    for it in plan:
        if it.name not in TRAIN_STAGES or it.action != "run":
            continue
        cfg = engine.stage_cfgs[it.name]
        train, scaling, model_cfg = cfg.train, cfg.scaling, _model_cfg(engine, it.name)
        if model_cfg is None:
            continue
        shape = llm_shape(model_cfg)
        seq_len = int(getattr(tok, "max_length", 0) or model_cfg.llm.max_position)
        spr = train.expected_samples_per_row
        if train.counts_samples:
            samples = float(train.global_batch_samples)
            rows = samples / spr if spr else float("nan")
        else:
            rows = float(train.global_batch_rows(scaling.num_workers))
            samples = rows * spr if spr else float("nan")
        steps_epoch = total = warmup = None
        if train.expected_samples and spr:
            steps_epoch = int(train.expected_samples // samples)
            total = train.max_steps or int(train.expected_samples * train.epochs // samples)
            warmup = math.ceil(train.warmup_ratio * total)
        params, trainable = param_counts(model_cfg, shape, TRAIN_STAGES[it.name])
        mem = memory_per_gpu(shape, params, trainable, train, seq_len, scaling)
        est = TrainEstimate(
            stage=it.name, samples_per_step=samples, rows_per_step=rows, tokens_per_step=rows * seq_len,
            steps_per_epoch=steps_epoch, total_steps=total, warmup_steps=warmup, peak_lr=train.peak_lr(scaling.num_workers),
            memory_gb=mem, gpu_memory_gb=train.gpu_memory_gb if scaling.use_gpu else None,
            params=params, trainable=trainable,
        )
        estimates.append(est)
        if not est.fits:
            problems.append(
                f"stage {it.name!r}: estimated {mem['total']:.1f} GB per GPU > stages.{it.name}.train.gpu_memory_gb="
                f"{train.gpu_memory_gb:g} (params {mem['params']:.1f}, grads {mem['grads']:.1f}, optimizer "
                f"{mem['optimizer']:.1f}, activations {mem['activations']:.1f}): lower train.micro_batch_size, "
                "turn on train.grad_checkpointing, or shard over more scaling.num_workers"
            )
        if train.counts_samples and spr and train.global_batch_rows(scaling.num_workers) * spr > samples:
            problems.append(
                f"stage {it.name!r}: one round of micro-batches ({train.micro_batch_size} rows x {scaling.num_workers} "
                f"workers x ~{spr:g} samples/row) holds more than train.global_batch_samples={samples:.0f}"
            )
    return estimates, problems


# ------------------------------------------------------------------ the dry run
@dataclasses.dataclass
class DryRun:
    problems: list[str]
    warnings: list[str]
    rows: list[tuple[str, str, str]]  # (stage, action, resources) for the printed plan
    cluster: str
    training: list[TrainEstimate] = dataclasses.field(default_factory=list)


def _hosts(nodes: list[dict]) -> int:
    return len({n.get("NodeManagerAddress") for n in nodes if n.get("Alive")}) or 1


def dry_run(engine, plan, loaded, connect) -> DryRun:
    """All checks; ``connect()`` joins the cluster (it may raise) and returns a description."""
    problems = check_stage_configs(engine, plan)
    path_problems, warnings = check_paths(engine, plan, problems)
    problems += path_problems + check_cross_stage(engine)
    training, train_problems = training_estimates(engine, plan)
    problems += train_problems
    rows = []
    for it in plan:
        need = engine.dag.stages[it.name].resources(engine.stage_cfgs[it.name]) if it.action == "run" else {}
        shown = ", ".join(f"{v:g} {k}" for k, v in sorted(need.items()))
        rows.append((it.name, it.action, shown or ("in the driver" if it.action == "run" else "-")))
    try:
        where = connect()
    except Exception as e:  # noqa: BLE001 - a cluster that cannot be reached is one more problem
        problems.append(f"cannot connect to Ray ({type(e).__name__}: {e}); check ray.address / --address")
        return DryRun(problems, warnings, rows, "not connected", training)
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    totals = ray.cluster_resources()
    n_hosts = _hosts(nodes)
    problems += check_resources(engine, plan, totals, [n["Resources"] for n in nodes])
    p, w = check_run_root(loaded.typed.run_root, n_hosts)
    problems += p
    warnings += w
    p, w = check_tracking(loaded.typed.tracking.uri, n_hosts)
    problems += p
    warnings += w
    shown = ", ".join(f"{totals.get(k, 0):g} {k}" for k in ("CPU", "GPU") if k in totals or k == "CPU")
    cluster = f"{where}: {len(nodes)} node(s) on {n_hosts} host(s), {shown}"
    return DryRun(problems, warnings, rows, cluster, training)

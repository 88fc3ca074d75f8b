"""Tensor parallelism at batch 1 (Megatron-style, as gpt-fast does), over torch.distributed.

    torchrun --nproc-per-node N -m fasteagle.generate --checkpoint DIR --draft HEAD ...

Each of the N ranks holds 1/N of every decoder layer and runs the same program:

    q/k/v, gate/up (w1, w3)   column-parallel: rank r keeps its 1/N of the output features (whole heads, whole
                              KV heads: n_heads and n_kv_heads must divide by N)
    wo, w2 (down)             row-parallel: rank r keeps the matching 1/N of the input features; the partial
                              outputs are summed by one all-reduce each (a functional collective, so it traces into
                              a compiled graph and a CUDA graph)
    embedding, LM head, norms replicated: at batch 1 the LM head is one GEMV over [vocab, dim]; sharding it would
                              add an all-gather of the logits per forward for 1/N of a weight that is ~1.5% of a
                              70B model (see the README's plan)

An all-reduce leaves the same bits on every rank, so every rank computes the same hidden states, logits and choices:
the draft head is replicated and drafts the same tree everywhere, nothing is broadcast per round. What could still
differ is host-side: the sampling seed (same_seed) and the measured costs the shape chooser reads (from_rank0).

Each rank reads only its slice of each weight from model.safetensors (safetensors' lazy slices: `shard_of`
tells checkpoint.load_weights which dimension of which tensor to cut).
"""
import atexit
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from fasteagle.errors import FastEagleError

COLUMN = ("attn.wq", "attn.wk", "attn.wv", "mlp.w1", "mlp.w3")  # weight (and bias) split along dim 0
ROW = ("attn.wo", "mlp.w2")  # weight split along dim 1, output all-reduced


@dataclass(frozen=True)
class TP:
    rank: int
    world: int
    group: object = None  # the process group (None: the default one)


def from_env(device: str) -> TP | None:
    """The TP layout torchrun describes (WORLD_SIZE > 1), with the process group initialised (NCCL on CUDA, gloo on
    CPU) and, on CUDA, this rank's GPU made current; None when not launched that way."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if not dist.is_initialized():
        join("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return TP(dist.get_rank(), dist.get_world_size())


def join(backend: str, **init_kwargs):
    """dist.init_process_group, set up to leave cleanly at exit (shutdown). A gloo group still alive when the
    interpreter finalizes aborts the process there ("terminate called without an active exception": its worker
    threads stop after Python has shut threads out), in about a quarter of 2-rank CPU runs, after their work is
    done. Two things kept the group alive past destroy_process_group (torch 2.13): importing torch._dynamo after the
    group exists (torch.compile does, and so does the first eager funcol.all_reduce), hence the import here; and a
    compiled graph that read the group object (the all-reduce hooks hold its name instead)."""
    import torch._dynamo  # noqa: F401  (before the group: see above)

    dist.init_process_group(backend, **init_kwargs)
    atexit.register(shutdown)


def shutdown():
    """Leave the process group, if this process is in one (join registers this to run at exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check(args, world: int):
    """One-line errors for a target this world size cannot split."""
    if args.n_experts:
        raise FastEagleError("tensor parallelism of mixture-of-experts targets is not supported yet")
    for what, n in (("attention heads", args.n_heads), ("KV heads", args.n_kv_heads),
                    ("feed-forward features", args.intermediate_size)):
        if n % world:
            raise FastEagleError(f"--nproc-per-node {world} does not divide the target's {n} {what}; "
                                 f"use a world size that does")


def shard_of(name: str, tp: TP | None):
    """(dim, rank, world) for a checkpoint tensor this rank holds a slice of, or None (replicated)."""
    if tp is None or not name.startswith("layers."):
        return None
    owner = name.rsplit(".", 1)[0]  # layers.3.attn.wq
    if owner.endswith(COLUMN):
        return 0, tp.rank, tp.world
    if owner.endswith(ROW) and name.endswith(".weight"):
        return 1, tp.rank, tp.world
    return None


def _all_reduce_hook(group):
    """Sum a row-parallel layer's output over the group. The hook holds the group's name, not the group: a compiled
    graph that read the group object would keep it alive past shutdown (see join)."""
    from torch.distributed import _functional_collectives as funcol

    name = (group or dist.group.WORLD).group_name

    def hook(module, inputs, output):
        return funcol.all_reduce(output, "sum", name)
    return hook


def shard(model: nn.Module, tp: TP) -> nn.Module:
    """Resize `model`'s layers (on the meta device, before its weights are read) to this rank's shard, and sum the
    row-parallel outputs across ranks. The model's args stay those of the whole model."""
    check(model.args, tp.world)
    for layer in model.layers:
        attn = layer.attn
        attn.n_heads //= tp.world
        attn.n_kv_heads //= tp.world
        for name in COLUMN + ROW:
            part, lin = name.split(".")
            m = getattr(getattr(layer, part), lin)
            dim = 0 if name in COLUMN else 1
            shape = list(m.weight.shape)
            shape[dim] //= tp.world
            m.weight = nn.Parameter(torch.empty(shape, dtype=m.weight.dtype, device=m.weight.device))
            if dim == 0 and m.bias is not None:
                m.bias = nn.Parameter(torch.empty(shape[0], dtype=m.bias.dtype, device=m.bias.device))
            m.out_features, m.in_features = m.weight.shape
            if name in ROW:
                m.register_forward_hook(_all_reduce_hook(tp.group))
    model.tp = tp
    return model


def fingerprint(ckpt_dir, samples: int = 16, chunk: int = 1 << 16) -> str:
    """What must agree across ranks, read cheaply: the config, the safetensors header (names, shapes, dtypes,
    offsets) and `samples` chunks of the weights spread over the file (two checkpoints of one architecture differ
    there), without reading the whole file."""
    ckpt_dir = Path(ckpt_dir)
    h = hashlib.sha256((ckpt_dir / "config.json").read_bytes())
    path = ckpt_dir / "model.safetensors"
    size = path.stat().st_size
    with open(path, "rb") as f:
        for i in range(samples + 1):
            f.seek(size * i // (samples + 1))
            h.update(f.read(chunk))
    return h.hexdigest()


def check_same(what: str, value: str, tp: TP | None):
    """Fail on every rank, in one line, when ranks disagree about `value` (e.g. loaded different checkpoints)."""
    if tp is None:
        return
    values = [None] * tp.world
    dist.all_gather_object(values, value, group=tp.group)
    bad = [r for r, v in enumerate(values) if v != values[0]]
    if bad:
        raise FastEagleError(f"rank {bad[0]} loaded a different {what} than rank 0: every rank must load the same one")


def from_rank0(obj, tp: TP | None):
    """Rank 0's `obj` on every rank (host-side decisions that must not differ: measured costs, cache checks)."""
    if tp is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=tp.group)
    return box[0]


def current() -> TP | None:
    """The TP layout of this process (set by from_env / a test's init), or None on one device."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return TP(dist.get_rank(), dist.get_world_size())


def same_seed(seed: int | None) -> int:
    """A sampling seed every rank shares: the given one, or rank 0's fresh one."""
    if seed is None:
        seed = torch.seed()
        seed = from_rank0(seed, current())
    return seed

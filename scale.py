"""
What running at scale needs, and nothing about the method: devices and precision (bf16 compute over fp32 master
weights), torchrun's process group, DDP or FSDP2 around the policy, and checkpoints that survive a kill. ral.py and
distill.py call these; on one CPU process each is a no-op or a plain save.
"""
import os
import shutil
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from cli import UsageError
from model import training_memory

# ----------------------------------------------------------------------------------------------------------------
# Devices, precision, ranks, sharding

def compute(cfg, device):
    """The autocast context of every forward and backward: bf16 compute over fp32 master weights on GPU."""
    dtype = cfg["compute_dtype"] if cfg["compute_dtype"] != "auto" else \
        "bfloat16" if device.startswith("cuda") else "float32"
    return torch.autocast(device.split(":")[0], torch.bfloat16) if dtype == "bfloat16" else nullcontext()


def memory_report(model, world, fsdp=False, reference=True):
    w = next(model.parameters())      # FSDP gathers in bf16 on GPU (wrap's policy), in the weights' dtype on CPU
    m = training_memory(model, world, fsdp, w.element_size(), reference, 2 if w.is_cuda else w.element_size())
    return f"training state per device ({'FSDP' if fsdp else 'DDP' if world > 1 else 'one process'}, " \
           f"{world} device(s)): " + ", ".join(f"{k} {v / 2 ** 30:.2f} GiB" for k, v in m.items())


def setup_distributed(cfg):
    """torchrun sets RANK: then one process per device, gloo on CPU, nccl on GPU. Otherwise a single process."""
    ddp = "RANK" in os.environ
    if cfg["fsdp"] and not ddp:
        raise UsageError("--fsdp=True shards over torchrun's ranks: torchrun --nproc_per_node=N ral.py ...")
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    if cfg["prompts_per_step"] % world:
        raise UsageError(f"--prompts_per_step={cfg['prompts_per_step']} must divide among {world} ranks")
    device = cfg["device"]
    if device == "auto":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    return rank, world, device


def wrap(model, cfg, world, device):
    """The model as trained on `world` ranks: itself alone; DDP (a full replica per rank, gradients all-reduced) by
    default; with --fsdp=True, FSDP2 in place: each decoder layer, the vision tower and the root (embeddings, norm,
    head) become units whose fp32 weights, gradients and AdamW state are sharded over the ranks and gathered one
    unit at a time for each forward and backward. The vision tower is its own unit so generate never mixes plain
    tensors and shards. On GPU the gathered weights are bf16 and gradients reduce in fp32."""
    if not cfg["fsdp"]:
        # gradient_as_bucket_view: DDP's buckets are the gradients, not a second copy of them
        return torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True) if world > 1 else model
    bf16 = device.startswith("cuda")
    return shard(model, world, device, MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                                            reduce_dtype=torch.float32 if bf16 else None))


def shard(model, world, device, policy=MixedPrecisionPolicy()):
    """FSDP2 in place, unit by unit (wrap's policy; the frozen reference too: it needs no optimizer, and every
    rank runs the same number of its forwards, so their all-gathers stay in step)."""
    mesh = init_device_mesh(device.split(":")[0], (world,))
    for unit in [model.model.visual, *model.model.language_model.layers, model]:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    # generate encodes images before the first root forward; FSDP must set up from the root (else: "already lazily
    # initialized for model.visual"), and torch has no public call for that yet
    model._get_fsdp_state()._lazy_init()
    return model


@contextmanager
def gathered(model):
    """A sharded (FSDP) model whole for a block of forwards that need no gradient (a rollout, an evaluation): every
    unit all-gathers its weights once (in the compute dtype: bf16 on GPU) and keeps them until the block ends,
    instead of once per forward, which is once per new token in generate (4 N + 1 all-gathers for N tokens on the
    tiny model). Inside, forwards make no collective at all, so each rank can decode its own prompts to its own
    length. After it every unit is resharded and reshards after forward again (FSDP's defaults, which shard()
    uses: every unit but the root; torch PR 149103 added the setter for this). A no-op for any other model."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not model, recurse=False)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: a save_pretrained folder plus trainer_state.pt (written last), swapped in by renames.

def save_checkpoint(path, model, processor, optimizer, state, rank=0):
    """Every rank calls it; rank 0 writes. A sharded (FSDP) model's weights and optimizer state are first gathered
    into full state dicts on rank 0's CPU (a collective), so the folder is the same as an unsharded run's."""
    weights, optim = None, optimizer.state_dict() if optimizer else None
    if isinstance(model, FSDPModule):
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=full)
        optim = get_optimizer_state_dict(model, optimizer, options=full) if optimizer else None  # keyed by name
    if rank != 0:
        return
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=weights)
    processor.save_pretrained(tmp)
    rng = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    torch.save(dict(state, optimizer=optim, rng=rng),
               os.path.join(tmp, "trainer_state.pt"))
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoint(path):
    """A crash between save_checkpoint's two renames leaves path.old (the previous checkpoint) and path.tmp (the
    new one, complete: trainer_state.pt is written last). Put the newest complete one back at path."""
    if not os.path.exists(os.path.join(path, "trainer_state.pt")):
        for candidate in (path + ".tmp", path + ".old"):
            if os.path.exists(os.path.join(candidate, "trainer_state.pt")):
                shutil.rmtree(path, ignore_errors=True)
                os.replace(candidate, path)
                print(f"recovered the checkpoint {path} from {candidate} (a save was interrupted)")
                break
    return path


def newest_checkpoint(path, rank=0, world=1):
    """path once rank 0 has recovered an interrupted swap (the others wait, so no two ranks rename), else None."""
    if rank == 0:
        recover_checkpoint(path)
    if world > 1:
        dist.barrier()
    return path if os.path.exists(os.path.join(path, "trainer_state.pt")) else None


def load_optimizer(model, optimizer, saved, fsdp):
    if fsdp:     # the full state dict rank 0 saved; each rank keeps its own shard of it
        set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(saved)

"""
What running at scale needs, and nothing about the method: devices and precision (bf16 compute over fp32 master
weights), torchrun's process group, DDP or FSDP2 around the policy, checkpoints that survive a kill, and the
trainer's state placed, wrapped and resumed from them. ral.py and distill.py call these; on one CPU process each is
a no-op or a plain save.
"""
import json
import os
import shutil
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from cli import UsageError
from model import load, set_attn_layer, training_memory

# ----------------------------------------------------------------------------------------------------------------
# Devices, precision, ranks, sharding

def compute(cfg, device):
    """The autocast context of every forward and backward: bf16 compute over fp32 master weights on GPU."""
    dtype = cfg["compute_dtype"] if cfg["compute_dtype"] != "auto" else \
        "bfloat16" if device.startswith("cuda") else "float32"
    return torch.autocast(device.split(":")[0], torch.bfloat16) if dtype == "bfloat16" else nullcontext()


def memory_report(model, world, fsdp=False, reference=True, device="cpu"):
    w = next(w for w in model.parameters() if w.requires_grad)    # a master weight (not the bf16 tower's)
    gathered_bytes = 2 if device.startswith("cuda") else w.element_size()    # FSDP gathers in bf16 on GPU (wrap)
    m = training_memory(model, world, fsdp, w.element_size(), reference, gathered_bytes)
    return f"training state per device ({'FSDP' if fsdp else 'DDP' if world > 1 else 'one process'}, " \
           f"{world} device(s)): " + ", ".join(f"{k} {v / 2 ** 30:.2f} GiB" for k, v in m.items())


def setup_distributed(cfg):
    """torchrun sets RANK: then one process per device, gloo on CPU, nccl on GPU. Otherwise a single process.
    A collective that waits longer than --dist_timeout seconds fails the job (NCCL's own default is 10 minutes):
    the others wait that long for rank 0 to gather and write a checkpoint."""
    ddp = "RANK" in os.environ
    if cfg["fsdp"] and not ddp:
        raise UsageError("--fsdp=True shards over torchrun's ranks: torchrun --nproc_per_node=N ral.py ...")
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=timedelta(seconds=cfg["dist_timeout"]))
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
    default; with --fsdp=True, FSDP2 in place (shard). On GPU the gathered weights are bf16 and gradients reduce in
    fp32. The frozen vision tower is a plain bf16 replica on GPU in every mode (replicate_tower)."""
    if not cfg["fsdp"]:
        replicate_tower(model, device)
        # gradient_as_bucket_view: DDP's buckets are the gradients, not a second copy of them
        # a tower SFT trains (--sft_tower_lr) is unused on a rank whose batch is text alone: DDP must look for that
        trains_tower = any(w.requires_grad for w in model.model.visual.parameters())
        return torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True,
                                                         find_unused_parameters=trains_tower) if world > 1 else model
    bf16 = device.startswith("cuda")
    return shard(model, world, device, MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                                            reduce_dtype=torch.float32 if bf16 else None))


def replicate_tower(model, device):
    """The frozen vision tower and merger as a plain replica on every rank, on the device, its weights bf16 on GPU
    (the reference's dtype; its rotary inv_freq buffer stays fp32, as from_pretrained keeps it). Frozen, it needs no
    gradients or optimizer state; sharded, it would be gathered once per call, and ranks whose micro-batches hold
    different media (image + video: two calls, two images: one, text: none) would fall out of step. A tower SFT
    trains (--sft_tower_lr, not under FSDP) keeps fp32 master weights, as the LLM's."""
    visual = model.model.visual.to(device)
    if device.startswith("cuda") and not any(w.requires_grad for w in visual.parameters()):   # trained: fp32 master
        for w in visual.parameters():
            w.data = w.data.to(torch.bfloat16)
    return model


def shard(model, world, device, policy=MixedPrecisionPolicy()):
    """FSDP2 in place: each decoder layer, then the root (embeddings, norm, head), become units whose weights are
    sharded over the ranks and gathered one unit at a time, so every rank issues the same collectives whatever its
    batch holds; the vision tower stays out (replicate_tower). Used for the frozen reference too (it needs no
    optimizer, and every rank runs the same number of its forwards). A model loaded on the CPU reaches the device
    unit by unit (fully_shard moves each unit's weights, then keeps only its shard): no full copy per device."""
    replicate_tower(model, device)
    mesh = init_device_mesh(device.split(":")[0], (world,))
    for unit in model.model.language_model.layers:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=set(model.model.visual.parameters()))
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


def load_trainer_state(path, rank=0, fsdp=False):
    """A checkpoint's trainer_state.pt on the CPU, memory-mapped: a tensor is read from the file only when used,
    and none lands on a GPU whole (7B: its AdamW state is 61 GB). Under FSDP only rank 0 keeps the optimizer
    state (load_optimizer sends each rank its shards); a DDP replica needs all of it."""
    state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", mmap=True, weights_only=True)
    if fsdp and rank != 0:
        state["optimizer"] = None
    return state


def load_optimizer(model, optimizer, saved, fsdp):
    """The saved full optimizer state into the optimizer: under FSDP, rank 0's copy is broadcast one tensor at a
    time and each rank keeps only its shard of it (the others pass None); otherwise loaded whole (moved to the
    parameters' device)."""
    if fsdp:
        set_optimizer_state_dict(model, optimizer, saved or {},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        optimizer.load_state_dict(saved)


# ----------------------------------------------------------------------------------------------------------------
# What the RL loop starts from

def trainer_state(cfg, start, rank, world, device):
    """What the loop starts from: the policy (the RL checkpoint's weights when resuming, else `start`'s), the frozen
    reference for Eq. 1's KL, the wrapped model that trains (DDP or FSDP), AdamW, and the step and results to go
    on from. Returns (model, processor, ref_model, train_model, optimizer, step, results, resumed)."""
    ckpt = os.path.join(cfg["out_dir"], "ckpt")
    resume = cfg["resume"] and newest_checkpoint(ckpt, rank, world)   # None: killed before it, RL starts over
    # under FSDP both load on the CPU and reach the device shard by shard (scale.shard): no full copy per device
    place = "cpu" if cfg["fsdp"] else device
    ref_model = None
    if cfg["beta"] > 0:   # the frozen reference, bf16 on GPU
        ref_model = load(start, place, torch.bfloat16 if device.startswith("cuda") else torch.float32)[0]
        ref_model.eval().requires_grad_(False)
        if cfg["fsdp"]:
            shard(ref_model, world, device)        # as memory_report counts it: 1 / world of it per device
    model, processor = load(ckpt if resume else start, place, getattr(torch, cfg["dtype"]))
    try:
        set_attn_layer(model, cfg["attn_layer"])          # the policy's layer, before any capture
    except ValueError as e:
        raise UsageError(f"--attn_layer: {e}") from None
    if ref_model is not None:   # the same frozen tower (prepare): one replica per device, not two
        model.model.visual = ref_model.model.visual
    if rank == 0:
        print(memory_report(model, world, cfg["fsdp"], reference=ref_model is not None, device=device))
    if cfg["grad_checkpointing"]:
        model.activation_checkpointing_enable(dict(use_reentrant=False))
    train_model = wrap(model, cfg, world, device)            # after it, the parameters are FSDP's shards
    optimizer = torch.optim.AdamW([w for w in model.parameters() if w.requires_grad], lr=cfg["lr"],
                                  weight_decay=cfg["weight_decay"])
    step, results = 0, {}
    if resume:   # optimizer, rng, step and results from the checkpoint
        state = load_trainer_state(ckpt, rank, cfg["fsdp"])
        load_optimizer(model, optimizer, state["optimizer"], cfg["fsdp"])
        torch.set_rng_state(state["rng"]["cpu"].cpu())
        step, results = state["step"], json.loads(state["results"])
    return model, processor, ref_model, train_model, optimizer, step, results, bool(resume)

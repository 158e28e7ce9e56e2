"""Training-step time of BoRA (MAP, SVI) against a plain LoRA floor and the paper code's loop,
side by side in one run on the same model shape, batch and rank; plus evaluation throughput.

A step is forward + backward + optimiser step on one batch that mixes tasks:

  floor  one PEFT LoRA adapter (``get_peft_model``), AdamW over its parameters: what a multi-task
         method cannot beat by much.
  loop   the pattern of the paper's public code (Eide & Frigessi): a PEFT model with one adapter per
         task plus a global one; for each task present in the batch ``set_adapter`` and a forward on
         that task's rows; loss = sum of the per-task losses (each a mean over tokens, weighted by
         the task's row count) + ``tau * sum_d ||theta_d - Theta||^2`` over the adapter
         parameters; AdamW over all adapters.
  map    bora_pyro's `MAPStepper` as `fit_map` builds it (fixed tau), over the `MultiTaskLM` and
         `BoraModel` of `bora_pyro.models.build_bora`: one forward per batch, whatever tasks it mixes.
  svi    bora_pyro's `SVIStepper` (mean-field Normal guide), built the same way.
  eval   tokens/s of the per-task NLL (``MultiTaskLM.sequence_nll`` with the ``[D, P]`` task
         adapters, as `bora_pyro.evaluation.per_doc_nll` calls it, under ``no_grad``) against the
         base model's plain forward + the same token NLL on the same tokens.

With ``--layouts padded packed`` the floor, MAP and SVI are also timed on *packed* batches
(`bora_pyro.data.batches.collate_packed`: the same documents laid end to end in rows of about
``--row-tokens`` tokens): the floor as people pack for one adapter (PEFT model, ``position_ids``
restarting at every document, transformers' packed-sequence mask), MAP and SVI through
`MultiTaskLM`'s per-token adapters. Every layout steps on the same documents, so *real tokens
per second* (tokens that are not padding, over step time) compare them directly.

The model is a randomly initialised ``LlamaForCausalLM`` with SmolLM2-135M's shape (no download;
random weights time the same), LoRA on all seven projections. Batches: ``--batch`` documents of
random token ids, task ids spread over the tasks (each batch mixes them), fixed seed; every
document ``--seq`` tokens long (``--lengths full``), or lengths drawn from the Shakespeare speech
lengths of the demo's data capped at ``--seq`` (``--lengths shakespeare``, see
`SHAKESPEARE_LENGTHS`; then ``--layouts`` defaults to both).

    python benchmarks/step_time.py                              # CPU-sized defaults
    python benchmarks/step_time.py --tasks 5 25 100 --json      # step time vs number of tasks
    python benchmarks/step_time.py --lengths shakespeare --methods floor map   # padded vs packed
    python benchmarks/step_time.py --batch 64 --seq 256 --tasks 25 --rank 16 --dtype bf16  # GPU
    python benchmarks/step_time.py --layers 2 --targets q_proj v_proj --tasks 5 100 1000 10000 \
        --rounds 3 --methods floor map svi --adapter-storage host    # many tasks, tables in host memory

``--targets`` picks the LoRA layers (default all seven projections); ``--task-step`` and
``--adapter-storage`` set `TrainConfig.task_step` / ``adapter_storage`` of MAP and SVI
(docs/many-tasks.md). Every trained method reports the bytes of its adapters' parameters,
gradients and optimiser state on the compute device and in host memory (``device_bytes`` /
``host_bytes`` per task count in the JSON, the last two columns of the table) and, for MAP and
SVI, the device bytes at the largest task count over those at the smallest and the host bytes
per task over one adapter's (``config.adapter_bytes``).

Every (method, task count) has its own copy of the base model (MAP, SVI and the BoRA eval,
which wrap it the same way, may share one) and is warmed up (``--warmup`` steps) before its
``--steps`` timed steps; CUDA is synchronised before every clock read. ``--schedule``:
``sequential`` builds one method at a time on a fresh copy, times it and frees it (``del`` +
``gc``) before the next, so its CUDA peak memory is its own; ``interleaved`` holds them all and
steps them in turn (rotating who goes first), so a drifting machine load hits every method alike;
``auto`` (default) is interleaved on CPU, sequential on CUDA. ``--rounds R`` repeats the whole
measurement; medians are over all timed steps.

On a shared CPU, pass ``--threads 1``: with more torch threads than free cores, every op waits
for a descheduled thread (measured under load: 420 small ops 2.5 s with 2 threads, 3 ms with
1), so the timings count ops rather than work and penalise the methods with many small ops (the
loop above all). The script says so when the load average is high; ``machine.load_avg`` records
it.

Prints a table of medians and ratios to the floor; with ``--json`` the last line is one JSON
object: config, machine, ``median_s`` per method, ``map_ratio`` / ``svi_ratio`` /
``loop_ratio`` (step time / floor step time), ``eval_ratio`` (BoRA eval time / base eval time
for the same tokens, i.e. base tokens/s over BoRA tokens/s), ``peak_mem_bytes`` per method
(``memory_kind`` says what it is), ``tokens_per_s`` (real tokens per second of every timed
method), ``real_fraction`` (real / computed tokens of each layout's batches),
``packing_speedup`` (packed over padded real tokens per second, per method) and ``by_tasks``
(the same per ``--tasks`` value; the top-level values are those of the first one).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bora_pyro.data import IGNORE_INDEX
from bora_pyro.data.batches import DEFAULT_ROW_TOKENS, collate, collate_packed

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ["floor", "loop", "map", "svi", "eval"]
LAYOUTS = ["padded", "packed"]
#: Methods that also run on packed batches (the loop runs one task's rows at a time, and
#: evaluation pads: it sorts documents by length).
PACKABLE = ("floor", "map", "svi")
LABELS = {
    "floor": "floor: 1 PEFT LoRA",
    "loop": "paper-code loop (PEFT)",
    "map": "bora_pyro MAP",
    "svi": "bora_pyro SVI",
    "eval_base": "eval: base forward",
    "eval_bora": "eval: bora per-task NLL",
}
PACKED = "_packed"  # suffix of a method's name on packed batches
ALPHA = 16.0
LR = 1e-3

#: Document lengths (SmolLM2 tokens of a speech + the start token) at every 2.5th percentile,
#: 0 to 100, of the 2,620 speeches of the demo's 24 Shakespeare characters
#: (`bora_pyro.data.DEFAULT_CHARACTERS`): median 20, 90th percentile 108, maximum 696.
SHAKESPEARE_LENGTHS = (
    3, 4, 5, 6, 6, 7, 7, 7, 8, 9, 9, 10, 11, 12, 12, 13, 14, 15, 16, 18, 20, 22, 23, 25, 28, 30,
    32, 35, 38, 42, 47, 54, 61, 70, 81, 92, 108, 128, 158, 222, 696,
)


def sample_lengths(count: int, cap: int, generator: torch.Generator) -> list[int]:
    """``count`` document lengths from `SHAKESPEARE_LENGTHS` (inverse CDF, linear between the
    percentiles), capped at ``cap`` as the corpus truncates at ``max_length``, at least 2."""
    u = 100 * torch.rand(count, generator=generator, dtype=torch.float64).numpy()
    lengths = np.interp(u, np.linspace(0, 100, len(SHAKESPEARE_LENGTHS)), SHAKESPEARE_LENGTHS)
    return np.clip(np.rint(lengths), 2, cap).astype(int).tolist()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="bf16 = autocast of the base model; adapters stay fp32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128,
                   help="document length (--lengths full) or the cap of sampled lengths (max_length)")
    p.add_argument("--lengths", choices=["full", "shakespeare"], default="full",
                   help="every document --seq tokens, or lengths of the demo's Shakespeare speeches")
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=None,
                   help="padded batches, packed ones, or both side by side (default: padded; both "
                        "with --lengths shakespeare); packed runs the floor, MAP and SVI")
    p.add_argument("--row-tokens", type=int, default=DEFAULT_ROW_TOKENS,
                   help="token budget of a packed row")
    p.add_argument("--tasks", type=int, nargs="+", default=[8],
                   help="number(s) of tasks; several values time loop/map/svi/eval for each")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per method and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--rounds", type=int, default=1, help="repeat the whole measurement")
    p.add_argument("--schedule", choices=["auto", "sequential", "interleaved"], default="auto",
                   help="sequential: one method at a time on a fresh model copy (exact per-method "
                        "CUDA peak memory); interleaved: all held at once, stepped in turn (fair "
                        "under drifting CPU load); auto: interleaved on CPU, sequential on CUDA")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--hidden", type=int, default=576, help="hidden size (SmolLM2-135M: 576)")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--tau", type=float, default=1e3, help="fixed prior precision of map/svi/loop")
    p.add_argument("--targets", nargs="+", default=TARGETS, metavar="MODULE",
                   help="LoRA target modules (default: all seven projections)")
    p.add_argument("--task-step", choices=["auto", "sparse", "dense"], default="auto",
                   help="MAP/SVI: TrainConfig.task_step (steps touching only the batch's tasks, or all)")
    p.add_argument("--adapter-storage", choices=["auto", "device", "host"], default="auto",
                   help="MAP/SVI: TrainConfig.adapter_storage (the [D, P] tables on the device or in host memory)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="profile one extra step of each training method; print the top N ops by self CPU time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true", help="print every step's time to stderr")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object last")
    args = p.parse_args(argv)
    for name in ("batch", "seq", "rank", "steps", "layers", "hidden", "vocab", "rounds", "row_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0 or any(d < 1 for d in args.tasks):
        p.error("--warmup must be >= 0 and every --tasks value >= 1")
    if args.seq < 2:
        p.error("--seq must be >= 2 (the loss predicts token t from tokens < t)")
    args.tasks = list(dict.fromkeys(args.tasks))
    if args.layouts is None:
        args.layouts = LAYOUTS if args.lengths == "shakespeare" else ["padded"]
    args.layouts = [layout for layout in LAYOUTS if layout in args.layouts]
    return args


# --------------------------------------------------------------------------- model and batches


def build_template(args) -> torch.nn.Module:
    """A random LlamaForCausalLM with SmolLM2-135M's shape (or a smaller hidden size), on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = args.hidden
    head_dim = 64 if hidden % 64 == 0 else max(2, hidden // 4)
    if hidden % head_dim or head_dim % 2:
        raise SystemExit(f"--hidden {hidden}: choose a multiple of 64, or of 8 below 64")
    heads = hidden // head_dim
    kv_heads = heads // 3 if heads % 3 == 0 else heads
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max(2048, args.seq), rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


def make_batches(args, num_tasks: int, count: int, *, num_docs: int) -> dict[str, list]:
    """``count`` batches of ``B`` random documents, in each layout of ``args.layouts`` (the same
    documents in each): lengths ``--seq`` or drawn by `sample_lengths`, every token scored but
    the first; task ids balanced and mixed in every batch (every task present when ``D <= B``,
    ``B`` distinct tasks when ``D > B``)."""
    g = torch.Generator().manual_seed(args.seed + 1000 * num_tasks)
    B, L = args.batch, args.seq
    out: dict[str, list] = {layout: [] for layout in args.layouts}
    for _ in range(count):
        lengths = [L] * B if args.lengths == "full" else sample_lengths(B, L, g)
        docs = [torch.randint(3, args.vocab, (n,), generator=g).numpy() for n in lengths]
        if num_tasks >= B:
            task_ids = torch.randperm(num_tasks, generator=g)[:B]
        else:
            task_ids = (torch.arange(B) % num_tasks)[torch.randperm(B, generator=g)]
        doc_index = torch.randperm(num_docs, generator=g)[:B].numpy()
        parts = (docs, np.ones(B, dtype=np.int64), task_ids, doc_index)
        if "padded" in out:
            out["padded"].append(collate(*parts, pad_token_id=0))
        if "packed" in out:
            out["packed"].append(collate_packed(*parts, pad_token_id=0, row_tokens=args.row_tokens))
    return out


# --------------------------------------------------------------------------- the methods
#
# Each builder takes (base model copy on the device, num_tasks, first batch) and returns
# (step(batch), optimizer, cleanup-able objects). The base copy is theirs to wrap.


def _amp(args, device):
    if args.dtype == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _lora_config(args):
    from peft import LoraConfig

    return LoraConfig(r=args.rank, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=args.targets,
                      task_type="CAUSAL_LM")


def build_floor(args, device, base, num_tasks, first):
    from peft import get_peft_model

    model = get_peft_model(base, _lora_config(args))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    amp = _amp(args, device)

    def step(batch):
        opt.zero_grad(set_to_none=True)
        with amp():
            if batch.packed:  # padding-free, as TRL does for one adapter: transformers' mask from position_ids
                loss = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                             labels=batch.labels, use_cache=False).loss
            else:
                loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             labels=batch.labels, use_cache=False).loss
        loss.backward()
        opt.step()

    return step, opt, model


def build_loop(args, device, base, num_tasks, first):
    """The paper code's pattern: one PEFT adapter per task + a global one, set_adapter per task."""
    from peft import get_peft_model

    cfg = _lora_config(args)
    names = [f"task{d}" for d in range(num_tasks)]
    model = get_peft_model(base, cfg, adapter_name="global")
    for name in names:
        model.add_adapter(name, cfg)
    tuner = model.base_model  # LoraModel: set_adapter accepts a list (all active, all trainable)
    named = dict(model.named_parameters())
    pairs = []  # (global parameter, [task parameters]): looked up once, not every step
    with torch.no_grad():
        for key, g in named.items():
            if ".global." in key:
                ps = [named[key.replace(".global.", f".{n}.")] for n in names]
                for p in ps:
                    p.copy_(g)  # every task adapter starts at the global one
                pairs.append((g, ps))
    params = [p for k, p in named.items() if "lora_" in k]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=LR)
    amp = _amp(args, device)
    tau = args.tau

    def step(batch):
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        task_ids = batch.task_ids
        for d in torch.unique(task_ids).tolist():
            rows = (task_ids == d).nonzero().squeeze(1)
            tuner.set_adapter(names[d])
            with amp():
                out = model(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows],
                            labels=batch.labels[rows], use_cache=False)
            loss = loss + out.loss * rows.numel()
        tuner.set_adapter(names + ["global"])
        penalty = sum((p - g).square().sum() for g, ps in pairs for p in ps)
        (loss + tau * penalty).backward()
        opt.step()

    return step, opt, model


def _bora(args, base, num_tasks, num_docs):
    from bora_pyro.config import BoraConfig
    from bora_pyro.models import build_bora

    # As fit_map builds it (default precision_groups="ab"), with a fixed tau.
    config = BoraConfig(rank=args.rank, alpha=ALPHA, target_modules=args.targets, tau=args.tau)
    counts = torch.full((num_tasks,), num_docs // num_tasks) + (torch.arange(num_tasks) < num_docs % num_tasks)
    lm, bora = build_bora(base, (num_tasks, num_docs), config, seed=args.seed, docs_per_task=counts)
    init_global = lm.layout.init_global(generator=torch.Generator().manual_seed(args.seed))
    return lm, bora, init_global


def _stepper_method(kind):
    def build(args, device, base, num_tasks, first):
        import pyro

        from bora_pyro.config import TrainConfig

        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        num_docs = _num_docs(args, num_tasks)
        lm, bora, init_global = _bora(args, base, num_tasks, num_docs)
        train = TrainConfig(lr=LR, lr_schedule="constant", batch_size=args.batch, device=str(device),
                            autocast="bf16" if args.dtype == "bf16" else None, seed=args.seed,
                            progress=False, task_step=args.task_step, adapter_storage=args.adapter_storage)
        if kind == "map":
            from bora_pyro.inference.map import MAPStepper

            stepper = MAPStepper(bora, train, init_global=init_global)
        else:
            from bora_pyro.inference.svi import SVIStepper

            stepper = SVIStepper(bora, replace(train, init_scale=1e-3), init_global=init_global)  # timing only
        stepper.setup(first)

        def step(batch):
            stepper.step(batch)

        return step, stepper.optimizer, (stepper, lm)

    return build


def _token_nll(logits, labels):
    """What `MultiTaskLM.sequence_nll` computes from the logits: summed token NLL per row, fp32."""
    logits, target = logits[:, :-1], labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none")
    return nll.view(target.shape).sum(-1)


def build_eval_base(args, device, base, num_tasks, first):
    """The base model's plain forward (unwrapped) + the token NLL, as evaluation would need."""
    amp = _amp(args, device)

    @torch.no_grad()
    def step(batch):
        with amp():
            logits = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          use_cache=False).logits
            _token_nll(logits, batch.labels).double().cpu()

    return step, None, base


def build_eval_bora(args, device, base, num_tasks, first):
    """Per-task NLL of a mixed-task batch, as `bora_pyro.evaluation.per_doc_nll` computes it."""
    from bora_pyro.models.lora import MultiTaskLM

    amp = _amp(args, device)
    lm = MultiTaskLM(base, rank=args.rank, alpha=ALPHA, target_modules=args.targets)
    g = torch.Generator().manual_seed(args.seed)
    init = lm.layout.init_global(generator=g)
    adapters = (init + 1e-3 * torch.randn(num_tasks, lm.num_params, generator=g)).to(device)

    @torch.no_grad()
    def step(batch):
        with amp():
            lm.sequence_nll(batch.input_ids, batch.attention_mask, batch.labels,
                            adapters=adapters, task_ids=batch.task_ids).double().cpu()

    return step, None, (lm, adapters)


BUILDERS: dict[str, Callable] = {
    "floor": build_floor, "loop": build_loop, "map": _stepper_method("map"), "svi": _stepper_method("svi"),
    "eval_base": build_eval_base, "eval_bora": build_eval_bora,
}
#: Units that wrap the base model the same way may share one copy when held side by side.
SHARED_BASE = {"map", "svi", "eval_bora", "map" + PACKED, "svi" + PACKED}


def _layout(method: str) -> str:
    return "packed" if method.endswith(PACKED) else "padded"


def _kind(method: str) -> str:
    """The method without its layout suffix (``map_packed`` -> ``map``)."""
    return method.removesuffix(PACKED)


def _num_docs(args, num_tasks):
    return max(1000, args.batch * num_tasks)


# --------------------------------------------------------------------------- measuring


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _state_bytes(opt) -> int:
    """Bytes of the optimiser's parameters, their gradients and its state (fp32 Adam moments...)."""
    if opt is None:
        return 0
    total = 0
    for group in opt.param_groups:
        for p in group["params"]:
            total += p.numel() * p.element_size()
            if p.grad is not None:
                total += p.grad.numel() * p.grad.element_size()
            for v in opt.state.get(p, {}).values():
                if torch.is_tensor(v):
                    total += v.numel() * v.element_size()
    return total


def _adapter_bytes(unit, host_storage: bool) -> dict[str, int]:
    """Bytes of the adapters' parameters, their gradients and optimiser state by where they
    live: ``device`` (the compute device) or ``host`` (host memory: the [D, P] tables of a
    sparse step with ``--adapter-storage host``, or any tensor on the CPU when the compute
    device is CUDA). Not counted: the K rows a sparse step gathers onto the device for the
    step and their gradients (``2 K P`` floats per table, K <= batch size), transient like
    activations."""
    out = {"device": 0, "host": 0}
    opt = unit.opt
    if opt is None:
        return out
    for group in opt.param_groups:
        for p in group["params"]:
            tensors = [p] + [v for v in opt.state.get(p, {}).values() if torch.is_tensor(v)]
            if p.grad is not None:
                tensors.append(p.grad)
            for t in tensors:
                host = t.device.type == "cpu" and (unit.device.type != "cpu" or (group.get("rows") and host_storage))
                out["host" if host else "device"] += t.numel() * t.element_size()
    return out


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _profile(fn, device, top: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        _sync(device)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = []
    for e in events[:top]:
        row = {"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count,
               "self_cpu_share": e.self_cpu_time_total / total}
        if device.type == "cuda":
            row["self_device_ms"] = getattr(e, "self_device_time_total", 0.0) / 1e3
        rows.append(row)
    return rows


class Unit:
    """One (method, task count): its step function, optimiser and batches, and what it measured."""

    def __init__(self, args, device, method, num_tasks, batches, base):
        self.method, self.num_tasks, self.batches = method, num_tasks, batches
        self.device, self.verbose = device, args.verbose
        self.step, self.opt, self.keep = BUILDERS[_kind(method)](args, device, base, num_tasks, batches[0])
        self.base = base

    def run(self, i: int, record: dict | None) -> None:
        """Step on batch ``i``; with ``record``, add its time (and the peak memory) there."""
        device = self.device
        if record is not None and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t0 = time.perf_counter()
        self.step(self.batches[i])
        _sync(device)
        seconds = time.perf_counter() - t0
        if self.verbose:
            kind = "warm-up" if record is None else "timed"
            print(f"  {_name(self.method, self.num_tasks)} step {i + 1}/{len(self.batches)} ({kind}): "
                  f"{seconds:.3f} s", file=sys.stderr, flush=True)
        if record is not None:
            record["times"].append(seconds)
            record["tokens"].append(int(self.batches[i].attention_mask.sum()))
            if device.type == "cuda":
                record["peak"] = max(record["peak"], torch.cuda.max_memory_allocated(device))

    def close(self) -> None:
        del self.step, self.opt, self.keep, self.base


def run_units(args, device, template, plan, batches, out, profiles, *, interleaved: bool):
    """Time every (method, num_tasks) of ``plan``: one after another (each built on a fresh copy
    of the base model, warmed up, timed, freed), or all held at once and stepped in turn."""

    def record(key):
        return out.setdefault(key, {"times": [], "tokens": [], "peak": 0, "state": 0, "device_bytes": 0,
                                    "host_bytes": 0})

    def finish(unit):
        rec = record((unit.method, unit.num_tasks))
        rec["state"] = max(rec["state"], _state_bytes(unit.opt))
        where = _adapter_bytes(unit, args.adapter_storage == "host")
        rec["device_bytes"] = max(rec["device_bytes"], where["device"])
        rec["host_bytes"] = max(rec["host_bytes"], where["host"])
        if device.type != "cuda":
            rec["peak"] = rec["state"]
        key = (unit.method, unit.num_tasks)
        if args.profile and unit.opt is not None and key not in profiles:
            profiles[key] = _profile(lambda: unit.step(unit.batches[-1]), device, args.profile)

    n = args.warmup + args.steps
    if not interleaved:
        for method, D in plan:
            _free(device)
            unit = Unit(args, device, method, D, batches[D][_layout(method)], copy.deepcopy(template).to(device))
            for i in range(n):
                unit.run(i, record((method, D)) if i >= args.warmup else None)
            finish(unit)
            unit.close()
            del unit
            _free(device)
        return
    shared = None
    units = []
    for method, D in plan:
        if method in SHARED_BASE:
            shared = shared if shared is not None else copy.deepcopy(template).to(device)
            base = shared
        else:
            base = copy.deepcopy(template).to(device)
        units.append(Unit(args, device, method, D, batches[D][_layout(method)], base))
        del base
    for i in range(args.warmup):
        for unit in units:
            unit.run(i, None)
    for i in range(args.warmup, n):
        k = (i - args.warmup) % len(units)  # rotate who goes first
        for unit in units[k:] + units[:k]:
            unit.run(i, record((unit.method, unit.num_tasks)))
    for unit in units:
        finish(unit)
        unit.close()
    del units, shared
    _free(device)


def machine_info(device) -> dict:
    import peft
    import pyro
    import transformers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return {
        "device": str(device), "device_name": name, "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__, "pyro": pyro.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cpu_count": os.cpu_count(), "load_avg": _load_avg(),
    }


def _load_avg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _name(method: str, num_tasks: int) -> str:
    return method if _kind(method) in ("floor", "eval_base") else f"{method}@{num_tasks}"


def _median(rec) -> float | None:
    return statistics.median(rec["times"]) if rec and rec["times"] else None


def _tokens_per_s(rec) -> float | None:
    """Real (not padding) tokens of the timed steps over their total time."""
    return sum(rec["tokens"]) / sum(rec["times"]) if rec and rec["times"] else None


def _real_fraction(batches: list) -> float:
    return sum(int(b.attention_mask.sum()) for b in batches) / sum(b.attention_mask.numel() for b in batches)


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def _one_adapter_bytes(template, args) -> int:
    """Bytes of one task's fp32 adapter (P entries: ``r (in + out)`` per target layer)."""
    from bora_pyro.models.lora import find_target_modules

    modules = dict(template.named_modules())
    names = find_target_modules(template, args.targets)
    return 4 * sum(args.rank * (modules[n].in_features + modules[n].out_features) for n in names)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    from bora_pyro.models.base import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    load, cores, threads = _load_avg(), os.cpu_count() or 1, torch.get_num_threads()
    if device.type == "cpu" and threads > 1 and load is not None and load + threads > cores + 0.5:
        print(f"note: load average {load:.1f} on {cores} cores with {threads} torch threads: ops will "
              "wait for descheduled threads and the timings count ops rather than work; consider "
              "--threads 1", file=sys.stderr)
    started = time.perf_counter()
    template = build_template(args)
    n_batches = args.warmup + args.steps
    batches = {
        D: {layout: [b.to(device) for b in made]
            for layout, made in make_batches(args, D, n_batches, num_docs=_num_docs(args, D)).items()}
        for D in args.tasks
    }
    D0 = args.tasks[0]
    plan = []  # (method, task count); the floor and the base model's eval do not depend on it
    for layout in args.layouts:
        for method in ("floor", "loop", "map", "svi"):
            if method in args.methods and (layout == "padded" or method in PACKABLE):
                name = method + (PACKED if layout == "packed" else "")
                plan += [(name, D) for D in ([D0] if method == "floor" else args.tasks)]
    if "eval" in args.methods and "padded" in args.layouts:
        plan += [("eval_base", D0)] + [("eval_bora", D) for D in args.tasks]
    interleaved = args.schedule == "interleaved" or (args.schedule == "auto" and device.type != "cuda")
    out: dict = {}
    profiles: dict = {}
    for _ in range(args.rounds):
        run_units(args, device, template, plan, batches, out, profiles, interleaved=interleaved)
    elapsed = time.perf_counter() - started

    if device.type != "cuda":
        memory_kind = "bytes of the optimised parameters + their gradients + AdamW state (no activations)"
    elif interleaved:
        memory_kind = ("torch.cuda.max_memory_allocated during the method's steps, with every method's "
                       "model (base copies, adapters, optimiser state) resident at the same time")
    else:
        memory_kind = ("torch.cuda.max_memory_allocated during the method's steps, only its model "
                       "resident (includes its copy of the base model's weights)")
    floor = _median(out.get(("floor", D0)))
    floor_packed = _median(out.get(("floor" + PACKED, D0)))
    base_eval = _median(out.get(("eval_base", D0)))
    trained = ("floor", "loop", "map", "svi") + tuple(m + PACKED for m in PACKABLE)
    by_tasks = {}
    for D in args.tasks:
        def key(m):
            return (m, D0 if _kind(m) == "floor" else D)

        med = {m: _median(out.get(key(m))) for m in trained}
        bora_eval = _median(out.get(("eval_bora", D)))
        entry = {
            "median_s": {k: v for k, v in med.items() if v is not None},
            "loop_ratio": _ratio(med["loop"], floor),
            "map_ratio": _ratio(med["map"], floor),
            "svi_ratio": _ratio(med["svi"], floor),
            "eval_ratio": _ratio(bora_eval, base_eval),
            "peak_mem_bytes": {m: out[key(m)]["peak"] for m in trained if key(m) in out},
            "device_bytes": {m: out[key(m)]["device_bytes"] for m in trained if key(m) in out},
            "host_bytes": {m: out[key(m)]["host_bytes"] for m in trained if key(m) in out},
            "tokens_per_s": {m: _tokens_per_s(out[key(m)]) for m in trained if key(m) in out},
        }
        if floor_packed is not None:
            entry["map_ratio_packed"] = _ratio(med["map" + PACKED], floor_packed)
            entry["svi_ratio_packed"] = _ratio(med["svi" + PACKED], floor_packed)
        tps = entry["tokens_per_s"]
        entry["packing_speedup"] = {m: tps[m + PACKED] / tps[m] for m in PACKABLE if m in tps and m + PACKED in tps}
        if bora_eval is not None:
            entry["eval_tokens_per_s"] = {"base": _tokens_per_s(out[("eval_base", D0)]),
                                          "bora": _tokens_per_s(out[("eval_bora", D)])}
            entry["median_s"]["eval_base"] = base_eval
            entry["median_s"]["eval_bora"] = bora_eval
        by_tasks[str(D)] = entry
    first = by_tasks[str(args.tasks[0])]
    result = {
        "config": {k: getattr(args, k) for k in (
            "dtype", "batch", "seq", "lengths", "layouts", "row_tokens", "tasks", "rank", "steps", "warmup",
            "rounds", "layers", "hidden", "vocab", "tau", "methods", "seed", "targets", "task_step",
            "adapter_storage")}
        | {"alpha": ALPHA, "schedule": "interleaved" if interleaved else "sequential",
           "adapter_bytes": _one_adapter_bytes(template, args)},
        "machine": machine_info(device),
        "memory_kind": memory_kind,
        **{k: first[k] for k in ("median_s", "loop_ratio", "map_ratio", "svi_ratio", "eval_ratio",
                                 "peak_mem_bytes", "tokens_per_s", "packing_speedup")},
        **{k: first[k] for k in ("map_ratio_packed", "svi_ratio_packed") if k in first},
        "real_fraction": {layout: _real_fraction(batches[D0][layout]) for layout in args.layouts},
        "by_tasks": by_tasks,
        "state_bytes": {_name(*key): rec["state"] for key, rec in out.items() if rec["state"]},
        "times_s": {_name(*key): rec["times"] for key, rec in out.items()},
        "elapsed_s": elapsed,
    }
    if first.get("eval_tokens_per_s"):
        result["eval_tokens_per_s"] = first["eval_tokens_per_s"]
    if profiles:
        result["profile"] = {_name(*key): rows for key, rows in profiles.items()}

    print_table(args, device, result, out, floor, base_eval, profiles)
    if args.json:
        print(json.dumps(result))
    sys.stdout.flush()
    return result


def print_table(args, device, result, out, floor, base_eval, profiles) -> None:
    m = result["machine"]
    lengths = "full length" if args.lengths == "full" else "Shakespeare lengths capped at"
    fractions = ", ".join(f"{k} {v:.2f}" for k, v in result["real_fraction"].items())
    print(f"\nLlama {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; LoRA r={args.rank} on "
          f"{' '.join(args.targets)}; batch {args.batch} documents, {lengths} {args.seq}, {args.dtype}; "
          f"real / computed tokens: {fractions}; "
          f"{args.warmup} warm-up + {args.steps} timed steps x {args.rounds} round(s), "
          f"{result['config']['schedule']}; "
          f"{m['device']} ({m['device_name']}), torch {m['torch']}, {m['threads']} threads; "
          f"total {result['elapsed_s']:.0f} s")
    mem_unit = "peak alloc MiB" if device.type == "cuda" else "state MiB"
    floors = {"padded": floor, "packed": _median(out.get(("floor" + PACKED, args.tasks[0])))}
    print(f"\n| method | layout | tasks | median s | real tokens/s | / floor (same layout) | {mem_unit} "
          "| device MiB | host MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (method, D), rec in out.items():
        med, layout = _median(rec), _layout(method)
        if method.startswith("eval"):
            ref, mem, note = base_eval, "", " (vs base)"
        else:
            ref, mem, note = floors[layout], f"{rec['peak'] / 2**20:.1f}", ""
        ratio = _ratio(med, ref)
        ratio_s = "" if ratio is None else f"{ratio:.2f}{note}"
        shown = "-" if _kind(method) in ("floor", "eval_base") and len(args.tasks) > 1 else D
        where = "| |" if method.startswith("eval") else \
            f"| {rec['device_bytes'] / 2**20:.1f} | {rec['host_bytes'] / 2**20:.1f} |"
        print(f"| {LABELS[_kind(method)]} | {layout} | {shown} | {med:.4f} | {_tokens_per_s(rec):,.0f} | "
              f"{ratio_s} | {mem} {where}")
    adapter = result["config"]["adapter_bytes"]
    lo, hi = str(min(args.tasks)), str(max(args.tasks))
    for m in ("map", "svi"):
        low, high = result["by_tasks"][lo]["device_bytes"].get(m), result["by_tasks"][hi]["device_bytes"].get(m)
        host = result["by_tasks"][hi]["host_bytes"].get(m)
        if low and high is not None and lo != hi:
            print(f"\n{LABELS[m]}: device bytes at {hi} tasks / at {lo} tasks = {high / low:.3f}; host bytes per task "
                  f"at {hi} tasks = {host / int(hi) / adapter:.3f} x one adapter ({adapter:,} bytes)", end="")
    print()
    if result["packing_speedup"]:
        speedups = ", ".join(f"{LABELS[k]} {v:.2f}x" for k, v in result["packing_speedup"].items())
        print(f"\npacked / padded real tokens per second ({args.tasks[0]} tasks): {speedups}")
    for (method, D), rows in profiles.items():
        tasks = "" if _kind(method) == "floor" else f" ({D} tasks)"
        print(f"\nprofile of one {LABELS[_kind(method)]} step ({_layout(method)}){tasks}, top ops by self CPU time:")
        for r in rows:
            dev = f"  self {r['self_device_ms']:9.2f} ms on device" if "self_device_ms" in r else ""
            print(f"  {r['op'][:48]:48s} {r['self_cpu_ms']:9.2f} ms  {100 * r['self_cpu_share']:5.1f}%"
                  f"  x{r['calls']}{dev}")
    print()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""`make bench-sp`: what sequence parallelism sends, measured, and what it buys at real size, computed.

1. Measured on CPU (2 gloo ranks, the tiny checkpoints in the real layouts, float32): the bytes one rank
   sends for one block pass of a chunk, per layer (Ulysses all-to-alls) and per pass (the gather of the
   output rows), for the Wan DiT (SkyReels-V2-DF, causal Wan) and MAGI-1, against the closed-form model
   below; the bench fails if they differ, so the model used for real sizes is the one the code follows.
2. Computed (no multi-GPU machine here, said so): per-GPU memory, bytes per layer and pass, and the
   expected speed-up at 2/4/8 GPUs for SkyReels-V2-DF-14B at 720P (one uncached window pass of 121
   frames; one chunk-causal chunk pass) and MAGI-1-24B at 720P (one forward step of a 4-chunk window),
   from the FLOP model (cache_core/flops.py) at 40% of an H100's bf16 peak, with the transfers not
   overlapped with compute, at two all-to-all bandwidths: NVLink/NVSwitch (H100 SXM, 300 GB/s per GPU
   achieved) and PCIe 4.0 (20 GB/s per GPU, a workstation without NVLink).

Writes bench/results/seq_parallel.json and seq_parallel.md.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
from tools.inprocess import load_comfy, pack  # noqa: E402

PEAK_BF16 = 989e12          # H100 SXM dense bf16 FLOP/s
MFU = 0.40
LINKS = {"NVLink": 300e9, "PCIe 4.0": 20e9}     # all-to-all bytes/s per GPU, achieved (assumed)
BF16 = 2


# -- the communication model (what seq_parallel.py sends), per rank ----------------------------------------
def shard(n: int, world: int, rank: int = 0) -> int:
    return n // world + (rank < n % world)


def wan_layer_bytes(n: int, dim: int, world: int, elt: int, rank: int = 0) -> int:
    """One Wan block on n tokens: q, k, v to heads (this rank's tokens, the others' heads) and the
    attention output back (the others' tokens, this rank's heads)."""
    nr = shard(n, world, rank)
    to_heads = 3 * nr * dim * elt * (world - 1) // world
    back = (n - nr) * (dim // world) * elt
    return to_heads + back


def magi_layer_bytes(n: int, q_dim: int, kv_dim: int, world: int, elt: int, rank: int = 0) -> int:
    """One MAGI-1 layer: q, k, v and the cross-attention query to heads, self and cross outputs back."""
    nr = shard(n, world, rank)
    to_heads = nr * (2 * q_dim + 2 * kv_dim) * elt * (world - 1) // world
    back = 2 * (n - nr) * (q_dim // world) * elt
    return to_heads + back


def gather_bytes(n: int, width: int, world: int, elt: int) -> int:
    """The pass's output rows to every rank (padded to the largest share)."""
    return shard(n, world, 0) * width * elt * (world - 1)


# -- 1. measured ------------------------------------------------------------------------------------------
def probe(rank: int, world: int, init: str, tiny: dict, out: str) -> None:
    import torch.distributed as dist
    load_comfy(cpu=True)
    import comfy.sd
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        sp = pack("cache_core.seq_parallel").SeqParallel(dist.group.WORLD)
        kv = pack("cache_core.kv_store")
        executor = pack("cache_core.chunk_executor")
        wan = pack("model_patches.wan")
        g = torch.Generator().manual_seed(0)
        results = {}
        dm = comfy.sd.load_diffusion_model(tiny["14b"]).model.diffusion_model
        adapter = wan.WanChunkAdapter(dm)
        for frames in (2, 3):                                   # 32 and 48 tokens: even and uneven shares
            x = torch.randn(1, 16, frames, 8, 8, generator=g)
            call = adapter.embed(x, torch.full((1,), 500.0), torch.randn(1, 512, 4096, generator=g), {})
            n = call.tokens.shape[1]
            store = kv.KVStore(kv.ChunkLayout((n,)), num_layers=adapter.num_layers)
            sp.reset_counters()
            sp.run_blocks(adapter, call, slice(0, 1), (0, frames), call.tokens, executor.KVAttention(store, 0, 0))
            results[f"wan/{n}"] = dict(tokens=n, layers=adapter.num_layers, dim=dm.dim, sent=sp.bytes_sent,
                                       elt=call.tokens.element_size())
        magi = pack("model_patches.magi_model")
        mdm = pack("model_patches.magi_loader").load_magi_model(tiny["magi_4.5b"], dtype=torch.float32).model.diffusion_model
        c = mdm.config
        x = torch.randn(1, c.latent_channels, 3, 8, 8, generator=g)     # one chunk of 3 latent frames
        text = torch.randn(5, c.caption_channels, generator=g)
        store = magi.kv_store(c, 1, 3 * 16)
        sp.reset_counters()
        mdm.forward_chunks(x, magi.ChunkForward(0, [0.5], [text], [0], write=(0,)), store, sp)
        results["magi/48"] = dict(tokens=48, layers=c.num_layers, q_dim=c.heads * c.head_dim,
                                  kv_dim=c.kv_heads * c.head_dim, out=c.patch * c.patch * c.in_channels,
                                  sent=sp.bytes_sent, elt=4)
        torch.save(results, f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def measured(tmp: Path) -> dict:
    from make_tiny_checkpoints import write_all
    tiny = {k: str(v) for k, v in write_all(str(tmp / "tiny"), seed=0).items()}
    mp.spawn(probe, args=(2, f"file://{tmp / 'store'}", tiny, str(tmp / "res")), nprocs=2, join=True)
    rows = {}
    for rank in range(2):
        for name, r in torch.load(tmp / f"res.{rank}", weights_only=False).items():
            n, elt = r["tokens"], r["elt"]
            if name.startswith("wan"):
                layer = wan_layer_bytes(n, r["dim"], 2, elt, rank)
                model = r["layers"] * layer + gather_bytes(n, r["dim"], 2, elt)
            else:
                layer = magi_layer_bytes(n, r["q_dim"], r["kv_dim"], 2, elt, rank)
                model = r["layers"] * layer + gather_bytes(n, r["out"], 2, 4)
            rows[f"{name}/rank{rank}"] = dict(tokens=n, measured=r["sent"], model=model, per_layer=layer)
    return rows


# -- 2. computed ------------------------------------------------------------------------------------------
def wan_case(fl, name: str, n: int, keys: int, frames: int, held_tokens: int, branches: int) -> dict:
    s = fl.DiTShape.wan_14b()
    params = s.num_layers * (8 * s.dim ** 2 + 2 * s.dim * s.ffn_dim + 6 * s.dim) + s.text_dim * s.dim + s.dim ** 2
    flops = s.num_layers * fl.block_flops(s, n, keys) + fl.embed_head_flops(s, n, frames)
    kv = held_tokens * s.num_layers * 2 * s.dim * BF16 * branches
    return dict(case=name, heads=40, tokens=n, flops=flops, weights=params * BF16, kv=kv, layers=s.num_layers,
                layer_bytes=lambda w: wan_layer_bytes(n, s.dim, w, BF16),
                pass_bytes=lambda w: s.num_layers * wan_layer_bytes(n, s.dim, w, BF16) + gather_bytes(n, s.dim, w, BF16),
                activations=lambda w: shard(n, w) * (4 * s.dim + s.ffn_dim) * BF16)


def magi_case(fl, name: str, chunk_tokens: int, chunks: int, history_chunks: int) -> dict:
    s = fl.MagiShape.magi_24b()
    n = chunk_tokens * chunks
    q_dim, kv_dim = s.heads * s.head_dim, s.groups * s.head_dim
    flops = sum(fl.magi_chunk_flops(s, chunk_tokens, (history_chunks + 1) * chunk_tokens, 256) for _ in range(chunks))
    held = (history_chunks + chunks) * chunk_tokens
    kv = held * s.num_layers * 2 * kv_dim * BF16 * 2          # the text and history passes' caches
    out = s.patch * s.patch * s.in_channels
    return dict(case=name, heads=s.groups, tokens=n, flops=flops, weights=s.num_layers * s.params_per_block() * BF16,
                kv=kv, layers=s.num_layers, layer_bytes=lambda w: magi_layer_bytes(n, q_dim, kv_dim, w, BF16),
                pass_bytes=lambda w: s.num_layers * magi_layer_bytes(n, q_dim, kv_dim, w, BF16) + gather_bytes(n, out, w, 4),
                activations=lambda w: shard(n, w) * (4 * s.hidden + 2 * s.ffn) * BF16)


def computed() -> list:
    fl = pack("cache_core.flops")
    tpf = fl.tokens_per_frame(720, 1280)                  # 3600 tokens per latent frame at 720P
    window = 31 * tpf                                     # 121 frames
    cases = [wan_case(fl, "SkyReels-V2-DF-14B 720P, uncached window pass (121 frames)", window, window, 31, 0, 2),
             wan_case(fl, "SkyReels-V2-DF-14B 720P, chunk-causal chunk pass (5 frames, keys of the window)", 5 * tpf,
                      window, 31, window, 2),
             magi_case(fl, "MAGI-1-24B 720P, one forward step (4 chunks of 6 latent frames, 5 history chunks)",
                       6 * tpf, 4, 5)]
    rows = []
    for c in cases:
        t1 = c["flops"] / (PEAK_BF16 * MFU)
        for w in (1, 2, 4, 8):
            if c["heads"] % w:
                continue
            row = dict(case=c["case"], gpus=w, tokens=c["tokens"], tflops=round(c["flops"] / 1e12, 1),
                       compute_s=round(t1 / w, 4), layer_mb=round(c["layer_bytes"](w) / 1e6, 1),
                       pass_gb=round(c["pass_bytes"](w) / 1e9, 3),
                       memory_gb=round((c["weights"] + c["kv"] / w + c["activations"](w)) / 1e9, 1),
                       weights_gb=round(c["weights"] / 1e9, 1), kv_gb=round(c["kv"] / w / 1e9, 1))
            for link, bw in LINKS.items():
                comm = c["pass_bytes"](w) / bw
                row[f"speedup_{link}"] = round(t1 / (t1 / w + comm), 2)
            rows.append(row)
    return rows


def main() -> int:
    import tempfile
    load_comfy(cpu=True)
    out = REPO / "bench" / "results"
    with tempfile.TemporaryDirectory() as tmp:
        meas = measured(Path(tmp))
    rows = computed()
    (out / "seq_parallel.json").write_text(json.dumps(dict(measured=meas, computed=rows), indent=1) + "\n")
    lines = ["# Sequence parallel: communication measured, scaling computed", "",
             "## Measured (CPU, 2 gloo ranks, tiny checkpoints, float32): bytes one rank sends per block pass", "",
             "| pass | tokens | measured | model | per layer |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['tokens']} | {v['measured']} | {v['model']} | {v['per_layer']} |" for k, v in meas.items()]
    lines += ["", "## Computed (no multi-GPU machine here): H100 at 40% of the bf16 peak, transfers not overlapped", "",
              "| case | GPUs | TFLOP | compute s | all-to-all MB per layer per GPU | GB per pass per GPU | "
              "memory per GPU GB (weights + K/V) | speed-up NVLink | speed-up PCIe 4.0 |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['gpus']} | {r['tflops']} | {r['compute_s']} | {r['layer_mb']} | {r['pass_gb']} | "
              f"{r['memory_gb']} ({r['weights_gb']} + {r['kv_gb']}) | {r['speedup_NVLink']} | {r['speedup_PCIe 4.0']} |"
              for r in rows]
    (out / "seq_parallel.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    wrong = {k: v for k, v in meas.items() if v["measured"] != v["model"]}
    if wrong:
        print(f"the communication model differs from the measurement: {wrong}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

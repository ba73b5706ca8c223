#!/usr/bin/env python3
"""Trains the demo MoE (Mixtral layout: llama attention with rotary position
embedding in llama.cpp's 'norm' mode, i.e. adjacent pairs rotated, so the
query and key weights export without a permutation; RMSNorm; a softmax router
over 8 experts, the top 2 renormalised; SwiGLU experts) on the token stream
prepare.py wrote. CPU only (Debian's python3-torch).

The learning-rate schedule follows progress = max(step / steps, elapsed /
budget), so a run on a busy machine still anneals and ends within --minutes.
A checkpoint (OUT/model.pt) is written every --ckpt-every steps and at the end;
--resume continues from it.

  python3 tools/train_demo/train.py --data demo/train --out demo/train --minutes 50
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULTS = dict(n_vocab=2048, d=256, n_layer=4, n_head=8, n_head_kv=4, n_ff=384, n_expert=8, n_expert_used=2,
                n_ctx=256, rope_base=10000.0, rms_eps=1e-5)


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(n_ctx, hd, base):
    inv = base ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = torch.arange(n_ctx, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cos(ang), torch.sin(ang)


def rope(x, cos, sin):
    """x: (B, H, T, hd); pairs (2i, 2i+1) rotated by pos * base^(-2i/hd) (GGML rope mode 0)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[: x.shape[2]], sin[: x.shape[2]]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, hd = c["d"], c["d"] // c["n_head"]
        self.c, self.hd = c, hd
        self.attn_norm = RMSNorm(d, c["rms_eps"])
        self.wq = nn.Linear(d, c["n_head"] * hd, bias=False)
        self.wk = nn.Linear(d, c["n_head_kv"] * hd, bias=False)
        self.wv = nn.Linear(d, c["n_head_kv"] * hd, bias=False)
        self.wo = nn.Linear(c["n_head"] * hd, d, bias=False)
        self.ffn_norm = RMSNorm(d, c["rms_eps"])
        self.router = nn.Linear(d, c["n_expert"], bias=False)
        E, ff = c["n_expert"], c["n_ff"]
        self.gate = nn.Parameter(torch.randn(E, ff, d) / math.sqrt(d))
        self.up = nn.Parameter(torch.randn(E, ff, d) / math.sqrt(d))
        self.down = nn.Parameter(torch.randn(E, d, ff) / math.sqrt(ff) / math.sqrt(2 * c["n_layer"]))

    def forward(self, x, cos, sin, mask):
        c = self.c
        B, T, D = x.shape
        h = self.attn_norm(x)
        q = self.wq(h).view(B, T, c["n_head"], self.hd).transpose(1, 2)
        k = self.wk(h).view(B, T, c["n_head_kv"], self.hd).transpose(1, 2)
        v = self.wv(h).view(B, T, c["n_head_kv"], self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        rep = c["n_head"] // c["n_head_kv"]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(self.hd) + mask[:T, :T]
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
        x = x + self.wo(y)

        h = self.ffn_norm(x).reshape(-1, D)
        probs = self.router(h).softmax(-1)                       # (N, E)
        w, idx = probs.topk(c["n_expert_used"], dim=-1)          # (N, k)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(h)
        for e in range(c["n_expert"]):
            sel = (idx == e)
            rows = sel.any(-1).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            he = h.index_select(0, rows)
            ye = (F.silu(he @ self.gate[e].t()) * (he @ self.up[e].t())) @ self.down[e].t()
            we = (w * sel).sum(-1).index_select(0, rows)[:, None]
            out.index_add_(0, rows, ye * we)
        # Switch-Transformer load-balancing loss: fraction routed x mean probability
        frac = F.one_hot(idx, c["n_expert"]).float().sum(1).mean(0) / c["n_expert_used"]
        aux = c["n_expert"] * (frac * probs.mean(0)).sum()
        return x + out.view(B, T, D), aux, idx


class MoE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c["n_vocab"], c["d"])
        nn.init.normal_(self.embed.weight, std=0.02 * math.sqrt(c["d"]) / 4)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c["n_layer"]))
        self.norm = RMSNorm(c["d"], c["rms_eps"])
        self.out = nn.Linear(c["d"], c["n_vocab"], bias=False)
        cos, sin = rope_tables(c["n_ctx"], c["d"] // c["n_head"], c["rope_base"])
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.register_buffer("mask", torch.full((c["n_ctx"], c["n_ctx"]), float("-inf")).triu(1), persistent=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        aux, routes = 0.0, []
        for b in self.blocks:
            x, a, idx = b(x, self.cos, self.sin, self.mask)
            aux = aux + a
            routes.append(idx)
        return self.out(self.norm(x)), aux / len(self.blocks), routes


@torch.no_grad()
def evaluate(model, data, n_ctx, max_windows=None):
    """Mean next-token loss over non-overlapping windows of the held-out stream."""
    model.eval()
    n = (len(data) - 1) // n_ctx
    if max_windows:
        n = min(n, max_windows)
    tot, cnt = 0.0, 0
    for i in range(0, n, 8):
        xs = [torch.from_numpy(data[j * n_ctx:(j + 1) * n_ctx + 1].astype(np.int64)) for j in range(i, min(n, i + 8))]
        xb = torch.stack(xs)
        logits, _, _ = model(xb[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), xb[:, 1:].reshape(-1), reduction="sum")
        tot += loss.item()
        cnt += xb[:, 1:].numel()
    model.train()
    return tot / max(1, cnt), cnt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="folder with train.bin, heldout.bin")
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=50.0, help="wall-clock budget for the training steps")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--aux", type=float, default=0.01, help="load-balancing loss weight")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; on a machine shared with other work 1 is faster than 2 (OpenMP barriers)")
    ap.add_argument("--eval-windows", type=int, default=0, help="held-out windows to score (0: all)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ckpt-every", type=int, default=200)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--config", default="{}", help="JSON overrides of the model shape, e.g. '{\"d\": 192}'")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    c = dict(DEFAULTS, **json.loads(args.config))
    train = np.fromfile(os.path.join(args.data, "train.bin"), dtype=np.uint16)
    held = np.fromfile(os.path.join(args.data, "heldout.bin"), dtype=np.uint16)
    model = MoE(c)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    os.makedirs(args.out, exist_ok=True)
    ckpt = os.path.join(args.out, "model.pt")
    step, spent = 0, 0.0
    if args.resume and os.path.exists(ckpt):
        st = torch.load(ckpt)
        c = st["config"]
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, spent = st["step"], st["seconds"]
        print("train: resumed at step %d (%.0f s)" % (step, spent), flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print("train: %s, %.2fM parameters, %d training tokens, budget %.0f min or %d steps of %d x %d"
          % (json.dumps(c), n_params / 1e6, len(train), args.minutes, args.steps, args.batch, c["n_ctx"]), flush=True)

    def save():
        torch.save({"config": c, "model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                    "seconds": spent}, ckpt + ".tmp")
        os.replace(ckpt + ".tmp", ckpt)

    t0 = time.time() - spent
    budget = args.minutes * 60
    smooth = None
    while True:
        spent = time.time() - t0
        prog = max(step / args.steps, spent / budget)
        if prog >= 1.0:
            break
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = rng.integers(0, len(train) - c["n_ctx"] - 1, args.batch)
        xb = torch.from_numpy(np.stack([train[s:s + c["n_ctx"] + 1] for s in starts]).astype(np.int64))
        logits, aux, _ = model(xb[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, c["n_vocab"]), xb[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        (loss + args.aux * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if step % 20 == 0 or step == 1:
            print("train: step %d  loss %.3f (smoothed %.3f)  aux %.3f  lr %.2e  %.0f s  %.0f tok/s"
                  % (step, loss.item(), smooth, float(aux), lr, spent,
                     step * args.batch * c["n_ctx"] / max(1.0, spent)), flush=True)
        if step % args.ckpt_every == 0:
            save()
    save()
    hl, n = evaluate(model, held, c["n_ctx"], args.eval_windows or None)
    res = {"steps": step, "train_seconds": round(spent, 1), "train_tokens": step * args.batch * c["n_ctx"],
           "heldout_tokens": n, "heldout_loss": round(hl, 4), "heldout_ppl": round(math.exp(hl), 2),
           "params": n_params, "config": c, "batch": args.batch, "lr": args.lr}
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(res, f, indent=1)
    print("train: done: %s" % json.dumps(res), flush=True)


if __name__ == "__main__":
    main()

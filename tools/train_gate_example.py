"""Training a learnable key-side gate through dmattn_ops on the CPU (issue 14's example).

A one-layer attention model over packed sequences: each token's embedding gives q, k, v and a gating score per
key and KV head; the score is the key-side bias, and keys whose score falls below the sequence's median are masked
out (dynamic sparsity, token granularity). The task: predict, for every query, the mean of the embeddings of the
tokens of its sequence whose first feature is positive (so the gate has to learn which keys matter). The same model, from the same initial weights
and on the same batches, is trained twice: through dmattn_ops.varlen_attention (float32) and through the float64
reference of the op contract. Both losses are printed every 10 steps, and the held-out loss before and after: it goes down, and the two
trainings stay within 1e-3 of each other (exit status 1 otherwise).

    python tools/train_gate_example.py [--steps 200]
"""

from __future__ import annotations

import argparse
import copy

import torch

import dmattn_ops
from dmattn_ops.reference import reference_varlen_attention

DIM, HEADS, HEADS_K, HEAD_DIM = 32, 4, 2, 8


class GatedAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(DIM, HEADS * HEAD_DIM)
        self.kv = torch.nn.Linear(DIM, 2 * HEADS_K * HEAD_DIM)
        self.gate = torch.nn.Linear(DIM, HEADS_K)
        self.out = torch.nn.Linear(HEADS * HEAD_DIM, DIM)

    def forward(self, x, cu_seqlens, max_seqlen, use_reference=False):
        total = x.shape[0]
        q = self.q(x).view(total, HEADS, HEAD_DIM)
        k, v = self.kv(x).view(total, 2, HEADS_K, HEAD_DIM).unbind(1)
        score = self.gate(x)  # (total, Hk): one gating score per key and KV head, the key-side bias
        keep = torch.zeros_like(score, dtype=torch.bool)  # the top half of each sequence's keys, per KV head
        for b in range(cu_seqlens.shape[0] - 1):
            s = score[cu_seqlens[b]:cu_seqlens[b + 1]].detach()
            keep[cu_seqlens[b]:cu_seqlens[b + 1]] = s >= s.median(dim=0).values
        args = (q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
        if use_reference:
            attn, _ = reference_varlen_attention(*args, mask=keep, bias=score, dtype=torch.float64)
        else:
            attn = dmattn_ops.varlen_attention(*args, mask=keep, bias=score)
        return self.out(attn.reshape(total, HEADS * HEAD_DIM).to(x.dtype))


def batch(step):
    g = torch.Generator().manual_seed(step)
    lengths = torch.randint(8, 33, (4,), generator=g).tolist()
    cu = dmattn_ops.cu_seqlens(lengths)
    x = torch.randn(sum(lengths), DIM, generator=g)
    target = torch.cat([
        x[c0:c0 + n][x[c0:c0 + n, 0] > 0].mean(0).nan_to_num(0.0).expand(n, DIM) for c0, n in zip(cu.tolist(), lengths)
    ])
    return x, cu, max(lengths), target


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=0.2)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = GatedAttention()
    reference = copy.deepcopy(model).double()
    optimizers = [torch.optim.SGD(m.parameters(), lr=args.lr) for m in (model, reference)]
    held_out = batch(10_000)

    def eval_loss():
        with torch.no_grad():
            x, cu, max_len, target = held_out
            return (model(x, cu, max_len) - target).pow(2).mean().item()

    before = eval_loss()
    print("step   loss (dmattn_ops, float32)   loss (float64 reference)")
    gap = 0.0
    for step in range(args.steps):
        x, cu, max_len, target = batch(step)
        pair = []
        for m, opt, use_ref in ((model, optimizers[0], False), (reference, optimizers[1], True)):
            dtype = torch.float64 if use_ref else torch.float32
            loss = (m(x.to(dtype), cu, max_len, use_reference=use_ref) - target.to(dtype)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            pair.append(loss.item())
        gap = max(gap, abs(pair[0] - pair[1]) / pair[1])
        if step % 10 == 0 or step == args.steps - 1:
            print(f"{step:4d}   {pair[0]:.6f}                     {pair[1]:.6f}")
    after = eval_loss()
    print(f"held-out loss {before:.4f} -> {after:.4f}; largest relative gap to the float64 reference: {gap:.2e}")
    return 0 if after < before and gap < 1e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())

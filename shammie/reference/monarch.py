"""Monarch product in plain torch.

`monarch_reference`: straight from the math (einsum over blocks); the tests run it in float64.
`MonarchBmm` / `monarch_bmm`: the peer, the bmm path as HazyResearch's fly and the MoRe
repository implement it (two batched GEMMs with permute copies between them, the intermediate
saved for a bmm backward), written here from the same math.
"""

from __future__ import annotations

import torch


def monarch_reference(x: torch.Tensor, w1_bfly: torch.Tensor, w2_bfly: torch.Tensor) -> torch.Tensor:
    k, q, p = w1_bfly.shape
    l, s, r = w2_bfly.shape
    batch = x.shape[:-1]
    xb = x.reshape(-1, k, p)
    u = torch.einsum("kqp,bkp->bkq", w1_bfly, xb).reshape(-1, k * q)   # u[i·q + a]
    z = u.reshape(-1, r, l).transpose(1, 2)                             # z[c, a] = u[a·l + c]
    v = torch.einsum("lsr,blr->bls", w2_bfly, z)                        # v[c, m]
    return v.transpose(1, 2).reshape(*batch, s * l)                     # y[m·l + c] = v[c, m]


class MonarchBmm(torch.autograd.Function):
    """The bmm formulation with its hand-written backward (the peer's memory traffic)."""

    @staticmethod
    def forward(ctx, x, w1_bfly, w2_bfly):
        k, q, p = w1_bfly.shape
        l, s, r = w2_bfly.shape
        batch = x.shape[:-1]
        xk = x.reshape(-1, k, p).transpose(0, 1)                             # (k, B, p)
        u = torch.bmm(xk, w1_bfly.transpose(1, 2))                           # (k, B, q)
        z = u.transpose(0, 1).reshape(-1, r, l).permute(2, 0, 1).contiguous()  # (l, B, r)
        v = torch.bmm(z, w2_bfly.transpose(1, 2))                            # (l, B, s)
        ctx.save_for_backward(x, w1_bfly, w2_bfly, z)
        return v.permute(1, 2, 0).reshape(*batch, s * l)

    @staticmethod
    def backward(ctx, grad_y):
        x, w1_bfly, w2_bfly, z = ctx.saved_tensors
        k, q, p = w1_bfly.shape
        l, s, r = w2_bfly.shape
        gv = grad_y.reshape(-1, s, l).permute(2, 0, 1).contiguous()          # (l, B, s)
        grad_w2 = torch.bmm(gv.transpose(1, 2), z)                           # (l, s, r)
        gz = torch.bmm(gv, w2_bfly)                                          # (l, B, r)
        gu = gz.permute(1, 2, 0).reshape(-1, k, q).transpose(0, 1).contiguous()  # (k, B, q)
        grad_x = torch.bmm(gu, w1_bfly).transpose(0, 1).reshape(x.shape)     # (k, B, p)
        xk = x.reshape(-1, k, p).transpose(0, 1)
        grad_w1 = torch.bmm(gu.transpose(1, 2), xk)                          # (k, q, p)
        return grad_x, grad_w1, grad_w2


def monarch_bmm(x: torch.Tensor, w1_bfly: torch.Tensor, w2_bfly: torch.Tensor) -> torch.Tensor:
    return MonarchBmm.apply(x, w1_bfly, w2_bfly)

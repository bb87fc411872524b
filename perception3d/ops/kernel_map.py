"""Multi-threaded sparse convolution on CPU from a kernel map (numba).

A sparse convolution with K kernel offsets is described by its **kernel map**: an ``[N_out, K]``
int32 table whose entry ``(o, k)`` is the input row that reaches output ``o`` through offset ``k``,
or -1. With it, every output row is an independent sum

    out[o] = sum_k  x[nbr[o, k]] @ W[k]          (W[k]: [C_in, C_out])

so the rows can be split across threads with no atomics and no scatter, and each row is summed in
the same order whatever the thread count: results are bitwise identical for 1 or N threads. The
input gradient is the same computation on the *transposed* map (input -> output per offset) with
``W[k]^T``; the weight gradient sums outer products per offset, one offset per task.

This replaces spconv's CPU path (gather -> one small GEMM per offset -> scatter-add), whose
scatter is wrong with more than one thread, and avoids materialising the gathered rows.
"""
from __future__ import annotations

import numba
import numpy as np
import torch

__all__ = ["kernel_map", "transpose_kernel_map", "conv_forward", "conv_weight_grad"]


def kernel_map(in_idx: torch.Tensor, out_idx: torch.Tensor, offset_idx: torch.Tensor,
               num_out: int, num_offsets: int) -> torch.Tensor:
    """``[num_out, num_offsets]`` int32 table, ``nbr[out_idx[p], offset_idx[p]] = in_idx[p]``, else -1.

    Each (output, offset) pair must occur at most once, as in any convolution.
    """
    nbr = torch.full((num_out, num_offsets), -1, dtype=torch.int32)
    nbr[out_idx.long(), offset_idx.long()] = in_idx.to(torch.int32)
    return nbr


def transpose_kernel_map(in_idx: torch.Tensor, out_idx: torch.Tensor, offset_idx: torch.Tensor,
                         num_in: int, num_offsets: int) -> torch.Tensor:
    """``[num_in, num_offsets]`` table mapping each input row to the output it feeds through each offset."""
    return kernel_map(out_idx, in_idx, offset_idx, num_in, num_offsets)


def _threads() -> int:
    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


_ROWS_PER_TASK = 64
_BLOCK = 32  # output rows per cache block of the forward kernel


@numba.njit(parallel=True, cache=True, nogil=True, fastmath={"contract"})
def _nb_forward(x, w, nbr, out, n_tasks):  # pragma: no cover - compiled
    # Rows of `out` are split into n_tasks contiguous chunks, each processed in blocks of _BLOCK
    # rows, offset by offset, so that W[k] and the block's accumulators stay in L1 cache. Input
    # channels are consumed four at a time: each load/store of an accumulator feeds four FMAs.
    n_out, K = nbr.shape
    cin = x.shape[1]
    cout = w.shape[2]
    cin4 = cin - cin % 4
    chunk = (n_out + n_tasks - 1) // n_tasks
    for t in numba.prange(n_tasks):
        acc = np.empty((_BLOCK, cout), dtype=out.dtype)
        end = min(n_out, (t + 1) * chunk)
        for o0 in range(t * chunk, end, _BLOCK):
            nb = min(_BLOCK, end - o0)
            for r in range(nb):
                for d in range(cout):
                    acc[r, d] = out[o0 + r, d]
            for k in range(K):
                for r in range(nb):
                    i = nbr[o0 + r, k]
                    if i < 0:
                        continue
                    for c in range(0, cin4, 4):
                        v0 = x[i, c]
                        v1 = x[i, c + 1]
                        v2 = x[i, c + 2]
                        v3 = x[i, c + 3]
                        for d in range(cout):
                            acc[r, d] += v0 * w[k, c, d] + v1 * w[k, c + 1, d] + v2 * w[k, c + 2, d] + v3 * w[k, c + 3, d]
                    for c in range(cin4, cin):
                        v = x[i, c]
                        for d in range(cout):
                            acc[r, d] += v * w[k, c, d]
            for r in range(nb):
                for d in range(cout):
                    out[o0 + r, d] = acc[r, d]


@numba.njit(parallel=True, cache=True, nogil=True, fastmath={"contract"})
def _nb_weight_grad(x, g, nbr, dw):  # pragma: no cover - compiled
    # One task per kernel offset; the outputs that use the offset are taken four at a time so that
    # each load/store of dw[k, c, :] feeds four FMAs.
    n_out, K = nbr.shape
    cin = x.shape[1]
    cout = g.shape[1]
    for k in numba.prange(K):
        acc = np.zeros((cin, cout), dtype=dw.dtype)
        rows = np.empty(4, dtype=np.int64)
        ins = np.empty(4, dtype=np.int64)
        n = 0
        for o in range(n_out + 1):
            if o < n_out:
                i = nbr[o, k]
                if i < 0:
                    continue
                rows[n] = o
                ins[n] = i
                n += 1
                if n < 4:
                    continue
            elif n == 0:
                break
            if n == 4:
                o0, o1, o2, o3 = rows[0], rows[1], rows[2], rows[3]
                i0, i1, i2, i3 = ins[0], ins[1], ins[2], ins[3]
                for c in range(cin):
                    a0 = x[i0, c]
                    a1 = x[i1, c]
                    a2 = x[i2, c]
                    a3 = x[i3, c]
                    for d in range(cout):
                        acc[c, d] += a0 * g[o0, d] + a1 * g[o1, d] + a2 * g[o2, d] + a3 * g[o3, d]
            else:
                for m in range(n):
                    for c in range(cin):
                        a = x[ins[m], c]
                        for d in range(cout):
                            acc[c, d] += a * g[rows[m], d]
            n = 0
        for c in range(cin):
            for d in range(cout):
                dw[k, c, d] = acc[c, d]


def conv_forward(x: torch.Tensor, w: torch.Tensor, nbr: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[o] += sum_k x[nbr[o, k]] @ w[k]`` in place; returns ``out``.

    Args:
        x: [N_in, C_in] contiguous CPU float tensor.
        w: [K, C_in, C_out] weights.
        nbr: [N_out, K] int32 kernel map (-1: no input).
        out: [N_out, C_out] contiguous tensor of x's dtype, accumulated into (zeros for a plain conv).
    """
    n_tasks = max(1, min(_threads() * 8, (nbr.shape[0] + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK))
    if nbr.shape[0]:
        _nb_forward(x.contiguous().numpy(), w.contiguous().numpy(), nbr.contiguous().numpy(), out.numpy(), n_tasks)
    return out


def conv_weight_grad(x: torch.Tensor, g: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
    """``dw[k] = sum_o x[nbr[o, k]]^T g[o]``: [K, C_in, C_out], one offset per task."""
    dw = x.new_empty((nbr.shape[1], x.shape[1], g.shape[1]))
    _threads()
    _nb_weight_grad(x.contiguous().numpy(), g.contiguous().numpy(), nbr.contiguous().numpy(), dw.numpy())
    return dw

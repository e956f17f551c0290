"""Scratch buffers and gradient blocks kept from call to call, one set per thread.

A call of the pair engine (:mod:`pkd.engine`) needs an N×d_t scratch buffer for
Y and ∂ℓ/∂Y, sometimes the gathered student rows, and the arrays it returns as
gradients. Allocating them afresh at every call costs the page faults of new
memory, and separate arrays freed together at every call can push glibc's heap
past its trim threshold so that the next call faults them all again; keeping
them here avoids both (see docs/performance.md, "Buffers").
"""

from __future__ import annotations

import math
import sys
import threading

import numpy as np

__all__ = ["Workspace", "clear_workspace", "empty_views", "thread_workspace"]

# Free-threaded CPython defers reference counts, so "no array left" cannot be read there.
_CAN_REUSE_BLOCKS = getattr(sys, "_is_gil_enabled", lambda: True)()


class Workspace:
    """Scratch buffers, one flat buffer per (tag, dtype), grown on demand.

    A buffer is handed out as a view of its first ``prod(shape)`` elements, so
    the memory held is the largest request seen, whatever the shapes; the
    view is kept for the next request of the same shape (at most
    ``KEPT_VIEWS``, and none of an outgrown buffer). Only scratch lives here
    (the N×d_t buffer of Y/G, the gathered rows): nothing a caller gets back
    ever aliases it.

    The blocks the returned gradients are carved from (:func:`empty_views`)
    are kept too, at most ``KEPT_GRADIENT_BLOCKS`` per dtype, and handed out
    again only once no array carved from them is alive anywhere: each of
    those arrays holds a reference to its block (its ``base``), so a block
    whose only reference is the workspace's is unreachable from user code.
    Two, because ``result = cfg.loss_and_grad(...)`` in a loop still holds
    the previous result while the next call runs.
    """

    KEPT_GRADIENT_BLOCKS = 2
    KEPT_VIEWS = 64

    def __init__(self) -> None:
        self._buffers: dict = {}
        self._views: dict = {}
        self._gradient_blocks: dict = {}
        self._arange = np.arange(0, dtype=np.int64)

    def get(self, tag: str, shape: tuple, dtype) -> np.ndarray:
        """An uninitialised scratch array of ``shape`` and ``dtype``, a view of buffer ``tag``.

        Views of one tag share memory: a caller holds at most one per tag at a time.
        """
        # Called several times per pair: a repeated request is one dict lookup.
        key = (tag, shape, dtype)
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= self.KEPT_VIEWS:  # shapes that vary from call to call
                self._views.clear()
            view = self._views[key] = self._carve(tag, shape, np.dtype(dtype))
        return view

    def _carve(self, tag: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
        size = math.prod(shape)  # not np.prod, which is far slower on a tuple
        buf = self._buffers.get((tag, dtype))
        if buf is None or buf.size < size:
            buf = self._buffers[(tag, dtype)] = np.empty(size, dtype=dtype)
            # Views of the smaller buffer would keep it alive: forget them.
            self._views = {key: view for key, view in self._views.items()
                           if key[0] != tag or np.dtype(key[2]) != dtype}
        return buf[:size].reshape(shape)

    def arange(self, n: int) -> np.ndarray:
        """``np.arange(n)`` as int64, kept between calls (it only ever grows); never written."""
        if self._arange.shape[0] < n:
            self._arange = np.arange(n, dtype=np.int64)
        return self._arange[:n]

    def gradient_block(self, size: int, dtype) -> np.ndarray:
        """An uninitialised 1-D array of ``size`` elements to carve returned gradients from.

        A kept block is reused when nothing else references it and it is at
        most twice the size (so a small gradient kept for long does not pin a
        large block); otherwise a new block is allocated, and kept in place of
        a smaller free one, or while fewer than ``KEPT_GRADIENT_BLOCKS`` are
        kept (a free larger one stays: calls of two sizes may alternate).
        """
        if not _CAN_REUSE_BLOCKS or size == 0:
            return np.empty(size, dtype=dtype)
        kept = self._gradient_blocks.setdefault(np.dtype(dtype), [])
        smaller = None  # the first free block too small for this request
        for k in range(len(kept)):
            # getrefcount(kept[k]) == 2: the list's reference and the argument's.
            if sys.getrefcount(kept[k]) == 2:
                if size <= kept[k].size <= 2 * size:
                    return kept[k][:size]
                if smaller is None and kept[k].size < size:
                    smaller = k
        block = np.empty(size, dtype=dtype)
        if smaller is not None:
            kept[smaller] = block
        elif len(kept) < self.KEPT_GRADIENT_BLOCKS:
            kept.append(block)
        return block

    def release_gradient_blocks(self) -> None:
        """Forget the kept gradient blocks (the next call allocates its gradients anew)."""
        self._gradient_blocks.clear()

    def clear(self) -> None:
        """Free every buffer and kept block (re-created on the next request)."""
        self._buffers.clear()
        self._views.clear()
        self._gradient_blocks.clear()
        self._arange = np.arange(0, dtype=np.int64)


_local = threading.local()


def thread_workspace() -> Workspace:
    """This thread's workspace, reused from call to call.

    Reusing the N×d_t scratch buffer saves the page faults of a fresh
    allocation at every call, at the price of keeping the largest buffer
    alive between calls; :func:`clear_workspace` frees it.
    """
    workspace = getattr(_local, "workspace", None)
    if workspace is None:
        workspace = _local.workspace = Workspace()
    return workspace


def clear_workspace() -> None:
    """Free this thread's scratch buffers and kept gradient blocks (re-created on the next call)."""
    thread_workspace().clear()


def empty_views(shapes, dtype, workspace: Workspace | None = None) -> list[np.ndarray]:
    """Uninitialised arrays of the given shapes, carved out of one block.

    Every gradient a call returns comes from here. The block is one the
    workspace kept from an earlier call once nothing references it any more
    (:meth:`Workspace.gradient_block`), so a training loop does not pay the
    page faults of a fresh block at every call, and one block rather than
    separate arrays keeps glibc from handing the pages back between calls
    (see docs/performance.md, "Buffers").

    Parameters
    ----------
    shapes : sequence of tuple of int
    dtype : numpy dtype
    workspace : Workspace, optional
        Whose kept blocks to use (this thread's by default).

    Returns
    -------
    list of arrays, C-contiguous, one per shape (views of one block).
    """
    sizes = [math.prod(shape) for shape in shapes]
    block = (workspace or thread_workspace()).gradient_block(sum(sizes), dtype)
    views, offset = [], 0
    for k, shape in enumerate(shapes):
        views.append(block[offset:offset + sizes[k]].reshape(shape))
        offset += sizes[k]
    return views

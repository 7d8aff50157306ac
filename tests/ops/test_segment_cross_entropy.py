"""segment_cross_entropy on every backend present: losses and dh against the fp64 reference, then
each backend's kernels called directly (chunks, rows without targets, model-sized widths)."""
import pytest
import torch

from metakernels import TaskLayout, backend
from metakernels.batch import IGNORE_INDEX
from metakernels.ops import segment_cross_entropy, segment_cross_entropy_ref

from conftest import (LAYOUTS, ONEDNN, OP_BACKENDS, TRITON, assert_close, assert_close_like_torch,
                      ce_inputs, needs_cpu, needs_triton, spy)

ops = torch.ops.metakernels
if TRITON:
    from metakernels.ops._triton import segment_cross_entropy as tri_ce

TRITON_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# --------------------------------------------------------------- the public op, every backend
@pytest.mark.parametrize("backend_name", OP_BACKENDS)
@pytest.mark.parametrize("sizes", [[7], [1] * 7, [3, 3, 3], [4, 0, 1, 6]])
@pytest.mark.parametrize("chunk", [1, 5, 4096, None])
def test_segment_cross_entropy(backend_name, sizes, chunk):
    layout = TaskLayout.from_sizes(sizes)
    N, d, V = layout.num_rows, 12, 37
    h = torch.randn(N, d, dtype=torch.float64).requires_grad_()
    W = torch.randn(V, d, dtype=torch.float64)
    labels = torch.randint(0, V, (N,))
    labels[::3] = -100
    dl = torch.randn(layout.num_tasks, dtype=torch.float64)
    want = segment_cross_entropy_ref(h, W, labels, layout)
    (want * dl).sum().backward()
    dh_want = h.grad.clone()
    h32 = h.detach().float().requires_grad_()
    with backend.use_backend(backend_name):
        got = segment_cross_entropy(h32, W.float(), labels, layout, chunk_size=chunk)
    (got * dl.float()).sum().backward()
    # h rounded to fp32 (the oracle takes it in fp64); logits over d; logsumexp and the
    # softmax's product with W over V
    assert_close(got, want.detach(), reduction=d + V)
    assert_close(h32.grad, dh_want, reduction=d + 2 * V)
    if 0 in sizes:
        assert got[sizes.index(0)] == 0


def test_segment_cross_entropy_chunks_by_vocabulary():
    from metakernels.ops.segment_cross_entropy import CHUNK_BYTES, auto_chunk_rows
    assert auto_chunk_rows(1024) == 8192 and auto_chunk_rows(32000) == 262
    for V in (7, 1000, 32000, 152064, 10 ** 7):
        rows = auto_chunk_rows(V)
        assert rows == 16 or rows * 4 * V <= CHUNK_BYTES < (rows + 1) * 4 * V


def test_segment_cross_entropy_chunks_by_device_memory_on_cuda(monkeypatch):
    """On a GPU each chunk re-reads the output layer: an 80 GB device takes thousands of rows
    per chunk at a 128k vocabulary (a CPU cache's worth would be 65)."""
    import types
    from metakernels.ops.segment_cross_entropy import CUDA_MEMORY_FRACTION, auto_chunk_rows
    seen = []

    def properties(device):
        seen.append(torch.device(device))
        return types.SimpleNamespace(total_memory=80 * 10 ** 9)
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    V = 128256
    rows = auto_chunk_rows(V, torch.device("cuda", 1))
    assert seen == [torch.device("cuda", 1)]
    assert rows * 4 * V <= 80 * 10 ** 9 // CUDA_MEMORY_FRACTION < (rows + 1) * 4 * V
    assert rows >= 2048 and auto_chunk_rows(V, "cpu") == auto_chunk_rows(V) == 65


# -------------------------------------------------------------------------------- cpu kernels
def _ce_against_fp64(h, W, labels, layout, chunk, onednn):
    """The fp32 kernel's loss and dh, checked against the fp64 reference and its gradient."""
    h64 = h.double().requires_grad_()
    want = segment_cross_entropy_ref(h64, W.double(), labels, layout)
    (dh_want,) = torch.autograd.grad(want.sum(), h64)
    loss, dh = ops.segment_cross_entropy_fwd(h, W, labels, layout.offsets_tensor(), chunk,
                                             onednn)
    assert loss.dtype == torch.float32 and dh.dtype == h.dtype and dh.shape == h.shape
    d, V = W.shape[1], W.shape[0]   # logits: sums over d; logsumexp, then softmax @ W: over V
    assert_close(loss, want.detach(), reduction=d + V)
    assert_close(dh, dh_want, reduction=d + 2 * V)
    return loss, dh


@needs_cpu
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("chunk", [1, 5, 1000])
@pytest.mark.parametrize("onednn", ONEDNN)
def test_segment_cross_entropy_fp32(layout_name, chunk, onednn):
    sizes = LAYOUTS[layout_name]
    h, W, labels = ce_inputs(sizes, 19, 37, torch.float32)
    layout = TaskLayout.from_sizes(sizes)
    loss, dh = _ce_against_fp64(h, W, labels, layout, chunk, onednn)
    for t, s, e in layout.segments():
        if (labels[s:e] == -100).all():
            assert loss[t] == 0 and not dh[s:e].any()


@needs_cpu
@pytest.mark.parametrize("labelled", ["every row", "no row"])
@pytest.mark.parametrize("chunk", [5, 1000])
@pytest.mark.parametrize("onednn", ONEDNN)
def test_segment_cross_entropy_every_or_no_row_labelled(labelled, chunk, onednn):
    """The kernel gathers the labelled rows where some are ignored: with none ignored it runs on
    h itself, and with all ignored it has no row to run (zero losses, zero gradient)."""
    sizes = [7, 0, 12, 4]
    h, W, _ = ce_inputs(sizes, 19, 37, torch.float32, seed=5)
    g = torch.Generator().manual_seed(6)
    labels = (torch.randint(0, 37, (sum(sizes),), generator=g) if labelled == "every row"
              else torch.full((sum(sizes),), -100))
    loss, dh = _ce_against_fp64(h, W, labels, TaskLayout.from_sizes(sizes), chunk, onednn)
    if labelled == "no row":
        assert not loss.any() and not dh.any()
    else:
        assert (loss[[0, 2, 3]] > 0).all() and dh.abs().sum(1).gt(0).all()


def _ce_like_torch(h, W, labels, layout, chunk, *onednn):
    """The kernel's loss and dh within 2x the error of the reference in h's own dtype, both
    against fp64 (flash-attention's rule); returns dh."""
    h64, h_own = h.double().requires_grad_(), h.clone().requires_grad_()
    want = segment_cross_entropy_ref(h64, W.double(), labels, layout)
    (dh_want,) = torch.autograd.grad(want.sum(), h64)
    ref = segment_cross_entropy_ref(h_own, W, labels, layout)
    (dh_ref,) = torch.autograd.grad(ref.sum(), h_own)
    loss, dh = ops.segment_cross_entropy_fwd(h, W, labels, layout.offsets_tensor(), chunk,
                                             *onednn)
    assert_close_like_torch("loss", loss, ref.detach(), want.detach())
    assert_close_like_torch("dh", dh, dh_ref, dh_want)
    return dh


@needs_cpu
@pytest.mark.parametrize("chunk", [50, 1000])
@pytest.mark.parametrize("onednn", ONEDNN)
def test_segment_cross_entropy_fp32_model_sized(chunk, onednn):
    """A model's widths (sums of hundreds of terms): errors as the fp32 reference's."""
    sizes = [37, 0, 64, 29]
    h, W, labels = ce_inputs(sizes, 203, 1031, torch.float32, seed=4)
    _ce_like_torch(h, W, labels, TaskLayout.from_sizes(sizes), chunk, onednn)


@needs_cpu
@pytest.mark.parametrize("chunk", [1, 50, 1000])
def test_segment_cross_entropy_bf16_model_sized(chunk):
    """bf16 at a model's widths (the row loop on the bf16 logits in place, rows of a vocabulary
    that is no multiple of a vector): errors as the bf16 reference's (h @ W.T in bf16, the
    softmax in fp32, its gradient rounded to bf16 before the product with W)."""
    sizes = [37, 0, 64, 29]
    h, W, labels = ce_inputs(sizes, 203, 1031, torch.float32, seed=7)
    h, W = h.bfloat16(), (W / 203 ** 0.5).bfloat16()
    dh = _ce_like_torch(h, W, labels, TaskLayout.from_sizes(sizes), chunk)
    assert not dh[labels == IGNORE_INDEX].any()


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_segment_cross_entropy_low_precision(dtype):
    sizes = [4, 0, 9, 5]
    h, W, labels = ce_inputs(sizes, 24, 41, dtype)
    layout = TaskLayout.from_sizes(sizes)
    h64 = h.double().requires_grad_()
    want = segment_cross_entropy_ref(h64, W.double(), labels, layout)
    (dh_want,) = torch.autograd.grad(want.sum(), h64)
    loss, dh = ops.segment_cross_entropy_fwd(h, W, labels, layout.offsets_tensor(), 4)
    assert dh.dtype == dtype
    assert_close(loss, want.detach(), dtype, reduction=24 + 41)
    assert_close(dh, dh_want, dtype, reduction=24 + 2 * 41)


# --------------------------------------------------------------- Triton kernels (interpreter)
D_MODEL = 23


def _tri_ce_inputs(sizes, V, dtype):
    layout = TaskLayout.from_sizes(sizes)
    N = layout.num_rows
    h = torch.randn(N, D_MODEL + 1)[:, :D_MODEL].to(dtype)  # strided rows
    W = (torch.randn(V, D_MODEL) * 2 / D_MODEL ** 0.5).to(dtype)
    labels = torch.randint(0, V, (N,))
    labels[torch.rand(N) < 0.3] = IGNORE_INDEX
    if layout.num_tasks > 1:  # a task with no target token at all: loss 0, gradient 0
        t = layout.num_tasks - 1
        labels[layout.offsets[t]:layout.offsets[t + 1]] = IGNORE_INDEX
    return layout, h, W, labels


def _ce_ref(h, W, labels, layout, dloss=None):
    """(loss, dh) of the reference by autograd; dh of ``(loss * dloss).sum()``."""
    h = h.detach().clone().requires_grad_()
    loss = segment_cross_entropy_ref(h, W, labels, layout)
    loss.backward(torch.ones_like(loss) if dloss is None else dloss)
    return loss.detach(), h.grad


@needs_triton
@pytest.mark.parametrize("chunk_size", [4, 1024], ids=["chunked", "one_chunk"])
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_segment_cross_entropy_kernel(layout_name, dtype, chunk_size):
    layout, h, W, labels = _tri_ce_inputs(LAYOUTS[layout_name], 67, dtype)
    loss, dh = tri_ce.fwd(h, W, labels, layout, chunk_size)
    loss_ref, dh_ref = _ce_ref(h, W, labels, layout)
    loss_or, dh_or = _ce_ref(h.float(), W.float(), labels, layout)
    assert loss.dtype == torch.float32
    assert_close_like_torch("loss", loss, loss_ref, loss_or)
    assert_close_like_torch("dh", dh, dh_ref, dh_or)


@needs_triton
def test_segment_cross_entropy_kernel_large_vocab():
    """V larger than one vocabulary block (4096): the online logsumexp spans several blocks."""
    layout, h, W, labels = _tri_ce_inputs([4, 3], 5003, torch.float32)
    labels[0] = 5002  # the target in the last, partial block
    loss, dh = tri_ce.fwd(h, W, labels, layout, 3)
    loss_ref, dh_ref = _ce_ref(h, W, labels, layout)
    d, V = W.shape[1], W.shape[0]
    assert_close(loss, loss_ref, reduction=d + V)
    assert_close(dh, dh_ref, reduction=d + 2 * V)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_segment_cross_entropy_public_op_triton(dtype, monkeypatch):
    """Through ``segment_cross_entropy`` with the triton backend forced, random upstream
    gradient per task."""
    layout, h, W, labels = _tri_ce_inputs(LAYOUTS["ragged+empty"], 67, dtype)
    dloss = torch.randn(layout.num_tasks)
    calls = spy(monkeypatch, tri_ce, "fwd")
    hs = h.detach().clone().requires_grad_()
    with backend.use_backend("triton"):
        loss = segment_cross_entropy(hs, W, labels, layout, chunk_size=5)
    assert calls, "the triton backend was not used"
    loss.backward(dloss)
    loss_ref, dh_ref = _ce_ref(h, W, labels, layout, dloss)
    loss_or, dh_or = _ce_ref(h.float(), W.float(), labels, layout, dloss)
    assert_close_like_torch("loss", loss.detach(), loss_ref, loss_or)
    assert_close_like_torch("h.grad", hs.grad, dh_ref, dh_or)
    assert loss[1] == 0 and loss[3] == 0  # the empty task and the task without targets

"""dmattn_ops.varlen_attention under torch.compile, torch.export and AOTInductor.

- torch.compile(fullgraph=True, dynamic=True): four batches of different B / total_q / total_k / max_seqlen build
  one graph (no graph break), matching eager; moving the mask from key-side to query-side recompiles exactly once;
  an 8-step decode loop whose caches grow by a key per sequence per step never recompiles after its first step.
- torch.export.export with Dims on total_q, total_k and B (cu_seqlens: B + 1; key-side mask and bias rows share
  total_k): the graph holds torch.ops.dmattn.varlen_fwd; save / load round-trips and runs new shapes.
- AOTInductor: aoti_compile_and_package / aoti_load_package run the exported program (the op is reached through
  the dispatcher: AOTI's proxy executor) and match eager. One AOTI compile per device (~20 s on 2 CPU cores).
- The serving features (a causal window, softcap, sinks as a parameter, seqused_k) through export and AOTI.

Every compiled or exported result is compared with the eager call, bit for bit on the CPU: all run the same kernel.
Sizes 0 and 1 are avoided where they would be specialized (see BATCHES). `device` is conftest.py's fixture: "cpu",
and "cuda" where this build can run it (skipped with the reason otherwise).
"""

import subprocess
import sys
import textwrap
import zipfile

import pytest
import sympy
import torch
from expecttest import assert_expected_inline
from torch._dynamo.testing import CompileCounterWithBackend
from torch.export import Dim

import dmattn_ops

H, HK, D = 4, 2, 16  # GQA: two query heads per key/value head

# (queries per sequence, keys per sequence). B, total_q, total_k, max_seqlen_q and max_seqlen_k all change from one
# batch to the next. Under dynamic=True a size or int of 0 or 1 is specialized (a guard on it would recompile), so
# every total, B + 1 and max_seqlen here is >= 2; single sequences and empty sequences are run by the export tests.
BATCHES = [
    ((3, 2), (5, 4)),
    ((2, 4, 3), (6, 7, 5)),
    ((5, 3, 2, 4), (9, 8, 7, 6)),
    ((2, 6), (3, 11)),
]


def make_batch(seqlens_q, seqlens_k, device, *, seed, query_side_mask=False):
    """The arguments of api_function for one packed batch, with a key-side bias (total_k, H) and a mask that is
    key-side (total_k, Hk) or query-side (total_q, Hk, max_seqlen_k)."""
    g = torch.Generator().manual_seed(seed)
    total_q, total_k = sum(seqlens_q), sum(seqlens_k)
    max_k = max(seqlens_k)
    if query_side_mask:
        mask = torch.rand(total_q, HK, max_k, generator=g) > 0.3  # (total_q, Hk, max_seqlen_k)
    else:
        mask = torch.rand(total_k, HK, generator=g) > 0.3  # (total_k, Hk)
    batch = dict(
        q=torch.randn(total_q, H, D, generator=g),  # (total_q, H, D)
        k=torch.randn(total_k, HK, D, generator=g),  # (total_k, Hk, D)
        v=torch.randn(total_k, HK, D, generator=g),  # (total_k, Hk, D)
        cu_seqlens_q=dmattn_ops.cu_seqlens(seqlens_q),  # (B + 1,)
        cu_seqlens_k=dmattn_ops.cu_seqlens(seqlens_k),  # (B + 1,)
        max_seqlen_q=max(seqlens_q),
        max_seqlen_k=max_k,
        mask=mask,
        bias=torch.randn(total_k, H, generator=g),  # (total_k, H)
    )
    # The CUDA kernels are fp16/bf16 only: float data moves there as bfloat16.
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    return {
        name: (x.to(device, dtype) if x.is_floating_point() else x.to(device)) if isinstance(x, torch.Tensor) else x
        for name, x in batch.items()
    }


def api_function(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, bias):
    """Causal GQA attention with a mask and a bias, returning out (total_q, H, D) and lse (H, total_q)."""
    return dmattn_ops.varlen_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask=mask, bias=bias, is_causal=True,
        return_lse=True,
    )


def assert_same(actual, expected):
    """Bit for bit on the CPU (one deterministic kernel); on CUDA, within assert_close's defaults, in case a kernel
    reduces in a run-dependent order (split-KV)."""
    first = actual[0] if isinstance(actual, (tuple, list)) else actual
    exact = dict(rtol=0, atol=0) if first.device.type == "cpu" else {}
    torch.testing.assert_close(actual, expected, **exact)


def count_op_calls(gm):
    """Calls of dmattn.varlen_fwd in an FX graph (dynamo records the packet, export the .default overload)."""
    targets = (torch.ops.dmattn.varlen_fwd, torch.ops.dmattn.varlen_fwd.default)
    return sum(node.op == "call_function" and node.target in targets for node in gm.graph.nodes)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ---- torch.compile ----------------------------------------------------------------------------------------------


def test_compile_one_graph_for_four_batches_then_one_recompile_for_query_side(device):
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(api_function, backend=counter, fullgraph=True, dynamic=True)

    for seed, (seqlens_q, seqlens_k) in enumerate(BATCHES):
        batch = make_batch(seqlens_q, seqlens_k, device, seed=seed)
        assert_same(compiled(**batch), api_function(**batch))
    assert counter.frame_count == 1
    assert count_op_calls(counter.graphs[0]) == 1

    # The layout is read from the mask's rank: a query-side mask is a new graph, once, for every batch shape.
    for seed, (seqlens_q, seqlens_k) in enumerate(BATCHES[:2]):
        batch = make_batch(seqlens_q, seqlens_k, device, seed=seed, query_side_mask=True)
        assert_same(compiled(**batch), api_function(**batch))
    assert counter.frame_count == 2
    assert count_op_calls(counter.graphs[1]) == 1


def gated_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, gate):
    """A decode step's attention with dynamic sparsity: keys whose gating score (total_k, Hk) is positive are kept
    (a key-side mask computed in the graph), and the score is the key-side bias."""
    return dmattn_ops.varlen_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask=gate > 0, bias=gate, is_causal=True,
    )


def test_compile_decode_loop_never_recompiles(device):
    """Issue 10's decode loop: 8 steps of 4 sequences with one new query each, every sequence gaining one cached key
    per step (so total_k, cu_seqlens_k and max_seqlen_k change every step): one graph, compiled at the first step,
    and no recompile after it; each step matches eager."""
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(gated_attention, backend=counter, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    lengths = [5, 9, 7, 12]
    cache = {name: [torch.randn(n, HK, *width, generator=g) for n in lengths]
             for name, width in (("k", (D,)), ("v", (D,)), ("gate", ()))}
    for step in range(8):
        for name, rows in cache.items():
            for b, t in enumerate(rows):
                rows[b] = torch.cat([t, torch.randn(1, *t.shape[1:], generator=g)])
        k, v, gate = (torch.cat(cache[name]) for name in ("k", "v", "gate"))
        seqlens_k = [t.shape[0] for t in cache["k"]]
        args = (
            torch.randn(len(lengths), H, D, generator=g).to(device, dtype), k.to(device, dtype), v.to(device, dtype),
            dmattn_ops.cu_seqlens([1] * len(lengths), device=device), dmattn_ops.cu_seqlens(seqlens_k, device=device),
            1, max(seqlens_k), gate.to(device),
        )
        assert_same(compiled(*args), gated_attention(*args))
        assert counter.frame_count == 1, f"step {step} recompiled"
    assert count_op_calls(counter.graphs[0]) == 1


def test_compile_has_no_graph_break(device):
    batch = make_batch(*BATCHES[0], device, seed=0)
    explanation = torch._dynamo.explain(api_function)(**batch)
    assert explanation.graph_count == 1
    assert explanation.graph_break_count == 0, explanation.break_reasons


# ---- torch.export -----------------------------------------------------------------------------------------------


class VarlenAttention(torch.nn.Module):
    """varlen_attention with max_seqlen_q / max_seqlen_k as (dynamic) int inputs."""

    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, bias):
        return api_function(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, bias)[0]


class CappedVarlenAttention(torch.nn.Module):
    """varlen_attention with fixed max_seqlen caps (upper bounds, as a deployment knows them) and only tensor inputs.

    AOTInductor needs this form: in torch 2.13 it treats non-tensor inputs as constants (they reach its compile as
    None), so a dynamic int input such as max_seqlen cannot be AOT-compiled."""

    def __init__(self, max_seqlen_q, max_seqlen_k):
        super().__init__()
        self.max_seqlen_q, self.max_seqlen_k = max_seqlen_q, max_seqlen_k

    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, mask, bias):
        return api_function(q, k, v, cu_seqlens_q, cu_seqlens_k, self.max_seqlen_q, self.max_seqlen_k, mask, bias)[0]


CAPS = (8, 16)  # max_seqlen_q, max_seqlen_k of CappedVarlenAttention: every test batch fits under them
TENSOR_INPUTS = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "mask", "bias")


def dynamic_shapes(with_max_seqlen):
    """Dims on total_q, total_k and B; cu_seqlens have B + 1 entries; key-side mask and bias rows are total_k."""
    total_q, total_k, batch = Dim("total_q"), Dim("total_k"), Dim("B")
    shapes = dict(
        q={0: total_q}, k={0: total_k}, v={0: total_k}, cu_seqlens_q={0: batch + 1}, cu_seqlens_k={0: batch + 1},
        mask={0: total_k}, bias={0: total_k},
    )
    if with_max_seqlen:
        shapes.update(max_seqlen_q=Dim.DYNAMIC, max_seqlen_k=Dim.DYNAMIC)
    return shapes


def export_capped(device):
    batch = make_batch(*BATCHES[1], device, seed=0)
    inputs = tuple(batch[name] for name in TENSOR_INPUTS)
    return torch.export.export(CappedVarlenAttention(*CAPS), inputs, dynamic_shapes=dynamic_shapes(False))


def input_signature(ep):
    """The exported inputs, one per line, with the symbolic sizes renamed after the Dims they stand for and q's
    dtype written T (the batches are float32 on the CPU, bfloat16 on CUDA)."""
    placeholders = {n.name: n.meta["val"] for n in ep.graph.nodes if n.op == "placeholder"}
    names = {
        placeholders["q"].shape[0].node.expr: sympy.Symbol("total_q"),
        placeholders["k"].shape[0].node.expr: sympy.Symbol("total_k"),
    }
    (batch_symbol,) = placeholders["cu_seqlens_q"].shape[0].node.expr.free_symbols
    names[batch_symbol] = sympy.Symbol("B")

    def size(s):
        return str(s.node.expr.xreplace(names)) if isinstance(s, torch.SymInt) else str(s)

    lines = []
    for name, val in placeholders.items():
        if isinstance(val, torch.Tensor):
            dtype = "T" if val.dtype == placeholders["q"].dtype else str(val.dtype).removeprefix("torch.")
            lines.append(f"{name}: {dtype}[{', '.join(size(s) for s in val.shape)}]")
        else:
            lines.append(f"{name}: {'SymInt' if isinstance(val, torch.SymInt) else type(val).__name__}")
    return "\n".join(lines)


def test_export_graph_and_save_load(device, tmp_path):
    example = make_batch(*BATCHES[0], device, seed=0)
    ep = torch.export.export(VarlenAttention(), tuple(example.values()), dynamic_shapes=dynamic_shapes(True))
    assert count_op_calls(ep.graph_module) == 1
    assert_expected_inline(ep.graph_module.code.strip(), """\
def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, bias):
    varlen_fwd = torch.ops.dmattn.varlen_fwd.default(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, bias, None, True);  q = k = v = cu_seqlens_q = cu_seqlens_k = max_seqlen_q = max_seqlen_k = mask = bias = None
    getitem = varlen_fwd[0]
    getitem_1 = varlen_fwd[1];  varlen_fwd = getitem_1 = None
    return (getitem,)""")
    assert_expected_inline(input_signature(ep), """\
q: T[total_q, 4, 16]
k: T[total_k, 2, 16]
v: T[total_k, 2, 16]
cu_seqlens_q: int32[B + 1]
cu_seqlens_k: int32[B + 1]
max_seqlen_q: SymInt
max_seqlen_k: SymInt
mask: bool[total_k, 2]
bias: T[total_k, 4]""")

    path = tmp_path / "varlen_attention.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path).module()
    for seed, (seqlens_q, seqlens_k) in enumerate(BATCHES[1:] + [((1,), (1,)), ((3, 0, 2), (0, 4, 5))]):
        batch = make_batch(seqlens_q, seqlens_k, device, seed=seed)
        assert_same(loaded(*batch.values()), api_function(**batch)[0])


def test_export_capped_graph(device):
    ep = export_capped(device)
    assert_expected_inline(ep.graph_module.code.strip(), """\
def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, mask, bias):
    varlen_fwd = torch.ops.dmattn.varlen_fwd.default(q, k, v, cu_seqlens_q, cu_seqlens_k, 8, 16, mask, bias, None, True);  q = k = v = cu_seqlens_q = cu_seqlens_k = mask = bias = None
    getitem = varlen_fwd[0]
    getitem_1 = varlen_fwd[1];  varlen_fwd = getitem_1 = None
    return (getitem,)""")


# ---- AOTInductor -------------------------------------------------------------------------------------------------


def test_aoti_package_runs_and_matches_eager(device, tmp_path):
    ep = export_capped(device)
    package = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "varlen_attention.pt2"))

    # The generated wrapper reaches the op through the dispatcher (proxy executor), by its schema name.
    with zipfile.ZipFile(package) as archive:
        wrappers = [archive.read(n).decode() for n in archive.namelist() if n.endswith(".wrapper.json")]
    assert any('"target": "dmattn::varlen_fwd"' in w for w in wrappers)

    runner = torch._inductor.aoti_load_package(package)
    eager = CappedVarlenAttention(*CAPS)
    for seed, (seqlens_q, seqlens_k) in enumerate(BATCHES + [((1,), (1,)), ((3, 0, 2), (0, 4, 5))]):
        batch = make_batch(seqlens_q, seqlens_k, device, seed=seed)
        inputs = [batch[name] for name in TENSOR_INPUTS]
        assert_same(runner(*inputs), eager(*inputs))

    # Deployment: a fresh interpreter that loads only the op library (no dmattn_ops Python: no fake impl, no
    # rules) runs the package. Without the library, loading fails with "Could not find schema for
    # dmattn::varlen_fwd".
    batch = make_batch(*BATCHES[2], device, seed=7)
    inputs = [batch[name] for name in TENSOR_INPUTS]
    torch.save({"inputs": inputs, "expected": eager(*inputs)}, tmp_path / "io.pt")
    tolerance = "rtol=0, atol=0" if device == "cpu" else ""  # as assert_same
    script = textwrap.dedent(
        f"""
        import torch
        torch.ops.load_library({dmattn_ops._C.__file__!r})
        runner = torch._inductor.aoti_load_package({package!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        torch.testing.assert_close(runner(*io["inputs"]), io["expected"], {tolerance})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)


# ---- the serving features: window, softcap, sinks, seqused_k --------------------------------------------------


class ServingAttention(torch.nn.Module):
    """A decoder layer's attention as a server exports it: a padded cache read in place (seqused_k), a causal
    sliding window, attention softcapping and learned sinks (a parameter), with fixed max_seqlen caps."""

    def __init__(self):
        super().__init__()
        self.sinks = torch.nn.Parameter(torch.randn(H, generator=torch.Generator().manual_seed(3)))

    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k):
        return dmattn_ops.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *CAPS, is_causal=True,
                                           window_size=(3, -1), softcap=2.5, sinks=self.sinks, seqused_k=seqused_k)


def _serving_inputs(seqlens_q, seqlens_k, device, seed):
    batch = make_batch(seqlens_q, seqlens_k, device, seed=seed)
    used = torch.tensor([max(1, n - 2) for n in seqlens_k], dtype=torch.int32, device=device)  # unused cache slots
    return tuple(batch[n] for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k")) + (used,)


def test_serving_features_export_and_aoti(device, tmp_path):
    """window, softcap, sinks and seqused_k through torch.export (one op call, dynamic sizes) and an AOTInductor
    package, which match eager on batches of other sizes; eager matches the float64 reference."""
    model = ServingAttention().to(device)
    total_q, total_k, batch = Dim("total_q"), Dim("total_k"), Dim("B")
    shapes = (
        {0: total_q}, {0: total_k}, {0: total_k}, {0: batch + 1}, {0: batch + 1}, {0: batch},
    )
    ep = torch.export.export(model, _serving_inputs(*BATCHES[1], device, 0), dynamic_shapes=shapes)
    assert count_op_calls(ep.graph_module) == 1
    runner = torch._inductor.aoti_load_package(
        torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "serving.pt2")))
    with torch.no_grad():
        for seed, (seqlens_q, seqlens_k) in enumerate(BATCHES):
            inputs = _serving_inputs(seqlens_q, seqlens_k, device, seed)
            want = model(*inputs)
            assert_same(ep.module()(*inputs), want)
            assert_same(runner(*inputs), want)
    q, k, v, cu_q, cu_k, used = (t.cpu() for t in _serving_inputs(*BATCHES[2], device, 9))
    ref, _ = dmattn_ops.reference.reference_varlen_attention(
        q, k, v, cu_q, cu_k, *CAPS, is_causal=True, window_size=(3, -1), softcap=2.5, sinks=model.sinks.detach().cpu(),
        seqused_k=used)
    got = model(*_serving_inputs(*BATCHES[2], device, 9)).detach().cpu().double()
    tolerance = 1e-2 if device == "cuda" else 1e-5  # bfloat16 on CUDA
    torch.testing.assert_close(got, ref, rtol=tolerance, atol=tolerance)

"""The mask_mod / score_mod adapter (dmattn_ops.mods): layouts chosen, end-to-end agreement with FlexAttention,
rejection of non-additive score_mods, and the convenience path under torch.compile(fullgraph=True, dynamic=True).

Every registry entry (tests/mod_registry.py) runs through ``varlen_attention(mask_mod=..., score_mod=...)`` and
through ``flex_attention`` + ``create_block_mask`` on the same packed inputs (batch 1, sequences separated by a
document mask; FlexAttention's eager CPU path), and the layout the adapter chose is pinned by expecttest.
"""

import textwrap
import warnings

import expecttest
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.attention.flex_attention import AuxRequest, and_masks, create_block_mask, flex_attention

import dmattn_ops
from dmattn_ops._meta.rules import layout_of
from dmattn_ops.mods import ModDependencies, additive_part, create_bias, create_mask, mod_dependencies

try:  # tests/ as a package or as a plain folder on sys.path
    from . import mod_registry as reg
except ImportError:
    import mod_registry as reg

ACCEPTED = [case.name for case in reg.CASES if case.rejected is None]
REJECTED = [case.name for case in reg.CASES if case.rejected is not None]


@pytest.fixture(scope="module")
def batch():
    return reg.make_batch()


@pytest.fixture(scope="module")
def one_sequence():
    """A batch of one sequence, with padding rows: the adapter builds it in one pass (mods.py, _one_sequence)."""
    return reg.make_batch(lens_q=reg.ONE_Q, lens_k=reg.ONE_K)


def _bounds(batch):
    """(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k): the arguments the adapter's functions take."""
    return batch.cu_seqlens_q, batch.cu_seqlens_k, batch.max_seqlen_q, batch.max_seqlen_k


def _shape_args(batch):
    return dict(
        num_heads=reg.HEADS, num_heads_k=reg.HEADS_K, total_q=batch.q.shape[0], total_k=batch.k.shape[0]
    )


def _flex_reference(batch, mask_mod, score_mod):
    """FlexAttention on the packed batch: out (total_q, H, D), lse (H, total_q)."""
    total_q, total_k = batch.q.shape[0], batch.k.shape[0]
    block_mask = create_block_mask(batch.flex_mask_mod(mask_mod), None, None, total_q, total_k, device="cpu")
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (batch.q, batch.k, batch.v))  # (1, heads, tokens, D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()": eager is the point
        out, aux = flex_attention(
            q, k, v, score_mod=batch.flex_score_mod(score_mod), block_mask=block_mask, enable_gqa=True,
            return_aux=AuxRequest(lse=True),
        )
    return out[0].transpose(0, 1), aux.lse[0]


def _graph_walk_dependencies(mod):
    """Independent oracle: make_fx trace of mod, then which placeholders reach the output node."""
    idx = [torch.zeros(1, dtype=torch.int32) for _ in range(4)]
    gm = make_fx(torch.vmap(mod), tracing_mode="fake", _allow_non_fake_inputs=True)(*idx)
    reach, placeholders = {}, 0
    for node in gm.graph.nodes:
        sources = set().union(*(reach[n] for n in node.all_input_nodes)) if node.all_input_nodes else set()
        if node.op == "placeholder":
            sources, placeholders = {placeholders}, placeholders + 1
        if node.op == "output":
            return ModDependencies(*(i in sources for i in range(4)))
        reach[node] = sources
    raise AssertionError("graph without output")


def _describe(name, value):
    if value is None:
        return f"{name} -"
    return f"{name} {layout_of(value).value} {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"


class TestChosenLayouts(expecttest.TestCase):
    def test_registry_layouts(self):
        batch = reg.make_batch()
        lines = []
        for case in reg.CASES:
            mask_mod, score_mod = case.mods(batch)
            try:
                mask, bias = dmattn_ops.mods.operands_from_mods(
                    batch.q, batch.k, *_bounds(batch), None, None, mask_mod, score_mod
                )
                lines.append(f"{case.name:22s} {_describe('mask', mask):38s} | {_describe('bias', bias)}")
            except ValueError as e:
                lines.append(f"{case.name:22s} rejected: {str(e).split(': it ')[1].split('. A bias')[0]}")
        # total_q = 15 + 2 padding rows, total_k = 37 + 3, H = 4, Hk = 2, max_seqlen_k = 11
        self.assertExpectedInline(
            "\n".join(lines),
            """\
key_gating_topk        mask key-side (40, 1) bool             | bias -
per_head_gating        mask key-side (40, 4) bool             | bias -
kv_head_gating         mask key-side (40, 4) bool             | bias -
sliding_window         mask query-side (17, 1, 11) bool       | bias -
prefix_lm              mask query-side (17, 1, 11) bool       | bias -
chunked_causal         mask query-side (17, 1, 11) bool       | bias -
document_causal        mask query-side (17, 1, 11) bool       | bias -
gating_and_causal      mask query-side (17, 1, 11) bool       | bias -
gating_or_even_heads   mask key-side (40, 4) bool             | bias -
alibi                  mask -                                 | bias query-side (17, 4, 11) float32
key_bias               mask -                                 | bias key-side (40, 1) float32
per_head_key_bias      mask -                                 | bias key-side (40, 4) float32
identity_score         mask -                                 | bias key-side (40, 1) float32
gating_with_key_bias   mask key-side (40, 1) bool             | bias key-side (40, 1) float32
window_with_alibi      mask query-side (17, 1, 11) bool       | bias query-side (17, 4, 11) float32
softcap                rejected: divides score (score / x, e.g. a softcap)
scaled_score           rejected: multiplies score (score * x)
where_masked_score     rejected: passes score to where""",
        )

    def test_one_sequence_takes_the_same_layouts(self):
        """The one-sequence build (one pass, its probe taken from the guard on the operand's own grids) chooses each
        registry mod's layout and head count as the probe on small grids does for a batch of several."""
        packed, one = reg.make_batch(), reg.make_batch(lens_q=reg.ONE_Q, lens_k=reg.ONE_K)
        for case in reg.CASES:
            if case.rejected is not None:
                continue
            got = []
            for batch in (packed, one):
                operands = dmattn_ops.mods.operands_from_mods(
                    batch.q, batch.k, *_bounds(batch), None, None, *case.mods(batch)
                )
                got.append([None if t is None else (layout_of(t), t.shape[1], t.dtype) for t in operands])
            self.assertEqual(got[0], got[1], case.name)

    def test_rejection_message(self):
        batch = reg.make_batch()
        with self.assertRaises(ValueError) as ctx:
            create_bias(reg._softcap, *_bounds(batch), **_shape_args(batch))
        self.assertExpectedInline(textwrap.fill(str(ctx.exception), 110), """\
dmattn.create_bias: score_mod is not additive, so it cannot become a bias: it divides score (score / x, e.g. a
softcap). A bias needs score_mod(score, b, h, q_idx, kv_idx) == score + f(b, h, q_idx, kv_idx) with f
independent of score, i.e. score may only appear as `score + x` or `score - x`. A softcap (tanh), a scale
(score * x) or a torch.where(..., score, ...) changes the scores themselves; write masking as a mask_mod, and
a conditional bias as score + torch.where(cond, x, 0.0).""")


@pytest.mark.parametrize("which", ["batch", "one_sequence"])
@pytest.mark.parametrize("name", ACCEPTED)
def test_matches_flex_attention(which, name, request):
    batch = request.getfixturevalue(which)
    mask_mod, score_mod = reg.CASES_BY_NAME[name].mods(batch)
    out, lse = batch.run(mask_mod=mask_mod, score_mod=score_mod)
    ref_out, ref_lse = _flex_reference(batch, mask_mod, score_mod)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", REJECTED)
def test_non_additive_score_mods_are_rejected(batch, name):
    case = reg.CASES_BY_NAME[name]
    _, score_mod = case.mods(batch)
    with pytest.raises(ValueError, match=case.rejected):
        batch.run(score_mod=score_mod)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_operands_built_on_cuda_match_the_cpu(batch):
    """The adapter is device-agnostic: every registry operand built on the GPU equals the CPU one."""
    gpu = batch.to("cuda")
    for case in reg.CASES:
        if case.rejected is not None:
            continue
        built = [
            dmattn_ops.mods.operands_from_mods(b.q, b.k, *_bounds(b), None, None, *case.mods(b))
            for b in (batch, gpu)
        ]
        for on_cpu, on_gpu in zip(*built):
            assert (on_cpu is None) == (on_gpu is None), case.name
            if on_cpu is not None:
                assert on_gpu.device.type == "cuda"
                torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=0, rtol=0, msg=case.name)


def test_non_additive_score_mod_fails_compilation_with_the_reason(batch):
    """Under fullgraph compilation the ValueError surfaces inside dynamo's error, reason included."""
    args = (batch.q, batch.k, batch.v, *_bounds(batch))

    def step(q, k, v, cu_q, cu_k, max_q, max_k):
        return dmattn_ops.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, score_mod=reg._softcap)

    with pytest.raises(Exception, match="score_mod is not additive"):
        torch.compile(step, backend="eager", fullgraph=True, dynamic=True)(*args)


@pytest.mark.parametrize("name", ACCEPTED)
def test_dependencies_match_graph_walk(batch, name):
    """The vmap-level trace the adapter uses agrees with a make_fx graph walk on every registry mod."""
    for mod in reg.CASES_BY_NAME[name].mods(batch):
        if mod is None:
            continue
        as_mask_mod = additive_part(mod) if mod.__code__.co_argcount == 5 else mod
        assert mod_dependencies(as_mask_mod) == _graph_walk_dependencies(as_mask_mod)


_TABLE = torch.arange(10)
TRICKY_MODS = {  # ops that reshape, broadcast or discard an index: the trace must still follow the data
    "expand": lambda b, h, q_idx, kv_idx: (q_idx > 0).expand(()),
    "broadcast_to": lambda b, h, q_idx, kv_idx: torch.broadcast_to(q_idx > kv_idx, ()),
    "zeros_like": lambda b, h, q_idx, kv_idx: torch.zeros_like(q_idx).bool() | (kv_idx > 0),
    "stack_reduce": lambda b, h, q_idx, kv_idx: torch.stack([h, kv_idx]).sum() > 3,
    "expand_reduce": lambda b, h, q_idx, kv_idx: (q_idx.unsqueeze(0).expand(3) > 0).all(),
    "table_lookup": lambda b, h, q_idx, kv_idx: _TABLE[b] > _TABLE[kv_idx],
    "new_ones": lambda b, h, q_idx, kv_idx: h.new_ones((), dtype=torch.bool),
}


@pytest.mark.parametrize("name", list(TRICKY_MODS))
def test_dependency_trace_on_tricky_ops(name):
    assert mod_dependencies(TRICKY_MODS[name]) == _graph_walk_dependencies(TRICKY_MODS[name])


def test_key_side_rows_and_dont_care_entries(batch):
    """Key-side rows after cu_seqlens_k[-1], and query-side entries past a sequence's keys or on rows outside every
    sequence, are False; the rest is the mask_mod itself."""
    keep, causal = reg._gate(batch), reg._causal(batch)
    key_side = create_mask(keep, *_bounds(batch), **_shape_args(batch))
    n = int(batch.cu_seqlens_k[-1])
    assert torch.equal(key_side[:n, 0], batch.extras["keep"][:n]) and not key_side[n:].any()

    query_side = create_mask(causal, *_bounds(batch), **_shape_args(batch))
    expected = torch.zeros_like(query_side)
    for b, (lq, lk) in enumerate(zip(reg.LENS_Q, reg.LENS_K)):  # a plain-loop reference
        for i in range(lq):
            for j in range(lk):
                expected[int(batch.cu_seqlens_q[b]) + i, 0, j] = j <= i + lk - lq
    assert torch.equal(query_side, expected)


@pytest.mark.parametrize("name", ACCEPTED)
def test_query_side_block_by_block_equals_the_grid(batch, name, monkeypatch):
    """create_mask / create_bias evaluate a query-side operand over the (total_q, max_seqlen_k) grid, or, on CPU
    tensors when the grid is large enough, sequence by sequence over each one's own block: both give the same tensor,
    bit for bit, don't-care entries included (the batch has sequences without queries, without keys, and rows after
    cu_seqlens_q[-1])."""
    mask_mod, score_mod = reg.CASES_BY_NAME[name].mods(batch)
    builders = []
    if mask_mod is not None:
        builders.append(lambda: create_mask(mask_mod, *_bounds(batch), **_shape_args(batch)))
    if score_mod is not None:
        builders.append(lambda: create_bias(score_mod, *_bounds(batch), **_shape_args(batch)))
    for build in builders:
        monkeypatch.setattr(dmattn_ops.mods, "PER_SEQUENCE_MIN_ENTRIES", 0)  # always block by block
        blocks = build()
        monkeypatch.setattr(dmattn_ops.mods, "PER_SEQUENCE_MIN_ENTRIES", 1 << 62)  # always the grid
        grid = build()
        assert torch.equal(blocks, grid)


def test_default_totals_and_head_count_of_bias(batch):
    """Without total_q / total_k the row counts come from cu_seqlens[-1]; a head-free bias has Hm = 1."""
    bias = create_bias(reg._alibi(batch), *_bounds(batch), reg.HEADS)
    assert bias.shape == (int(batch.cu_seqlens_q[-1]), reg.HEADS, batch.max_seqlen_k) and bias.dtype == torch.float32
    flat = create_bias(reg._key_bias(batch), *_bounds(batch), reg.HEADS)
    assert flat.shape == (int(batch.cu_seqlens_k[-1]), 1)


def test_empty_batches():
    cu = torch.zeros(1, dtype=torch.int32)  # B = 0
    assert create_mask(reg._even_heads, cu, cu, 0, 0, 4, total_k=2).shape == (2, 1)  # not called: key-side
    cu_q = torch.tensor([0, 0, 0], dtype=torch.int32)  # sequences without queries: the mask is all False
    cu_k = torch.tensor([0, 3, 5], dtype=torch.int32)
    mask = create_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx, cu_q, cu_k, 0, 3, 2, total_q=1)
    assert mask.shape == (1, 1, 3) and not mask.any()


def test_argument_errors(batch):
    args = (batch.q, batch.k, batch.v, *_bounds(batch))
    gate = reg._gate(batch)
    with pytest.raises(ValueError, match="pass either mask or mask_mod, not both"):
        dmattn_ops.varlen_attention(*args, mask=torch.ones(batch.k.shape[0], 1, dtype=torch.bool), mask_mod=gate)
    with pytest.raises(ValueError, match="pass either bias or score_mod, not both"):
        dmattn_ops.varlen_attention(*args, bias=torch.zeros(batch.k.shape[0], 1), score_mod=reg._identity)
    with pytest.raises(TypeError, match="mask_mod must return bool"):
        dmattn_ops.varlen_attention(*args, mask_mod=lambda b, h, q_idx, kv_idx: kv_idx + 1)
    with pytest.raises(ValueError, match="must return one value per"):
        create_mask(
            lambda b, h, q_idx, kv_idx: torch.ones(2, dtype=torch.bool), batch.cu_seqlens_q, batch.cu_seqlens_k,
            6, 11, 4,
        )
    with pytest.raises(ValueError, match="num_heads must be a multiple of num_heads_k"):
        create_mask(gate, batch.cu_seqlens_q, batch.cu_seqlens_k, 6, 11, 4, 3)


def _random_batch(g, num_seqs, heads=6, heads_k=3, dim=8):
    len_q = torch.randint(1, 5, (num_seqs,), generator=g)
    len_k = torch.randint(2, 14, (num_seqs,), generator=g)
    cu_q, cu_k = dmattn_ops.cu_seqlens(len_q), dmattn_ops.cu_seqlens(len_k)
    q = torch.randn(int(cu_q[-1]), heads, dim, generator=g)
    k = torch.randn(int(cu_k[-1]), heads_k, dim, generator=g)
    v = torch.randn(int(cu_k[-1]), heads_k, dim, generator=g)
    gate = torch.rand(k.shape[0], heads_k, generator=g)  # (total_k, Hk)
    bias = torch.randn(k.shape[0], generator=g)
    return (q, k, v, cu_q, cu_k, int(len_q.max()), int(len_k.max())), (gate, bias)


def _decode_step(q, k, v, cu_q, cu_k, max_q, max_k, gate, key_bias):
    """A decode step as a user writes it: mods closing over this step's tensors, defined inside the compiled code."""

    group = q.shape[1] // k.shape[1]  # a SymInt under dynamic=True

    def keep(b, h, q_idx, kv_idx):
        return gate[cu_k[b] + kv_idx, 0] > 0.25

    def keep_per_kv_head(b, h, q_idx, kv_idx):
        return gate[cu_k[b] + kv_idx, h // group] > 0.25

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + (cu_k[b + 1] - cu_k[b]) - (cu_q[b + 1] - cu_q[b])

    def bias(score, b, h, q_idx, kv_idx):
        return score + key_bias[cu_k[b] + kv_idx]

    key_side = dmattn_ops.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, mask_mod=keep, score_mod=bias)
    query_side = dmattn_ops.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, mask_mod=and_masks(keep, causal))
    per_head = dmattn_ops.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, mask_mod=keep_per_kv_head)
    return key_side, query_side, per_head


def test_convenience_path_compiles_fullgraph_dynamic():
    """Four batches of different B / total_q / total_k / max_seqlen: one graph, no break, equal to eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(_decode_step, backend=counter, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(1)
    for num_seqs in (3, 5, 4, 7):
        args, closure_tensors = _random_batch(g, num_seqs)
        expected = _decode_step(*args, *closure_tensors)
        got = compiled(*args, *closure_tensors)
        for e, o in zip(expected, got):
            torch.testing.assert_close(o, e, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1


# ---- sliding_window: the op's native window as a mask_mod ------------------------------------------------------


def _window_batch():
    g = torch.Generator().manual_seed(5)
    lens_q, lens_k = [5, 40, 3, 0], [9, 40, 30, 4]
    cu_q, cu_k = dmattn_ops.cu_seqlens(lens_q), dmattn_ops.cu_seqlens(lens_k)
    q = torch.randn(sum(lens_q), 4, 16, generator=g)
    k, v = (torch.randn(sum(lens_k), 2, 16, generator=g) for _ in range(2))
    return q, k, v, cu_q, cu_k


class _OpSpy:
    """Records the mask and window each call of dmattn::varlen_fwd gets."""

    def __init__(self):
        self.real, self.calls = torch.ops.dmattn.varlen_fwd, []

    def __call__(self, *args):
        self.calls.append({"mask": args[7], "window": (args[11], args[12]), "key_range": args[17]})
        return self.real(*args)


@pytest.mark.parametrize("window", [(7, 0), (3, 2), (-1, 1), (0, -1)])
def test_sliding_window_mask_mod_runs_as_the_native_window(window, monkeypatch):
    """With the call's own cu_seqlens tensors, a sliding_window mask_mod becomes the op's window_size (no mask
    tensor); given other cu_seqlens tensors it is a plain mask_mod of the same values, which its expression proves
    one interval per query (its lengths read at b): a key_range, no mask. Both agree with the reference's window."""
    q, k, v, cu_q, cu_k = _window_batch()
    mod = dmattn_ops.sliding_window(cu_q, cu_k, *window)
    spy = _OpSpy()
    monkeypatch.setattr(torch.ops.dmattn, "varlen_fwd", spy)
    native = dmattn_ops.varlen_attention(q, k, v, cu_q, cu_k, 40, 40, mask_mod=mod)
    as_mask = dmattn_ops.varlen_attention(q, k, v, cu_q.clone(), cu_k.clone(), 40, 40, mask_mod=mod)
    assert spy.calls[0] == {"mask": None, "window": window, "key_range": None}
    assert spy.calls[1]["mask"] is None and spy.calls[1]["window"] == (-1, -1)
    assert spy.calls[1]["key_range"] is not None
    want = dmattn_ops.reference.reference_varlen_attention(q, k, v, cu_q, cu_k, 40, 40, window_size=window)[0]
    for got in (native, as_mask):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_sliding_window_errors():
    q, k, v, cu_q, cu_k = _window_batch()
    with pytest.raises(ValueError, match=r"dmattn.sliding_window: left must be an int >= -1 \(-1: no limit\), got -2"):
        dmattn_ops.sliding_window(cu_q, cu_k, -2)
    with pytest.raises(ValueError, match="pass either window_size or a sliding_window mask_mod, not both"):
        dmattn_ops.varlen_attention(q, k, v, cu_q, cu_k, 40, 40, mask_mod=dmattn_ops.sliding_window(cu_q, cu_k, 4),
                                    window_size=(4, 0))


def test_sliding_window_compiles_in_one_graph():
    q, k, v, cu_q, cu_k = _window_batch()

    def attend(q, k, v, cu_q, cu_k):
        window = dmattn_ops.sliding_window(cu_q, cu_k, 7)
        return dmattn_ops.varlen_attention(q, k, v, cu_q, cu_k, 40, 40, mask_mod=window)

    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(q, k, v, cu_q, cu_k), attend(q, k, v, cu_q, cu_k), rtol=0, atol=0)

// schema.cpp: the op schemas (the forward, its backward, and the adapter's two passes), defined once. Backends
// register their kernels in their own files (csrc/cpu/varlen_fwd_cpu.cpp, csrc/cuda/varlen_fwd_cuda.cpp,
// csrc/packed_rows.cpp); the fake (meta) implementations and the layout rules live
// in meta/ (installed as dmattn_ops._meta).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// An empty module, so that `from dmattn_ops import _C` loads this library (and its TORCH_LIBRARY blocks) from
// Python with the limited API.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(dmattn, m) {
  m.def(
      "varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "SymInt max_seqlen_q, SymInt max_seqlen_k, Tensor? mask=None, Tensor? bias=None, "
      "float? softmax_scale=None, bool is_causal=False, int window_left=-1, int window_right=-1, "
      "float? softcap=None, Tensor? sinks=None, Tensor? seqused_k=None, Tensor? kv_slots=None, "
      "Tensor? key_range=None) -> (Tensor out, Tensor softmax_lse)");
  // The gradients of varlen_fwd, given its inputs, its outputs and the gradients of its outputs (dsoftmax_lse may be
  // empty: no gradient through softmax_lse). dbias is empty unless bias_grad, dsinks (H,) float32 empty without sinks;
  // the mask has no gradient. It takes packed keys only: the autograd formula gathers a kv_slots call's pool rows
  // first and adds their gradients back into the pool (meta/fake.py).
  m.def(
      "varlen_bwd(Tensor dout, Tensor dsoftmax_lse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, Tensor? mask=None, "
      "Tensor? bias=None, float? softmax_scale=None, bool is_causal=False, bool bias_grad=False, "
      "int window_left=-1, int window_right=-1, float? softcap=None, Tensor? sinks=None, Tensor? seqused_k=None, "
      "Tensor? key_range=None) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias, Tensor dsinks)");
  // The mask_mod adapter's two passes (csrc/packed_rows.h), one launch each, no host sync. packed_rows: rows
  // (4, total) int64, for each packed row of cu_seqlens' side its sequence, its position there, the other side's
  // count of that sequence (0 past cu_seqlens[-1]) and that count's last position; a row with no count is given the
  // anchor's first position. anchor (2,) int64: the sequence with the most rows on both sides, and 0.
  m.def("packed_rows(Tensor cu_seqlens, Tensor cu_seqlens_other, SymInt total) -> (Tensor rows, Tensor anchor)");
  // zero_unseen_: grid (R, M, W), counts (R,) int64: grid[r, :, j] = 0 for every j >= counts[r], in place.
  m.def("zero_unseen_(Tensor(a!) grid, Tensor counts) -> ()");
}

"""`python -m dmattn_ops`: what a CUDA build reports per arch path, and what it says about the GPU it finds, on a
build config made from tools/kernel_matrix.py and a stand-in GPU (so it runs on any machine)."""

import contextlib
import os
import io
from unittest import mock

import expecttest
import torch

import dmattn_ops
import kernel_matrix as km
from dmattn_ops import __main__ as cli


def cuda_build(archs, instantiations=km.INSTANTIATIONS):
    """A build config as setup.py writes it for a CUDA build."""
    return dict(torch_version="2.13.0+cu130", torch_cuda="13.0", backends=["cpu", "cuda"],
                cpu_dtypes=["float32", "float16", "bfloat16"], **km.build_info(archs, instantiations))


class TestReport(expecttest.TestCase):
    def report(self, build, cc=None):
        """What `python -m dmattn_ops` prints for build, on a GPU of compute capability cc (None: no GPU)."""
        gpu = [
            mock.patch.object(dmattn_ops, "build_info", lambda: build),
            mock.patch.object(torch, "__version__", "2.13.0+cu130"),
            mock.patch.object(torch.cuda, "is_available", lambda: cc is not None),
            mock.patch.object(torch.cuda, "get_device_capability", lambda *_: divmod(cc, 10)),
            mock.patch.object(torch.cuda, "get_device_name", lambda *_: "GPU"),
        ]
        out = io.StringIO()
        with contextlib.ExitStack() as stack, contextlib.redirect_stdout(out):
            for patch in gpu:
                stack.enter_context(patch)
            cli.main()
        return out.getvalue()

    def test_default_build_on_hopper(self):
        self.assertExpectedInline(self.report(cuda_build(["80", "90"]), cc=90), """\
dmattn_ops build
  built against torch  2.13.0+cu130 (CUDA 13.0)
  running torch        2.13.0+cu130
  backends             cpu, cuda
  CPU dtypes           float32, float16, bfloat16; any head dim >= 1
  CUDA archs           sm_80, sm_90
  CUDA arch paths      in dispatch preference order (cc: compute capability, major * 10 + minor)
    sm90a  runs where cc == 90, built for sm_90a: float16, bfloat16; head dims 64, 128, 256
    sm80   runs where cc >= 80, built for sm_80, sm_90: float16, bfloat16; head dims 32, 64, 96, 128, 256
  CUDA dtypes          float16, bfloat16
  CUDA head dims       32, 64, 96, 128, 256 compiled; others up to 256 run padded
  CUDA backward        sm90a at D 64, 128 where cc == 90, else sm80 pair (D 64, 128); blockwise: D > 128, query-side operands
  CUDA device here     GPU (sm_90): uses sm90a, then sm80
""")

    def test_backward_kernels(self):
        """The backward line names the generated sm90a backward where the build has it (at its head dims), then the
        sm80 pair every CUDA build has; a build recorded before the field existed shows the pair alone."""
        line = "  CUDA backward        "
        self.assertIn(line + "sm80 pair (D 64, 128); blockwise: D > 128, query-side operands\n",
                      self.report(cuda_build(["80"]), cc=80))
        build = cuda_build(["90"], km.with_head_dims([128]))
        self.assertIn(line + "sm90a at D 128 where cc == 90, else sm80 pair (D 64, 128); blockwise: D > 128, "
                      "query-side operands\n", self.report(build, cc=90))
        del build["cuda_backward"]
        self.assertIn(line + "sm80 pair (D 64, 128)", self.report(build, cc=90))

    def test_sm90a_kernels_are_preferred_on_hopper(self):
        sm80 = [i for i in km.INSTANTIATIONS if i[0] == "sm80"]
        build = cuda_build(["80", "90"], sm80 + [("sm90a", "bfloat16", 128)])
        report = self.report(build, cc=90)
        self.assertIn("    sm90a  runs where cc == 90, built for sm_90a: bfloat16; head dims 128\n", report)
        self.assertIn("  CUDA device here     GPU (sm_90): uses sm90a, then sm80\n", report)
        self.assertIn("  CUDA device here     GPU (sm_80): uses sm80\n", self.report(build, cc=80))

    def test_build_of_fewer_head_dims(self):
        """DMATTN_HEAD_DIMS=64;128: each arch path lists what it holds; the CUDA head dims line says the others pad."""
        report = self.report(cuda_build(["80", "90"], km.with_head_dims([64, 128])), cc=90)
        self.assertIn("    sm90a  runs where cc == 90, built for sm_90a: float16, bfloat16; head dims 64, 128\n", report)
        self.assertIn("built for sm_80, sm_90: float16, bfloat16; head dims 64, 128\n", report)
        self.assertIn("  CUDA head dims       64, 128 compiled; others up to 128 run padded\n", report)

    def test_sm90a_not_built_without_90(self):
        report = self.report(cuda_build(["80"]), cc=86)
        self.assertIn("    sm90a  runs where cc == 90; not built (DMATTN_CUDA_ARCHS lacks its arch)\n", report)
        self.assertIn("  CUDA device here     GPU (sm_86): uses sm80\n", report)  # sm_80 code runs on sm_86
        self.assertNotIn("warning", report)

    def test_gpu_without_code_in_the_build(self):
        report = self.report(cuda_build(["80", "90"]), cc=120)
        self.assertExpectedInline(report.split("CUDA device here", 1)[1], """\
     GPU (sm_120): uses sm80
  warning: this GPU is sm_120; the build has sm_80, sm_90: rebuild with DMATTN_CUDA_ARCHS=120 (or "80;90;120" to keep the others)
""")

    def test_gpu_no_arch_path_runs_on(self):
        report = self.report(cuda_build(["80", "90"]), cc=75)
        self.assertIn("GPU (sm_75): no arch path of this build runs on it (they need cc == 90 or cc >= 80)\n", report)
        self.assertNotIn("warning", report)

    def test_no_gpu(self):
        self.assertIn("  CUDA device here     none\n", self.report(cuda_build(["80", "90"])))

    def test_machine_code_compatibility(self):
        self.assertTrue(cli.machine_code_runs("80", 86) and cli.machine_code_runs("90", 90))
        self.assertFalse(cli.machine_code_runs("86", 80) or cli.machine_code_runs("90", 100))
        self.assertTrue(cli.machine_code_runs("90a", 90))
        self.assertFalse(cli.machine_code_runs("90a", 100))


def test_bootstrap_rebuilds_for_sources_not_for_docs(tmp_path, monkeypatch):
    """tools/bootstrap.py's staleness check: the newest build input is a source file under csrc/ (or setup.py, the
    kernel matrix), so editing csrc/cuda/README.md does not cost a 1-3 minute rebuild."""
    import bootstrap  # tools/ is on pytest's path

    for name, mtime in [("csrc/cuda/kernel.cuh", 100), ("csrc/cpu/kernel.cpp", 200), ("csrc/cuda/README.md", 900),
                        ("setup.py", 50), ("tools/kernel_matrix.py", 60)]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        os.utime(path, (mtime, mtime))
    monkeypatch.setattr(bootstrap, "ROOT", tmp_path)
    assert bootstrap.newest_input() == (200, tmp_path / "csrc/cpu/kernel.cpp")
    os.utime(tmp_path / "setup.py", (300, 300))
    assert bootstrap.newest_input() == (300, tmp_path / "setup.py")

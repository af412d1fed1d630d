"""`python -m dmattn_ops` prints what this build contains."""

import torch

import dmattn_ops


def main():
    info = dmattn_ops.build_info()
    print("dmattn_ops build")
    print(f"  built against torch  {info['torch_version']} (CUDA {info['torch_cuda'] or 'none'})")
    print(f"  running torch        {torch.__version__}")
    print(f"  backends             {', '.join(info['backends'])}")
    print(f"  CPU dtypes           {', '.join(info['cpu_dtypes'])}; any head dim >= 1")
    if "cuda" in info["backends"]:
        print(f"  CUDA archs           {', '.join('sm_' + a for a in info['cuda_archs'])}")
        print(f"  CUDA dtypes          {', '.join(info['cuda_dtypes'])}")
        dims = info["cuda_head_dims"]
        print(f"  CUDA head dims       {', '.join(str(d) for d in dims)} compiled; others up to {max(dims)} run padded")
        print(f"  CUDA device here     {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")


if __name__ == "__main__":
    main()

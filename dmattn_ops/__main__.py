"""`python -m dmattn_ops` prints what this build contains, and what this machine's GPU would run."""

import operator

import torch

import dmattn_ops

_COMPARE = {">=": operator.ge, "==": operator.eq}


def runs_on(condition, cc):
    """Whether an arch path's runs_on ("cc >= 80", "cc == 90") holds for compute capability cc (major * 10 + minor)."""
    _, op, value = condition.split()
    return _COMPARE[op](cc, int(value))


def machine_code_runs(arch, cc):
    """Whether sm_<arch> machine code runs on a device of compute capability cc: the same major version and a minor
    one at most the device's; an arch-specific target (90a) on its own cc only."""
    if not arch[-1].isdigit():
        return int(arch[:-1]) == cc
    return int(arch) // 10 == cc // 10 and int(arch) % 10 <= cc % 10


def describe_path(name, path):
    built_for = ", ".join(g.rsplit("code=", 1)[1] for g in path["gencode"])
    if not path["gencode"]:
        return f"{name:6s} runs where {path['runs_on']}; not built (DMATTN_CUDA_ARCHS lacks its arch)"
    if not path["dtypes"]:
        return f"{name:6s} runs where {path['runs_on']}, built for {built_for}: no kernels (an empty slot)"
    dims = ", ".join(str(d) for d in path["head_dims"])
    return (f"{name:6s} runs where {path['runs_on']}, built for {built_for}: {', '.join(path['dtypes'])}; "
            f"head dims {dims}")


def describe_backward(info):
    """The fused backward's kernels: the sm80 pair in every CUDA build, and before it the generated ones of this build
    (the sm90a backward), where they run (builds recorded before `cuda_backward` existed show the pair alone)."""
    first = [f"{name} at D {', '.join(str(d) for d in dims)} where {info['cuda_arch_paths'][name]['runs_on']}"
             for name, dims in info.get("cuda_backward", {}).items()]
    return ", else ".join([*first, "sm80 pair (D 64, 128)"]) + "; blockwise: D > 128, query-side operands"


def describe_device(info):
    """The device line (which arch paths this GPU would use) and a warning when the build has no code for it."""
    if not torch.cuda.is_available():
        return "none", None
    major, minor = torch.cuda.get_device_capability()
    cc = major * 10 + minor
    used = [name for name, path in info["cuda_arch_paths"].items() if path["dtypes"] and runs_on(path["runs_on"], cc)]
    line = f"{torch.cuda.get_device_name()} (sm_{cc}): "
    if not used:
        needs = " or ".join(path["runs_on"] for path in info["cuda_arch_paths"].values() if path["dtypes"])
        return line + f"no arch path of this build runs on it (they need {needs})", None
    line += "uses " + ", then ".join(used)
    archs = info["cuda_archs"]  # the hand-written kernels' gencodes, and the sm80 path's
    if any(machine_code_runs(a, cc) for a in archs):
        return line, None
    have = ", ".join("sm_" + a for a in archs)
    return line, (f"this GPU is sm_{cc}; the build has {have}: rebuild with DMATTN_CUDA_ARCHS={cc} "
                  f"(or \"{';'.join([*archs, str(cc)])}\" to keep the others)")


def main():
    info = dmattn_ops.build_info()
    print("dmattn_ops build")
    print(f"  built against torch  {info['torch_version']} (CUDA {info['torch_cuda'] or 'none'})")
    print(f"  running torch        {torch.__version__}")
    print(f"  backends             {', '.join(info['backends'])}")
    print(f"  CPU dtypes           {', '.join(info['cpu_dtypes'])}; any head dim >= 1")
    if "cuda" in info["backends"]:
        print(f"  CUDA archs           {', '.join('sm_' + a for a in info['cuda_archs'])}")
        print("  CUDA arch paths      in dispatch preference order (cc: compute capability, major * 10 + minor)")
        for name, path in info["cuda_arch_paths"].items():
            print(f"    {describe_path(name, path)}")
        print(f"  CUDA dtypes          {', '.join(info['cuda_dtypes'])}")
        dims = info["cuda_head_dims"]
        print(f"  CUDA head dims       {', '.join(str(d) for d in dims)} compiled; others up to {max(dims)} run padded")
        print(f"  CUDA backward        {describe_backward(info)}")
        device, warning = describe_device(info)
        print(f"  CUDA device here     {device}")
        if warning:
            print(f"  warning: {warning}")


if __name__ == "__main__":
    main()

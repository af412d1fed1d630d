# gpu_env.sh: the GPU machine's environment for this checkout, for anything a device call runs outside
# tools/run_gpu.sh's stages (a pytest selection or a tool run by hand): `source tools/gpu_env.sh` from the repository
# root, after `tools/run_gpu.sh wheels build`. run_gpu.sh sources it too.
# - The system compiler. The GPU image's default compiler (CC / CXX = /opt/gcc/...) puts libstdc++ code into what it
#   builds (std::ostream::_M_insert<long> ran from _C.abi3.so in a cuda-gdb backtrace); mixed with the process's own
#   libstdc++ that segfaulted every error message formatting an integer, and AOTInductor packages, which inductor
#   compiles with CC / CXX, segfaulted in aoti_load_package (issue 8; again in run CT and session 10's first calls,
#   whose pytest ran outside run_gpu.sh: every AOTI test, CPU ones too). DMATTN_KEEP_CC=1 keeps the environment's.
# - PYTHONPATH: this checkout (built in place, not installed) and /tmp/site (the carried wheels, run_gpu.sh's
#   `wheels` stage), each added once.
# - dmattn_ops/_meta linked to meta/ (an install maps meta/ there; an in-place build has no such package).
if [ -x /usr/bin/g++ ] && [ -z "${DMATTN_KEEP_CC:-}" ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
for _dmattn_dir in /tmp/site "$PWD"; do
  case ":${PYTHONPATH:-}:" in
    *":$_dmattn_dir:"*) ;;
    *) export PYTHONPATH=$_dmattn_dir${PYTHONPATH:+:$PYTHONPATH} ;;
  esac
done
unset _dmattn_dir
[ -e dmattn_ops/_meta ] || [ ! -d dmattn_ops ] || ln -s ../meta dmattn_ops/_meta

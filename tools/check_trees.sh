#!/usr/bin/env bash
# check_trees.sh: the checks a machine without a GPU can run on each tree of tools/make_trees.sh before a device call
# spends minutes on it: the compile-only CUDA check (tools/check_cuda_compile.py, ptxas' registers and spills of every
# kernel; SASS instruction counts too where cuobjdump is found) and the tests that compile the CUDA host headers with
# the host compiler (test_plan, test_kernel_matrix: -Werror, as CI builds them), one line of verdict per tree.
#   tools/make_trees.sh main new=some_patch && tools/check_trees.sh [--all] [ARCHS...]
# ARCHS default "80 90"; --all compiles every instantiation (minutes on two cores), else one per arch path. Logs go to
# .trees/NAME.check.log. Exit status: 1 if any tree failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3
[[ $py == */* ]] && py=$(cd "$(dirname "$py")" && pwd)/$(basename "$py")  # the trees' checks run inside each tree
all=()
if [ "${1:-}" = --all ]; then all=(--all); shift; fi
archs=(80 90)
[ "$#" -gt 0 ] && archs=("$@")
status=0
for dir in .trees/*/; do
  [ -f "$dir/setup.py" ] || continue
  name=$(basename "$dir")
  log=.trees/$name.check.log
  sass=()
  "$py" -c "import sys; sys.path.insert(0, 'tools'); import check_cuda_compile as c; sys.exit(c.find_cuobjdump() is None)" \
    2>/dev/null && sass=(--sass)
  (cd "$dir" && "$py" tools/check_cuda_compile.py --registers "${sass[@]}" "${all[@]}" --arch "${archs[@]}" \
    && "$py" -m pytest -q -p no:cacheprovider tests/test_plan.py tests/test_kernel_matrix.py) > "$log" 2>&1
  rc=$?
  spills=$(grep -c "ok, but registers spill" "$log")
  echo "check_trees: $name: $([ $rc = 0 ] && echo ok || echo FAILED) ($spills files with spills; $log)"
  [ $rc = 0 ] || status=1
done
exit $status

#!/usr/bin/env bash
# make_trees.sh: source trees for tools/run_gpu.sh's `trees` stage, each this checkout's HEAD with pending patches
# applied in order (docs/pending/*.patch, not yet run on a GPU), so one device call builds and measures them side by
# side:
#   tools/make_trees.sh main staged=staged_query_operands both=staged_query_operands+another_patch
# makes .trees/main (HEAD alone), .trees/staged and .trees/both. A NAME=PATCH[+PATCH...] argument names patches by their
# file name in docs/pending/ (with or without .patch); a bare NAME is HEAD alone. .trees is emptied first; a patch
# that does not apply stops the script. Write each tree's pytest arguments to .trees/NAME.tests (tools/run_gpu.sh);
# tools/check_trees.sh then runs the checks that need no GPU on each tree (compile, registers, host-compiled headers).
# NAME@TREE makes a switch tree (tools/run_gpu.sh): TREE's build benchmarked under .trees/NAME.env (a run-time switch)
# on .trees/NAME.workloads, both written after this script; nothing is built for it.
# Carry .trees only in the call that builds them: a later call that carries it again replaces the built trees there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ $# -ge 1 ] || { sed -n '2,11p' "${BASH_SOURCE[0]}"; exit 2; }
rm -rf .trees
mkdir -p .trees
for spec in "$@"; do
  if [[ $spec == *@* && $spec != *=* ]]; then
    echo "${spec#*@}" > ".trees/${spec%@*}.of"
    echo "make_trees: .trees/${spec%@*} = the build of .trees/${spec#*@} (a switch tree)"
    continue
  fi
  name=${spec%%=*}
  dir=.trees/$name
  mkdir -p "$dir"
  # The committed results (~5 MB of JSON and charts) stay out: the device tool carries 64 MiB in all per call, and a
  # tree's tools write their results where --out says.
  git archive HEAD | tar -x -C "$dir" --exclude=benchmarks/results
  if [[ $spec == *=* ]]; then
    # git apply inside this checkout would skip every path outside the current folder: the tree gets a repository of
    # its own while the patches go in (removed after)
    git -C "$dir" init -q
    IFS=+ read -r -a patches <<<"${spec#*=}"
    for patch in "${patches[@]}"; do
      file=docs/pending/${patch%.patch}.patch
      [ -f "$file" ] || { echo "make_trees: no $file" >&2; exit 1; }
      git -C "$dir" apply --whitespace=nowarn "$PWD/$file" || { echo "make_trees: $file does not apply" >&2; exit 1; }
    done
    rm -rf "$dir/.git"
  fi
  what=${spec#"$name"}
  echo "make_trees: .trees/$name = HEAD${what:+ + ${what#=}}"
done
du -sh .trees | sed 's/^/make_trees: /'

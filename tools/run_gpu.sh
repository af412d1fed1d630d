#!/usr/bin/env bash
# run_gpu.sh: what the GPU machine runs for dmattn_ops, in one script: install carried wheels, build the CUDA
# extension in place, print the build, run the tests, compute-sanitizer over the CUDA edge-case tests, benchmark.
#
#   tools/run_gpu.sh [STAGE...]      stages: wheels build info test sanitize bench (default: all of them, in order),
#                                    and prev / compare / host / trees / tree_test / tree_sanitize / tree_compare /
#                                    peers / pack / summary (below); any other STAGE is a Python script to run
#
# Comparing against an earlier build (no workload more than 3% slower, say): carry the earlier commit's sources in
# .prev/ (git-ignored; `rm -rf .prev && mkdir .prev && git archive COMMIT | tar -x -C .prev`), then
#   tools/run_gpu.sh wheels build prev compare
# `prev` builds .prev in place; `compare` runs tools/bench_gpu.py (dmattn_ops rows only) with each build in turn,
# alternating old / new COMPARE_ROUNDS times, and writes $OUT/compare.json, compare.png (tools/compare_builds.py);
# `host` runs tools/bench_host_overhead.py (host time per decode call) with each build, $OUT/host_<dir>.json.
#
# The GPU machine has no network: carry the wheels it lacks, fetched here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl nvidia-cutlass==4.2.0.0 expecttest
# Timings seen on one H100 host (16 cores): wheels 1 s, build (10 files x 2 variants x archs 80;90) < 1 min, test
# ~30 s (the CUDA AOTI test apart: > 200 s), sanitize ~12 s; `bench --workload prefill` alone needs ~7 minutes: the
# compiled create_block_mask of its FlexAttention peer took 388 s to compile.
#
# Environment:
#   OUT               where the built extension and benchmark results go (default: /tmp/dmattn_gpu_out)
#   LOGDIR            where the stage logs go (default: $OUT)
#   SAVE_BUILD        1 (default): copy the built _C*.so and _build_config.py to $OUT, to carry into a later call
#   COMPARE_WORKLOADS bench_gpu.py workloads of the compare stage (default: "prefill dense decode")
#   COMPARE_ROUNDS    old / new alternations of the compare stage (default: 2)
#   BENCH_EXTRA       more bench_gpu.py arguments for the compare / tree_compare runs (e.g. `--device cpu --tiny`
#                     for a dry run on a machine without a GPU; the workload "backward" runs bench_backward.py, which
#                     takes --device / --tiny / --mask-heads too, but not bench_gpu.py's other arguments)
#   PREV_DIRS         earlier source trees the prev stage builds and the host stage measures (default: .prev; the
#                     compare stage always uses .prev)
#   MAX_JOBS          parallel compile jobs (default 16)
#   DMATTN_CUDA_ARCHS archs to build (default "80;90", see setup.py)
#   WHEELS            folder of carried wheels (default .whl): nvidia-cutlass (CuTe headers), expecttest
#   TESTS             pytest arguments of the test stage, shell-quoted (default: the CUDA-parametrized tests,
#                     tests/ -k cuda; the CPU half of every test file runs in CI)
#   SANITIZE_FILES    test files of the sanitizer stage (default: tests/test_varlen_fwd.py)
#   SANITIZE_TESTS    pytest -k expression for the sanitizer stage (default: the CUDA samples, NaN padding, rows no
#                     sequence owns, lying cu_seqlens)
#   BENCH_ARGS        arguments of tools/bench_gpu.py (default: --workload all)
#   DMATTN_KEEP_CC    set to keep the environment's CC / CXX (default: /usr/bin/gcc, g++ where present)
#   DMATTN_PREBUILT   a folder holding _C*.so and _build_config.py of an earlier run (same image): used instead of
#                     building, unless DMATTN_REBUILD=1
# Several source trees in one call (branches not yet run on a GPU, each step of a stack): carry them in .trees/
# (git-ignored; `for b in BRANCH...; do mkdir -p .trees/$b && git archive $b | tar -x -C .trees/$b; done`, about
# 1-4 MB each, or HEAD with docs/pending patches: tools/make_trees.sh), then
#   tools/run_gpu.sh wheels trees summary
# `trees` builds each .trees/<name> in place (all of them at once) and runs its tests there under `timeout
# TREE_TIMEOUT` (default 300 s; pytest stops at TREE_MAXFAIL failures, default 25): the pytest arguments in
# .trees/<name>.tests if that file exists, else TREE_TESTS
# (default: tests/test_sm90a.py and the CUDA decode-kernel tests; .trees/<name>.sanitize likewise holds the arguments
# of that tree's tree_sanitize stage), with the NAME=VALUE lines of .trees/<name>.env (if
# any) set for what runs inside that tree (its build, tests, sanitizer and benchmarks); then TREE_BENCH (bench_gpu.py
# arguments, none by default) with its results in $OUT/<name>/. `tree_compare` then benchmarks the trees that passed
# (or those TREES_TO_COMPARE names, built ones whose failure is known to be unrelated) in turn (TREE_ROUNDS rounds of
# TREE_WORKLOADS: bench_gpu.py workloads, or "backward" for tools/bench_backward.py; dmattn rows only; BENCH_EXTRA adds
# arguments, e.g. `--device cpu --tiny` for a dry run) and compares each with TREE_BASE (default: the first),
# $OUT/trees_<name>_vs_<base>.json / .png:
#   echo "tests/test_sm90a.py tests/test_varlen_fwd.py -k cuda" > .trees/my-branch.tests
#   TREE_BASE=main TREE_WORKLOADS="dense window" bash tools/run_gpu.sh wheels trees tree_compare summary
# .trees/NAME.sanitize_each: tree_sanitize runs each line (pytest arguments) as a run of its own. tree_sanitize
# may run beside tree_test (`tools/run_gpu.sh tree_sanitize & tools/run_gpu.sh tree_test; wait`): memcheck's
# runs are slow and mostly on the host, the tests' shards mostly on the GPU.
# A switch tree measures a built tree's run-time switches side by side: .trees/NAME.of names the built tree,
# .trees/NAME.env the switch (a DMATTN_* variable that picks a path at run time), .trees/NAME.workloads where it acts
# (else TREE_WORKLOADS); the trees stage builds nothing for it (tools/make_trees.sh NAME@TREE).
# `tree_bench` runs bench_gpu.py with BENCH_ARGS (peers included) inside each tree of TREES_TO_CHECK, its build on
# PYTHONPATH, results in $OUT/<name>/ (a later call on a warm machine: the peers of a landed tree, say).
# `peers` runs every workload beside every peer, one bench run each (PEER_RUNS; the README's issue figures), in this
# checkout or in PEERS_TREE's build, FlexAttention's BlockMask builder chosen by the device's memory. On an H200 (the
# eager builder) main built at D = 64, 128, 256 (~200 s) and every run (~3 minutes) fit one call:
#   tools/make_trees.sh main   # .trees/main.env: DMATTN_HEAD_DIMS=64,128,256
#   LOGDIR=/tmp/l DMATTN_CUDA_ARCHS=90 TREE_DEFER_TESTS=main PEERS_TREE=main DEADLINE=540 \
#     bash tools/run_gpu.sh wheels trees peers pack summary
# On an H100 (the compiled builder) the same call runs the dense and decode workloads alone and prints the second
# call, for the warm machine, that runs the window, prefill and backward ones (~330 s before the first, ~300 of them
# the builder's compile; run EY's one call passed the device tool's 600 s there): PEERS_TREE=main
# PEER_RUNS="window=--workload window; prefill=--workload prefill; backward=backward" bash tools/run_gpu.sh peers
# pack summary. (Runs DH-DL ran the window with PEER_BLOCKMASK=eager instead: its masked Flex row then fails out of
# memory.)
# TREE_DEFER_TESTS names trees the trees stage builds but does not test (a call too short for every tree's tests:
# `tree_test` without TREE_MORE_TESTS runs their .tests in a later call, and lists those that pass in trees_ok).
# `tree_test` and `tree_sanitize` then run more pytest arguments (TREE_MORE_TESTS) or the sanitize stage
# (SANITIZE_FILES / SANITIZE_TESTS) inside each tree that passed but TREE_BASE (or those of TREES_TO_CHECK); `pack`
# tars $LOGDIR and the compares' per-round JSON and results (tree_bench's too) into $OUT/logs.tgz and bench.tgz, and
# past the 8 files the device tool returns removes the originals they hold; DEADLINE (seconds) skips the
# benchmarking stages (and the compare rounds' runs) that would start after it. One call for pending patches, say:
#   tools/make_trees.sh main new=some_patch   # here, then carry .whl .trees
#   LOGDIR=/tmp/l DMATTN_CUDA_ARCHS=90 TREE_BASE=main TREE_MORE_TESTS="tests/test_sm90a.py" \
#     SANITIZE_FILES=tests/test_staged_operands.py SANITIZE_TESTS="cuda and lying" TREE_WORKLOADS="prefill window" \
#     DEADLINE=420 bash tools/run_gpu.sh wheels trees tree_test tree_sanitize tree_compare pack summary
# Each stage logs to $LOGDIR/<stage>.log. The device tool returns at most 8 files of $OUT and the last 12,000
# characters of output: with LOGDIR outside $OUT (say /tmp/l), end with the `summary` stage, which prints each stage's
# exit line and pytest's / compute-sanitizer's verdicts and failures from every log, and the reply holds them all.
# TREE_SHARDS=4 runs the trees' and tree_test's pytest as four processes at once (tools/pytest_shards.sh), each stopped
# 15 s before TREE_TIMEOUT so its log comes back; a test running past TREE_SLOW_TEST seconds (default 120) prints its
# stack there, and the summary stage shows it.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dmattn_gpu_out}
LOGDIR=${LOGDIR:-$OUT}
mkdir -p "$OUT" "$LOGDIR"
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
STAGES=${*:-wheels build info test sanitize bench}
# Every stage uses the system compiler (the GPU image's default one made the extension and AOTInductor packages
# segfault) and finds this checkout's in-place build: tools/gpu_env.sh, which a device call's own commands source too.
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
status=0

stage() {  # stage NAME COMMAND...: runs COMMAND, tees its output to $OUT/NAME.log, records failure
  local name=$1
  shift
  echo "=== $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$LOGDIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOGDIR/$name.log"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

# tree_env NAME: exports the NAME=VALUE lines of .trees/NAME.env (if any) into the calling subshell.
tree_env() {
  local line
  [ -f ".trees/$1.env" ] || return 0
  while IFS= read -r line || [ -n "$line" ]; do
    if [[ $line =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then export "${line?}"; fi
  done < ".trees/$1.env"
}

# build_tree NAME [JOBS]: .trees/NAME's in-place build (MAX_JOBS=JOBS, default MAX_JOBS) with its .env, as stage
# build_NAME.
build_tree() {
  (tree_env "$1" && cd ".trees/$1" && MAX_JOBS=${2:-$MAX_JOBS} DMATTN_BACKENDS=cuda stage "build_$1" \
    python3 setup.py build_ext --inplace)
}

# tree_dir NAME: the folder of tree NAME: .trees/NAME, or for a switch tree (.trees/NAME.of, see the header) the
# folder of the built tree it names.
tree_dir() {
  local of
  if [ -f ".trees/$1.of" ]; then
    read -r of < ".trees/$1.of"
    echo "$PWD/.trees/$of"
  else
    echo "$PWD/.trees/$1"
  fi
}

# in_tree NAME STAGE LIMIT COMMAND...: COMMAND run inside tree NAME's folder (tree_dir), with that folder's build
# first on PYTHONPATH (a tree has no installed package) and NAME's .env, as stage STAGE under `timeout LIMIT`; 1 if
# the tree is missing.
in_tree() {
  local name=$1 stage_name=$2 limit=$3 abs
  shift 3
  abs=$(cd "$(tree_dir "$name")" && pwd) || return 1
  (tree_env "$name" && cd "$abs" && PYTHONPATH=$abs:/tmp/site stage "$stage_name" timeout "$limit" "$@")
}

# tree_args NAME EXT: the pytest arguments of .trees/NAME.EXT (tests, sanitize) on one line: they run through bash -c,
# which would take a second line for a command of its own.
tree_args() {
  tr '\n' ' ' < ".trees/$1.$2"
}
# The trees' pytest command, before its arguments (the trees and tree_test stages). TREE_MAXFAIL failures stop a
# tree's tests (default 25: run CF stopped a tree at 5, two known failures repeated over dtypes, before a whole file
# had run; TREE_TIMEOUT bounds a broken tree's time anyway).
# TREE_SHARDS=N (default 1) splits each such pytest run over N processes at once (tools/pytest_shards.sh; the maxfail
# then counts per process). Each shard stops 15 s before TREE_TIMEOUT (SHARD_TIMEOUT), so that the logs of shards
# that have not finished still come back (run CO lost four), with the stack of a test running past
# TREE_SLOW_TEST seconds (default 120: pytest's faulthandler_timeout) in its log.
TREE_PYTEST="-q --no-header -p no:cacheprovider -rs --maxfail=${TREE_MAXFAIL:-25}"
if [ "${TREE_SHARDS:-1}" -gt 1 ]; then
  shard_limit=$(( ${TREE_TIMEOUT:-300} > 30 ? ${TREE_TIMEOUT:-300} - 15 : ${TREE_TIMEOUT:-300} ))
  TREE_PYTEST="env SHARD_TIMEOUT=$shard_limit bash $PWD/tools/pytest_shards.sh $TREE_SHARDS $TREE_PYTEST \
-o faulthandler_timeout=${TREE_SLOW_TEST:-120}"
else
  TREE_PYTEST="python3 -m pytest $TREE_PYTEST"
fi

# The sanitize stages' command: compute-sanitizer memcheck over pytest of SANITIZE_FILES (word-split) -k
# SANITIZE_TESTS, the same in this tree (sanitize) and in each of .trees (tree_sanitize).
# SANITIZED_PYTEST: the same without the selection, for a tree's own (.trees/<name>.sanitize).
SANITIZED_PYTEST="compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 python3 -m pytest -q \
--no-header -p no:cacheprovider"
# shellcheck disable=SC2206
SANITIZE_CMD=($SANITIZED_PYTEST ${SANITIZE_FILES:-tests/test_varlen_fwd.py}
  -k "${SANITIZE_TESTS:-cuda and (sample_matches or nan_padding or rows_after or lying)}")

# bench_rounds DEST ROUNDS "WORKLOADS" TIMEOUT NAME=DIR...: each build in turn (DIR first on PYTHONPATH, this tree's
# bench_gpu.py), ROUNDS times, every other round in reverse order, so that drift of the machine hits each alike, the
# dmattn rows of each workload (--only dmattn --quick, plus BENCH_EXTRA), into DEST/NAME/ROUND; TIMEOUT seconds per
# run (0: none).
bench_rounds() {
  local dest=$1 rounds=$2 workloads=$3 limit=$4 round pair name w i
  shift 4
  rm -rf "$dest"
  local -a order=("$@") reversed=()
  for ((i = $# - 1; i >= 0; i--)); do reversed+=("${order[i]}"); done
  # Each build's workloads: a tree's own (.trees/NAME.workloads: a switch tree measured where its switch acts), else
  # the given ones; all of them in the given order, then those only a tree names.
  local -A ws_of=()
  local all_ws=" $workloads "
  for pair in "${order[@]}"; do
    name=${pair%%=*}
    ws_of[$name]=" $workloads "
    [ -f ".trees/$name.workloads" ] && ws_of[$name]=" $(tree_args "$name" workloads) "
    for w in ${ws_of[$name]}; do [[ $all_ws == *" $w "* ]] || all_ws+="$w "; done
  done
  for round in $(seq "$rounds"); do
    # Even rounds run the builds in reverse, so that every build's mean place in the order is the same: a drift over
    # the call (run BV: every tree ~1.5% slower than main, which always ran first) then moves no ratio.
    local -a this=("${order[@]}")
    ((round % 2 == 0)) && this=("${reversed[@]}")
    # Workload by workload, every build in turn: a workload's builds run minutes apart at most, and a DEADLINE that
    # cuts a round leaves whole workloads measured on every build.
    for w in $all_ws; do
      for pair in "${this[@]}"; do
        name=${pair%%=*}
        [[ ${ws_of[$name]} == *" $w "* ]] || continue
        # DEADLINE stops the rounds between two runs too (a round cut short still leaves the runs before it)
        if [ -n "${DEADLINE:-}" ] && [ "$SECONDS" -ge "$DEADLINE" ]; then
          echo "=== bench_${name}_${round}_$w: skipped, the DEADLINE of $DEADLINE s has passed (t = $SECONDS s)"
          return 0
        fi
        # The workload "backward" is tools/bench_backward.py (our rows alone), the others bench_gpu.py's.
        local -a tool=(tools/bench_gpu.py --workload "$w")
        [ "$w" = backward ] && tool=(tools/bench_backward.py)
        # shellcheck disable=SC2086
        (tree_env "$name" && PYTHONPATH=${pair#*=}:/tmp/site stage "bench_${name}_${round}_$w" timeout "$limit" \
          python3 "${tool[@]}" --only dmattn --quick ${BENCH_EXTRA:-} --out "$dest/$name/$round") || true
      done
    done
  done
}

for s in $STAGES; do
  # DEADLINE (seconds since this script started): the benchmarking stages that would start after it are skipped, so
  # a call that ran long still reaches pack and summary inside the device tool's time limit.
  if [ -n "${DEADLINE:-}" ] && [ "$SECONDS" -ge "$DEADLINE" ]; then
    case $s in
      bench | compare | tree_compare | host)
        echo "=== $s: skipped, the DEADLINE of $DEADLINE s has passed (t = $SECONDS s)"
        status=1
        continue
        ;;
    esac
  fi
  case $s in
    wheels)
      if ls "${WHEELS:-.whl}"/*.whl >/dev/null 2>&1; then
        stage wheels python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
          --target /tmp/site "${WHEELS:-.whl}"/*.whl
      fi
      ;;
    build)
      if [ -n "${DMATTN_PREBUILT:-}" ] && [ -z "$(ls dmattn_ops/_C*.so 2>/dev/null)" ]; then
        cp "$DMATTN_PREBUILT"/_C*.so "$DMATTN_PREBUILT"/_build_config.py dmattn_ops/
      fi
      if ls dmattn_ops/_C*.so >/dev/null 2>&1 && [ "${DMATTN_REBUILD:-0}" != 1 ] \
          && grep -q cuda dmattn_ops/_build_config.py 2>/dev/null; then
        echo "=== build: skipped (dmattn_ops/_C*.so with the CUDA backend is already here)"
      else
        rm -f dmattn_ops/_C*.so
        DMATTN_BACKENDS=cuda stage build python3 setup.py build_ext --inplace || exit 1
        [ "${SAVE_BUILD:-1}" = 1 ] && cp dmattn_ops/_C*.so dmattn_ops/_build_config.py "$OUT"/
      fi
      ;;
    prev)
      for dir in ${PREV_DIRS:-.prev}; do
        [ -f "$dir/setup.py" ] || { echo "=== prev: no $dir/setup.py (see the header)"; status=1; continue; }
        [ -e "$dir/dmattn_ops/_meta" ] || ln -s ../meta "$dir/dmattn_ops/_meta"
        (cd "$dir" && DMATTN_BACKENDS=cuda stage "prev_$(basename "$dir")" python3 setup.py build_ext --inplace) \
          || status=1
      done
      ;;
    host)
      # Host time per call on a small CUDA decode batch, for each earlier build and this one.
      for dir in ${PREV_DIRS:-.prev} .; do
        name=$(basename "$(cd "$dir" && pwd)")
        PYTHONPATH=$PWD/$dir:/tmp/site stage "host_$name" python3 tools/bench_host_overhead.py --device cuda \
          --label "$dir" --json "$OUT/host_$name.json" || true
      done
      ;;
    compare)
      bench=/tmp/dmattn_compare
      bench_rounds "$bench" "${COMPARE_ROUNDS:-2}" "${COMPARE_WORKLOADS:-prefill dense decode}" 0 \
        old="$PWD/.prev" new="$PWD"
      stage compare python3 tools/compare_builds.py --old "$bench"/old/* --new "$bench"/new/* \
        --old-label "${COMPARE_OLD_LABEL:-.prev}" --new-label "${COMPARE_NEW_LABEL:-this tree}" \
        --json "$OUT/compare.json" --chart "$OUT/compare.png"
      ;;
    info)
      stage info python3 -m dmattn_ops
      ;;
    trees)
      # Every tree's build, all at once (MAX_JOBS shared between them: one tree of one head dim took ~95 s alone on
      # the H200 host, mostly in a few nvcc jobs that leave cores idle; five at once took 72-73 s each, run CC;
      # TREE_PARALLEL_BUILDS=0 builds them in turn, with their output); then each
      # tree that built: its tests under `timeout TREE_TIMEOUT` (a hung kernel costs that much, not the call):
      # .trees/<name>.tests holds that tree's pytest arguments, else TREE_TESTS; then TREE_BENCH once. Trees that
      # built and passed (or whose selection matched no test) are listed in $LOGDIR/trees_ok, those built with their
      # tests deferred (TREE_DEFER_TESTS) in $LOGDIR/trees_deferred. .trees/<name>.env: NAME=VALUE lines set for what
      # runs inside that tree alone (build_tree, in_tree: DMATTN_HEAD_DIMS=, say: main at every head dim beside trees
      # built at one, in the same call).
      : > "$LOGDIR/trees_ok"
      : > "$LOGDIR/trees_deferred"
      dirs=()
      for dir in .trees/*/; do [ -f "$dir/setup.py" ] && dirs+=("$dir"); done
      declare -A built=()
      pids=()
      jobs_each=$(( MAX_JOBS / (${#dirs[@]} > 0 ? ${#dirs[@]} : 1) ))
      (( jobs_each < 2 )) && jobs_each=2
      for dir in "${dirs[@]}"; do
        name=$(basename "$dir")
        [ -e "$dir/dmattn_ops/_meta" ] || ln -s ../meta "$dir/dmattn_ops/_meta"
        if [ "${TREE_PARALLEL_BUILDS:-1}" = 1 ]; then
          build_tree "$name" "$jobs_each" > /dev/null &
          pids+=("$!")
        else
          build_tree "$name"
          built[$name]=$?
        fi
      done
      for i in "${!pids[@]}"; do
        name=$(basename "${dirs[i]}")
        wait "${pids[i]}"
        built[$name]=$?
        tail -n 1 "$LOGDIR/build_$name.log"
      done
      for dir in "${dirs[@]}"; do
        name=$(basename "$dir")
        [ "${built[$name]}" = 0 ] || { status=1; continue; }
        if [[ " ${TREE_DEFER_TESTS:-} " == *" $name "* ]]; then
          echo "=== test_$name: deferred (TREE_DEFER_TESTS): tree_test runs its .tests later" | tee "$LOGDIR/test_$name.log"
          echo "$name" >> "$LOGDIR/trees_deferred"
          continue
        fi
        tests=${TREE_TESTS:-tests/test_sm90a.py tests/test_decode_kernel.py -k 'cuda or decode'}
        [ -f ".trees/$name.tests" ] && tests=$(tree_args "$name" tests)
        # bash -c: the arguments may quote a -k expression
        in_tree "$name" "test_$name" "${TREE_TIMEOUT:-300}" bash -c "$TREE_PYTEST $tests"
        rc=$?
        if [ "$rc" = 0 ]; then
          echo "$name" >> "$LOGDIR/trees_ok"
        elif [ "$rc" = 5 ]; then
          # pytest's "no tests collected": a selection that matches nothing in this tree (a base tree given another
          # tree's selection, say). The tree built, so it still takes part in tree_compare; the summary shows this.
          echo "=== test_$name: the selection matched no test; the tree built, so it is compared all the same" \
            | tee -a "$LOGDIR/test_$name.log"
          echo "$name" >> "$LOGDIR/trees_ok"
        else
          status=1
        fi
        if [ -n "${TREE_BENCH:-}" ]; then
          # shellcheck disable=SC2086
          in_tree "$name" "bench_$name" "${TREE_TIMEOUT:-300}" python3 tools/bench_gpu.py $TREE_BENCH \
            --out "$OUT/$name" || status=1
        fi
      done
      ;;
    tree_compare)
      # The trees that passed (trees_ok) benchmarked in turn by bench_rounds, TREE_ROUNDS times (default 2) on each of
      # TREE_WORKLOADS (default: dense), then each against TREE_BASE (default: the first tree that passed) with
      # compare_builds.py: $OUT/trees_<name>_vs_<base>.json / .png.
      mapfile -t ok < <(cat "$LOGDIR/trees_ok" 2>/dev/null)
      # TREES_TO_COMPARE names them instead (built trees whose failing test is known to be unrelated, say)
      [ -n "${TREES_TO_COMPARE:-}" ] && read -r -a ok <<<"$TREES_TO_COMPARE"
      if [ "${#ok[@]}" -lt 1 ]; then
        # trees built with their tests deferred are not in trees_ok until tree_test passes them (run DP lost a
        # compare to this): say so, and how to compare them anyway
        deferred=$(paste -sd ' ' "$LOGDIR/trees_deferred" 2>/dev/null)
        if [ -n "$deferred" ]; then
          echo "=== tree_compare: no tree passed its tests; built with their tests deferred" \
            "(TREE_DEFER_TESTS): $deferred. Run tree_test first, or name the trees to compare in TREES_TO_COMPARE"
        else
          echo "=== tree_compare: no tree passed (run the trees stage first)"
        fi
        status=1
        continue
      fi
      base=${TREE_BASE:-${ok[0]}}
      bench=/tmp/dmattn_tree_compare
      builds=()
      for name in "${ok[@]}"; do builds+=("$name=$(tree_dir "$name")"); done
      bench_rounds "$bench" "${TREE_ROUNDS:-2}" "${TREE_WORKLOADS:-dense}" 300 \
        "${builds[@]}"
      for name in "${ok[@]}"; do
        [ "$name" = "$base" ] && continue
        stage "tree_compare_$name" python3 tools/compare_builds.py --old "$bench/$base"/* --new "$bench/$name"/* \
          --old-label "$base" --new-label "$name" --json "$OUT/trees_${name}_vs_$base.json" \
          --chart "$OUT/trees_${name}_vs_$base.png" || status=1
      done
      ;;
    summary)
      # The verdicts of every stage so far (this call's logs), short enough for the device tool's reply: with each
      # shard's exit (pytest_shards.sh) and, for a test that ran past pytest's faulthandler_timeout, the dump's
      # "Timeout" line and its frames in the test files (which test, and where it waited).
      for log in "$LOGDIR"/*.log; do
        [ -f "$log" ] || continue
        echo "--- $(basename "$log" .log)"
        grep -E -e "^(FAILED|ERROR) |[0-9]+ (passed|failed)|ERROR SUMMARY|^=== .*: exit|matched no test|^target:" \
          -e "new / old|^[a-z]+ / |^--- shard [0-9]+/[0-9]+: exit|^Timeout \\(|File \".*/tests/test_[a-z0-9_]+\\.py\", line" \
          "$log" | tail -n 25
      done
      ;;
    test)
      # bash -c: TESTS may quote a -k expression, e.g. TESTS='tests/ -k "cuda and not aoti"'
      stage test bash -c "python3 -m pytest -q --no-header -p no:cacheprovider -rs ${TESTS:-tests/ -k cuda}"
      ;;
    sanitize)
      stage sanitize "${SANITIZE_CMD[@]}"
      ;;
    tree_sanitize | tree_test)
      # The sanitize stage (SANITIZE_FILES / SANITIZE_TESTS, or the pytest arguments in .trees/<name>.sanitize where
      # that file exists: each tree's own kernels' cases), or pytest of TREE_MORE_TESTS (shell-quoted pytest
      # arguments: more tests than the trees stage ran), inside each tree of TREES_TO_CHECK (default: every tree
      # that passed the trees stage but TREE_BASE), with that tree's build first on PYTHONPATH.
      mapfile -t ok < <(cat "$LOGDIR/trees_ok" 2>/dev/null)
      for name in ${TREES_TO_CHECK:-${ok[@]}}; do
        [ -z "${TREES_TO_CHECK:-}" ] && [ "$name" = "${TREE_BASE:-}" ] && continue
        if [ "$s" = tree_sanitize ] && [ -f ".trees/$name.sanitize_each" ]; then
          # one selection per line (pytest arguments, shell-quoted), each its own run under SANITIZE_EACH_LIMIT
          # (default 120 s): several patches' picks from several test files, none of which starves the others
          i=0
          while IFS= read -r line || [ -n "$line" ]; do
            [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
            i=$((i + 1))
            in_tree "$name" "sanitize_${name}_$i" "${SANITIZE_EACH_LIMIT:-120}" bash -c "$SANITIZED_PYTEST $line" \
              || status=1
          done < ".trees/$name.sanitize_each"
        elif [ "$s" = tree_sanitize ] && [ -f ".trees/$name.sanitize" ]; then
          # that tree's own selection: pytest arguments, shell-quoted like .trees/<name>.tests
          in_tree "$name" "sanitize_$name" "${TREE_TIMEOUT:-300}" bash -c \
            "$SANITIZED_PYTEST $(tree_args "$name" sanitize)" || status=1
        elif [ "$s" = tree_sanitize ]; then
          in_tree "$name" "sanitize_$name" "${TREE_TIMEOUT:-300}" "${SANITIZE_CMD[@]}" || status=1
        else
          # TREE_MORE_TESTS, else the tree's own .trees/<name>.tests (a tree whose tests the trees stage deferred:
          # passing them lists it in trees_ok, for tree_compare), else the CUDA tests
          more=${TREE_MORE_TESTS:-tests/ -k cuda}
          [ -z "${TREE_MORE_TESTS:-}" ] && [ -f ".trees/$name.tests" ] && more=$(tree_args "$name" tests)
          if in_tree "$name" "more_tests_$name" "${TREE_TIMEOUT:-300}" bash -c "$TREE_PYTEST $more"; then
            if [ -z "${TREE_MORE_TESTS:-}" ] && ! grep -qx "$name" "$LOGDIR/trees_ok" 2>/dev/null; then
              echo "$name" >> "$LOGDIR/trees_ok"
            fi
          else
            status=1
          fi
        fi
      done
      ;;
    pack)
      # Everything this call made, in a few files of $OUT: the device tool returns at most 8 files per call, and the
      # machine may be gone before the next one. logs.tgz: $LOGDIR; bench.tgz: the compare stages' per-round JSON and
      # their comparisons ($OUT's compare*.json / trees_*.json and charts, which past three trees outnumber the 8
      # files: run CD lost one).
      # Also in bench.tgz: the results of bench / tree_bench runs one folder down ($OUT/<tree>/<workload>.json).
      # Past 8 files in $OUT (a LOGDIR inside it, say), the packed originals are removed: what comes back is then the
      # two archives and whatever neither holds (a saved build).
      tar -czf "$OUT/logs.tgz" -C "$LOGDIR" . 2>/dev/null
      out_dir=$(cd "$OUT" && pwd -P)
      log_dir=$(cd "$LOGDIR" && pwd -P)
      members=()
      packed=()
      for d in dmattn_compare dmattn_tree_compare; do [ -d "/tmp/$d" ] && members+=(-C /tmp "$d"); done
      for f in "$OUT"/compare*.json "$OUT"/compare*.png "$OUT"/trees_*.json "$OUT"/trees_*.png \
               "$OUT"/*/*.json "$OUT"/*/*.png "$OUT"/*/*.txt; do
        [ -f "$f" ] || continue
        case "$f" in "$OUT"/*/*) [ "$(cd "$(dirname "$f")" && pwd -P)" = "$log_dir" ] && continue ;; esac  # a log
        members+=(-C "$OUT" "${f#"$OUT"/}")
        packed+=("$f")
      done
      [ "${#members[@]}" -gt 0 ] && tar -czf "$OUT/bench.tgz" "${members[@]}"
      if [ "$(find "$OUT" -type f | wc -l)" -gt 8 ]; then
        [ "${#packed[@]}" -gt 0 ] && rm -f "${packed[@]}"
        # logs.tgz holds the logs: a LOGDIR inside $OUT is emptied, and with LOGDIR = $OUT its *.log files go
        if [ "$log_dir" = "$out_dir" ]; then
          rm -f "$OUT"/*.log
        else
          case "$log_dir/" in "$out_dir"/*) find "$log_dir" -type f -delete ;; esac
        fi
        find "$OUT" -mindepth 1 -type d -empty -delete
        echo "=== pack: more than 8 files in \$OUT: the packed ones removed (bench.tgz and logs.tgz hold them)"
      fi
      echo "=== pack: $(cd "$OUT" && ls)"
      ;;
    bench)
      # shellcheck disable=SC2086
      stage bench python3 tools/bench_gpu.py ${BENCH_ARGS:---workload all} --out "$OUT"
      ;;
    peers)
      # Every workload beside every peer, one bench run each (the issues' tables): PEER_RUNS, NAME=ARGS entries
      # separated by `;` (ARGS: bench_gpu.py's, or `backward ...` for bench_backward.py's), results in
      # $OUT/peers_<NAME>/, a log per run. In this checkout's build, or in PEERS_TREE's (a built tree: the
      # landed main's figures from the call that built it). FlexAttention's BlockMask builder: an entry's own
      # --flex-blockmask, else PEER_BLOCKMASK, else eager on a device of at least 120 GiB (the H200) and compiled
      # below it: on an H100 the eager builder asks for 62 GB on the prefill batch's masks (the prefill, window and
      # backward workloads' masked Flex rows, runs DJ-DL), and the compiled one takes ~300 s to compile for the
      # prefill batch once (inductor's cache serves the backward run after it: prefill before backward). DEADLINE
      # skips the runs that would start after it; PEER_TIMEOUT (default 420 s) bounds each run.
      blockmask=${PEER_BLOCKMASK:-}
      if [ -z "$blockmask" ]; then
        blockmask=$(python3 -c "import torch; p = torch.cuda.get_device_properties(0); \
print('eager' if p.total_memory >= 120 * 2**30 else 'compiled')" 2>/dev/null) || blockmask=compiled
      fi
      echo "=== peers: FlexAttention's BlockMask ${blockmask}"
      masked_runs="window=--workload window; prefill=--workload prefill; backward=backward"
      runs=${PEER_RUNS:-"dense=--workload dense; dense_d64=--workload dense --head-dim 64;\
 dense_d256=--workload dense --head-dim 256; decode=--workload decode; $masked_runs"}
      if [ -z "${PEER_RUNS:-}" ] && [ "$blockmask" = compiled ]; then
        # The compiled builder compiles ~300 s for the prefill batch's masks (the window workload's masked Flex row
        # too) before its first run: with a build before it that passes the device tool's 600 s a call (run EY). The
        # masked workloads go to a second call on the warm machine, where the built tree is still there.
        runs=${runs%"; $masked_runs"}
        echo "=== peers: the window, prefill and backward workloads left for a second call on the warm machine" \
          "(the compiled BlockMask builder's ~300 s compile): PEERS_TREE=${PEERS_TREE:-} PEER_RUNS=\"$masked_runs\"" \
          "bash tools/run_gpu.sh peers pack summary"
      fi
      IFS=';' read -r -a entries <<<"$runs"
      for entry in "${entries[@]}"; do
        entry=${entry#"${entry%%[![:space:]]*}"}  # the spaces around an entry
        entry=${entry%"${entry##*[![:space:]]}"}
        [ -n "$entry" ] || continue
        if [[ $entry != *=* ]]; then
          echo "=== peers: an entry of PEER_RUNS is NAME=ARGS, got '$entry'"
          status=1
          continue
        fi
        name=${entry%%=*}
        args=${entry#*=}
        if [ -n "${DEADLINE:-}" ] && [ "$SECONDS" -ge "$DEADLINE" ]; then
          echo "=== peers_$name: skipped, the DEADLINE of $DEADLINE s has passed (t = $SECONDS s)"
          status=1
          continue
        fi
        tool=tools/bench_gpu.py
        if [[ $args == backward || $args == "backward "* ]]; then tool=tools/bench_backward.py args=${args#backward}; fi
        # an entry's own --flex-blockmask wins (bench_gpu.py would take the last one given)
        [[ $args == *--flex-blockmask* ]] || args="$args --flex-blockmask $blockmask"
        command="python3 $tool $args --out $(printf %q "$(cd "$OUT" && pwd)/peers_$name")"
        if [ -n "${PEERS_TREE:-}" ]; then
          in_tree "$PEERS_TREE" "peers_$name" "${PEER_TIMEOUT:-420}" bash -c "$command" || status=1
        else
          stage "peers_$name" timeout "${PEER_TIMEOUT:-420}" bash -c "$command" || status=1
        fi
      done
      ;;
    tree_bench)
      # bench_gpu.py with BENCH_ARGS (every peer unless --only says otherwise) inside each tree of TREES_TO_CHECK
      # (default: every tree that passed), with that tree's build first on PYTHONPATH (a tree has no installed package:
      # without it bench_gpu.py finds no dmattn_ops), under `timeout TREE_BENCH_TIMEOUT` (default 450 s: compiling
      # FlexAttention for the prefill batch took ~310 s); results in $OUT/<name>/. TREE_BENCH_TOOL runs another
      # benchmark tool of the tree instead (e.g. tools/bench_backward.py; BENCH_ARGS are then its arguments).
      mapfile -t ok < <(cat "$LOGDIR/trees_ok" 2>/dev/null)
      for name in ${TREES_TO_CHECK:-${ok[@]}}; do
        # bash -c: BENCH_ARGS may quote a group name, e.g. --groups "key-side mask 50%"
        args=${BENCH_ARGS---workload prefill}  # set but empty: no arguments (another tool's defaults)
        in_tree "$name" "tree_bench_$name" "${TREE_BENCH_TIMEOUT:-450}" bash -c \
          "python3 ${TREE_BENCH_TOOL:-tools/bench_gpu.py} $args --out '$OUT/$name'" || status=1
      done
      ;;
    *)
      # Any other stage name is a script to run with python (e.g. a carried check script).
      stage "$(basename "$s" .py)" python3 "$s"
      ;;
  esac
done
exit $status

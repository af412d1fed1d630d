#!/usr/bin/env bash
# pytest_shards.sh N PYTEST_ARGUMENT...: `python3 -m pytest PYTEST_ARGUMENT...` split over N processes run at once
# (tests/conftest.py keeps every N-th collected test per process, DMATTN_TEST_SHARD=i/N), each with its share of the
# cores for torch's threads. The GPU runs' test files spend most of their time in CPU float64 references, so four
# processes share the 16-core GPU machine well (tools/run_gpu.sh: TREE_SHARDS; run CJ: 2,311 tests in 81 s, where
# one process had run ~5 a second). Prints each shard's output in turn (PYTHON: the interpreter, default python3);
# exits 0 if every shard passed, 5 if none collected a test, else the first failing status. SHARD_TIMEOUT (seconds)
# stops each shard after that long (exit 124), so that the script still prints every shard's log: give it a limit
# below any outer one (run CO lost the logs of four shards an outer `timeout` killed). A test that runs past
# pytest.ini's faulthandler_timeout leaves its thread's stack in the log (pass -o faulthandler_timeout=S to change it).
set -u -o pipefail
[ $# -ge 1 ] && [[ $1 =~ ^[1-9][0-9]*$ ]] || { sed -n '2,10p' "${BASH_SOURCE[0]}"; exit 2; }
[ -z "${SHARD_TIMEOUT:-}" ] || [[ $SHARD_TIMEOUT =~ ^[1-9][0-9]*$ ]] || {
  echo "pytest_shards: SHARD_TIMEOUT must be a whole number of seconds, got '$SHARD_TIMEOUT'" >&2
  exit 2
}
n=$1
shift
logs=$(mktemp -d)
threads=$(( $(nproc) / n ))
(( threads < 1 )) && threads=1
limit=()
[ -n "${SHARD_TIMEOUT:-}" ] && limit=(timeout "$SHARD_TIMEOUT")
pids=()
for ((i = 0; i < n; i++)); do
  DMATTN_TEST_SHARD=$i/$n OMP_NUM_THREADS=$threads ${limit[@]+"${limit[@]}"} "${PYTHON:-python3}" -m pytest "$@" > "$logs/$i.log" 2>&1 &
  pids+=("$!")
done
verdict=5
for ((i = 0; i < n; i++)); do
  wait "${pids[i]}"
  rc=$?
  echo "--- shard $i/$n: exit $rc"
  cat "$logs/$i.log"
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then
    [ "$verdict" -eq 0 ] || [ "$verdict" -eq 5 ] && verdict=$rc
  elif [ "$rc" -eq 0 ] && [ "$verdict" -eq 5 ]; then
    verdict=0
  fi
done
rm -rf "$logs"
exit "$verdict"

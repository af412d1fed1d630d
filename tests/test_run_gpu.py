"""tools/run_gpu.sh's `trees` stage on stand-in trees (no GPU, no compiler): every tree builds at once with MAX_JOBS
shared between them and its own .trees/<name>.env, a tree whose build fails is left out, and the trees that built
and passed their tests are listed for tree_compare (trees_ok). Its `tree_sanitize` stage: each tree's own selection.
Its `pack` stage: every comparison lands in bench.tgz too."""

import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A stand-in setup.py: records the MAX_JOBS and DMATTN_HEAD_DIMS its build was given, then succeeds or fails as
# named.
SETUP = """import os, sys
with open("max_jobs.txt", "w") as f:
    f.write(os.environ.get("MAX_JOBS", ""))
with open("head_dims.txt", "w") as f:
    f.write(os.environ.get("DMATTN_HEAD_DIMS", "unset"))
sys.exit({rc})
"""


# A stand-in test: records the DMATTN_HEAD_DIMS it ran under.
SMOKE = """import os
def test_smoke():
    with open("test_head_dims.txt", "w") as f:
        f.write(os.environ.get("DMATTN_HEAD_DIMS", "unset"))
"""


def _checkout(tmp_path):
    """A checkout holding tools/run_gpu.sh and the environment it sources, alone."""
    os.makedirs(tmp_path / "tools")
    for script in ("run_gpu.sh", "gpu_env.sh"):
        shutil.copy(os.path.join(ROOT, "tools", script), tmp_path / "tools")


def _stage_env(tmp_path, first_on_path=(), **extra):
    """The environment run_gpu.sh's stages run under here: logs in tmp_path/logs, results in tmp_path/out, the
    environment's compiler kept (DMATTN_KEEP_CC), this interpreter's folder on PATH after first_on_path's; and extra."""
    path = os.pathsep.join([*map(str, first_on_path), os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return dict(os.environ, LOGDIR=str(tmp_path / "logs"), OUT=str(tmp_path / "out"), DMATTN_KEEP_CC="1", PATH=path,
                **extra)


def _trees(tmp_path, builds):
    """A checkout holding tools/run_gpu.sh and .trees/<name> for each (name, build exit status)."""
    _checkout(tmp_path)
    for name, rc in builds.items():
        tree = tmp_path / ".trees" / name
        for folder in ("dmattn_ops", "meta", "tests"):
            os.makedirs(tree / folder)
        (tree / "setup.py").write_text(SETUP.format(rc=rc))
        (tree / "tests" / "test_smoke.py").write_text(SMOKE)


@pytest.mark.skipif(shutil.which("bash") is None, reason="run_gpu.sh is a bash script")
@pytest.mark.parametrize("parallel", ["1", "0"], ids=["at_once", "in_turn"])
def test_trees_stage_builds_every_tree_and_lists_those_that_passed(tmp_path, parallel):
    builds = {"a": 0, "b": 1, "c": 0}
    _trees(tmp_path, builds)
    # Tree a's own environment (.trees/a.env): its build and tests see DMATTN_HEAD_DIMS empty (every head dim) where
    # the call's is 128; a line that is no NAME=VALUE is ignored.
    (tmp_path / ".trees" / "a.env").write_text("# main at every head dim\nDMATTN_HEAD_DIMS=\n")
    env = _stage_env(tmp_path, MAX_JOBS="12", TREE_TESTS="tests/test_smoke.py", TREE_PARALLEL_BUILDS=parallel,
                     DMATTN_HEAD_DIMS="128")
    done = subprocess.run(["bash", "tools/run_gpu.sh", "trees"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr  # tree b's build failed
    assert (tmp_path / "logs" / "trees_ok").read_text().split() == ["a", "c"]
    # At once, the three builds share MAX_JOBS (12 / 3 each); in turn, each has all of it.
    jobs = {name: (tmp_path / ".trees" / name / "max_jobs.txt").read_text() for name in builds}
    assert jobs == {name: "4" if parallel == "1" else "12" for name in builds}
    dims = {name: (tmp_path / ".trees" / name / "head_dims.txt").read_text() for name in builds}
    assert dims == {"a": "", "b": "128", "c": "128"}
    tested = {name: (tmp_path / ".trees" / name / "test_head_dims.txt").read_text() for name in ("a", "c")}
    assert tested == {"a": "", "c": "128"}
    assert "=== build_b: exit 1" in (tmp_path / "logs" / "build_b.log").read_text()
    assert not (tmp_path / "logs" / "test_b.log").exists()  # a tree that did not build is not tested


@pytest.mark.skipif(shutil.which("bash") is None, reason="run_gpu.sh is a bash script")
def test_deferred_trees_are_built_now_and_tested_later(tmp_path):
    """TREE_DEFER_TESTS: the trees stage builds tree c but leaves its tests (and trees_ok) for later; tree_test
    without TREE_MORE_TESTS then runs c's own .trees/c.tests and, passing, lists c in trees_ok for tree_compare. A
    .tests file may hold its arguments on several lines (a's, run by the trees stage; c's, by tree_test)."""
    _trees(tmp_path, {"a": 0, "c": 0})
    (tmp_path / ".trees" / "a.tests").write_text("tests/test_smoke.py\n-k smoke\n")
    (tmp_path / ".trees" / "c.tests").write_text("tests/test_smoke.py\n-k smoke\n")
    env = _stage_env(tmp_path, TREE_TESTS="tests/test_smoke.py", TREE_DEFER_TESTS="c")
    done = subprocess.run(["bash", "tools/run_gpu.sh", "trees"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / ".trees" / "c" / "max_jobs.txt").exists()  # built
    assert not (tmp_path / ".trees" / "c" / "test_head_dims.txt").exists()  # not tested
    assert (tmp_path / "logs" / "trees_ok").read_text().split() == ["a"]
    assert "1 passed" in (tmp_path / "logs" / "test_a.log").read_text()
    assert "deferred" in (tmp_path / "logs" / "test_c.log").read_text()
    env.pop("TREE_DEFER_TESTS")
    done = subprocess.run(["bash", "tools/run_gpu.sh", "tree_test"], cwd=tmp_path,
                          env=dict(env, TREES_TO_CHECK="c"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / ".trees" / "c" / "test_head_dims.txt").exists()
    assert "1 passed" in (tmp_path / "logs" / "more_tests_c.log").read_text()
    assert (tmp_path / "logs" / "trees_ok").read_text().split() == ["a", "c"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="run_gpu.sh is a bash script")
def test_tree_compare_names_the_trees_whose_tests_were_deferred(tmp_path):
    """Trees built with their tests deferred are not in trees_ok: tree_compare then compares nothing, and says which
    trees those are and how to compare them (run DP's call spent a build on that message's older form)."""
    _trees(tmp_path, {"main": 0, "new": 0})
    env = _stage_env(tmp_path, TREE_TESTS="tests/test_smoke.py", TREE_DEFER_TESTS="main new")
    done = subprocess.run(["bash", "tools/run_gpu.sh", "trees", "tree_compare"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert (tmp_path / "logs" / "trees_deferred").read_text().split() == ["main", "new"]
    assert "built with their tests deferred (TREE_DEFER_TESTS): main new." in done.stdout
    assert "TREES_TO_COMPARE" in done.stdout


# A stand-in compute-sanitizer: records its arguments in the folder it runs in, then runs the command after its own
# options (the python3 ... of the real one).
SANITIZER = """#!/usr/bin/env bash
printf '%s\\n' "$*" > sanitizer_args.txt
shift 6
exec "$@"
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="run_gpu.sh is a bash script")
def test_tree_sanitize_stage_takes_each_trees_own_selection(tmp_path):
    """tree_sanitize runs compute-sanitizer over pytest in each tree: with the pytest arguments of
    .trees/<name>.sanitize where that file exists (a -k expression quoted as in .trees/<name>.tests), else
    SANITIZE_FILES / SANITIZE_TESTS."""
    _trees(tmp_path, {"a": 0, "c": 0})
    bin_dir = tmp_path / "bin"
    os.makedirs(bin_dir)
    (bin_dir / "compute-sanitizer").write_text(SANITIZER)
    os.chmod(bin_dir / "compute-sanitizer", 0o755)
    (tmp_path / ".trees" / "a.sanitize").write_text("tests/test_smoke.py -k 'smoke and not nothing'\n")
    # tree d: two selections, each a run of its own (a comment and a blank line skipped)
    shutil.copytree(tmp_path / ".trees" / "c", tmp_path / ".trees" / "d")
    (tmp_path / ".trees" / "d.sanitize_each").write_text(
        "# two picks\ntests/test_smoke.py -k 'smoke'\n\ntests/test_smoke.py -k 'smoke or nothing'\n")
    env = _stage_env(tmp_path, first_on_path=[bin_dir], TREES_TO_CHECK="a c d", SANITIZE_FILES="tests/test_smoke.py",
                     SANITIZE_TESTS="smoke")
    done = subprocess.run(["bash", "tools/run_gpu.sh", "tree_sanitize"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    args = {name: (tmp_path / ".trees" / name / "sanitizer_args.txt").read_text().strip() for name in ("a", "c")}
    common = "--tool memcheck --error-exitcode 1 --print-limit 20 python3 -m pytest -q --no-header -p no:cacheprovider"
    assert args == {"a": f"{common} tests/test_smoke.py -k smoke and not nothing",
                    "c": f"{common} tests/test_smoke.py -k smoke"}
    for name in ("a", "c"):
        assert "1 passed" in (tmp_path / "logs" / f"sanitize_{name}.log").read_text()
    for i, pick in ((1, "smoke"), (2, "smoke or nothing")):
        started = next(line for line in done.stdout.splitlines() if line.startswith(f"=== sanitize_d_{i}: "))
        assert started.endswith(f"{common} tests/test_smoke.py -k '{pick}'"), started
        assert "1 passed" in (tmp_path / "logs" / f"sanitize_d_{i}.log").read_text()
    assert not (tmp_path / "logs" / "sanitize_d_3.log").exists()


def _pack(tmp_path, out, logs):
    """run_gpu.sh's pack stage in the checkout at tmp_path, with OUT and LOGDIR set; it must succeed."""
    env = dict(os.environ, LOGDIR=str(logs), OUT=str(out), DMATTN_KEEP_CC="1")
    done = subprocess.run(["bash", "tools/run_gpu.sh", "pack"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="run_gpu.sh is a bash script")
def test_pack_stage_keeps_every_comparison_in_one_file(tmp_path):
    """The device tool returns at most 8 files of $OUT: with four trees compared, logs.tgz, bench.tgz and the eight
    trees_* files are ten, so bench.tgz holds the comparisons as well."""
    _checkout(tmp_path)
    out, logs = tmp_path / "out", tmp_path / "logs"
    os.makedirs(out)
    os.makedirs(logs)
    (logs / "stage.log").write_text("=== stage: exit 0 after 1 s\n")
    made = [f"trees_{name}_vs_main.{ext}" for name in ("a", "b", "c", "d") for ext in ("json", "png")]
    for name in made:
        (out / name).write_text(name)
    _pack(tmp_path, out, logs)
    with tarfile.open(out / "bench.tgz") as tar:
        names = set(tar.getnames())
    assert set(made) <= names, names
    with tarfile.open(out / "logs.tgz") as tar:
        assert "./stage.log" in tar.getnames()


@pytest.mark.skipif(shutil.which("bash") is None, reason="run_gpu.sh is a bash script")
@pytest.mark.parametrize("logs_inside", [True, False])
def test_pack_stage_leaves_at_most_eight_files_with_everything_in_them(tmp_path, logs_inside):
    """Past 8 files in $OUT (a LOGDIR inside it, a tree_bench folder per tree: run DB-DC lost the switch trees'
    comparisons and logs that way), pack removes what its archives hold, so the two archives come back; a tree_bench
    folder's results are in bench.tgz. With few files, the originals stay beside the archives."""
    _checkout(tmp_path)
    out = tmp_path / "out"
    logs = out / "l" if logs_inside else tmp_path / "logs"
    os.makedirs(logs)
    for i in range(10):
        (logs / f"stage_{i}.log").write_text(f"=== stage_{i}: exit 0 after 1 s\n")
    (logs / "trees_ok").write_text("main\n")
    os.makedirs(out / "main")
    made = ["trees_a_vs_main.json", "trees_a_vs_main.png", "main/dense.json", "main/dense.png"]
    for name in made:
        (out / name).write_text(name)
    _pack(tmp_path, out, logs)
    with tarfile.open(out / "bench.tgz") as tar:
        assert set(made) <= set(tar.getnames()), tar.getnames()
    with tarfile.open(out / "logs.tgz") as tar:
        assert {"./stage_0.log", "./stage_9.log", "./trees_ok"} <= set(tar.getnames())
    left = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    if logs_inside:
        assert left == ["bench.tgz", "logs.tgz"], left
    else:
        assert left == sorted(["bench.tgz", "logs.tgz", *made]), left


def _collected(output):
    return sorted(line for line in output.splitlines() if "::" in line)


@pytest.mark.skipif(shutil.which("bash") is None, reason="pytest_shards.sh is a bash script")
def test_pytest_shards_split_a_selection_with_none_left_out_or_twice():
    args = ["--co", "-q", "-p", "no:cacheprovider", "tests/test_compare_builds.py", "tests/test_run_gpu.py"]
    whole = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=ROOT, capture_output=True, text=True)
    shards = subprocess.run(["bash", "tools/pytest_shards.sh", "3", *args], cwd=ROOT, capture_output=True, text=True,
                            env=dict(os.environ, PYTHON=sys.executable))
    assert whole.returncode == 0 and shards.returncode == 0, shards.stdout + shards.stderr
    assert [f"--- shard {i}/3: exit" in shards.stdout for i in range(3)] == [True] * 3
    ids = _collected(shards.stdout)
    assert len(ids) == len(set(ids)), "a test ran in two shards"
    assert ids == _collected(whole.stdout)


@pytest.mark.skipif(shutil.which("bash") is None, reason="pytest_shards.sh is a bash script")
def test_pytest_shards_keep_a_tests_kernel_paths_in_one_shard():
    """test_sm90a.py's variants of a test over its kernel paths (the `arch` fixture, the `path` parameter) and
    test_backward.py's CUDA modes each check one sample against one memoized reference: the shards keep them together
    (conftest.SAME_SAMPLE_PARAMS), and split the files with none left out or twice."""
    paths = {"auto", "sm80", "persistent3", "per_unit",  # test_sm90a.ARCHS
             "kernel", "kernel_ordered", "kernel_atomic", "kernel_deterministic", "blockwise"}  # CUDA_BACKWARDS
    args = ["--co", "-q", "-p", "no:cacheprovider", "tests/test_sm90a.py", "tests/test_backward.py", "-k",
            "key_side or d256 or test_cuda_gradients_match_reference"]
    whole = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=ROOT, capture_output=True, text=True)
    shards = subprocess.run(["bash", "tools/pytest_shards.sh", "3", *args], cwd=ROOT, capture_output=True, text=True,
                            env=dict(os.environ, PYTHON=sys.executable))
    assert whole.returncode == 0 and shards.returncode == 0, shards.stdout + shards.stderr
    assert _collected(shards.stdout) == _collected(whole.stdout)
    shard_of, variants = {}, {}
    for i, log in enumerate(shards.stdout.split("--- shard ")[1:]):
        for test in _collected(log):
            name, _, ids = test.partition("[")
            group = (name, tuple(part for part in ids.rstrip("]").split("-") if part not in paths))
            shard_of.setdefault(group, set()).add(i)
            variants[group] = variants.get(group, 0) + 1
    assert all(len(shards_) == 1 for shards_ in shard_of.values())
    assert sum(n == 4 for n in variants.values()) >= 20  # the four paths of many tests
    assert sum(n == 5 for n in variants.values()) >= 20  # the five backward modes of many samples
    assert len({i for shards_ in shard_of.values() for i in shards_}) == 3


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="pytest_shards.sh is a bash script; SHARD_TIMEOUT uses coreutils' timeout")
def test_shard_timeout_stops_each_shard_and_still_prints_every_log(tmp_path):
    slow = tmp_path / "test_slow.py"
    slow.write_text("import time\n\ndef test_sleeps():\n    print('started', flush=True)\n    time.sleep(60)\n")
    env = dict(os.environ, PYTHON=sys.executable, SHARD_TIMEOUT="3")
    done = subprocess.run(["bash", "tools/pytest_shards.sh", "2", "-q", "-s", "-p", "no:cacheprovider", str(slow)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=50)
    assert done.returncode == 124, done.stdout + done.stderr
    for i in range(2):
        assert f"--- shard {i}/2: exit 124" in done.stdout
    assert done.stdout.count("started") == 2  # each stopped shard's own log is printed


def test_a_malformed_shard_timeout_is_a_usage_error():
    env = dict(os.environ, SHARD_TIMEOUT="soon")
    done = subprocess.run(["bash", "tools/pytest_shards.sh", "2", "--co"], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 2
    assert "SHARD_TIMEOUT must be a whole number of seconds, got 'soon'" in done.stderr


def test_a_malformed_shard_is_a_usage_error_naming_the_variable():
    env = dict(os.environ, DMATTN_TEST_SHARD="3/3")
    done = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider",
                           "tests/test_compare_builds.py"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 4, done.stdout + done.stderr  # pytest's usage error
    assert "DMATTN_TEST_SHARD: expected i/n with 0 <= i < n, got '3/3'" in done.stdout + done.stderr


def test_trace_backward_case_runs_a_sample_stage_by_stage_on_the_cpu():
    """tools/trace_backward_case.py (the GPU machine's stage-by-stage check of one backward sample) as a CPU dry run:
    every stage reports, deterministic mode with the fill off included, and the gradients pass the tests' rule."""
    done = subprocess.run([sys.executable, "tools/trace_backward_case.py", "window_decode", "--device", "cpu",
                           "--dtype", "float32", "--deterministic", "--no-fill", "--env", "DMATTN_BWD_DQ=atomic"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "deterministic=True, fill=False" in done.stdout
    for stage in ("forward", "backward", "float64 reference", "same-dtype reference"):
        assert f"{stage}: done in" in done.stdout, stage
    assert "gradients match the reference" in done.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="gpu_env.sh is a bash script")
def test_gpu_env_sets_the_system_compiler_and_this_checkout_once(tmp_path):
    """tools/gpu_env.sh, which a device call's own commands source (an AOTI test run outside run_gpu.sh's stages with
    the image's compiler segfaulted): the system compiler unless DMATTN_KEEP_CC, this checkout and /tmp/site on
    PYTHONPATH once however often it is sourced, and dmattn_ops/_meta linked to meta/."""
    _checkout(tmp_path)
    os.makedirs(tmp_path / "dmattn_ops")
    os.makedirs(tmp_path / "meta")
    show = 'source tools/gpu_env.sh; source tools/gpu_env.sh; echo "CXX=${CXX:-}"; echo "PYTHONPATH=$PYTHONPATH"'
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "DMATTN_KEEP_CC")}
    env["PYTHONPATH"] = "/elsewhere"
    done = subprocess.run(["bash", "-c", show], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = dict(line.split("=", 1) for line in done.stdout.splitlines())
    assert lines["PYTHONPATH"] == f"{tmp_path}:/tmp/site:/elsewhere"
    assert lines["CXX"] == ("/usr/bin/g++" if os.access("/usr/bin/g++", os.X_OK) else "")
    assert os.readlink(tmp_path / "dmattn_ops" / "_meta") == "../meta"
    kept = subprocess.run(["bash", "-c", show], cwd=tmp_path, env=dict(env, DMATTN_KEEP_CC="1", CXX="/opt/cxx"),
                          capture_output=True, text=True)
    assert "CXX=/opt/cxx" in kept.stdout


# A stand-in benchmark tool (tools/bench_gpu.py / bench_backward.py): records in its --out folder which build it ran
# (the first PYTHONPATH entry), its workload and the switch it ran under.
BENCH = """import argparse, json, os, sys, time
time.sleep(float(os.environ.get("BENCH_SLEEP", "0")))
ap = argparse.ArgumentParser()
ap.add_argument("--workload", default="backward")
ap.add_argument("--out")
args, _ = ap.parse_known_args()
os.makedirs(args.out, exist_ok=True)
with open(os.path.join(args.out, args.workload + ".ran"), "w") as f:
    json.dump(dict(build=os.environ["PYTHONPATH"].split(os.pathsep)[0],
                   switch=os.environ.get("DMATTN_SWITCH", "unset")), f)
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="run_gpu.sh is a bash script")
def test_a_switch_tree_runs_another_trees_build_under_its_own_env_and_workloads(tmp_path):
    """tree_compare of a switch tree (.trees/sw.of naming the built tree `all`): sw's benchmarks run all's build, with
    sw's .env set (the switch) and on sw's own workloads (.trees/sw.workloads); `all` itself runs TREE_WORKLOADS with
    the switch unset."""
    _checkout(tmp_path)
    for tool in ("bench_gpu.py", "bench_backward.py"):
        (tmp_path / "tools" / tool).write_text(BENCH)
    (tmp_path / "tools" / "compare_builds.py").write_text("")
    os.makedirs(tmp_path / ".trees" / "all")
    (tmp_path / ".trees" / "sw.of").write_text("all\n")
    (tmp_path / ".trees" / "sw.env").write_text("DMATTN_SWITCH=on\n")
    (tmp_path / ".trees" / "sw.workloads").write_text("decode backward\n")
    env = _stage_env(tmp_path, TREES_TO_COMPARE="all sw", TREE_BASE="all", TREE_WORKLOADS="dense decode",
                     TREE_ROUNDS="1")
    env.pop("DMATTN_SWITCH", None)
    done = subprocess.run(["bash", "tools/run_gpu.sh", "tree_compare"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    bench = "/tmp/dmattn_tree_compare"
    ran = {}
    for name in ("all", "sw"):
        for path in glob.glob(os.path.join(bench, name, "1", "*.ran")):
            with open(path) as f:
                ran[name, os.path.basename(path).removesuffix(".ran")] = json.load(f)
    build = str(tmp_path / ".trees" / "all")
    # workload by workload: dense (all), then decode (all, sw), then backward (sw alone)
    runs = [line.split()[1].rstrip(":") for line in done.stdout.splitlines() if line.startswith("=== bench_")
            and ": exit" not in line]
    assert runs == ["bench_all_1_dense", "bench_all_1_decode", "bench_sw_1_decode", "bench_sw_1_backward"]
    assert ran == {("all", "dense"): dict(build=build, switch="unset"),
                   ("all", "decode"): dict(build=build, switch="unset"),
                   ("sw", "decode"): dict(build=build, switch="on"),
                   ("sw", "backward"): dict(build=build, switch="on")}
    # A DEADLINE passed during the first run: the rounds stop before the second, and the stage still ends in order.
    # (a DEADLINE of 4 s: the script's own start took over a second on a busy two-core machine)
    done = subprocess.run(["bash", "tools/run_gpu.sh", "tree_compare"], cwd=tmp_path,
                          env=dict(env, DEADLINE="4", BENCH_SLEEP="5"), capture_output=True, text=True, timeout=120)
    assert "bench_all_1_decode: skipped, the DEADLINE of 4 s has passed" in done.stdout, done.stdout + done.stderr
    assert os.listdir(os.path.join(bench, "all", "1")) == ["dense.ran"]
    assert not os.path.exists(os.path.join(bench, "sw"))


# A stand-in for both bench tools in the peers stage: records its tool, its arguments and the build it found.
PEER_BENCH = """import json, os, sys
out = sys.argv[sys.argv.index("--out") + 1]
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "ran.json"), "w") as f:
    json.dump(dict(tool=os.path.relpath(os.path.abspath(sys.argv[0]), os.environ["CHECKOUT"]),
                   args=sys.argv[1:sys.argv.index("--out")], build=os.environ["PYTHONPATH"].split(os.pathsep)[0]), f)
"""


def _peers(tmp_path, **env):
    """run_gpu.sh's peers stage in a checkout with stand-in bench tools (and a tree `main` holding them too)."""
    _checkout(tmp_path)
    tree = tmp_path / ".trees" / "main"
    for root in (tmp_path, tree):
        os.makedirs(root / "tools", exist_ok=True)
        for tool in ("bench_gpu.py", "bench_backward.py"):
            (root / "tools" / tool).write_text(PEER_BENCH)
    out = tmp_path / "out"
    env = _stage_env(tmp_path, CUDA_VISIBLE_DEVICES="", CHECKOUT=str(tmp_path), **env)
    done = subprocess.run(["bash", "tools/run_gpu.sh", "peers"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    ran = {}
    for path in glob.glob(str(out / "peers_*" / "ran.json")):
        with open(path) as f:
            ran[os.path.basename(os.path.dirname(path)).removeprefix("peers_")] = json.load(f)
    return done, ran


@pytest.mark.skipif(shutil.which("bash") is None, reason="run_gpu.sh is a bash script")
def test_peers_stage_runs_each_entry_with_its_tool_and_the_blockmask_builder(tmp_path):
    """PEER_RUNS' entries each run once with their own arguments, `backward` by bench_backward.py, every one with the
    BlockMask builder (compiled where no device of >= 120 GiB is seen, PEER_BLOCKMASK else, an entry's own
    --flex-blockmask first), results in $OUT/peers_<name>; PEERS_TREE runs them with that tree's tools and build."""
    runs = ("dense=--workload dense; d64=--workload dense --head-dim 64 ;backward=backward; "
            "win=--workload window --flex-blockmask eager")
    done, ran = _peers(tmp_path, PEER_RUNS=runs)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "BlockMask compiled" in done.stdout
    here = str(tmp_path)
    assert ran == {
        "dense": dict(tool="tools/bench_gpu.py", args=["--workload", "dense", "--flex-blockmask", "compiled"],
                      build=here),
        "d64": dict(tool="tools/bench_gpu.py", args=["--workload", "dense", "--head-dim", "64", "--flex-blockmask",
                                                     "compiled"], build=here),
        "backward": dict(tool="tools/bench_backward.py", args=["--flex-blockmask", "compiled"], build=here),
        "win": dict(tool="tools/bench_gpu.py", args=["--workload", "window", "--flex-blockmask", "eager"],
                    build=here)}
    done, ran = _peers(tmp_path / "tree", PEER_RUNS="window=--workload window", PEERS_TREE="main",
                       PEER_BLOCKMASK="eager")
    assert done.returncode == 0, done.stdout + done.stderr
    assert ran == {"window": dict(tool=".trees/main/tools/bench_gpu.py",
                                  args=["--workload", "window", "--flex-blockmask", "eager"],
                                  build=str(tmp_path / "tree" / ".trees" / "main"))}


@pytest.mark.skipif(shutil.which("bash") is None, reason="run_gpu.sh is a bash script")
def test_peers_stage_refuses_an_entry_without_a_name(tmp_path):
    """An entry without NAME= is reported and fails the stage; the others still run (`backward_x` is a name, not the
    backward tool)."""
    done, ran = _peers(tmp_path, PEER_RUNS="--workload dense; backward_x=--workload decode")
    assert done.returncode == 1
    assert "an entry of PEER_RUNS is NAME=ARGS, got '--workload dense'" in done.stdout
    assert ran == {"backward_x": dict(tool="tools/bench_gpu.py", args=["--workload", "decode", "--flex-blockmask",
                                                                      "compiled"], build=str(tmp_path))}


@pytest.mark.skipif(shutil.which("bash") is None, reason="run_gpu.sh is a bash script")
def test_peers_stage_default_runs_every_workload_and_deadline_skips_them(tmp_path):
    """Unset, PEER_RUNS covers every workload of the issues' tables (dense at three head dims, decode, window,
    prefill, then backward) with the eager BlockMask builder (a device of >= 120 GiB, here PEER_BLOCKMASK). With the
    compiled one (a smaller device, here no device at all) it runs dense and decode and prints the second call that
    runs the rest (its ~300 s compile would pass the device tool's limit on a call). A passed DEADLINE skips every run
    and fails."""

    def order(done):
        return [line.split()[1].rstrip(":") for line in done.stdout.splitlines()
                if line.startswith("=== peers_") and ": exit" not in line]

    done, ran = _peers(tmp_path, PEER_BLOCKMASK="eager")
    assert done.returncode == 0, done.stdout + done.stderr
    assert order(done) == ["peers_dense", "peers_dense_d64", "peers_dense_d256", "peers_decode", "peers_window",
                           "peers_prefill", "peers_backward"]
    assert ran["dense_d256"]["args"][:4] == ["--workload", "dense", "--head-dim", "256"]
    done, ran = _peers(tmp_path / "small", PEERS_TREE="main")
    assert done.returncode == 0, done.stdout + done.stderr
    assert order(done) == ["peers_dense", "peers_dense_d64", "peers_dense_d256", "peers_decode"]
    assert ('PEERS_TREE=main PEER_RUNS="window=--workload window; prefill=--workload prefill; backward=backward" '
            "bash tools/run_gpu.sh peers pack summary") in done.stdout
    done, ran = _peers(tmp_path / "late", DEADLINE="0")
    assert done.returncode == 1 and ran == {}
    assert "peers_dense: skipped, the DEADLINE of 0 s has passed" in done.stdout

"""tools/bench_common.py's record of the GPU's state in every benchmark JSON (clock and power caps, the state right
after the timed calls), read from nvidia-smi one field at a time: each field named, a field the driver refuses left
out, and None where nvidia-smi is absent, never an exception (a benchmark must not die for its metadata). No device:
a stand-in nvidia-smi on PATH."""

import os
import stat

import bench_common as bc

# The stand-in answers each --query-gpu=FIELD with a value, except the fields named in $REFUSE.
_SCRIPT = """#!/bin/sh
field=${1#--query-gpu=}
case " $REFUSE " in *" $field "*) echo "Field \\"$field\\" is not a valid field to query."; exit 2 ;; esac
echo "value of $field"
"""


def _fake_nvidia_smi(tmp_path, monkeypatch, refuse=""):
    script = tmp_path / "nvidia-smi"
    script.write_text(_SCRIPT)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("REFUSE", refuse)


def test_gpu_state_names_each_field(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, monkeypatch)
    assert bc._nvidia_smi_state() == {field: f"value of {field}" for field in bc._GPU_STATE_FIELDS}


def test_a_field_the_driver_refuses_is_left_out(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, monkeypatch, refuse="clocks_event_reasons.active power.draw")
    state = bc._nvidia_smi_state()
    assert set(state) == set(bc._GPU_STATE_FIELDS) - {"clocks_event_reasons.active", "power.draw"}


def test_gpu_state_is_none_when_no_field_answers(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, monkeypatch, refuse=" ".join(bc._GPU_STATE_FIELDS))
    assert bc._nvidia_smi_state() is None


def test_gpu_state_is_none_without_nvidia_smi(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no nvidia-smi
    assert bc._nvidia_smi_state() is None

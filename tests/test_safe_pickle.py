"""Untrusted pickles: every pickle the converter, `inspect` and `verify` read goes through one allow-list
(dist_reshard/formats/safe_pickle.py). Real Megatron state (tensors with attributes, Parameters, args with enums,
numpy RNG state) reads as metadata; a payload in any file kind is refused by name before it can run."""

import argparse
import builtins
import glob
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from conftest import ROOT, run_cases
from dist_reshard.base.errors import ConversionError
from dist_reshard.formats.manifest import file_digest, read_manifest, write_manifest
from dist_reshard.formats.safe_pickle import TensorRef, UnsafePickle, load_pt, read_dcp_metadata, read_pt_metadata


class Payload:
    """What an attacker stores: an object whose unpickling calls `func(*args)`."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _gadgets(marker: str) -> dict[str, Payload]:
    """Callables that run code, touch files or load more pickles, by the global a pickle names them with."""
    import subprocess as sp

    cmd = f"touch {marker}"
    return {
        "posix.system": Payload(os.system, cmd),
        "builtins.eval": Payload(builtins.eval, f"__import__('os').system({cmd!r})"),
        "builtins.exec": Payload(builtins.exec, f"__import__('os').system({cmd!r})"),
        "builtins.__import__": Payload(builtins.__import__, "os"),
        "builtins.getattr": Payload(getattr, argparse.Namespace, "__init__"),
        "subprocess.Popen": Payload(sp.Popen, ["touch", marker]),
        "shutil.rmtree": Payload(shutil.rmtree, marker + ".dir"),
        "pickle.loads": Payload(pickle.loads, pickle.dumps(1)),
        "torch.serialization.load": Payload(torch.load, marker),
    }


def _megatron_like_state(params_dtype=torch.bfloat16):
    """What a bf16 Megatron-LM run saves: Parameters and fp32 master copies with Megatron's attributes,
    args holding a torch dtype and enums, RNG state with numpy arrays."""
    weight = torch.nn.Parameter(torch.arange(12, dtype=torch.bfloat16).view(3, 4))
    weight.tensor_model_parallel, weight.partition_dim, weight.partition_stride = True, 0, 1
    master = torch.arange(12, dtype=torch.float32).view(3, 4) + 0.5
    master.tensor_model_parallel, master.partition_dim = True, 0
    np_state = np.random.RandomState(3).get_state()
    from megatron.core.transformer.enums import AttnBackend

    args = argparse.Namespace(params_dtype=params_dtype, exit_signal=signal.SIGTERM, attention_backend=AttnBackend.auto,
                              ranks={1, 2}, window=slice(1, 3))
    import io

    return {"model": {"w": weight, "norm": torch.ones(4), "w._extra_state": io.BytesIO(b"te fp8 meta"),
                      "v._extra_state": torch.frombuffer(bytearray(b"newer te"), dtype=torch.uint8)},
            "optimizer": {"fp32_from_fp16_params": [[master]], "state": {0: {"exp_avg": torch.zeros(3, 4)}}},
            "args": args, "rng_state": [{"random_rng_state": random.getstate(), "np_rng_state": np_state,
                                         "torch_rng_state": torch.get_rng_state()}]}


def test_megatron_state_with_tensor_attributes_reads_as_metadata(tmp_path):
    path = tmp_path / "model_optim_rng.pt"
    state = _megatron_like_state()
    torch.save(state, path)
    obj, offsets = read_pt_metadata(str(path))
    raw = path.read_bytes()
    for got, want in ((obj["model"]["w"], state["model"]["w"]),
                      (obj["optimizer"]["fp32_from_fp16_params"][0][0], state["optimizer"]["fp32_from_fp16_params"][0][0])):
        assert isinstance(got, TensorRef) and got.shape == tuple(want.shape) and got.contiguous
        start = offsets[got.storage.key] + got.offset * want.element_size()
        assert raw[start:start + want.numel() * want.element_size()] == want.detach().contiguous().view(-1).view(
            torch.uint8).numpy().tobytes()
    assert obj["args"].params_dtype is torch.bfloat16 and obj["args"].exit_signal is signal.SIGTERM
    assert obj["args"].attention_backend is state["args"].attention_backend and obj["args"].ranks == {1, 2}
    assert obj["model"]["w._extra_state"].getvalue() == b"te fp8 meta"
    assert obj["model"]["v._extra_state"].shape == (8,)


MEGATRON_LM_FIXTURES = os.path.join(ROOT, "tests", "fixtures", "megatron-lm-core_v0.16.1")


def test_real_megatron_files_use_only_allowed_globals():
    """The globals real Megatron-LM checkpoints name (fixtures written by Megatron-LM's training loop)."""
    seen = 0
    for pattern in ("*/torch/iter_*/mp_rank_*/model_optim_rng.pt", "*/torch_dist/iter_*/common.pt"):
        for f in glob.glob(os.path.join(MEGATRON_LM_FIXTURES, pattern)):
            obj, _ = read_pt_metadata(f)
            assert isinstance(obj["args"], argparse.Namespace)
            seen += 1
    for folder in glob.glob(os.path.join(MEGATRON_LM_FIXTURES, "*/torch_dist/iter_*")):
        assert read_dcp_metadata(folder).state_dict_metadata
        seen += 1
    assert seen == 8  # two checkpoints: two rank files and a torch_dist folder (common.pt, .metadata) each


def test_load_pt_gives_torch_load_tensors_without_unpickling_twice():
    """verify's loader builds tensors from the allow-listed pickle over the file's own bytes: on Megatron-LM's
    rank files every model tensor equals what torch.load (trusted here: the fixtures are ours) returns."""
    files = glob.glob(os.path.join(MEGATRON_LM_FIXTURES, "*/torch/iter_*/mp_rank_*/model_optim_rng.pt"))
    assert len(files) == 4
    for f in files:
        ours, theirs = load_pt(f), torch.load(f, weights_only=False)
        tensors = {k: v for k, v in theirs["model"].items() if isinstance(v, torch.Tensor)}
        assert tensors and all(torch.equal(ours["model"][k], v) and ours["model"][k].dtype == v.dtype
                               for k, v in tensors.items())
        assert vars(ours["args"]).keys() == vars(theirs["args"]).keys()


def _inject_pt(path, payload):
    sd = torch.load(path, weights_only=False)
    sd["evil"] = payload
    torch.save(sd, path)


def _inject_metadata(folder, payload):
    path = os.path.join(folder, ".metadata")
    with open(path, "rb") as f:
        md = pickle.load(f)
    md.planner_data = payload
    with open(path, "wb") as f:
        pickle.dump(md, f)


@pytest.mark.parametrize("gadget", sorted(_gadgets("m")))
def test_every_gadget_is_refused_by_name(tmp_path, gadget):
    marker = str(tmp_path / "ran")
    path = tmp_path / "model_optim_rng.pt"
    torch.save({"args": argparse.Namespace(), "evil": _gadgets(marker)[gadget]}, path)
    with pytest.raises(UnsafePickle) as e:
        read_pt_metadata(str(path))
    assert str(e.value).startswith(f"{path}: refused to unpickle global {gadget} ")
    assert len(str(e.value).splitlines()) == 1 and not os.path.exists(marker)


def _raw_pickles(cmd: str) -> dict[str, bytes]:
    """posix.system(cmd) through each opcode that names a global, written byte by byte."""
    c = cmd.encode()
    return {"global": b"cposix\nsystem\n(V" + c + b"\ntR.",
            "stack_global": b"\x80\x04\x8c\x05posix\x8c\x06system\x93\x8c" + bytes([len(c)]) + c + b"\x85R.",
            "obj": b"(cposix\nsystem\nV" + c + b"\no.",
            "inst": b"(V" + c + b"\niposix\nsystem\n."}


@pytest.mark.parametrize("opcode", sorted(_raw_pickles("")))
def test_raw_opcodes_in_dcp_metadata_are_refused(tmp_path, opcode):
    marker = tmp_path / "ran"
    raw = _raw_pickles(f"touch {marker}")[opcode]
    (tmp_path / ".metadata").write_bytes(raw)
    with pytest.raises(UnsafePickle, match=r"\.metadata: refused to unpickle global posix\.system"):
        read_dcp_metadata(str(tmp_path))
    assert not marker.exists()
    pickle.loads(raw)  # the same bytes do run code when unpickled freely: the case is real
    assert marker.exists()


def test_extension_registry_and_garbage_are_one_line_errors(tmp_path):
    for raw in (b"\x80\x02\x82\x01.", b"not a pickle at all", b"\x80\x02}q\x00(X\x01\x00\x00\x00a"):
        (tmp_path / ".metadata").write_bytes(raw)
        with pytest.raises(ConversionError) as e:
            read_dcp_metadata(str(tmp_path))
        assert str(e.value).startswith(str(tmp_path / ".metadata")) and len(str(e.value).splitlines()) == 1


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny model converted to Megatron torch, torch_dist and legacy GPT files (one 2-rank job)."""
    from dist_reshard.testing.tiny_models import build_model, save_model

    root = tmp_path_factory.mktemp("payload")
    hf = str(root / "hf")
    save_model(build_model("llama3", seed=3, rope_theta=10000.0), hf)
    cases = [dict(name=fmt, load=hf, save=str(root / fmt), format="torch" if fmt == "legacy" else fmt, tp=2, pp=1,
                  impl="local", **({"dst": "legacy"} if fmt == "legacy" else {}))
             for fmt in ("torch", "torch_dist", "legacy")]
    run_cases(2, cases, root)
    return {"hf": hf, **{c["name"]: c["save"] for c in cases}}


def _python(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _hostile_copy(checkpoints, tmp_path, kind, marker):
    """A copy of a converted checkpoint with a payload in one of its pickles; the file and global to name."""
    fmt = {"model_optim_rng.pt": "torch", "legacy_gpt": "legacy"}.get(kind, "torch_dist")
    folder = tmp_path / kind.strip(".")
    shutil.copytree(checkpoints[fmt], folder)
    payload = Payload(os.system, f"touch {marker}")
    it = folder / "iter_0000001"
    if kind == ".metadata":
        _inject_metadata(str(it), payload)
        return folder, str(it / ".metadata")
    victim = str(it / "common.pt") if kind == "common.pt" else sorted(glob.glob(str(it / "mp_rank_*" / "*.pt")))[-1]
    _inject_pt(victim, payload)
    return folder, victim


@pytest.mark.parametrize("crc", [True, False])
def test_payload_in_a_dcp_chunk_is_named(tmp_path, crc):
    """DCP chunks (tensor data) load through torch's weights-only unpickler; a refused global is named, also
    in archives without CRCs (our writers switch torch.save's CRC off for the whole process)."""
    import io

    from torch.utils.serialization import config

    from dist_reshard.formats.safe_pickle import load_tensor_blob

    marker = tmp_path / "ran"
    blob = io.BytesIO()
    was = config.save.compute_crc32
    config.save.compute_crc32 = crc
    try:
        torch.save(Payload(os.system, f"touch {marker}"), blob)
    finally:
        config.save.compute_crc32 = was
    with pytest.raises(UnsafePickle, match="chunk x: refused to unpickle global posix.system"):
        load_tensor_blob(blob.getvalue(), "f.distcp: chunk x")
    assert not marker.exists()
    good = io.BytesIO()
    torch.save(torch.arange(4.0), good)
    assert torch.equal(load_tensor_blob(good.getvalue(), "f.distcp: chunk y"), torch.arange(4.0))


def _rehash_manifest(folder):
    man = read_manifest(str(folder))
    for entry in man["files"]:
        entry.update(file_digest(os.path.join(folder, entry["path"])))
    write_manifest(str(folder), man)


@pytest.mark.parametrize("kind", ["model_optim_rng.pt", "legacy_gpt", "common.pt", ".metadata"])
def test_payload_in_each_file_kind_never_runs(checkpoints, tmp_path, kind):
    """Through every command that reads it: a conversion, `inspect`, `verify --against`."""
    marker = tmp_path / "ran"
    folder, victim = _hostile_copy(checkpoints, tmp_path, kind, marker)
    expected = f"{victim}: refused to unpickle global posix.system"
    runs = [_python("-m", "dist_reshard.launch", "--src", "mcore", "--dst", "hf", "--load", str(folder),
                    "--save", str(tmp_path / "out"), "--quiet"),
            _python("-m", "dist_reshard.inspect", str(folder))]  # `compare` opens checkpoints the same way
    if kind != "common.pt":  # verify reads the output's rank files and DCP metadata
        _rehash_manifest(folder)  # an attacker ships a matching manifest
        runs.append(_python("-m", "dist_reshard.verify", str(folder), "--against", checkpoints["hf"]))
    for proc in runs:
        assert proc.returncode != 0 and expected in proc.stderr, (proc.args, proc.stderr[-2000:])
    assert not marker.exists() and not (tmp_path / "out").exists()

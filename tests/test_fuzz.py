"""Hostile input: mutated and generated safetensors headers, index and config files. The only way out is
the project's own ConversionError; offsets never point outside the file.

The suite runs 10,000 seeded mutations plus a hypothesis-generated set; a longer run:
`DIST_RESHARD_FUZZ_ROUNDS=200000 ./dev test tests/test_fuzz.py`.
"""

import json
import os
import random
import struct

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from dist_reshard.base.errors import ConversionError
from dist_reshard.config.hf_config import read_config
from dist_reshard.formats.safetensors_index import DTYPE_SIZES, index_folder, parse_file

ROUNDS = int(os.environ.get("DIST_RESHARD_FUZZ_ROUNDS", "10000"))


def _check_file(path):
    try:
        index = parse_file(path)
    except ConversionError:
        return "refused"
    size = os.path.getsize(path)
    for t in index.values():
        assert 0 <= t.offset and t.offset + t.nbytes <= size
        assert t.nbytes == t.itemsize * int(torch.tensor(t.shape or [1]).prod().item()) or 0 in t.shape
    return "accepted"


def _mutate_header(header: dict, rng: random.Random) -> dict:
    header = json.loads(json.dumps(header))
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    choice = rng.randrange(9)
    if choice == 0:
        entry["dtype"] = rng.choice(list(DTYPE_SIZES) + ["Q4", "", None, 7])
    elif choice == 1:
        entry["shape"] = [rng.randint(-3, 5000) for _ in range(rng.randint(0, 4))]
    elif choice == 2:
        entry["data_offsets"] = [rng.randint(-10, 10**7), rng.randint(-10, 10**7)]
    elif choice == 3:
        b, e = entry["data_offsets"]
        shift = rng.randint(-64, 64)
        entry["data_offsets"] = [b + shift, e + shift]
    elif choice == 4:
        del entry[rng.choice(["dtype", "shape", "data_offsets"])]
    elif choice == 5:
        header[name] = rng.choice([[], "x", 3, None])
    elif choice == 6:
        entry["shape"] = [1.5] if rng.random() < 0.5 else ["2"]
    elif choice == 7:
        other = rng.choice(names)
        entry["data_offsets"] = list(header[other]["data_offsets"]) if isinstance(header[other], dict) else [0, 0]
    else:
        entry["data_offsets"] = [True, 4]
    return header


def test_ten_thousand_mutated_headers(tmp_path):
    torch.manual_seed(0)
    base = str(tmp_path / "base.safetensors")
    save_file({"a": torch.randn(4, 3), "b": torch.randn(5).half(), "c": torch.zeros(2, 2, dtype=torch.int32)}, base)
    with open(base, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    rng = random.Random(1234)
    path = str(tmp_path / "m.safetensors")
    outcomes = {"refused": 0, "accepted": 0}
    for _ in range(ROUNDS):
        h = _mutate_header(header, rng)
        raw = json.dumps(h).encode()
        body = data[: rng.randint(0, len(data))] if rng.random() < 0.2 else data
        declared = len(raw) + rng.choice([-3, 5, 10**12]) if rng.random() < 0.1 else len(raw)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", declared) + raw + body)
        outcomes[_check_file(path)] += 1
    assert outcomes["refused"] > ROUNDS // 2 and outcomes["accepted"] > 0


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.fixed_dictionaries({
    "dtype": st.sampled_from(list(DTYPE_SIZES) + ["Q4"]),
    "shape": st.lists(st.integers(-1, 64), max_size=3),
    "data_offsets": st.lists(st.integers(-5, 5000), min_size=2, max_size=2)}), max_size=4),
    st.integers(0, 4096))
def test_generated_headers(tmp_path_factory, header, data_len):
    path = str(tmp_path_factory.mktemp("gen") / "g.safetensors")
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + bytes(data_len))
    _check_file(path)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode),
                 st.dictionaries(st.text(max_size=6), st.one_of(st.integers(), st.text(max_size=5), st.none(),
                                                               st.lists(st.integers(), max_size=3)),
                                 max_size=6).map(lambda d: json.dumps(d).encode())))
def test_config_and_index_readers_on_noise(tmp_path_factory, blob):
    folder = tmp_path_factory.mktemp("cfg")
    (folder / "config.json").write_bytes(blob)
    (folder / "model.safetensors.index.json").write_bytes(blob)
    for reader in (read_config, index_folder):
        try:
            reader(str(folder))
        except ConversionError:
            pass


CONFIG_KEYS = ["architectures", "num_attention_heads", "hidden_size", "num_hidden_layers", "intermediate_size",
               "vocab_size", "num_key_value_heads", "head_dim", "rope_theta", "rope_scaling", "rope_parameters",
               "tie_word_embeddings", "max_position_embeddings", "rms_norm_eps", "torch_dtype", "dtype"]
VALUES = st.one_of(st.integers(-5, 5000), st.floats(allow_nan=True), st.text(max_size=5), st.none(), st.booleans(),
                   st.lists(st.one_of(st.text(max_size=5), st.integers()), max_size=3),
                   st.dictionaries(st.sampled_from(["rope_type", "type", "factor", "rope_theta"]),
                                   st.one_of(st.text(max_size=5), st.integers()), max_size=3))


@settings(max_examples=1000, deadline=None)
@given(st.dictionaries(st.sampled_from(CONFIG_KEYS), VALUES, max_size=len(CONFIG_KEYS)))
def test_config_reader_on_plausible_fields(tmp_path_factory, cfg):
    folder = tmp_path_factory.mktemp("cfg")
    (folder / "config.json").write_text(json.dumps(cfg))
    try:
        read_config(str(folder))
    except ConversionError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.dictionaries(st.text(max_size=4), VALUES, max_size=4), VALUES))
def test_index_reader_on_plausible_weight_maps(tmp_path_factory, weight_map):
    folder = tmp_path_factory.mktemp("idx")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    try:
        index_folder(str(folder))
    except ConversionError:
        pass

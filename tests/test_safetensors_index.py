"""The header parser and the positional reader against real safetensors files and hostile variants."""

import json
import os
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from dist_reshard.base.errors import ConversionError
from dist_reshard.plan.data import ReadItem
from dist_reshard.read.reader import RangeReader
from dist_reshard.formats.safetensors_index import index_folder, parse_file


def _write(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def test_offsets_and_reads_match_safetensors(tmp_path):
    torch.manual_seed(0)
    tensors = {"a": torch.randn(7, 5), "b": torch.randn(3).to(torch.bfloat16), "c": torch.randint(0, 9, (2, 3, 4))}
    path = str(tmp_path / "m.safetensors")
    save_file(tensors, path)
    index = parse_file(path)
    reader = RangeReader()
    for name, t in tensors.items():
        src = index[name]
        assert src.shape == tuple(t.shape)
        rows = (1, src.rows)
        item = ReadItem(0, name, path, rows, src.offset + src.row_bytes, src.row_bytes * (src.rows - 1), 0)
        got = reader.read(item).view(t.dtype).view(-1, *t.shape[1:])
        assert torch.equal(got, t[1:])
    assert reader.bytes_read == sum(t[1:].numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("header,data,message", [
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
    ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12"),
    ({"x": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unsupported dtype"),
    ({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "invalid shape"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "backwards"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlap"),
    ([1, 2], b"", "not a JSON object"),
])
def test_bad_headers_name_file_and_tensor(tmp_path, header, data, message):
    path = str(tmp_path / "bad.safetensors")
    _write(path, header, data)
    with pytest.raises(ConversionError, match=message) as e:
        parse_file(path)
    assert path in str(e.value)


def test_header_length_beyond_file(tmp_path):
    path = str(tmp_path / "short.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(ConversionError, match="exceeds the file size"):
        parse_file(path)


def test_index_json_names_missing_file(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "one.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "one.safetensors", "b": "two.safetensors"}}))
    with pytest.raises(ConversionError, match="two.safetensors: shard file named in model.safetensors.index.json"):
        index_folder(str(tmp_path))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 400))
def test_arbitrary_bytes_give_our_error_or_a_valid_index(tmp_path_factory, blob, declared):
    path = str(tmp_path_factory.mktemp("fuzz") / "f.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", declared) + blob)
    try:
        index = parse_file(path)
    except ConversionError:
        return
    size = os.path.getsize(path)
    for t in index.values():
        assert 0 <= t.offset and t.offset + t.nbytes <= size

"""Writers copy pass-through bytes from the source file inside the kernel (writers/splice.py): the file they
write is byte for byte what writing the filled memory would have given."""

import os
from argparse import Namespace

import pytest
import torch

from dist_reshard.formats.manifest import FILE_HASH, file_digest, new_file_hasher
from dist_reshard.writers import legacy
from dist_reshard.writers.splice import Splice, SplicingFile


@pytest.fixture
def source(tmp_path):
    data = os.urandom(1 << 16)
    path = tmp_path / "source.bin"
    path.write_bytes(data)
    return str(path), data


@pytest.mark.parametrize("chunk", [1 << 16, 4096, 1000, 7])  # write() calls cutting through splices anywhere
def test_spliced_file_equals_the_filled_memory(tmp_path, source, chunk):
    path, data = source
    memory = torch.zeros(1 << 15, dtype=torch.uint8)  # the splices' bytes are never filled in memory
    base = memory.data_ptr()
    regions = [(0, 100, 5000), (100, 4000, 123), (9000, 1, 60000), (20000, 12768, 300)]  # (at, n, source offset)
    splices = [Splice(base + at, n, path, off) for at, n, off in regions]
    expected = bytearray(memory.numpy().tobytes())
    for at, n, off in regions:
        expected[at:at + n] = data[off:off + n]
    out_path = tmp_path / "out.bin"
    with open(out_path, "wb", buffering=0) as f:
        out = SplicingFile(f, splices, new_file_hasher())
        out.write(b"header")
        mv = memoryview(memory.numpy())
        for lo in range(0, len(mv), chunk):
            out.write(mv[lo:lo + chunk])
        out.close_sources()
    assert out_path.read_bytes() == b"header" + bytes(expected)
    assert out.size == 6 + memory.numel() and out.spliced == sum(n for _, n, _ in regions)
    assert out.hasher is None  # the spliced bytes never passed through memory: the caller hashes the file


def test_without_splices_the_stream_is_hashed(tmp_path):
    out_path = tmp_path / "out.bin"
    with open(out_path, "wb", buffering=0) as f:
        out = SplicingFile(f, (), new_file_hasher())
        out.write(b"abc" * 1000)
    assert out.hasher.hexdigest() == file_digest(str(out_path))[FILE_HASH]


def test_file_digest_without_mmap_reads_the_file():
    """A file the kernel cannot map (sysfs here, as some FUSE mounts) is hashed from plain reads."""
    import xxhash

    path = "/sys/kernel/mm/transparent_hugepage/enabled"
    if not os.path.exists(path):
        pytest.skip("no sysfs attribute file to hash")
    with open(path, "rb") as f:
        data = f.read()
    assert file_digest(path) == {"size": len(data), FILE_HASH: xxhash.xxh3_128(data).hexdigest()}


def test_legacy_file_with_splices_loads_the_source_bytes(tmp_path, source):
    path, data = source
    weight = torch.empty(64, 32, dtype=torch.bfloat16)  # 4096 bytes, left unfilled
    norm = torch.arange(32, dtype=torch.float32)
    splices = [Splice(weight.data_ptr(), weight.nbytes, path, 1234)]
    model = {"decoder.layers.0.mlp.linear_fc1.weight": weight, "decoder.final_layernorm.weight": norm}
    out = str(tmp_path / "mp_rank_00" / "model_optim_rng.pt")
    digest: dict = {}
    legacy.write_file(out, {"model": model}, Namespace(iteration=1), digest=digest)
    assert digest  # no splice in that call: hashed as written
    digest = {}
    legacy.write_file(out, {"model": model}, Namespace(iteration=1), digest=digest, splices=splices)
    assert digest == {}  # spliced: the caller hashes the file
    got = torch.load(out, weights_only=False)["model"]
    want = torch.frombuffer(bytearray(data[1234:1234 + weight.nbytes]), dtype=torch.bfloat16).view(64, 32)
    assert torch.equal(got["decoder.layers.0.mlp.linear_fc1.weight"].view(torch.int16), want.view(torch.int16))
    assert torch.equal(got["decoder.final_layernorm.weight"], norm)

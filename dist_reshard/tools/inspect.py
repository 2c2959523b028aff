"""`python -m dist_reshard.inspect PATH [--tensor NAME] [--json]` and `... inspect compare A B [--json]`.

PATH is an HF folder, a legacy Megatron checkpoint or a torch_dist checkpoint. The summary gives the
format, detected family and layout, stored tensor count, dtypes, total bytes and file sizes; `--tensor`
prints one logical (unsharded, HF-named) tensor's statistics, reading only its bytes; `compare` checks two
checkpoints of any formats and layouts tensor by tensor and exits 1 when any differs.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections import Counter

import torch

from ..base.errors import ConversionError
from .logical import hf_names_only, open_checkpoint, to_json


def summary(path: str) -> dict:
    ck = open_checkpoint(path)
    stored = ck.stored()
    return {
        "path": path, "format": ck.format, "family": ck.family, "architecture": ck.config.architecture,
        "layout": ck.layout, "tensors": len(stored), "logical_tensors": len(hf_names_only(ck.names())),
        "dtypes": dict(Counter(d.replace("torch.", "") for _, d, _, _ in stored)),
        "total_bytes": sum(n for _, _, _, n in stored),
        "files": [{"file": f, "bytes": n} for f, n in ck.files()],
    }


def tensor_stats(t: torch.Tensor) -> dict:
    raw = t.contiguous().view(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    x = t.double() if t.is_floating_point() else t.to(torch.float64)
    finite = x[torch.isfinite(x)]
    return {
        "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "numel": t.numel(),
        "min": finite.min().item() if finite.numel() else None,
        "max": finite.max().item() if finite.numel() else None,
        "mean": finite.mean().item() if finite.numel() else None,
        "std": finite.std().item() if finite.numel() > 1 else None,
        "nan": int(torch.isnan(x).sum().item()), "inf": int(torch.isinf(x).sum().item()),
        "sha256": hashlib.sha256(raw.numpy().tobytes()).hexdigest(),
    }


def compare(a: str, b: str) -> dict:
    ca, cb = open_checkpoint(a), open_checkpoint(b)
    na, nb = set(hf_names_only(ca.names())), set(hf_names_only(cb.names()))
    rows, differ = [], 0
    for name in sorted(na | nb):
        if name not in na or name not in nb:
            rows.append({"tensor": name, "status": f"only in {'A' if name in na else 'B'}"})
            differ += 1
            continue
        ta, tb = ca.tensor(name), cb.tensor(name)
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            rows.append({"tensor": name, "status": "shape/dtype differs",
                         "a": [list(ta.shape), str(ta.dtype)], "b": [list(tb.shape), str(tb.dtype)]})
            differ += 1
            continue
        same_bits = torch.equal(ta.contiguous().view(torch.uint8), tb.contiguous().view(torch.uint8))
        diff = (ta.double() - tb.double()).abs()
        finite = diff[torch.isfinite(diff)]
        rows.append({"tensor": name, "status": "equal" if same_bits else "differs",
                     "max_abs_diff": finite.max().item() if finite.numel() else (0.0 if same_bits else float("nan"))})
        differ += not same_bits
    return {"a": a, "b": b, "tensors": len(rows), "differing": differ, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "compare":
            p = argparse.ArgumentParser(prog="dist_reshard.inspect compare")
            p.add_argument("a")
            p.add_argument("b")
            p.add_argument("--json", action="store_true")
            ns = p.parse_args(argv[1:])
            result = compare(ns.a, ns.b)
            if ns.json:
                print(to_json(result))
            else:
                for r in result["rows"]:
                    extra = f" max_abs_diff={r['max_abs_diff']:.6g}" if "max_abs_diff" in r else ""
                    print(f"{r['status']:>20}  {r['tensor']}{extra}")
                print(f"{result['differing']} of {result['tensors']} tensors differ")
            return 1 if result["differing"] else 0
        p = argparse.ArgumentParser(prog="dist_reshard.inspect", description=__doc__.splitlines()[0])
        p.add_argument("path")
        p.add_argument("--tensor", help="one logical tensor, by its HF name")
        p.add_argument("--json", action="store_true")
        ns = p.parse_args(argv)
        if ns.tensor:
            result = dict(tensor=ns.tensor, **tensor_stats(open_checkpoint(ns.path).tensor(ns.tensor)))
        else:
            result = summary(ns.path)
        if ns.json:
            print(to_json(result))
        else:
            for k, v in result.items():
                if k == "files":
                    for f in v:
                        print(f"  {f['bytes']:>14,}  {f['file']}")
                else:
                    print(f"{k}: {v}")
        return 0
    except ConversionError as e:
        print(f"dist_reshard.inspect: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

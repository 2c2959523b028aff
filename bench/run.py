"""Benchmark dist_reshard against the I/O floor (a durable copy) and a full-tensor baseline.

    python bench/run.py --src HF_DIR            # or --make-gb 4 to generate a Llama-shaped source first
        [--reps 3] [--cases copy,full-tensor,dist_reshard] [--ranks 1,2,4] [--formats torch,torch_dist]
        [--tp 2 --pp 2] [--workdir DIR] [--out bench/results.json] [--gpu] [--loopback] [--keep]

Repetitions alternate: rep 1 runs every case once, then rep 2, ..., so drift (other load, page-cache
state) spreads over all cases instead of landing on one. Each case's output is deleted between runs,
outside the timed region. The page cache is kept warm on purpose (the source is read once before the
first run, and nothing is dropped): the figures are for a warm cache, the case where a converter's own
overheads show most.

Cases:
  copy          `cp -r SRC DST` then `sync` on the copied files: the I/O floor.
  full-tensor   bench/full_tensor_worker.py on N=2 ranks (whole-tensor get_tensor, local TP slicing).
  dist_reshard  `torchrun -m dist_reshard.launch` at N = --ranks, each --formats; every run is paired
                with the same command plus --dry-run, whose wall is the start-up + planning cost.
                `--loopback` runs them with dist_reshard's --loopback: every byte through the exchange
                (with --gpu: NCCL and GPU buffers, even at N=1).

Data time = median wall - median dry-run wall (the work that scales with the bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)

import make_checkpoint  # noqa: E402

MIB, GIB = 1 << 20, 1 << 30
PHASES = ("plan", "allocate", "read", "exchange", "write", "publish")


# ---------------------------------------------------------------------------------------------------
# Cases: a name, the command of a real run and of its dry run (or None), and the report it writes.


def torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]


def build_cases(ns, src: str, work: str) -> list[dict]:
    cases = []
    selected = ns.cases.split(",")
    if "copy" in selected:
        dst = os.path.join(work, "copy")
        # `sync FILE...` fsyncs exactly the copied files (coreutils >= 8.24): as durable as the converters'
        # fsynced files, without also paying for whatever else is dirty on a shared machine.
        cmd = ["bash", "-c", 'cp -r "$0" "$1" && sync "$1" "$1"/*', src, dst]
        cases.append(dict(name="copy", kind="copy", n=1, fmt=None, dst=dst, cmd=cmd, dry=None, report=None))
    if "full-tensor" in selected:
        dst, rep = os.path.join(work, "full-tensor"), os.path.join(work, "full-tensor.json")
        cmd = torchrun(2) + [os.path.join(BENCH, "full_tensor_worker.py"), "--load", src, "--save", dst,
                             "--tp", str(ns.tp), "--pp", str(ns.pp), "--report", rep]
        cases.append(dict(name="full-tensor N=2", kind="full-tensor", n=2, fmt="torch", dst=dst, cmd=cmd,
                          dry=cmd + ["--dry-run"], report=rep))
    if "dist_reshard" in selected:
        device = "cuda" if ns.gpu else "cpu"  # explicit: "auto" would pick NCCL on a GPU host
        for n in (int(x) for x in ns.ranks.split(",")):
            for fmt in ns.formats.split(","):
                tag = f"dist_reshard-N{n}-{fmt}"
                dst, rep = os.path.join(work, tag), os.path.join(work, tag + ".json")
                cmd = torchrun(n) + ["-m", "dist_reshard.launch", "--src", "hf", "--dst", "mcore", "--load", src,
                                     "--save", dst, "--tp", str(ns.tp), "--pp", str(ns.pp), "--ckpt-format", fmt,
                                     "--overwrite", "--quiet", "--report", rep, "--device", device]
                cmd += ["--loopback"] if ns.loopback else []
                name = f"dist_reshard N={n} {fmt}" + " cuda" * ns.gpu + " loopback" * ns.loopback
                cases.append(dict(name=name, kind="dist_reshard", n=n, fmt=fmt, dst=dst, cmd=cmd,
                                  dry=cmd + ["--dry-run"], report=rep))
    return cases


def clean(case: dict) -> None:
    """Remove a case's output and leftovers (outside the timed region)."""
    dst = case["dst"]
    parent, base = os.path.dirname(dst), os.path.basename(dst)
    for path in (dst, os.path.join(parent, f".{base}.dist_reshard-staging"),
                 os.path.join(parent, f".{base}.dist_reshard-replaced")):
        if os.path.isdir(path):
            shutil.rmtree(path)
    if case["report"] and os.path.exists(case["report"]):
        os.remove(case["report"])


def timed(cmd: list[str], timeout: float) -> tuple[float, subprocess.CompletedProcess]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return time.perf_counter() - t0, proc


def run_once(case: dict, dry: bool, timeout: float) -> dict:
    clean(case)
    wall, proc = timed(case["dry"] if dry else case["cmd"], timeout)
    out = {"wall": wall, "rc": proc.returncode}
    if proc.returncode != 0:
        out["error"] = (proc.stderr or proc.stdout)[-3000:]
    elif case["report"]:
        with open(case["report"]) as f:
            out["report"] = json.load(f)
    clean(case)
    return out


# ---------------------------------------------------------------------------------------------------
# Summary


def summarize(case: dict, runs: list[dict], dry_runs: list[dict], source_bytes: int) -> dict:
    ok = [r for r in runs if r["rc"] == 0]
    s = {"name": case["name"], "kind": case["kind"], "n": case["n"], "format": case["fmt"],
         "walls": [r["wall"] for r in runs], "dry_walls": [r["wall"] for r in dry_runs],
         "failures": [r["error"] for r in runs + dry_runs if r["rc"] != 0]}
    if not ok:
        return s
    s["median_wall"] = statistics.median(r["wall"] for r in ok)
    dry_ok = [r["wall"] for r in dry_runs if r["rc"] == 0]
    s["median_dry_wall"] = statistics.median(dry_ok) if dry_ok else (0.0 if case["dry"] is None else None)
    if s["median_dry_wall"] is not None:
        s["data_time"] = s["median_wall"] - s["median_dry_wall"]
    reports = [r["report"] for r in ok if "report" in r]
    if reports:
        s["bytes_read_total"] = statistics.median(r["bytes_read_total"] for r in reports)
        s["read_ratio"] = s["bytes_read_total"] / source_bytes
        s["report_source_bytes"] = reports[0]["source_bytes"]
        s["read_amplification"] = reports[0].get("read_amplification")
        # Per rank: the median over reps; phases: the slowest rank's time, median over reps.
        ranks = len(reports[0]["ranks"])
        s["peak_rss_per_rank"] = [statistics.median(r["ranks"][i]["peak_rss_bytes"] for r in reports)
                                  for i in range(ranks)]
        s["peak_gpu_per_rank"] = [statistics.median(r["ranks"][i].get("peak_gpu_bytes", 0) for r in reports)
                                  for i in range(ranks)]
        names = list(reports[0]["ranks"][0]["phases"])
        s["phases_max_over_ranks"] = {p: statistics.median(max(x["phases"].get(p, 0.0) for x in r["ranks"])
                                                           for r in reports) for p in names}
        # The dry run's peak RSS is the start-up floor (interpreter, torch, process group, plan).
        dry_reports = [r["report"] for r in dry_runs if r["rc"] == 0 and "report" in r]
        if dry_reports:
            s["dry_peak_rss_per_rank"] = [statistics.median(r["ranks"][i]["peak_rss_bytes"] for r in dry_reports)
                                          for i in range(ranks)]
    elif case["kind"] == "copy":
        s["bytes_read_total"] = source_bytes
        s["read_ratio"] = 1.0
    return s


def fmt_row(s: dict, copy_time: float | None, gpu: bool, source_bytes: int) -> str:
    def f(x, spec):
        return format(x, spec) if x is not None else "-"

    data = s.get("data_time")
    ratio = data / copy_time if data is not None and copy_time else None
    rss = s.get("peak_rss_per_rank")
    rss_s = "/".join(f"{x / MIB:.0f}" for x in rss) if rss else "-"
    phases = s.get("phases_max_over_ranks") or {}
    ph = " ".join(f"{k} {v:.2f}" for k, v in phases.items())
    row = (f"{s['name']:<28} {f(s.get('median_wall'), '8.2f')} {f(s.get('median_dry_wall'), '8.2f')} "
           f"{f(data, '8.2f')} {f(ratio, '7.2f')} {f(s.get('read_ratio'), '8.4f')}  {rss_s:<24} {ph}")
    if gpu and s["kind"] == "dist_reshard" and data:
        gpu_peak = "/".join(f"{x / MIB:.0f}" for x in s.get("peak_gpu_per_rank") or [])
        row += f"  [{source_bytes / s['n'] / data / 1e9:.2f} GB/s per GPU, peak GPU MiB {gpu_peak or '-'}]"
    if s["failures"]:
        row += f"  FAILED {len(s['failures'])} run(s)"
    return row


def targets(summaries: list[dict], source_bytes: int, copy_time: float | None) -> list[dict]:
    """The issue's acceptance targets, one line each."""
    out = []
    dist = [s for s in summaries if s["kind"] == "dist_reshard" and "median_wall" in s]

    def add(what, value, limit, ok):
        out.append({"target": what, "value": value, "limit": limit, "pass": bool(ok)})

    for s in dist:
        if "read_ratio" in s:
            add(f"bytes read / source <= 1.01 ({s['name']})", s["read_ratio"], 1.01, s["read_ratio"] <= 1.01)
    for s in dist:
        if s.get("peak_rss_per_rank"):
            limit = source_bytes / s["n"] + GIB
            worst = max(s["peak_rss_per_rank"])
            add(f"peak RSS per rank <= source/N + 1 GiB ({s['name']}, MiB)", worst / MIB, limit / MIB, worst <= limit)
    for s in dist:
        if s["n"] == 2 and s.get("data_time") is not None and copy_time:
            r = s["data_time"] / copy_time
            add(f"data time at N=2 <= 1.5 x copy ({s['name']})", r, 1.5, r <= 1.5)
    full = next((s for s in summaries if s["kind"] == "full-tensor" and "median_wall" in s), None)
    ref = next((s for s in dist if s["n"] == 2 and s["format"] == "torch"), None)
    if full and ref:
        r = full["median_wall"] / ref["median_wall"]
        add(f"full-tensor wall / dist_reshard wall >= 2 ({ref['name']})", r, 2.0, r >= 2)
    return out


def machine(work: str) -> dict:
    def sh(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    import safetensors
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    info = {"nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(), "cpu": cpu,
            "ram_gib": round(psutil.virtual_memory().total / GIB, 1),
            "filesystem": " ".join(sh(["findmnt", "-no", "FSTYPE,SOURCE", "-T", work]).split())
                          or sh(["stat", "-f", "-c", "%T", work]),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "safetensors": safetensors.__version__, "git_commit": sh(["git", "-C", ROOT, "rev-parse", "HEAD"])}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def source_bytes_of(src: str) -> tuple[int, int]:
    """(tensor bytes from the headers, bytes on disk of the safetensors files)."""
    sys.path.insert(0, ROOT)
    from dist_reshard.formats.safetensors_index import index_folder

    index = index_folder(src)
    files = {t.file for t in index.values()}
    return sum(t.nbytes for t in index.values()), sum(os.path.getsize(f) for f in files)


def warm(src: str) -> None:
    """Read the source once so the first case does not pay for a cold cache the others skip."""
    for name in sorted(os.listdir(src)):
        with open(os.path.join(src, name), "rb", buffering=0) as f:
            while f.read(64 * MIB):
                pass


# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--src", help="an existing HF safetensors folder")
    g.add_argument("--make-gb", type=float, help="generate a source of this many GB (bench/make_checkpoint.py)")
    p.add_argument("--family", default="llama", help="with --make-gb: llama or mixtral")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cases", default="copy,full-tensor,dist_reshard",
                   help="comma list of: copy, full-tensor, dist_reshard")
    p.add_argument("--ranks", default="1,2,4", help="dist_reshard world sizes")
    p.add_argument("--formats", default="torch,torch_dist", help="dist_reshard --ckpt-format values")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--workdir", default=None, help="outputs go here (default: a temp dir beside the source)")
    p.add_argument("--out", default=os.path.join(BENCH, "results.json"))
    p.add_argument("--gpu", action="store_true", help="dist_reshard cases with --device cuda (NCCL)")
    p.add_argument("--loopback", action="store_true",
                   help="dist_reshard cases with --loopback (every byte through the exchange, a rank's own too)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds one run may take")
    p.add_argument("--keep", action="store_true", help="keep the generated source and the workdir")
    ns = p.parse_args(argv)
    if ns.src is not None and not os.path.isfile(os.path.join(ns.src, "config.json")):
        p.error(f"--src {ns.src}: not an HF folder (no config.json)")
    unknown = set(ns.cases.split(",")) - {"copy", "full-tensor", "dist_reshard"}
    if unknown:
        p.error(f"--cases: unknown {', '.join(sorted(unknown))}")

    if ns.gpu:
        import torch

        if not torch.cuda.is_available():
            print("bench: --gpu: torch.cuda is not available here; skipping (nothing run)")
            return 0
        usable = [n for n in map(int, ns.ranks.split(",")) if n <= torch.cuda.device_count()]
        if len(usable) < len(ns.ranks.split(",")):
            print(f"bench: --gpu: {torch.cuda.device_count()} GPU(s); skipping N > {torch.cuda.device_count()}")
        if not usable:
            return 0
        ns.ranks = ",".join(map(str, usable))

    made = None
    if ns.make_gb is not None:
        made = tempfile.mkdtemp(prefix="bench-src-", dir=ns.workdir)
        t0 = time.perf_counter()
        info = make_checkpoint.make_checkpoint(made, ns.make_gb, ns.family, layer_multiple=ns.pp)
        print(f"bench: generated {info['total_size'] / 1e9:.3f} GB ({info['config']['architectures'][0]}, scale "
              f"1/{info['scale']}, {info['layers']} layers, {len(info['files'])} files) in "
              f"{time.perf_counter() - t0:.1f}s at {made}")
        ns.src = made
    src = os.path.abspath(ns.src)
    if ns.workdir:
        os.makedirs(ns.workdir, exist_ok=True)
    # Beside the source by default: the same filesystem, so the copy floor and the converters share a disk.
    work = tempfile.mkdtemp(prefix="bench-work-", dir=ns.workdir or os.path.dirname(src))
    try:
        return _bench(ns, src, work)
    finally:
        if not ns.keep:
            shutil.rmtree(work, ignore_errors=True)
            if made:
                shutil.rmtree(made, ignore_errors=True)


def _bench(ns, src: str, work: str) -> int:
    tensor_bytes, file_bytes = source_bytes_of(src)
    info = machine(work)
    cases = build_cases(ns, src, work)
    print(f"bench: source {src}: {tensor_bytes / 1e9:.3f} GB of tensors ({file_bytes / 1e9:.3f} GB of files); "
          f"TP{ns.tp} PP{ns.pp}; {ns.reps} rep(s) of {len(cases)} case(s), alternating")
    print(f"bench: machine: {info['nproc']} CPUs ({info['cpu']}), {info['ram_gib']} GiB RAM, "
          f"filesystem {info['filesystem']}, {info['platform']}")
    print("bench: page cache kept WARM (source read once before timing; nothing dropped)")
    warm(src)
    runs = {c["name"]: [] for c in cases}
    dry = {c["name"]: [] for c in cases}
    for rep in range(ns.reps):
        for c in cases:
            if c["dry"] is not None:
                dry[c["name"]].append(run_once(c, True, ns.timeout))
            r = run_once(c, False, ns.timeout)
            runs[c["name"]].append(r)
            status = f"{r['wall']:.2f}s" if r["rc"] == 0 else f"FAILED rc={r['rc']}"
            print(f"bench: rep {rep + 1}/{ns.reps} {c['name']}: {status}", flush=True)
            if r["rc"] != 0:
                print("    " + r["error"].strip().replace("\n", "\n    ")[-1500:])

    summaries = [summarize(c, runs[c["name"]], dry[c["name"]], tensor_bytes) for c in cases]
    copy = next((s for s in summaries if s["kind"] == "copy" and "median_wall" in s), None)
    copy_time = copy["median_wall"] if copy else None
    print()
    print(f"{'case':<28} {'wall s':>8} {'start s':>8} {'data s':>8} {'/copy':>7} {'read/src':>8}  "
          f"{'peak RSS/rank MiB':<24} phases s (slowest rank)")
    for s in summaries:
        print(fmt_row(s, copy_time, ns.gpu, tensor_bytes))
    start = next((s for s in summaries if s["kind"] == "dist_reshard" and s["n"] == 2
                  and s.get("median_dry_wall") is not None), None)
    if start:
        print(f"start-up: dist_reshard --dry-run at N=2 ({start['format']}): {start['median_dry_wall']:.2f}s")
    checks = targets(summaries, tensor_bytes, copy_time)
    print()
    for t in checks:
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['value']:.3f} (limit {t['limit']:.3f})")
    with open(ns.out, "w") as f:
        json.dump({"machine": info, "source": {"path": src, "tensor_bytes": tensor_bytes, "file_bytes": file_bytes},
                   "tp": ns.tp, "pp": ns.pp, "reps": ns.reps, "gpu": ns.gpu, "page_cache": "warm",
                   "cases": summaries, "targets": checks}, f, indent=2)
    print(f"\nbench: wrote {ns.out}")
    return 1 if any(s["failures"] for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())

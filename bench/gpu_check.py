"""The device path checked on one GPU in one go, within a time budget: `bench/gpu_check.sh` runs this.

    bench/gpu_check.sh                      # on the GPU machine; results in $OUT (default: out/gpu_check)
    bench/gpu_check.sh --cpu-smoke          # anywhere: every stage on the CPU with a tiny source
    bench/gpu_check.sh --download-wheels    # here, with network: wheels the GPU machine may lack -> .whl/

Stages, each bounded by what is left of --budget-s (default 450 s), so partial results always land:
  env      python, torch, CUDA device, disk, which packages import (megatron-core is not needed)
  wheels   installs from .whl/ (no index, no network) only the packages that do not import, into a
           private folder put on PYTHONPATH; this package itself runs from the source tree (PYTHONPATH)
  tests    pytest tests/multigpu/test_single_gpu.py: NCCL at N=1, GPU buffers, loopback, FP8 on the GPU,
           dense and MoE, both formats, bit-exact against the CPU (gloo) output
  source   bench/make_checkpoint.py: a Llama-3-8B-shaped bf16 source of --size-gb (default 16) on the
           local disk (capped at 40% of its free space: the source and one output or copy at a time)
  bench    bench/run.py at N=1, one case per call (so each lands on its own): copy (`cp -r` + `sync`),
           then dist_reshard torch_dist, torch_dist --loopback and torch with --gpu; a case predicted not to
           fit the time left (from the source's write speed) is skipped by name
Results: $OUT/gpu_check.json (rewritten after every stage) and $OUT/gpu_check.log (all output).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
WHEELS = os.path.join(ROOT, ".whl")
GB = 10**9

# Import name -> the distributions (wheels) it needs, each with its own import name. Only what does not
# import is installed: the machine's own packages (torch above all) are never shadowed.
NEEDED = {
    "pytest": [("pytest", "pytest"), ("pluggy", "pluggy"), ("iniconfig", "iniconfig"), ("packaging", "packaging"),
               ("pygments", "pygments")],
    "psutil": [("psutil", "psutil")],
    "xxhash": [("xxhash", "xxhash")],
    "tqdm": [("tqdm", "tqdm")],
}
# What must be on the machine already (too big to carry, or the machine's point): checked, never installed.
PRESENT = ("torch", "safetensors", "transformers")
# Platform tags pip needs to pick the manylinux builds for the GPU machine (x86-64, CPython 3.12).
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")

BENCH_CASES = {  # name -> bench/run.py arguments beyond the common ones; the default order is by importance
    "copy": ["--cases", "copy"],
    "torch_dist": ["--cases", "dist_reshard", "--formats", "torch_dist"],
    "torch_dist-loopback": ["--cases", "dist_reshard", "--formats", "torch_dist", "--loopback"],
    "torch": ["--cases", "dist_reshard", "--formats", "torch"],
}


class Check:
    """The run's clock, log and results file."""

    def __init__(self, out: str, budget_s: float, mode: str):
        os.makedirs(out, exist_ok=True)
        self.out, self.start, self.budget_s = out, time.monotonic(), budget_s
        self.log = open(os.path.join(out, "gpu_check.log"), "a", buffering=1)
        self.results: dict = {"mode": mode, "budget_s": budget_s, "status": "running", "stages": {}}

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def say(self, text: str) -> None:
        line = f"[gpu_check {time.monotonic() - self.start:6.1f}s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.start, 2)
        path = os.path.join(self.out, "gpu_check.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.results, f, indent=1, default=str)
        os.replace(path + ".tmp", path)

    def stage(self, name: str, **fields) -> dict:
        entry = self.results["stages"].setdefault(name, {})
        entry.update(fields)
        self.save()
        return entry

    def run(self, cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str, float]:
        """(exit code, last 4000 characters of output, seconds); output streamed to the log and stdout.
        The command runs in its own process group, which is stopped at the timeout (rc 124)."""
        self.say("$ " + " ".join(cmd) + f"   (timeout {timeout:.0f}s)")
        t0 = time.monotonic()
        if timeout < 1:
            return 124, "not started: no time left", 0.0
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)
        tail: list[str] = []

        def pump():
            for line in proc.stdout:
                sys.stdout.write(line)
                self.log.write(line)
                tail.append(line)
                del tail[:-200]

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # SIGTERM first: torchrun's agent then stops its workers (they run in sessions of their own).
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = 124
            tail.append(f"gpu_check: killed after {timeout:.0f}s\n")
        reader.join(timeout=5)
        sys.stdout.flush()
        return rc, "".join(tail)[-4000:], round(time.monotonic() - t0, 2)


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# Run in a child process: this one never holds a CUDA context (it would count in nvidia-smi's figures).
TORCH_PROBE = """
import json, torch
info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
if info["cuda_available"]:
    info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    v = torch.cuda.nccl.version()
    info["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
print(json.dumps(info))
"""


def stage_env(check: Check, workdir: str, env: dict) -> dict:
    probe = subprocess.run([sys.executable, "-c", TORCH_PROBE], env=env, capture_output=True, text=True, timeout=120)
    try:
        info = json.loads(probe.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        info = {"torch": None, "cuda_available": False, "torch_error": probe.stderr[-1500:]}
    info.update({"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
                 "cpus": os.cpu_count(), "workdir": workdir,
                 "workdir_free_gb": round(shutil.disk_usage(workdir).free / GB, 1), "workdir_fs": _fstype(workdir),
                 "packages": {m: _importable(m) for m in (*PRESENT, *NEEDED)}, "megatron_core": _importable("megatron")})
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = smi.stdout.strip()
    check.say("env: " + json.dumps(info))
    return check.stage("env", ok=info["torch"] is not None and all(info["packages"][m] for m in PRESENT), **info)


def _fstype(path: str) -> str:
    try:
        out = subprocess.run(["findmnt", "-no", "FSTYPE,SOURCE,TARGET", "-T", path], capture_output=True, text=True,
                             timeout=10).stdout
        return " ".join(out.split())
    except (OSError, subprocess.SubprocessError):
        return ""


def pick_workdir(asked: str | None) -> str:
    """--workdir, else the candidate with the most free space that is not held in memory (tmpfs)."""
    if asked:
        os.makedirs(asked, exist_ok=True)
        return os.path.abspath(asked)
    best, room = None, -1
    for base in ("/var/tmp", "/tmp", os.path.expanduser("~"), os.path.dirname(ROOT)):
        if not os.path.isdir(base) or not os.access(base, os.W_OK) or _fstype(base).startswith(("tmpfs", "ramfs")):
            continue
        free = shutil.disk_usage(base).free
        if free > room:
            best, room = base, free
    path = os.path.join(best or "/tmp", "dist_reshard_gpu_check")
    os.makedirs(path, exist_ok=True)
    return path


def stage_wheels(check: Check, site: str) -> dict:
    """Install, without an index, the wheels of whatever does not import; returns the stage entry."""
    missing = [m for m in NEEDED if not _importable(m)]
    want = {dist for m in missing for dist, module in NEEDED[m] if not _importable(module)}
    have = sorted(f for f in os.listdir(WHEELS) if f.endswith(".whl")) if os.path.isdir(WHEELS) else []
    files = [os.path.join(WHEELS, f) for f in have if f.split("-")[0].lower().replace("_", "-") in want]
    lacking = sorted(want - {os.path.basename(f).split("-")[0].lower().replace("_", "-") for f in files})
    entry = {"missing": missing, "installed": [os.path.basename(f) for f in files], "no_wheel_for": lacking}
    if files:
        rc, tail, secs = check.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                    "--no-compile", "--no-cache-dir", "--upgrade", "--target", site, *files],
                                   timeout=min(120, check.left()))
        entry.update(rc=rc, seconds=secs, tail=tail[-1000:])
    entry["ok"] = not lacking and entry.get("rc", 0) == 0
    return check.stage("wheels", **entry)


def download_wheels() -> int:
    """Here, with network: the wheels of NEEDED for CPython 3.12 on x86-64 Linux into .whl/ (one version each)."""
    dists = sorted({dist for deps in NEEDED.values() for dist, _ in deps})
    os.makedirs(WHEELS, exist_ok=True)
    for f in os.listdir(WHEELS):
        if f.endswith(".whl") and f.split("-")[0].lower().replace("_", "-") in dists:
            os.remove(os.path.join(WHEELS, f))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", WHEELS, *dists]
    print("$ " + " ".join(cmd), flush=True)
    rc = subprocess.run(cmd).returncode
    total = sum(os.path.getsize(os.path.join(WHEELS, f)) for f in os.listdir(WHEELS))
    print(f"gpu_check: {WHEELS} holds {len(os.listdir(WHEELS))} files, {total / 2**20:.1f} MiB "
          f"(the device tool carries at most 64 MiB)")
    return rc


def stage_tests(check: Check, env: dict, smoke: bool, cap_s: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-o", "addopts=",
           "tests/multigpu/test_single_gpu.py"]
    if smoke:  # the CUDA tests skip here; the gloo loopback test is the CPU suite's already
        cmd += ["-k", "test_one_gpu_equals_cpu"]
    rc, tail, secs = check.run(cmd, timeout=min(cap_s, check.left() - 30), env=env)
    counts = {}
    for word in ("passed", "failed", "skipped", "error", "errors"):
        for line in tail.splitlines()[-3:]:
            parts = line.replace(",", " ").split()
            for i, p in enumerate(parts[1:], 1):
                if p == word and parts[i - 1].isdigit():
                    counts[word] = int(parts[i - 1])
    return check.stage("tests", rc=rc, seconds=secs, ok=rc == 0, counts=counts, tail=tail[-2500:])


def stage_source(check: Check, workdir: str, size_gb: float, env: dict) -> dict:
    cap = 0.4 * shutil.disk_usage(workdir).free / GB
    size = min(size_gb, cap)
    src = os.path.join(workdir, "source")
    shutil.rmtree(src, ignore_errors=True)
    rc, tail, secs = check.run([sys.executable, os.path.join(BENCH, "make_checkpoint.py"), src, "--size-gb",
                                f"{size:.3f}"], timeout=min(240, check.left() - 20), env=env)
    entry = {"path": src, "asked_gb": size_gb, "size_gb": round(size, 3), "rc": rc, "seconds": secs,
             "tail": tail[-800:], "ok": rc == 0}
    if rc == 0:
        with open(os.path.join(src, "model.safetensors.index.json")) as f:
            entry["tensor_bytes"] = json.load(f)["metadata"]["total_size"]
        entry["write_gb_s"] = _sig(entry["tensor_bytes"] / GB / max(secs, 1e-3))
    return check.stage("source", **entry)


class GpuMemory:
    """nvidia-smi's memory.used (MiB) sampled every 200 ms while a case runs: every process's CUDA context and
    NCCL's buffers included. The first sample, taken before the case starts, is the baseline."""

    def __init__(self):
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                          "-lms", "200"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         text=True)
            self.samples: list[int] = []
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.samples.append(int(line.strip()))

    def stop(self) -> dict:
        if self.proc is None:
            return {}
        self.proc.terminate()
        self.proc.wait(timeout=10)
        if not self.samples:
            return {}
        return {"nvidia_smi_peak_mib": max(self.samples), "nvidia_smi_baseline_mib": self.samples[0]}


def stage_bench(check: Check, source: dict, workdir: str, env: dict, gpu: bool, cases: list[str]) -> dict:
    entry = check.stage("bench", cases={}, ok=False)
    # Predicted seconds per case: its bytes written at the source's own write speed, twice over for safety,
    # plus start-up (the dry run and the real run each start torch and NCCL).
    predict = 30 + 2 * source["tensor_bytes"] / GB / max(source.get("write_gb_s", 0.2), 0.05)
    for name in cases:
        if check.left() - 20 < predict:
            entry["cases"][name] = {"skipped": f"not started: {check.left():.0f}s left, about {predict:.0f}s needed"}
            check.say(f"bench {name}: skipped ({entry['cases'][name]['skipped']})")
            check.save()
            continue
        out = os.path.join(workdir, f"bench-{name}.json")
        cmd = [sys.executable, os.path.join(BENCH, "run.py"), "--src", source["path"], "--reps", "1", "--ranks", "1",
               "--workdir", os.path.join(workdir, "work"), "--out", out, "--timeout", str(int(check.left() - 20)),
               *BENCH_CASES[name]] + (["--gpu"] if gpu and name != "copy" else [])
        smi = GpuMemory() if gpu else None
        if smi is not None:
            time.sleep(0.5)  # the baseline sample, before the case's processes start
        rc, tail, secs = check.run(cmd, timeout=check.left() - 15, env=env)
        result = {"rc": rc, "seconds": secs, "tail": tail[-1500:]}
        if smi is not None:
            result.update(smi.stop())
        if rc == 0 and os.path.exists(out):
            with open(out) as f:
                got = json.load(f)
            (result["summary"],) = got["cases"]
            result["machine"] = got["machine"]
        entry["cases"][name] = result
        check.save()
    entry["figures"] = figures(entry["cases"], source["tensor_bytes"])
    entry["ok"] = all(c.get("rc") == 0 for c in entry["cases"].values())
    return check.stage("bench", **entry)


def figures(cases: dict, tensor_bytes: int) -> list[dict]:
    """Per case: GB/s end to end (source bytes / wall, start-up included) and over the data time (wall minus
    the dry run's), each against the copy's, the slowest rank's phases, and peak GPU memory."""
    copy = (cases.get("copy") or {}).get("summary") or {}
    copy_wall = copy.get("median_wall")
    rows = []
    for name, c in cases.items():
        s = c.get("summary")
        if not s or "median_wall" not in s:
            continue
        wall, data = s["median_wall"], s.get("data_time")
        row = {"case": s["name"], "wall_s": round(wall, 3), "gb_s_end_to_end": _sig(tensor_bytes / GB / wall),
               "data_s": None if data is None else round(data, 3),
               "gb_s_data": _sig(tensor_bytes / GB / data) if data and data > 0 else None,
               "wall_over_copy": _sig(wall / copy_wall) if copy_wall else None,
               "phases_s": {k: round(v, 3) for k, v in (s.get("phases_max_over_ranks") or {}).items()},
               "peak_rss_mib": [round(x / 2**20) for x in s.get("peak_rss_per_rank") or []],
               "peak_gpu_allocated_mib": [round(x / 2**20) for x in s.get("peak_gpu_per_rank") or []],
               "nvidia_smi_peak_mib": c.get("nvidia_smi_peak_mib"),
               "nvidia_smi_baseline_mib": c.get("nvidia_smi_baseline_mib"), "read_ratio": s.get("read_ratio")}
        rows.append(row)
    return rows


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def table(check: Check) -> None:
    st = check.results["stages"]
    check.say(f"status {check.results['status']} after {check.results['elapsed_s']}s "
              f"(budget {check.results['budget_s']}s); results in {check.out}/gpu_check.json")
    for name, e in st.items():
        check.say(f"  {name:<7} {'ok' if e.get('ok') else 'NOT OK'}"
                  + (f"  {e['counts']}" if name == "tests" and e.get("counts") else "")
                  + (f"  {e.get('size_gb')} GB in {e.get('seconds')}s" if name == "source" else ""))
    for row in st.get("bench", {}).get("figures", []):
        check.say(f"  {row['case']:<36} wall {row['wall_s']:8.2f}s  {row['gb_s_end_to_end']:7.4g} GB/s end to end"
                  f"  x{row['wall_over_copy']} copy  GPU MiB: smi peak {row['nvidia_smi_peak_mib']} (baseline "
                  f"{row['nvidia_smi_baseline_mib']}), torch peak {row['peak_gpu_allocated_mib']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="no GPU: every stage on the CPU (gloo) with a tiny source, to test this script")
    p.add_argument("--download-wheels", action="store_true", help="fill .whl/ for the GPU machine, then stop")
    p.add_argument("--budget-s", type=float, default=450.0, help="the whole run's seconds (stages share them)")
    p.add_argument("--size-gb", type=float, default=None, help="synthetic source size (default 16; smoke: 0.004)")
    p.add_argument("--workdir", default=None, help="source and outputs (default: the roomiest non-tmpfs /var/tmp, /tmp, ...)")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "out", "gpu_check"),
                   help="results folder (default: $OUT, else out/gpu_check)")
    p.add_argument("--cases", default=",".join(BENCH_CASES), help="bench cases, in order: " + ", ".join(BENCH_CASES))
    p.add_argument("--skip", default="", help="stages to leave out: tests, bench (comma list)")
    p.add_argument("--keep", action="store_true", help="keep the workdir (source and outputs)")
    ns = p.parse_args(argv)
    if ns.download_wheels:
        return download_wheels()
    cases = [c for c in ns.cases.split(",") if c]
    unknown = (set(cases) - set(BENCH_CASES)) | (set(filter(None, ns.skip.split(","))) - {"tests", "bench"})
    if unknown:
        p.error(f"unknown: {', '.join(sorted(unknown))}")
    smoke = ns.cpu_smoke
    size_gb = ns.size_gb if ns.size_gb is not None else (0.004 if smoke else 16.0)
    check = Check(ns.out, ns.budget_s, "cpu-smoke" if smoke else "gpu")
    workdir = pick_workdir(ns.workdir)
    site = os.path.join(workdir, "site")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, site, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               PYTHONUNBUFFERED="1")
    if smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, on a GPU host too
    ok = True
    try:
        info = stage_env(check, workdir, env)
        if not smoke and not info["cuda_available"]:
            check.say("no CUDA device: nothing to check here (use --cpu-smoke to test the script on a CPU)")
            check.results["status"] = "no-gpu"
            return 1
        ok &= stage_wheels(check, site)["ok"]
        if "tests" not in ns.skip:
            ok &= stage_tests(check, env, smoke, cap_s=240)["ok"]
        if "bench" not in ns.skip and cases:
            source = stage_source(check, workdir, size_gb, env)
            ok &= source["ok"]
            if source["ok"]:
                ok &= stage_bench(check, source, workdir, env, gpu=not smoke, cases=cases)["ok"]
        check.results["status"] = "ok" if ok else "failed"
        return 0 if ok else 1
    except BaseException as e:
        check.results["status"] = f"aborted: {e.__class__.__name__}: {e}"
        raise
    finally:
        check.save()
        table(check)
        if not ns.keep:
            for name in ("source", "work", "site", *(f"bench-{c}.json" for c in BENCH_CASES)):
                path = os.path.join(workdir, name)
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else None
                os.remove(path) if os.path.isfile(path) else None


if __name__ == "__main__":
    sys.exit(main())

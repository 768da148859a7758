"""`make gpu-check`: does minigpt, built for the CUDA wheel, find CUDA inside that wheel?

No GPU is needed. Runs `minigpt devices` under the dynamic loader's trace (`LD_DEBUG=libs`) and
checks, from the loader's own lines:
  * TensorFlow's libraries are loaded from the wheel's real folder (not from the .tf-gpu/lib links),
    so their `$ORIGIN/../nvidia/...` RUNPATHs point into the wheel;
  * every CUDA library TensorFlow asks for at start-up (libcudart, and libcublas/libcudnn/... if it
    asks for them) is found inside the wheel's nvidia/ folders; only the driver (libcuda.so.1) may
    be missing, as on a machine with no GPU;
  * TensorFlow does not print "Could not find cuda drivers".
With no GPU, TensorFlow stops at cuInit and asks for nothing more. So a second process loads
libtensorflow_cc.so.2 by the very path minigpt loaded it from (and whatever else minigpt had loaded
from the wheel's nvidia/ folder), calls the function TensorFlow calls once it has found a GPU
(DsoLoader::MaybeTryDlopenGPULibraries: cuBLAS, cuBLASLt, cuFFT, cuSOLVER, cuSPARSE, cuDNN; if one
fails to load TensorFlow registers no GPU) and checks, the same way, that those load from the wheel.
Then, for XLA (`--xla`) on a GPU: ptxas and libdevice are where TensorFlow looks for them (the
nvidia-cuda-nvcc wheel next to TensorFlow), and TensorFlow itself, asked in-process through the
library minigpt loaded, resolves them there.

    python bench/gpu_check.py --minigpt target/gpu/debug/minigpt --tf-lib .tf-gpu/lib
"""

import argparse
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

# CUDA's libraries (the toolkit's, from the nvidia-* wheels) and the driver's, by name.
CUDA_LIB = re.compile(r"^lib(cu|nv|nccl)")
DRIVER_LIBS = {"libcuda.so.1", "libcuda.so", "libnvidia-ml.so.1", "libnvidia-ptxjitcompiler.so.1"}
NO_DRIVER_LINE = "Could not find cuda drivers"

results = []  # (ok, label, detail)


def check(ok, label, detail=""):
    results.append((bool(ok), label, detail))
    return ok


def inside(path, folder):
    try:
        return os.path.commonpath([os.path.realpath(path), os.path.realpath(folder)]) == os.path.realpath(folder)
    except ValueError:
        return False


def needed(binary):
    """The NEEDED entries of `binary` (readelf), or None when readelf is missing."""
    if not shutil.which("readelf"):
        return None
    out = subprocess.run(["readelf", "-d", binary], capture_output=True, text=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.*)\]", out)


def parse_ld_debug(text):
    """The loader's `libs` trace: the libraries searched for, in order, each with whose RUNPATH was
    searched (the object that asked for it), the files tried, and the file it was loaded from."""
    libs, current = [], None
    inits = {}
    for line in text.splitlines():
        m = re.match(r"\s*\d+:\s+(.*)$", line)
        if not m:
            continue
        body = m.group(1).strip()
        if body.startswith("find library="):
            name = body[len("find library="):].split()[0]
            current = {"name": name, "asked_by": None, "tried": []}
            libs.append(current)
        elif body.startswith("search path=") and current is not None and current["asked_by"] is None:
            who = re.search(r"\((?:RUNPATH|RPATH) from file (.*)\)$", body)
            if who:
                current["asked_by"] = who.group(1)
        elif body.startswith("trying file=") and current is not None:
            current["tried"].append(body[len("trying file="):])
        elif body.startswith("calling init: "):
            path = body[len("calling init: "):]
            inits.setdefault(os.path.basename(path), path)
    for lib in libs:
        # Loaded if an object of that name ran its initialisers (every library here has some).
        lib["loaded_from"] = inits.get(lib["name"])
    return libs, inits


def judge_cuda_libs(libs, nvidia, when):
    """Prints the CUDA libraries asked for in a trace, checks each (but the driver) was found inside
    the wheel's nvidia/ folder, and returns them by name, in the order asked."""
    asked = {}
    for lib in libs:
        if CUDA_LIB.match(lib["name"]) and lib["name"] not in asked:
            asked[lib["name"]] = lib
    for name, lib in asked.items():
        by = os.path.basename(lib["asked_by"]) if lib["asked_by"] else "?"
        print(f"  {name:<28} asked by {by:<30} -> {lib['loaded_from'] or 'NOT FOUND'}")
    for name, lib in asked.items():
        if name in DRIVER_LIBS:
            # The driver comes with the GPU's kernel module, not from a wheel.
            print(f"  (the driver {name}: " +
                  (f"found at {lib['loaded_from']})" if lib["loaded_from"] else "not installed on this machine)"))
            continue
        where = lib["loaded_from"]
        check(where and inside(where, nvidia), f"{name} found inside the wheel's nvidia/{when}", where or
              f"not found; tried {len(lib['tried'])} files, first: {(lib['tried'] or ['-'])[0]}")
    return asked


# --- Asking TensorFlow itself -----------------------------------------------------------------
# Run in a child process (`--probe`): it loads libtensorflow_cc.so.2 by the path minigpt loaded it
# from (so the wheel's $ORIGIN and TensorFlow's own path are the same as in minigpt) and calls
# functions the wheel's libraries export: the GPU libraries' loader that TensorFlow runs once it has
# found a GPU, and XLA's search for libdevice and ptxas. They take a string_view and return
# absl::Status, std::string, std::vector<std::string> or absl::StatusOr<std::string> (libstdc++'s
# new ABI, SysV x86-64: the result through a hidden pointer, the string_view as length and data).

def _status(rep):
    """An absl::Status from its one word: None when OK, else its code and message."""
    if rep == 1:  # absl::OkStatus(), inlined
        return None
    if rep & 1:  # an inlined error code, no message
        return f"status code {rep >> 2}"
    code = ctypes.c_int32.from_address(rep + 4).value  # a StatusRep: ref count, code, message
    return f"status code {code}: {_String.from_address(rep + 8).value()}"


class _String(ctypes.Structure):  # std::string
    _fields_ = [("data", ctypes.c_void_p), ("size", ctypes.c_size_t), ("buf", ctypes.c_char * 16)]

    def value(self):
        return ctypes.string_at(self.data, self.size).decode()


class _StatusOrString(ctypes.Structure):  # absl::StatusOr<std::string>
    _fields_ = [("rep", ctypes.c_size_t), ("value", _String)]

    def result(self):
        error = _status(self.rep)
        return {"ok": True, "value": self.value.value()} if error is None else {"ok": False, "error": error}


class _StringVector(ctypes.Structure):  # std::vector<std::string>
    _fields_ = [("begin", ctypes.c_void_p), ("end", ctypes.c_void_p), ("cap", ctypes.c_void_p)]

    def values(self):
        size = ctypes.sizeof(_String)
        return [_String.from_address(a).value() for a in range(self.begin or 0, self.end or 0, size)]


def probe(libtensorflow_cc, preload, preferred_dirs):
    lib = ctypes.CDLL(libtensorflow_cc)
    for path in preload:  # what minigpt had loaded at start-up besides TensorFlow
        ctypes.CDLL(path)
    sv = lambda s: (ctypes.c_size_t(len(s.encode())), ctypes.c_char_p(s.encode()))
    out = {"pid": os.getpid()}

    # What gpu_device.cc does after it has found a GPU (libtensorflow_framework.so.2 exports it).
    status = ctypes.c_size_t()
    lib["_ZN3tsl8internal9DsoLoader26MaybeTryDlopenGPULibrariesEv"](ctypes.byref(status))
    out["dlopen_gpu_libraries"] = _status(status.value) or "OK"

    roots = _StringVector()
    lib["_ZN3tsl18CandidateCudaRootsB5cxx11Ev"](ctypes.byref(roots))
    prefer_path = lib["_ZN3tsl19PreferPtxasFromPathEv"]
    prefer_path.restype = ctypes.c_bool
    out.update(candidate_cuda_roots=roots.values(), prefer_ptxas_from_path=prefer_path(), by_dir={})
    libdevice_path = lib["_ZN3xla3gpu5nvptx13LibDevicePathB5cxx11ESt17basic_string_viewIcSt11char_traitsIcEE"]
    find_ptxas = lib["_ZN15stream_executor19FindPtxAsExecutableB5cxx11ESt17basic_string_viewIcSt11char_traitsIcEE"]
    for preferred in preferred_dirs:  # "" is XLA's default (no --xla_gpu_cuda_data_dir)
        libdevice, ptxas = _String(), _StatusOrString()
        libdevice_path(ctypes.byref(libdevice), *sv(preferred))
        find_ptxas(ctypes.byref(ptxas), *sv(preferred))
        out["by_dir"][preferred] = {"libdevice": libdevice.value(), "ptxas": ptxas.result()}
    print(json.dumps(out))


def ask_tensorflow(libtensorflow_cc, preload, preferred_dirs, env):
    """The probe's answer, its stderr and its own loader trace."""
    cmd = [sys.executable, os.path.abspath(__file__), "--probe", libtensorflow_cc, json.dumps(preload),
           *preferred_dirs]
    with tempfile.TemporaryDirectory() as tmp:
        # VLOG(1) lets TensorFlow's loader say which library it could not load, and why.
        run_env = dict(env, LD_DEBUG="libs", LD_DEBUG_OUTPUT=os.path.join(tmp, "ld"), TF_CPP_MAX_VLOG_LEVEL="1")
        p = subprocess.run(cmd, capture_output=True, text=True, env=run_env, timeout=600)
        lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
        if p.returncode != 0 or not lines:
            return None, f"exit {p.returncode}: {p.stderr.strip()[-500:]}", ""
        answer = json.loads(lines[-1])
        trace_file = os.path.join(tmp, f"ld.{answer['pid']}")  # not the ptxas it ran
        trace = open(trace_file).read() if os.path.exists(trace_file) else ""
    return answer, p.stderr, trace


# --- The check ------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minigpt", required=True, help="the minigpt binary built for --tf-lib")
    ap.add_argument("--tf-lib", required=True, help="the folder of links made by the Makefile (.tf-gpu/lib)")
    ap.add_argument("--log", help="also write minigpt's output and the loader's trace to this file")
    args = ap.parse_args()

    link = os.path.join(args.tf_lib, "libtensorflow_cc.so.2")
    if not os.path.exists(link):
        sys.exit(f"FAIL: no {link}: run `make gpu-check` (it links the wheel first)")
    wheel = os.path.dirname(os.path.realpath(link))      # site-packages/tensorflow
    site = os.path.dirname(wheel)
    nvidia = os.path.join(site, "nvidia")
    print(f"TensorFlow's folder in the wheel: {wheel}")
    print(f"CUDA wheels' folder:              {nvidia}")

    # 1. minigpt loads TensorFlow at run time (src/library.rs): the binary does not link it.
    deps = needed(args.minigpt)
    if deps is None:
        print("(readelf not found: the loading is judged by the loader's trace only)")
    else:
        check(not any("tensorflow" in d for d in deps), "minigpt does not link TensorFlow at build time",
              ", ".join(deps))

    # 2. minigpt devices under the loader's trace; TensorFlow's own log at its most verbose.
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "LD_PRELOAD")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "0"
    with tempfile.TemporaryDirectory() as tmp:
        run_env = dict(env, LD_DEBUG="libs", LD_DEBUG_OUTPUT=os.path.join(tmp, "ld"))
        p = subprocess.run([args.minigpt, "devices"], capture_output=True, text=True, env=run_env, timeout=600)
        trace = "".join(open(os.path.join(tmp, f)).read() for f in sorted(os.listdir(tmp)))
    if args.log:
        with open(args.log, "w") as f:
            f.write(f"$ LD_DEBUG=libs TF_CPP_MIN_LOG_LEVEL=0 {args.minigpt} devices\n--- stdout\n{p.stdout}"
                    f"--- stderr\n{p.stderr}--- loader trace\n{trace}")
    print(f"\n$ LD_DEBUG=libs TF_CPP_MIN_LOG_LEVEL=0 {args.minigpt} devices   (exit {p.returncode})")
    for line in p.stdout.splitlines():
        print(f"  | {line}")
    for line in p.stderr.splitlines():
        if re.search(r"cuda|cuInit|gpu|GPU|driver|device", line):
            print(f"  ! {line}")
    check(p.returncode == 0 and "Num GPUs Available" in p.stdout, "minigpt devices ran",
          next((l for l in p.stdout.splitlines() if "Num GPUs Available" in l), f"exit {p.returncode}"))

    inits = parse_ld_debug(trace)[1]
    for name in ("libtensorflow_cc.so.2", "libtensorflow_framework.so.2"):
        where = inits.get(name)
        check(where and os.path.dirname(where) == wheel, f"{name} loaded from the wheel's folder", where or "not loaded")

    # 3. The CUDA libraries TensorFlow asked for at start-up, in the order it asked.
    print("\nAt start-up (minigpt devices), the loader was asked for:")
    asked = judge_cuda_libs(parse_ld_debug(trace)[0], nvidia, "")
    check("libcudart.so.12" in asked, "libcudart.so.12 asked for at start-up", "" if asked else "no CUDA library at all")
    for wanted in ("libcublas", "libcudnn"):
        if not any(n.startswith(wanted) for n in asked):
            print(f"  ({wanted}*: not asked for at start-up)")
    said = [l for l in (p.stdout + p.stderr).splitlines() if NO_DRIVER_LINE in l]
    check(not said, f'no "{NO_DRIVER_LINE}" line', said[0].strip() if said else "")

    # 4. Ask TensorFlow, through the library minigpt loaded (same path, same $ORIGIN), in a process
    #    that has also loaded what minigpt had loaded at start-up from the wheel's nvidia/ folder.
    nvcc = os.path.join(nvidia, "cuda_nvcc")
    cc = inits.get("libtensorflow_cc.so.2")
    preload = [path for path in inits.values() if inside(path, nvidia)]
    answer, err, probe_trace = ask_tensorflow(cc, preload, ["", nvcc], env) if cc else (None, "not loaded", "")
    check(answer is not None, f"loaded {cc} and asked TensorFlow", err if answer is None else "")
    if answer is not None:
        print("\nOnce it has found a GPU, TensorFlow loads (DsoLoader::MaybeTryDlopenGPULibraries, called here):")
        later = judge_cuda_libs(parse_ld_debug(probe_trace)[0], nvidia, " (after a GPU is found)")
        check(answer["dlopen_gpu_libraries"] == "OK", "TensorFlow's GPU-library loader succeeds",
              answer["dlopen_gpu_libraries"] if answer["dlopen_gpu_libraries"] != "OK" else
              "loaded now: " + ", ".join(n for n in later if n not in asked and n not in DRIVER_LIBS))
        if answer["dlopen_gpu_libraries"] != "OK":
            print("  On a GPU, TensorFlow would log \"Cannot dlopen some GPU libraries\" and register no GPU.")
            for line in err.splitlines():
                if "Could not load dynamic library" in line:
                    print(f"  ! {line}")

    # 5. XLA on a GPU: ptxas and libdevice from the nvidia-cuda-nvcc wheel. TensorFlow looks for a
    #    CUDA root at <folder of libtensorflow_cc.so.2>/../nvidia/cuda_nvcc (among others).
    ptxas = os.path.join(nvcc, "bin", "ptxas")
    libdevice = os.path.join(nvcc, "nvvm", "libdevice", "libdevice.10.bc")
    print(f"\nXLA's CUDA root in the wheel: {nvcc}")
    v = subprocess.run([ptxas, "--version"], capture_output=True, text=True) if os.access(ptxas, os.X_OK) else None
    ran = v is not None and v.returncode == 0
    check(ran, "ptxas exists and runs",
          ptxas + (" (" + next((l for l in v.stdout.splitlines() if "release" in l), "?") + ")" if ran else ""))
    check(os.path.isfile(libdevice), "libdevice exists", libdevice)
    if answer is not None:
        default, pinned = answer["by_dir"][""], answer["by_dir"][nvcc]
        print("  TensorFlow's candidate CUDA roots: " + ", ".join(answer["candidate_cuda_roots"]))
        # LibDevicePath gives libdevice.10.bc itself (its folder in older releases).
        real = os.path.realpath(libdevice)
        finds_libdevice = lambda got: os.path.realpath(got) in (real, os.path.dirname(real))
        finds_ptxas = lambda got: got.get("ok") and os.path.realpath(got["value"]) == os.path.realpath(ptxas)
        check(finds_libdevice(default["libdevice"]), "XLA finds libdevice there, with no setting", default["libdevice"])
        on_path = shutil.which("ptxas")
        if on_path and answer["prefer_ptxas_from_path"] and not finds_ptxas(default["ptxas"]):
            print(f"  (XLA takes the ptxas on PATH, {on_path}, before the wheel's: pin it with "
                  f"XLA_FLAGS=--xla_gpu_cuda_data_dir={nvcc})")
        else:
            check(finds_ptxas(default["ptxas"]), "XLA finds ptxas there, with no setting",
                  default["ptxas"].get("value") or default["ptxas"].get("error"))
        check(finds_libdevice(pinned["libdevice"]) and finds_ptxas(pinned["ptxas"]),
              "XLA finds both there given --xla_gpu_cuda_data_dir=<that root>",
              f"{pinned['libdevice']}, {pinned['ptxas'].get('value') or pinned['ptxas'].get('error')}")

    # Summary.
    print("\nSummary:")
    for ok, label, detail in results:
        print(f"  {'PASS' if ok else 'FAIL'}  {label}" + (f": {detail}" if detail else ""))
    failed = sum(not ok for ok, _, _ in results)
    print(f"\ngpu-check: {'PASS' if not failed else 'FAIL'} ({len(results) - failed}/{len(results)} checks passed)")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--probe":
        probe(sys.argv[2], json.loads(sys.argv[3]), sys.argv[4:])
    else:
        sys.exit(main())

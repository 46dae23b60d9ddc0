"""Does raising a C++ error crash this machine's Python? benchmarks/device_check.sh runs this after a
test run saw segfaults inside ops that reject bad input on the GPU machine. Each case runs in its own
process, after a prelude that loads what a test worker loads, and reports how the process ended.
torch's own checks (which capture a C++ backtrace) and shammie's (which do not) are compared."""

import subprocess
import sys

PRELUDES = {
    "plain": "import torch, shammie",
    "test-like": ("import torch, shammie, transformers, scipy.optimize, torch._dynamo\n"
                  "f = torch.compile(lambda t: t * 2, backend='aot_eager', fullgraph=True)\n"
                  "f(torch.ones(3, device='cuda')); torch.cuda.synchronize()"),
}
RAISERS = {
    "torch check, cpu": "torch.ones(2, 3).view(7)",
    "torch check, cuda": "torch.ones(2, 3, device='cuda').view(7)",
    "shammie check, cpu": "shammie.blockdiag_butterfly_multiply(torch.randn(4, 12), torch.randn(3, 4, 4), torch.randn(4, 3, 2))",
    "shammie check, cuda": ("shammie.blockdiag_butterfly_multiply(*(torch.randn(*s, device='cuda') "
                            "for s in ((4, 12), (3, 4, 4), (4, 3, 2))))"),
}
TEMPLATE = """{prelude}
import threading, time
stop = False
def spin():   # a second thread, as pytest-xdist's worker has
    while not stop:
        time.sleep(0.001)
t = threading.Thread(target=spin); t.start()
try:
    for _ in range(20):
        try:
            {raiser}
        except (RuntimeError, ValueError, TypeError):
            pass
finally:
    stop = True
    t.join()
print("ok")
"""

# All cases at once (each its own process), reported in order.
runs = {(pname, rname): subprocess.Popen([sys.executable, "-X", "faulthandler", "-c",
                                          TEMPLATE.format(prelude=prelude, raiser=raiser)],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for pname, prelude in PRELUDES.items() for rname, raiser in RAISERS.items()}
for (pname, rname), proc in runs.items():
    try:
        _, err = proc.communicate(timeout=35)
        verdict = "ok" if proc.returncode == 0 else f"exit {proc.returncode}: {err.strip().splitlines()[-1:]}"
    except subprocess.TimeoutExpired:
        proc.kill()
        verdict = "timeout"
    print(f"{pname:10s} {rname:22s} {verdict}", flush=True)

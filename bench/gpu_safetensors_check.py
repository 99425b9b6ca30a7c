"""GPU check of the SafeTensors backend: serve a SmolLM2-shaped model (random weights)
on CUDA, confirm it runs there, and time one and four streams (fixed length)."""
import json, os, subprocess, sys, threading, time
import httpx

model = sys.argv[1]
proc = subprocess.Popen([sys.executable, "-m", "shimmy_core", "serve", "--host", "127.0.0.1", "--port", "0",
                         "--model", model, "--no-demo", "--no-cache"] + sys.argv[2:],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        env={**os.environ, "SHIMMY_HOME": "/tmp/shome"})
url = None
lines = []
t0 = time.time()
while time.time() - t0 < 120:
    line = proc.stdout.readline()
    if not line:
        break
    lines.append(line)
    if "listening on " in line:
        url = line.strip().split("listening on ", 1)[1]
        break
print("".join(lines))
assert url, "server did not start"
threading.Thread(target=lambda: [print("server:", l, end="") for l in proc.stdout], daemon=True).start()
models = httpx.get(url + "/models").json()["data"]
print("models:", [(m["id"], m["format"]) for m in models])
mid = models[0]["id"]
H = {"Cache-Control": "no-cache"}
body = lambda n: {"model": mid, "messages": [{"role": "user", "content": "Write a story."}], "max_tokens": n,
                  "temperature": 0, "logit_bias": {"2": -100}}
t = time.perf_counter(); r = httpx.post(url + "/chat/completions", json=body(4), headers=H, timeout=300)
print("first request (load)", r.status_code, round(time.perf_counter() - t, 2), "s", r.text[:300])
print("health:", httpx.get(url.rsplit("/v1", 1)[0] + "/health").text[:500])
for n_streams in (1, 4, 8):
    res = []
    def go():
        t = time.perf_counter(); r = httpx.post(url + "/chat/completions", json=body(128), headers=H, timeout=600)
        res.append((r.status_code, r.json().get("usage", {}).get("completion_tokens"), time.perf_counter() - t))
    ts = [threading.Thread(target=go) for _ in range(n_streams)]
    t = time.perf_counter(); [x.start() for x in ts]; [x.join() for x in ts]
    wall = time.perf_counter() - t
    print(f"{n_streams} streams: {sum(c or 0 for _, c, _ in res) / wall:.1f} tok/s aggregate; statuses {[s for s, _, _ in res]}; tokens {[c for _, c, _ in res]}")
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0))
print("nvidia-smi:", subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv"], capture_output=True, text=True).stdout)
proc.terminate(); proc.wait(30)

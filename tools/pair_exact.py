"""Exact mode at half the store's bytes against no budget: `flashlm run` pairs, 48 greedy tokens
each, the store's pages dropped (posix_fadvise DONTNEED) before every run, the pair's order
alternating by round. Writes each run's ms/token, peak RSS, text, load and streaming record.

    python tools/pair_exact.py STORE ROUNDS OUT.json
"""
import json, os, subprocess, sys, time
store, rounds, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
PROMPT = "Write a Python function that checks whether a string is a palindrome."
def drop():
    for root, _, files in os.walk(store):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
def run(budget):
    drop()
    argv = [sys.executable, "-m", "flashlm", "run", "--model", store, "--json", "--max-tokens", "48", "--raw"]
    if budget: argv += ["--memory-budget", budget, "--selection", "dense"]
    la = os.getloadavg()[0]
    p = subprocess.run(argv + [PROMPT], capture_output=True, text=True)
    if p.returncode: print(p.stderr[-2000:]); raise SystemExit(p.returncode)
    j = json.loads(p.stdout)
    return {"budget": budget, "ms_per_token": j["ms_per_token"], "peak_rss_mib": j["peak_rss_bytes"] / 2**20,
            "text": j["text"], "load": la, "streaming": j.get("streaming")}
res = []
for r in range(rounds):
    order = [None, "0.5"] if r % 2 == 0 else ["0.5", None]
    pair = {b or "none": run(b) for b in order}
    pair["ratio"] = pair["0.5"]["ms_per_token"] / pair["none"]["ms_per_token"]
    pair["same_text"] = pair["0.5"]["text"] == pair["none"]["text"]
    print(r, round(pair["ratio"], 3), pair["same_text"], round(pair["0.5"]["peak_rss_mib"]), pair["0.5"]["load"], flush=True)
    res.append(pair)
json.dump({"store": store, "prompt": PROMPT, "rounds": res, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
          open(out, "w"), indent=1)

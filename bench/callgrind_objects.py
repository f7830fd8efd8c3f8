#!/usr/bin/env python3
"""Self cost per object (Envoy binary, libc, ??? = V8-generated code: the wasm module and V8 stubs)
per request, from worker-thread dumps kept by `envoy_bench.py --instructions --dumps DIR`:
`python3 bench/callgrind_objects.py DIR/<scenario> ...` (the dump is <scenario>.callgrind.out;
2,000 requests a window, timers included)."""
import sys, re, collections
# Sum self cost per object (ob=) from a callgrind dump (compressed names).
def by_object(path):
    names = {}; cur = None; tot = collections.Counter(); sub = False
    for line in open(path, errors="replace"):
        if line.startswith("ob="):
            m = re.match(r"ob=\((\d+)\)(?: (.*))?", line.strip())
            if m:
                if m.group(2): names[m.group(1)] = m.group(2)
                cur = m.group(1)
            else:
                cur = line.strip()[3:]
            continue
        if line.startswith("cob="):
            # A called object's name may be defined here first (compressed names).
            m = re.match(r"cob=\((\d+)\) (.*)", line.strip())
            if m:
                names[m.group(1)] = m.group(2)
            continue
        if line.startswith(("calls=",)):
            sub = True; continue
        if line[:1].isdigit() or line[:1] in "+-*":
            if sub: sub = False; continue  # inclusive cost line of a call
            parts = line.split()
            if len(parts) >= 2 and cur is not None:
                try: tot[cur] += int(parts[1])
                except ValueError: pass
    return tot, names
for f in sys.argv[1:]:
    t, names = by_object(f + ".callgrind.out"); n = 2000
    t = collections.Counter({names.get(k, k): v for k, v in t.items()})
    print(f, {k.split('/')[-1][:30]: round(v / n / 1000, 1) for k, v in t.most_common(6)})

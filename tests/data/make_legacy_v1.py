"""Made with vdisk at main cabe396 (format version 1, no checkpoint log)."""
import json, sys, vdisk, numpy as np
path = sys.argv[1]
BS = 4096
def pat(seed): return np.random.default_rng(seed).integers(1, 256, BS, dtype=np.uint8).tobytes()
ids = []
with vdisk.create(path, 16 * BS, block_size=BS) as d:
    d.pwrite(pat(1), 0); d.pwrite(pat(2), 3 * BS)
    ids.append(d.checkpoint())                 # u/1
    d.pwrite(pat(3), 5 * BS)
    ids.append(d.checkpoint())                 # u/2
    d.pwrite(pat(4), 0)
    s = d.snapshot("snap")                     # closes generation 3
    ids.append(s.change_id)
    d.consumers.register("nightly", ids[1])
    d.pwrite(pat(5), 7 * BS)
print(json.dumps({"ids": ids, "writes": [[0, 1, 1], [3, 2, 1], [5, 3, 2], [0, 4, 3], [7, 5, 4]]}))

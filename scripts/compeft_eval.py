"""ComPEFT on the demo's artifacts: compression ratio and held-out accuracy before / after.

    .venv/bin/python scripts/compeft_eval.py demo-report/artifacts OUT_DIR [name:key=value,...] ...
    e.g.  ... lora: lora:lowrank=factors,scope=tensor,alpha=2.5 full: full:density=0.05

Each spec is ``<artifact name>:<compress options>`` (empty options: the defaults, density 0.2, alpha 1).
A spec ``<name>:source`` evaluates the uncompressed artifact. Prints one JSON row per spec.
"""

import json
import sys
import time
from pathlib import Path

from deltatune import api
from deltatune.cli.demo import TWEETS
from deltatune.core import artifact
from deltatune.ops.compress import compress


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(root: str, out: str, specs: list[str]) -> None:
    for i, spec in enumerate(specs):
        name, _, opts = spec.partition(":")
        source = Path(root) / name
        if opts == "source":
            info = artifact.read_meta(source)
            row = {"artifact": name, "options": "source", "stored_bytes": info["sizes"]["stored_bytes"], "ratio": 1.0}
            target = source
        else:
            options = {k: _value(v) for k, v in (kv.split("=") for kv in opts.split(",") if kv)}
            t = time.time()
            target = compress(source, Path(out) / f"{name}-{i}", **options)
            info = artifact.read_meta(target)
            row = {"artifact": name, "options": options, **info["sizes"], **info["compression"],
                   "compress_s": round(time.time() - t, 1)}
        t = time.time()
        row.update(api.eval(target, TWEETS, batch_size=32), eval_s=round(time.time() - t, 1))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])

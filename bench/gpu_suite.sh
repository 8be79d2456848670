#!/usr/bin/env bash
# The benchmark suite on one GPU with the paper's net (about 5 minutes on an H200); writes
# bench/results/<date>-<gpu>.json. Needs the five-class images and the FID Inception weights beside the repo:
#   DATA (default gpu_carry/cifar10-five-class, holding cifar-10-batches-py/) and WEIGHTS (default
#   gpu_carry/pt_inception-2015-12-05-pool3-only.pth). Run from the repo root: bash bench/gpu_suite.sh
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-../.venv/bin/python}
DATA=${DATA:-../gpu_carry/cifar10-five-class}
WEIGHTS=${WEIGHTS:-../gpu_carry/pt_inception-2015-12-05-pool3-only.pth}
gpu=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
out=results/$(date +%F)-$gpu.json
tmp=$(mktemp -d)
mkdir -p results
$PY train_throughput.py --out "$tmp/train.json"                    # batch 256: throughput at a larger batch
$PY train_throughput.py --batch 64 --out "$tmp/train_b64.json"     # the paper's batch
$PY sample_throughput.py --out "$tmp/sample.json"                  # 1,000 guided samples, DPM-Solver++ 20 steps
$PY fid_throughput.py --weights "$WEIGHTS" --out "$tmp/fid.json"
$PY real_training.py --data "$DATA" --out "$tmp/real.json"
$PY - "$tmp" "$out" <<'PY'
import json, pathlib, sys
tmp, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
suite = {p.stem: json.loads(p.read_text()) for p in sorted(tmp.glob("*.json"))}
out.write_text(json.dumps(suite, indent=1))
print(f"wrote {out}")
PY

#!/usr/bin/env bash
# The benchmark suite on one GPU with the paper's net; writes bench/results/<date>-<gpu>.json.
# Needs the five-class images in CIFAR's format under DATA (default gpu_carry/cifar10-five-class/cifar-10-batches-py):
# all five data_batch files, or only data_batch_1 (15 MB, what fits the device tool's 64 MiB carry), which is then
# repeated to the full 25,000 images: the same arithmetic, so the same throughput. The Inception throughput uses a
# random network of the FID Inception's shape unless WEIGHTS names a state dict. Run: bash bench/gpu_suite.sh
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-../.venv/bin/python}
DATA=${DATA:-../gpu_carry/cifar10-five-class}
WEIGHTS=${WEIGHTS:-random}
gpu=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_') if torch.cuda.is_available() else 'cpu')")
out=results/$(date +%F)-$gpu.json
tmp=$(mktemp -d)
mkdir -p results
if [ ! -f "$DATA/cifar-10-batches-py/data_batch_5" ]; then  # only data_batch_1 was carried: repeat it
  mkdir -p "$tmp/data/cifar-10-batches-py"
  cp "$DATA/cifar-10-batches-py/batches.meta" "$tmp/data/cifar-10-batches-py/"
  for i in 1 2 3 4 5; do cp "$DATA/cifar-10-batches-py/data_batch_1" "$tmp/data/cifar-10-batches-py/data_batch_$i"; done
  DATA=$tmp/data
fi
$PY train_throughput.py --out "$tmp/train.json"                    # batch 256: throughput at a larger batch
$PY sample_throughput.py --out "$tmp/sample.json"                  # 1,000 guided samples, DPM-Solver++ 20 steps
$PY fid_throughput.py --weights "$WEIGHTS" --out "$tmp/fid.json"
$PY eval_throughput.py --out "$tmp/eval.json"                      # 50,000 guided samples + features, FID, KID, IS, intervals
$PY real_training.py --data "$DATA" --out "$tmp/real.json"         # the paper's batch, 64, on the real images
$PY speed_equivalence.py --out "$tmp/equivalence.json"             # loss curves, every speed option on vs off
$PY - "$tmp" "$out" <<'PY'
import json, pathlib, sys
tmp, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
suite = {p.stem: json.loads(p.read_text()) for p in sorted(tmp.glob("*.json"))}
out.write_text(json.dumps(suite, indent=1))
print(f"wrote {out}")
PY

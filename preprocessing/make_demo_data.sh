#!/usr/bin/env bash
# The data half of the demo: synthesise multi-site prostate MRI, prepare it, partition it.
# Usage: preprocessing/make_demo_data.sh [DEMO_DIR]   (needs the `fedfms` command on PATH)
set -euo pipefail
demo=${1:-demo}
raw=$demo/raw
data=$demo/data

fedfms synth prostate --out "$raw" --sites 6 --cases-per-site 6 --seed 0
# CPU demo profile: the FedFMS rule (clip to [min, p99], rescale to [0, 1], single slices)
# at 64 pixels instead of 1024/256.
fedfms prepare --src "$raw" --layout saml --out "$data" --image-size 64 --label-size 64 --num-slices 1
fedfms partition --data "$data" --method natural --proxy-fraction 0.1 --out "$data/partitions/natural"
# Leave-one-site-out (jobs/fedmsa_prostate_loso): UCL never trains and is only tested.
fedfms partition --data "$data" --method loso --unseen UCL --out "$data/partitions/loso"
# FLAP-SAM input: 5-slice stacks, every slice of a stack labelled.
fedfms prepare --src "$raw" --layout saml --out "$demo/data_stack5" --image-size 64 --label-size 64 --num-slices 5 --all-label-slices

echo
echo "raw volumes:        $raw/<SITE>/CaseNN.nii.gz"
echo "prepared samples:   $data/images, $data/labels (options in $data/prepare.json); 5-slice stacks in $demo/data_stack5"
echo "per-site datalists: $data/datalists/<SITE>.json"
echo "client datalists:   $data/partitions/natural/<client>.json; leave-one-site-out: $data/partitions/loso"

#!/usr/bin/env bash
# The data half of the demo: synthesise multi-site prostate MRI, prepare it, partition it.
# Usage: preprocessing/make_demo_data.sh [DEMO_DIR]   (needs the `fedfms` command on PATH)
set -euo pipefail
demo=${1:-demo}
raw=$demo/raw
data=$demo/data

# Six sites; every site also exports a clinical table (<SITE>/clinical.csv: case, age).
fedfms synth prostate --out "$raw" --sites 6 --cases-per-site 6 --seed 0
# Each bundle defines its preprocessing (the preprocessing_3d section of its configs); the demo
# stores it at 64 pixels (CPU profile) instead of the papers' sizes, recorded as overrides.
# FedFMS rule (clip to [min, p99], rescale to [0, 1], single slices): FedSAM, FedMSA, the U-Nets.
fedfms prepare --bundle bundles/fedmsa_prostate --src "$raw" --layout saml --out "$data" --image-size 64 --label-size 64
fedfms partition --data "$data" --method natural --proxy-fraction 0.1 --out "$data/partitions/natural"
# Leave-one-site-out (jobs/fedmsa_prostate_loso): UCL never trains and is only tested.
fedfms partition --data "$data" --method loso --unseen UCL --out "$data/partitions/loso"
# FLAP-SAM input: 5-slice stacks, every slice of a stack labelled.
fedfms prepare --bundle bundles/flapsam_prostate --src "$raw" --layout saml --out "$demo/data_stack5" --image-size 64 --label-size 64
# The same cases per site as demo/data's natural partition (same seed and proxy fraction).
fedfms partition --data "$demo/data_stack5" --method natural --proxy-fraction 0.1 --out "$demo/data_stack5/partitions/natural"
# FM-instructed initialisation (jobs/fminit_prostate): slices at LiteMedSAM's own 256 px, so the
# teacher is not fed upsampled thumbnails; the server keeps about a quarter of the training cases
# as its proxy set, the rest go to 3 clients skewed by patient age (or by quantity).
fedfms prepare --bundle bundles/smlite_prostate --src "$raw" --layout saml --out "$demo/data_256"
fedfms partition --data "$demo/data_256" --method attribute --attribute age --clients 3 --proxy-fraction 0.23 --out "$demo/data_256/partitions/age"
fedfms partition --data "$demo/data_256" --method quantity --clients 3 --proxy-fraction 0.23 --out "$demo/data_256/partitions/quantity"
fedfms partition --data "$demo/data_256" --method natural --proxy-fraction 0.23 --out "$demo/data_256/partitions/natural"

echo
echo "raw volumes:        $raw/<SITE>/CaseNN.nii.gz, clinical tables $raw/<SITE>/clinical.csv"
echo "prepared samples:   $data/images, $data/labels (options in $data/prepare.json); 5-slice stacks in $demo/data_stack5; 256 px in $demo/data_256"
echo "per-site datalists: $data/datalists/<SITE>.json"
echo "client datalists:   $data/partitions/natural/<client>.json; leave-one-site-out: $data/partitions/loso; age skew: $demo/data_256/partitions/age"

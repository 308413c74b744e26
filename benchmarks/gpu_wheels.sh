#!/usr/bin/env bash
# The wheels that benchmarks/gpu_check.py needs on the device tool's GPU machine: what trl-onpolicy imports that the
# machine's image lacks (its image: Python 3.12, x86-64, torch 2.11+cu130, transformers 5.17, accelerate 1.15, peft;
# no network there). Run here, from the root of the checkout that the device tool sends; writes DIR (default .whl,
# ~18 MiB), ignored by git through info/exclude, for `carry: [".whl"]`.
#
#   bash benchmarks/gpu_wheels.sh [DIR]
#
# Every dependency of these wheels (their Requires-Dist, without extras) is either here or in the image's package list
# (/work/.library/device/KINDS.md, read 2026-11-17); versions are those of this project's environment.
set -euo pipefail
dir=${1:-.whl}
exclude="$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p "$dir"
if [[ $dir != /* ]]; then  # inside the checkout: keep it out of git
  mkdir -p "$(dirname "$exclude")"
  grep -qx "/$dir/" "$exclude" 2>/dev/null || echo "/$dir/" >>"$exclude"
fi

get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d "$dir" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 "$@"
}
# trl and datasets (gpu_check.py and trl-onpolicy import them), and what datasets needs beyond the image
get trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# lm-eval and evaluate (trl-onpolicy's eval hook; gpu_check.py does not import them), and what they need
get lm_eval==0.4.13 evaluate==0.4.6 more-itertools==11.2.1 nltk==3.10.4 defusedxml==0.7.1 pytablewriter==1.2.1 \
  DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 \
  chardet==6.0.0.post1 pytz==2026.6
# three of lm-eval's dependencies are on PyPI as source only: pure Python, so a wheel built here works there
python3 -m pip wheel -q --no-deps -w "$dir" rouge_score==0.1.2 sqlitedict==2.1.0 word2number==1.1
# bitsandbytes for the qlora part, slimmed from 41 to 3.5 MiB: its CPU library and the CUDA 13.0 one (torch cu130)
# only; the others leave the wheel and its RECORD (pip installs it as it is; it does not check RECORD's hashes)
get bitsandbytes==0.50.2
python3 - "$dir" <<'EOF'
import glob, os, sys, zipfile

path = glob.glob(os.path.join(sys.argv[1], "bitsandbytes-0.50.2-*.whl"))[0]
drop = lambda name: name.startswith("bitsandbytes/libbitsandbytes_") and not name.endswith(("_cpu.so", "_cuda130.so"))
with zipfile.ZipFile(path) as src, zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_DEFLATED) as dst:
    for info in src.infolist():
        data = src.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(True) if not drop(line.decode().split(",")[0]))
        if not drop(info.filename):
            dst.writestr(info, data)
os.replace(path + ".tmp", path)
EOF
ls "$dir" && du -sh "$dir"

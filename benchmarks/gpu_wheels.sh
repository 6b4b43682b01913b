#!/usr/bin/env bash
# Run here (with PyPI) before benchmarks/gpu_session.sh: downloads, into .whl (git-ignored via
# .git/info/exclude), the Python 3.12 wheels of the pins that the GPU machine's image lacks and
# that the participant graph imports (niworkflows, nireports, templateflow are not imported by it).
set -eu
mkdir -p .git/info .whl/py
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
want="acres annotated-types bids-validator bidsschematools cachebox ci-info deepdiff dipy
etelemetry frozendict importlib_resources looseversion nibabel nilearn nipype num2words
orderly-set pathlib_abc platformdirs prov puremagic pybids pydantic pydantic_core pydot rdflib
sqlalchemy tomli_w traits transforms3d trx-python typing-inspection universal_pathlib"
for name in $want; do
  pin=$(grep -i "^${name}==" requirements.txt)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$pin"
done
# docopt (for num2words) has no wheel: its single module travels as source
python3 -m pip download -q --no-deps --no-binary=:all: -d /tmp/docopt "$(grep '^docopt==' requirements.txt)"
tar -xzf /tmp/docopt/docopt-*.tar.gz -C /tmp/docopt && cp /tmp/docopt/docopt-*/docopt.py .whl/py/
du -sh .whl

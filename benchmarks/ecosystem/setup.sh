#!/usr/bin/env bash
# Create benchmarks/.ecosystem-venv (Python 3.12) with the JAX LLM libraries that jaxmerge is to
# merge: Google DeepMind's gemma 4.0.1 (Flax linen) and MaxText 0.2.5 (Flax NNX), CPU only,
# isolated from the project's environment; with pytest, for the tests against the real libraries:
#   benchmarks/.ecosystem-venv/bin/python -m pytest -p no:cacheprovider tests/test_real_libraries.py
#
# Usage: bash benchmarks/ecosystem/setup.sh   (from anywhere; idempotent)
#
# What is in it and why:
# - jax/jaxlib 0.11.1 and flax 0.12.9, not the project's 0.10.2 / 0.12.8: gemma works with both,
#   but maxtext 0.2.5 needs jax >= 0.11.1 (it imports jax.experimental.xla_metadata.must_fuse_call)
#   and flax >= 0.12.9 (its own pins).
# - gemma, kauldron, maxtext and a few of their dependencies are installed with --no-deps: a plain
#   `pip install gemma` pulls ~200 packages (TensorFlow, tensorflow-datasets, cloud SDKs) and
#   upgrades jax. The rest is what their model-building imports need, nothing more.
# - TensorFlow is NOT installed. gemma's model classes import kauldron.typing, whose
#   array_types.py does `import tensorflow as tf` (only for tf.Tensor isinstance aliases); code
#   that builds a gemma Transformer here puts a stub module in sys.modules while gemma is
#   imported (see check() below). gemma.gm.nn._layers (Einsum, RMSNorm) and gemma.gm.nn._modules
#   (Embedder, Attention, FeedForward, Block) import without it.
# - EasyDeL 0.3.0 is not installed: `easydel.modules` imports every model family at import time,
#   and its GLM4V-MoE config touches a transformers class that needs PyTorch, so
#   `easydel.LlamaForCausalLM` fails without torch (its ejkernel 0.0.78 also pins jax ~= 0.9.0).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$(cd "$here/.." && pwd)/.ecosystem-venv"

check() {
    TRANSFORMERS_VERBOSITY=error JAX_PLATFORMS=cpu "$venv/bin/python" - <<'PY'
import importlib.metadata, importlib.util, sys, types
# kauldron.typing (imported by gemma's Transformer) does `import tensorflow`; stub it only while
# gemma is imported: maxtext probes `import tensorflow` too and would take a stub for the real one.
stub = importlib.util.find_spec("tensorflow") is None
if stub:
    sys.modules["tensorflow"] = types.ModuleType("tensorflow")
    sys.modules["tensorflow"].Tensor = type("Tensor", (), {})
from gemma.gm.nn import _layers, _modules, _config, _transformer
if stub:
    del sys.modules["tensorflow"]
from maxtext.configs import pyconfig
from maxtext.models import models
from maxtext.utils import model_creation_utils
import jax, flax, pytest, beartype
v = importlib.metadata.version
print(f"jax {jax.__version__}, flax {flax.__version__}, gemma {v('gemma')}, maxtext {v('maxtext')}")
PY
}

if [ -x "$venv/bin/python" ] && check >/dev/null 2>&1; then
    echo "Ecosystem environment ready: $venv"
    exit 0
fi

py="$(pyenv which python3.12 2>/dev/null || true)"
if [ -z "$py" ]; then
    py="$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1 || true)"
fi
if [ -z "$py" ] && command -v python3.12 >/dev/null; then py="$(command -v python3.12)"; fi
if [ -z "$py" ]; then
    echo "setup.sh: no Python 3.12 found (pyenv or PATH); gemma and maxtext need >= 3.12" >&2
    exit 1
fi

start=$SECONDS
rm -rf "$venv"
"$py" -m venv "$venv"
pip_install() {
    # This machine's pip config names local index folders that may be absent; drop those
    # warnings, and the resolver's complaints about the --no-deps packages' unmet requirements.
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | {
        grep -v -E "is ignored: it is neither a file nor a directory|dependency resolver does not currently|requires .*, which is not installed|^$" || true
    }
    return "${PIPESTATUS[0]}"
}
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
# Every install below runs under these pins (the full set this script was verified with), so
# nothing upgrades jax or flax and transitive versions do not drift.
tr -s ' ' '\n' >"$constraints" <<'PINS'
absl-py==2.5.1 aiofiles==25.1.0 aiohappyeyeballs==2.7.1 aiohttp==3.14.5 aiosignal==1.4.0
annotated-doc==0.0.7 annotated-types==0.8.0 anyio==4.16.0 aqtp==0.9.0 array_record==0.8.6
attrs==26.1.0 certifi==2026.10.19.post1 cffi==2.1.1 charset-normalizer==3.5.3 chex==0.1.92
click==8.5.1 cloudpickle==3.1.3 clu==0.0.12 cryptography==50.0.2 decorator==5.3.1 dialog==1.1.0
drjax==0.2.1 einops==0.8.2 einshape==1.0 etils==1.15.0 fastapi==0.165.0 filelock==4.3.1
fire==0.7.1 flax==0.12.9 frozenlist==1.8.0 fsspec==2026.9.0 gcsfs==2026.10.1 gemma==4.0.1
google-api-core==2.44.0 google-auth==2.63.0 google-auth-oauthlib==1.5.0 google-cloud-core==2.8.0
google-cloud-storage-control==1.17.0 google-crc32c==1.9.0 google-resumable-media==2.11.0
googleapis-common-protos==1.76.0 grain==0.2.18 grpc-google-iam-v1==0.14.6 grpcio==1.85.3
grpcio-status==1.85.3 h11==0.16.0 hf-xet==1.8.0 httpcore2==2.16.2 httpx2==2.16.2
huggingface_hub==2.4.0 humanize==4.17.0 idna==3.20 immutabledict==4.3.1 jaraco.functools==4.6.0
jax==0.11.1 jaxlib==0.11.1 jaxtyping==0.3.11 Jinja2==3.1.6 kauldron==1.4.4 lark==1.3.1
markdown-it-py==4.3.0 MarkupSafe==3.0.4 maxtext==0.2.5 mdurl==0.1.2 ml_collections==1.1.0
ml_dtypes==0.7.0 more-itertools==11.2.1 mpmath==1.3.0 msgpack==1.2.4 multidict==7.2.1
numpy==2.4.6 oauthlib==4.0.1 omegaconf==2.4.0 opentelemetry-api==1.45.2 opt_einsum==3.4.0
optax==0.2.8 orbax-checkpoint==0.12.8 packaging==26.4 pathwaysutils==0.1.13 pillow==13.0.0
portpicker==1.6.0 prometheus_client==0.26.0 propcache==0.5.4 proto-plus==1.29.0 protobuf==7.36.2
psutil==7.2.2 pyasn1==0.6.5 pyasn1_modules==0.4.2 pycparser==3.12 pydantic==2.14.4
pydantic_core==2.50.5 Pygments==2.21.0 PyYAML==6.0.4 qwix==0.1.8 regex==2026.11.19
requests==2.34.2 requests-oauthlib==2.0.0 rich==15.0.0 safetensors==0.8.0 scipy==1.18.1
sentencepiece==0.2.3 shellingham==1.5.4 simplejson==4.3.0 six==1.17.0 starlette==1.10.0
sympy==1.14.0 tensorstore==0.1.86 termcolor==3.3.0 tiktoken==0.14.0 tokamax==0.0.17
tokenizers==0.23.3 toolz==1.2.0 tqdm==4.70.1 transformers==5.24.0 treescope==0.1.10
truststore==0.10.5 typeguard==4.6.1 typer==0.29.2 typing_extensions==4.16.0
typing-inspection==0.4.5 urllib3==2.8.0 uvicorn==0.54.0 uvloop==0.23.0 wadler_lindig==0.1.8
wrapt==2.5.2 xprof==2.24.2 yarl==1.25.1 zipp==4.1.2
PINS
pip_install --upgrade pip==26.3
pip_install -c "$constraints" jax==0.11.1 jaxlib==0.11.1 flax==0.12.9 numpy==2.4.6
# The libraries themselves, and deps whose own dependency lists are much larger than what
# importing them needs (tokamax: tensorboardx, xprof; xprof: duckdb, google-cloud-storage, ...;
# dialog: mcp, anywidget, pydub).
pip_install --no-deps gemma==4.0.1 kauldron==1.4.4 maxtext==0.2.5 aqtp==0.9.0 tokamax==0.0.17 \
    xprof==2.24.2 dialog==1.1.0 pathwaysutils==0.1.13
# What `gemma.gm.nn._transformer` imports (via kauldron.kd / kauldron.ktyping / gemma.gm.text).
pip_install -c "$constraints" einops==0.8.2 jaxtyping==0.3.11 immutabledict==4.3.1 \
    typeguard==4.6.1 lark==1.3.1 chex==0.1.92 clu==0.0.12 sentencepiece==0.2.3 tqdm==4.70.1 \
    pillow==13.0.0 requests==2.34.2
# What `maxtext.configs.pyconfig`, `maxtext.models.models` and `maxtext.utils.model_creation_utils`
# import (pathwaysutils: fastapi, uvicorn; tokamax -> xprof.cli: fire, six).
pip_install -c "$constraints" omegaconf==2.4.0 Jinja2==3.1.6 qwix==0.1.8 einshape==1.0 \
    pydantic==2.14.4 huggingface_hub==2.4.0 transformers==5.24.0 grain==0.2.18 drjax==0.2.1 \
    tiktoken==0.14.0 sympy==1.14.0 fastapi==0.165.0 uvicorn==0.54.0 fire==0.7.1 six==1.17.0
# pytest for tests/test_real_libraries.py (run with this environment's python; beartype for the
# project's --jaxtyping-packages option).
pip_install -c "$constraints" pytest==9.2.0 iniconfig==2.3.1 pluggy==1.7.0 beartype==0.23.1
check | { grep -v '^\[NO-OP\] gcs_storage dependency missing' || true; }
n="$("$venv/bin/python" -m pip list 2>/dev/null | tail -n +3 | wc -l)"
echo "Built $venv: $n packages, $(du -sh "$venv" | cut -f1), $((SECONDS - start)) s"

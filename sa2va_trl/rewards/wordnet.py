"""WordNet for METEOR, with no network: find NLTK's copy, download it, or build it from Debian's.

`load_wordnet()` returns an English-only `WordNetCorpusReader` (cached per directory), trying
in order:

1. a `corpora/wordnet` already on NLTK's data path (or in the target directory);
2. `nltk.download("wordnet")` into the target directory, in a background thread with a timeout
   (it fails fast without network);
3. building NLTK's corpus from a system WordNet 3.0 (`$WNHOME`, `$WNHOME/dict`,
   `/usr/share/wordnet` from Debian's `wordnet-base` + `wordnet-sense-index`): the database
   files are *copied* (NLTK's path checks reject symlinks leading outside its data dir) and the
   `lexnames` file Debian lacks is generated from the table of lexnames(5WN);
4. otherwise `WordNetUnavailableError`, which says exactly how to fix it.

The target directory is the `data_dir` argument, else `$SA2VA_TRL_NLTK_DATA`, else `~/nltk_data`.
Only English WordNet is needed: the reader is built without the Open Multilingual WordNet
(`omw-1.4` / `omw-2.0` are never loaded), and the OMW sense-key remapping is skipped.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

__all__ = ["load_wordnet", "build_wordnet_from_system", "WordNetUnavailableError", "LEXNAMES", "DEFAULT_SYSTEM_DIRS"]

ENV_DATA_DIR = "SA2VA_TRL_NLTK_DATA"
DEFAULT_SYSTEM_DIRS = ("/usr/share/wordnet", "/usr/local/WordNet-3.0/dict", "/usr/share/WordNet-3.0/dict")

# WordNet 3.0's lexicographer files in file-number order (lexnames(5WN)); the third column of
# the `lexnames` file is the syntactic category, implied by the prefix.
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)  # fmt: skip
_POS_NUMBER = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}

# The files NLTK's reader opens; `index.sense` comes from Debian's wordnet-sense-index.
_REQUIRED_FILES = tuple(
    f"{kind}.{pos}" for kind in ("data", "index") for pos in ("noun", "verb", "adj", "adv")
) + ("noun.exc", "verb.exc", "adj.exc", "adv.exc", "index.sense")
_OPTIONAL_FILES = ("cntlist.rev", "cntlist", "lexnames")

_cache: dict[str, Any] = {}
_lock = threading.Lock()


class WordNetUnavailableError(LookupError):
    """No WordNet could be found, downloaded or built; the message lists the fixes."""


def lexnames_text() -> str:
    """The `lexnames` file: one "NN<TAB>name<TAB>pos-number" line per lexicographer file.

    Example:
        >>> lexnames_text().splitlines()[44]
        '44\\tadj.ppl\\t3'
    """
    return "".join(f"{i:02d}\t{name}\t{_POS_NUMBER[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES))


def _default_data_dir() -> Path:
    env = os.environ.get(ENV_DATA_DIR)
    return Path(env).expanduser() if env else Path.home() / "nltk_data"


def _system_dirs() -> list[Path]:
    dirs = []
    wnhome = os.environ.get("WNHOME")
    if wnhome:
        dirs += [Path(wnhome), Path(wnhome) / "dict"]
    dirs += [Path(d) for d in DEFAULT_SYSTEM_DIRS]
    return dirs


def _english_reader_class():
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class EnglishWordNetCorpusReader(WordNetCorpusReader):
        """NLTK's reader without the OMW sense-key remapping (used only for other languages)."""

        def map_wn(self, version: str = "wordnet"):
            return None

    return EnglishWordNetCorpusReader


def _on_nltk_path(data_dir: Path) -> None:
    import nltk

    text = str(data_dir)
    if text not in nltk.data.path:
        # NLTK only opens corpora under its data path (its path-security check).
        nltk.data.path.insert(0, text)


def _open_reader(root: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": by design
        return _english_reader_class()(root, None)


def _find_existing(data_dir: Path) -> tuple[Any | None, str | None]:
    """Return (reader, None) for a WordNet on NLTK's path or in `data_dir`, else (None, reason)."""
    import nltk

    if (data_dir / "corpora" / "wordnet").is_dir() or (data_dir / "corpora" / "wordnet.zip").is_file():
        _on_nltk_path(data_dir)
    try:
        root = nltk.data.find("corpora/wordnet")
    except LookupError:
        try:
            root = nltk.data.find("corpora/wordnet.zip/wordnet/")
        except LookupError:
            return None, "no corpora/wordnet on NLTK's data path"
    try:
        return _open_reader(root), None
    except Exception as e:  # a broken copy (e.g. missing lexnames): report it, try the next source
        return None, f"found {root} but could not read it ({type(e).__name__}: {e})"


def _try_download(data_dir: Path, timeout: float) -> str | None:
    """Run nltk.download in a daemon thread (it cannot be cancelled; we stop waiting)."""
    import nltk

    result: dict[str, Any] = {}

    def run() -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                data_dir.mkdir(parents=True, exist_ok=True)
                result["ok"] = nltk.download(
                    "wordnet", download_dir=str(data_dir), quiet=True, raise_on_error=False, print_error_to=io.StringIO()
                )
        except Exception as e:
            result["error"] = f"{type(e).__name__}: {e}"

    thread = threading.Thread(target=run, name="sa2va-trl-wordnet-download", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return f"nltk.download('wordnet') did not finish within {timeout:g} s"
    if result.get("ok"):
        return None
    return f"nltk.download('wordnet') failed ({result.get('error', 'no network?')})"


def _find_system_wordnet(system_dirs: list[Path]) -> tuple[Path | None, list[str]]:
    notes = []
    for d in system_dirs:
        if not d.is_dir():
            continue
        missing = [f for f in _REQUIRED_FILES if not (d / f).is_file()]
        if not missing:
            return d, notes
        notes.append(f"{d} lacks {missing}")
    return None, notes


def build_wordnet_from_system(source: str | os.PathLike, data_dir: str | os.PathLike) -> Path:
    """Copy a system WordNet 3.0 database into `<data_dir>/corpora/wordnet` in NLTK's layout.

    Adds `lexnames` when the source lacks it. Safe when several processes (e.g. 8 training ranks)
    build at once: each copies into a private temporary directory and renames it into place; the
    first rename wins.

    Args:
        source: a directory with data.*, index.*, *.exc and index.sense (e.g. /usr/share/wordnet).
        data_dir: the NLTK data directory to build into.

    Returns:
        The corpus directory `<data_dir>/corpora/wordnet`.
    """
    source, data_dir = Path(source), Path(data_dir).expanduser()
    missing = [f for f in _REQUIRED_FILES if not (source / f).is_file()]
    if missing:
        raise WordNetUnavailableError(f"{source} is not a WordNet 3.0 database: missing {missing}")
    corpora = data_dir / "corpora"
    corpora.mkdir(parents=True, exist_ok=True)
    final = corpora / "wordnet"
    tmp = Path(tempfile.mkdtemp(prefix=".wordnet-build-", dir=corpora))
    try:
        for name in _REQUIRED_FILES + _OPTIONAL_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)  # a copy, never a symlink
        if not (tmp / "lexnames").is_file():
            (tmp / "lexnames").write_text(lexnames_text())
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            # Another process finished first; its copy is identical.
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _fix_message(data_dir: Path, notes: list[str]) -> str:
    tried = "".join(f"\n  - {n}" for n in notes)
    return (
        "METEOR needs NLTK's WordNet corpus and none could be found, downloaded or built. Tried:"
        f"{tried}\nFix it with one of:\n"
        "  - sudo apt-get install wordnet-base wordnet-sense-index   (Debian/Ubuntu; sa2va-trl then builds "
        f"NLTK's copy in {data_dir} by itself; or set WNHOME to another WordNet 3.0 install)\n"
        "  - python -c \"import nltk; nltk.download('wordnet')\"   (needs network)\n"
        f"  - point NLTK_DATA (or {ENV_DATA_DIR}) at a directory that holds corpora/wordnet"
    )


def load_wordnet(
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    download_timeout: float = 10.0,
    system_dirs: list[str | os.PathLike] | None = None,
) -> Any:
    """Return an English WordNet reader for METEOR, finding, downloading or building it (cached).

    Args:
        data_dir: the NLTK data directory to look in and build into; defaults to
            `$SA2VA_TRL_NLTK_DATA`, else `~/nltk_data`.
        download: try `nltk.download("wordnet")` before building from the system copy.
        download_timeout: seconds to wait for the download.
        system_dirs: where to look for a system WordNet 3.0; defaults to `$WNHOME`,
            `$WNHOME/dict`, /usr/share/wordnet and two common install paths.

    Returns:
        An `nltk.corpus.reader.wordnet.WordNetCorpusReader`.

    Raises:
        WordNetUnavailableError: with the commands that fix it.

    Example:
        >>> wn = load_wordnet()
        >>> wn.synsets("puppy")[0].name(), "dog" in wn.synsets("dog")[0].lemma_names()
        ('puppy.n.01', True)
    """
    target = Path(data_dir).expanduser() if data_dir is not None else _default_data_dir()
    key = str(target.resolve()) if target.exists() else str(target)
    with _lock:
        if key in _cache:
            return _cache[key]
        notes: list[str] = []
        reader, why = _find_existing(target)
        if reader is None and why:
            notes.append(why)
        if reader is None and download:
            why = _try_download(target, download_timeout)
            if why:
                notes.append(why)
            else:
                reader, why = _find_existing(target)
                if why:
                    notes.append(why)
        if reader is None:
            dirs = [Path(d) for d in system_dirs] if system_dirs is not None else _system_dirs()
            source, more = _find_system_wordnet(dirs)
            notes += more
            if source is None:
                notes.append(f"no system WordNet 3.0 in {[str(d) for d in dirs]}")
            else:
                try:
                    corpus = build_wordnet_from_system(source, target)
                    _on_nltk_path(target)
                    reader = _open_reader(str(corpus))
                except Exception as e:
                    notes.append(f"building from {source} into {target} failed ({type(e).__name__}: {e})")
        if reader is None:
            raise WordNetUnavailableError(_fix_message(target, notes))
        _cache[key] = reader
        return reader

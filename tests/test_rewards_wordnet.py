"""WordNet offline: build NLTK's corpus from Debian's WordNet 3.0, and a clear error when nothing is there."""

from pathlib import Path

import pytest

from sa2va_trl.rewards import wordnet as wn_module
from sa2va_trl.rewards.wordnet import (
    LEXNAMES,
    WordNetUnavailableError,
    build_wordnet_from_system,
    lexnames_text,
    load_wordnet,
)

SYSTEM = Path("/usr/share/wordnet")
needs_system_wordnet = pytest.mark.skipif(
    not (SYSTEM / "data.noun").is_file() or not (SYSTEM / "index.sense").is_file(),
    reason="Debian's wordnet-base and wordnet-sense-index are not installed (scripts/setup.sh installs them as root)",
)


@pytest.fixture
def isolated_nltk_path(monkeypatch):
    """NLTK's data path without any pre-existing WordNet, restored afterwards."""
    import nltk

    monkeypatch.setattr(nltk.data, "path", [])
    monkeypatch.setattr(wn_module, "_cache", {})
    return nltk.data.path


def test_lexnames_table_has_45_numbered_lines():
    lines = lexnames_text().splitlines()
    assert len(lines) == len(LEXNAMES) == 45
    assert lines[0] == "00\tadj.all\t3"
    assert lines[3] == "03\tnoun.Tops\t1"
    assert lines[29] == "29\tverb.body\t2"
    assert lines[2] == "02\tadv.all\t4"
    assert lines[44] == "44\tadj.ppl\t3"


@needs_system_wordnet
def test_builds_nltk_corpus_from_system_wordnet_into_a_chosen_dir(tmp_path, isolated_nltk_path):
    from nltk.translate.meteor_score import meteor_score

    target = tmp_path / "nltk_data"
    reader = load_wordnet(target, download=False, system_dirs=[tmp_path / "missing", SYSTEM])
    corpus = target / "corpora" / "wordnet"
    assert (corpus / "lexnames").read_text() == lexnames_text()
    for name in ("data.noun", "index.verb", "index.sense", "noun.exc"):
        path = corpus / name
        assert path.is_file() and not path.is_symlink()
        assert path.stat().st_size == (SYSTEM / name).stat().st_size
    assert str(target) in isolated_nltk_path  # NLTK only opens corpora on its data path
    assert reader.synsets("puppy")[0].name() == "puppy.n.01"
    score = meteor_score([["a", "dog", "runs", "on", "grass"]], ["the", "puppy", "is", "running", "on", "the", "grass"],
                         wordnet=reader)
    assert score == pytest.approx(0.4914529914529914, abs=1e-15)
    # cached per directory; a second load finds the built copy without rebuilding
    assert load_wordnet(target, download=False) is reader
    wn_module._cache.clear()
    again = load_wordnet(target, download=False, system_dirs=[])
    assert again.synsets("dog")[0].name() == "dog.n.01"


@needs_system_wordnet
def test_target_dir_from_environment_and_wnhome(tmp_path, isolated_nltk_path, monkeypatch):
    # A WNHOME holding a copy of the database under dict/, as WordNet's own installer lays it out.
    wnhome = tmp_path / "WordNet-3.0"
    (wnhome / "dict").mkdir(parents=True)
    for f in SYSTEM.iterdir():
        if f.is_file():
            (wnhome / "dict" / f.name).write_bytes(f.read_bytes())
    monkeypatch.setenv("WNHOME", str(wnhome))
    monkeypatch.setenv("SA2VA_TRL_NLTK_DATA", str(tmp_path / "from_env"))
    reader = load_wordnet(download=False)
    assert (tmp_path / "from_env" / "corpora" / "wordnet" / "lexnames").is_file()
    assert reader.synsets("grass")


@needs_system_wordnet
def test_concurrent_builds_into_the_same_dir_both_succeed(tmp_path):
    first = build_wordnet_from_system(SYSTEM, tmp_path)
    second = build_wordnet_from_system(SYSTEM, tmp_path)  # the corpus already exists: keep it
    assert first == second and (first / "lexnames").is_file()
    assert [p.name for p in (tmp_path / "corpora").iterdir()] == ["wordnet"]  # no temp dirs left behind


def test_missing_wordnet_raises_an_error_that_says_how_to_fix_it(tmp_path, isolated_nltk_path, monkeypatch):
    monkeypatch.delenv("WNHOME", raising=False)
    with pytest.raises(WordNetUnavailableError) as info:
        load_wordnet(tmp_path / "empty", download=False, system_dirs=[tmp_path / "nowhere"])
    message = str(info.value)
    assert "apt-get install wordnet-base wordnet-sense-index" in message
    assert "nltk.download('wordnet')" in message
    assert "NLTK_DATA" in message and "SA2VA_TRL_NLTK_DATA" in message
    assert str(tmp_path / "nowhere") in message


def test_incomplete_system_wordnet_is_reported(tmp_path, isolated_nltk_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "data.noun").write_text("")
    with pytest.raises(WordNetUnavailableError, match=r"partial lacks \[.*index.sense"):
        load_wordnet(tmp_path / "out", download=False, system_dirs=[partial])


def test_download_failure_falls_through_to_the_next_source(tmp_path, isolated_nltk_path, monkeypatch):
    calls = []
    monkeypatch.setattr(wn_module, "_try_download", lambda d, t: calls.append((d, t)) or "download failed (test)")
    with pytest.raises(WordNetUnavailableError, match="download failed"):
        load_wordnet(tmp_path / "x", download=True, download_timeout=3.0, system_dirs=[])
    assert calls == [(tmp_path / "x", 3.0)]


def test_a_hanging_download_is_abandoned_after_the_timeout(tmp_path, monkeypatch):
    import threading
    import time

    import nltk

    release = threading.Event()
    monkeypatch.setattr(nltk, "download", lambda *a, **k: release.wait(30))
    start = time.perf_counter()
    why = wn_module._try_download(tmp_path / "d", 0.5)
    release.set()
    assert time.perf_counter() - start < 5.0
    assert why == "nltk.download('wordnet') did not finish within 0.5 s"
    monkeypatch.setattr(nltk, "download", lambda *a, **k: False)
    assert wn_module._try_download(tmp_path / "d", 5.0).startswith("nltk.download('wordnet') failed")

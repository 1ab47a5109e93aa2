"""The dataset registry against the real mirror: every file registered, checksums, fetch errors."""

from __future__ import annotations

import json
import os
import re
import urllib.error
from pathlib import Path

import pytest

from econoserve.cli import main
from econoserve.errors import DataError
from econoserve.workload import registry

pytestmark = pytest.mark.realdata


def mirror() -> Path:
    return Path(os.environ["ECONOSERVE_DATA_MIRROR"])


def test_every_mirror_file_is_registered_with_the_readme_sha256():
    entries = {entry.file: entry for entry in registry.load_registry().values() if entry.mirror == "data"}
    on_disk = {path.name for path in mirror().iterdir() if path.name != "README.md"}
    assert on_disk == set(entries)
    readme = (mirror() / "README.md").read_text()
    listed = dict(re.findall(r"^([0-9a-f]{64})  (\S+)$", readme, flags=re.MULTILINE))
    assert len(listed) >= 10
    for sha256, file in listed.items():
        assert entries[file].sha256 == sha256


def test_every_entry_is_complete():
    for entry in registry.load_registry().values():
        assert entry.kind in {"dataset", "labels", "tokenizer", "profile"}
        assert entry.mirror == ("peers" if entry.kind == "profile" else "data")
        assert entry.url.startswith("https://")
        assert entry.license and entry.parser and entry.origin
        assert entry.size_bytes > 0 and entry.records > 0


def test_mirror_files_verify_and_have_registered_sizes():
    for name, entry in registry.load_registry().items():
        path = registry.verify(name)
        assert path == registry.mirror_dir(entry.mirror) / entry.file
        assert path.stat().st_size == entry.size_bytes


def test_peer_profiles_are_registered_with_their_readme_sha256():
    """Every measured profile in the peers mirror (beside the data mirror) is registered with the
    sha256 its README (DistServe) or SHA256SUMS (Vidur) states."""
    peers = registry.mirror_dir("peers")
    assert peers == mirror().parent / "peers"
    listed = dict(re.findall(r"^([0-9a-f]{64})  (\S+)$", (peers / "distserve" / "README.md").read_text(), flags=re.MULTILINE))
    listed = {f"distserve/{file}": sha for sha, file in listed.items()}
    for line in (peers / "vidur" / "SHA256SUMS").read_text().splitlines():
        sha, file = line.split()
        listed[f"vidur/{file}"] = sha
    entries = {entry.file: entry.sha256 for entry in registry.load_registry().values() if entry.mirror == "peers"}
    assert entries == listed


def test_peers_mirror_variable_overrides_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("ECONOSERVE_PEERS_MIRROR", str(tmp_path))
    monkeypatch.setenv("ECONOSERVE_DATA_CACHE", str(tmp_path / "cache"))
    assert registry.mirror_dir("peers") == tmp_path
    with pytest.raises(DataError, match="ECONOSERVE_PEERS_MIRROR"):
        registry.dataset_path("distserve-a100-fits")


def test_fetch_of_a_peer_file_lands_in_its_subfolder_of_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ECONOSERVE_DATA_CACHE", str(tmp_path / "cache"))
    path = registry.fetch("distserve-a100-fits", progress=False)
    assert path == tmp_path / "cache" / "distserve" / "profiler-a100-80g.distserve.json"
    assert list(path.parent.iterdir()) == [path]


def test_fetch_copies_from_mirror_into_cache_and_verifies(tmp_path, monkeypatch):
    monkeypatch.setenv("ECONOSERVE_DATA_CACHE", str(tmp_path / "cache"))
    path = registry.fetch("azure-code", progress=False)
    assert path == tmp_path / "cache" / "AzureLLMInferenceTrace_code.csv"
    assert registry.file_sha256(path) == registry.get_entry("azure-code").sha256
    assert registry.dataset_path("azure-code") == path  # the cache is preferred once filled
    assert list((tmp_path / "cache").iterdir()) == [path]  # no temporary file left behind


def test_corrupt_mirror_file_is_refused(tmp_path, monkeypatch):
    bad_mirror = tmp_path / "mirror"
    bad_mirror.mkdir()
    (bad_mirror / "AzureLLMInferenceTrace_code.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
    monkeypatch.setenv("ECONOSERVE_DATA_MIRROR", str(bad_mirror))
    monkeypatch.setenv("ECONOSERVE_DATA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="sha256 mismatch for azure-code"):
        registry.fetch("azure-code", progress=False)
    assert not (tmp_path / "cache" / "AzureLLMInferenceTrace_code.csv").exists()
    with pytest.raises(DataError, match="sha256 mismatch"):
        registry.verify("azure-code")


def test_unreachable_source_without_mirror_is_a_clear_error(tmp_path, monkeypatch):
    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(registry.urllib.request, "urlopen", unreachable)
    monkeypatch.delenv("ECONOSERVE_DATA_MIRROR")
    monkeypatch.setenv("ECONOSERVE_DATA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"cannot download https://\S+ \(no route to host\) and no mirror"):
        registry.fetch("azure-conv", progress=False)
    with pytest.raises(DataError, match="re-packaging .* cannot be downloaded byte for byte"):
        registry.fetch("alpaca", progress=False)
    with pytest.raises(DataError, match="not available locally; run 'econoserve data fetch alpaca'"):
        registry.dataset_path("alpaca")


def test_cli_data_list_verify_and_unknown_name(capsys):
    assert main(["data", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {row["name"] for row in rows} == set(registry.load_registry())
    assert all(row["location"] in {"mirror", "cache"} and row["size_bytes"] > 0 for row in rows)
    assert main(["data", "verify", "llama2-tokenizer", "gpt2-merges"]) == 0
    assert main(["data", "fetch", "bookcorpus"]) == 2
    assert "unknown dataset or tokenizer file 'bookcorpus'" in capsys.readouterr().err
